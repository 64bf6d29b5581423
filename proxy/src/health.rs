//! Active health checks: one task per checked backend, marking it down after consecutive
//! failures and up again after consecutive successes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};

use ficus_routes::config::HealthConfig;
use ficus_routes::Backend;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck};

use crate::state::{ActiveTable, Shared};

/// The health of one backend, shared by the checker task and the request path.
pub struct BackendHealth {
    name: String,
    addr: SocketAddr,
    host: String,
    tls: bool,
    config: HealthConfig,
    up: AtomicBool,
    /// Consecutive results against the current state (failures while up, successes while down).
    streak: AtomicU32,
    checker_started: AtomicBool,
}

impl BackendHealth {
    /// Starts optimistic: a backend is up until checks say otherwise.
    pub fn new(backend: &Backend, config: &HealthConfig, addr: SocketAddr) -> BackendHealth {
        BackendHealth {
            name: backend.name.clone(),
            addr,
            host: backend.host.clone(),
            tls: backend.tls,
            config: config.clone(),
            up: AtomicBool::new(true),
            streak: AtomicU32::new(0),
            checker_started: AtomicBool::new(false),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Records one check; returns the new state when it flipped.
    fn record(&self, passed: bool) -> Option<bool> {
        let up = self.is_up();
        if passed == up {
            self.streak.store(0, Ordering::Relaxed);
            return None;
        }
        let streak = self.streak.fetch_add(1, Ordering::Relaxed) + 1;
        let needed =
            if up { self.config.unhealthy_threshold } else { self.config.healthy_threshold };
        if streak < needed.max(1) {
            return None;
        }
        self.streak.store(0, Ordering::Relaxed);
        self.up.store(passed, Ordering::Relaxed);
        Some(passed)
    }

    fn checker(&self) -> HttpHealthCheck {
        let mut check = HttpHealthCheck::new(&self.host, self.tls);
        check.peer_template.options.connection_timeout = Some(self.config.timeout);
        check.peer_template.options.read_timeout = Some(self.config.timeout);
        match health_request(&self.config.path, &self.host) {
            Ok(req) => check.req = req,
            Err(e) => {
                tracing::warn!(backend = %self.name, error = %e, "health check falls back to GET /")
            }
        }
        check.validator = Some(Box::new(|resp: &ResponseHeader| {
            if resp.status.is_success() {
                Ok(())
            } else {
                pingora::Error::e_explain(
                    pingora::ErrorType::CustomCode("non 2xx health check", resp.status.as_u16()),
                    "during health check",
                )
            }
        }));
        check
    }
}

/// The request a health check sends.
fn health_request(path: &str, host: &str) -> pingora::Result<RequestHeader> {
    let mut req = RequestHeader::build("GET", path.as_bytes(), None)?;
    req.insert_header("Host", host)?;
    req.insert_header("User-Agent", "ficus-health-check")?;
    Ok(req)
}

/// Starts a checker task for every checked backend of `active` that has none yet.
///
/// A task holds only a weak reference: it ends by itself once no table uses its backend.
/// Must be called from within a Tokio runtime.
pub fn spawn_checkers(active: &ActiveTable, shared: &Arc<Shared>) {
    for health in active.upstreams.iter().filter_map(|u| u.health.as_ref()) {
        if health.checker_started.swap(true, Ordering::Relaxed) {
            continue;
        }
        shared.metrics.backend_up.with_label_values(&[&health.name]).set(i64::from(health.is_up()));
        tokio::spawn(run_checker(Arc::downgrade(health), Arc::downgrade(shared)));
    }
}

async fn run_checker(health: Weak<BackendHealth>, shared: Weak<Shared>) {
    let Some(first) = health.upgrade() else { return };
    let check = first.checker();
    let target = match pingora::lb::Backend::new(&first.addr.to_string()) {
        Ok(target) => target,
        Err(e) => {
            tracing::error!(backend = %first.name, error = %e, "cannot start health check");
            return;
        }
    };
    let interval = first.config.interval;
    drop(first);
    loop {
        let Some(health) = health.upgrade() else { return };
        let result = tokio::time::timeout(health.config.timeout, check.check(&target)).await;
        let passed = matches!(result, Ok(Ok(())));
        if let Some(up) = health.record(passed) {
            let detail = match &result {
                Ok(Ok(())) => "passed".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".to_string(),
            };
            if up {
                tracing::info!(backend = %health.name, "backend is up: health checks pass again");
            } else {
                tracing::warn!(backend = %health.name, detail, "backend marked down by health checks");
            }
            if let Some(shared) = shared.upgrade() {
                shared.metrics.backend_up.with_label_values(&[&health.name]).set(i64::from(up));
            }
        }
        drop(health);
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn health(unhealthy: u32, healthy: u32) -> BackendHealth {
        let table = ficus_routes::RouteTable::parse(
            "[backends.a]\nurl = \"http://127.0.0.1:1\"\n[defaults]\nbackend = \"a\"\n",
            ficus_routes::Format::Toml,
            "t.toml",
        )
        .expect("valid table");
        let config = HealthConfig {
            path: "/healthz".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            unhealthy_threshold: unhealthy,
            healthy_threshold: healthy,
        };
        BackendHealth::new(&table.backends[0], &config, "127.0.0.1:1".parse().expect("addr"))
    }

    #[test]
    fn a_backend_goes_down_only_after_consecutive_failures() {
        let h = health(3, 2);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), None, "a success resets the streak");
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), Some(false));
        assert!(!h.is_up());
    }

    #[test]
    fn a_down_backend_comes_back_after_consecutive_successes() {
        let h = health(1, 2);
        assert_eq!(h.record(false), Some(false));
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(false), None, "still down; the streak restarts");
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), Some(true));
        assert!(h.is_up());
    }
}

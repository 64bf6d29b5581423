//! The active route table and what the proxy derives from it: resolved upstream peers and
//! their health. Swapped atomically as a whole on reload.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use ficus_routes::{Backend, LoadError, RouteTable, ValidationError};
use http::{HeaderName, HeaderValue};
use pingora::upstreams::peer::HttpPeer;
use prometheus::IntCounter;

use crate::health::BackendHealth;
use crate::metrics::{Metrics, SeriesCache};
use crate::ramp::{Ramps, RouteRamp};
use crate::request::HeaderNames;
use crate::shadow::RouteShadow;

/// Why a request went to its route's `from` instead of `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The health check marks `to` down.
    Unhealthy = 0,
    /// Connecting to `to` failed (refused, timed out, TLS failure).
    ConnectFailed = 1,
}

impl Fallback {
    pub const ALL: [Fallback; 2] = [Fallback::Unhealthy, Fallback::ConnectFailed];

    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::Unhealthy => "unhealthy",
            Fallback::ConnectFailed => "connect_failed",
        }
    }
}

/// A backend ready to connect to: its peer template and its health, if it is checked.
pub struct Upstream {
    pub peer: HttpPeer,
    pub addr: SocketAddr,
    pub health: Option<Arc<BackendHealth>>,
    /// The Host header of requests sent here when the backend does not preserve the client's:
    /// the authority, without the scheme's default port. Built once, not per request.
    pub host_header: HeaderValue,
}

impl Upstream {
    /// False only when a health check has marked the backend down.
    pub fn is_up(&self) -> bool {
        self.health.as_ref().is_none_or(|h| h.is_up())
    }
}

/// A route table in service. Requests keep the `Arc` they started with, so a reload never
/// changes the table under a request in flight.
pub struct ActiveTable {
    pub table: RouteTable,
    /// Indexed like `table.backends`.
    pub upstreams: Vec<Upstream>,
    pub loaded_at: SystemTime,
    /// Request metrics by (route, backend), resolved on first use.
    pub series: SeriesCache,
    /// Indexed like `table.routes`: the shadow state of routes with `[routes.shadow]`.
    pub shadows: Vec<Option<Arc<RouteShadow>>>,
    /// Indexed like `table.routes`: the ramps of routes with `[routes.ramp]`.
    pub ramps: Vec<Option<Arc<RouteRamp>>>,
    /// Indexed like `table.routes`, then by [`Fallback`]: the fallback counters, resolved
    /// once so that neither a fallback nor the console's sampling looks them up by label.
    pub fallbacks: Vec<[IntCounter; 2]>,
    /// `table.strip_headers` and the override header, parsed once: removed from every
    /// request before it is forwarded.
    pub removed_headers: Vec<HeaderName>,
    /// The request headers routing looks up, parsed once.
    pub header_names: HeaderNames,
}

impl ActiveTable {
    /// Loads, validates and resolves a route file. Health state is carried over from
    /// `previous` for backends whose address and check are unchanged; ramps are attached
    /// last, once the file is known to be good.
    pub fn load(
        path: &Path,
        previous: Option<&ActiveTable>,
        ramps: &Ramps,
        metrics: &Metrics,
    ) -> Result<ActiveTable, LoadError> {
        let table = RouteTable::load(path)?;
        let file = path.display().to_string();
        let mut upstreams = Vec::with_capacity(table.backends.len());
        let mut errors = Vec::new();
        for backend in &table.backends {
            match resolve(backend).and_then(|addr| upstream(backend, addr, previous)) {
                Ok(upstream) => upstreams.push(upstream),
                Err(message) => errors.push(ValidationError {
                    file: file.clone(),
                    location: format!("backends.{}", backend.name),
                    field: "url".into(),
                    message,
                }),
            }
        }
        let removed_headers = removed_headers(&table, &file, &mut errors);
        if !errors.is_empty() {
            return Err(LoadError::Invalid(errors));
        }
        let series = SeriesCache::new(table.routes.len(), table.backends.len());
        let shadows = table
            .routes
            .iter()
            .map(|route| {
                let previous = previous.iter().flat_map(|p| p.shadows.iter().flatten());
                RouteShadow::for_route(route, previous, metrics)
            })
            .collect();
        let ramps = ramps.attach(&table, metrics);
        let fallbacks = table
            .routes
            .iter()
            .map(|route| {
                let (from, to) = (&table.backends[route.from].name, &table.backends[route.to].name);
                Fallback::ALL.map(|reason| {
                    metrics.fallbacks.with_label_values(&[&route.name, from, to, reason.as_str()])
                })
            })
            .collect();
        let header_names = HeaderNames::new(table.looked_up_headers());
        let loaded_at = SystemTime::now();
        Ok(ActiveTable {
            table,
            upstreams,
            loaded_at,
            series,
            shadows,
            ramps,
            fallbacks,
            removed_headers,
            header_names,
        })
    }

    /// The fallbacks of route `index` so far, for every reason.
    pub fn fallbacks_total(&self, index: usize) -> u64 {
        self.fallbacks.get(index).map_or(0, |counters| counters.iter().map(IntCounter::get).sum())
    }
}

/// The names every forwarded request loses, as header names. The route file's loader accepts
/// only tokens, which are header names, so an error here would be a disagreement between the
/// two, reported as the file's error all the same.
fn removed_headers(
    table: &RouteTable,
    file: &str,
    errors: &mut Vec<ValidationError>,
) -> Vec<HeaderName> {
    let strip = table.strip_headers.iter().map(|name| ("strip_headers", name));
    let overridden = table.override_header.iter().map(|name| ("override_header", name));
    strip
        .chain(overridden)
        .filter_map(|(field, name)| match HeaderName::from_bytes(name.as_bytes()) {
            Ok(name) => Some(name),
            Err(e) => {
                errors.push(ValidationError {
                    file: file.to_owned(),
                    location: "defaults".into(),
                    field: field.into(),
                    message: format!("\"{name}\" is not a valid header name: {e}"),
                });
                None
            }
        })
        .collect()
}

fn resolve(backend: &Backend) -> Result<SocketAddr, String> {
    let authority = backend.authority();
    let mut addrs =
        authority.to_socket_addrs().map_err(|e| format!("cannot resolve {authority}: {e}"))?;
    addrs.next().ok_or_else(|| format!("{authority} resolves to no address"))
}

fn upstream(
    backend: &Backend,
    addr: SocketAddr,
    previous: Option<&ActiveTable>,
) -> Result<Upstream, String> {
    let host = backend.host_header();
    let host_header = HeaderValue::try_from(host.as_str())
        .map_err(|_| format!("{host} cannot be sent as a Host header"))?;
    let sni = if backend.tls { backend.host.clone() } else { String::new() };
    let mut peer = HttpPeer::new(addr, backend.tls, sni);
    peer.options.connection_timeout = Some(backend.connect_timeout);
    peer.options.total_connection_timeout = Some(backend.connect_timeout * 2);
    peer.options.read_timeout = Some(backend.read_timeout);
    peer.options.write_timeout = Some(backend.write_timeout);
    let health = backend.health.as_ref().map(|check| {
        let carried = previous.and_then(|prev| {
            prev.table
                .backends
                .iter()
                .zip(&prev.upstreams)
                .find(|(old, up)| {
                    old.name == backend.name
                        && up.addr == addr
                        && old.health.as_ref() == Some(check)
                })
                .and_then(|(_, up)| up.health.clone())
        });
        carried.unwrap_or_else(|| Arc::new(BackendHealth::new(backend, check, addr)))
    });
    Ok(Upstream { peer, addr, health, host_header })
}

/// The last reload that failed, kept until a later one succeeds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadFailure {
    pub at: String,
    pub errors: Vec<String>,
}

/// State shared by the proxy, the admin API and the reloader.
pub struct Shared {
    pub routes_path: PathBuf,
    pub active: ArcSwap<ActiveTable>,
    pub last_failure: Mutex<Option<ReloadFailure>>,
    /// The table loaded at start and the last reload attempts after it.
    pub reload_log: crate::reload::ReloadLog,
    pub metrics: Metrics,
    pub ramps: Ramps,
    /// The last 15 minutes of each route, for the console.
    pub history: crate::console::History,
    /// Connections of shadow requests, pooled apart from the proxy's own.
    pub shadow_connector: pingora::connectors::http::Connector,
}

impl Shared {
    pub fn new(
        routes_path: PathBuf,
        active: ActiveTable,
        metrics: Metrics,
        ramps: Ramps,
    ) -> Shared {
        metrics.prime(&active.table);
        let reload_log = crate::reload::ReloadLog::default();
        let version = active.table.version.clone();
        reload_log.record("start", crate::reload::ReloadOutcome::Ok { version });
        Shared {
            routes_path,
            active: ArcSwap::from_pointee(active),
            last_failure: Mutex::new(None),
            reload_log,
            metrics,
            ramps,
            history: crate::console::History::default(),
            shadow_connector: pingora::connectors::http::Connector::new(None),
        }
    }
}

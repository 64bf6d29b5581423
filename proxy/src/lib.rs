//! The ficus proxy: Pingora in front of the legacy app, sending each route's clients to the
//! legacy backend or the new service by the active route table.
//!
//! [`run`] assembles the Pingora server: the proxy service ([`service`]), the admin API
//! ([`admin`]), and the background service that reloads the table ([`reload`]) and runs
//! health checks ([`health`]).

#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod console;
pub mod guard;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod ramp;
pub mod reload;
pub mod request;
pub mod service;
pub mod settings;
pub mod shadow;
pub mod state;

use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use ficus_routes::LoadError;
use pingora::apps::HttpServerOptions;
use pingora::connectors::ConnectorOptions;
use pingora::listeners::tls::TlsSettings as PingoraTls;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::listening::{ConnectionLimit, Service};

pub use settings::{ProxySettings, TlsSettings};

use crate::admin::AdminApp;
use crate::console::HistorySampler;
use crate::metrics::Metrics;
use crate::ramp::{RampTicker, Ramps};
use crate::reload::{FileChanges, ReloadTriggers, Reloader};
use crate::service::FicusProxy;
use crate::state::{ActiveTable, Shared};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    // The sources are not repeated in the messages: `{:#}` prints the whole chain.
    #[error("invalid route file")]
    Routes(#[from] LoadError),
    #[error("cannot listen on {addr} ({what})")]
    Listen { addr: String, what: &'static str, source: std::io::Error },
    #[error("TLS certificate {cert} or key {key} unusable: {message}")]
    Tls { cert: String, key: String, message: String },
    #[error(transparent)]
    Limits(#[from] limits::LimitError),
    #[error(transparent)]
    RampState(#[from] ramp::store::StoreError),
    #[error("proxy.state = {0:?}: give file:PATH or postgres://...")]
    StateStore(String),
    #[error("proxy.admin_token_file {path}: {message}")]
    AdminToken { path: String, message: String },
}

/// Loads the route table and runs the proxy until the process is told to stop.
///
/// Returns when a signal (SIGTERM, SIGINT) has stopped it, or on a start-up error.
pub fn run(settings: ProxySettings) -> Result<(), ProxyError> {
    run_with(settings, |_| {})
}

/// Like [`run`], letting the caller add its own services (the demo's sample backends) to
/// the same server before it starts.
pub fn run_with(
    settings: ProxySettings,
    add_services: impl FnOnce(&mut Server),
) -> Result<(), ProxyError> {
    let ramps = Ramps::open(settings.state_store()?)?;
    let metrics = Metrics::new();
    metrics.ramp_store_up.set(i64::from(ramps.reachable()));
    // Watch before the first read: a change in between is then seen, not lost.
    let changes = if settings.watch { FileChanges::watch(&settings.routes) } else { None };
    let active = ActiveTable::load(&settings.routes, None, &ramps, &metrics)?;
    tracing::info!(
        routes_file = %settings.routes.display(),
        version = active.table.version,
        routes = active.table.routes.len(),
        "route table loaded"
    );
    check_listen(&settings.listen, "proxy")?;
    check_listen(&settings.admin, "admin")?;
    if let Some(tls) = &settings.tls {
        check_listen(&tls.listen, "proxy TLS")?;
        check_tls(tls)?;
    }

    let fit = limits::apply(settings.max_connections)?;
    let connections = Arc::new(ConnectionLimit::new(fit.max_connections));

    let shared = Arc::new(Shared::new(settings.routes.clone(), active, metrics, ramps));
    shared.metrics.watch_connections(connections.clone());
    let reloader = Reloader::new(shared.clone());

    let conf = ServerConf {
        threads: settings.threads.max(1),
        work_stealing: settings.work_stealing,
        grace_period_seconds: Some(settings.shutdown_grace.as_secs()),
        graceful_shutdown_timeout_seconds: Some(settings.shutdown_grace.as_secs()),
        ..ServerConf::default()
    };
    // ficus reads no stream's pending-time figures; accounting them read the clock four
    // times per request (vendored pingora-core, issue 16).
    pingora::protocols::l4::stream::set_pending_time_tracking(false);
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut proxy = pingora::proxy::ProxyServiceBuilder::new(
        &server.configuration,
        FicusProxy { shared: shared.clone(), request_body_timeout: settings.request_body_timeout },
    )
    .name("ficus proxy")
    .client_options(upstream_connector_options(&server.configuration))
    .build();
    if let Some(app) = proxy.app_logic_mut() {
        let mut options = HttpServerOptions::default();
        options.h2c = settings.h2c;
        // A silent connection gets no longer to show its protocol than to send its headers.
        options.h2c_preface_timeout = Some(settings.request_header_timeout);
        options.keepalive_timeout = Some(settings.keepalive_timeout);
        options.max_request_header_size =
            Some(usize::try_from(settings.max_request_header_size.as_u64()).unwrap_or(usize::MAX));
        app.server_options = Some(options);
        app.request_header_timeout = Some(settings.request_header_timeout);
    }
    proxy.set_connection_limit(connections);
    proxy.add_tcp(&settings.listen);
    if let Some(tls) = &settings.tls {
        let mut tls_settings = PingoraTls::intermediate(&path_str(&tls.cert), &path_str(&tls.key))
            .map_err(|e| tls_error(tls, e.to_string()))?;
        tls_settings.enable_h2();
        proxy.add_tls_with_settings(&tls.listen, None, tls_settings);
    }

    let ramp_ticker = background_service("ficus ramps", RampTicker { shared: shared.clone() });
    let history = background_service("ficus history", HistorySampler { shared: shared.clone() });
    let token = settings.admin_token()?;
    let app =
        AdminApp { shared, reloader: reloader.clone(), hosts: settings.admin_hosts.clone(), token };
    let mut admin = Service::new("ficus admin".to_string(), app);
    admin.add_tcp(&settings.admin);
    let triggers = background_service(
        "ficus reload",
        ReloadTriggers { reloader, changes: Mutex::new(changes) },
    );

    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(triggers);
    server.add_service(ramp_ticker);
    server.add_service(history);
    add_services(&mut server);
    tracing::info!(
        listen = settings.listen,
        admin = settings.admin,
        tls = settings.tls.as_ref().map(|t| t.listen.as_str()),
        max_connections = fit.max_connections,
        "ficus proxy started"
    );
    // Returns once a signal (SIGTERM: graceful, SIGINT: fast) has stopped every service.
    server.run(RunArgs::default());
    Ok(())
}

/// Pingora's connector options for the backends, with idle pooled connections checked once a
/// second by one task per thread rather than by a task spawned for each request's release
/// (vendored pingora-core, issue 16). The cost: a connection a backend closes while idle is
/// closed here up to a second later (never reused meanwhile: taking one checks it first).
fn upstream_connector_options(conf: &ServerConf) -> ConnectorOptions {
    let mut options = ConnectorOptions::from_server_conf(conf);
    options.idle_check_interval = Some(UPSTREAM_IDLE_CHECK);
    options
}

const UPSTREAM_IDLE_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Fails early, with the address in the message, when a listener cannot bind.
fn check_listen(addr: &str, what: &'static str) -> Result<(), ProxyError> {
    TcpListener::bind(addr).map(drop).map_err(|source| ProxyError::Listen {
        addr: addr.to_string(),
        what,
        source,
    })
}

fn check_tls(tls: &TlsSettings) -> Result<(), ProxyError> {
    match pingora::tls::load_certs_and_key_files(&path_str(&tls.cert), &path_str(&tls.key)) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(tls_error(tls, "no certificate or no key found in the PEM files".into())),
        Err(e) => Err(tls_error(tls, e.to_string())),
    }
}

fn tls_error(tls: &TlsSettings, message: String) -> ProxyError {
    ProxyError::Tls { cert: path_str(&tls.cert), key: path_str(&tls.key), message }
}

fn path_str(path: &std::path::Path) -> String {
    path.display().to_string()
}

//! The proxy's own settings: where it listens and where its route file is. Read by the binary
//! from `--config` (`[proxy]`), `FICUS_PROXY__*` environment variables and flags.

use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;

use crate::ramp::shared::SharedStore;
use crate::ramp::store::FileStore;
use crate::ramp::StateStore;
use serde::Deserialize;

/// Settings of `ficus proxy`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    /// The route file (TOML, YAML or JSON by extension).
    pub routes: PathBuf,
    /// Plain-text listener: HTTP/1.1 and, with `h2c`, HTTP/2 with prior knowledge.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Admin API listener; keep it on loopback or a private network.
    #[serde(default = "default_admin")]
    pub admin: String,
    /// Host names the admin API answers to, besides IP addresses and `localhost`: any other
    /// Host is refused, so that a web page cannot reach the API by DNS rebinding.
    #[serde(default)]
    pub admin_hosts: Vec<String>,
    /// Accept cleartext HTTP/2 (h2c prior knowledge) on `listen`.
    #[serde(default = "default_true")]
    pub h2c: bool,
    /// Optional TLS listener, serving HTTP/2 and HTTP/1.1 by ALPN.
    #[serde(default)]
    pub tls: Option<TlsSettings>,
    /// Worker threads of the proxy service.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Let idle threads take queued work from busy ones. Off by default: each thread then
    /// serves its own connections, as NGINX's workers do, with no traffic between cores.
    #[serde(default)]
    pub work_stealing: bool,
    /// Reload when the route file changes (SIGHUP and `POST /reload` always work).
    #[serde(default = "default_true")]
    pub watch: bool,
    /// The longest a client connection may take to deliver a request's whole header block,
    /// counted from when ficus starts waiting for it: a slowloris that trickles bytes, and a
    /// keep-alive connection idle between requests, are closed past it.
    #[serde(default = "default_request_header_timeout", with = "humantime_serde")]
    pub request_header_timeout: Duration,
    /// How long an HTTP/1 keep-alive connection may wait idle for its next request (whole
    /// seconds). The header deadline counts that wait too, so the shorter of the two applies.
    #[serde(default = "default_keepalive_timeout", with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// How long reading an HTTP/1 request body may wait for its next bytes.
    #[serde(default = "default_request_body_timeout", with = "humantime_serde")]
    pub request_body_timeout: Duration,
    /// The largest HTTP/1 request header block (request line and headers); a larger one is
    /// answered 431.
    #[serde(default = "default_max_request_header_size")]
    pub max_request_header_size: ByteSize,
    /// The most client connections open at once, over all listeners; beyond it ficus stops
    /// accepting until one closes. Unset: 10,000, or what the file limit allows.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Where ramp states are kept: `file:PATH` for one replica, `postgres://...` for several.
    /// Default: beside the route file (`routes.toml` -> `routes.state.json`).
    #[serde(default)]
    pub state: Option<String>,
    /// A file holding the token admin writes need (`Authorization: Bearer TOKEN`). Without
    /// one, writes are accepted from loopback clients only.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// On SIGTERM: how long to keep serving before closing listeners, then how long to let
    /// requests in flight finish.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl ProxySettings {
    /// Settings serving `routes` with every default.
    pub fn with_routes(routes: PathBuf) -> ProxySettings {
        ProxySettings {
            routes,
            listen: default_listen(),
            admin: default_admin(),
            admin_hosts: Vec::new(),
            h2c: true,
            tls: None,
            threads: default_threads(),
            work_stealing: false,
            watch: true,
            request_header_timeout: default_request_header_timeout(),
            keepalive_timeout: default_keepalive_timeout(),
            request_body_timeout: default_request_body_timeout(),
            max_request_header_size: default_max_request_header_size(),
            max_connections: None,
            state: None,
            admin_token_file: None,
            shutdown_grace: default_grace(),
        }
    }
}

impl ProxySettings {
    /// The store of ramp states.
    pub fn state_store(&self) -> Result<StateStore, crate::ProxyError> {
        let Some(spec) = &self.state else {
            return Ok(StateStore::File(FileStore::beside(&self.routes)));
        };
        if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
            return Ok(StateStore::Shared(Box::new(SharedStore::new(spec.clone()))));
        }
        match spec.strip_prefix("file:") {
            Some(path) if !path.is_empty() => {
                Ok(StateStore::File(FileStore::new(PathBuf::from(path))))
            }
            _ => Err(crate::ProxyError::StateStore(spec.clone())),
        }
    }

    /// The admin token, read once at start.
    pub fn admin_token(&self) -> Result<Option<String>, crate::ProxyError> {
        let Some(path) = &self.admin_token_file else { return Ok(None) };
        let error = |message: String| crate::ProxyError::AdminToken {
            path: path.display().to_string(),
            message,
        };
        let token = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let token = token.trim();
        if token.is_empty() {
            return Err(error("the file is empty".into()));
        }
        Ok(Some(token.to_string()))
    }
}

/// A TLS listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    pub listen: String,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

fn default_listen() -> String {
    "0.0.0.0:8000".into()
}

fn default_admin() -> String {
    "127.0.0.1:9901".into()
}

fn default_true() -> bool {
    true
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}

fn default_request_header_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_keepalive_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_request_body_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_max_request_header_size() -> ByteSize {
    ByteSize::kib(64)
}

fn default_grace() -> Duration {
    Duration::from_secs(5)
}

//! The route file as operators write it: raw serde types, one per section, before validation.
//!
//! Every struct denies unknown keys so a typo is an error instead of a silent default. These
//! types are converted once into the compiled [`crate::RouteTable`]; nothing on the request
//! path reads them.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// One backend: a place requests can be sent to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// `http://host:port[/prefix]` or `https://...`; a path is prefixed to forwarded paths.
    pub url: String,
    /// Optional active health check; without one the backend is always considered up.
    #[serde(default)]
    pub health: Option<HealthConfig>,
    /// Forward the client's Host header (default) or, when false, the backend URL's host.
    #[serde(default = "default_true")]
    pub preserve_host: bool,
    /// How long to wait for a TCP (and TLS) connection before falling back.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of the backend's response (NGINX's
    /// `proxy_read_timeout`); past it the request ends, with 504 if nothing was sent yet.
    #[serde(default = "default_io_timeout", with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Longest wait for the backend to take the next bytes of the request (NGINX's
    /// `proxy_send_timeout`).
    #[serde(default = "default_io_timeout", with = "humantime_serde")]
    pub write_timeout: Duration,
}

/// An active HTTP health check of a backend.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Path requested with GET; any 2xx answer counts as healthy.
    pub path: String,
    /// Time between two checks.
    #[serde(default = "default_health_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// How long one check may take before it counts as failed.
    #[serde(default = "default_health_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive failures before the backend is marked down.
    #[serde(default = "default_threshold")]
    pub unhealthy_threshold: u32,
    /// Consecutive successes before a down backend is marked up again.
    #[serde(default = "default_threshold")]
    pub healthy_threshold: u32,
}

/// The `[defaults]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultsConfig {
    /// Where requests that match no route go.
    pub backend: String,
    /// How a client is identified: `header:NAME`, `cookie:NAME`, `query:NAME`, `ip` or `none`.
    /// Absent means the client-id cookie that ficus itself hands out.
    #[serde(default)]
    pub sticky: Option<String>,
    /// Header naming the backend to use for one request, usable by anyone: the short form
    /// of `override = { header = "..." }`. Absent (and no `override`) disables overrides.
    #[serde(default)]
    pub override_header: Option<String>,
    /// Overrides, restricted to some client networks and/or to requests carrying a secret.
    #[serde(default, rename = "override")]
    pub override_: Option<OverrideConfig>,
    /// Cookie that carries the id given to clients that arrive without a sticky key.
    #[serde(default = "default_client_id_cookie")]
    pub client_id_cookie: String,
    /// Headers removed from client requests before forwarding, so that a client cannot pose
    /// as someone else to a backend that trusts them (`forwarded` too, when no proxy in front
    /// of ficus sets it).
    #[serde(default = "default_strip_headers")]
    pub strip_headers: Vec<String>,
    /// Normalise request paths before routing and forwarding (decode unreserved `%XX`,
    /// resolve `.` and `..`, merge slashes), refusing paths that climb above the root.
    #[serde(default = "default_true")]
    pub normalize_path: bool,
}

fn default_strip_headers() -> Vec<String> {
    vec!["x-real-ip".into()]
}

/// Who may pick a route's backend for one request with a header.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideConfig {
    /// The header: `x-ficus-backend: orders` (with a token: `x-ficus-backend: orders TOKEN`).
    pub header: String,
    /// Client networks allowed to override (`["10.0.0.0/8", "::1/128"]`); empty: any.
    #[serde(default)]
    pub allow: Vec<String>,
    /// A file whose content (trimmed) must follow the backend name in the header value.
    #[serde(default)]
    pub token_file: Option<std::path::PathBuf>,
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Unique name, used in logs, metrics and errors.
    pub name: String,
    /// Which requests this route takes; all conditions must hold.
    #[serde(rename = "match")]
    pub match_: MatchConfig,
    /// The backend taking this route over.
    pub to: String,
    /// Share of this route's clients sent to `to`, 0 to 100 in steps of 0.01; exactly one of
    /// `percent` and `ramp` is given.
    #[serde(default)]
    pub percent: Option<f64>,
    /// An automatic ramp: the share grows step by step while `to` is as healthy as `from`.
    #[serde(default)]
    pub ramp: Option<RampConfig>,
    /// The backend the route is taken from; defaults to `defaults.backend`.
    #[serde(default)]
    pub from: Option<String>,
    /// Overrides `defaults.sticky` for this route.
    #[serde(default)]
    pub sticky: Option<String>,
    /// Path rewriting applied only to requests sent to `to`.
    #[serde(default)]
    pub rewrite: Option<RewriteConfig>,
    /// Also send requests to the backend that did not serve them, and compare the answers.
    #[serde(default)]
    pub shadow: Option<ShadowConfig>,
}

/// A route's `[routes.ramp]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RampConfig {
    /// Increasing percents, each in steps of 0.01.
    pub steps: Vec<f64>,
    /// The least time on a step before it may advance.
    #[serde(with = "humantime_serde")]
    pub hold: Duration,
    /// Answers from `to` on a step before it may advance.
    pub min_requests: u64,
    /// Percentage points of failed answers `to` may have above `from`.
    #[serde(default)]
    pub max_error_rate: Option<f64>,
    /// The most `to`'s p99 may be, as a multiple of `from`'s.
    #[serde(default)]
    pub max_p99_ratio: Option<f64>,
    /// Percent of shadow comparisons that may mismatch (needs `[routes.shadow]`).
    #[serde(default)]
    pub max_mismatch_rate: Option<f64>,
    /// `rollback` (to 0%) or `hold` (stay on the step).
    #[serde(default = "default_on_breach")]
    pub on_breach: String,
}

fn default_on_breach() -> String {
    "rollback".into()
}

/// A route's `[routes.shadow]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// Share of the route's requests shadowed, 0 to 100 in steps of 0.01.
    #[serde(default = "default_shadow_percent")]
    pub percent: f64,
    /// Methods shadowed; unsafe ones only when listed.
    #[serde(default = "default_shadow_methods")]
    pub methods: Vec<String>,
    /// JSON pointers (`*`: any key or index) left out of the body comparison.
    #[serde(default)]
    pub ignore: Vec<String>,
    /// Response headers left out of the comparison.
    #[serde(default)]
    pub ignore_headers: Vec<String>,
    /// Ask the legacy backend a second time and learn what differs between its own answers.
    #[serde(default)]
    pub noise: bool,
    /// Bodies (request or response) above this are not compared.
    #[serde(default = "default_shadow_max_body")]
    pub max_body: bytesize::ByteSize,
    /// How long a shadow request may take.
    #[serde(default = "default_shadow_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Shadow requests in flight for the route; more are dropped.
    #[serde(default = "default_shadow_in_flight")]
    pub max_in_flight: usize,
}

fn default_shadow_percent() -> f64 {
    100.0
}

fn default_shadow_methods() -> Vec<String> {
    vec!["GET".into(), "HEAD".into()]
}

fn default_shadow_max_body() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(1)
}

fn default_shadow_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_shadow_in_flight() -> usize {
    64
}

/// The conditions of a route's `match`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// Exact path.
    #[serde(default)]
    pub path: Option<String>,
    /// Path prefix matching whole segments.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Regular expression searched in the path (anchor it with `^...$` to match the whole path).
    #[serde(default)]
    pub path_regex: Option<String>,
    /// Host header, port ignored, case-insensitive.
    #[serde(default)]
    pub host: Option<String>,
    /// HTTP methods; empty means any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Headers that must be present with exactly these values.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// A route's `rewrite`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteConfig {
    /// Prefix removed from the path before forwarding to `to`.
    pub strip_prefix: String,
}

fn default_true() -> bool {
    true
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_io_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_health_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_health_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_threshold() -> u32 {
    2
}

fn default_client_id_cookie() -> String {
    "ficus_id".to_string()
}

//! Reading a route file (TOML, YAML or JSON by extension) and validating it into a [`RouteTable`].
//!
//! Each section is deserialized on its own so that one bad route does not hide the problems of
//! the others: every error found is returned, each naming the file, the route and the field.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use regex::Regex;
use serde::de::DeserializeOwned;
use serde_json::Value;
use xxhash_rust::xxh3::xxh3_64;

use crate::config::{BackendConfig, DefaultsConfig, RampConfig, RouteConfig, ShadowConfig};
use crate::error::{LoadError, ValidationError};
use crate::matcher::{Matcher, PathMatch};
use crate::ramp::{OnBreach, Ramp};
use crate::shadow::{FieldPattern, Shadow};
use crate::source;
use crate::sticky::{is_token, Sticky, BUCKETS};
use crate::table::{Backend, BackendId, Route, RouteIndex, RouteTable};

/// The largest `shadow.max_body`: each shadowed request holds up to three bodies this big.
const MAX_SHADOW_BODY: usize = 64 << 20;
const TOP_LEVEL_KEYS: [&str; 3] = ["backends", "defaults", "routes"];
const METHODS: [&str; 9] =
    ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"];

/// The formats a route file can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Toml,
    Yaml,
    Json,
}

impl Format {
    /// The format a file's extension says it is in.
    pub fn from_path(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "toml" => Some(Format::Toml),
            "yaml" | "yml" => Some(Format::Yaml),
            "json" => Some(Format::Json),
            _ => None,
        }
    }

    fn as_config(self) -> config::FileFormat {
        match self {
            Format::Toml => config::FileFormat::Toml,
            Format::Yaml => config::FileFormat::Yaml,
            Format::Json => config::FileFormat::Json,
        }
    }
}

impl RouteTable {
    /// Reads and validates a route file.
    pub fn load(path: &Path) -> Result<RouteTable, LoadError> {
        let file = path.display().to_string();
        let format = Format::from_path(path).ok_or_else(|| LoadError::Unreadable {
            file: file.clone(),
            message: "unknown file extension: use .toml, .yaml, .yml or .json".into(),
        })?;
        let text = source::read(path)
            .map_err(|message| LoadError::Unreadable { file: file.clone(), message })?;
        RouteTable::parse(&text, format, &file)
    }

    /// Validates route-file text; `file` names it in errors.
    pub fn parse(text: &str, format: Format, file: &str) -> Result<RouteTable, LoadError> {
        let unreadable = |message| LoadError::Unreadable { file: file.to_string(), message };
        source::check_size(text).map_err(unreadable)?;
        if format == Format::Yaml {
            source::check_yaml_aliases(text).map_err(unreadable)?;
        }
        let value: Value = config::Config::builder()
            .add_source(config::File::from_str(text, format.as_config()))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| LoadError::Unreadable {
                file: file.to_string(),
                message: e.to_string(),
            })?;
        Validator { file, errors: Vec::new() }.table(&value)
    }
}

/// Collects every problem while compiling a table.
struct Validator<'f> {
    file: &'f str,
    errors: Vec<ValidationError>,
}

impl Validator<'_> {
    fn error(&mut self, location: &str, field: &str, message: impl Into<String>) {
        self.errors.push(ValidationError {
            file: self.file.to_string(),
            location: location.to_string(),
            field: field.to_string(),
            message: message.into(),
        });
    }

    /// Deserializes one section, recording a failure at its location.
    fn section<T: DeserializeOwned>(&mut self, location: &str, value: &Value) -> Option<T> {
        match serde_json::from_value(value.clone()) {
            Ok(parsed) => Some(parsed),
            Err(e) => {
                let message = e.to_string();
                // serde names the field inside the message ("unknown field `x`"); keep it there.
                self.error(location, "", message);
                None
            }
        }
    }

    fn table(mut self, value: &Value) -> Result<RouteTable, LoadError> {
        let empty = serde_json::Map::new();
        let top = value.as_object().unwrap_or(&empty);
        for key in top.keys().filter(|k| !TOP_LEVEL_KEYS.contains(&k.as_str())) {
            self.error("", key, "unknown key: expected backends, defaults or routes");
        }

        let backends = self.backends(top.get("backends"));
        let names: BTreeMap<&str, BackendId> =
            backends.iter().enumerate().map(|(id, b)| (b.name.as_str(), id)).collect();

        let defaults: Option<DefaultsConfig> = match top.get("defaults") {
            Some(v) => self.section("defaults", v),
            None => {
                self.error("", "defaults", "missing section: [defaults] with at least `backend`");
                None
            }
        };
        let mut default_backend = None;
        let mut default_sticky = Sticky::None;
        let mut override_header = None;
        let mut override_allow = Vec::new();
        let mut override_token = None;
        let mut client_id_cookie = String::new();
        let mut strip_headers = Vec::new();
        let normalize_path = defaults.as_ref().is_none_or(|d| d.normalize_path);
        if let Some(d) = &defaults {
            for name in &d.strip_headers {
                if is_token(name) {
                    strip_headers.push(name.to_ascii_lowercase());
                } else {
                    self.error(
                        "defaults",
                        "strip_headers",
                        format!("\"{name}\" is not a valid header name"),
                    );
                }
            }
            default_backend = self.backend_ref(&names, "defaults", "backend", &d.backend);
            client_id_cookie = d.client_id_cookie.clone();
            if !is_token(&client_id_cookie) {
                self.error("defaults", "client_id_cookie", "not a valid cookie name");
            }
            default_sticky = match &d.sticky {
                None => Sticky::Cookie(client_id_cookie.clone()),
                Some(spec) => Sticky::parse(spec).unwrap_or_else(|e| {
                    self.error("defaults", "sticky", e);
                    Sticky::None
                }),
            };
            let (header, field) = match (&d.override_header, &d.override_) {
                (Some(_), Some(_)) => {
                    self.error(
                        "defaults",
                        "override",
                        "give override or override_header, not both",
                    );
                    (None, "")
                }
                (Some(header), None) => (Some(header), "override_header"),
                (None, Some(rule)) => (Some(&rule.header), "override.header"),
                (None, None) => (None, ""),
            };
            if let Some(header) = header {
                if is_token(header) {
                    override_header = Some(header.to_ascii_lowercase());
                } else {
                    self.error(
                        "defaults",
                        field,
                        format!("\"{header}\" is not a valid header name"),
                    );
                }
            }
            if let Some(rule) = &d.override_ {
                for net in &rule.allow {
                    match net
                        .parse::<ipnet::IpNet>()
                        .or_else(|_| net.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    {
                        Ok(net) => override_allow.push(net),
                        Err(_) => self.error(
                            "defaults",
                            "override.allow",
                            format!("\"{net}\" is not an address or network (10.0.0.0/8)"),
                        ),
                    }
                }
                if let Some(path) = &rule.token_file {
                    match std::fs::read_to_string(path).map(|t| t.trim().to_string()) {
                        Ok(token) if token.len() >= 16 && !token.contains(char::is_whitespace) => {
                            override_token = Some(token)
                        }
                        Ok(_) => self.error(
                            "defaults",
                            "override.token_file",
                            format!(
                                "{}: the token must be at least 16 characters, without spaces",
                                path.display()
                            ),
                        ),
                        Err(e) => self.error(
                            "defaults",
                            "override.token_file",
                            format!("cannot read {}: {e}", path.display()),
                        ),
                    }
                }
            }
        }

        let routes = self.routes(top.get("routes"), &names, default_backend, &default_sticky);

        let index = RouteIndex::new(&routes).unwrap_or_else(|message| {
            self.error("", "routes", message);
            RouteIndex::default()
        });
        // The token file's content counts: a new token is a new table.
        let token = override_token.as_deref().unwrap_or_default();
        let version = format!("{:016x}", xxh3_64(format!("{value}{token}").as_bytes()));
        match default_backend {
            Some(default_backend) if self.errors.is_empty() => Ok(RouteTable {
                backends,
                index,
                routes,
                default_backend,
                override_header,
                override_allow,
                override_token,
                client_id_cookie,
                strip_headers,
                normalize_path,
                version,
            }),
            _ => Err(LoadError::Invalid(self.errors)),
        }
    }

    fn backend_ref(
        &mut self,
        names: &BTreeMap<&str, BackendId>,
        location: &str,
        field: &str,
        name: &str,
    ) -> Option<BackendId> {
        let found = names.get(name).copied();
        if found.is_none() {
            let known = names.keys().copied().collect::<Vec<_>>().join(", ");
            self.error(location, field, format!("unknown backend \"{name}\" (known: {known})"));
        }
        found
    }

    fn backends(&mut self, value: Option<&Value>) -> Vec<Backend> {
        let Some(map) = value.and_then(Value::as_object) else {
            self.error("", "backends", "missing section: at least one [backends.NAME] with a url");
            return Vec::new();
        };
        let mut backends = Vec::new();
        for (name, value) in map {
            let location = format!("backends.{name}");
            if let Some(config) = self.section::<BackendConfig>(&location, value) {
                if let Some(backend) = self.backend(&location, name, config) {
                    backends.push(backend);
                }
            }
        }
        backends
    }

    fn backend(&mut self, location: &str, name: &str, config: BackendConfig) -> Option<Backend> {
        let shown = redact_credentials(&config.url);
        let url = match url::Url::parse(&config.url) {
            Ok(url) => url,
            Err(e) => {
                self.error(location, "url", format!("malformed URL \"{shown}\": {e}"));
                return None;
            }
        };
        if !url.username().is_empty() || url.password().is_some() {
            // The URL is shown by `GET /routes` and in logs: secrets belong elsewhere.
            self.error(location, "url", format!("\"{shown}\": a backend URL takes no credentials"));
            return None;
        }
        let tls = match url.scheme() {
            "http" => false,
            "https" => true,
            other => {
                self.error(location, "url", format!("scheme \"{other}\" is not http or https"));
                return None;
            }
        };
        let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
            self.error(location, "url", format!("\"{shown}\" has no host"));
            return None;
        };
        if url.query().is_some() || url.fragment().is_some() {
            self.error(location, "url", "a backend URL takes no query or fragment");
            return None;
        }
        if url.port() == Some(0) {
            self.error(location, "url", format!("\"{shown}\": port 0 is no port to connect to"));
            return None;
        }
        if let Some(health) = &config.health {
            if !health.path.starts_with('/') {
                self.error(location, "health.path", "must start with /");
            }
            if health.interval.is_zero() || health.timeout.is_zero() {
                self.error(location, "health", "interval and timeout must be above zero");
            }
        }
        Some(Backend {
            name: name.to_string(),
            url: config.url.clone(),
            tls,
            host: host.trim_start_matches('[').trim_end_matches(']').to_string(),
            port: url.port_or_known_default().unwrap_or(if tls { 443 } else { 80 }),
            path_prefix: url.path().trim_end_matches('/').to_string(),
            health: config.health,
            preserve_host: config.preserve_host,
            connect_timeout: config.connect_timeout,
            read_timeout: config.read_timeout,
            write_timeout: config.write_timeout,
        })
    }

    fn routes(
        &mut self,
        value: Option<&Value>,
        names: &BTreeMap<&str, BackendId>,
        default_backend: Option<BackendId>,
        default_sticky: &Sticky,
    ) -> Vec<Route> {
        let Some(value) = value else { return Vec::new() };
        let Some(list) = value.as_array() else {
            self.error("", "routes", "must be a list of [[routes]] entries");
            return Vec::new();
        };
        let mut seen = HashSet::new();
        let mut routes = Vec::new();
        for (index, value) in list.iter().enumerate() {
            let name = value.get("name").and_then(Value::as_str).unwrap_or("");
            let location = format!("routes[{index}] \"{name}\"");
            // NaN and the infinities reach here as null: JSON, the common form, has neither.
            if value.get("percent").is_some_and(Value::is_null) {
                self.error(
                    &location,
                    "percent",
                    "must be a number from 0 to 100 (not NaN, an infinity or empty)",
                );
                continue;
            }
            let Some(config) = self.section::<RouteConfig>(&location, value) else { continue };
            if config.name.trim().is_empty() {
                self.error(&location, "name", "must not be empty");
            } else if !seen.insert(config.name.clone()) {
                self.error(&location, "name", format!("duplicate route name \"{}\"", config.name));
            }
            if let Some(mut route) =
                self.route(&location, config, names, default_backend, default_sticky)
            {
                route.fingerprint = xxh3_64(value.to_string().as_bytes());
                routes.push(route);
            }
        }
        routes
    }

    fn route(
        &mut self,
        location: &str,
        config: RouteConfig,
        names: &BTreeMap<&str, BackendId>,
        default_backend: Option<BackendId>,
        default_sticky: &Sticky,
    ) -> Option<Route> {
        let to = self.backend_ref(names, location, "to", &config.to);
        let from = match &config.from {
            Some(from) => self.backend_ref(names, location, "from", from),
            None => default_backend,
        };
        if to.is_some() && to == from {
            self.error(location, "to", "is the same backend as `from`");
        }
        // A ramped route starts at 0%: the ramp's state, not the file, says where it is.
        let (threshold, ramp) = match (config.percent, &config.ramp) {
            (Some(percent), None) => (self.percent(location, "percent", percent), Some(None)),
            (None, Some(ramp)) => {
                let has_shadow = config.shadow.is_some();
                (Some(0), self.ramp(location, ramp, has_shadow).map(Some))
            }
            (Some(_), Some(_)) => {
                let message = "give either `percent` or `[routes.ramp]`, not both";
                self.error(location, "percent", message);
                (None, None)
            }
            (None, None) => {
                self.error(location, "percent", "missing: give `percent` or `[routes.ramp]`");
                (None, None)
            }
        };
        let shadow = match &config.shadow {
            Some(shadow) => self.shadow(location, shadow).map(Some),
            None => Some(None),
        };
        let sticky = match &config.sticky {
            Some(spec) => Sticky::parse(spec).map_err(|e| self.error(location, "sticky", e)).ok(),
            None => Some(default_sticky.clone()),
        };
        let matcher = self.matcher(location, &config.match_);
        let strip_prefix = match config.rewrite {
            Some(rewrite) if !rewrite.strip_prefix.starts_with('/') => {
                self.error(location, "rewrite.strip_prefix", "must start with /");
                None
            }
            Some(rewrite) => Some(rewrite.strip_prefix.trim_end_matches('/').to_string()),
            None => None,
        };
        Some(Route {
            name: config.name,
            matcher: matcher?,
            to: to?,
            from: from?,
            threshold: threshold?,
            sticky: sticky?,
            strip_prefix,
            shadow: shadow?,
            ramp: ramp?,
            fingerprint: 0,
        })
    }

    fn ramp(&mut self, location: &str, config: &RampConfig, has_shadow: bool) -> Option<Ramp> {
        let before = self.errors.len();
        let mut steps = Vec::new();
        for &percent in &config.steps {
            if let Some(step) = self.percent(location, "ramp.steps", percent) {
                if step == 0 || steps.last().is_some_and(|&last| step <= last) {
                    let message = format!("must increase and stay above 0; {percent} does not");
                    self.error(location, "ramp.steps", message);
                }
                steps.push(step);
            }
        }
        if config.steps.is_empty() {
            self.error(location, "ramp.steps", "must list at least one percent");
        }
        if config.min_requests == 0 {
            self.error(location, "ramp.min_requests", "must be at least 1");
        }
        let limits = [
            ("ramp.max_error_rate", config.max_error_rate),
            ("ramp.max_p99_ratio", config.max_p99_ratio),
            ("ramp.max_mismatch_rate", config.max_mismatch_rate),
        ];
        for (field, limit) in limits {
            if limit.is_some_and(|l| !l.is_finite() || l < 0.0) {
                self.error(location, field, "must be a number of 0 or more");
            }
        }
        if config.max_mismatch_rate.is_some() && !has_shadow {
            let message = "needs [routes.shadow]: mismatches come from its comparisons";
            self.error(location, "ramp.max_mismatch_rate", message);
        }
        let on_breach = OnBreach::parse(&config.on_breach)
            .map_err(|e| self.error(location, "ramp.on_breach", e))
            .ok();
        (self.errors.len() == before).then_some(Ramp {
            steps,
            hold: config.hold,
            min_requests: config.min_requests,
            max_error_rate: config.max_error_rate,
            max_p99_ratio: config.max_p99_ratio,
            max_mismatch_rate: config.max_mismatch_rate,
            on_breach: on_breach?,
        })
    }

    fn shadow(&mut self, location: &str, config: &ShadowConfig) -> Option<Shadow> {
        let before = self.errors.len();
        let threshold = self.percent(location, "shadow.percent", config.percent);
        let mut methods = Vec::new();
        for method in &config.methods {
            let upper = method.to_ascii_uppercase();
            if !METHODS.contains(&upper.as_str()) {
                let message = format!("unknown HTTP method \"{method}\"");
                self.error(location, "shadow.methods", message);
            } else if upper == "CONNECT" {
                self.error(location, "shadow.methods", "CONNECT cannot be shadowed");
            } else {
                methods.push(upper);
            }
        }
        let mut ignore = Vec::new();
        for pattern in &config.ignore {
            match FieldPattern::parse(pattern) {
                Ok(pattern) => ignore.push(pattern),
                Err(e) => self.error(location, "shadow.ignore", e),
            }
        }
        let mut ignore_headers = Vec::new();
        for name in &config.ignore_headers {
            if is_token(name) {
                ignore_headers.push(name.to_ascii_lowercase());
            } else {
                let message = format!("\"{name}\" is not a valid header name");
                self.error(location, "shadow.ignore_headers", message);
            }
        }
        let max_body = usize::try_from(config.max_body.as_u64()).unwrap_or(usize::MAX);
        if max_body > MAX_SHADOW_BODY {
            let message =
                format!("{} is above the most ficus holds per answer, 64 MiB", config.max_body);
            self.error(location, "shadow.max_body", message);
        }
        if config.timeout.is_zero() {
            self.error(location, "shadow.timeout", "must be longer than 0");
        }
        if config.max_in_flight == 0 {
            self.error(location, "shadow.max_in_flight", "must be at least 1");
        }
        (self.errors.len() == before).then_some(Shadow {
            threshold: threshold?,
            methods,
            ignore,
            ignore_headers,
            noise: config.noise,
            max_body,
            timeout: config.timeout,
            max_in_flight: config.max_in_flight,
        })
    }

    /// Converts a percentage to a bucket threshold, rejecting values off the 0.01 grid.
    fn percent(&mut self, location: &str, field: &str, percent: f64) -> Option<u16> {
        if !(0.0..=100.0).contains(&percent) {
            self.error(location, field, format!("{percent} is outside 0..=100"));
            return None;
        }
        let hundredths = (percent * 100.0).round();
        if (percent * 100.0 - hundredths).abs() > 1e-6 {
            self.error(location, field, format!("{percent} is not a multiple of 0.01"));
            return None;
        }
        // In 0..=10000 after the checks above.
        Some((hundredths as u16).min(BUCKETS))
    }

    fn matcher(&mut self, location: &str, config: &crate::config::MatchConfig) -> Option<Matcher> {
        let before = self.errors.len();
        let given = [&config.path, &config.path_prefix, &config.path_regex]
            .iter()
            .filter(|p| p.is_some())
            .count();
        if given > 1 {
            self.error(location, "match", "give at most one of path, path_prefix, path_regex");
        }
        let path = if let Some(path) = &config.path {
            if !path.starts_with('/') {
                self.error(location, "match.path", "must start with /");
            }
            PathMatch::Exact(path.clone())
        } else if let Some(prefix) = &config.path_prefix {
            if !prefix.starts_with('/') {
                self.error(location, "match.path_prefix", "must start with /");
            }
            PathMatch::prefix(prefix)
        } else if let Some(pattern) = &config.path_regex {
            match Regex::new(pattern) {
                Ok(regex) => PathMatch::Regex(regex),
                Err(e) => {
                    let detail = e.to_string().replace('\n', " ");
                    self.error(location, "match.path_regex", format!("bad regex: {detail}"));
                    PathMatch::Any
                }
            }
        } else {
            PathMatch::Any
        };
        let mut methods = Vec::new();
        for method in &config.methods {
            let upper = method.to_ascii_uppercase();
            if METHODS.contains(&upper.as_str()) {
                methods.push(upper);
            } else {
                self.error(location, "match.methods", format!("unknown HTTP method \"{method}\""));
            }
        }
        let mut headers = Vec::new();
        for (name, value) in &config.headers {
            if is_token(name) {
                headers.push((name.to_ascii_lowercase(), value.clone()));
            } else {
                self.error(
                    location,
                    "match.headers",
                    format!("\"{name}\" is not a valid header name"),
                );
            }
        }
        let host = config.host.as_ref().map(|h| h.trim().to_ascii_lowercase());
        if host.as_deref() == Some("") {
            self.error(location, "match.host", "must not be empty");
        }
        (self.errors.len() == before).then_some(Matcher { path, host, methods, headers })
    }
}

/// `text` with anything before an `@` in its authority (user, password) replaced by `***`, so
/// that an error never echoes a secret.
fn redact_credentials(text: &str) -> String {
    let start = text.find("://").map_or(0, |i| i + 3);
    let end = text[start..].find(['/', '?', '#']).map_or(text.len(), |i| start + i);
    match text[start..end].rfind('@') {
        Some(at) => format!("{}***{}", &text[..start], &text[start + at..]),
        None => text.to_string(),
    }
}

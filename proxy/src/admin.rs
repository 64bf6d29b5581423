//! The admin HTTP API, for operators on a private port: the console page (`/`), `/healthz`,
//! `/routes`, `/history`, `/shadow`, `/metrics`, `POST /reload` and the ramp commands,
//! guarded against requests a web page makes a browser send ([`guard`]: DNS rebinding and
//! cross-site writes).

use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use ficus_routes::table::same_secret;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};

use crate::ramp::{Command, CommandError};
use crate::reload::{ReloadOutcome, Reloader};
use crate::state::{ActiveTable, Shared};

/// Serves the admin API.
pub struct AdminApp {
    pub shared: Arc<Shared>,
    pub reloader: Reloader,
    /// Host names the API answers to besides IP addresses and `localhost`.
    pub hosts: Vec<String>,
    /// The token writes need; without one, writes come from loopback only.
    pub token: Option<String>,
}

/// Why the admin API refuses a request before looking at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

/// Checks what a browser tricked by a web page would send: a Host that is a name the API was
/// not given (DNS rebinding), an `Origin` other than the API's own (a cross-site request),
/// and a write without a JSON content type (which a page could send without a preflight).
pub fn guard(
    method: &Method,
    host: Option<&str>,
    origin: Option<&str>,
    content_type: Option<&str>,
    hosts: &[String],
) -> Result<(), Refusal> {
    let refuse = |status, message: String| Err(Refusal { status, message });
    let Some(host) = host else {
        return refuse(StatusCode::BAD_REQUEST, "a Host header is required\n".into());
    };
    let name = host_name(host);
    let known = name.parse::<IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || hosts.iter().any(|h| h.eq_ignore_ascii_case(name));
    if !known {
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            format!("Host {host} is not this admin API's: add it to proxy.admin_hosts\n"),
        );
    }
    if let Some(origin) = origin {
        let authority = origin.split_once("://").map_or(origin, |(_, rest)| rest);
        if !authority.eq_ignore_ascii_case(host) {
            return refuse(StatusCode::FORBIDDEN, format!("cross-origin request from {origin}\n"));
        }
    }
    let json = content_type
        .and_then(|t| t.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    if method != Method::GET && method != Method::HEAD && !json {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "writes need Content-Type: application/json\n".into(),
        );
    }
    Ok(())
}

/// The name part of a Host value: without the port, and without the brackets of an IPv6
/// address.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').map_or(host, |(name, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            name
        } else {
            host
        }
    })
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let header = session.req_header();
        let text = |name: http::header::HeaderName| {
            header.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
        };
        let (host, origin, content_type) = (
            text(http::header::HOST),
            text(http::header::ORIGIN),
            text(http::header::CONTENT_TYPE),
        );
        let verdict = guard(
            &header.method,
            host.as_deref(),
            origin.as_deref(),
            content_type.as_deref(),
            &self.hosts,
        );
        if let Err(refusal) = verdict {
            return respond(refusal.status, "text/plain", refusal.message.into_bytes());
        }
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        if method == Method::GET {
            if let Some(asset) = crate::console::asset(&path) {
                return console_response(asset);
            }
        }
        if method == Method::POST && !self.write_allowed(session) {
            let message = match self.token {
                Some(_) => "writes need Authorization: Bearer <the admin token>\n",
                None => "without proxy.admin_token_file, writes are accepted from loopback only\n",
            };
            let mut response = respond(StatusCode::UNAUTHORIZED, "text/plain", message.into());
            response
                .headers_mut()
                .insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
            return response;
        }
        if let (true, Some(rest)) = (method == Method::POST, path.strip_prefix("/routes/")) {
            let force = query_param(session, "force") == Some("true");
            return self.ramp_command(rest, force).await;
        }
        // `/history?since=MS`: only the points after it, for a page that keeps the rest.
        let since = query_param(session, "since").and_then(|v| v.parse().ok()).unwrap_or(0);
        match (method, path.as_str()) {
            (Method::GET, "/healthz") => respond(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            (Method::GET, "/routes") => json_response(StatusCode::OK, &self.routes_json()),
            (Method::GET, "/history") => {
                json_response(StatusCode::OK, &self.shared.history.json(None, since))
            }
            (Method::GET, one) if one.starts_with("/history/") => {
                let name = route_name(&one["/history/".len()..]);
                json_response(StatusCode::OK, &self.shared.history.json(Some(&name), since))
            }
            (Method::GET, "/shadow") => {
                let routes = self.shadow_json(|_| true);
                json_response(StatusCode::OK, &serde_json::json!({ "routes": routes }))
            }
            (Method::GET, one) if one.starts_with("/shadow/") => {
                let name = route_name(&one["/shadow/".len()..]);
                match self.shadow_json(|route| route == name).pop() {
                    Some(route) => json_response(StatusCode::OK, &route),
                    None => respond(
                        StatusCode::NOT_FOUND,
                        "text/plain",
                        format!("no route \"{name}\" with [routes.shadow]\n").into_bytes(),
                    ),
                }
            }
            (Method::GET, "/metrics") => {
                respond(StatusCode::OK, "text/plain; version=0.0.4", self.shared.metrics.render())
            }
            (Method::POST, "/reload") => {
                let outcome = self.reloader.reload_async("admin").await;
                let status = match outcome {
                    ReloadOutcome::Error { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                    _ => StatusCode::OK,
                };
                json_response(status, &serde_json::to_value(&outcome).unwrap_or(Value::Null))
            }
            (_, "/healthz" | "/routes" | "/shadow" | "/history" | "/metrics" | "/reload") => {
                respond(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "text/plain",
                    b"method not allowed\n".to_vec(),
                )
            }
            _ => respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                b"not found: try / (the console), /healthz, /routes, /history, /shadow, /metrics or POST /reload\n".to_vec(),
            ),
        }
    }
}

impl AdminApp {
    /// The shadow results of the routes whose name `wanted` accepts.
    fn shadow_json(&self, wanted: impl Fn(&str) -> bool) -> Vec<Value> {
        let active = self.shared.active.load_full();
        let table = &active.table;
        let mut out = Vec::new();
        for (route, shadow) in table.routes.iter().zip(&active.shadows) {
            let Some(shadow) = shadow.as_ref().filter(|_| wanted(&route.name)) else { continue };
            let mut report = match shadow.report.lock() {
                Ok(report) => report.to_json(shadow.outcomes.get()),
                Err(_) => continue,
            };
            let policy = &shadow.policy;
            let ignore: Vec<String> = policy.ignore.iter().map(ToString::to_string).collect();
            let fields = serde_json::json!({
                "route": route.name,
                "from": table.backends[route.from].name,
                "to": table.backends[route.to].name,
                "percent": f64::from(policy.threshold) / 100.0,
                "methods": policy.methods,
                "ignore": ignore,
                "ignore_headers": policy.ignore_headers,
                "noise_learning": policy.noise,
            });
            if let (Value::Object(report), Value::Object(fields)) = (&mut report, fields) {
                report.extend(fields);
            }
            out.push(report);
        }
        out
    }

    fn write_allowed(&self, session: &ServerSession) -> bool {
        match &self.token {
            Some(token) => session
                .req_header()
                .headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|given| same_secret(given.trim().as_bytes(), token.as_bytes())),
            None => session
                .client_addr()
                .and_then(|a| a.as_inet())
                .is_some_and(|a| a.ip().is_loopback()),
        }
    }

    /// `POST /routes/{name}/{pause|resume|rollback|advance}`.
    async fn ramp_command(&self, rest: &str, force: bool) -> Response<Vec<u8>> {
        let Some((route, name)) = rest.rsplit_once('/') else {
            return respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                b"try POST /routes/NAME/pause, resume, rollback or advance\n".to_vec(),
            );
        };
        let route = &*route_name(route);
        let Some(command) = Command::parse(name, force) else {
            let message =
                format!("unknown command \"{name}\": pause, resume, rollback or advance\n");
            return respond(StatusCode::NOT_FOUND, "text/plain", message.into_bytes());
        };
        match self.shared.ramps.command(route, command, &self.shared.metrics).await {
            Ok(state) => json_response(
                StatusCode::OK,
                &json!({"route": route, "status": state.status.as_str(), "percent": state.percent(), "reason": state.reason}),
            ),
            Err(CommandError::NoRamp) => {
                let message = format!("no route \"{route}\" with [routes.ramp]\n");
                respond(StatusCode::NOT_FOUND, "text/plain", message.into_bytes())
            }
            Err(CommandError::Refused(why)) => {
                json_response(StatusCode::CONFLICT, &json!({"route": route, "error": why}))
            }
            Err(CommandError::Store(why)) => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"route": route, "error": why}),
            ),
        }
    }

    fn routes_json(&self) -> Value {
        let active = self.shared.active.load();
        let failure = self
            .shared
            .last_failure
            .lock()
            .map(|f| f.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone());
        let mut body = table_json(&active);
        body["routes_file"] = json!(self.shared.routes_path.display().to_string());
        body["last_reload_error"] = serde_json::to_value(failure).unwrap_or(Value::Null);
        body["now"] = json!(crate::reload::now_rfc3339());
        body["reloads"] =
            serde_json::to_value(self.shared.reload_log.records()).unwrap_or_default();
        body["ramp_store"] = self.shared.ramps.store_json();
        body
    }
}

/// The active table as JSON: what the admin API shows.
pub fn table_json(active: &ActiveTable) -> Value {
    let table = &active.table;
    let backends: Vec<Value> = table
        .backends
        .iter()
        .zip(&active.upstreams)
        .map(|(backend, upstream)| {
            json!({
                "name": backend.name,
                "url": backend.url,
                "address": upstream.addr.to_string(),
                "health_check": backend.health.as_ref().map(|h| json!({
                    "path": h.path,
                    "interval": humantime::format_duration(h.interval).to_string(),
                })),
                "up": upstream.is_up(),
            })
        })
        .collect();
    let routes: Vec<Value> = table
        .routes
        .iter()
        .zip(&active.ramps)
        .enumerate()
        .map(|(index, (route, ramp))| {
            let percent =
                ramp.as_ref().map_or(route.percent(), |r| f64::from(r.threshold()) / 100.0);
            json!({
                "name": route.name,
                "match": route.matcher.describe(),
                "to": table.backends[route.to].name,
                "from": table.backends[route.from].name,
                "percent": percent,
                "sticky": route.sticky.to_string(),
                "strip_prefix": route.strip_prefix,
                "ramp": ramp.as_ref().map(|r| r.json()),
                "shadow": route.shadow.is_some(),
                "fallbacks": active.fallbacks_total(index),
            })
        })
        .collect();
    json!({
        "version": table.version,
        "loaded_at": humantime::format_rfc3339_millis(active.loaded_at).to_string(),
        "default_backend": table.backends[table.default_backend].name,
        "override_header": table.override_header,
        "override_allow": table.override_allow.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "override_token": table.override_token.is_some(),
        "client_id_cookie": table.client_id_cookie,
        "strip_headers": table.strip_headers,
        "backends": backends,
        "routes": routes,
    })
}

/// A route name from a path segment, where it is percent-encoded (names may hold spaces, `/`
/// or `?`).
fn route_name(segment: &str) -> std::borrow::Cow<'_, str> {
    percent_encoding::percent_decode_str(segment).decode_utf8_lossy()
}

/// The value of `name` in the request's query string.
fn query_param<'a>(session: &'a ServerSession, name: &str) -> Option<&'a str> {
    let query = session.req_header().uri.query()?;
    query.split('&').find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

fn console_response(asset: crate::console::Asset) -> Response<Vec<u8>> {
    let mut response = respond(StatusCode::OK, asset.content_type, asset.body.as_bytes().to_vec());
    for (name, value) in crate::console::HEADERS {
        response.headers_mut().insert(name, http::HeaderValue::from_static(value));
    }
    response
}

fn json_response(status: StatusCode, body: &Value) -> Response<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(body).unwrap_or_default();
    bytes.push(b'\n');
    respond(status, "application/json", bytes)
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(http::header::CONTENT_TYPE, value);
    }
    if let Ok(value) = response.body().len().to_string().parse() {
        response.headers_mut().insert(http::header::CONTENT_LENGTH, value);
    }
    // Answers repeat what the request said (a Host, a route name): never read as HTML.
    response
        .headers_mut()
        .insert(http::header::X_CONTENT_TYPE_OPTIONS, http::HeaderValue::from_static("nosniff"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(
        method: Method,
        host: Option<&str>,
        origin: Option<&str>,
        content_type: Option<&str>,
    ) -> Option<u16> {
        let hosts = ["ficus-admin.internal".to_string()];
        guard(&method, host, origin, content_type, &hosts).err().map(|r| r.status.as_u16())
    }

    #[test]
    fn addresses_localhost_and_configured_names_pass() {
        for host in [
            "127.0.0.1:9901",
            "10.1.2.3",
            "[::1]:9901",
            "localhost:9901",
            "FICUS-ADMIN.internal:80",
        ] {
            assert_eq!(check(Method::GET, Some(host), None, None), None, "{host}");
        }
    }

    #[test]
    fn other_names_are_refused_as_dns_rebinding() {
        assert_eq!(check(Method::GET, Some("evil.example:9901"), None, None), Some(421));
        assert_eq!(check(Method::GET, None, None, None), Some(400));
    }

    #[test]
    fn foreign_origins_and_non_json_writes_are_refused() {
        let json = Some("application/json");
        assert_eq!(
            check(Method::POST, Some("127.0.0.1:9901"), Some("http://evil.example"), json),
            Some(403)
        );
        assert_eq!(
            check(Method::POST, Some("127.0.0.1:9901"), Some("http://127.0.0.1:9901"), json),
            None
        );
        assert_eq!(
            check(Method::POST, Some("127.0.0.1:9901"), None, Some("text/plain")),
            Some(415)
        );
        assert_eq!(check(Method::POST, Some("127.0.0.1:9901"), None, None), Some(415));
        assert_eq!(
            check(
                Method::POST,
                Some("127.0.0.1:9901"),
                None,
                Some("application/json; charset=utf-8")
            ),
            None
        );
    }
}

//! The admin HTTP API, for operators on a private port: `/healthz`, `/routes`, `/metrics`
//! and `POST /reload`.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};

use crate::reload::{ReloadOutcome, Reloader};
use crate::state::{ActiveTable, Shared};

/// Serves the admin API.
pub struct AdminApp {
    pub shared: Arc<Shared>,
    pub reloader: Reloader,
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        match (method, path.as_str()) {
            (Method::GET, "/healthz") => respond(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            (Method::GET, "/routes") => json_response(StatusCode::OK, &self.routes_json()),
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
            (_, "/healthz" | "/routes" | "/metrics" | "/reload") => respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                b"method not allowed\n".to_vec(),
            ),
            _ => respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                b"not found: try /healthz, /routes, /metrics or POST /reload\n".to_vec(),
            ),
        }
    }
}

impl AdminApp {
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
        .map(|route| {
            json!({
                "name": route.name,
                "match": route.matcher.describe(),
                "to": table.backends[route.to].name,
                "from": table.backends[route.from].name,
                "percent": route.percent(),
                "sticky": route.sticky.to_string(),
                "strip_prefix": route.strip_prefix,
            })
        })
        .collect();
    json!({
        "version": table.version,
        "loaded_at": humantime::format_rfc3339_millis(active.loaded_at).to_string(),
        "default_backend": table.backends[table.default_backend].name,
        "override_header": table.override_header,
        "client_id_cookie": table.client_id_cookie,
        "backends": backends,
        "routes": routes,
    })
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
    response
}

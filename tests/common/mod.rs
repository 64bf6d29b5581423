//! Shared fixtures for the end-to-end tests: real HTTP backends that say who they are, and the
//! real `ficus` binary started on free ports with its own route file.

#![allow(dead_code)]

pub mod broker;
pub mod browser;
pub mod cdc;
pub mod pg;

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// How long a test waits for something it expects to happen (a start, a reload).
pub const PATIENCE: Duration = Duration::from_secs(15);

/// A real HTTP backend (HTTP/1.1 and h2c) that names itself in an `x-backend` header and in
/// its JSON body, echoes `POST /echo` bodies as they stream in, and serves `/healthz`.
pub struct TestBackend {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub healthy: Arc<AtomicBool>,
    task: Option<JoinHandle<()>>,
}

impl TestBackend {
    pub async fn start(name: &'static str) -> TestBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        let addr = listener.local_addr().expect("backend address");
        let healthy = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn(serve(name, listener, healthy.clone()));
        TestBackend { name, addr, healthy, task: Some(task) }
    }

    /// Stops listening and closes every open connection, like a crashed process.
    pub async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn serve(name: &'static str, listener: TcpListener, healthy: Arc<AtomicBool>) {
    // Dropping the set (when this task is aborted) aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let healthy = healthy.clone();
        let service = service_fn(move |req| handle(name, healthy.clone(), req));
        connections.spawn(async move {
            let _ = Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

async fn handle(
    name: &'static str,
    healthy: Arc<AtomicBool>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let response = Response::builder().header("x-backend", name);
    let response = match (req.method().as_str(), req.uri().path()) {
        (_, "/healthz") if healthy.load(Ordering::Relaxed) => response.body(full("ok")),
        (_, "/healthz") => response.status(503).body(full("down")),
        ("POST", "/echo") => response.body(req.into_body().boxed()),
        _ => {
            // Read the whole request first, as real servers do; answering early would make
            // the connection unusable for the next request.
            let (parts, body) = req.into_parts();
            let _ = body.collect().await;
            let req = Request::from_parts(parts, ());
            let headers: serde_json::Map<String, Value> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or(""))))
                .collect();
            let body = json!({
                "backend": name,
                "method": req.method().as_str(),
                "uri": req.uri().to_string(),
                "version": format!("{:?}", req.version()),
                "headers": headers,
            });
            response.header("content-type", "application/json").body(full(body.to_string()))
        }
    };
    Ok(response.unwrap_or_else(|_| Response::new(full("bad response"))))
}

/// A WebSocket server that echoes every message.
pub async fn start_ws_echo() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind ws");
    let addr = listener.local_addr().expect("ws address");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_close() || ws.send(message).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, task)
}

/// A free loopback port for the binary's listeners, which it must bind itself.
///
/// Ports are taken below Linux's ephemeral range (32768 and up), where `bind(0)` and outgoing
/// connections never land, so the port stays free between this probe and the binary's bind.
/// A per-process counter keeps concurrent tests of one binary from picking the same port.
pub fn free_addr() -> SocketAddr {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 600) as u16 * 20;
    for _ in 0..2_000 {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % 12_000;
        let port = 20_000 + (base - 20_000 + offset) % 12_000;
        if let Ok(listener) = StdListener::bind(("127.0.0.1", port)) {
            return listener.local_addr().expect("probe address");
        }
    }
    panic!("no free port below the ephemeral range")
}

/// The real `ficus proxy`, started on free ports with a route file in a temporary directory.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
    pub routes: PathBuf,
    pub log: PathBuf,
    child: Child,
}

pub fn ficus() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ficus"))
}

impl Proxy {
    pub async fn start(routes: &str) -> Proxy {
        Proxy::start_with(routes, &[]).await
    }

    /// Starts the proxy with extra arguments, waiting until its admin API answers.
    pub async fn start_with(routes: &str, extra: &[&str]) -> Proxy {
        Proxy::start_file("routes.toml", routes, extra).await
    }

    /// Starts the proxy with its route file named `file_name` (its extension is its format).
    pub async fn start_file(file_name: &str, routes: &str, extra: &[&str]) -> Proxy {
        let dir = tempfile::tempdir().expect("temp dir");
        let routes_path = dir.path().join(file_name);
        std::fs::write(&routes_path, routes).expect("write routes");
        let log = dir.path().join("ficus.log");
        let (addr, admin) = (free_addr(), free_addr());
        let tls_addr = extra.contains(&"--tls-listen").then(free_addr);
        let mut args: Vec<String> = vec![
            "proxy".into(),
            "--routes".into(),
            routes_path.display().to_string(),
            "--listen".into(),
            addr.to_string(),
            "--admin".into(),
            admin.to_string(),
            "--threads".into(),
            "2".into(),
        ];
        for arg in extra {
            args.push(arg.to_string());
            if *arg == "--tls-listen" {
                args.push(tls_addr.expect("tls address").to_string());
            }
        }
        let child = ficus()
            .args(&args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn ficus");
        let mut proxy = Proxy { addr, admin, tls_addr, dir, routes: routes_path, log, child };
        proxy.wait_ready().await;
        proxy
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("ficus exited with {status} before it was ready:\n{}", self.logs());
            }
            let admin_up = reqwest::get(format!("http://{}/healthz", self.admin)).await.is_ok();
            let proxy_up = tokio::net::TcpStream::connect(self.addr).await.is_ok();
            if admin_up && proxy_up {
                return;
            }
            assert!(Instant::now() < deadline, "ficus not ready in time:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn admin_get(&self, path: &str) -> reqwest::Response {
        reqwest::get(format!("http://{}{path}", self.admin)).await.expect("admin request")
    }

    /// `POST` to the admin API, as an operator's tool does: with a JSON content type.
    pub async fn admin_post(&self, path: &str) -> reqwest::Response {
        client()
            .post(format!("http://{}{path}", self.admin))
            .header("content-type", "application/json")
            .send()
            .await
            .expect("admin request")
    }

    pub async fn routes_json(&self) -> Value {
        self.admin_get("/routes").await.json().await.expect("routes json")
    }

    pub async fn version(&self) -> String {
        self.routes_json().await["version"].as_str().expect("version").to_string()
    }

    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await.text().await.expect("metrics text")
    }

    /// Replaces the route file the way editors do: write a new file, rename it over the old.
    pub fn write_routes(&self, text: &str) {
        let tmp = self.dir.path().join(".routes.tmp");
        std::fs::write(&tmp, text).expect("write routes");
        std::fs::rename(&tmp, &self.routes).expect("rename routes");
    }

    /// Waits until the admin API shows a table version other than `old`.
    pub async fn wait_version_change(&self, old: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let version = self.version().await;
            if version != old {
                return version;
            }
            assert!(Instant::now() < deadline, "no reload seen:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the admin API reports a reload error.
    pub async fn wait_reload_error(&self) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let routes = self.routes_json().await;
            if !routes["last_reload_error"].is_null() {
                return routes["last_reload_error"].clone();
            }
            assert!(Instant::now() < deadline, "no reload error seen:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `series` reaches at least `value`; returns the metrics text then.
    pub async fn wait_metric(&self, series: &str, value: f64) -> String {
        wait_metric(|| self.metrics(), series, value, PATIENCE).await
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- ficus log ---\n{}", self.logs());
        }
    }
}

/// A route file with a monolith, an orders service and one route between them.
pub fn split_routes(monolith: &TestBackend, orders: &TestBackend, percent: f64) -> String {
    split_routes_between(&monolith.url(), &orders.url(), percent)
}

/// [`split_routes`] between backends at any two URLs. The route's sections (`[routes.shadow]`)
/// can be appended.
pub fn split_routes_between(monolith: &str, orders: &str, percent: f64) -> String {
    RouteFile::split(monolith, orders).percent(percent).build()
}

/// A test's route file, composed instead of copied: the monolith, the orders service and
/// the `orders` route between them (`/api/orders`, sticky on `x-user-id`), with lines added
/// where a test needs them.
pub struct RouteFile {
    monolith: String,
    orders: String,
    orders_extra: String,
    percent: f64,
    route_extra: String,
}

impl RouteFile {
    /// The split between `monolith` and `orders` (URLs), at 0%.
    pub fn split(monolith: &str, orders: &str) -> RouteFile {
        RouteFile {
            monolith: monolith.into(),
            orders: orders.into(),
            orders_extra: String::new(),
            percent: 0.0,
            route_extra: String::new(),
        }
    }

    pub fn percent(mut self, percent: f64) -> RouteFile {
        self.percent = percent;
        self
    }

    /// Lines (or sections, like `[backends.orders.health]`) after the orders backend's URL.
    pub fn orders_backend(mut self, lines: &str) -> RouteFile {
        self.orders_extra = lines.into();
        self
    }

    /// Lines of the route, after its percent.
    pub fn route(mut self, lines: &str) -> RouteFile {
        self.route_extra = lines.into();
        self
    }

    pub fn build(&self) -> String {
        let RouteFile { monolith, orders, orders_extra, percent, route_extra } = self;
        format!(
            r#"
[backends.monolith]
url = "{monolith}"
[backends.orders]
url = "{orders}"
{orders_extra}

[defaults]
backend = "monolith"
sticky = "header:x-user-id"
override_header = "x-ficus-backend"

[[routes]]
name = "orders"
match = {{ path_prefix = "/api/orders" }}
to = "orders"
percent = {percent}
{route_extra}
"#
        )
    }
}

/// A keep-alive client with a short timeout.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client")
}

/// Which backend served `GET path` for user `user`.
pub async fn backend_for(
    client: &reqwest::Client,
    proxy: &Proxy,
    path: &str,
    user: &str,
) -> String {
    let response = client
        .get(proxy.url(path))
        .header("x-user-id", user)
        .send()
        .await
        .expect("request through proxy");
    assert_eq!(response.status(), 200, "user {user}");
    response.headers()["x-backend"].to_str().expect("x-backend").to_string()
}

/// Polls `fetch` (a metrics page) until `series` reaches at least `value`; returns the text
/// then.
pub async fn wait_metric<F: std::future::Future<Output = String>>(
    fetch: impl Fn() -> F,
    series: &str,
    value: f64,
    patience: Duration,
) -> String {
    let deadline = Instant::now() + patience;
    loop {
        let text = fetch().await;
        if metric(&text, series) >= value {
            return text;
        }
        assert!(Instant::now() < deadline, "{series} never reached {value}:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of one series in Prometheus text, or 0 when it is absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// A process's peak resident memory (VmHWM), in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// A request as an [`AppBackend`] received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

/// An answer of an [`AppBackend`]: status, content type, body.
pub type Reply = (u16, &'static str, String);

/// A real HTTP backend whose answers a test scripts, recording every request it receives
/// (after an optional delay, as a slow service).
pub struct AppBackend {
    pub addr: SocketAddr,
    pub seen: Arc<std::sync::Mutex<Vec<Seen>>>,
    task: Option<JoinHandle<()>>,
}

impl AppBackend {
    pub async fn start(answer: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> AppBackend {
        AppBackend::start_slow(Duration::ZERO, answer).await
    }

    pub async fn start_slow(
        delay: Duration,
        answer: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> AppBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        let addr = listener.local_addr().expect("backend address");
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (answer, log) = (Arc::new(answer), seen.clone());
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (answer, log) = (answer.clone(), log.clone());
                let service = service_fn(move |req: Request<Incoming>| {
                    let (answer, log) = (answer.clone(), log.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let seen = Seen {
                            method: parts.method.to_string(),
                            path: parts.uri.path().to_string(),
                            headers: parts.headers,
                            body,
                        };
                        tokio::time::sleep(delay).await;
                        let (status, content_type, text) = answer(&seen);
                        log.lock().expect("log").push(seen);
                        let response = Response::builder()
                            .status(status)
                            .header("content-type", content_type)
                            .body(full(text));
                        Ok::<_, Infallible>(
                            response.unwrap_or_else(|_| Response::new(full("bad response"))),
                        )
                    }
                });
                connections.spawn(async move {
                    let _ = Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        AppBackend { addr, seen, task: Some(task) }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops listening and closes every open connection, like a crashed process.
    pub async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("log").clone()
    }
}

impl Drop for AppBackend {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

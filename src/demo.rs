//! `ficus demo`: two sample backends ("monolith" and "orders") and the proxy in front of
//! them, with a route file the user can edit while it runs.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_trait::async_trait;
use clap::Args;
use ficus_proxy::ProxySettings;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::services::listening::Service;

#[derive(Args)]
pub struct DemoArgs {
    /// Address of the proxy.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: String,
    /// Address of the admin API.
    #[arg(long, default_value = "127.0.0.1:9901")]
    admin: String,
    /// Directory for the demo's route file.
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// A sample backend that answers every request with its own name.
struct SampleBackend {
    name: &'static str,
}

#[async_trait]
impl ServeHttp for SampleBackend {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let body = serde_json::json!({
            "backend": self.name,
            "method": req.method.as_str(),
            "path": req.uri.to_string(),
            "x-forwarded-for": req.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()),
        });
        let mut body = body.to_string().into_bytes();
        body.push(b'\n');
        Response::builder()
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .header("x-backend", self.name)
            .body(body)
            .unwrap_or_default()
    }
}

pub fn run(args: &DemoArgs) -> Result<i32> {
    let dir = args.dir.clone().unwrap_or_else(|| std::env::temp_dir().join("ficus-demo"));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let monolith = free_port()?;
    let orders = free_port()?;
    let routes = dir.join("routes.toml");
    std::fs::write(&routes, route_file(&monolith, &orders))
        .with_context(|| format!("cannot write {}", routes.display()))?;

    let settings = ProxySettings {
        routes: routes.clone(),
        listen: args.listen.clone(),
        admin: args.admin.clone(),
        h2c: true,
        tls: None,
        threads: 2,
        watch: true,
        shutdown_grace: Duration::from_secs(1),
    };
    let listen = args.listen.clone();
    let admin = args.admin.clone();
    std::thread::spawn(move || {
        if let Err(e) = show_traffic(&listen, &admin, &routes) {
            eprintln!("demo traffic failed: {e:#}");
        }
    });
    ficus_proxy::run_with(settings, |server| {
        for (name, addr) in [("monolith", monolith), ("orders", orders)] {
            let mut service = Service::new(format!("sample {name}"), SampleBackend { name });
            service.add_tcp(&addr);
            server.add_service(service);
        }
    })?;
    Ok(0)
}

fn route_file(monolith: &str, orders: &str) -> String {
    format!(
        r#"# ficus demo route file: edit `percent` and save; the proxy reloads it live.
[backends.monolith]
url = "http://{monolith}"

[backends.orders]
url = "http://{orders}"
health = {{ path = "/healthz", interval = "2s" }}

[defaults]
backend = "monolith"
sticky = "header:x-user-id"
override_header = "x-ficus-backend"

[[routes]]
name = "orders"
match = {{ path_prefix = "/api/orders" }}
to = "orders"
percent = 30
"#
    )
}

fn free_port() -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr()?.to_string())
}

/// Waits for the proxy, sends requests from 20 users and prints where each went.
fn show_traffic(listen: &str, admin: &str, routes: &std::path::Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(admin, "/healthz", None).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the proxy did not start within 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut to_orders = 0;
    println!("\n20 users request GET /api/orders/1 through the proxy (30% of users go to the new service):");
    for user in 1..=20 {
        let response = get(listen, "/api/orders/1", Some(&format!("user-{user}")))?;
        let backend =
            if response.contains("\"backend\":\"orders\"") { "orders" } else { "monolith" };
        to_orders += usize::from(backend == "orders");
        println!("  x-user-id: user-{user:<3} -> {backend}");
    }
    println!("{to_orders} of 20 users on the new orders service.\n");
    println!("Try next:");
    println!("  curl -s -H 'x-user-id: alice' http://{listen}/api/orders/1");
    println!("  curl -s http://{listen}/                      # unmatched: the monolith");
    println!("  $EDITOR {}   # change percent, save, and repeat the curl", routes.display());
    println!("  ficus routes explain {} GET /api/orders/1 -H 'x-user-id: alice'", routes.display());
    println!("  curl -s http://{admin}/routes; curl -s http://{admin}/metrics | grep ficus_");
    println!("Ctrl-C stops the demo.");
    Ok(())
}

/// A minimal HTTP/1.1 GET, enough for the demo to watch its own traffic.
fn get(addr: &str, path: &str, user: Option<&str>) -> Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let user = user.map_or(String::new(), |u| format!("x-user-id: {u}\r\n"));
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{user}Connection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    anyhow::ensure!(response.starts_with("HTTP/1.1 200"), "unexpected answer: {response}");
    Ok(response)
}

//! `ficus proxy` against a hostile client and a careless operator: request targets and Hosts
//! the table cannot route faithfully, route files that would hang or kill a reload, and
//! secrets in backend URLs.

mod common;

use std::time::{Duration, Instant};

use common::{ficus, split_routes, Proxy, TestBackend, PATIENCE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `request` as raw bytes and returns the status line of the answer.
async fn raw_status(proxy: &Proxy, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // The status line is all this needs; the connection may stay open after it.
    while !answer.windows(2).any(|w| w == b"\r\n") {
        let read = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        if read == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..read]);
    }
    let text = String::from_utf8_lossy(&answer);
    text.lines().next().unwrap_or("").to_string()
}

/// Sends `request` (which asks to close the connection) as raw bytes: the status line, and
/// the body as JSON (the test backends' echo), or null.
async fn raw_exchange(proxy: &Proxy, request: &str) -> (String, serde_json::Value) {
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .expect("in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, serde_json::from_str(body).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_and_encodings_cannot_reach_what_the_route_did_not_intend() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let routes = split_routes(&monolith, &orders, 100.0)
        .replace(&format!("url = \"{}\"", orders.url()), &format!("url = \"{}/v2\"", orders.url()))
        .replace("percent = 100", "percent = 100\nrewrite = { strip_prefix = \"/api\" }");
    let proxy = Proxy::start(&routes).await;
    let get = |path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: shop\r\nX-User-Id: u1\r\nConnection: close\r\n\r\n")
    };
    for (path, backend, uri) in [
        ("/api/orders/7", "orders", "/v2/orders/7"),
        ("/api/orders/../../admin", "monolith", "/admin"),
        ("/api/orders/%2e%2e/%2E%2E/admin", "monolith", "/admin"),
        ("//api//orders/./7", "orders", "/v2/orders/7"),
    ] {
        let (status, echoed) = raw_exchange(&proxy, &get(path)).await;
        assert!(status.contains(" 200 "), "{path}: {status}");
        assert_eq!(
            (echoed["backend"].as_str(), echoed["uri"].as_str()),
            (Some(backend), Some(uri)),
            "{path}"
        );
    }
    for refused in ["/api/../../etc/passwd", "/api/orders/%zz", "/api/%%32e%%32e/x"] {
        let (status, _) = raw_exchange(&proxy, &get(refused)).await;
        assert!(status.contains(" 400 "), "{refused}: {status}");
    }

    // `routes explain` routes the same normalised path.
    let output = ficus()
        .args(["routes", "explain"])
        .arg(&proxy.routes)
        .args(["GET", "/api/orders/../../admin", "-H", "x-user-id: u1"])
        .output()
        .expect("explain");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("normalised to /admin") && text.contains("none of the 1 routes"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_that_are_not_paths_missing_hosts_and_ambiguous_framing_get_400() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let proxy = Proxy::start(&split_routes(&monolith, &orders, 0.0)).await;
    for (request, status) in [
        ("GET admin/users HTTP/1.1\r\nHost: shop\r\n\r\n", "400"),
        ("GET * HTTP/1.1\r\nHost: shop\r\n\r\n", "400"),
        // Padded past 24 bytes: h2c detection waits for that many (point 1 of issue 10).
        ("GET / HTTP/1.1\r\nX-Pad: 1\r\n\r\n", "400"),
        ("GET / HTTP/1.1\r\nHost: \r\n\r\n", "400"),
        ("GET /home HTTP/1.1\r\nHost: shop\r\n\r\n", "200"),
        ("GET http://shop/home HTTP/1.1\r\nHost: shop\r\n\r\n", "200"),
        ("OPTIONS * HTTP/1.1\r\nHost: shop\r\n\r\n", "200"),
        ("GET /home HTTP/1.0\r\nX-Pad: 1\r\n\r\n", "200"),
        ("POST /home HTTP/1.1\r\nHost: shop\r\nContent-Length: 5, 5\r\n\r\nhello", "400"),
        (
            "POST /home HTTP/1.1\r\nHost: shop\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            "400",
        ),
        (
            "POST /home HTTP/1.1\r\nHost: shop\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "200",
        ),
    ] {
        let line = raw_status(&proxy, request).await;
        assert!(line.split(' ').nth(1) == Some(status), "{request:?} got {line:?}");
    }
}

/// The split routes as YAML.
fn yaml_routes(monolith: &TestBackend, orders: &TestBackend) -> String {
    format!(
        "backends:\n  monolith: {{url: \"{}\"}}\n  orders: {{url: \"{}\"}}\n\
         defaults: {{backend: monolith, sticky: \"header:x-user-id\"}}\n\
         routes:\n  - {{name: orders, match: {{path_prefix: /api/orders}}, to: orders, percent: 50}}\n",
        monolith.url(),
        orders.url()
    )
}

/// A 9-level "billion laughs" in a few hundred bytes.
fn alias_bomb() -> String {
    let mut bomb = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    for (level, previous) in ('b'..='i').zip('a'..) {
        let refs = vec![format!("*{previous}"); 9].join(",");
        bomb.push_str(&format!("{level}: &{level} [{refs}]\n"));
    }
    bomb
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_yaml_alias_bomb_is_refused_and_the_old_table_keeps_serving() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let proxy = Proxy::start_file("routes.yaml", &yaml_routes(&monolith, &orders), &[]).await;
    let bomb = alias_bomb();
    assert!(bomb.len() < 400);
    proxy.write_routes(&bomb);
    let error = proxy.wait_reload_error().await;
    assert!(error.to_string().contains("YAML aliases expand"), "{error}");
    let response = common::client().get(proxy.url("/home")).send().await.expect("request");
    assert_eq!(response.status(), 200, "the old table serves:\n{}", proxy.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_check_refuses_a_fifo_and_an_oversized_file_without_blocking() {
    let dir = tempfile::tempdir().expect("dir");
    let fifo = dir.path().join("routes.toml");
    let status = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(status.success());
    let big = dir.path().join("big.toml");
    std::fs::write(&big, format!("# {}\n", "x".repeat(9 * 1024 * 1024))).expect("write");
    for (file, expected) in [(&fifo, "not a regular file"), (&big, "limit of a route file")] {
        let mut child = ficus()
            .args(["routes", "check"])
            .arg(file)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let deadline = Instant::now() + PATIENCE;
        while child.try_wait().expect("try_wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("routes check blocked on {}", file.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let output = child.wait_with_output().expect("output");
        assert_eq!(output.status.code(), Some(1));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(text.contains(expected), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_backend_urls_are_refused_and_never_shown() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let proxy = Proxy::start(&split_routes(&monolith, &orders, 5.0)).await;
    let with_secret = split_routes(&monolith, &orders, 5.0).replace(
        &format!("url = \"{}\"", orders.url()),
        &format!("url = \"http://:s3cret@{}\"", orders.addr),
    );
    assert!(with_secret.contains("s3cret"));
    proxy.write_routes(&with_secret);
    let error = proxy.wait_reload_error().await;
    assert!(error.to_string().contains("takes no credentials"), "{error}");
    let routes = proxy.routes_json().await.to_string();
    assert!(!routes.contains("s3cret"), "{routes}");
    assert!(!proxy.logs().contains("s3cret"), "{}", proxy.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_put_back_as_it_was_clears_the_reload_error() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let good = split_routes(&monolith, &orders, 5.0);
    let proxy = Proxy::start(&good).await;
    proxy.write_routes(&good.replace("percent = 5", "percent = 500"));
    proxy.wait_reload_error().await;
    proxy.write_routes(&good);
    let deadline = Instant::now() + PATIENCE;
    while !proxy.routes_json().await["last_reload_error"].is_null() {
        assert!(Instant::now() < deadline, "the error outlived the fix:\n{}", proxy.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_x_forwarded_for_line_is_kept() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let proxy = Proxy::start(&split_routes(&monolith, &orders, 0.0)).await;
    let request = "GET /home HTTP/1.1\r\nHost: shop\r\nX-Forwarded-For: 1.1.1.1\r\n\
                   X-Forwarded-For: 2.2.2.2, 3.3.3.3\r\nConnection: close\r\n\r\n";
    let (_, echoed) = raw_exchange(&proxy, request).await;
    assert_eq!(echoed["headers"]["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_the_backend_cuts_short_counts_as_an_error() {
    // A backend that promises 100 bytes, sends 5 and closes.
    let (addr, backend) =
        scripted_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello", Then::Close).await;
    let routes = format!(
        "[backends.monolith]\nurl = \"http://{addr}\"\n[defaults]\nbackend = \"monolith\"\n"
    );
    let proxy = Proxy::start(&routes).await;
    let response = common::client().get(proxy.url("/home")).send().await.expect("headers");
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.is_err(), "the body is cut short");
    let series = r#"ficus_requests_total{backend="monolith",route="(default)",status="error"}"#;
    let metrics = proxy.wait_metric(series, 1.0).await;
    assert!(!metrics.contains(r#"route="(default)",status="2xx"} 1"#), "{metrics}");
    backend.abort();
}

/// What a scripted backend does with a connection once it has answered.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Keeps it open without a word: a stalled process, not a dead one.
    Stall,
    /// Closes it, whatever its answer promised.
    Close,
}

/// A backend that reads each request and answers with `reply` (maybe nothing), then stalls or
/// closes the connection.
async fn scripted_backend(
    reply: &'static [u8],
    then: Then,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request).await;
            let _ = stream.write_all(reply).await;
            if then == Then::Stall {
                held.push(stream);
            }
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_backend_closes_is_closed_and_never_reused() {
    // A backend that answers one request per connection, keeping it alive, then closes its
    // side (FIN) and reports how long the proxy took to close the other.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
                // Long enough for the proxy to put the connection in its pool.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = stream.shutdown().await;
                let half_closed = Instant::now();
                let mut rest = [0u8; 64];
                let _ = stream.read(&mut rest).await;
                let _ = closed_tx.send(half_closed.elapsed());
            });
        }
    });
    let routes = format!(
        "[backends.monolith]\nurl = \"http://{addr}\"\n[defaults]\nbackend = \"monolith\"\n"
    );
    let proxy = Proxy::start(&routes).await;
    let client = common::client();
    for _ in 0..2 {
        let response = client.get(proxy.url("/home")).send().await.expect("an answer");
        assert_eq!(response.status(), 200, "a closed pooled connection was reused");
        // The proxy closes its end once its idle check (every second) sees the backend's.
        let waited = tokio::time::timeout(PATIENCE, closed_rx.recv()).await;
        let waited =
            waited.expect("the proxy kept a closed backend connection open").expect("sent");
        assert!(waited < Duration::from_secs(5), "closed after {waited:?}");
    }
    backend.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_backend_is_given_up_after_its_read_timeout() {
    let (silent, silent_task) = scripted_backend(b"", Then::Stall).await;
    let (halfway, halfway_task) =
        scripted_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello", Then::Stall).await;
    let routes = format!(
        "[backends.silent]\nurl = \"http://{silent}\"\nread_timeout = \"1s\"\n\
         [backends.halfway]\nurl = \"http://{halfway}\"\nread_timeout = \"1s\"\n\
         [defaults]\nbackend = \"silent\"\n\
         [[routes]]\nname = \"halfway\"\nmatch = {{ path_prefix = \"/halfway\" }}\nto = \"halfway\"\npercent = 100\n"
    );
    let proxy = Proxy::start(&routes).await;
    let client =
        reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("client");

    // Nothing ever came: 504 once the read timeout passed.
    let asked = Instant::now();
    let response = client.get(proxy.url("/home")).send().await.expect("an answer");
    assert_eq!(response.status(), 504);
    assert!(asked.elapsed() < Duration::from_secs(10), "{:?}", asked.elapsed());

    // Headers came, then nothing: the response ends, cut short, once the timeout passed.
    let asked = Instant::now();
    let response = client.get(proxy.url("/halfway")).send().await.expect("headers");
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.is_err(), "the body is cut short");
    assert!(asked.elapsed() < Duration::from_secs(10), "{:?}", asked.elapsed());
    silent_task.abort();
    halfway_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_refuses_what_a_web_page_could_make_a_browser_send() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let proxy = Proxy::start(&split_routes(&monolith, &orders, 5.0)).await;
    let client = common::client();
    let reload = || client.post(format!("http://{}/reload", proxy.admin));
    // DNS rebinding: a page's own name resolving to this address.
    let rebound = client
        .get(format!("http://{}/routes", proxy.admin))
        .header("host", format!("evil.example:{}", proxy.admin.port()))
        .send()
        .await
        .expect("request");
    assert_eq!(rebound.status(), 421);
    // A cross-site form or fetch without preflight.
    let plain = reload().header("content-type", "text/plain").send().await.expect("request");
    assert_eq!(plain.status(), 415);
    let foreign = reload()
        .header("content-type", "application/json")
        .header("origin", "http://evil.example")
        .send()
        .await
        .expect("request");
    assert_eq!(foreign.status(), 403);
    let metrics = proxy.metrics().await;
    assert_eq!(
        common::metric(&metrics, r#"ficus_reloads_total{result="ok",trigger="admin"}"#),
        0.0
    );
    assert_eq!(
        common::metric(&metrics, r#"ficus_reloads_total{result="unchanged",trigger="admin"}"#),
        0.0
    );
    // The operator's own request.
    assert_eq!(proxy.admin_post("/reload").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_up_error_is_printed_once() {
    let dir = tempfile::tempdir().expect("dir");
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        "[backends.a]\nurl = \"http://127.0.0.1:1\"\n[defaults]\nbackend = \"b\"\n",
    )
    .expect("write");
    let output = ficus()
        .args(["proxy", "--routes"])
        .arg(&routes)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.matches("unknown backend \"b\"").count(), 1, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sent_identity_headers_are_stripped_as_configured() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let routes = split_routes(&monolith, &orders, 0.0);
    let proxy = Proxy::start(&routes).await;
    let seen = || async {
        let response = common::client()
            .get(proxy.url("/home"))
            .header("x-real-ip", "6.6.6.6")
            .header("forwarded", "for=6.6.6.6")
            .send()
            .await
            .expect("request");
        let body: serde_json::Value = response.json().await.expect("json");
        body["headers"].clone()
    };
    let headers = seen().await;
    assert_eq!(headers.get("x-real-ip"), None, "stripped by default: {headers}");
    assert_eq!(headers["forwarded"], "for=6.6.6.6");

    let version = proxy.version().await;
    proxy.write_routes(
        &routes.replace(
            "[defaults]\n",
            "[defaults]\nstrip_headers = [\"X-Real-IP\", \"Forwarded\"]\n",
        ),
    );
    proxy.wait_version_change(&version).await;
    let headers = seen().await;
    assert_eq!((headers.get("x-real-ip"), headers.get("forwarded")), (None, None), "{headers}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_check_refuses_port_0() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("routes.toml");
    std::fs::write(
        &file,
        "[backends.a]\nurl = \"http://127.0.0.1:0\"\n[defaults]\nbackend = \"a\"\n",
    )
    .expect("write");
    let output = ficus().args(["routes", "check"]).arg(&file).output().expect("check");
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("backends.a: url: \"http://127.0.0.1:0\": port 0"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_switch_the_client_did_not_ask_for_is_not_relayed() {
    // A backend that switches every request to h2c, whatever it asked for.
    let (addr, task) = scripted_backend(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
        Then::Stall,
    )
    .await;
    let routes = format!(
        "[backends.monolith]\nurl = \"http://{addr}\"\n[defaults]\nbackend = \"monolith\"\n"
    );
    let proxy = Proxy::start(&routes).await;
    let request = "GET /chat HTTP/1.1\r\nHost: shop\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                   Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let status = raw_status(&proxy, request).await;
    assert!(status.contains(" 502 "), "{status}");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regex_routes_serve_in_bounded_memory() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    // 1,000 regex routes and a path none matches took 1.3 GB on the first request before;
    // 10,000 routes are checked in routes/tests/regex_scale.rs.
    let mut routes = split_routes(&monolith, &orders, 100.0);
    for i in 0..1_000 {
        routes.push_str(&format!(
            "[[routes]]\nname = \"r{i}\"\nmatch = {{ path_regex = '^/svc{i}/[a-z]+/\\d+$' }}\nto = \"orders\"\npercent = 100\n"
        ));
    }
    let proxy = Proxy::start(&routes).await;
    for (path, expected) in [("/svc4999/abc/12", "monolith"), ("/svc999/abc/1", "orders")] {
        let response = common::client()
            .get(proxy.url(path))
            .header("x-user-id", "u1")
            .send()
            .await
            .expect("request");
        assert_eq!(response.headers()["x-backend"], expected, "{path}");
    }
    let peak = common::peak_rss_kib(proxy.pid());
    assert!(peak < 512 * 1024, "the proxy peaked at {peak} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_are_honoured_only_from_allowed_networks_with_the_token_and_never_forwarded() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let base = split_routes(&monolith, &orders, 0.0);
    let dir = tempfile::tempdir().expect("dir");
    let token_file = dir.path().join("override-token");
    std::fs::write(&token_file, "s3cret-s3cret-s3cret\n").expect("token");
    let with_rule = |rule: &str| base.replace("override_header = \"x-ficus-backend\"", rule);
    let proxy = Proxy::start(&with_rule(
        r#"override = { header = "x-ficus-backend", allow = ["192.0.2.0/24"] }"#,
    ))
    .await;
    let ask = |value: &'static str| {
        let proxy = &proxy;
        async move {
            let response = common::client()
                .get(proxy.url("/api/orders/1"))
                .header("x-user-id", "u1")
                .header("x-ficus-backend", value)
                .send()
                .await
                .expect("request");
            let body: serde_json::Value = response.json().await.expect("json");
            (
                body["backend"].as_str().unwrap_or("").to_string(),
                body["headers"].get("x-ficus-backend").is_some(),
            )
        }
    };
    // 127.0.0.1 is not in 192.0.2.0/24: the split decides (0%: the monolith).
    assert_eq!(ask("orders").await, ("monolith".to_string(), false));

    let version = proxy.version().await;
    let rule = format!(
        r#"override = {{ header = "x-ficus-backend", allow = ["127.0.0.1/32"], token_file = "{}" }}"#,
        token_file.display()
    );
    proxy.write_routes(&with_rule(&rule));
    proxy.wait_version_change(&version).await;
    assert_eq!(ask("orders").await, ("monolith".to_string(), false), "no token");
    assert_eq!(ask("orders wrong-wrong-wrong-1").await, ("monolith".to_string(), false));
    assert_eq!(ask("orders s3cret-s3cret-s3cret").await, ("orders".to_string(), false));
    let routes = proxy.routes_json().await.to_string();
    assert!(!routes.contains("s3cret"), "{routes}");
}

/// The proxy serving a 0% split of `/orders`, with `[proxy]` settings.
async fn start_with_settings(proxy_settings: &str) -> (Proxy, [TestBackend; 2]) {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let dir = tempfile::tempdir().expect("dir");
    let settings = dir.path().join("proxy.toml");
    std::fs::write(&settings, format!("[proxy]\n{proxy_settings}")).expect("write");
    let settings = settings.display().to_string();
    let proxy =
        Proxy::start_with(&split_routes(&monolith, &orders, 0.0), &["--config", &settings]).await;
    (proxy, [monolith, orders])
}

/// Reads until the proxy closes the connection; how long that took, or `None` after `limit`.
async fn time_to_close(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let closed =
        tokio::time::timeout(limit, async { while let Ok(1..) = stream.read(&mut buf).await {} })
            .await;
    closed.ok().map(|()| started.elapsed())
}

/// A keep-alive connection that had one request answered (in one read) and sends no more.
async fn answered_then_idle(proxy: &Proxy) -> tokio::net::TcpStream {
    let mut idle = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");
    idle.write_all(b"GET /home HTTP/1.1\r\nHost: shop\r\n\r\n").await.expect("write");
    let mut answer = vec![0u8; 65536];
    let read = idle.read(&mut answer).await.expect("response");
    assert!(String::from_utf8_lossy(&answer[..read]).starts_with("HTTP/1.1 200"));
    idle
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_idle_keep_alive_connections_are_closed_at_the_header_deadline() {
    let (proxy, _backends) = start_with_settings("request_header_timeout = \"1s\"\n").await;

    // Slowloris: a header line, then one byte every 200 ms, for up to 10 s.
    let mut slow = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");
    slow.write_all(b"GET /home HTTP/1.1\r\nHost: shop\r\n").await.expect("write");
    let started = Instant::now();
    let mut closed = false;
    while started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if slow.write_all(b"X").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 64];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buf)).await
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "a trickle of header bytes kept the connection for 10 s");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());

    // Keep-alive: one request answered, then silence: closed at the deadline.
    let mut idle = answered_then_idle(&proxy).await;
    let waited = time_to_close(&mut idle, Duration::from_secs(10)).await;
    let waited = waited.expect("an idle keep-alive connection stayed open for 10 s");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_h2c_on_a_silent_connection_is_closed_and_a_short_request_is_served() {
    let (proxy, _backends) =
        start_with_settings("h2c = true\nrequest_header_timeout = \"1s\"\n").await;

    // Not a byte: h2c detection used to wait for the 24-byte preface forever.
    let mut silent = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");
    let waited = time_to_close(&mut silent, Duration::from_secs(10)).await;
    let waited = waited.expect("a silent connection stayed open for 10 s");
    assert!(waited < Duration::from_secs(5), "{waited:?}");

    // An HTTP/1.0 request shorter than the preface used to wait for more bytes.
    let (status, body) = raw_exchange(&proxy, "GET /home HTTP/1.0\r\n\r\n").await;
    assert!(status.ends_with(" 200 OK"), "{status}");
    assert_eq!(body["backend"], "monolith");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout() {
    let settings = "keepalive_timeout = \"1s\"\nrequest_header_timeout = \"30s\"\n";
    let (proxy, _backends) = start_with_settings(settings).await;
    let mut idle = answered_then_idle(&proxy).await;
    let waited = time_to_close(&mut idle, Duration::from_secs(10)).await;
    let waited = waited.expect("an idle keep-alive connection stayed open for 10 s");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_above_the_limit_is_answered_431() {
    let (proxy, _backends) = start_with_settings("max_request_header_size = \"2KiB\"\n").await;
    let request = |filler: usize| {
        let filler = "x".repeat(filler);
        format!(
            "GET /home HTTP/1.1\r\nHost: shop\r\nX-Filler: {filler}\r\nConnection: close\r\n\r\n"
        )
    };
    assert_eq!(raw_exchange(&proxy, &request(1500)).await.0, "HTTP/1.1 200 OK");
    // Whole in one write, and trickled in pieces.
    assert_eq!(
        raw_status(&proxy, &request(3000)).await,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");
    stream.write_all(b"GET /home HTTP/1.1\r\nHost: shop\r\n").await.expect("write");
    let mut status = String::new();
    for _ in 0..100 {
        if stream.write_all(&[b'X'; 100]).await.is_err() {
            break;
        }
        let mut buf = [0u8; 256];
        if let Ok(Ok(read @ 1..)) =
            tokio::time::timeout(Duration::from_millis(10), stream.read(&mut buf)).await
        {
            status = String::from_utf8_lossy(&buf[..read]).lines().next().unwrap_or("").into();
            break;
        }
    }
    assert_eq!(status, "HTTP/1.1 431 Request Header Fields Too Large");

    // On a kept-alive connection too: every request's session gets the limit.
    let mut reused = answered_then_idle(&proxy).await;
    reused.write_all(request(3000).as_bytes()).await.expect("write");
    let mut answer = vec![0u8; 4096];
    let read = reused.read(&mut answer).await.expect("response");
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_is_given_up_after_the_body_timeout() {
    let (proxy, _backends) = start_with_settings("request_body_timeout = \"1s\"\n").await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");
    let head = "POST /home HTTP/1.1\r\nHost: shop\r\nContent-Length: 100\r\n\r\n0123456789";
    stream.write_all(head.as_bytes()).await.expect("write");
    let started = Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "a stalled body held the connection for 10 s");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_connections_accepting_waits_until_a_connection_closes() {
    let settings = "max_connections = 3\nrequest_header_timeout = \"30s\"\n";
    let (proxy, _backends) = start_with_settings(settings).await;
    // The readiness probes' connections are gone once the count is back to zero.
    let deadline = Instant::now() + PATIENCE;
    while common::metric(&proxy.metrics().await, "ficus_client_connections") > 0.0 {
        assert!(Instant::now() < deadline, "probe connections still counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(tokio::net::TcpStream::connect(proxy.addr).await.expect("connect"));
    }
    let metrics = proxy.wait_metric("ficus_client_connections", 3.0).await;
    assert_eq!(common::metric(&metrics, "ficus_client_connections_max"), 3.0);
    // Accepting pauses once the third connection took the last slot.
    proxy.wait_metric("ficus_client_connection_limit_reached_total", 1.0).await;

    // A fourth client waits in the backlog while three are open...
    let mut fourth = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");
    fourth
        .write_all(b"GET /home HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let early = tokio::time::timeout(Duration::from_secs(1), fourth.read_to_end(&mut answer)).await;
    assert!(early.is_err(), "answered beyond the limit: {}", String::from_utf8_lossy(&answer));

    // ...and is served as soon as one of them closes.
    silent.pop();
    tokio::time::timeout(PATIENCE, fourth.read_to_end(&mut answer))
        .await
        .expect("served once a connection closed")
        .expect("read");
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cap_the_file_limit_cannot_hold_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("dir");
    let (routes, settings) = (dir.path().join("routes.toml"), dir.path().join("proxy.toml"));
    let table = "[backends.a]\nurl = \"http://127.0.0.1:9\"\n[defaults]\nbackend = \"a\"\n";
    std::fs::write(&routes, table).expect("write");
    std::fs::write(&settings, "[proxy]\nmax_connections = 1000\n").expect("write");
    // A shell's `ulimit -n` sets the soft and the hard limit.
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 512 && exec \"$0\" proxy --config \"$1\" --routes \"$2\" --listen 127.0.0.1:0 --admin 127.0.0.1:0")
        .arg(env!("CARGO_BIN_EXE_ficus"))
        .arg(&settings)
        .arg(&routes)
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("proxy.max_connections = 1000 needs about 2256 open files"),
        "{stderr}"
    );
    assert!(stderr.contains("the hard file limit is 512"), "{stderr}");
}

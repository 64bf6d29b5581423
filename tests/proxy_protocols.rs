//! What the proxy forwards and how: HTTP/1.1 streaming, HTTP/2 (h2c and TLS), WebSocket,
//! forwarding headers, Host, and path rewriting.

mod common;

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use common::{client, start_ws_echo, Proxy, RouteFile, TestBackend};

fn routes(monolith: &TestBackend, orders_url: &str, extra: &str) -> String {
    RouteFile::split(&monolith.url(), orders_url)
        .orders_backend(extra)
        .percent(100.0)
        .route("rewrite = { strip_prefix = \"/api\" }")
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_host_and_rewrite() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let proxy = Proxy::start(&routes(&monolith, &format!("{}/v2", orders.url()), "")).await;
    let client = client();
    let body: Value = client
        .get(proxy.url("/api/orders/7?full=1"))
        .header("x-user-id", "u")
        .header("host", "shop.example.com")
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(body["backend"], "orders");
    assert_eq!(body["uri"], "/v2/orders/7?full=1", "strip_prefix, then the backend's path prefix");
    let headers = &body["headers"];
    assert_eq!(headers["host"], "shop.example.com", "the client's Host is kept");
    assert_eq!(headers["x-forwarded-host"], "shop.example.com");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");

    // The monolith gets the path untouched.
    let body: Value = client
        .get(proxy.url("/home?a=b"))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(body["backend"], "monolith");
    assert_eq!(body["uri"], "/home?a=b");
}

/// Reads from `stream` until `buffer` holds a whole header block and `body` bytes after it.
async fn read_message(stream: &mut tokio::net::TcpStream, body: usize) -> String {
    use tokio::io::AsyncReadExt;
    let mut buffer = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&buffer).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            if buffer.len() >= end + 4 + body {
                return text;
            }
        }
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await;
        let read = read.expect("a message in time").expect("read");
        assert!(read > 0, "closed before a whole message: {text:?}");
        buffer.extend_from_slice(&chunk[..read]);
    }
}

/// The header lines of a message, as written.
fn header_lines(message: &str) -> Vec<String> {
    let head = message.split("\r\n\r\n").next().unwrap_or_default();
    head.split("\r\n").skip(1).map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_names_keep_their_case_both_ways() {
    use tokio::io::AsyncWriteExt;
    // A backend that hands over each request as it arrived and answers with names in every
    // case, one of them twice.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend_addr = listener.local_addr().expect("addr");
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else { return };
        loop {
            let request = read_message(&mut stream, 0).await;
            let _ = seen_tx.send(request);
            let answer = "HTTP/1.1 200 OK\r\nX-Lower: a\r\nx-UPPER-mix: b\r\n\
                          Set-Cookie: a=1\r\nset-COOKIE: b=2\r\nContent-Length: 2\r\n\r\nok";
            if stream.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    });
    let routes = format!(
        "[backends.monolith]\nurl = \"http://{backend_addr}\"\n[defaults]\nbackend = \"monolith\"\n"
    );
    let proxy = Proxy::start(&routes).await;
    let mut client = tokio::net::TcpStream::connect(proxy.addr).await.expect("connect");

    // Names once each; one the proxy strips (X-Real-IP, not the last) and one it replaces
    // (Host, as the backend's): what is left keeps its case.
    let request = "GET /a HTTP/1.1\r\nHost: shop.example\r\nX-One: 1\r\nX-Real-IP: 6.6.6.6\r\n\
                   x-two: 2\r\nX-THREE: 3\r\nACCEPT: */*\r\n\r\n";
    client.write_all(request.as_bytes()).await.expect("write");
    let forwarded = header_lines(&seen_rx.recv().await.expect("a request"));
    for line in ["Host: shop.example", "X-One: 1", "x-two: 2", "X-THREE: 3", "ACCEPT: */*"] {
        assert!(forwarded.iter().any(|l| l == line), "{line:?} not in {forwarded:?}");
    }
    assert!(forwarded.iter().all(|l| !l.to_ascii_lowercase().starts_with("x-real-ip")));
    for name in ["X-Forwarded-Host: ", "X-Forwarded-Proto: ", "X-Forwarded-For: "] {
        assert!(forwarded.iter().any(|l| l.starts_with(name)), "{name:?} in {forwarded:?}");
    }
    let answer = header_lines(&read_message(&mut client, 2).await);
    for line in ["X-Lower: a", "x-UPPER-mix: b", "Content-Length: 2"] {
        assert!(answer.iter().any(|l| l == line), "{line:?} not in {answer:?}");
    }
    let cookies: Vec<_> =
        answer.iter().filter(|l| l.to_ascii_lowercase().starts_with("set-cookie")).collect();
    assert_eq!(cookies, ["Set-Cookie: a=1", "set-COOKIE: b=2"], "both, in order, as written");

    // A name twice, in two spellings: both kept, in order.
    let request = "GET /b HTTP/1.1\r\nHost: shop.example\r\nX-Dup: a\r\nX-Real-IP: 6.6.6.6\r\n\
                   x-DUP: b\r\nx-last: z\r\n\r\n";
    client.write_all(request.as_bytes()).await.expect("write");
    let forwarded = header_lines(&seen_rx.recv().await.expect("a request"));
    let dups: Vec<_> =
        forwarded.iter().filter(|l| l.to_ascii_lowercase().starts_with("x-dup")).collect();
    assert_eq!(dups, ["X-Dup: a", "x-DUP: b"], "in {forwarded:?}");
    assert!(forwarded.iter().any(|l| l == "x-last: z"), "in {forwarded:?}");
    assert!(forwarded.iter().all(|l| !l.to_ascii_lowercase().starts_with("x-real-ip")));
    let _ = read_message(&mut client, 2).await;
    backend.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preserve_host_false_sends_the_backend_host() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let proxy = Proxy::start(&routes(&monolith, &orders.url(), "preserve_host = false")).await;
    let body: Value = client()
        .get(proxy.url("/api/orders"))
        .header("host", "shop.example.com")
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(body["headers"]["host"], orders.addr.to_string());
    assert_eq!(body["headers"]["x-forwarded-host"], "shop.example.com");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_both_ways_without_being_buffered() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let proxy = Proxy::start(&routes(&monolith, &orders.url(), "")).await;
    // The client sends the next chunk only after the previous one came back through the
    // proxy: this can only finish if neither direction waits for a whole body.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let body = reqwest::Body::wrap_stream(tokio_stream_from(rx));
    let request = client().post(proxy.url("/echo")).body(body).send();
    tx.send(Ok(Bytes::from_static(b"chunk-0;"))).await.expect("send");
    let mut response = request.await.expect("response headers before the body ended");
    assert_eq!(response.headers()["x-backend"], "monolith");
    let mut echoed = Vec::new();
    for i in 1..=20 {
        while !echoed.ends_with(format!("chunk-{};", i - 1).as_bytes()) {
            let chunk = tokio::time::timeout(Duration::from_secs(10), response.chunk())
                .await
                .expect("echo of the last chunk arrives while the request is still open")
                .expect("chunk")
                .expect("not the end yet");
            echoed.extend_from_slice(&chunk);
        }
        if i < 20 {
            tx.send(Ok(Bytes::from(format!("chunk-{i};")))).await.expect("send");
        }
    }
    drop(tx);
    while let Some(chunk) = response.chunk().await.expect("chunk") {
        echoed.extend_from_slice(&chunk);
    }
    let expected: String = (0..20).map(|i| format!("chunk-{i};")).collect();
    assert_eq!(String::from_utf8(echoed).expect("utf8"), expected);

    // A large chunked upload comes back byte for byte.
    let big: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let response = client().post(proxy.url("/echo")).body(big.clone()).send().await.expect("post");
    assert_eq!(response.bytes().await.expect("body").as_ref(), big.as_slice());
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_proxy() {
    let monolith = TestBackend::start("monolith").await;
    let (ws_addr, _ws) = start_ws_echo().await;
    let proxy = Proxy::start(&routes(&monolith, &format!("http://{ws_addr}"), "")).await;
    let url = format!("ws://{}/api/orders/live", proxy.addr);
    let request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        url.as_str(),
    )
    .expect("request");
    let (mut ws, response) =
        tokio_tungstenite::connect_async(request).await.expect("websocket handshake through ficus");
    assert_eq!(response.status(), 101);
    for i in 0..10 {
        ws.send(Message::text(format!("hello {i}"))).await.expect("send");
        let echoed = ws.next().await.expect("echo").expect("message");
        assert_eq!(echoed.into_text().expect("text").as_str(), format!("hello {i}"));
    }
    ws.send(Message::binary(vec![1u8, 2, 3])).await.expect("send");
    assert_eq!(ws.next().await.expect("echo").expect("message").into_data().as_ref(), &[1, 2, 3]);
    ws.close(None).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cleartext_prior_knowledge() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let proxy = Proxy::start(&routes(&monolith, &orders.url(), "")).await;
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().expect("client");
    for path in ["/api/orders/1", "/home"] {
        let response =
            h2.get(proxy.url(path)).header("x-user-id", "u").send().await.expect("h2c request");
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["backend"], if path == "/home" { "monolith" } else { "orders" });
        // Whatever form the HTTP/2 request had, the HTTP/1.1 upstream gets an origin-form path.
        assert_eq!(body["uri"], if path == "/home" { "/home" } else { "/orders/1" });
        assert_eq!(body["headers"]["host"], proxy.addr.to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_over_tls_with_alpn() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let dir = tempfile::tempdir().expect("dir");
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).expect("write key");
    let proxy = Proxy::start_with(
        &routes(&monolith, &orders.url(), ""),
        &[
            "--tls-listen",
            "--tls-cert",
            cert_path.to_str().expect("path"),
            "--tls-key",
            key_path.to_str().expect("path"),
        ],
    )
    .await;
    let tls_addr = proxy.tls_addr.expect("tls address");
    let client = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).expect("root"),
        )
        .resolve("localhost", tls_addr)
        .build()
        .expect("client");
    let url = format!("https://localhost:{}/api/orders/1", tls_addr.port());
    let response = client.get(&url).header("x-user-id", "u").send().await.expect("https request");
    assert_eq!(response.version(), reqwest::Version::HTTP_2, "ALPN picks h2");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["backend"], "orders");
    assert_eq!(body["headers"]["x-forwarded-proto"], "https");

    let h1 = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).expect("root"),
        )
        .resolve("localhost", tls_addr)
        .http1_only()
        .build()
        .expect("client");
    let response = h1.get(&url).send().await.expect("https h1 request");
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    assert_eq!(response.status(), 200);
}

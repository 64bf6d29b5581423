//! Fallback to the legacy backend when the new one is down: refused connections and failing
//! health checks.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{backend_for, client, metric, Proxy, RouteFile, TestBackend, PATIENCE};

fn routes(monolith: &TestBackend, orders: &TestBackend, health: &str) -> String {
    RouteFile::split(&monolith.url(), &orders.url()).orders_backend(health).percent(100.0).build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_to_backend_falls_back_to_from_without_errors() {
    let (monolith, mut orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let proxy = Proxy::start(&routes(&monolith, &orders, "")).await;
    let client = client();
    assert_eq!(backend_for(&client, &proxy, "/api/orders/1", "a").await, "orders");

    orders.stop().await;
    for i in 0..50 {
        let user = format!("user-{i}");
        assert_eq!(backend_for(&client, &proxy, "/api/orders/1", &user).await, "monolith");
        let post = client
            .post(proxy.url("/api/orders"))
            .header("x-user-id", &user)
            .body("{\"item\": 1}")
            .send()
            .await
            .expect("post through proxy");
        assert_eq!(
            post.status(),
            200,
            "a POST falls back too: nothing was sent to the dead backend"
        );
        assert_eq!(post.headers()["x-backend"], "monolith");
    }
    let metrics = proxy.metrics().await;
    let fallbacks = metric(
        &metrics,
        r#"ficus_fallbacks_total{from="monolith",reason="connect_failed",route="orders",to="orders"}"#,
    );
    assert!(fallbacks >= 100.0, "fallbacks counted: {fallbacks}\n{metrics}");
    assert!(
        metric(&metrics, r#"ficus_upstream_connect_failures_total{backend="orders"}"#) >= 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_marked_down_by_health_checks_is_skipped_until_it_recovers() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let health = r#"health = { path = "/healthz", interval = "100ms", unhealthy_threshold = 2, healthy_threshold = 2 }"#;
    let proxy = Proxy::start(&routes(&monolith, &orders, health)).await;
    let client = client();
    assert_eq!(backend_for(&client, &proxy, "/api/orders/1", "a").await, "orders");

    orders.healthy.store(false, Ordering::Relaxed);
    wait_for_backend(&client, &proxy, "monolith").await;
    assert_eq!(proxy.routes_json().await["backends"][1]["up"], false);
    let metrics = proxy.metrics().await;
    assert!(
        metric(
            &metrics,
            r#"ficus_fallbacks_total{from="monolith",reason="unhealthy",route="orders",to="orders"}"#
        ) >= 1.0,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, r#"ficus_backend_up{backend="orders"}"#), 0.0);

    orders.healthy.store(true, Ordering::Relaxed);
    wait_for_backend(&client, &proxy, "orders").await;
}

/// Waits until a request of the route is served by `expected`, as health checks flip.
async fn wait_for_backend(client: &reqwest::Client, proxy: &Proxy, expected: &str) {
    let deadline = Instant::now() + PATIENCE;
    while backend_for(client, proxy, "/api/orders/1", "a").await != expected {
        assert!(Instant::now() < deadline, "never switched to {expected}:\n{}", proxy.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A listener whose accept queue is full: new connections are never accepted, so connecting
/// to it times out, as with a hung or overloaded host.
fn unresponsive_listener() -> (std::net::SocketAddr, Vec<std::net::TcpStream>, socket2::Socket) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket
        .bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().expect("addr").into())
        .expect("bind");
    socket.listen(0).expect("listen");
    let addr = socket.local_addr().expect("addr").as_socket().expect("inet");
    // Fill the accept queue; with nobody accepting, later handshakes get no answer.
    let mut fillers = Vec::new();
    for _ in 0..4 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(stream) => fillers.push(stream),
            Err(_) => break,
        }
    }
    (addr, fillers, socket)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_to_backend_that_times_out_on_connect_falls_back_to_from() {
    let monolith = TestBackend::start("monolith").await;
    let (hung, _fillers, _socket) = unresponsive_listener();
    let text = RouteFile::split(&monolith.url(), &format!("http://{hung}"))
        .orders_backend("connect_timeout = \"200ms\"")
        .percent(100.0)
        .build();
    let proxy = Proxy::start(&text).await;
    let client = client();
    for i in 0..3 {
        let started = Instant::now();
        assert_eq!(
            backend_for(&client, &proxy, "/api/orders/1", &format!("u{i}")).await,
            "monolith"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "fallback waited {:?}",
            started.elapsed()
        );
    }
    let metrics = proxy.metrics().await;
    let fallbacks = metric(
        &metrics,
        r#"ficus_fallbacks_total{from="monolith",reason="connect_failed",route="orders",to="orders"}"#,
    );
    assert_eq!(fallbacks, 3.0, "{metrics}");
}

//! The traffic split through the real binary: share, stickiness, monotonic growth, client ids
//! and overrides.

mod common;

use std::collections::HashMap;

use common::{backend_for, client, split_routes, Proxy, TestBackend};
use futures_util::stream::{self, StreamExt};

/// Sends `GET /api/orders/1` for each user, 16 at a time, and returns who served each.
async fn served_by(proxy: &Proxy, users: impl Iterator<Item = String>) -> HashMap<String, String> {
    let client = client();
    stream::iter(users)
        .map(|user| {
            let client = client.clone();
            async move {
                let backend = backend_for(&client, proxy, "/api/orders/1", &user).await;
                (user, backend)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_clients_split_within_one_point_of_percent() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let proxy = Proxy::start(&split_routes(&monolith, &orders, 25.0)).await;
    let served = served_by(&proxy, (0..10_000).map(|i| format!("client-{i}"))).await;
    let to_orders = served.values().filter(|b| *b == "orders").count();
    let share = to_orders as f64 / 100.0;
    eprintln!("figure: {share:.2}% of 10,000 clients went to orders at percent = 25");
    assert!((24.0..=26.0).contains(&share), "{share}% of clients went to orders, expected 25 +- 1");
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains(r#"ficus_requests_total{backend="orders",route="orders",status="2xx"}"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_stays_on_one_backend_across_twenty_requests() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let proxy = Proxy::start(&split_routes(&monolith, &orders, 50.0)).await;
    let client = client();
    let mut seen = [0, 0];
    for user in 0..200 {
        let user = format!("sticky-{user}");
        let first = backend_for(&client, &proxy, "/api/orders/1", &user).await;
        for _ in 1..20 {
            assert_eq!(
                backend_for(&client, &proxy, "/api/orders/7", &user).await,
                first,
                "{user} moved"
            );
        }
        seen[usize::from(first == "orders")] += 1;
    }
    assert!(seen[0] > 50 && seen[1] > 50, "both backends should get clients: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_percent_from_10_to_30_moves_no_client_back() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let proxy = Proxy::start(&split_routes(&monolith, &orders, 10.0)).await;
    let users = || (0..3_000).map(|i| format!("user-{i}"));
    let before = served_by(&proxy, users()).await;
    let version = proxy.version().await;
    proxy.write_routes(&split_routes(&monolith, &orders, 30.0));
    proxy.wait_version_change(&version).await;
    let after = served_by(&proxy, users()).await;
    let mut moved_forward = 0;
    for (user, was) in &before {
        let now = &after[user];
        assert!(
            !(was == "orders" && now == "monolith"),
            "{user} moved back from orders to monolith"
        );
        moved_forward += usize::from(was == "monolith" && now == "orders");
    }
    let share_after = after.values().filter(|b| *b == "orders").count() as f64 / 30.0;
    assert!((27.0..=33.0).contains(&share_after), "{share_after}%");
    assert!(
        moved_forward > 400,
        "about 20% of 3,000 clients should move forward, saw {moved_forward}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_key_gets_an_id_cookie_and_keeps_its_backend() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let proxy = Proxy::start(&split_routes(&monolith, &orders, 50.0)).await;
    let client = client();
    let mut both = [false, false];
    for _ in 0..40 {
        let first = client.get(proxy.url("/api/orders")).send().await.expect("request");
        let set_cookie = first.headers()["set-cookie"].to_str().expect("cookie").to_string();
        assert!(
            set_cookie.starts_with("ficus_id=") && set_cookie.contains("Path=/"),
            "{set_cookie}"
        );
        let id = set_cookie.split(';').next().expect("pair").to_string();
        let backend = first.headers()["x-backend"].to_str().expect("backend").to_string();
        both[usize::from(backend == "orders")] = true;
        for _ in 0..5 {
            let again = client
                .get(proxy.url("/api/orders/2"))
                .header("cookie", &id)
                .send()
                .await
                .expect("request");
            assert!(again.headers().get("set-cookie").is_none(), "a known client gets no new id");
            assert_eq!(again.headers()["x-backend"], backend.as_str());
        }
    }
    assert!(both[0] && both[1], "new clients should land on both backends at 50%");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_header_picks_from_or_to_and_ignores_others() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let proxy = Proxy::start(&split_routes(&monolith, &orders, 0.0)).await;
    let client = client();
    let with = |value: &'static str| {
        client
            .get(proxy.url("/api/orders/1"))
            .header("x-user-id", "u")
            .header("x-ficus-backend", value)
            .send()
    };
    assert_eq!(with("orders").await.expect("request").headers()["x-backend"], "orders");
    assert_eq!(with("monolith").await.expect("request").headers()["x-backend"], "monolith");
    assert_eq!(with("elsewhere").await.expect("request").headers()["x-backend"], "monolith");
    // Outside the route, an override names nothing the route allows: the default serves it.
    let other = client
        .get(proxy.url("/"))
        .header("x-ficus-backend", "orders")
        .send()
        .await
        .expect("request");
    assert_eq!(other.headers()["x-backend"], "monolith");
}

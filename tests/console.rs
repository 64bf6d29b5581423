//! What the cutover console reads from a running proxy: the last minutes of each route,
//! sampled every 5 seconds (`GET /history`).

mod common;

use std::time::{Duration, Instant};

use common::{client, split_routes_between, AppBackend, Proxy, Seen};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_shows_each_backends_rate_failures_and_the_mismatch_rate() {
    let answer = |name: &'static str| {
        move |seen: &Seen| {
            let status = if name == "orders" && seen.path.ends_with("/0") { 500 } else { 200 };
            (status, "application/json", json!({"backend": name}).to_string())
        }
    };
    let (monolith, orders) =
        (AppBackend::start(answer("monolith")).await, AppBackend::start(answer("orders")).await);
    let routes = split_routes_between(&monolith.url(), &orders.url(), 50.0) + "[routes.shadow]\n";
    let proxy = Proxy::start(&routes).await;

    let deadline = Instant::now() + Duration::from_secs(30);
    let point = loop {
        for id in 0..10 {
            let request = client()
                .get(proxy.url(&format!("/api/orders/{id}")))
                .header("x-user-id", format!("u{id}"));
            let _ = request.send().await.expect("request").bytes().await;
        }
        let history: Value = proxy.admin_get("/history/orders").await.json().await.expect("json");
        assert_eq!(history["interval_seconds"], 5);
        let points = history["routes"]["orders"].as_array().cloned().unwrap_or_default();
        if let Some(point) =
            points.iter().rev().find(|p| p["to"]["requests_per_second"].as_f64() > Some(0.0))
        {
            break point.clone();
        }
        assert!(Instant::now() < deadline, "no history point with traffic: {history}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(point["percent"], 50.0);
    assert!(point["from"]["requests_per_second"].as_f64() > Some(0.0), "{point}");
    assert!(point["to"]["p99_ms"].as_f64().is_some(), "{point}");
    // Every answer differs between the backends (each names itself).
    assert_eq!(point["mismatch_percent"], 100.0, "{point}");
}

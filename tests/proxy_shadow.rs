//! Shadow traffic through the real `ficus proxy`: requests of a shadowed route also go to the
//! backend that did not serve them, the answers are compared, and the client never notices.

mod common;

use std::time::{Duration, Instant};

use common::{
    client, split_routes_between, start_ws_echo, AppBackend, Proxy, Reply, Seen, PATIENCE,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// A route file: `/api/orders` from `monolith` to `orders` at `percent`, with `shadow` as
/// the body of its `[routes.shadow]`.
fn shadow_routes(monolith: &AppBackend, orders: &AppBackend, percent: f64, shadow: &str) -> String {
    let routes = split_routes_between(&monolith.url(), &orders.url(), percent);
    format!("{routes}[routes.shadow]\n{shadow}\n")
}

fn order_id(seen: &Seen) -> u64 {
    seen.path.rsplit('/').next().and_then(|id| id.parse().ok()).unwrap_or(0)
}

fn json_reply(body: Value) -> Reply {
    (200, "application/json", body.to_string())
}

/// Waits until the shadow results of route `orders` add up to `total`; returns them.
async fn wait_shadow_total(proxy: &Proxy, total: u64) -> Value {
    wait_route_total(proxy, "orders", total).await
}

async fn wait_route_total(proxy: &Proxy, route: &str, total: u64) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let path = format!("/shadow/{route}");
        let report: Value = proxy.admin_get(&path).await.json().await.expect("json");
        let counts = &report["counts"];
        let sum: u64 = ["match", "mismatch", "error", "skipped", "dropped"]
            .iter()
            .map(|k| counts[k].as_u64().unwrap_or(0))
            .sum();
        if sum >= total {
            return report;
        }
        assert!(Instant::now() < deadline, "shadow results never reached {total}: {report}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get(proxy: &Proxy, path: &str) -> (u16, Duration) {
    let started = Instant::now();
    let response =
        client().get(proxy.url(path)).header("x-user-id", "u1").send().await.expect("request");
    let status = response.status().as_u16();
    let _ = response.bytes().await.expect("body");
    (status, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatches_are_counted_exactly_and_equal_answers_match() {
    // The legacy answer; the new one writes the same in another form, except for orders 3
    // and 7, whose total it gets wrong.
    let monolith = AppBackend::start(|seen| {
        let id = order_id(seen);
        json_reply(json!({
            "id": id, "total": 12.5, "items": [{"sku": "a", "etag": "m1"}],
            "generated_at": format!("{:?}", Instant::now()),
        }))
    })
    .await;
    let orders = AppBackend::start(|seen| {
        let id = order_id(seen);
        let total = if id == 3 || id == 7 { "12.49" } else { "12.50" };
        let text = format!(
            r#"{{"generated_at": "later", "items": [{{"etag": "o9", "sku": "a"}}], "total": {total}, "id": {id}}}"#
        );
        (200, "application/json", text)
    })
    .await;
    let shadow = r#"ignore = ["/generated_at", "/items/*/etag"]"#;
    let proxy = Proxy::start(&shadow_routes(&monolith, &orders, 0.0, shadow)).await;

    for id in 1..=10 {
        let (status, _) = get(&proxy, &format!("/api/orders/{id}?token=secret")).await;
        assert_eq!(status, 200);
    }
    let report = wait_shadow_total(&proxy, 10).await;
    assert_eq!(report["counts"]["match"], 8, "{report}");
    assert_eq!(report["counts"]["mismatch"], 2, "{report}");
    assert_eq!(report["mismatch_rate_percent"], 20.0);
    assert_eq!(report["top_fields"][0]["field"], "/total");
    assert_eq!(report["top_fields"][0]["count"], 2);
    let mut paths: Vec<&str> = report["last_mismatches"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|m| m["path"].as_str())
        .collect();
    paths.sort_unstable();
    assert_eq!(paths, ["/api/orders/3", "/api/orders/7"], "no query string: {report}");
    let difference = &report["last_mismatches"][0]["differences"][0];
    assert_eq!(difference, &json!({"field": "/total", "from": "12.5", "to": "12.49"}));

    // Every shadow request was marked; the legacy backend served the clients alone.
    let shadowed = orders.seen();
    assert_eq!(shadowed.len(), 10);
    assert!(shadowed.iter().all(|s| s.headers.get("x-ficus-shadow").is_some_and(|v| v == "1")));
    assert_eq!(monolith.seen().len(), 10);
    let metrics = proxy.metrics().await;
    let series = r#"ficus_shadow_total{result="mismatch",route="orders"}"#;
    assert_eq!(common::metric(&metrics, series), 2.0, "{metrics}");
    let series = r#"ficus_shadow_differences_total{field="/total",route="orders"}"#;
    assert_eq!(common::metric(&metrics, series), 2.0, "{metrics}");
    let series = r#"ficus_shadow_duration_seconds_count{backend="orders",route="orders"}"#;
    assert_eq!(common::metric(&metrics, series), 10.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_the_legacy_service_varies_on_every_call_is_learnt_as_noise() {
    let nonce = |seen: &Seen| {
        let id = order_id(seen);
        json_reply(json!({"id": id, "nonce": format!("{:?}", Instant::now())}))
    };
    let monolith = AppBackend::start(nonce).await;
    let orders = AppBackend::start(nonce).await;
    // Clients already moved: the shadow goes to the legacy side, which is also asked twice.
    let routes = shadow_routes(&monolith, &orders, 100.0, "noise = true");
    let proxy = Proxy::start(&routes).await;
    for id in 1..=4 {
        assert_eq!(get(&proxy, &format!("/api/orders/{id}")).await.0, 200);
    }
    // An HTTP/2 client's request is shadowed over HTTP/1.1 like the others.
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().expect("client");
    let response = h2.get(proxy.url("/api/orders/5")).header("x-user-id", "u1").send().await;
    let response = response.expect("h2c request");
    assert_eq!(response.status(), 200);
    // Read to the end: a response dropped unread resets its stream, and ficus compares only
    // exchanges that completed (it counts a reset one as skipped).
    response.bytes().await.expect("h2c body");
    let report = wait_shadow_total(&proxy, 5).await;
    assert_eq!(report["counts"]["match"], 5, "{report}");
    assert_eq!(report["noise"], json!(["/nonce"]));
    assert_eq!(orders.seen().len(), 5);
    assert_eq!(monolith.seen().len(), 10, "a shadow and a second legacy request each");

    // Learnt noise stays while the route is unchanged, and starts over when it changes.
    let version = proxy.version().await;
    proxy.write_routes(&format!("{routes}\n[backends.spare]\nurl = \"http://127.0.0.1:9\"\n"));
    let version = proxy.wait_version_change(&version).await;
    let report: Value = proxy.admin_get("/shadow/orders").await.json().await.expect("json");
    assert_eq!(report["noise"], json!(["/nonce"]), "{report}");
    proxy.write_routes(&routes.replace("percent = 100", "percent = 99"));
    proxy.wait_version_change(&version).await;
    let report: Value = proxy.admin_get("/shadow/orders").await.json().await.expect("json");
    assert_eq!(report["noise"], json!([]), "{report}");
    assert_eq!(report["counts"]["match"], 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_dead_shadow_backend_changes_nothing_for_the_client() {
    let monolith = AppBackend::start(|seen| json_reply(json!({"id": order_id(seen)}))).await;
    let mut orders = AppBackend::start_slow(Duration::from_secs(2), |seen| {
        json_reply(json!({"id": order_id(seen)}))
    })
    .await;
    let shadow = |percent: u32| format!("percent = {percent}\nmax_in_flight = 4\ntimeout = \"5s\"");
    let routes = |percent| shadow_routes(&monolith, &orders, 0.0, &shadow(percent));
    let proxy = Proxy::start(&routes(0)).await;
    // The slowest of 20 requests, and whether they all took less than one shadow delay.
    let slowest_of_20 = || async {
        let (mut slowest, started) = (Duration::ZERO, Instant::now());
        for id in 1..=20 {
            let (status, took) = get(&proxy, &format!("/api/orders/{id}")).await;
            assert_eq!(status, 200);
            slowest = slowest.max(took);
        }
        (slowest, started.elapsed() < Duration::from_millis(1900))
    };
    let (unshadowed, _) = slowest_of_20().await;

    let version = proxy.version().await;
    proxy.write_routes(&routes(100));
    proxy.wait_version_change(&version).await;
    let (shadowed, all_within_one_shadow_delay) = slowest_of_20().await;
    assert!(
        shadowed < unshadowed + Duration::from_millis(100),
        "slowest request {shadowed:?} shadowed, {unshadowed:?} not"
    );
    let report = wait_shadow_total(&proxy, 20).await;
    if all_within_one_shadow_delay {
        assert_eq!(report["counts"]["dropped"], 16, "4 in flight at most: {report}");
    }

    orders.stop().await;
    for id in 1..=20 {
        assert_eq!(get(&proxy, &format!("/api/orders/{id}")).await.0, 200);
    }
    let report = wait_shadow_total(&proxy, 40).await;
    assert!(report["counts"]["error"].as_u64() > Some(0), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_shadowed_only_when_listed_with_the_same_body() {
    let echo = |seen: &Seen| (201, "text/plain", String::from_utf8_lossy(&seen.body).into_owned());
    let monolith = AppBackend::start(echo).await;
    let orders = AppBackend::start(echo).await;
    let proxy = Proxy::start(&shadow_routes(&monolith, &orders, 0.0, "")).await;
    let post = || {
        client()
            .post(proxy.url("/api/orders"))
            .header("x-user-id", "u1")
            .body("{\"sku\": \"a\"}")
            .send()
    };
    assert_eq!(post().await.expect("post").status(), 201);
    assert_eq!(get(&proxy, "/api/orders/1").await.0, 201);
    wait_shadow_total(&proxy, 1).await;
    let shadowed = orders.seen();
    assert_eq!(shadowed.len(), 1, "only the GET");
    assert_eq!(shadowed[0].method, "GET");

    let listed = shadow_routes(&monolith, &orders, 0.0, r#"methods = ["GET", "POST"]"#);
    let version = proxy.version().await;
    proxy.write_routes(&listed);
    proxy.wait_version_change(&version).await;
    assert_eq!(post().await.expect("post").status(), 201);
    let deadline = Instant::now() + PATIENCE;
    while orders.seen().len() < 2 {
        assert!(Instant::now() < deadline, "the POST was not shadowed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let post = &orders.seen()[1];
    assert_eq!((post.method.as_str(), &post.body[..]), ("POST", &b"{\"sku\": \"a\"}"[..]));
    assert_eq!(post.headers.get("x-ficus-shadow").map(|v| v.as_bytes()), Some(&b"1"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_download_an_event_stream_and_a_websocket_pass_intact_and_are_skipped() {
    const BIG: usize = 100 << 20;
    let monolith = AppBackend::start(|seen| match seen.path.as_str() {
        "/api/orders/events" => (200, "text/event-stream", "data: one\n\ndata: two\n\n".into()),
        _ => (200, "application/octet-stream", "x".repeat(BIG)),
    })
    .await;
    let orders = AppBackend::start(|_| (200, "application/octet-stream", String::new())).await;
    let (ws_addr, _ws) = start_ws_echo().await;
    let routes = format!(
        r#"{}
[backends.live]
url = "http://{ws_addr}"

[[routes]]
name = "live"
match = {{ path_prefix = "/live" }}
to = "live"
percent = 100
[routes.shadow]
"#,
        shadow_routes(&monolith, &orders, 0.0, "")
    );
    let proxy = Proxy::start(&routes).await;

    let body = client().get(proxy.url("/api/orders/big")).send().await.expect("get");
    let body = body.bytes().await.expect("download");
    assert_eq!(body.len(), BIG);
    assert!(body.iter().all(|&b| b == b'x'));
    let report = wait_shadow_total(&proxy, 1).await;
    assert_eq!(report["counts"]["skipped"], 1, "{report}");
    let events = client().get(proxy.url("/api/orders/events")).send().await.expect("get");
    assert_eq!(events.text().await.expect("events"), "data: one\n\ndata: two\n\n");
    let report = wait_shadow_total(&proxy, 2).await;
    assert_eq!(report["counts"]["skipped"], 2, "{report}");
    assert!(orders.seen().is_empty(), "neither a large answer nor a stream is replayed");

    let (mut ws, response) = tokio_tungstenite::connect_async(format!("ws://{}/live", proxy.addr))
        .await
        .expect("websocket through a shadowed route");
    assert_eq!(response.status(), 101);
    for i in 0..5 {
        ws.send(Message::text(format!("hello {i}"))).await.expect("send");
        let echoed = ws.next().await.expect("echo").expect("message");
        assert_eq!(echoed.into_text().expect("text").as_str(), format!("hello {i}"));
    }
    ws.close(None).await.expect("close");
    drop(ws);
    let report = wait_route_total(&proxy, "live", 1).await;
    assert_eq!(report["counts"]["skipped"], 1, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_by_max_in_flight_with_a_slow_shadow_backend() {
    const BODY: usize = 900 << 10;
    const REQUESTS: usize = 400;
    let reply = |_: &Seen| (200, "text/plain", "y".repeat(BODY));
    let monolith = AppBackend::start(reply).await;
    let orders = AppBackend::start_slow(Duration::from_secs(1), reply).await;
    let shadow = "max_in_flight = 8\nmax_body = \"1MiB\"";
    let proxy = Proxy::start(&shadow_routes(&monolith, &orders, 0.0, shadow)).await;
    let before = common::peak_rss_kib(proxy.pid());

    let (proxy_url, client) = (proxy.url("/api/orders/1"), client());
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let (url, client) = (proxy_url.clone(), client.clone());
        tasks.spawn(async move {
            for _ in (worker..REQUESTS).step_by(16) {
                let response =
                    client.get(&url).header("x-user-id", "u1").send().await.expect("get");
                assert_eq!(response.bytes().await.expect("body").len(), BODY);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("client task");
    }
    let report = wait_shadow_total(&proxy, REQUESTS as u64).await;
    let peak = common::peak_rss_kib(proxy.pid());
    eprintln!("ficus peak RSS: {before} KiB at start, {peak} KiB after {REQUESTS} shadowed 900 KiB answers: {report}");
    assert!(report["counts"]["dropped"].as_u64() > Some(0), "{report}");
    // 8 captures of at most 1 MiB each (and the same again for shadow answers) on top of
    // the start: far below the 350 MiB that keeping every answer would take.
    assert!(peak < before + 100 * 1024, "peak RSS {peak} KiB from {before} KiB at start");
}

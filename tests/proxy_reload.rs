//! Live reload through the real binary: under load, on invalid edits, by SIGHUP and by the
//! admin API.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{client, split_routes, Proxy, TestBackend};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_sustained_load_fail_no_request() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let proxy = Arc::new(Proxy::start(&split_routes(&monolith, &orders, 5.0)).await);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut workers = Vec::new();
    for worker in 0..8 {
        let (proxy, stop, ok, failed) = (proxy.clone(), stop.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            let client = client();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let path = if i % 2 == 0 { "/api/orders/1" } else { "/home" };
                let body = "x".repeat(i % 1000);
                let result = client
                    .post(proxy.url(path))
                    .header("x-user-id", format!("w{worker}-{}", i % 50))
                    .body(body)
                    .send()
                    .await;
                match result {
                    Ok(response) if response.status() == 200 => {
                        response.bytes().await.expect("body");
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(response) => {
                        eprintln!("status {}", response.status());
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("error {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let mut version = proxy.version().await;
    for step in 0..10 {
        let percent = [10.0, 30.0, 60.0, 90.0, 99.0][step % 5];
        proxy.write_routes(&split_routes(&monolith, &orders, percent + step as f64 / 100.0));
        version = proxy.wait_version_change(&version).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.expect("worker");
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("figure: {ok} requests, {failed} failed, across 10 reloads under load");
    assert_eq!(failed, 0, "{failed} requests failed during reloads ({ok} succeeded)");
    assert!(ok > 500, "too little load to mean anything: {ok} requests");
    let metrics = proxy.metrics().await;
    assert!(metrics.contains(r#"ficus_reloads_total{result="ok",trigger="file"} 10"#), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_edit_keeps_the_old_table_serving() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let proxy = Proxy::start(&split_routes(&monolith, &orders, 100.0)).await;
    let version = proxy.version().await;
    let broken =
        split_routes(&monolith, &orders, 100.0).replace("to = \"orders\"", "to = \"ordres\"");
    proxy.write_routes(&broken);
    let error = proxy.wait_reload_error().await;
    let message = error["errors"][0].as_str().expect("error text");
    assert!(message.contains("routes[0] \"orders\": to: unknown backend \"ordres\""), "{message}");
    assert_eq!(proxy.version().await, version);
    let client = client();
    for user in 0..20 {
        let response = client
            .get(proxy.url("/api/orders"))
            .header("x-user-id", user.to_string())
            .send()
            .await
            .expect("request");
        assert_eq!(
            response.headers()["x-backend"],
            "orders",
            "the old table (100% to orders) must still serve"
        );
    }
    let metrics = proxy.metrics().await;
    assert!(
        common::metric(&metrics, r#"ficus_reloads_total{result="error",trigger="file"}"#) >= 1.0,
        "{metrics}"
    );
    assert!(proxy.logs().contains("unknown backend"), "the error is logged");

    // A later good edit clears the error.
    proxy.write_routes(&split_routes(&monolith, &orders, 0.0));
    proxy.wait_version_change(&version).await;
    assert!(proxy.routes_json().await["last_reload_error"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_admin_reload_apply_an_edit_without_watching() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let proxy = Proxy::start(&split_routes(&monolith, &orders, 0.0)).await;
    let version = proxy.version().await;

    // Written in place, the way `echo > file` does.
    std::fs::write(&proxy.routes, split_routes(&monolith, &orders, 100.0)).expect("write");
    let status = std::process::Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let version = proxy.wait_version_change(&version).await;
    assert_eq!(proxy.routes_json().await["routes"][0]["percent"], 100.0);

    std::fs::write(&proxy.routes, split_routes(&monolith, &orders, 42.5)).expect("write");
    let reply: serde_json::Value = proxy.admin_post("/reload").await.json().await.expect("json");
    assert!(reply["result"] == "ok" || reply["result"] == "unchanged", "{reply}");
    proxy.wait_version_change(&version).await;
    assert_eq!(proxy.routes_json().await["routes"][0]["percent"], 42.5);

    std::fs::write(&proxy.routes, "[broken").expect("write");
    let response = proxy.admin_post("/reload").await;
    assert_eq!(response.status(), 422);
    let reply: serde_json::Value = response.json().await.expect("json");
    assert_eq!(reply["result"], "error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_shows_table_and_metrics() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let proxy = Proxy::start(&split_routes(&monolith, &orders, 25.0)).await;
    assert_eq!(proxy.admin_get("/healthz").await.status(), 200);
    let routes = proxy.routes_json().await;
    assert_eq!(routes["routes"][0]["name"], "orders");
    assert_eq!(routes["routes"][0]["percent"], 25.0);
    assert_eq!(routes["default_backend"], "monolith");
    assert!(routes["loaded_at"].as_str().expect("loaded_at").ends_with('Z'));
    assert_eq!(routes["version"].as_str().expect("version").len(), 16);
    client()
        .get(proxy.url("/api/orders"))
        .header("x-ficus-backend", "monolith")
        .send()
        .await
        .expect("request");
    // Requests are counted in the logging phase, just after the response went out. A scrape
    // reads one family after another, so it can catch the request in one and not yet in the
    // next: wait for the last one recorded.
    proxy
        .wait_metric(r#"ficus_requests_total{backend="monolith",route="orders",status="2xx"}"#, 1.0)
        .await;
    let metrics = proxy
        .wait_metric(
            r#"ficus_request_duration_seconds_count{backend="monolith",route="orders"}"#,
            1.0,
        )
        .await;
    for family in [
        "ficus_requests_total",
        "ficus_request_duration_seconds_bucket",
        "ficus_upstream_connect_failures_total",
        "ficus_fallbacks_total",
        "ficus_reloads_total",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {family}")) || metrics.contains(family),
            "{family} missing:\n{metrics}"
        );
    }
    assert_eq!(proxy.admin_get("/nope").await.status(), 404);
}

/// Kubernetes updates a mounted ConfigMap by writing a new timestamped directory and swapping
/// the `..data` symlink to it; the route file itself is a symlink through `..data`.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_style_symlink_swap_is_reloaded() {
    use std::os::unix::fs::symlink;
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let proxy = Proxy::start(&split_routes(&monolith, &orders, 0.0)).await;
    let version = proxy.version().await;
    // Turn the fixture's plain file into the ConfigMap layout, then reload to point at it.
    let dir = proxy.dir.path();
    let first = dir.join("..2026_11_26_01");
    std::fs::create_dir(&first).expect("mkdir");
    std::fs::write(first.join("routes.toml"), split_routes(&monolith, &orders, 20.0))
        .expect("write");
    symlink("..2026_11_26_01", dir.join("..data")).expect("symlink ..data");
    std::fs::remove_file(&proxy.routes).expect("rm");
    symlink("..data/routes.toml", &proxy.routes).expect("symlink routes.toml");
    let version = proxy.wait_version_change(&version).await;
    assert_eq!(proxy.routes_json().await["routes"][0]["percent"], 20.0);

    // The update: new directory, new symlink, renamed over `..data` atomically.
    let second = dir.join("..2026_11_26_02");
    std::fs::create_dir(&second).expect("mkdir");
    std::fs::write(second.join("routes.toml"), split_routes(&monolith, &orders, 70.0))
        .expect("write");
    symlink("..2026_11_26_02", dir.join("..data_tmp")).expect("symlink");
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap ..data");
    proxy.wait_version_change(&version).await;
    assert_eq!(proxy.routes_json().await["routes"][0]["percent"], 70.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_names_route_and_backend() {
    let (monolith, orders) =
        (TestBackend::start("monolith").await, TestBackend::start("orders").await);
    let proxy =
        Proxy::start_with(&split_routes(&monolith, &orders, 100.0), &["--log-format", "json"])
            .await;
    let response = client()
        .get(proxy.url("/api/orders/9"))
        .header("x-user-id", "u")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let deadline = std::time::Instant::now() + common::PATIENCE;
    let line = loop {
        let logs = proxy.logs();
        if let Some(line) = logs.lines().find(|l| l.contains("/api/orders/9")) {
            break line.to_string();
        }
        assert!(std::time::Instant::now() < deadline, "no access log line:\n{logs}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let entry: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(entry["target"], "ficus::access");
    assert_eq!(entry["route"], "orders");
    assert_eq!(entry["backend"], "orders");
    assert_eq!(entry["status"], 200);
    assert_eq!(entry["method"], "GET");
}

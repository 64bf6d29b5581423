//! The cutover console of a running proxy: the page itself in a real headless Chromium, and
//! the history it charts (`GET /history`, each route sampled every 5 seconds).

mod common;

use std::time::{Duration, Instant};

use common::browser::{artifacts_dir, Browser, Page};
use common::{client, split_routes_between, AppBackend, Proxy, Seen};
use serde_json::{json, Value};

/// The console test's route file: `orders / v2` (a name that needs escaping in a URL) ramped
/// (10, 50, 100 %, held an hour per step) and shadowed, `users` at a fixed `users_percent`.
fn console_routes(monolith: &str, orders: &str, users_percent: f64) -> String {
    let ramp = "[routes.ramp]\nsteps = [10, 50, 100]\nhold = \"1h\"\nmin_requests = 100\n[routes.shadow]\n";
    let users = format!(
        "\n[[routes]]\nname = \"users\"\nmatch = {{ path_prefix = \"/api/users\" }}\n\
         to = \"orders\"\npercent = {users_percent}\n"
    );
    split_routes_between(monolith, orders, 0.0)
        .replace("percent = 0\n", ramp)
        .replace("name = \"orders\"", &format!("name = \"{ORDERS}\""))
        + &users
}

const ORDERS: &str = "orders / v2";

/// The card of route `name`.
fn card(name: &str) -> String {
    format!("[data-route={}]", json!(name))
}

/// Settings with the admin token `s3cret`, written in `dir`.
fn token_settings(dir: &std::path::Path) -> String {
    let token = dir.join("token");
    std::fs::write(&token, "s3cret\n").expect("token");
    let file = dir.join("proxy.toml");
    let text = format!(
        "[proxy]\nstate = \"file:{}\"\nadmin_token_file = \"{}\"\n",
        dir.join("ramp.json").display(),
        token.display()
    );
    std::fs::write(&file, text).expect("settings");
    file.display().to_string()
}

/// Requests from 20 clients to each route.
async fn traffic(proxy: &Proxy) {
    for id in 0..20 {
        for path in ["/api/orders/7", "/api/users/7"] {
            let request = client().get(proxy.url(path)).header("x-user-id", format!("u{id}"));
            let _ = request.send().await.expect("request").bytes().await;
        }
    }
}

/// The percent a route's card shows.
async fn shown_percent(page: &Page<'_>, route: &str) -> String {
    page.text(&format!("{} .percent", card(route))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_every_route_live_and_its_buttons_act_on_the_proxy() {
    let answer = |name: &'static str, total: u32| {
        move |_: &Seen| {
            (200, "application/json", json!({"backend": name, "total": total}).to_string())
        }
    };
    let (monolith, orders) = (
        AppBackend::start(answer("monolith", 10)).await,
        AppBackend::start(answer("orders", 12)).await,
    );
    let settings_dir = tempfile::tempdir().expect("settings dir");
    let routes = console_routes(&monolith.url(), &orders.url(), 25.0);
    let proxy =
        Proxy::start_with(&routes, &["--config", &token_settings(settings_dir.path())]).await;
    traffic(&proxy).await;

    let browser = Browser::start().await;
    let page = browser.open(&format!("http://{}/", proxy.admin), 1280, 800).await;
    page.wait_for("document.querySelectorAll('article.route').length === 2").await;
    // Every route with the percent the proxy has.
    let table = proxy.routes_json().await;
    for route in table["routes"].as_array().expect("routes") {
        let (name, percent) = (route["name"].as_str().expect("name"), &route["percent"]);
        let expected = format!("{}%", percent.as_f64().expect("percent"));
        assert_eq!(shown_percent(&page, name).await, expected, "{name}: {route}");
    }
    assert_eq!(page.text("#version").await, table["version"].as_str().expect("version"));
    assert!(page.text(&format!("{} .state", card(ORDERS))).await.contains("RAMPING"));
    assert!(page.text(&format!("{} .state", card("users"))).await.contains("FIXED"));

    // The mismatch the test produces (the two backends disagree on `total`), and the charts,
    // which need two samples.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        traffic(&proxy).await;
        let shown = page.text(&format!("{} .shadow", card(ORDERS))).await;
        let paths = json!(format!("{} svg path", card(ORDERS)));
        let charts = page.eval(&format!("document.querySelectorAll({paths}).length")).await;
        if shown.contains("/total") && shown.contains("10 → 12") && charts.as_u64() > Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "no mismatch or chart shown: {shown}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rate =
        page.eval("document.querySelector('[data-mismatch-rate]').dataset.mismatchRate").await;
    assert_eq!(rate, "100", "every comparison differs");
    assert!(page.text(&format!("{} table", card(ORDERS))).await.contains("req/s"));
    assert_eq!(browser.errors(), Vec::<String>::new(), "the page reported errors");

    let artifacts = artifacts_dir();
    page.screenshot(&artifacts.join("console-1280x800.png")).await;
    page.resize(390, 844).await;
    let overflow = page.eval("document.documentElement.scrollWidth").await;
    assert!(overflow.as_u64() <= Some(390), "the page is wider than a phone: {overflow}");
    page.screenshot(&artifacts.join("console-390x844.png")).await;
    page.resize(1280, 800).await;

    // A rejected route file shows in red; a good edit shows within 3 seconds.
    proxy.write_routes("[[routes]]\nname = \"broken\"\n");
    page.wait_for("!document.getElementById('reload-error').hidden").await;
    assert!(page.text("#reload-error").await.contains("rejected"));
    let version = proxy.version().await;
    proxy.write_routes(&console_routes(&monolith.url(), &orders.url(), 60.0));
    let edited = Instant::now();
    let users = json!(format!("{} .percent", card("users")));
    page.wait_for_within(
        &format!("document.querySelector({users})?.textContent === '60%'"),
        Duration::from_secs(3),
    )
    .await;
    let shown_after = edited.elapsed();
    assert_ne!(proxy.version().await, version);
    page.wait_for("document.getElementById('reload-error').hidden").await;
    assert!(page.text("#reload-list").await.contains("ERROR"), "the failed reload is listed");

    // Rollback without the token: refused, with the reason, and nothing changes.
    let rollback = &format!("{} button[data-command=rollback]", card(ORDERS));
    page.click(rollback).await;
    page.wait_for("document.getElementById('token-dialog').open").await;
    page.click("#token-send").await;
    page.wait_for("document.getElementById('answer').textContent.includes('REFUSED')").await;
    let refusal = page.text("#answer").await;
    assert!(refusal.contains("401") && refusal.contains("Authorization: Bearer"), "{refusal}");
    assert_eq!(proxy.routes_json().await["routes"][0]["percent"], 10.0);

    // With the token: the route goes back to 0% on the proxy, and the page says so.
    page.click(rollback).await;
    page.wait_for("document.getElementById('token-dialog').open").await;
    page.click("#token-input").await;
    page.type_text("s3cret").await;
    page.click("#token-send").await;
    page.wait_for("document.getElementById('answer').textContent.includes('DONE')").await;
    let route = &proxy.routes_json().await["routes"][0];
    assert_eq!(
        (route["percent"].as_f64(), route["ramp"]["status"].as_str()),
        (Some(0.0), Some("rolled_back"))
    );
    let (percent, state) =
        (json!(format!("{} .percent", card(ORDERS))), json!(format!("{} .state", card(ORDERS))));
    page.wait_for(&format!(
        "document.querySelector({percent}).textContent === '0%' && \
         document.querySelector({state}).textContent === 'ROLLED BACK'"
    ))
    .await;

    // The only error is the browser's note of the refused write.
    for error in browser.errors() {
        assert!(
            error.contains("401") && error.contains("/routes/orders%20%2F%20v2/rollback"),
            "{error}"
        );
    }
    eprintln!(
        "console: route-file edit shown in {shown_after:?}; screenshots in {}",
        artifacts.display()
    );
}

#[tokio::test]
async fn the_page_is_self_contained_and_cannot_be_framed() {
    let proxy =
        Proxy::start(&split_routes_between("http://127.0.0.1:9", "http://127.0.0.1:9", 5.0)).await;
    let page = proxy.admin_get("/").await;
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    let csp = headers["content-security-policy"].to_str().expect("csp");
    assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(headers["x-frame-options"], "DENY");
    assert!(headers["content-type"].to_str().expect("type").starts_with("text/html"));
    let html = page.text().await.expect("html");
    for asset in ["/console.js", "/console.css"] {
        assert!(html.contains(&format!("\"{}\"", &asset[1..])), "{asset} not linked");
        let response = proxy.admin_get(asset).await;
        assert_eq!(response.status(), 200, "{asset}");
        let text = response.text().await.expect("asset");
        // Nothing is loaded from elsewhere (the SVG namespace is a name, not a load).
        let external = text.replace("http://www.w3.org/2000/svg", "");
        assert!(!external.contains("http://") && !external.contains("https://"), "{asset}");
    }
    assert!(!html.contains("http://") && !html.contains("https://"));
}

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

/// Draws the README's screenshots (`docs/console.png`, `docs/console-phone.png`): after three
/// minutes of traffic, `orders` ramping with shadow comparisons (a sixth of its answers
/// disagree on the type of `total`), `customers` moved for good, and `payments`, whose new
/// service is down, falling back. Run by hand:
/// `cargo test --test console -- --ignored readme_screenshots`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "takes three minutes and rewrites docs/; run by hand"]
async fn readme_screenshots() {
    let id = |seen: &Seen| -> u64 {
        seen.path.rsplit('/').next().and_then(|id| id.parse().ok()).unwrap_or(0)
    };
    let monolith = AppBackend::start(move |seen: &Seen| {
        let body = json!({"id": id(seen), "total": "12.50", "status": "paid"});
        (200, "application/json", body.to_string())
    })
    .await;
    let orders = AppBackend::start_slow(Duration::from_millis(2), move |seen: &Seen| {
        let id = id(seen);
        let total = if id % 10 == 1 { json!(12.5) } else { json!("12.50") };
        let status = if id % 400 == 7 { 500 } else { 200 };
        (
            status,
            "application/json",
            json!({"id": id, "total": total, "status": "paid"}).to_string(),
        )
    })
    .await;
    let payments_down = common::free_addr();
    let routes = format!(
        r#"
[backends.monolith]
url = "{monolith}"
[backends.orders]
url = "{orders}"
health = {{ path = "/healthz", interval = "2s" }}
[backends.payments]
url = "http://{payments_down}"
health = {{ path = "/healthz", interval = "2s" }}

[defaults]
backend = "monolith"
sticky = "header:x-user-id"

[[routes]]
name = "orders"
match = {{ path_prefix = "/api/orders" }}
to = "orders"
[routes.ramp]
steps = [5, 25, 50, 100]
hold = "45s"
min_requests = 60
max_error_rate = 2.0
max_mismatch_rate = 30.0
[routes.shadow]
percent = 50

[[routes]]
name = "customers"
match = {{ path_prefix = "/api/customers" }}
to = "orders"
percent = 100

[[routes]]
name = "payments"
match = {{ path_prefix = "/api/payments" }}
to = "payments"
percent = 20
"#,
        monolith = monolith.url(),
        orders = orders.url(),
    );
    let settings_dir = tempfile::tempdir().expect("settings dir");
    let proxy =
        Proxy::start_with(&routes, &["--config", &token_settings(settings_dir.path())]).await;
    let browser = Browser::start().await;
    let page = browser.open(&format!("http://{}/", proxy.admin), 1280, 800).await;

    let until = Instant::now() + Duration::from_secs(180);
    let mut n: u64 = 0;
    while Instant::now() < until {
        for path in ["orders", "orders", "orders", "customers", "payments"] {
            n += 1;
            let request = client()
                .get(proxy.url(&format!("/api/{path}/{}", n % 1000)))
                .header("x-user-id", format!("user-{}", n % 400));
            let _ = request.send().await.expect("request").bytes().await;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    page.wait_for("document.querySelectorAll('article.route').length === 3").await;
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    page.screenshot(&docs.join("console.png")).await;
    page.resize(390, 844).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    page.screenshot(&docs.join("console-phone.png")).await;
    assert_eq!(browser.errors(), Vec::<String>::new());
}

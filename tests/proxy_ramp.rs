//! Automatic ramps through the real `ficus proxy`: a route walks its steps while `to` is as
//! healthy as `from`, rolls back on a breach, and stays rolled back across a restart until
//! an operator resumes it.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{client, ficus, split_routes_between, AppBackend, Proxy, Seen};
use serde_json::{json, Value};

/// Each backend names itself in its JSON body.
async fn named(name: &'static str) -> AppBackend {
    AppBackend::start(move |_: &Seen| {
        (200, "application/json", json!({"backend": name}).to_string())
    })
    .await
}

/// The route file: `/api/orders` from `monolith` to `orders`, ramped by `ramp`.
fn ramp_routes(monolith: &AppBackend, orders: &AppBackend, ramp: &str) -> String {
    split_routes_between(&monolith.url(), &orders.url(), 0.0)
        .replace("percent = 0\n", &format!("[routes.ramp]\n{ramp}\n"))
}

/// One request per client; the backend each client got.
async fn one_round(proxy: &Proxy, clients: usize) -> Vec<String> {
    let mut backends = Vec::with_capacity(clients);
    for client_id in 0..clients {
        let response = client()
            .get(proxy.url("/api/orders/1"))
            .header("x-user-id", format!("c{client_id}"))
            .send()
            .await
            .expect("request");
        let body: Value = response.json().await.unwrap_or(Value::Null);
        backends.push(body["backend"].as_str().unwrap_or("(failed)").to_string());
    }
    backends
}

async fn ramp_of(proxy: &Proxy) -> Value {
    proxy.routes_json().await["routes"][0]["ramp"].clone()
}

/// Settings with the ramp state in `state` (`file:...` or `postgres://...`, kept across
/// restarts) and the admin token `s3cret`, written in `dir`.
fn settings_with_state(dir: &std::path::Path, state: &str) -> String {
    let token = dir.join("token");
    std::fs::write(&token, "s3cret\n").expect("token");
    let file = dir.join("proxy.toml");
    let text =
        format!("[proxy]\nstate = \"{state}\"\nadmin_token_file = \"{}\"\n", token.display());
    std::fs::write(&file, text).expect("settings");
    file.display().to_string()
}

/// [`settings_with_state`] with a state file in `dir`.
fn settings(dir: &std::path::Path) -> String {
    settings_with_state(dir, &format!("file:{}", dir.join("ramp.json").display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_route_walks_every_step_and_no_client_ever_moves_back() {
    let (monolith, orders) = (named("monolith").await, named("orders").await);
    let ramp = "steps = [10, 50, 100]\nhold = \"1s\"\nmin_requests = 20\nmax_error_rate = 1.0";
    let proxy = Proxy::start(&ramp_routes(&monolith, &orders, ramp)).await;
    assert_eq!(ramp_of(&proxy).await["percent"], 10.0);

    let mut moved: HashMap<usize, bool> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for (client_id, backend) in one_round(&proxy, 50).await.into_iter().enumerate() {
            let on_to = backend == "orders";
            assert!(backend == "orders" || backend == "monolith", "{backend}");
            let was = moved.insert(client_id, on_to).unwrap_or(false);
            assert!(!was || on_to, "client c{client_id} moved back while the ramp advanced");
        }
        let ramp = ramp_of(&proxy).await;
        if ramp["status"] == "done" {
            assert_eq!(ramp["percent"], 100.0);
            break;
        }
        assert!(Instant::now() < deadline, "ramp not done in 60 s: {ramp}");
    }
    assert!(moved.values().all(|&on_to| on_to), "every client ends on `to`");
    let logs = proxy.logs();
    assert_eq!(logs.matches("ramp transition").count(), 3, "{logs}");
    assert!(logs.contains("10% held for"), "transitions carry their figures:\n{logs}");
    let metrics = proxy.metrics().await;
    assert_eq!(common::metric(&metrics, "ficus_route_percent{route=\"orders\"}"), 100.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_of_to_roll_back_within_seconds_until_an_operator_resumes() {
    let monolith = named("monolith").await;
    // One answer in twenty (5%) of the new service is a 500.
    let calls = Arc::new(AtomicU64::new(0));
    let orders = AppBackend::start(move |_: &Seen| {
        if calls.fetch_add(1, Ordering::Relaxed) % 20 == 19 {
            (500, "text/plain", "boom".into())
        } else {
            (200, "application/json", json!({"backend": "orders"}).to_string())
        }
    })
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let settings = settings(dir.path());
    let ramp = "steps = [50, 100]\nhold = \"1h\"\nmin_requests = 20\nmax_error_rate = 1.0";
    let routes = ramp_routes(&monolith, &orders, ramp);
    let proxy = Proxy::start_with(&routes, &["--config", &settings]).await;

    let started = Instant::now();
    let ramp = loop {
        one_round(&proxy, 20).await;
        let ramp = ramp_of(&proxy).await;
        if ramp["status"] == "rolled_back" {
            break ramp;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "no rollback: {ramp}");
    };
    assert!(started.elapsed() < Duration::from_secs(5), "rollback took {:?}", started.elapsed());
    assert_eq!(ramp["percent"], 0.0);
    assert!(ramp["reason"].as_str().is_some_and(|r| r.contains("`to` failed")), "{ramp}");
    assert!(one_round(&proxy, 20).await.iter().all(|b| b == "monolith"), "everyone back on `from`");

    // A restart keeps the rollback.
    let routes_file = std::fs::read_to_string(&proxy.routes).expect("routes");
    drop(proxy);
    let proxy = Proxy::start_with(&routes_file, &["--config", &settings]).await;
    assert_eq!(ramp_of(&proxy).await["status"], "rolled_back");
    assert!(one_round(&proxy, 20).await.iter().all(|b| b == "monolith"));

    // Only an operator resumes it, with the token.
    let resume = format!("http://{}/routes/orders/resume", proxy.admin);
    let post = |token: Option<&str>| {
        let request = client().post(&resume).header("content-type", "application/json");
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
        .send()
    };
    assert_eq!(post(None).await.expect("post").status(), 401);
    assert_eq!(post(Some("wrong")).await.expect("post").status(), 401);
    assert_eq!(ramp_of(&proxy).await["status"], "rolled_back", "nothing changed");

    // The CLI shows why, and resumes with the token.
    let admin = format!("http://{}", proxy.admin);
    let status =
        ficus().args(["ramp", "status", "orders", "--admin", &admin]).output().expect("run");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.starts_with("orders: rolled_back at 0.0% (monolith -> orders), steps 50.0, 100.0"),
        "{text}"
    );
    assert!(text.contains("last transition: breach over the last window: `to` failed"), "{text}");
    let token = dir.path().join("token");
    let token = token.to_str().expect("path");
    let resume = ["ramp", "resume", "orders", "--admin", &admin, "--token-file", token];
    let output = ficus().args(resume).output().expect("run");
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.starts_with("orders: ramping at 50.0%: resumed by an operator"), "{text}");
    assert_eq!(ramp_of(&proxy).await["percent"], 50.0);
    let again = ficus().args(resume).output().expect("run");
    assert_eq!(again.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("409 Conflict: cannot resume: the ramp is ramping"), "{stderr}");
    let reload = client()
        .post(format!("http://{}/reload", proxy.admin))
        .header("content-type", "application/json")
        .send()
        .await
        .expect("reload");
    assert_eq!(reload.status(), 401, "POST /reload follows the same rule");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_little_traffic_never_advances_and_says_why() {
    let (monolith, orders) = (named("monolith").await, named("orders").await);
    let ramp = "steps = [10, 100]\nhold = \"1s\"\nmin_requests = 1000";
    let proxy = Proxy::start(&ramp_routes(&monolith, &orders, ramp)).await;
    one_round(&proxy, 30).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ramp = ramp_of(&proxy).await;
    assert_eq!((ramp["status"].as_str(), ramp["percent"].as_f64()), (Some("ramping"), Some(10.0)));
    let waiting = ramp["waiting"].as_str().unwrap_or_default();
    assert!(
        waiting.starts_with("too little traffic:")
            && waiting.ends_with("of 1000 answers from `to` on this step"),
        "{ramp}"
    );
}

/// Sends rounds of traffic until the ramp rolls back; its reason.
async fn wait_rollback(proxy: &Proxy) -> String {
    let started = Instant::now();
    loop {
        one_round(proxy, 20).await;
        let ramp = ramp_of(proxy).await;
        if ramp["status"] == "rolled_back" {
            return ramp["reason"].as_str().unwrap_or_default().to_string();
        }
        assert!(started.elapsed() < Duration::from_secs(15), "no rollback: {ramp}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slower_to_rolls_back_on_p99() {
    let monolith = named("monolith").await;
    let orders = AppBackend::start_slow(Duration::from_millis(30), |_: &Seen| {
        (200, "application/json", json!({"backend": "orders"}).to_string())
    })
    .await;
    let ramp = "steps = [50, 100]\nhold = \"1h\"\nmin_requests = 20\nmax_p99_ratio = 1.5";
    let proxy = Proxy::start(&ramp_routes(&monolith, &orders, ramp)).await;
    let reason = wait_rollback(&proxy).await;
    assert!(reason.contains("p99 of `to`"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mismatches_roll_back() {
    let monolith = named("monolith").await;
    let orders = named("orders").await;
    // Every answer differs (each backend names itself), so every comparison mismatches.
    let ramp = "steps = [50, 100]\nhold = \"1h\"\nmin_requests = 20\nmax_mismatch_rate = 0.5\n[routes.shadow]";
    let proxy = Proxy::start(&ramp_routes(&monolith, &orders, ramp)).await;
    let reason = wait_rollback(&proxy).await;
    assert!(reason.contains("shadow comparisons mismatched"), "{reason}");
}

/// Every client's backend on `a` and on `b`, asked one after the other.
async fn both_rounds(a: &Proxy, b: &Proxy, clients: usize) -> (Vec<String>, Vec<String>) {
    (one_round(a, clients).await, one_round(b, clients).await)
}

/// A replica's ramp state in force ("ramping" at 30%) and how many ticks it has synced with
/// the shared store. The count is read just after the state, so it may be a tick ahead of it:
/// a replica that lags another must have caught up once its count has grown by three.
async fn synced_state(proxy: &Proxy) -> ((String, f64), u64) {
    let json = proxy.routes_json().await;
    let ramp = &json["routes"][0]["ramp"];
    let state = (
        ramp["status"].as_str().unwrap_or("?").to_string(),
        ramp["percent"].as_f64().unwrap_or(-1.0),
    );
    (state, json["ramp_store"]["syncs"].as_u64().expect("a sync count"))
}

/// Syncs after which a replica must hold a state written to the shared store before the first.
const SYNCS_TO_FOLLOW: u64 = 3;

/// Waits until `done` holds on `proxy`, which must follow a write to the shared store made
/// before this call. Fails once the replica has synced enough times to have followed it.
async fn follows<F: std::future::Future<Output = bool>>(
    proxy: &Proxy,
    what: &str,
    mut done: impl FnMut() -> F,
) {
    let (_, start) = synced_state(proxy).await;
    // A guard against a replica that stops syncing altogether, not the property tested.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, syncs) = synced_state(proxy).await;
        if done().await {
            return;
        }
        assert!(
            syncs < start + SYNCS_TO_FOLLOW,
            "{what}: not followed after {} syncs",
            syncs - start
        );
        assert!(Instant::now() < deadline, "{what}: the replica stopped syncing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn post_command(proxy: &Proxy, command: &str) -> reqwest::StatusCode {
    client()
        .post(format!("http://{}/routes/orders/{command}", proxy.admin))
        .header("content-type", "application/json")
        .bearer_auth("s3cret")
        .send()
        .await
        .expect("post")
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sharing_postgres_route_alike_and_survive_the_deciding_one() {
    let pg = common::pg::PgCluster::start();
    let (monolith, orders) = (named("monolith").await, named("orders").await);
    let dir = tempfile::tempdir().expect("dir");
    let settings = settings_with_state(dir.path(), &pg.url("postgres"));
    let ramp = "steps = [10, 30, 60, 100]\nhold = \"2s\"\nmin_requests = 10\nmax_error_rate = 1.0";
    let routes = ramp_routes(&monolith, &orders, ramp);
    let mut replicas = [
        Some(Proxy::start_with(&routes, &["--config", &settings]).await),
        Some(Proxy::start_with(&routes, &["--config", &settings]).await),
    ];

    // Replicas in the same state route every client alike. They may be in different states
    // only until the one behind has synced with the store: not after a few syncs each.
    let mut apart: Option<(String, (u64, u64))> = None;
    let started = Instant::now();
    let (mut paused, mut killed) = (false, false);
    loop {
        let live: Vec<&Proxy> = replicas.iter().flatten().collect();
        if live.len() == 2 {
            let states_before = (synced_state(live[0]).await.0, synced_state(live[1]).await.0);
            let (a, b) = both_rounds(live[0], live[1], 20).await;
            let ((state_a, syncs_a), (state_b, syncs_b)) =
                (synced_state(live[0]).await, synced_state(live[1]).await);
            if state_a == state_b {
                apart = None;
                if states_before == (state_a.clone(), state_b) {
                    assert_eq!(a, b, "replicas both at {state_a:?} route clients differently");
                }
            } else {
                let states = format!("{state_a:?} and {state_b:?}");
                match &apart {
                    Some((seen, since)) if *seen == states => assert!(
                        syncs_a < since.0 + SYNCS_TO_FOLLOW || syncs_b < since.1 + SYNCS_TO_FOLLOW,
                        "replicas stay at {states} after {SYNCS_TO_FOLLOW} syncs each"
                    ),
                    _ => apart = Some((states, (syncs_a, syncs_b))),
                }
            }
        } else {
            one_round(live[0], 20).await;
        }
        let ramp = ramp_of(live[0]).await;
        let percent = ramp["percent"].as_f64().unwrap_or(0.0);
        if !paused && percent >= 30.0 {
            // A write on one replica holds on both.
            let (first, second) = (live[0], live[1]);
            assert_eq!(post_command(first, "pause").await, 200);
            follows(second, "the pause on the other replica", move || async move {
                ramp_of(second).await["status"] == "paused"
            })
            .await;
            // A rollback sends everyone back on both, and a resume starts over.
            assert_eq!(post_command(second, "rollback").await, 200);
            follows(first, "the rollback on the other replica", move || async move {
                let (a, b) = both_rounds(first, second, 20).await;
                a.iter().chain(&b).all(|backend| backend == "monolith")
            })
            .await;
            assert_eq!(post_command(first, "resume").await, 200);
            paused = true;
        } else if paused && !killed && percent >= 60.0 {
            // kill -9 the deciding replica: the other takes over and the ramp goes on.
            let mut deciding = None;
            for (index, proxy) in replicas.iter().enumerate() {
                let Some(proxy) = proxy else { continue };
                if proxy.routes_json().await["ramp_store"]["deciding"] == true {
                    deciding = Some(index);
                }
            }
            let deciding = deciding.expect("one replica decides");
            drop(replicas[deciding].take());
            killed = true;
        }
        if ramp["status"] == "done" {
            assert!(killed, "the ramp ended before the kill: {ramp}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(90), "ramp not done in 90 s: {ramp}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let survivor = replicas.iter().flatten().next().expect("a survivor");
    assert_eq!(survivor.routes_json().await["ramp_store"]["deciding"], true);
    assert!(one_round(survivor, 20).await.iter().all(|b| b == "orders"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_shared_store_out_of_reach_a_ramp_keeps_its_step_and_says_so() {
    let pg = common::pg::PgCluster::start();
    let (monolith, orders) = (named("monolith").await, named("orders").await);
    let dir = tempfile::tempdir().expect("dir");
    let settings = settings_with_state(dir.path(), &pg.url("postgres"));
    let ramp = "steps = [10, 100]\nhold = \"1s\"\nmin_requests = 5";
    let proxy =
        Proxy::start_with(&ramp_routes(&monolith, &orders, ramp), &["--config", &settings]).await;
    let first = one_round(&proxy, 20).await;
    assert_eq!(ramp_of(&proxy).await["percent"], 10.0);

    pg.stop();
    let deadline = Instant::now() + Duration::from_secs(15);
    while proxy.routes_json().await["ramp_store"]["reachable"] != false {
        assert!(Instant::now() < deadline, "the lost store was not reported");
        one_round(&proxy, 20).await;
    }
    for _ in 0..10 {
        assert_eq!(one_round(&proxy, 20).await, first, "clients keep their backend");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(ramp_of(&proxy).await["percent"], 10.0, "no advance without the store");
    assert_eq!(common::metric(&proxy.metrics().await, "ficus_ramp_store_up"), 0.0);
    assert!(proxy.logs().contains("ramp state database unreachable"), "{}", proxy.logs());

    pg.start_again();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ramp_of(&proxy).await["status"] != "done" {
        assert!(
            Instant::now() < deadline,
            "no advance once the store is back: {}",
            ramp_of(&proxy).await
        );
        one_round(&proxy, 20).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_ramp_keeps_its_share_and_a_removed_one_hands_back_to_the_file() {
    let (monolith, orders) = (named("monolith").await, named("orders").await);
    let ramp = |steps: &str| format!("steps = {steps}\nhold = \"1h\"\nmin_requests = 1");
    let proxy = Proxy::start(&ramp_routes(&monolith, &orders, &ramp("[10, 50, 100]"))).await;
    let advance = || async {
        let url = format!("http://{}/routes/orders/advance?force=true", proxy.admin);
        let answer = client().post(url).header("content-type", "application/json").send();
        answer.await.expect("post").status()
    };
    // From loopback, without a token configured.
    assert_eq!(advance().await, 200);
    assert_eq!(ramp_of(&proxy).await["percent"], 50.0);

    let version = proxy.version().await;
    proxy.write_routes(&ramp_routes(&monolith, &orders, &ramp("[20, 40, 80, 100]")));
    let version = proxy.wait_version_change(&version).await;
    assert_eq!(ramp_of(&proxy).await["percent"], 50.0, "an edit keeps the share");
    assert_eq!(advance().await, 200);
    assert_eq!(ramp_of(&proxy).await["percent"], 80.0, "then the first step above it");

    proxy.write_routes(&split_routes_between(&monolith.url(), &orders.url(), 5.0));
    proxy.wait_version_change(&version).await;
    let route = &proxy.routes_json().await["routes"][0];
    assert_eq!((route["percent"].as_f64(), route["ramp"].is_null()), (Some(5.0), true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_database_that_never_answers_holds_nothing_up() {
    // Accepts connections (the kernel does) but never says a word, like a dropped network path.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("postgres://postgres@{}/ficus", silent.local_addr().expect("addr"));
    let (monolith, orders) = (named("monolith").await, named("orders").await);
    let dir = tempfile::tempdir().expect("dir");
    let settings = settings_with_state(dir.path(), &url);
    let ramp = "steps = [10, 100]\nhold = \"1s\"\nmin_requests = 1";
    let started = Instant::now();
    let proxy =
        Proxy::start_with(&ramp_routes(&monolith, &orders, ramp), &["--config", &settings]).await;
    assert!(started.elapsed() < Duration::from_secs(10), "start took {:?}", started.elapsed());
    let ramp = ramp_of(&proxy).await;
    assert_eq!(ramp["percent"], 0.0, "no state known: everyone stays on `from`: {ramp}");
    assert!(one_round(&proxy, 10).await.iter().all(|b| b == "monolith"));
    assert_eq!(proxy.routes_json().await["ramp_store"]["reachable"], false);

    let asked = Instant::now();
    assert_eq!(post_command(&proxy, "pause").await, 503);
    assert!(asked.elapsed() < Duration::from_secs(8), "the command took {:?}", asked.elapsed());
    drop(silent);
}

//! The Grafana dashboards and Prometheus rules under deploy/ name only metrics ficus exports
//! (checked by scraping a running proxy and a running cdc), and the rules pass `promtool`.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::broker::Broker;
use common::cdc::{config, Cdc};
use common::pg::PgCluster;
use common::{client, split_routes_between, AppBackend, Proxy, Seen, PATIENCE};
use serde_json::{json, Value};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path)
}

/// The expressions of every dashboard panel and alert rule, with the file they are in.
fn expressions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for dashboard in ["grafana/ficus-proxy.json", "grafana/ficus-cdc.json"] {
        let text = std::fs::read_to_string(deploy(dashboard)).expect("dashboard");
        let json: Value = serde_json::from_str(&text).expect("dashboard JSON");
        let panels = json["panels"].as_array().expect("panels");
        assert!(!panels.is_empty(), "{dashboard} has no panels");
        for panel in panels {
            let targets = panel["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{dashboard}: panel {} has no query", panel["title"]);
            for target in targets {
                let expr = target["expr"].as_str().expect("expr");
                out.push((dashboard.to_string(), expr.to_string()));
            }
        }
    }
    let rules = std::fs::read_to_string(deploy("prometheus/alerts.yaml")).expect("rules");
    let rules = yaml_rust2::YamlLoader::load_from_str(&rules).expect("rules YAML");
    for group in rules[0]["groups"].as_vec().expect("groups") {
        for rule in group["rules"].as_vec().expect("rules") {
            let expr = rule["expr"].as_str().expect("expr");
            out.push(("prometheus/alerts.yaml".into(), expr.to_string()));
        }
    }
    out
}

/// The `ficus_*` sample names in a Prometheus text exposition.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| line.starts_with("ficus_"))
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// A proxy whose every metric has a sample: a health-checked backend, a shadowed route whose
/// backends disagree, and a ramp that advances.
async fn busy_proxy() -> (Proxy, [AppBackend; 2]) {
    let answer = |name: &'static str| {
        move |_: &Seen| (200, "application/json", json!({"backend": name}).to_string())
    };
    let (monolith, orders) =
        (AppBackend::start(answer("monolith")).await, AppBackend::start(answer("orders")).await);
    let routes = split_routes_between(&monolith.url(), &orders.url(), 0.0).replace(
        "percent = 0\n",
        "[routes.ramp]\nsteps = [50, 100]\nhold = \"0s\"\nmin_requests = 1\n[routes.shadow]\n",
    ) + "[backends.orders.health]\npath = \"/healthz\"\ninterval = \"1s\"\n";
    let proxy = Proxy::start(&routes).await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        for user in 0..10 {
            let request =
                client().get(proxy.url("/api/orders/1")).header("x-user-id", format!("u{user}"));
            let _ = request.send().await.expect("request").bytes().await;
        }
        let metrics = proxy.metrics().await;
        if metrics.contains("ficus_ramp_transitions_total{")
            && metrics.contains("ficus_shadow_differences_total{")
        {
            break;
        }
        assert!(Instant::now() < deadline, "metrics never filled:\n{metrics}");
    }
    (proxy, [monolith, orders])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_a_dashboard_or_rule_names_is_exported() {
    let (proxy, _backends) = busy_proxy().await;
    let mut names = exported(&proxy.metrics().await);

    let (pg, broker) = (PgCluster::start(), Broker::start());
    let db = pg.database("bank").await;
    db.batch_execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
         INSERT INTO accounts SELECT g, g FROM generate_series(1, 100) g; ANALYZE accounts;",
    )
    .await
    .expect("schema");
    let mut cdc = Cdc::start(&config(&pg.url("bank"), &broker, "bank", "tables = [\"accounts\"]"));
    cdc.wait_log("streaming changes", Duration::from_secs(30));
    db.batch_execute("INSERT INTO accounts VALUES (1000, 1)").await.expect("insert");
    let metrics = cdc
        .wait_metric("ficus_cdc_commit_to_ack_seconds_count", 1.0, Duration::from_secs(30))
        .await;
    names.extend(exported(&metrics));
    cdc.terminate();

    let mut missing = Vec::new();
    for (file, expr) in expressions() {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("ficus_") && !names.contains(word) {
                missing.push(format!("{file}: {word}"));
            }
        }
    }
    assert!(missing.is_empty(), "named but not exported: {missing:#?}\nexported: {names:#?}");
}

#[test]
fn the_alert_rules_pass_promtool() {
    let output = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(deploy("prometheus/alerts.yaml"))
        .output()
        .expect("promtool (Debian package prometheus, installed by scripts/install-deps)");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

//! A route table of 10,000 `path_regex` routes: correct, and in bounded memory (the combined
//! search used to allocate gigabytes on the first request); and a table whose regexes are
//! too large together is refused with a clear message.

use ficus_routes::{Entropy, Format, RouteTable, SimpleRequest};

struct Fixed;

impl Entropy for Fixed {
    fn new_client_id(&mut self) -> String {
        "id".into()
    }
    fn random_bucket(&mut self) -> u16 {
        0
    }
}

fn regex_table(patterns: impl Iterator<Item = String>) -> Result<RouteTable, String> {
    let mut text = String::from(
        "[backends.a]\nurl = \"http://127.0.0.1:1\"\n[backends.b]\nurl = \"http://127.0.0.1:2\"\n[defaults]\nbackend = \"a\"\nsticky = \"none\"\n",
    );
    for (i, pattern) in patterns.enumerate() {
        text.push_str(&format!(
            "[[routes]]\nname = \"r{i}\"\nmatch = {{ path_regex = '{pattern}' }}\nto = \"b\"\npercent = 100\n"
        ));
    }
    RouteTable::parse(&text, Format::Toml, "routes.toml").map_err(|e| e.to_string())
}

/// The index of the route `path` goes by, if any.
fn route_of(table: &RouteTable, path: &str) -> Option<usize> {
    let request = SimpleRequest::new("GET", path);
    let decision = table.decide(&request, &mut Fixed);
    decision.route.map(|(index, _)| index)
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[test]
fn regex_routes_route_correctly_in_bounded_memory_up_to_ten_thousand() {
    // 1,000 routes and a path none matches: the search took 1.3 GB here before.
    let table = regex_table((0..1_000).map(|i| format!(r"^/svc{i}/[a-z]+/\d+$"))).expect("valid");
    assert_eq!(route_of(&table, "/svc4999/abc/12"), None);
    let peak = peak_rss_kib();
    assert!(peak < 512 * 1024, "peak RSS {peak} KiB with 1,000 regex routes");

    let table = regex_table((0..10_000).map(|i| format!(r"^/svc{i}/[a-z]+/\d+$"))).expect("valid");
    for (path, route) in
        [("/svc0/abc/1", Some(0)), ("/svc9999/x/2", Some(9999)), ("/svc4242/x/y", None)]
    {
        assert_eq!(route_of(&table, path), route, "{path}");
    }
    for i in (0..10_000).step_by(97) {
        assert_eq!(route_of(&table, &format!("/svc{i}/abc/7")), Some(i));
    }
    let peak = peak_rss_kib();
    assert!(peak < 1024 * 1024, "peak RSS {peak} KiB with 10,000 regex routes");
}

#[test]
fn regexes_too_large_together_are_refused_with_a_clear_message() {
    let table = regex_table((0..20).map(|i| format!(r"^/svc{i}/\w+$"))).expect("valid");
    let error = ficus_routes::table::RouteIndex::with_limit(&table.routes, 4 * 1024)
        .expect_err("over 4 KiB");
    assert!(error.starts_with("the 20 path_regex routes together exceed the 4 KiB"), "{error}");
}

//! The route-file contract end to end, without a network: parsing in each format, every
//! validation error, and the routing decisions the proxy relies on.

use ficus_routes::{
    explain, Entropy, Format, KeySource, LoadError, Reason, RouteTable, SimpleRequest,
};

const EXAMPLE: &str = r#"
[backends.monolith]
url = "http://127.0.0.1:8080"
[backends.orders]
url = "http://127.0.0.1:9001/v2"
health = { path = "/healthz", interval = "2s" }

[defaults]
backend = "monolith"
sticky = "cookie:session_id"
override_header = "x-ficus-backend"

[[routes]]
name = "orders"
match = { path_prefix = "/api/orders", methods = ["GET", "POST"] }
to = "orders"
percent = 25.0
from = "monolith"
sticky = "header:x-user-id"
rewrite = { strip_prefix = "/api" }

[[routes]]
name = "catalog"
match = { path_regex = "^/api/items/[0-9]+$", host = "shop.example.com", headers = { "x-beta" = "1" } }
to = "orders"
percent = 100
"#;

struct Fixed(u16);

impl Entropy for Fixed {
    fn new_client_id(&mut self) -> String {
        "minted".to_string()
    }
    fn random_bucket(&mut self) -> u16 {
        self.0
    }
}

fn table(text: &str) -> RouteTable {
    RouteTable::parse(text, Format::Toml, "routes.toml").expect("valid table")
}

fn errors(text: &str) -> Vec<String> {
    match RouteTable::parse(text, Format::Toml, "routes.toml") {
        Ok(_) => panic!("expected errors"),
        Err(e) => e.messages(),
    }
}

fn with_route(route: &str) -> String {
    format!(
        "[backends.monolith]\nurl = \"http://127.0.0.1:8080\"\n[backends.orders]\nurl = \"http://127.0.0.1:9001\"\n[defaults]\nbackend = \"monolith\"\n{route}"
    )
}

#[test]
fn host_headers_drop_the_default_port_and_bracket_ipv6() {
    let table = table(
        "[backends.a]\nurl = \"http://[::1]/\"\n[backends.b]\nurl = \"https://[2001:db8::1]:8443\"\n\
         [backends.c]\nurl = \"https://orders.internal\"\n[backends.d]\nurl = \"http://10.0.0.7:8080\"\n\
         [defaults]\nbackend = \"a\"\n",
    );
    let hosts: Vec<String> = table.backends.iter().map(|b| b.host_header()).collect();
    assert_eq!(hosts, ["[::1]", "[2001:db8::1]:8443", "orders.internal", "10.0.0.7:8080"]);
}

#[test]
fn every_header_routing_looks_up_is_listed_once() {
    // Override, sticky and matched headers; the default sticky is a cookie.
    assert_eq!(table(EXAMPLE).looked_up_headers(), ["x-beta", "x-ficus-backend", "x-user-id"]);
    let twice = with_route(
        "[[routes]]\nname = \"a\"\nmatch = { path_prefix = \"/a\", headers = { \"X-User\" = \"1\" } }\n\
         to = \"orders\"\npercent = 5\nsticky = \"header:x-user\"\n",
    );
    assert_eq!(table(&twice).looked_up_headers(), ["x-user"]);
}

#[test]
fn the_documented_example_parses() {
    let t = table(EXAMPLE);
    assert_eq!(t.routes.len(), 2);
    let orders = &t.routes[0];
    assert_eq!(orders.threshold, 2500);
    assert_eq!(t.backends[orders.to].name, "orders");
    assert_eq!(t.backends[orders.to].path_prefix, "/v2");
    assert_eq!(t.backends[orders.from].name, "monolith");
    assert_eq!(t.routes[1].threshold, 10_000);
    assert_eq!(t.override_header.as_deref(), Some("x-ficus-backend"));
}

#[test]
fn yaml_and_json_give_the_same_table_version() {
    let toml = table(EXAMPLE);
    let yaml = r#"
backends:
  monolith: { url: "http://127.0.0.1:8080" }
  orders: { url: "http://127.0.0.1:9001/v2", health: { path: /healthz, interval: 2s } }
defaults: { backend: monolith, sticky: "cookie:session_id", override_header: x-ficus-backend }
routes:
  - name: orders
    match: { path_prefix: /api/orders, methods: [GET, POST] }
    to: orders
    percent: 25.0
    from: monolith
    sticky: "header:x-user-id"
    rewrite: { strip_prefix: /api }
  - name: catalog
    match: { path_regex: "^/api/items/[0-9]+$", host: shop.example.com, headers: { x-beta: "1" } }
    to: orders
    percent: 100
"#;
    let from_yaml = RouteTable::parse(yaml, Format::Yaml, "routes.yaml").expect("valid yaml");
    assert_eq!(from_yaml.routes.len(), 2);
    assert_eq!(from_yaml.routes[0].threshold, 2500);
    let json = r#"{"backends": {"monolith": {"url": "http://127.0.0.1:8080"}},
                   "defaults": {"backend": "monolith"}, "routes": []}"#;
    let from_json = RouteTable::parse(json, Format::Json, "routes.json").expect("valid json");
    assert_eq!(from_json.routes.len(), 0);
    assert_ne!(toml.version, from_json.version);
}

#[test]
fn unknown_backends_are_named_with_file_route_and_field() {
    let errs = errors(&with_route("[[routes]]\nname = \"orders\"\nmatch = { path_prefix = \"/a\" }\nto = \"ordres\"\npercent = 5"));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("routes.toml: routes[0] \"orders\": to: unknown backend \"ordres\""),
        "{}",
        errs[0]
    );
}

#[test]
fn percent_outside_range_or_grid_is_rejected() {
    let errs = errors(&with_route(
        "[[routes]]\nname = \"a\"\nmatch = {}\nto = \"orders\"\npercent = 100.5",
    ));
    assert!(errs[0].contains("routes[0] \"a\": percent: 100.5 is outside 0..=100"), "{errs:?}");
    let errs =
        errors(&with_route("[[routes]]\nname = \"a\"\nmatch = {}\nto = \"orders\"\npercent = -1"));
    assert!(errs[0].contains("percent: -1 is outside"), "{errs:?}");
    let errs = errors(&with_route(
        "[[routes]]\nname = \"a\"\nmatch = {}\nto = \"orders\"\npercent = 12.345",
    ));
    assert!(errs[0].contains("not a multiple of 0.01"), "{errs:?}");
}

#[test]
fn percent_nan_or_infinite_is_named_as_such() {
    for value in ["nan", "inf", "-inf"] {
        let errs = errors(&with_route(&format!(
            "[[routes]]\nname = \"a\"\nmatch = {{}}\nto = \"orders\"\npercent = {value}"
        )));
        assert_eq!(
            errs,
            ["routes.toml: routes[0] \"a\": percent: must be a number from 0 to 100 (not NaN, an infinity or empty)"],
            "{value}"
        );
    }
}

#[test]
fn credentials_in_backend_urls_are_refused_and_never_echoed() {
    for url in
        ["http://:s3cret@127.0.0.1:1", "http://user:s3cret@127.0.0.1:1", "http://user@127.0.0.1:1"]
    {
        let errs = errors(&format!(
            "[backends.monolith]\nurl = \"{url}\"\n[defaults]\nbackend = \"monolith\"\n"
        ));
        assert!(errs.iter().any(|e| e.contains("takes no credentials")), "{url}: {errs:?}");
        assert!(errs.iter().all(|e| !e.contains("s3cret") && !e.contains("user@")), "{errs:?}");
    }
    let errs = errors(
        "[backends.monolith]\nurl = \"http://u:s3cret@[::1\"\n[defaults]\nbackend = \"monolith\"\n",
    );
    assert!(errs.iter().any(|e| e.contains("malformed URL \"http://***@[::1\"")), "{errs:?}");
}

#[test]
fn override_rules_are_validated() {
    let dir = std::env::temp_dir().join(format!("ficus-override-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let short = dir.join("short");
    std::fs::write(&short, "abc").expect("write");
    let errs = errors(&format!(
        "[backends.monolith]\nurl = \"http://127.0.0.1:8080\"\n[defaults]\nbackend = \"monolith\"\n\
         override = {{ header = \"x-b\", allow = [\"10.0.0.0/33\", \"nope\"], token_file = \"{}\" }}\n",
        short.display()
    ));
    assert_eq!(errs.iter().filter(|e| e.contains("override.allow")).count(), 2, "{errs:?}");
    assert!(
        errs.iter().any(|e| e.contains("override.token_file") && e.contains("at least 16")),
        "{errs:?}"
    );
    let errs = errors("[backends.monolith]\nurl = \"http://127.0.0.1:8080\"\n[defaults]\nbackend = \"monolith\"\noverride_header = \"x-b\"\noverride = { header = \"x-b\" }\n");
    assert!(errs.iter().any(|e| e.contains("not both")), "{errs:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_regex_is_rejected() {
    let errs = errors(&with_route(
        "[[routes]]\nname = \"r\"\nmatch = { path_regex = \"^/a(\" }\nto = \"orders\"\npercent = 5",
    ));
    assert!(
        errs[0].starts_with("routes.toml: routes[0] \"r\": match.path_regex: bad regex"),
        "{errs:?}"
    );
}

#[test]
fn duplicate_route_names_are_rejected() {
    let route = "[[routes]]\nname = \"dup\"\nmatch = {}\nto = \"orders\"\npercent = 5\n";
    let errs = errors(&with_route(&format!("{route}{route}")));
    assert_eq!(errs, vec!["routes.toml: routes[1] \"dup\": name: duplicate route name \"dup\""]);
}

#[test]
fn malformed_urls_are_rejected() {
    let errs = errors("[backends.monolith]\nurl = \"127.0.0.1:8080\"\n[backends.b]\nurl = \"ftp://x\"\n[defaults]\nbackend = \"monolith\"\n");
    assert!(
        errs.iter().any(|e| e.starts_with("routes.toml: backends.monolith: url: ")),
        "{errs:?}"
    );
    assert!(errs.iter().any(|e| e.contains("backends.b: url: scheme \"ftp\"")), "{errs:?}");
}

#[test]
fn unknown_keys_are_rejected_everywhere() {
    let errs = errors(&with_route(
        "[[routes]]\nname = \"a\"\nmatch = { path_prefx = \"/a\" }\nto = \"orders\"\npercent = 5",
    ));
    assert!(errs[0].contains("routes[0] \"a\"") && errs[0].contains("path_prefx"), "{errs:?}");
    let errs =
        errors(&with_route("[[routes]]\nname = \"a\"\nmatch = {}\nto = \"orders\"\npercnt = 5"));
    assert!(errs[0].contains("unknown field `percnt`"), "{errs:?}");
    let errs = errors(&format!("{}\n[extra]\nx = 1\n", with_route("")));
    assert_eq!(
        errs,
        vec!["routes.toml: extra: unknown key: expected backends, defaults or routes"]
    );
}

#[test]
fn every_error_is_reported_not_just_the_first() {
    let routes = "[[routes]]\nname = \"a\"\nmatch = {}\nto = \"nope\"\npercent = 500\n\
                  [[routes]]\nname = \"b\"\nmatch = { path_regex = \"(\" }\nto = \"orders\"\npercent = 5\n\
                  [[routes]]\nname = \"c\"\nmatch = {}\nto = \"orders\"\npercent = 5\nsticky = \"body:x\"\n";
    let errs = errors(&with_route(routes));
    assert_eq!(errs.len(), 4, "{errs:#?}");
}

#[test]
fn malformed_files_name_the_file() {
    let err = RouteTable::parse("[backends", Format::Toml, "routes.toml").expect_err("malformed");
    assert!(matches!(err, LoadError::Unreadable { .. }));
    assert!(err.to_string().starts_with("routes.toml: "), "{err}");
}

#[test]
fn first_matching_route_wins_and_unmatched_go_to_default() {
    let t = table(EXAMPLE);
    let req = SimpleRequest::new("GET", "/api/orders/7").with_header("x-user-id", "u1");
    assert_eq!(t.match_route(&req).map(|(i, _)| i), Some(0));
    let req = SimpleRequest::new("DELETE", "/api/orders/7");
    let d = t.decide(&req, &mut Fixed(0));
    assert!(d.route.is_none());
    assert_eq!(t.backends[d.backend].name, "monolith");
}

#[test]
fn a_client_gets_the_same_backend_every_time() {
    let t = table(EXAMPLE);
    for user in 0..200 {
        let req =
            SimpleRequest::new("GET", "/api/orders").with_header("x-user-id", &format!("u{user}"));
        let first = t.decide(&req, &mut Fixed(0)).backend;
        for random in [1, 5000, 9999] {
            assert_eq!(t.decide(&req, &mut Fixed(random)).backend, first);
        }
    }
}

#[test]
fn raising_percent_never_moves_a_client_back() {
    let at = |percent: f64| {
        table(&with_route(&format!(
        "[[routes]]\nname = \"o\"\nmatch = {{ path_prefix = \"/o\" }}\nto = \"orders\"\npercent = {percent}\nsticky = \"header:x-user\""
    )))
    };
    let (low, high) = (at(10.0), at(30.0));
    let mut moved = 0;
    for user in 0..10_000 {
        let req = SimpleRequest::new("GET", "/o").with_header("x-user", &user.to_string());
        let before = low.decide(&req, &mut Fixed(0)).is_to();
        let after = high.decide(&req, &mut Fixed(0)).is_to();
        assert!(!before || after, "client {user} moved back");
        moved += usize::from(after && !before);
    }
    assert!((1_800..2_200).contains(&moved), "{moved}");
}

#[test]
fn clients_without_a_key_use_or_get_a_client_id() {
    let t = table(EXAMPLE);
    let bare = SimpleRequest::new("GET", "/api/orders");
    let d = t.decide(&bare, &mut Fixed(0));
    assert_eq!(d.minted_client_id(), Some("minted"));
    let back = SimpleRequest::new("GET", "/api/orders").with_header("cookie", "ficus_id=minted");
    let d2 = t.decide(&back, &mut Fixed(0));
    assert!(
        matches!(&d2.reason, Reason::Split { key, .. } if key.source == KeySource::ClientIdCookie)
    );
    assert_eq!(d.backend, d2.backend);
    assert_eq!(d2.minted_client_id(), None);
}

#[test]
fn override_header_names_from_or_to_only() {
    let t = table(EXAMPLE);
    let pick = |value: &str| {
        let req = SimpleRequest::new("GET", "/api/orders")
            .with_header("x-user-id", "u1")
            .with_header("x-ficus-backend", value);
        let d = t.decide(&req, &mut Fixed(0));
        (t.backends[d.backend].name.clone(), d.reason == Reason::Override)
    };
    assert_eq!(pick("orders"), ("orders".to_string(), true));
    assert_eq!(pick("monolith"), ("monolith".to_string(), true));
    assert!(!pick("elsewhere").1);
}

#[test]
fn rewrite_applies_only_to_requests_sent_to_to() {
    let t = table(EXAMPLE);
    let req =
        SimpleRequest::new("GET", "/api/orders/7?x=1").with_header("x-ficus-backend", "orders");
    let d = t.decide(&req, &mut Fixed(0));
    assert_eq!(
        t.upstream_path(d.route.map(|r| r.0), d.backend, "/api/orders/7", Some("x=1")),
        "/v2/orders/7?x=1"
    );
    let req = SimpleRequest::new("GET", "/api/orders/7").with_header("x-ficus-backend", "monolith");
    let d = t.decide(&req, &mut Fixed(0));
    assert_eq!(
        t.upstream_path(d.route.map(|r| r.0), d.backend, "/api/orders/7", None),
        "/api/orders/7"
    );
}

#[test]
fn explain_names_route_key_bucket_and_backend() {
    let t = table(EXAMPLE);
    let req = SimpleRequest::new("GET", "/api/orders/7").with_header("x-user-id", "42");
    let text = explain(&t, &req);
    let bucket = ficus_routes::bucket_of("42");
    assert!(text.contains("route:   orders (routes[0]"), "{text}");
    assert!(text.contains("sticky:  header:x-user-id = \"42\""), "{text}");
    assert!(text.contains(&format!("bucket:  {bucket} of 10000")), "{text}");
    let expected = if bucket < 2500 { "backend: orders" } else { "backend: monolith" };
    assert!(text.contains(expected), "{text}");
    let unmatched = explain(&t, &SimpleRequest::new("GET", "/"));
    assert!(unmatched.contains("backend: monolith"), "{unmatched}");
}

#[test]
fn many_regex_routes_keep_file_order_and_first_match() {
    let mut text = String::from("[backends.monolith]\nurl = \"http://127.0.0.1:1\"\n[backends.orders]\nurl = \"http://127.0.0.1:2\"\n[defaults]\nbackend = \"monolith\"\n");
    for i in 0..300 {
        if i % 3 == 0 {
            text.push_str(&format!("[[routes]]\nname = \"p{i}\"\nmatch = {{ path_prefix = \"/svc{i}\" }}\nto = \"orders\"\npercent = 0\n"));
        } else {
            text.push_str(&format!("[[routes]]\nname = \"r{i}\"\nmatch = {{ path_regex = \"^/legacy{i}/[0-9]+$\", methods = [\"GET\"] }}\nto = \"orders\"\npercent = 0\n"));
        }
    }
    // Overlapping: a broad regex late in the file loses to the earlier exact ones.
    text.push_str("[[routes]]\nname = \"broad\"\nmatch = { path_regex = \"^/legacy\" }\nto = \"orders\"\npercent = 0\n");
    let t = table(&text);
    let route = |method: &str, path: &str| {
        t.match_route(&SimpleRequest::new(method, path)).map(|(_, r)| r.name.clone())
    };
    assert_eq!(route("GET", "/legacy7/42").as_deref(), Some("r7"));
    assert_eq!(route("GET", "/legacy299/1").as_deref(), Some("r299"));
    assert_eq!(route("POST", "/legacy7/42").as_deref(), Some("broad"), "r7 is GET only");
    assert_eq!(route("GET", "/legacy7/x").as_deref(), Some("broad"));
    assert_eq!(route("GET", "/svc3/a").as_deref(), Some("p3"));
    assert_eq!(route("GET", "/nowhere"), None);
}

#[test]
fn the_route_index_keeps_file_order_across_prefix_exact_and_catch_all_routes() {
    let t = table(&with_route(
        "[[routes]]\nname = \"orders\"\nmatch = { path_prefix = \"/api/orders\", methods = [\"GET\"] }\nto = \"orders\"\npercent = 0\n\
         [[routes]]\nname = \"beta\"\nmatch = { headers = { x-beta = \"1\" } }\nto = \"orders\"\npercent = 0\n\
         [[routes]]\nname = \"api\"\nmatch = { path_prefix = \"/api\" }\nto = \"orders\"\npercent = 0\n\
         [[routes]]\nname = \"root\"\nmatch = { path = \"/\" }\nto = \"orders\"\npercent = 0\n\
         [[routes]]\nname = \"everything\"\nmatch = { path_prefix = \"/\", methods = [\"DELETE\"] }\nto = \"orders\"\npercent = 0\n",
    ));
    let route = |req: SimpleRequest| t.match_route(&req).map(|(_, r)| r.name.clone());
    assert_eq!(route(SimpleRequest::new("GET", "/api/orders/1")).as_deref(), Some("orders"));
    assert_eq!(route(SimpleRequest::new("POST", "/api/orders/1")).as_deref(), Some("api"));
    assert_eq!(
        route(SimpleRequest::new("GET", "/api/x").with_header("x-beta", "1")).as_deref(),
        Some("beta")
    );
    assert_eq!(route(SimpleRequest::new("GET", "/api/ordersx")).as_deref(), Some("api"));
    assert_eq!(route(SimpleRequest::new("GET", "/")).as_deref(), Some("root"));
    assert_eq!(route(SimpleRequest::new("DELETE", "/other")).as_deref(), Some("everything"));
    assert_eq!(route(SimpleRequest::new("GET", "/other")), None);
}

#[test]
fn regex_and_prefix_routes_interleave_in_file_order() {
    let t = table(&with_route(
        "[[routes]]\nname = \"early-regex\"\nmatch = { path_regex = \"^/api/v[0-9]+/\", methods = [\"PUT\"] }\nto = \"orders\"\npercent = 0\n\
         [[routes]]\nname = \"api\"\nmatch = { path_prefix = \"/api\" }\nto = \"orders\"\npercent = 0\n\
         [[routes]]\nname = \"late-regex\"\nmatch = { path_regex = \"^/(api|shop)/\" }\nto = \"orders\"\npercent = 0\n",
    ));
    let route = |method: &str, path: &str| {
        t.match_route(&SimpleRequest::new(method, path)).map(|(_, r)| r.name.clone())
    };
    assert_eq!(route("PUT", "/api/v2/x").as_deref(), Some("early-regex"));
    assert_eq!(route("GET", "/api/v2/x").as_deref(), Some("api"), "early-regex is PUT only");
    assert_eq!(route("GET", "/api/other").as_deref(), Some("api"), "before late-regex");
    assert_eq!(route("GET", "/shop/cart").as_deref(), Some("late-regex"));
    assert_eq!(route("GET", "/other"), None);
}

//! The routing decision allocates nothing for a client that carries its sticky key, whatever
//! mix of exact, prefix, regex and header routes the table has, once warm: the first request
//! on a thread sets up the reusable regex match set, and the regex engine's lazy DFA builds
//! the states of paths it has not seen before (its cache is bounded and reused).

use ficus_routes::{Entropy, Format, RouteTable, SimpleRequest};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

/// The system allocator, counting. This file holds one test, so nothing else allocates
/// while it measures, but the test harness's threads.
#[global_allocator]
static ALLOCATOR: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

struct NoEntropy;

impl Entropy for NoEntropy {
    fn new_client_id(&mut self) -> String {
        unreachable!("every request carries its key")
    }
    fn random_bucket(&mut self) -> u16 {
        0
    }
}

#[test]
fn deciding_a_route_allocates_nothing() {
    let mut text = String::from(
        "[backends.monolith]\nurl = \"http://127.0.0.1:1\"\n[backends.orders]\nurl = \"http://127.0.0.1:2\"\n\
         [defaults]\nbackend = \"monolith\"\nsticky = \"header:x-user\"\n",
    );
    for i in 0..200 {
        let condition = match i % 4 {
            0 => format!("path_prefix = \"/svc{i}\""),
            1 => format!("path_regex = \"^/legacy{i}/[0-9]+$\""),
            2 => format!("path = \"/exact{i}\""),
            _ => format!("path_prefix = \"/\", headers = {{ x-route = \"{i}\" }}"),
        };
        text.push_str(&format!(
            "[[routes]]\nname = \"r{i}\"\nmatch = {{ {condition} }}\nto = \"orders\"\npercent = 30\nfrom = \"monolith\"\n"
        ));
    }
    let table = RouteTable::parse(&text, Format::Toml, "routes.toml").expect("valid table");
    let requests: Vec<SimpleRequest> =
        ["/svc4/a", "/legacy9/42", "/exact2", "/legacy9/x", "/", "/nowhere"]
            .iter()
            .map(|path| SimpleRequest::new("GET", path).with_header("x-user", "u42"))
            .chain([SimpleRequest::new("GET", "/any")
                .with_header("x-route", "3")
                .with_header("x-user", "u7")])
            .collect();
    let mut routed = Vec::with_capacity(requests.len());
    for request in &requests {
        table.decide(request, &mut NoEntropy);
    }

    let region = Region::new(ALLOCATOR);
    for request in &requests {
        let decision = table.decide(request, &mut NoEntropy);
        routed.push(decision.route.map(|(i, _)| i));
    }
    let allocations = region.change().allocations;

    assert_eq!(routed, [Some(4), Some(9), Some(2), None, None, None, Some(3)]);
    assert_eq!(allocations, 0, "decide() allocated {allocations} times");
}

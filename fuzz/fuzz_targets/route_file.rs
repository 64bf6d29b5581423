//! Route files of any content, in the three formats: parsing and validation end in a table
//! or in errors, never in a panic, a hang or unbounded memory; a table routes any request.
#![no_main]

use ficus_routes::{Entropy, Format, RouteTable, SimpleRequest};
use libfuzzer_sys::fuzz_target;

struct Fixed;

impl Entropy for Fixed {
    fn new_client_id(&mut self) -> String {
        "id".into()
    }
    fn random_bucket(&mut self) -> u16 {
        7
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let format = match selector % 3 {
        0 => Format::Toml,
        1 => Format::Yaml,
        _ => Format::Json,
    };
    if let Ok(table) = RouteTable::parse(text, format, "routes") {
        for path in ["/", "/api/orders/7", "/a/../b", "/%2e%2e/x"] {
            let request = SimpleRequest::new("GET", path).with_header("x-user-id", "u1");
            let decision = table.decide(&request, &mut Fixed);
            assert!(decision.backend < table.backends.len());
            let _ = ficus_routes::explain(&table, &request);
        }
    }
});

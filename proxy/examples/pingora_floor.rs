//! The benchmark's floor for any Pingora proxy: Pingora doing the same sticky split as
//! `ficus proxy` (XXH3 bucket of a header) and nothing else: no route table, metrics,
//! access log or forwarding headers. `tests/bench/proxy.sh` runs it beside ficus to show
//! what ficus itself costs on top of Pingora.
//!
//! Usage: `pingora_floor LISTEN FROM TO PERCENT HEADER THREADS`, e.g.
//! `pingora_floor 127.0.0.1:8080 127.0.0.1:9001 127.0.0.1:9002 30 x-user 1`.

use std::net::SocketAddr;

use async_trait::async_trait;
use ficus_routes::{bucket_of, BUCKETS};
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;

// The allocator of the `ficus` binary, so that the two differ only in what ficus does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Split {
    from: SocketAddr,
    to: SocketAddr,
    /// Buckets below this go to `to` (percent × 100, as in ficus).
    threshold: u16,
    header: String,
}

#[async_trait]
impl ProxyHttp for Split {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, session: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        let key = session.req_header().headers.get(&self.header).and_then(|v| v.to_str().ok());
        let addr = match key {
            Some(key) if bucket_of(key) < self.threshold => self.to,
            _ => self.from,
        };
        Ok(Box::new(HttpPeer::new(addr, false, String::new())))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, from, to, percent, header, threads] = args.as_slice() else {
        return Err("usage: pingora_floor LISTEN FROM TO PERCENT HEADER THREADS".into());
    };
    let percent: f64 = percent.parse()?;
    let split = Split {
        from: from.parse()?,
        to: to.parse()?,
        threshold: (percent / 100.0 * f64::from(BUCKETS)).round() as u16,
        header: header.clone(),
    };
    let conf = ServerConf { threads: threads.parse()?, ..ServerConf::default() };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, split);
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever()
}

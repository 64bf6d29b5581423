//! `ficus cdc` over TLS, with libpq's sslmode meanings, against a PostgreSQL that refuses
//! plain connections for the cdc user.

mod common;

use std::time::Duration;

use common::broker::Broker;
use common::cdc::{config, Cdc};
use common::pg::PgCluster;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

const QUIET: Duration = Duration::from_secs(20);

/// A CA and a server certificate it signed for `localhost` only.
fn certificates() -> (String, String, String) {
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "ficus test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .signed_by(&key, &ca, &ca_key)
        .expect("cert");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

async fn tls_cluster() -> (PgCluster, tokio_postgres::Client, String) {
    let (ca, cert, key) = certificates();
    let pg = PgCluster::start_tls(&cert, &key);
    let db = pg.database("shop").await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY); CREATE ROLE secure LOGIN SUPERUSER")
        .await
        .expect("setup");
    pg.hba_first("hostnossl all secure 127.0.0.1/32 reject");
    pg.hba_first("hostnossl replication secure 127.0.0.1/32 reject");
    (pg, db, ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_and_require_stream_over_tls() {
    let (pg, db, ca) = tls_cluster().await;
    let broker = Broker::start();
    let ca_path = std::env::temp_dir().join(format!("ficus-ca-{}.pem", pg.port));
    std::fs::write(&ca_path, &ca).expect("write ca");
    let cases = [
        (
            format!(
                "postgres://secure@localhost:{}/shop?sslmode=verify-full&sslrootcert={}",
                pg.port,
                ca_path.display()
            ),
            "s1",
        ),
        (
            format!(
                "postgres://secure@127.0.0.1:{}/shop?sslmode=verify-ca&sslrootcert={}",
                pg.port,
                ca_path.display()
            ),
            "s2",
        ),
        (format!("postgres://secure@127.0.0.1:{}/shop?sslmode=require", pg.port), "s3"),
    ];
    for (n, (url, slot)) in cases.iter().enumerate() {
        let extra = format!("tables = [\"t\"]\nslot = \"{slot}\"");
        let mut cdc = Cdc::start(&config(url, &broker, slot, &extra));
        cdc.wait_log("streaming changes", QUIET);
        db.execute("INSERT INTO t VALUES ($1)", &[&(n as i32)]).await.expect("insert");
        let records = broker.consume(&format!("{slot}.public.t"), 1, QUIET);
        assert_eq!(records.len(), 1, "{url}: {}", cdc.logs());
        cdc.terminate();
    }
    let _ = std::fs::remove_file(ca_path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_that_do_not_verify_are_refused_with_the_reason() {
    let (pg, _db, ca) = tls_cluster().await;
    let broker = Broker::start();
    let ca_path = std::env::temp_dir().join(format!("ficus-ca-{}.pem", pg.port));
    std::fs::write(&ca_path, &ca).expect("write ca");
    // The certificate names localhost, not 127.0.0.1.
    let url = format!(
        "postgres://secure@127.0.0.1:{}/shop?sslmode=verify-full&sslrootcert={}",
        pg.port,
        ca_path.display()
    );
    let mut cdc = Cdc::start(&config(&url, &broker, "x", ""));
    assert!(!cdc.wait_exit().success());
    assert!(
        cdc.logs().contains("TLS with PostgreSQL at 127.0.0.1")
            && cdc.logs().contains("certificate not valid for name \"127.0.0.1\""),
        "{}",
        cdc.logs()
    );
    // Another CA's roots (the public ones) do not vouch for a private CA.
    let url = format!("postgres://secure@localhost:{}/shop?sslmode=verify-full", pg.port);
    let mut cdc = Cdc::start(&config(&url, &broker, "x", ""));
    assert!(!cdc.wait_exit().success());
    assert!(cdc.logs().contains("invalid peer certificate"), "{}", cdc.logs());
    // Plain connections are refused by the server for this user: TLS really is in use above.
    let url = format!("postgres://secure@127.0.0.1:{}/shop?sslmode=disable", pg.port);
    let mut cdc = Cdc::start(&config(&url, &broker, "x", ""));
    assert!(!cdc.wait_exit().success());
    assert!(
        cdc.logs().contains("no encryption") || cdc.logs().contains("rejects connection"),
        "{}",
        cdc.logs()
    );
    let _ = std::fs::remove_file(ca_path);
}

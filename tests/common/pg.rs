//! A throwaway PostgreSQL cluster for a test, from the launcher `ficus demo` uses
//! (`src/pg_cluster.rs`), in a temporary directory on a free port, stopped (immediately) when
//! dropped.

use std::path::Path;

#[path = "../../src/pg_cluster.rs"]
mod launcher;

/// A running PostgreSQL cluster owned by one test.
pub struct PgCluster {
    pub port: u16,
    /// Dropped first: stops the server before its directory goes.
    cluster: launcher::PgCluster,
    _dir: tempfile::TempDir,
    /// Other directories the cluster uses (TLS files), removed with it.
    keep: Vec<tempfile::TempDir>,
}

impl PgCluster {
    pub fn start() -> PgCluster {
        PgCluster::start_with(&[])
    }

    /// Starts a cluster with extra `postgresql.conf` settings.
    pub fn start_with(settings: &[(&str, &str)]) -> PgCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = super::free_addr().port();
        let cluster = launcher::PgCluster::start(dir.path(), port, settings)
            .unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e:#}"));
        PgCluster { port, cluster, _dir: dir, keep: Vec::new() }
    }

    /// Starts a cluster that accepts TLS with this certificate chain and key (PEM).
    pub fn start_tls(cert: &str, key: &str) -> PgCluster {
        let dir = tempfile::tempdir().expect("tls dir");
        let (cert_path, key_path) = (dir.path().join("server.crt"), dir.path().join("server.key"));
        std::fs::write(&cert_path, cert).expect("write cert");
        std::fs::write(&key_path, key).expect("write key");
        let status = std::process::Command::new("chmod")
            .args(["600"])
            .arg(&key_path)
            .status()
            .expect("chmod");
        assert!(status.success());
        launcher::hand_over(dir.path()).expect("hand the TLS files to the server");
        let (cert_setting, key_setting) =
            (format!("'{}'", cert_path.display()), format!("'{}'", key_path.display()));
        let mut cluster = PgCluster::start_with(&[
            ("ssl", "on"),
            ("ssl_cert_file", &cert_setting),
            ("ssl_key_file", &key_setting),
        ]);
        cluster.keep.push(dir);
        cluster
    }

    fn data(&self) -> String {
        self.cluster.data().display().to_string()
    }

    fn pg_ctl(&self, args: &[&str]) {
        self.cluster.pg_ctl(args).unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Puts `line` first in pg_hba.conf and reloads the configuration.
    pub fn hba_first(&self, line: &str) {
        let path = Path::new(&self.data()).join("pg_hba.conf");
        let old = std::fs::read_to_string(&path).expect("read pg_hba.conf");
        std::fs::write(&path, format!("{line}\n{old}")).expect("write pg_hba.conf");
        self.pg_ctl(&["reload"]);
    }

    /// Stops the server at once, as a crash would.
    pub fn stop(&self) {
        self.cluster.stop_immediately().unwrap_or_else(|e| panic!("{e:#}"));
    }

    pub fn start_again(&self) {
        self.pg_ctl(&["start", "-w", "-t", "30"]);
    }

    pub fn url(&self, db: &str) -> String {
        self.cluster.url(db)
    }

    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(db), tokio_postgres::NoTls)
            .await
            .expect("connect to test PostgreSQL");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    /// Creates a database and returns a client of it.
    pub async fn database(&self, db: &str) -> tokio_postgres::Client {
        self.client("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .expect("create database");
        self.client(db).await
    }
}

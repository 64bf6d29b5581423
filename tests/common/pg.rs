//! A throwaway PostgreSQL cluster for a test: initdb with `wal_level=logical` in a temporary
//! directory, its own port, stopped (immediately) when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running PostgreSQL cluster owned by one test.
pub struct PgCluster {
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// Other directories the cluster uses (TLS files), removed with it.
    keep: Vec<tempfile::TempDir>,
}

/// PostgreSQL's server binaries: `FICUS_PG_BIN`, else the newest under /usr/lib/postgresql.
fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("FICUS_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries (Debian package postgresql) under /usr/lib/postgresql")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("an initdb under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

impl PgCluster {
    pub fn start() -> PgCluster {
        PgCluster::start_with(&[])
    }

    /// Starts a cluster with extra `postgresql.conf` settings.
    pub fn start_with(settings: &[(&str, &str)]) -> PgCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = super::free_addr().port();
        let cluster = PgCluster { port, dir, bin: bin_dir(), keep: Vec::new() };
        if is_root() {
            // initdb refuses to run as root: the cluster belongs to the postgres user.
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(cluster.dir.path())
                .status()
                .expect("chown");
            assert!(status.success());
        }
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        );
        let mut conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nwal_level = logical\n\
             max_replication_slots = 20\nmax_wal_senders = 20\nfsync = off\nfull_page_writes = off\n\
             synchronous_commit = off\nwal_sender_timeout = 60s\n",
            cluster.dir.path().display()
        );
        for (key, value) in settings {
            conf.push_str(&format!("{key} = {value}\n"));
        }
        std::fs::write(Path::new(&cluster.data()).join("postgresql.auto.conf"), conf)
            .expect("write conf");
        cluster.pg_ctl(&["start", "-w", "-t", "30"]);
        cluster
    }

    /// Starts a cluster that accepts TLS with this certificate chain and key (PEM).
    pub fn start_tls(cert: &str, key: &str) -> PgCluster {
        let dir = tempfile::tempdir().expect("tls dir");
        let (cert_path, key_path) = (dir.path().join("server.crt"), dir.path().join("server.key"));
        std::fs::write(&cert_path, cert).expect("write cert");
        std::fs::write(&key_path, key).expect("write key");
        let status = Command::new("chmod").args(["600"]).arg(&key_path).status().expect("chmod");
        assert!(status.success());
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success());
        }
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
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let output = if is_root() {
            Command::new("runuser").args(["-u", "postgres", "--"]).arg(&path).args(args).output()
        } else {
            Command::new(&path).args(args).output()
        }
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn pg_ctl(&self, args: &[&str]) {
        let (data, log) = (self.data(), self.dir.path().join("postgres.log").display().to_string());
        let mut all = vec!["-D", data.as_str(), "-l", log.as_str()];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all);
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
        self.pg_ctl(&["stop", "-m", "immediate", "-w"]);
    }

    pub fn start_again(&self) {
        self.pg_ctl(&["start", "-w", "-t", "30"]);
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
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

impl Drop for PgCluster {
    fn drop(&mut self) {
        let log = self.dir.path().join("postgres.log").display().to_string();
        let path = self.bin.join("pg_ctl");
        let args =
            ["-D", &self.data(), "-l", &log, "stop", "-m", "immediate", "-w"].map(str::to_string);
        let _ = if is_root() {
            Command::new("runuser").args(["-u", "postgres", "--"]).arg(&path).args(&args).output()
        } else {
            Command::new(&path).args(&args).output()
        };
    }
}

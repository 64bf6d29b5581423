//! A throwaway PostgreSQL cluster from this machine's server binaries (`FICUS_PG_BIN`, else
//! the newest under /usr/lib/postgresql): `initdb` with `wal_level=logical` in a directory of
//! its own, listening on 127.0.0.1 at its own port, stopped at once and deleted when dropped.
//! The one launcher of `ficus demo` and of the end-to-end tests (`tests/common/pg.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

pub struct PgCluster {
    pub port: u16,
    /// Holds `data/` and the server's log; deleted with the cluster.
    dir: PathBuf,
    bin: PathBuf,
    /// initdb refuses to run as root: as root, the cluster belongs to the postgres user.
    as_postgres: bool,
}

impl PgCluster {
    /// Creates and starts a cluster in `dir` (created if missing) on 127.0.0.1:`port`, with
    /// `settings` added to `postgresql.conf`.
    pub fn start(dir: &Path, port: u16, settings: &[(&str, &str)]) -> Result<PgCluster> {
        let bin = binaries()?;
        let as_postgres = is_root();
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        if as_postgres {
            hand_to_postgres(dir)?;
        }
        let cluster = PgCluster { port, dir: dir.to_path_buf(), bin, as_postgres };
        let data = cluster.data();
        let data = data.to_string_lossy();
        let initdb = ["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"];
        cluster.tool("initdb", &[&initdb[..], &["--locale=C"]].concat())?;
        let mut conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_replication_slots = 20\nmax_wal_senders = 20\n\
             fsync = off\nfull_page_writes = off\nsynchronous_commit = off\n\
             wal_sender_timeout = 60s\n",
            dir.display()
        );
        for (key, value) in settings {
            conf.push_str(&format!("{key} = {value}\n"));
        }
        let auto_conf = cluster.data().join("postgresql.auto.conf");
        std::fs::write(&auto_conf, conf)
            .with_context(|| format!("cannot write {}", auto_conf.display()))?;
        cluster.pg_ctl(&["start", "-w", "-t", "30"])?;
        Ok(cluster)
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The cluster's data directory.
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Runs `pg_ctl` on the cluster, logging to its log file.
    pub fn pg_ctl(&self, args: &[&str]) -> Result<()> {
        let (data, log) = (self.data(), self.dir.join("postgres.log"));
        let (data, log) = (data.to_string_lossy(), log.to_string_lossy());
        self.tool("pg_ctl", &[&["-D", &*data, "-l", &*log][..], args].concat())
    }

    /// Stops the server at once, as a crash would.
    pub fn stop_immediately(&self) -> Result<()> {
        self.pg_ctl(&["stop", "-m", "immediate", "-w"])
    }

    fn tool(&self, name: &str, args: &[&str]) -> Result<()> {
        let path = self.bin.join(name);
        let mut command = if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&path);
            command
        } else {
            Command::new(&path)
        };
        run(command.args(args)).with_context(|| format!("{} {args:?} failed", path.display()))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.stop_immediately();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// PostgreSQL's server binaries: `FICUS_PG_BIN`, else the newest under /usr/lib/postgresql.
fn binaries() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("FICUS_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path().join("bin"))).collect())
        .unwrap_or_default();
    found.retain(|bin| bin.join("initdb").exists());
    found.sort();
    match found.pop() {
        Some(bin) => Ok(bin),
        None => bail!(
            "PostgreSQL's server binaries (initdb, pg_ctl) are needed: install the Debian \
             package `postgresql` (apt-get install postgresql), or set FICUS_PG_BIN to their \
             directory"
        ),
    }
}

/// Makes `path` (a file or directory the server is to read, such as a TLS key) the
/// server's: the postgres user's when ficus runs as root, as the cluster then is.
#[allow(dead_code, reason = "only the tests' TLS cluster reads files handed over")]
pub fn hand_over(path: &Path) -> Result<()> {
    if is_root() {
        hand_to_postgres(path)?;
    }
    Ok(())
}

fn hand_to_postgres(path: &Path) -> Result<()> {
    run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(path))
}

fn run(command: &mut Command) -> Result<()> {
    let output = command.output().with_context(|| format!("cannot run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

//! The demo's throwaway PostgreSQL cluster, from the machine's PostgreSQL binaries, with
//! `wal_level=logical`, stopped and deleted when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

pub struct LocalPostgres {
    pub port: u16,
    bin: PathBuf,
    dir: PathBuf,
    as_postgres: bool,
}

/// The newest PostgreSQL server binaries on this machine.
fn find_binaries() -> Result<PathBuf> {
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
            "the demo needs PostgreSQL's server binaries (initdb, pg_ctl): install the Debian package \
             `postgresql` (apt-get install postgresql), or set FICUS_PG_BIN to their directory"
        ),
    }
}

impl LocalPostgres {
    /// Creates and starts a cluster in `dir` listening on 127.0.0.1:`port`.
    pub fn start(dir: &Path, port: u16) -> Result<LocalPostgres> {
        let bin = find_binaries()?;
        let as_postgres = is_root();
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        if as_postgres {
            // initdb refuses to run as root: the cluster belongs to the postgres user.
            run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir))?;
        }
        let pg = LocalPostgres { port, bin, dir: dir.to_path_buf(), as_postgres };
        pg.tool(
            "initdb",
            &[
                "-D",
                &pg.data(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        )?;
        let options = format!(
            "-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c wal_level=logical \
             -c max_replication_slots=10 -c max_wal_senders=10 -c fsync=off",
            dir.display()
        );
        let log = dir.join("postgres.log").display().to_string();
        pg.tool("pg_ctl", &["-D", &pg.data(), "-l", &log, "-o", &options, "-w", "start"])?;
        Ok(pg)
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn tool(&self, name: &str, args: &[&str]) -> Result<()> {
        let path = self.bin.join(name);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        run(command.args(args)).with_context(|| format!("{} failed", path.display()))
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        if let Err(e) = self.tool("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]) {
            eprintln!("could not stop the demo's PostgreSQL: {e:#}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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

/// The demo shop's schema and a few rows.
pub const SHOP_SCHEMA: &str = "
CREATE TABLE customers (id serial PRIMARY KEY, email text NOT NULL UNIQUE, name text NOT NULL);
CREATE TABLE orders (
  id serial PRIMARY KEY,
  customer_id int NOT NULL REFERENCES customers,
  item text NOT NULL,
  quantity int NOT NULL,
  total numeric(10,2) NOT NULL,
  status text NOT NULL DEFAULT 'placed',
  created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO customers (email, name) VALUES
  ('ada@example.com', 'Ada'), ('grace@example.com', 'Grace'), ('alan@example.com', 'Alan');
INSERT INTO orders (customer_id, item, quantity, total) VALUES
  (1, 'keyboard', 1, 49.90), (2, 'monitor', 2, 399.00), (3, 'mouse', 3, 59.70);
";

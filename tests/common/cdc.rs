//! The real `ficus cdc` process for a test, with its config in a temporary directory.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::broker::Broker;
use super::{ficus, free_addr, PATIENCE};

pub struct Cdc {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub metrics: String,
    log: PathBuf,
    child: Option<Child>,
    /// With `--stdout`: the file standard output goes to.
    pub stdout: Option<PathBuf>,
    /// The subcommand: `cdc`, or `sink` (the same handling of a configured process).
    command: &'static str,
}

/// A cdc.toml for `url` and `broker`; `extra_source` lines go into `[source]`.
pub fn config(url: &str, broker: &Broker, prefix: &str, extra_source: &str) -> String {
    let (brokers, prefix) = (&broker.addr, broker.topic(prefix));
    format!(
        "[source]\nurl = \"{url}\"\nheartbeat = \"500ms\"\n{extra_source}\n\n\
         [kafka]\nbrokers = \"{brokers}\"\ntopic_prefix = \"{prefix}\"\npartitions = 1\nreplication_factor = 1\n"
    )
}

impl Cdc {
    /// Starts `ficus cdc` with `config` (metrics are added on a free port).
    pub fn start(config: &str) -> Cdc {
        Cdc::launch("cdc", config, false)
    }

    /// Starts `ficus cdc --stdout` with `config`, standard output into a file.
    pub fn start_stdout(config: &str) -> Cdc {
        Cdc::launch("cdc", config, true)
    }

    /// Starts `ficus sink` with `config`.
    pub fn start_sink(config: &str) -> Cdc {
        Cdc::launch("sink", config, false)
    }

    fn launch(command: &'static str, config: &str, stdout: bool) -> Cdc {
        let dir = tempfile::tempdir().expect("temp dir");
        let metrics = free_addr().to_string();
        let config_path = dir.path().join("cdc.toml");
        let log = dir.path().join("cdc.log");
        let stdout = stdout.then(|| dir.path().join("events.jsonl"));
        let mut cdc = Cdc { dir, config: config_path, metrics, log, child: None, stdout, command };
        cdc.write_config(config);
        cdc.spawn();
        cdc
    }

    /// Replaces the configuration (keeping the metrics address), for a reload or restart.
    pub fn write_config(&self, config: &str) {
        std::fs::write(
            &self.config,
            format!("{config}\n[metrics]\nlisten = \"{}\"\n", self.metrics),
        )
        .expect("write config");
    }

    /// Starts the process again with the same configuration.
    pub fn spawn(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log");
        let out: Stdio = match &self.stdout {
            Some(path) => std::fs::File::create(path).expect("stdout file").into(),
            None => Stdio::null(),
        };
        let mut args = vec![self.command, "--config", self.config.to_str().expect("path")];
        if self.stdout.is_some() {
            args.push("--stdout");
        }
        let child = ficus()
            .args(&args)
            .env("RUST_LOG", "info,ficus_cdc=debug,ficus_sink=debug")
            .stdout(out)
            .stderr(log)
            .spawn()
            .expect("spawn ficus");
        self.child = Some(child);
    }

    /// Kills the process with SIGKILL: no flush, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process with SIGTERM and waits for it (a while: one that does not stop is
    /// killed and the test fails).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ =
            std::process::Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
        self.wait_exit()
    }

    /// Sends SIGHUP: reload the configuration.
    pub fn hangup(&self) {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// With `--stdout`: waits until at least `count` lines were written, and returns them all.
    pub async fn stdout_lines(&self, count: usize, patience: Duration) -> Vec<String> {
        let path = self.stdout.as_ref().expect("started with --stdout");
        let deadline = Instant::now() + patience;
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text.lines().count() >= count {
                return text.lines().map(str::to_string).collect();
            }
            assert!(Instant::now() < deadline, "{text}\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + PATIENCE * 4;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("ficus {} did not exit:\n{}", self.command, self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `text`.
    pub fn wait_log(&self, text: &str, patience: Duration) {
        let deadline = Instant::now() + patience;
        while !self.logs().contains(text) {
            assert!(Instant::now() < deadline, "no \"{text}\" in the log:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `series` reaches at least `value` (while the process starts, too);
    /// returns the metrics text then.
    pub async fn wait_metric(&self, series: &str, value: f64, patience: Duration) -> String {
        let fetch = || async {
            match reqwest::get(format!("http://{}/metrics", self.metrics)).await {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            }
        };
        super::wait_metric(fetch, series, value, patience).await
    }

    pub async fn metrics_text(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.metrics))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }
}

impl Drop for Cdc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- ficus cdc log ---\n{}", self.logs());
        }
    }
}

impl Cdc {
    /// The process's peak resident memory (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        super::peak_rss_kib(self.child.as_ref().expect("running").id())
    }
}

impl Cdc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }
}

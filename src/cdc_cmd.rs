//! `ficus cdc`: loads the configuration and runs the pipeline until SIGINT or SIGTERM;
//! `ficus cdc snapshot` asks the running pipeline to snapshot tables again.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ficus_cdc::config::SECTIONS;
use ficus_cdc::names::TableName;
use ficus_cdc::{CdcConfig, Metrics, Shutdown};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CdcArgs {
    #[command(subcommand)]
    action: Option<CdcAction>,
    /// The cdc configuration file (TOML, YAML or JSON); FICUS_* variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Write events to standard output as JSON lines (`{"topic","key","value"}`) instead of
    /// Kafka; logs stay on standard error. For piping into jq, and for benchmarks.
    #[arg(long)]
    stdout: bool,
}

#[derive(Subcommand)]
enum CdcAction {
    /// Snapshot tables again while ficus cdc streams: their rows are read chunk by chunk and
    /// sent as `r` events between the changes, without stopping the stream. The request
    /// goes through the database, so it reaches the reader wherever it runs.
    Snapshot {
        /// The cdc configuration file of the running pipeline.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Tables to snapshot (`schema.table`; quoted as in SQL where a name holds dots).
        #[arg(required = true)]
        tables: Vec<String>,
    },
}

/// Reads the configuration: the file, then `FICUS_SECTION__KEY` environment variables.
pub fn load_config(path: Option<&std::path::Path>) -> Result<CdcConfig> {
    let mut builder = config::Config::builder();
    if let Some(path) = path {
        // A section of the file that is not ours is a mistake (a misspelt `[columns]` would
        // let out the columns it was to keep in), unlike other FICUS_ variables.
        let file = config::Config::builder()
            .add_source(config::File::from(path).required(true))
            .build()
            .with_context(|| format!("cannot read cdc configuration {}", path.display()))?
            .try_deserialize::<serde_json::Map<String, serde_json::Value>>()?;
        if let Some(unknown) = file.keys().find(|key| !SECTIONS.contains(&key.as_str())) {
            bail!(
                "invalid cdc configuration {}: unknown section [{unknown}] (the sections are {})",
                path.display(),
                SECTIONS.join(", ")
            );
        }
        builder = builder.add_source(config::File::from(path).required(true));
    }
    builder = builder.add_source(
        config::Environment::with_prefix("FICUS")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .ignore_empty(true),
    );
    let source = path.map_or("environment".to_string(), |p| p.display().to_string());
    let raw = builder.build().with_context(|| format!("cannot read cdc configuration {source}"))?;
    // Only the cdc sections: other FICUS_ variables (the proxy's, the log format) are not ours.
    let mut table = raw.try_deserialize::<serde_json::Map<String, serde_json::Value>>()?;
    table.retain(|key, _| SECTIONS.contains(&key.as_str()));
    CdcConfig::from_sections(&table).map_err(|problems| {
        anyhow::anyhow!("invalid cdc configuration {source}:\n  {}", problems.join("\n  "))
    })
}

pub fn run(args: &CdcArgs) -> Result<i32> {
    if let Some(CdcAction::Snapshot { config, tables }) = &args.action {
        return request_snapshot(config.as_deref(), tables);
    }
    let config_path = args.config.clone();
    let output = if args.stdout {
        ficus_cdc::config::Output::Stdout
    } else {
        ficus_cdc::config::Output::Kafka
    };
    let mut config = load_config(config_path.as_deref())?;
    config.output = output;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let metrics = Metrics::new();
        serve_metrics(config.metrics.listen.as_deref(), &metrics).await?;
        loop {
            let (control, shutdown) = tokio::sync::watch::channel(Shutdown::Run);
            let signals = tokio::spawn(forward_signals(control));
            let result = ficus_cdc::run(config, metrics.clone(), shutdown.clone()).await;
            signals.abort();
            result.context("ficus cdc stopped")?;
            if *shutdown.borrow() != Shutdown::Restart {
                return Ok(0);
            }
            // SIGHUP: read the configuration again and resume from the slot.
            config = match load_config(config_path.as_deref()) {
                Ok(config) => ficus_cdc::CdcConfig { output, ..config },
                Err(e) => return Err(e.context("reload on SIGHUP")),
            };
            tracing::info!("configuration reloaded; resuming");
        }
    })
}

/// `ficus cdc snapshot`: writes the request and says where to watch it.
fn request_snapshot(config_path: Option<&std::path::Path>, tables: &[String]) -> Result<i32> {
    let config = load_config(config_path)?;
    let tables = tables
        .iter()
        .map(|name| TableName::parse(name).map_err(|e| anyhow::anyhow!("table {e}")))
        .collect::<Result<Vec<_>>>()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (lsn, streaming) = runtime
        .block_on(ficus_cdc::pipeline::request_snapshot(&config, &tables))
        .context("cannot request the snapshot")?;
    let names: Vec<String> = tables.iter().map(TableName::to_string).collect();
    println!(
        "requested an incremental snapshot of {} at LSN {lsn}: ficus cdc reads it chunk by chunk \
         while it streams (ficus_cdc_snapshot_rows and ficus_cdc_incremental_snapshot_tables show \
         its progress)",
        names.join(", ")
    );
    if !streaming {
        eprintln!(
            "warning: no ficus cdc streams slot \"{}\" now; the snapshot starts when one does",
            config.source.slot
        );
    }
    Ok(0)
}

/// Turns signals into requests to the pipeline: SIGHUP a restart (which lets a snapshot in
/// progress finish), SIGINT or SIGTERM a stop, which overrides a restart not yet acted on.
/// Serves `/metrics` and `/healthz` on `listen` (`metrics.listen`), if given: for either
/// program's metrics.
pub async fn serve_metrics<M: ficus_cdc::metrics::Exported>(
    listen: Option<&str>,
    metrics: &std::sync::Arc<M>,
) -> Result<()> {
    let Some(listen) = listen else { return Ok(()) };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on metrics.listen {listen}"))?;
    tracing::info!(listen, "metrics on /metrics, health on /healthz");
    tokio::spawn(ficus_cdc::metrics::serve(listener, metrics.clone()));
    Ok(())
}

async fn forward_signals(control: tokio::sync::watch::Sender<Shutdown>) {
    loop {
        let signal = wait_for_signal().await;
        let request = match signal {
            Signal::Hangup => Shutdown::Restart,
            Signal::Stop => Shutdown::Stop,
        };
        match request {
            Shutdown::Restart => tracing::info!(?signal, "reloading: the pipeline stops (once a snapshot in progress is done) and starts again with the configuration read anew"),
            _ => tracing::info!(?signal, "stopping: finishing records in flight"),
        }
        control.send_if_modified(|current| {
            let stronger = *current != Shutdown::Stop && *current != request;
            if stronger {
                *current = request;
            }
            stronger
        });
        if request == Shutdown::Stop {
            return;
        }
    }
}

/// The signals `ficus cdc` acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// SIGINT or SIGTERM: stop.
    Stop,
    /// SIGHUP: stop the pipeline, reload the configuration, start again.
    Hangup,
}

async fn wait_for_signal() -> Signal {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut hangup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::hangup()))
    else {
        let _ = tokio::signal::ctrl_c().await;
        return Signal::Stop;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => Signal::Stop,
        _ = term.recv() => Signal::Stop,
        _ = hangup.recv() => Signal::Hangup,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_cdc_config_loads() {
        let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
        let mut loaded = 0;
        let entries = ["examples", "compose", "k8s"]
            .iter()
            .flat_map(|dir| std::fs::read_dir(deploy.join(dir)).expect("deploy dir"));
        for entry in entries {
            let path = entry.expect("entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            // cdc*.toml are configurations; k8s/cdc.yaml is a manifest.
            if name.starts_with("cdc") && name.ends_with(".toml") {
                let config = load_config(Some(&path))
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                assert!(!config.kafka.topic_prefix.is_empty());
                loaded += 1;
            }
        }
        assert!(loaded >= 3, "every deploy flavour has a cdc config");
    }
}

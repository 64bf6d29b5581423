//! `ficus cdc`: loads the configuration and runs the pipeline until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use ficus_cdc::{CdcConfig, Metrics};

#[derive(Args)]
pub struct CdcArgs {
    /// The cdc configuration file (TOML, YAML or JSON); FICUS_* variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Reads the configuration: the file, then `FICUS_SECTION__KEY` environment variables.
pub fn load_config(path: Option<&std::path::Path>) -> Result<CdcConfig> {
    let mut builder = config::Config::builder();
    if let Some(path) = path {
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
    table.retain(|key, _| matches!(key.as_str(), "source" | "kafka" | "metrics"));
    serde_json::from_value(serde_json::Value::Object(table))
        .with_context(|| format!("invalid cdc configuration {source}"))
}

pub fn run(args: &CdcArgs) -> Result<i32> {
    let config = load_config(args.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let metrics = Metrics::new();
        if let Some(listen) = &config.metrics.listen {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on metrics.listen {listen}"))?;
            tracing::info!(listen, "metrics on /metrics, health on /healthz");
            tokio::spawn(ficus_cdc::metrics::serve(listener, metrics.clone()));
        }
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("stopping: finishing records in flight");
            let _ = stop.send(true);
        });
        ficus_cdc::run(config, metrics, shutdown).await.context("ficus cdc stopped")?;
        Ok(0)
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_cdc_config_loads() {
        let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
        let mut loaded = 0;
        for entry in std::fs::read_dir(examples).expect("examples") {
            let path = entry.expect("entry").path();
            if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("cdc")) {
                let config = load_config(Some(&path))
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                assert!(!config.kafka.topic_prefix.is_empty());
                loaded += 1;
            }
        }
        assert!(loaded >= 1);
    }
}

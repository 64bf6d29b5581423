//! `ficus sink`: loads the sink configuration and keeps the target tables in step with the
//! topics until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use ficus_sink::SinkConfig;

#[derive(Args)]
pub struct SinkArgs {
    /// The sink configuration file (TOML, YAML or JSON); FICUS_SINK_* variables override it
    /// (`FICUS_SINK_POSTGRES__URL`).
    #[arg(long)]
    config: PathBuf,
}

/// Reads the configuration: the file, then `FICUS_SINK_SECTION__KEY` environment variables.
pub fn load_config(path: &std::path::Path) -> Result<SinkConfig> {
    let raw = config::Config::builder()
        .add_source(config::File::from(path).required(true))
        .add_source(
            config::Environment::with_prefix("FICUS_SINK")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .ignore_empty(true),
        )
        .build()
        .with_context(|| format!("cannot read sink configuration {}", path.display()))?
        .try_deserialize::<serde_json::Value>()?;
    SinkConfig::from_value(raw).map_err(|problems| {
        anyhow::anyhow!(
            "invalid sink configuration {}:\n  {}",
            path.display(),
            problems.join("\n  ")
        )
    })
}

pub fn run(args: &SinkArgs) -> Result<i32> {
    let config = load_config(&args.config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            if let Ok(mut term) = signal(SignalKind::terminate()) {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            } else {
                let _ = tokio::signal::ctrl_c().await;
            }
            tracing::info!("stopping: the batch under way is applied or rolled back");
            let _ = stop.send(true);
        });
        let metrics = ficus_sink::Metrics::new();
        crate::cdc_cmd::serve_metrics(config.metrics.listen.as_deref(), &metrics).await?;
        ficus_sink::run(config, metrics, shutdown).await.context("ficus sink stopped")?;
        Ok(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_sink_config_loads() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/sink.toml");
        let config = load_config(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        assert_eq!(config.kafka.name(), "orders-view");
        assert_eq!(config.postgres.map(|p| p.tables.len()), Some(1));
        let webhook = config.webhook.expect("the example delivers to a webhook too");
        assert_eq!(webhook.batch, 100);
        assert_eq!(config.kafka.topics, ["shop.public.orders"]);
    }

    #[test]
    fn the_deployed_sink_configs_load() {
        for file in ["deploy/compose/sink.toml", "deploy/k8s/sink.toml"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
            let config = load_config(&path).unwrap_or_else(|e| panic!("{file}: {e:#}"));
            let postgres = config.postgres.expect("postgres");
            assert_eq!(postgres.tables[0].columns.get("total").map(String::as_str), Some("amount"));
        }
    }
}

//! The `ficus` command: the proxy, the CDC pipeline, route-file tools and the demo.

#![forbid(unsafe_code)]

mod cdc_cmd;

/// glibc's allocator showed up at about 11% of the proxy's profile under load; mimalloc's
/// per-thread free lists suit the many short-lived per-request allocations better.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
mod demo;
mod pg_cluster;
mod ramp_cmd;
mod routes_cmd;
mod sink_cmd;

use std::io::{BufWriter, IsTerminal};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ficus_proxy::ProxySettings;
use tracing_appender::non_blocking::WorkerGuard;

#[derive(Parser)]
#[command(
    name = "ficus",
    version,
    about = "Strangler-fig migrations: move a monolith's routes to new services one share at a time"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "FICUS_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the reverse proxy in front of the legacy app.
    Proxy(ProxyArgs),
    /// Stream PostgreSQL changes to Kafka as Debezium JSON events.
    Cdc(cdc_cmd::CdcArgs),
    /// Keep a service's own PostgreSQL tables in step with the change topics, exactly once.
    Sink(sink_cmd::SinkArgs),
    /// Check or explain a route file.
    #[command(subcommand)]
    Routes(RoutesCommand),
    /// Show or steer the automatic ramps of a running proxy.
    Ramp(ramp_cmd::RampArgs),
    /// Run the whole story locally until Ctrl-C: PostgreSQL, Kafka, a legacy shop, a new
    /// orders service, ficus proxy and ficus cdc.
    Demo(demo::DemoArgs),
    /// Run one of the demo's sample services (shop or orders) on its own.
    Sample(demo::SampleArgs),
}

/// Settings given on the command line win over `FICUS_PROXY__*` variables, which win over
/// the `[proxy]` section of `--config`.
#[derive(Args)]
struct ProxyArgs {
    /// Config file with a `[proxy]` section (TOML, YAML or JSON).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The route file.
    #[arg(long)]
    routes: Option<PathBuf>,
    /// Address for client traffic (HTTP/1.1 and h2c).
    #[arg(long)]
    listen: Option<String>,
    /// Address of the admin API (health, routes, metrics, reload).
    #[arg(long)]
    admin: Option<String>,
    /// Address for TLS client traffic (HTTP/2 and HTTP/1.1 by ALPN); needs --tls-cert and --tls-key.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_listen: Option<String>,
    /// PEM certificate chain for --tls-listen.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-listen.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Worker threads.
    #[arg(long)]
    threads: Option<usize>,
    /// A file holding the token admin writes need (`Authorization: Bearer TOKEN`); without
    /// it, writes are accepted from loopback only.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Where ramp states are kept: `file:PATH` (default: beside the route file).
    #[arg(long)]
    state: Option<String>,
}

#[derive(Subcommand)]
enum RoutesCommand {
    /// Validate route files: a summary line per route, or every error (exit 1).
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Show which route and backend a request would get, and why.
    Explain(routes_cmd::ExplainArgs),
}

fn main() {
    let cli = Cli::parse();
    // The demo prints its own story; only warnings should interrupt it.
    let default_level = if matches!(cli.command, Command::Demo(_)) { "warn" } else { DEFAULT_LOG };
    let proxies = matches!(cli.command, Command::Proxy(_) | Command::Demo(_));
    let log_writer = init_logging(cli.log_format, default_level, proxies);
    // Dropped before the writer's guard, also when `run` panics: the access log's last lines
    // must reach the writer before it shuts down.
    let access_log = AccessLogGuard;
    let result = run(cli.command);
    // Writes out the buffered log lines: `exit` runs no destructors.
    drop(access_log);
    drop(log_writer);
    let code = match result {
        Ok(code) => code,
        // The reader of our output went away (`ficus routes check ... | head`): stop quietly,
        // with the status a shell gives a program SIGPIPE ended.
        Err(e) if broken_pipe(&e) => 141,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

/// Closes the proxy's access log (writing its last lines) when dropped.
struct AccessLogGuard;

impl Drop for AccessLogGuard {
    fn drop(&mut self) {
        ficus_proxy::access_log::close();
    }
}

fn broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run(command: Command) -> Result<i32> {
    match command {
        Command::Proxy(args) => {
            let settings = proxy_settings(&args)?;
            ficus_proxy::run(settings).context("ficus proxy cannot start")?;
            Ok(0)
        }
        Command::Cdc(args) => cdc_cmd::run(&args),
        Command::Sink(args) => sink_cmd::run(&args),
        Command::Routes(RoutesCommand::Check { files }) => routes_cmd::check(&files),
        Command::Routes(RoutesCommand::Explain(args)) => routes_cmd::explain(&args),
        Command::Ramp(args) => ramp_cmd::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Sample(args) => demo::run_sample(&args),
    }
}

/// Layers the proxy settings: `--config` file, then environment, then flags.
fn proxy_settings(args: &ProxyArgs) -> Result<ProxySettings> {
    let mut builder = config::Config::builder();
    if let Some(path) = &args.config {
        builder = builder.add_source(config::File::from(path.as_path()).required(true));
    }
    builder = builder.add_source(
        config::Environment::with_prefix("FICUS")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true),
    );
    let flags: [(&str, Option<String>); 9] = [
        ("proxy.routes", args.routes.as_ref().map(|p| p.display().to_string())),
        ("proxy.listen", args.listen.clone()),
        ("proxy.admin", args.admin.clone()),
        ("proxy.tls.listen", args.tls_listen.clone()),
        ("proxy.tls.cert", args.tls_cert.as_ref().map(|p| p.display().to_string())),
        ("proxy.tls.key", args.tls_key.as_ref().map(|p| p.display().to_string())),
        ("proxy.threads", args.threads.map(|t| t.to_string())),
        ("proxy.admin_token_file", args.admin_token_file.as_ref().map(|p| p.display().to_string())),
        ("proxy.state", args.state.clone()),
    ];
    for (key, value) in flags {
        if let Some(value) = value {
            builder = builder.set_override(key, value)?;
        }
    }
    let source = args
        .config
        .as_ref()
        .map_or("flags and environment".to_string(), |p| p.display().to_string());
    let settings: ProxySettings =
        builder.build().and_then(|c| c.get("proxy")).with_context(|| {
            format!("invalid proxy settings (from {source}); --routes FILE is required")
        })?;
    Ok(settings)
}

/// Pingora's own info lines (service start and stop) are noise next to ficus's.
const DEFAULT_LOG: &str = "info,pingora_core=warn,pingora_proxy=warn";

/// Logs to standard error, with the proxy's access log when `access_log`. Returns the guard of
/// the writer thread; dropping it flushes.
fn init_logging(format: LogFormat, default_level: &str, access_log: bool) -> WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // A background thread writes the lines through a buffer, flushed whenever it has caught
    // up, so the caller pays no write(2) each; if it falls behind, lines are dropped rather
    // than callers held up: past 1,024 waiting writes (a write is a line, or a batch of up to
    // 64 KiB of access lines), so a stalled stderr holds at most about 64 MiB.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(1024)
        .finish(BufWriter::new(std::io::stderr()));
    if access_log {
        // The access log hands the same writer batches of lines, not one line per request.
        let access_format = match format {
            LogFormat::Text => ficus_proxy::access_log::Format::Text,
            LogFormat::Json => ficus_proxy::access_log::Format::Json,
        };
        ficus_proxy::access_log::install(access_format, Box::new(writer.clone()));
    }
    // Colours only for a person at a terminal: escape codes garble files and the journal.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    guard
}

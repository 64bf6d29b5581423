//! `ficus ramp`: the status of a running proxy's ramps, and the operator's commands (pause,
//! resume, rollback, advance), through its admin API.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::Value;

#[derive(Args)]
pub struct RampArgs {
    #[command(subcommand)]
    command: RampCommand,
    /// The proxy's admin API.
    #[arg(long, global = true, default_value = "http://127.0.0.1:9901")]
    admin: String,
    /// A file holding the admin token (`proxy.admin_token_file` of the proxy).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum RampCommand {
    /// Every ramp (or one), with its step, figures, limits and why it is where it is.
    Status { route: Option<String> },
    /// Stop advancing; the share stays.
    Pause { route: String },
    /// Go on after a pause, a hold or a rollback (from the first step).
    Resume { route: String },
    /// Everyone back on `from`, at once.
    Rollback { route: String },
    /// Skip the rest of the hold (the limits still apply unless --force).
    Advance {
        route: String,
        #[arg(long)]
        force: bool,
    },
}

pub fn run(args: &RampArgs) -> Result<i32> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: &RampArgs) -> Result<i32> {
    let admin = args.admin.trim_end_matches('/');
    let client = reqwest::Client::new();
    let (route, command) = match &args.command {
        RampCommand::Status { route } => {
            let url = format!("{admin}/routes");
            let routes: Value = client
                .get(&url)
                .send()
                .await
                .with_context(|| format!("cannot reach the admin API at {url}"))?
                .error_for_status()?
                .json()
                .await?;
            return Ok(print_status(&routes, route.as_deref())?);
        }
        RampCommand::Pause { route } => (route, "pause"),
        RampCommand::Resume { route } => (route, "resume"),
        RampCommand::Rollback { route } => (route, "rollback"),
        RampCommand::Advance { route, .. } => (route, "advance"),
    };
    // The route name is one path segment, escaped: names may hold spaces, `/` or `?`.
    let mut url = reqwest::Url::parse(admin)
        .with_context(|| format!("--admin {admin} is not a URL (http://HOST:PORT)"))?;
    url.path_segments_mut()
        .map_err(|()| anyhow::anyhow!("--admin {admin} is not an http URL"))?
        .pop_if_empty()
        .extend(["routes", route.as_str(), command]);
    if matches!(args.command, RampCommand::Advance { force: true, .. }) {
        url.set_query(Some("force=true"));
    }
    let mut request = client.post(url.clone()).header("content-type", "application/json");
    if let Some(file) = &args.token_file {
        let token = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the token file {}", file.display()))?;
        request = request.bearer_auth(token.trim());
    }
    let response =
        request.send().await.with_context(|| format!("cannot reach the admin API at {url}"))?;
    let status = response.status();
    let body = response.text().await?;
    let answer: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    if !status.is_success() {
        let why = answer["error"].as_str().map_or(body.trim(), |e| e);
        bail!("{route}: {status}: {why}");
    }
    writeln!(
        std::io::stdout().lock(),
        "{route}: {} at {}%: {}",
        answer["status"].as_str().unwrap_or("?"),
        answer["percent"],
        answer["reason"].as_str().unwrap_or("")
    )?;
    Ok(0)
}

/// Prints the ramps of `GET /routes`; exit code 1 when the wanted route has none.
fn print_status(routes: &Value, wanted: Option<&str>) -> std::io::Result<i32> {
    let mut out = std::io::stdout().lock();
    let mut shown = 0;
    for route in routes["routes"].as_array().into_iter().flatten() {
        let name = route["name"].as_str().unwrap_or("?");
        if wanted.is_some_and(|w| w != name) || route["ramp"].is_null() {
            continue;
        }
        shown += 1;
        write!(out, "{}", describe(name, route))?;
    }
    if shown == 0 {
        match wanted {
            Some(route) => eprintln!("no route \"{route}\" with a ramp"),
            None => eprintln!("no route has a ramp"),
        }
        return Ok(1);
    }
    Ok(0)
}

/// One ramp in a few readable lines.
fn describe(name: &str, route: &Value) -> String {
    let ramp = &route["ramp"];
    let steps: Vec<String> =
        ramp["steps"].as_array().into_iter().flatten().map(|s| format!("{s}")).collect();
    let side = |s: &Value| {
        let p99 = s["p99_ms"].as_f64().map_or("-".to_string(), |p| format!("{p:.1} ms"));
        let answers = s["answers"].as_u64().unwrap_or(0);
        let failed = s["failures"].as_u64().unwrap_or(0);
        let percent = if answers == 0 { 0.0 } else { 100.0 * failed as f64 / answers as f64 };
        format!("{answers} answers, {percent:.2}% failed, p99 {p99}")
    };
    let figures = |f: &Value| {
        format!(
            "`to` {}; `from` {}; {} comparisons, {} mismatched",
            side(&f["to"]),
            side(&f["from"]),
            f["compared"],
            f["mismatched"]
        )
    };
    let limit = |key: &str, unit: &str| {
        ramp["limits"][key].as_f64().map_or("none".to_string(), |l| format!("{l}{unit}"))
    };
    let mut out = format!(
        "{name}: {} at {}% ({} -> {}), steps {}\n",
        ramp["status"].as_str().unwrap_or("?"),
        ramp["percent"],
        route["from"].as_str().unwrap_or("?"),
        route["to"].as_str().unwrap_or("?"),
        steps.join(", ")
    );
    out += &format!(
        "  on this step {}s (hold {}s, {} answers from `to` needed): {}\n",
        ramp["on_step_seconds"],
        ramp["hold_seconds"],
        ramp["min_requests"],
        figures(&ramp["step"])
    );
    out += &format!("  last {}s: {}\n", ramp["window_seconds"], figures(&ramp["window"]));
    out += &format!(
        "  limits: error rate +{} points over `from`, p99 {}, mismatches {}\n",
        limit("max_error_rate", ""),
        limit("max_p99_ratio", "x"),
        limit("max_mismatch_rate", "%")
    );
    if let Some(waiting) = ramp["waiting"].as_str().filter(|w| !w.is_empty()) {
        out += &format!("  waiting: {waiting}\n");
    }
    out += &format!("  last transition: {}\n", ramp["reason"].as_str().unwrap_or(""));
    out
}

//! `ficus routes check` and `ficus routes explain`.

use std::io::Write;
use std::net::IpAddr;
use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use ficus_routes::{RouteTable, SimpleRequest};

#[derive(Args)]
pub struct ExplainArgs {
    /// The route file.
    file: PathBuf,
    /// The request method, such as GET.
    method: String,
    /// The request path, with an optional query string.
    path: String,
    /// A request header, as 'Name: value'; repeat for more.
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// The client's IP address, for routes sticky by ip.
    #[arg(long)]
    client_ip: Option<IpAddr>,
}

/// Prints a summary per route of each valid file and every error of each invalid one.
/// Returns the exit code: 0 when all files are valid, 1 otherwise.
pub fn check(files: &[PathBuf]) -> Result<i32> {
    let mut out = std::io::stdout().lock();
    let mut code = 0;
    for file in files {
        match RouteTable::load(file) {
            Ok(table) => print_summary(&mut out, file, &table)?,
            Err(e) => {
                code = 1;
                for message in e.messages() {
                    writeln!(out, "{message}")?;
                }
            }
        }
    }
    Ok(code)
}

fn print_summary(out: &mut impl Write, file: &Path, table: &RouteTable) -> std::io::Result<()> {
    writeln!(
        out,
        "{}: ok: {} routes, {} backends, default backend {}, version {}",
        file.display(),
        table.routes.len(),
        table.backends.len(),
        table.backends[table.default_backend].name,
        table.version
    )?;
    // Not an error: the file may be checked on a machine that is not where it will run.
    for backend in &table.backends {
        if (backend.host.as_str(), backend.port).to_socket_addrs().is_err() {
            writeln!(
                out,
                "  warning: backends.{}: host {} does not resolve here; the proxy refuses a table whose hosts do not resolve",
                backend.name, backend.host
            )?;
        }
    }
    for route in &table.routes {
        let unsafe_methods =
            route.shadow.iter().flat_map(|s| s.unsafe_methods()).collect::<Vec<_>>();
        if !unsafe_methods.is_empty() {
            writeln!(
                out,
                "  warning: routes \"{}\": shadow.methods has {}: each such request reaches both backends (the copy carries X-Ficus-Shadow: 1); make sure the shadowed side skips its side effects",
                route.name,
                unsafe_methods.join(", ")
            )?;
        }
        writeln!(
            out,
            "  {}: {} -> {:.2}% to {}, rest on {} (sticky {}){}",
            route.name,
            route.matcher.describe(),
            route.percent(),
            table.backends[route.to].name,
            table.backends[route.from].name,
            route.sticky,
            route.shadow.as_ref().map_or(String::new(), |shadow| format!(
                "; shadow {:.2}% of {}",
                f64::from(shadow.threshold) / 100.0,
                shadow.methods.join(",")
            ))
        )?;
    }
    Ok(())
}

pub fn explain(args: &ExplainArgs) -> Result<i32> {
    let mut out = std::io::stdout().lock();
    let table = match RouteTable::load(&args.file) {
        Ok(table) => table,
        Err(e) => {
            for message in e.messages() {
                writeln!(out, "{message}")?;
            }
            return Ok(1);
        }
    };
    // The proxy's normalisation, so that the answer is what the proxy does.
    let (raw_path, query) = match args.path.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (args.path.as_str(), None),
    };
    let path = match table.request_path(raw_path) {
        Ok(normal) => normal,
        Err(e) => {
            writeln!(out, "request: {} {}", args.method.to_ascii_uppercase(), args.path)?;
            writeln!(out, "refused: 400 ({e})")?;
            return Ok(1);
        }
    };
    if path != raw_path {
        writeln!(out, "path:    {raw_path} normalised to {path}")?;
    }
    let target = query.map_or_else(|| path.to_string(), |query| format!("{path}?{query}"));
    let mut request = SimpleRequest::new(&args.method, &target);
    request.client_ip = args.client_ip;
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .with_context(|| format!("header \"{header}\" is not 'Name: value'"))?;
        request = request.with_header(name.trim(), value.trim());
    }
    write!(out, "{}", ficus_routes::explain(&table, &request))?;
    Ok(0)
}

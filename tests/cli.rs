//! The `ficus` command line: `routes check`, `routes explain`, and start-up refusal of a bad
//! route file.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::ficus;

const BACKENDS: &str = r#"
[backends.monolith]
url = "http://127.0.0.1:8080"
[backends.orders]
url = "http://127.0.0.1:9001"
[defaults]
backend = "monolith"
"#;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

fn run(args: &[&str]) -> Output {
    ficus().args(args).output().expect("run ficus")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn route(fields: &str) -> String {
    format!("{BACKENDS}\n[[routes]]\nname = \"orders\"\nmatch = {{ path_prefix = \"/api/orders\" }}\n{fields}\n")
}

#[test]
fn check_prints_a_summary_per_route_and_exits_zero() {
    let dir = tempfile::tempdir().expect("dir");
    let file = write(
        dir.path(),
        "routes.toml",
        &route("to = \"orders\"\npercent = 25\nsticky = \"header:x-user-id\""),
    );
    let output = run(&["routes", "check", file.to_str().expect("path")]);
    assert!(output.status.success(), "{output:?}");
    let text = stdout(&output);
    assert!(text.contains("ok: 1 routes, 2 backends"), "{text}");
    assert!(text.contains("orders: path_prefix /api/orders -> 25.00% to orders, rest on monolith (sticky header:x-user-id)"), "{text}");
}

#[test]
fn check_reports_each_kind_of_bad_input_with_file_route_and_field() {
    let dir = tempfile::tempdir().expect("dir");
    let cases: [(&str, String, &str); 7] = [
        ("unknown-backend.toml", route("to = \"ordres\"\npercent = 5"), "routes[0] \"orders\": to: unknown backend \"ordres\""),
        ("percent.toml", route("to = \"orders\"\npercent = 101"), "routes[0] \"orders\": percent: 101 is outside 0..=100"),
        ("regex.toml", format!("{BACKENDS}\n[[routes]]\nname = \"r\"\nmatch = {{ path_regex = \"[a-\" }}\nto = \"orders\"\npercent = 1\n"), "routes[0] \"r\": match.path_regex: bad regex"),
        ("duplicate.toml", format!("{}{}", route("to = \"orders\"\npercent = 1"), "[[routes]]\nname = \"orders\"\nmatch = {}\nto = \"orders\"\npercent = 2\n"), "routes[1] \"orders\": name: duplicate route name \"orders\""),
        ("url.toml", "[backends.monolith]\nurl = \"not a url\"\n[defaults]\nbackend = \"monolith\"\n".into(), "backends.monolith: url: malformed URL \"not a url\""),
        ("unknown-key.toml", route("to = \"orders\"\npercent = 1\nweight = 3"), "routes[0] \"orders\": unknown field `weight`"),
        ("malformed.toml", "[backends\n".into(), "malformed.toml: "),
    ];
    for (name, text, expected) in cases {
        let file = write(dir.path(), name, &text);
        let output = run(&["routes", "check", file.to_str().expect("path")]);
        assert_eq!(output.status.code(), Some(1), "{name}: {output:?}");
        let text = stdout(&output);
        assert!(
            text.contains(&format!("{}: {expected}", file.display())) || text.contains(expected),
            "{name}: {text}"
        );
    }
}

#[test]
fn check_prints_every_error_of_a_file() {
    let dir = tempfile::tempdir().expect("dir");
    let text = format!(
        "{BACKENDS}\n[[routes]]\nname = \"a\"\nmatch = {{}}\nto = \"x\"\npercent = 200\n[[routes]]\nname = \"b\"\nmatch = {{ path_regex = \"(\" }}\nto = \"orders\"\npercent = 1\n"
    );
    let file = write(dir.path(), "routes.toml", &text);
    let output = run(&["routes", "check", file.to_str().expect("path")]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stdout(&output).lines().count(), 3, "{}", stdout(&output));
}

#[test]
fn yaml_and_json_route_files_are_checked_by_extension() {
    let dir = tempfile::tempdir().expect("dir");
    let yaml = write(dir.path(), "routes.yaml", "backends:\n  monolith: { url: \"http://127.0.0.1:1\" }\ndefaults: { backend: monolith }\nroutes: []\n");
    let json = write(
        dir.path(),
        "routes.json",
        r#"{"backends": {"monolith": {"url": "http://127.0.0.1:1"}}, "defaults": {"backend": "monolith"}}"#,
    );
    let output =
        run(&["routes", "check", yaml.to_str().expect("path"), json.to_str().expect("path")]);
    assert!(output.status.success(), "{output:?}");
    let other = write(dir.path(), "routes.ini", "x");
    let output = run(&["routes", "check", other.to_str().expect("path")]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout(&output).contains("unknown file extension"));
}

#[test]
fn explain_names_route_key_bucket_backend_and_why() {
    let dir = tempfile::tempdir().expect("dir");
    let file = write(
        dir.path(),
        "routes.toml",
        &route("to = \"orders\"\npercent = 100\nsticky = \"header:x-user-id\""),
    );
    let output = run(&[
        "routes",
        "explain",
        file.to_str().expect("path"),
        "GET",
        "/api/orders/7",
        "-H",
        "X-User-Id: 42",
    ]);
    assert!(output.status.success(), "{output:?}");
    let text = stdout(&output);
    assert!(text.contains("route:   orders (routes[0]: path_prefix /api/orders)"), "{text}");
    assert!(text.contains("sticky:  header:x-user-id = \"42\""), "{text}");
    assert!(text.contains("bucket:  "), "{text}");
    assert!(text.contains("backend: orders"), "{text}");
    assert!(text.contains("why:     bucket "), "{text}");

    let output = run(&["routes", "explain", file.to_str().expect("path"), "GET", "/other"]);
    let text = stdout(&output);
    assert!(text.contains("backend: monolith") && text.contains("defaults.backend"), "{text}");
}

#[test]
fn proxy_refuses_to_start_on_a_bad_route_file() {
    let dir = tempfile::tempdir().expect("dir");
    let file = write(dir.path(), "routes.toml", &route("to = \"ordres\"\npercent = 500"));
    let output = run(&[
        "proxy",
        "--routes",
        file.to_str().expect("path"),
        "--listen",
        &common::free_addr().to_string(),
        "--admin",
        &common::free_addr().to_string(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("to: unknown backend \"ordres\""), "{stderr}");
    assert!(stderr.contains("percent: 500 is outside 0..=100"), "{stderr}");
}

#[test]
fn proxy_settings_come_from_a_config_file_and_environment() {
    let dir = tempfile::tempdir().expect("dir");
    let routes = write(dir.path(), "routes.toml", &route("to = \"ordres\"\npercent = 1"));
    let config = write(
        dir.path(),
        "ficus.toml",
        &format!("[proxy]\nroutes = \"{}\"\nlisten = \"127.0.0.1:0\"\n", routes.display()),
    );
    // The route file named by the config is loaded (and rejected): the config was read.
    let output = run(&["proxy", "--config", config.to_str().expect("path")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown backend \"ordres\""), "{stderr}");
    // An unknown setting from the environment is an error that names it.
    let output = ficus()
        .args(["proxy", "--config", config.to_str().expect("path")])
        .env("FICUS_PROXY__LISTN", "x")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("listn"), "{stderr}");
}

#[test]
fn every_example_route_file_passes_check() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut checked = 0;
    let entries = ["examples", "compose", "k8s"]
        .iter()
        .flat_map(|dir| std::fs::read_dir(deploy.join(dir)).expect("deploy dir"));
    for entry in entries {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with("routes") {
            let output = run(&["routes", "check", path.to_str().expect("path")]);
            assert!(output.status.success(), "{}: {}", path.display(), stdout(&output));
            checked += 1;
        }
    }
    assert!(checked >= 3, "every deploy flavour has a route file");
}

#[test]
fn shadow_policies_are_validated_explained_and_unsafe_methods_warned() {
    let dir = tempfile::tempdir().expect("dir");
    let shadow = "to = \"orders\"\npercent = 10\n[routes.shadow]\npercent = 50\nmethods = [\"GET\", \"POST\"]";
    let file = write(dir.path(), "routes.toml", &route(shadow));
    let output = run(&["routes", "check", file.to_str().expect("path")]);
    assert!(output.status.success(), "{output:?}");
    let text = stdout(&output);
    assert!(
        text.contains("warning: routes \"orders\": shadow.methods has POST: each such request reaches both backends"),
        "{text}"
    );
    assert!(text.contains("(sticky cookie:ficus_id); shadow 50.00% of GET,POST"), "{text}");

    let path = file.to_str().expect("path");
    let text = stdout(&run(&["routes", "explain", path, "GET", "/api/orders/7"]));
    assert!(
        text.contains("shadow:  50.00% of GET requests are also sent to the backend not serving them (\"orders\" when \"monolith\" serves, \"monolith\" when \"orders\" does)"),
        "{text}"
    );
    let text = stdout(&run(&["routes", "explain", path, "DELETE", "/api/orders/7"]));
    assert!(text.contains("shadow:  not for DELETE (shadow.methods: GET, POST)"), "{text}");

    let bad = "to = \"orders\"\npercent = 10\n[routes.shadow]\npercent = 0.001\nmethods = [\"FETCH\"]\nignore = [\"items\"]\nmax_body = \"1GiB\"\nmax_in_flight = 0\ntimeout = \"0s\"";
    let file = write(dir.path(), "bad.toml", &route(bad));
    let output = run(&["routes", "check", file.to_str().expect("path")]);
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    for expected in [
        "shadow.percent: 0.001 is not a multiple of 0.01",
        "shadow.methods: unknown HTTP method \"FETCH\"",
        "shadow.ignore: \"items\" is not a JSON pointer: it must start with /",
        "shadow.max_body: 1.0 GiB is above the most ficus holds per answer, 64 MiB",
        "shadow.max_in_flight: must be at least 1",
        "shadow.timeout: must be longer than 0",
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
}

#[test]
fn ramps_are_validated_with_every_error() {
    let dir = tempfile::tempdir().expect("dir");
    let both = "to = \"orders\"\npercent = 10\n[routes.ramp]\nsteps = [1]\nhold = \"1m\"\nmin_requests = 10";
    let file = write(dir.path(), "both.toml", &route(both));
    let text = stdout(&run(&["routes", "check", file.to_str().expect("path")]));
    assert!(text.contains("percent: give either `percent` or `[routes.ramp]`, not both"), "{text}");

    let bad = "to = \"orders\"\n[routes.ramp]\nsteps = [5, 5, 0.001]\nhold = \"1m\"\nmin_requests = 0\nmax_error_rate = -1\nmax_mismatch_rate = 1\non_breach = \"panic\"";
    let file = write(dir.path(), "bad.toml", &route(bad));
    let output = run(&["routes", "check", file.to_str().expect("path")]);
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    for expected in [
        "ramp.steps: must increase and stay above 0; 5 does not",
        "ramp.steps: 0.001 is not a multiple of 0.01",
        "ramp.min_requests: must be at least 1",
        "ramp.max_error_rate: must be a number of 0 or more",
        "ramp.max_mismatch_rate: needs [routes.shadow]",
        "ramp.on_breach: \"panic\" is neither \"rollback\" nor \"hold\"",
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
    let neither = write(dir.path(), "neither.toml", &route("to = \"orders\""));
    let text = stdout(&run(&["routes", "check", neither.to_str().expect("path")]));
    assert!(text.contains("percent: missing: give `percent` or `[routes.ramp]`"), "{text}");
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().expect("dir");
    let routes: String = (0..2000)
        .map(|i| format!("[[routes]]\nname = \"r{i}\"\nmatch = {{ path_prefix = \"/p{i}\" }}\nto = \"orders\"\npercent = 1\n"))
        .collect();
    let file = write(dir.path(), "routes.toml", &format!("{BACKENDS}{routes}"));
    // As `ficus routes check routes.toml | head -1` once head has exited.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let output = ficus()
        .args(["routes", "check"])
        .arg(&file)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run ficus");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(output.status.code(), Some(141), "{stderr}");
}

#[test]
fn a_host_that_does_not_resolve_is_a_warning_for_check_and_refused_by_the_proxy() {
    let dir = tempfile::tempdir().expect("dir");
    let routes = BACKENDS.replace("http://127.0.0.1:9001", "http://orders.invalid:9001")
        + "[[routes]]\nname = \"orders\"\nmatch = {}\nto = \"orders\"\npercent = 5\n";
    let file = write(dir.path(), "routes.toml", &routes);
    let path = file.to_str().expect("path");
    // Checked elsewhere than where it runs, the file is valid: a warning, not an error.
    let output = run(&["routes", "check", path]);
    let text = stdout(&output);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("warning: backends.orders: host orders.invalid does not resolve here"),
        "{text}"
    );
    // Where it runs, the proxy cannot send to it: refused at start, naming the backend.
    let (listen, admin) = (common::free_addr().to_string(), common::free_addr().to_string());
    let output = run(&["proxy", "--routes", path, "--listen", &listen, "--admin", &admin]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("backends.orders") && stderr.contains("cannot resolve orders.invalid:9001"),
        "{stderr}"
    );
}

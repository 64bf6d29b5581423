//! A real headless Chromium driven over the DevTools protocol: open a page at a given screen
//! size, evaluate JavaScript in it, click and type as a user does (input events at the
//! element's place on screen), take screenshots, and collect everything the page reports as an
//! error (console errors, uncaught exceptions, failed loads).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::PATIENCE;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, String>>>>>;

/// A headless Chromium with its own profile directory, killed when dropped.
pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    sink: tokio::sync::Mutex<SplitSink<Socket, Message>>,
    pending: Pending,
    next_id: AtomicU64,
    /// What the page reported as an error, in order.
    errors: Arc<Mutex<Vec<String>>>,
}

impl Browser {
    /// Starts Debian's `chromium` (installed by `scripts/install-deps`).
    pub async fn start() -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let mut command = Command::new("chromium");
        command.args([
            "--headless=new",
            "--remote-debugging-port=0",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--disable-extensions",
            "--hide-scrollbars",
            "--font-render-hinting=none",
            // Nothing from the network at start: with no route out, Chromium's background
            // fetches (component updates, sync, lookups of Google's hosts) are refused or wait
            // on the resolver, and a start that waited on them overran the test's patience.
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            // Debian's launcher decides this by testing /dev/shm's free space, and that test
            // failed on a CI machine ("[: ...: unexpected operator"): decided here instead.
            "--disable-dev-shm-usage",
        ]);
        command.arg(format!("--user-data-dir={}", profile.path().display()));
        // Chromium's sandbox refuses to run as root (as in a CI container).
        if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
            command.arg("--no-sandbox");
        }
        // Its complaints, kept beside the profile, for a start that fails.
        let log = profile.path().join("chromium.log");
        let stderr = std::fs::File::create(&log).expect("chromium log");
        let mut child = command
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn chromium (scripts/install-deps installs it)");
        let endpoint = devtools_endpoint(profile.path(), &mut child, &log).await;
        let (socket, _) = tokio_tungstenite::connect_async(endpoint.as_str())
            .await
            .expect("connect to chromium's DevTools");
        let (sink, mut stream) = socket.split();
        let pending: Pending = Arc::default();
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let (replies, reported) = (pending.clone(), errors.clone());
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                let Message::Text(text) = message else { continue };
                let Ok(message) = serde_json::from_str::<Value>(&text) else { continue };
                if let Some(id) = message["id"].as_u64() {
                    let reply = match message.get("error") {
                        Some(error) => Err(error.to_string()),
                        None => Ok(message["result"].clone()),
                    };
                    if let Some(waiter) = replies.lock().expect("pending").remove(&id) {
                        let _ = waiter.send(reply);
                    }
                } else if let Some(error) = page_error(&message) {
                    reported.lock().expect("errors").push(error);
                }
            }
        });
        Browser {
            child,
            _profile: profile,
            sink: tokio::sync::Mutex::new(sink),
            pending,
            next_id: AtomicU64::new(1),
            errors,
        }
    }

    /// Sends one DevTools command (to a page's session if `session` is given) and waits for
    /// its result.
    async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending").insert(id, tx);
        self.sink
            .lock()
            .await
            .send(Message::text(message.to_string()))
            .await
            .expect("send to chromium");
        match tokio::time::timeout(PATIENCE, rx).await {
            Ok(Ok(Ok(result))) => result,
            Ok(Ok(Err(error))) => panic!("{method} failed: {error}"),
            _ => panic!("chromium did not answer {method}"),
        }
    }

    /// Opens `url` in a new tab whose screen is `width` x `height` CSS pixels (a phone's when
    /// narrower than 600), once the page has loaded.
    pub async fn open(&self, url: &str, width: u32, height: u32) -> Page<'_> {
        let target = self.call(None, "Target.createTarget", json!({"url": "about:blank"})).await;
        let target_id = target["targetId"].as_str().expect("target id").to_string();
        let attached = self
            .call(None, "Target.attachToTarget", json!({"targetId": target_id, "flatten": true}))
            .await;
        let session = attached["sessionId"].as_str().expect("session id").to_string();
        let page = Page { browser: self, session };
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            page.call(domain, json!({})).await;
        }
        page.resize(width, height).await;
        page.call("Page.navigate", json!({"url": url})).await;
        page.wait_for("document.readyState === 'complete'").await;
        page
    }

    /// Everything pages reported as an error so far.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().expect("errors").clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tab of the browser.
pub struct Page<'a> {
    browser: &'a Browser,
    session: String,
}

impl Page<'_> {
    async fn call(&self, method: &str, params: Value) -> Value {
        self.browser.call(Some(&self.session), method, params).await
    }

    /// Sets the screen size, as a phone's when narrower than 600 CSS pixels.
    pub async fn resize(&self, width: u32, height: u32) {
        let params = json!({
            "width": width,
            "height": height,
            "deviceScaleFactor": 1,
            "mobile": width < 600,
        });
        self.call("Emulation.setDeviceMetricsOverride", params).await;
    }

    /// The value of a JavaScript expression (awaited if it is a promise).
    pub async fn eval(&self, expression: &str) -> Value {
        let params = json!({"expression": expression, "returnByValue": true, "awaitPromise": true});
        let result = self.call("Runtime.evaluate", params).await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression} threw: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Waits until `expression` is truthy, and returns its value.
    pub async fn wait_for(&self, expression: &str) -> Value {
        self.wait_for_within(expression, PATIENCE).await
    }

    pub async fn wait_for_within(&self, expression: &str, patience: Duration) -> Value {
        let deadline = Instant::now() + patience;
        loop {
            let value = self.eval(expression).await;
            let truthy = !matches!(&value, Value::Null | Value::Bool(false))
                && value != json!(0)
                && value != json!("");
            if truthy {
                return value;
            }
            assert!(Instant::now() < deadline, "not true within {patience:?}: {expression}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The text of the first element `selector` matches ("" if none does).
    pub async fn text(&self, selector: &str) -> String {
        let expression = format!("document.querySelector({})?.textContent ?? ''", json!(selector));
        self.eval(&expression).await.as_str().unwrap_or_default().to_string()
    }

    /// Clicks the middle of the element `selector` matches, with the mouse, as a user does:
    /// once that element is the one on top there (not covered, not moving under a redraw).
    pub async fn click(&self, selector: &str) {
        let expression = format!(
            "(() => {{ const el = document.querySelector({}); if (!el) return null;
               el.scrollIntoView({{block: 'center'}}); const r = el.getBoundingClientRect();
               const [x, y] = [r.x + r.width / 2, r.y + r.height / 2];
               return el.contains(document.elementFromPoint(x, y)) ? [x, y] : null; }})()",
            json!(selector)
        );
        let point = self.wait_for(&expression).await;
        let (x, y) = (point[0].as_f64().expect("x"), point[1].as_f64().expect("y"));
        for kind in ["mousePressed", "mouseReleased"] {
            let event = json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1});
            self.call("Input.dispatchMouseEvent", event).await;
        }
    }

    /// Types `text` into the focused element.
    pub async fn type_text(&self, text: &str) {
        self.call("Input.insertText", json!({"text": text})).await;
    }

    /// Saves a PNG of the whole page (beyond the screen's height) to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let params = json!({"format": "png", "captureBeyondViewport": true});
        let shot = self.call("Page.captureScreenshot", params).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64 screenshot");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("artifact dir");
        }
        std::fs::write(path, png).expect("write screenshot");
    }
}

/// Where tests leave files for people to look at: `FICUS_ARTIFACTS`, or `target/artifacts`.
pub fn artifacts_dir() -> PathBuf {
    std::env::var_os("FICUS_ARTIFACTS").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .map_or_else(|| PathBuf::from("artifacts"), |target| target.join("artifacts"))
    })
}

/// The browser's DevTools address, which Chromium writes to its profile once it listens;
/// a browser that exits or does not listen in time fails the test with what it said.
async fn devtools_endpoint(profile: &Path, child: &mut Child, log: &Path) -> String {
    let file = profile.join("DevToolsActivePort");
    let deadline = Instant::now() + PATIENCE;
    let said = || std::fs::read_to_string(log).unwrap_or_default();
    loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            let mut lines = text.lines();
            if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                return format!("ws://127.0.0.1:{port}{path}");
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("chromium exited ({status}) before listening:\n{}", said());
        }
        assert!(Instant::now() < deadline, "chromium wrote no {}:\n{}", file.display(), said());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The error a DevTools event reports, if it is one: a console error, an uncaught exception,
/// or a log entry at error level (a failed load, a refused script).
fn page_error(event: &Value) -> Option<String> {
    let params = &event["params"];
    match event["method"].as_str()? {
        "Runtime.consoleAPICalled" if params["type"] == "error" || params["type"] == "assert" => {
            let args: Vec<String> = params["args"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| a["value"].as_str().map_or_else(|| a.to_string(), str::to_string))
                .collect();
            Some(format!("console.error: {}", args.join(" ")))
        }
        "Runtime.exceptionThrown" => {
            let details = &params["exceptionDetails"];
            let text = details["exception"]["description"]
                .as_str()
                .or(details["text"].as_str())
                .unwrap_or("exception");
            Some(format!("uncaught: {text}"))
        }
        "Log.entryAdded" if params["entry"]["level"] == "error" => {
            let entry = &params["entry"];
            Some(format!(
                "{} error: {} {}",
                entry["source"].as_str().unwrap_or("log"),
                entry["text"].as_str().unwrap_or(""),
                entry["url"].as_str().unwrap_or("")
            ))
        }
        _ => None,
    }
}

//! The access log: one line per proxied request, written without the general-purpose
//! formatter and handed to the log writer in batches.
//!
//! Through `tracing`, every line went through the formatting machinery and one channel send
//! each, which woke the writer thread once per request: about a tenth of the proxy's
//! throughput, half of it the writer's system calls. Here a request appends its line to a
//! shared buffer; the buffer goes to the writer when it holds [`BATCH`] bytes, and at least
//! every [`FLUSH_EVERY`] otherwise (nginx's `access_log ... buffer= flush=`). The lines keep the
//! shape `tracing` gave them, in text and in JSON, and `RUST_LOG` still turns them off
//! (`ficus::access=off`).
//!
//! The binary [`install`]s the log with its writer; without that (the proxy as a library) the
//! lines go through `tracing` as before.

use std::io::Write;
use std::net::IpAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Bytes of lines gathered before they go to the writer (about four hundred lines): each
/// batch wakes the writer thread, which cost more than the lines' formatting at 16 KiB
/// batches. nginx's `buffer=` is 64k too.
pub const BATCH: usize = 64 * 1024;
/// The longest a line waits in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// How lines are written: as `tracing-subscriber` writes its text and JSON events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// What one line says about a request.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// The status sent to the client, 0 for none.
    pub status: u16,
    pub outcome: &'a str,
    pub route: &'a str,
    pub backend: &'a str,
    pub fallback: Option<&'a str>,
    pub client: Option<IpAddr>,
    pub duration: Duration,
    pub error: Option<&'a str>,
}

/// The installed log.
pub struct AccessLog {
    format: Format,
    /// One lock for the lines and their writer, so batches reach the writer in the order
    /// their lines were recorded, and nothing is recorded once the log is closed.
    state: Mutex<State>,
}

struct State {
    pending: Vec<u8>,
    writer: Box<dyn Write + Send>,
    closed: bool,
}

static INSTALLED: OnceLock<AccessLog> = OnceLock::new();

/// Sends access-log lines to `writer` from now on, and starts the thread that writes what
/// waits longer than [`FLUSH_EVERY`]. Returns false if a log was installed already.
pub fn install(format: Format, writer: Box<dyn Write + Send>) -> bool {
    if INSTALLED.set(AccessLog::new(format, writer)).is_err() {
        return false;
    }
    let started = std::thread::Builder::new().name("ficus access log".into()).spawn(|| loop {
        std::thread::sleep(FLUSH_EVERY);
        if let Some(log) = INSTALLED.get() {
            log.write_pending(false);
        }
    });
    if let Err(e) = started {
        tracing::warn!(error = %e, "cannot start the access log's flusher; lines wait for a full batch");
    }
    true
}

/// The installed log, if any.
pub fn installed() -> Option<&'static AccessLog> {
    INSTALLED.get()
}

/// Writes the lines still waiting and records none after them: at exit, before the log
/// writer's own guard is dropped (a later batch would queue behind its shutdown and be lost).
pub fn close() {
    if let Some(log) = INSTALLED.get() {
        log.write_pending(true);
    }
}

impl AccessLog {
    fn new(format: Format, writer: Box<dyn Write + Send>) -> AccessLog {
        let state = State { pending: Vec::with_capacity(BATCH * 2), writer, closed: false };
        AccessLog { format, state: Mutex::new(state) }
    }

    /// Adds a request's line; the request pays a write only when it fills a batch.
    pub fn record(&self, entry: &Entry) {
        thread_local! {
            static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        // Formatted before the lock: threads do not wait on each other's formatting, and a
        // line is appended whole or not at all.
        LINE.with_borrow_mut(|line| {
            line.clear();
            write_line(line, entry, SystemTime::now(), self.format);
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if state.closed {
                return;
            }
            state.pending.extend_from_slice(line);
            if state.pending.len() >= BATCH {
                state.write();
            }
        });
    }

    fn write_pending(&self, close: bool) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !state.pending.is_empty() {
            state.write();
        }
        state.closed |= close;
    }
}

impl State {
    fn write(&mut self) {
        // The writer copies the batch and hands it to its own thread without waiting (or
        // drops it when that thread is far behind); it fails only if the thread is gone, and
        // then there is nowhere left to say so.
        let _ = self.writer.write_all(&self.pending).and_then(|()| self.writer.flush());
        self.pending.clear();
    }
}

/// Appends `entry`'s line, ending in a newline, in `format`: as `tracing-subscriber` wrote
/// it, `2026-11-27T08:23:16.327627Z  INFO ficus::access: method=GET path="/" status=200 ...`
/// or `{"timestamp":"...","level":"INFO","method":"GET",...,"target":"ficus::access"}`.
pub fn write_line(out: &mut Vec<u8>, entry: &Entry, now: SystemTime, format: Format) {
    let json = format == Format::Json;
    if json {
        out.extend_from_slice(b"{\"timestamp\":\"");
        write_timestamp(out, now);
        out.extend_from_slice(b"\",\"level\":\"INFO\"");
    } else {
        write_timestamp(out, now);
        out.extend_from_slice(b"  INFO ficus::access:");
    }
    let key = |out: &mut Vec<u8>, name: &str| {
        out.extend_from_slice(if json { b",\"" } else { b" " });
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(if json { b"\":" } else { b"=" });
    };
    // Text leaves displayed values (method, client) bare; JSON quotes every string.
    let bare = |out: &mut Vec<u8>, write: &dyn Fn(&mut Vec<u8>)| {
        if json {
            out.push(b'"');
        }
        write(out);
        if json {
            out.push(b'"');
        }
    };
    key(out, "method");
    bare(out, &|out| out.extend_from_slice(entry.method.as_bytes()));
    key(out, "path");
    write_quoted(out, entry.path);
    key(out, "status");
    write_u64(out, u64::from(entry.status));
    for (name, value) in
        [("outcome", entry.outcome), ("route", entry.route), ("backend", entry.backend)]
    {
        key(out, name);
        write_quoted(out, value);
    }
    if let Some(fallback) = entry.fallback {
        key(out, "fallback");
        write_quoted(out, fallback);
    }
    if let Some(client) = entry.client {
        key(out, "client");
        bare(out, &|out| write_ip(out, client));
    }
    key(out, "duration_ms");
    write_millis(out, entry.duration);
    if let Some(error) = entry.error {
        key(out, "error");
        write_quoted(out, error);
    }
    out.extend_from_slice(if json { b",\"target\":\"ficus::access\"}\n" } else { b"\n" });
}

/// 9999-12-31T23:59:59.999999Z, the last instant RFC 3339's four-digit years can say.
const LAST_SECOND: Duration = Duration::new(253_402_300_799, 999_999_000);

/// RFC 3339 in UTC with microseconds, as `tracing-subscriber` writes it. The part up to the
/// seconds is formatted once a second per thread.
fn write_timestamp(out: &mut Vec<u8>, now: SystemTime) {
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    // humantime formats 1970 to 9999 (and panics outside): a clock outside that is clamped.
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default().min(LAST_SECOND);
    let seconds = since_epoch.as_secs();
    SECOND.with_borrow_mut(|(second, prefix)| {
        if *second != seconds {
            // `YYYY-MM-DDTHH:MM:SSZ`, without its `Z`.
            let mut text =
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(seconds))
                    .to_string();
            text.pop();
            *prefix = text;
            *second = seconds;
        }
        out.extend_from_slice(prefix.as_bytes());
    });
    out.push(b'.');
    write_padded(out, u64::from(since_epoch.subsec_micros()), 6);
    out.push(b'Z');
}

/// Milliseconds with three decimals: `6.895`.
fn write_millis(out: &mut Vec<u8>, duration: Duration) {
    let micros = duration.as_micros().min(u128::from(u64::MAX)) as u64;
    write_u64(out, micros / 1000);
    out.push(b'.');
    write_padded(out, micros % 1000, 3);
}

fn write_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn write_padded(out: &mut Vec<u8>, n: u64, width: usize) {
    let mut buffer = itoa::Buffer::new();
    let digits = buffer.format(n);
    out.extend(std::iter::repeat_n(b'0', width.saturating_sub(digits.len())));
    out.extend_from_slice(digits.as_bytes());
}

fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                write_u64(out, u64::from(octet));
            }
        }
        // Rare enough behind a proxy to leave to the standard formatter.
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// A quoted string, with `"`, `\`, control characters and the invisible characters that
/// could make a line read as something else (bidi overrides, line separators) escaped as JSON
/// escapes them, which a reader of the text format can read back too.
fn write_quoted(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    // Paths, outcomes, route and backend names are nearly always printable ASCII with nothing
    // to escape: one scan of the bytes and one copy, not a char-by-char walk.
    if text.bytes().all(|b| matches!(b, b' '..=b'~') && b != b'"' && b != b'\\') {
        out.extend_from_slice(text.as_bytes());
    } else {
        write_escaped(out, text);
    }
    out.push(b'"');
}

fn write_escaped(out: &mut Vec<u8>, text: &str) {
    let mut start = 0;
    for (i, c) in text.char_indices() {
        let escape: &[u8] = match c {
            '"' => b"\\\"",
            '\\' => b"\\\\",
            '\n' => b"\\n",
            '\r' => b"\\r",
            '\t' => b"\\t",
            c if c.is_control() || invisible(c) => b"",
            _ => continue,
        };
        out.extend_from_slice(&text.as_bytes()[start..i]);
        if escape.is_empty() {
            // Every such character is in the Basic Multilingual Plane: four hex digits.
            let code = c as u32;
            out.extend_from_slice(b"\\u");
            for shift in [12, 8, 4, 0] {
                out.push(HEX[(code >> shift & 0xf) as usize]);
            }
        } else {
            out.extend_from_slice(escape);
        }
        start = i + c.len_utf8();
    }
    out.extend_from_slice(&text.as_bytes()[start..]);
}

/// Format characters that show nothing but change how text around them reads: zero-width
/// and direction marks, line and paragraph separators, bidi embeddings and isolates.
fn invisible(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{FEFF}')
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            method: "GET",
            path: "/api/orders/9",
            status: 200,
            outcome: "2xx",
            route: "orders",
            backend: "orders",
            fallback: None,
            client: Some(IpAddr::from([127, 0, 0, 1])),
            duration: Duration::from_micros(6_895_734),
            error: None,
        }
    }

    fn at(rfc3339: &str) -> SystemTime {
        humantime::parse_rfc3339(rfc3339).expect("a timestamp")
    }

    fn line(entry: &Entry, format: Format) -> String {
        let mut out = Vec::new();
        write_line(&mut out, entry, at("2026-11-27T08:23:16.327627Z"), format);
        String::from_utf8(out).expect("UTF-8")
    }

    #[test]
    fn a_text_line_has_the_shape_tracing_gave_it() {
        assert_eq!(
            line(&entry(), Format::Text),
            "2026-11-27T08:23:16.327627Z  INFO ficus::access: method=GET path=\"/api/orders/9\" \
             status=200 outcome=\"2xx\" route=\"orders\" backend=\"orders\" client=127.0.0.1 \
             duration_ms=6895.734\n"
        );
        let failed = Entry {
            status: 0,
            outcome: "error",
            fallback: Some("connect_failed"),
            client: None,
            error: Some("Upstream ConnectRefused"),
            ..entry()
        };
        assert_eq!(
            line(&failed, Format::Text),
            "2026-11-27T08:23:16.327627Z  INFO ficus::access: method=GET path=\"/api/orders/9\" \
             status=0 outcome=\"error\" route=\"orders\" backend=\"orders\" \
             fallback=\"connect_failed\" duration_ms=6895.734 error=\"Upstream ConnectRefused\"\n"
        );
    }

    #[test]
    fn a_json_line_is_json_with_every_field() {
        let hostile = Entry {
            path: "/a\"b\\c\n\u{1}é",
            client: Some("2001:db8::1".parse().expect("an address")),
            error: Some("line\r\nbreak"),
            fallback: Some("unhealthy"),
            ..entry()
        };
        let text = line(&hostile, Format::Json);
        assert!(text.ends_with("}\n") && text.matches('\n').count() == 1, "{text}");
        let value: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(
            value,
            serde_json::json!({
                "timestamp": "2026-11-27T08:23:16.327627Z", "level": "INFO",
                "method": "GET", "path": "/a\"b\\c\n\u{1}é", "status": 200, "outcome": "2xx",
                "route": "orders", "backend": "orders", "fallback": "unhealthy",
                "client": "2001:db8::1", "duration_ms": 6895.734, "error": "line\r\nbreak",
                "target": "ficus::access",
            })
        );
    }

    #[test]
    fn timestamps_match_rfc3339_across_dates() {
        for stamp in [
            "1970-01-01T00:00:00.000000Z",
            "2000-02-29T23:59:59.999999Z",
            "2024-12-31T12:00:00.000001Z",
            "2026-03-01T00:00:00.500000Z",
            "2100-03-01T07:08:09.010203Z",
            "9999-12-31T23:59:59.999999Z",
        ] {
            let mut out = Vec::new();
            write_timestamp(&mut out, at(stamp));
            assert_eq!(String::from_utf8(out).expect("UTF-8"), stamp);
            // Against the library, too.
            assert_eq!(humantime::format_rfc3339_micros(at(stamp)).to_string(), stamp);
        }
    }

    #[test]
    fn a_clock_outside_four_digit_years_is_clamped_not_a_panic() {
        for (time, stamp) in [
            (UNIX_EPOCH - Duration::from_secs(1), "1970-01-01T00:00:00.000000Z"),
            (UNIX_EPOCH + Duration::from_secs(400_000_000_000), "9999-12-31T23:59:59.999999Z"),
        ] {
            let mut out = Vec::new();
            write_timestamp(&mut out, time);
            assert_eq!(String::from_utf8(out).expect("UTF-8"), stamp);
        }
    }

    #[test]
    fn invisible_characters_are_escaped_in_text_too() {
        let sneaky = Entry { path: "/a\u{202E}gpj.exe\u{2028}b\u{85}", ..entry() };
        let text = line(&sneaky, Format::Text);
        assert!(text.contains(r#"path="/a\u202egpj.exe\u2028b\u0085""#), "{text}");
        let json: serde_json::Value =
            serde_json::from_str(&line(&sneaky, Format::Json)).expect("JSON");
        assert_eq!(json["path"], sneaky.path);
    }

    #[test]
    fn plain_text_is_written_as_the_escaping_walk_writes_it() {
        for byte in 0..=0x7f_u8 {
            let text = format!("/a{}b", char::from(byte));
            let mut whole = Vec::new();
            write_quoted(&mut whole, &text);
            let mut walked = vec![b'"'];
            write_escaped(&mut walked, &text);
            walked.push(b'"');
            assert_eq!(whole, walked, "byte {byte:#04x}");
        }
    }

    #[test]
    fn durations_print_in_milliseconds_with_three_decimals() {
        for (micros, text) in
            [(0, "0.000"), (7, "0.007"), (1_000, "1.000"), (123_456_789, "123456.789")]
        {
            let mut out = Vec::new();
            write_millis(&mut out, Duration::from_micros(micros));
            assert_eq!(out, text.as_bytes());
        }
    }

    #[test]
    fn lines_wait_for_a_batch_and_a_flush_writes_the_rest() {
        #[derive(Clone, Default)]
        struct Shared(std::sync::Arc<Mutex<Vec<Vec<u8>>>>);
        impl Write for Shared {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("lock").push(buf.to_vec());
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let writes = Shared::default();
        let log = AccessLog::new(Format::Text, Box::new(writes.clone()));
        let one = line(&entry(), Format::Text).len();
        let per_batch = BATCH.div_ceil(one);
        for _ in 0..per_batch - 1 {
            log.record(&entry());
        }
        assert!(writes.0.lock().expect("lock").is_empty(), "written before a batch was full");
        log.record(&entry());
        log.record(&entry());
        assert_eq!(writes.0.lock().expect("lock").len(), 1, "one write for a full batch");
        log.write_pending(true);
        log.record(&entry());
        log.write_pending(false);
        let written = writes.0.lock().expect("lock").concat();
        let text = String::from_utf8(written).expect("UTF-8");
        assert_eq!(text.lines().count(), per_batch + 1, "nothing recorded once closed");
        assert!(text.lines().all(|l| l.contains(" INFO ficus::access: method=GET ")));
    }
}

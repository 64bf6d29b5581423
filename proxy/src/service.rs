//! The Pingora `ProxyHttp` implementation: each phase calls one helper; per-request state
//! lives in [`RequestCtx`].

use std::fmt::Write;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use std::borrow::Cow;

use ficus_routes::{BackendId, Entropy, Reason, RouteTable};
use pingora::http::{CaseHeaderName, RequestHeader, ResponseHeader};
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::ErrorSource;
use rand::Rng;

use crate::access_log;
use crate::guard;
use crate::metrics::{status_class, status_index, NO_ROUTE};
use crate::request::PingoraRequest;
use crate::shadow::{Capture, Job, Side};
use crate::state::{ActiveTable, Fallback, Shared};

/// How long a minted client id is kept by the browser: a year.
const CLIENT_ID_MAX_AGE: u32 = 365 * 24 * 3600;

/// The forwarding headers ficus adds, each named and cased once: given as text, Pingora
/// would parse (and, outside the standard names, allocate) the name on every insert.
type KnownHeader = (http::HeaderName, CaseHeaderName);
const X_FORWARDED_FOR: KnownHeader = (
    http::HeaderName::from_static("x-forwarded-for"),
    CaseHeaderName::from_static("X-Forwarded-For"),
);
const X_FORWARDED_HOST: KnownHeader = (
    http::HeaderName::from_static("x-forwarded-host"),
    CaseHeaderName::from_static("X-Forwarded-Host"),
);
const X_FORWARDED_PROTO: KnownHeader = (
    http::HeaderName::from_static("x-forwarded-proto"),
    CaseHeaderName::from_static("X-Forwarded-Proto"),
);
/// How many of them a request may gain.
const FORWARDING_HEADERS: usize = 3;

/// The routing decision of one request, taken once in `request_filter`.
pub struct Routing {
    /// The table the request started with; it finishes on it even if a reload happens.
    pub active: Arc<ActiveTable>,
    pub route: Option<usize>,
    pub backend: BackendId,
    /// False for overridden requests: an explicit choice is not second-guessed.
    pub may_fall_back: bool,
    pub fallback: Option<Fallback>,
    /// A client id minted for this client, to be set as a cookie on the response.
    pub minted_client_id: Option<String>,
}

impl Routing {
    fn route_name(&self) -> &str {
        self.route.map_or(NO_ROUTE, |i| self.active.table.routes[i].name.as_str())
    }

    fn backend_name(&self) -> &str {
        &self.active.table.backends[self.backend].name
    }
}

/// Per-request state.
pub struct RequestCtx {
    started: Instant,
    routing: Option<Routing>,
    /// The request's body and the primary's answer, kept for its shadow.
    shadow: Option<Capture>,
}

/// The ficus proxy: routes each request by the active table.
pub struct FicusProxy {
    pub shared: Arc<Shared>,
    /// How long reading a request body may wait for its next bytes.
    pub request_body_timeout: Duration,
}

/// Randomness for the request path.
struct ThreadEntropy;

impl Entropy for ThreadEntropy {
    fn new_client_id(&mut self) -> String {
        format!("{:032x}", rand::rng().random::<u128>())
    }

    fn random_bucket(&mut self) -> u16 {
        rand::rng().random_range(0..ficus_routes::BUCKETS)
    }
}

/// Replaces the request's path by its normalised form, which routing and forwarding then
/// both use; an error for a path to refuse.
fn normalize_path(session: &mut Session, table: &RouteTable) -> Result<(), String> {
    let uri = &session.req_header().uri;
    if uri.path() == "*" {
        return Ok(()); // OPTIONS *, which the guard let through: not a path
    }
    let path = match table.request_path(uri.path()) {
        Ok(Cow::Borrowed(_)) => return Ok(()),
        Ok(Cow::Owned(path)) => path,
        Err(e) => return Err(e.to_string()),
    };
    let target = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    // Scheme and authority stay: HTTP/2 requests name their host there.
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(target.parse().map_err(|e| format!("{e}"))?);
    let uri = http::Uri::from_parts(parts).map_err(|e| format!("{e}"))?;
    session.req_header_mut().set_uri(uri);
    Ok(())
}

/// The request's routing decision. (`or_err` would build its error, an allocation, on every
/// request.)
fn routed(ctx: &RequestCtx) -> Result<&Routing> {
    match &ctx.routing {
        Some(routing) => Ok(routing),
        None => Error::e_explain(InternalError, "request was not routed"),
    }
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip())
}

/// An address in its usual text form, on the stack, so that the value it goes into can be
/// allocated once at its final length.
struct IpText {
    text: [u8; IpText::MAX],
    len: usize,
}

impl IpText {
    /// The longest text form of an address (IPv6 with an embedded IPv4 address), with room to
    /// spare: `Display` writes at most 39 bytes.
    const MAX: usize = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255".len();

    /// IPv4 by hand: through `write!` it cost more than the rest of the X-Forwarded headers
    /// together.
    fn new(ip: IpAddr) -> Self {
        let mut out = IpText { text: [0; Self::MAX], len: 0 };
        let IpAddr::V4(v4) = ip else {
            // Display never writes more than MAX for an address, so this cannot fail.
            let _ = write!(out, "{ip}");
            return out;
        };
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                out.push(b'.');
            }
            if octet >= 100 {
                out.push(b'0' + octet / 100);
            }
            if octet >= 10 {
                out.push(b'0' + octet / 10 % 10);
            }
            out.push(b'0' + octet % 10);
        }
        out
    }

    fn push(&mut self, byte: u8) {
        self.text[self.len] = byte;
        self.len += 1;
    }

    fn as_bytes(&self) -> &[u8] {
        &self.text[..self.len]
    }
}

impl Write for IpText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        let room = self.text.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        room.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

fn is_tls(session: &Session) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

impl FicusProxy {
    /// Decides where the request goes, on `active`, the table active right now.
    fn route(&self, session: &Session, active: Arc<ActiveTable>) -> Routing {
        let view = PingoraRequest {
            header: session.req_header(),
            client_ip: client_ip(session),
            names: &active.header_names,
        };
        let ramp_threshold = |index: usize| active.ramps[index].as_ref().map(|r| r.threshold());
        let decision = active.table.decide_with(&view, &mut ThreadEntropy, ramp_threshold);
        let route = decision.route.map(|(index, _)| index);
        let backend = decision.backend;
        let may_fall_back = decision.is_to() && decision.reason != Reason::Override;
        let minted_client_id = decision.minted_client_id().map(str::to_string);
        let mut routing =
            Routing { active, route, backend, may_fall_back, fallback: None, minted_client_id };
        if routing.may_fall_back && !routing.active.upstreams[backend].is_up() {
            self.fall_back(&mut routing, Fallback::Unhealthy);
        }
        routing
    }

    /// Sends the request to its route's `from` instead of `to`.
    fn fall_back(&self, routing: &mut Routing, reason: Fallback) {
        let Some(index) = routing.route else { return };
        routing.active.fallbacks[index][reason as usize].inc();
        routing.backend = routing.active.table.routes[index].from;
        routing.may_fall_back = false;
        routing.fallback = Some(reason);
    }

    /// Starts capturing a request its route shadows: the method is listed, the request falls
    /// in the shadowed share, and it goes to one of the route's two backends.
    fn shadow_capture(&self, session: &Session, routing: &Routing) -> Option<Capture> {
        let index = routing.route?;
        let shadow = routing.active.shadows[index].as_ref()?;
        let route = &routing.active.table.routes[index];
        let method = session.req_header().method.as_str();
        let bucket = rand::rng().random_range(0..ficus_routes::BUCKETS);
        let served_by_route = routing.backend == route.to || routing.backend == route.from;
        if !served_by_route || !shadow.policy.applies(method, bucket) {
            return None;
        }
        shadow.capture()
    }

    /// Hands a finished request's capture to a background task that shadows it; the client
    /// already has its answer.
    fn dispatch_shadow(&self, session: &Session, capture: Capture, routing: &Routing) {
        let Some(index) = routing.route else { return };
        let table = &routing.active.table;
        let route = &table.routes[index];
        let side = |backend: BackendId| -> Option<Side> {
            let mut request = session.req_header().clone();
            let active = &routing.active;
            self.prepare_upstream_request(session, active, Some(index), backend, &mut request)
                .ok()?;
            request.insert_header("X-Ficus-Shadow", "1").ok()?;
            // Sent over HTTP/1.1 whatever the client spoke, with its whole body at once.
            request.set_version(http::Version::HTTP_11);
            request.remove_header(&http::header::EXPECT);
            let peer = routing.active.upstreams[backend].peer.clone();
            Some(Side { name: table.backends[backend].name.clone(), peer, request })
        };
        let (Some(from), Some(to)) = (side(route.from), side(route.to)) else { return };
        let req = session.req_header();
        let job = Job {
            capture,
            method: req.method.to_string(),
            path: req.uri.path().to_string(),
            from,
            to,
            served_by_to: routing.backend == route.to,
        };
        let shared = self.shared.clone();
        tokio::spawn(async move {
            crate::shadow::run(job, &shared.shadow_connector, &shared.metrics).await;
        });
    }

    /// Points a copy of the client's request at `backend`: path rewrite, Host, and the
    /// X-Forwarded headers.
    fn prepare_upstream_request(
        &self,
        session: &Session,
        active: &ActiveTable,
        route: Option<usize>,
        backend_id: BackendId,
        req: &mut RequestHeader,
    ) -> Result<()> {
        let table = &active.table;
        let backend = &table.backends[backend_id];
        let downstream = session.req_header();
        // The upstream request starts as a copy of the client's: change only what differs.
        // HTTP/2 requests carry an absolute URI; HTTP/1.1 upstreams get the origin form.
        if table.rewrites_path(route, backend_id) || downstream.uri.authority().is_some() {
            let path = table.upstream_path(
                route,
                backend_id,
                downstream.uri.path(),
                downstream.uri.query(),
            );
            let uri = path
                .parse::<http::Uri>()
                .or_err_with(InvalidHTTPHeader, || format!("cannot build upstream URI {path}"))?;
            req.set_uri(uri);
        }
        // The override (and its token) is for ficus, not for the backend; the others could
        // let a client pose as someone else.
        for name in &active.removed_headers {
            req.remove_header(name);
        }
        // Room made at once for the fields added below: the copy of the client's header maps is
        // full, and grew on the way (twice for three fields after a client's two).
        req.reserve(FORWARDING_HEADERS);
        // Borrowed, not copied: each copy of a value counts a reference (an atomic operation).
        let host_header = downstream.headers.get(http::header::HOST);
        // HTTP/2 clients name the host in `:authority` instead of a Host header.
        let authority_host = match host_header {
            Some(_) => None,
            None => downstream
                .uri
                .authority()
                .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok()),
        };
        let client_host = host_header.or(authority_host.as_ref());
        if let Some(host) = client_host {
            req.insert_header(X_FORWARDED_HOST, host.clone())?;
        }
        match client_host {
            Some(host) if backend.preserve_host => {
                if host_header.is_none() {
                    req.insert_header(http::header::HOST, host.clone())?;
                }
            }
            _ => {
                req.insert_header(http::header::HOST, &active.upstreams[backend_id].host_header)?
            }
        }
        req.insert_header(X_FORWARDED_PROTO, if is_tls(session) { "https" } else { "http" })?;
        if let Some(ip) = client_ip(session) {
            // Every X-Forwarded-For line the client sent (as text), in order, then the client
            // itself, in a buffer of the value's length: it becomes the value's bytes as it is,
            // where a longer one was copied into an allocation of its own. (A line that is not
            // text is left out, and only then is the buffer longer than the value.)
            let previous = downstream.headers.get_all(&X_FORWARDED_FOR.0);
            let ip = IpText::new(ip);
            let len = previous.iter().map(|p| p.len() + b", ".len()).sum::<usize>() + ip.len;
            let mut forwarded_for = Vec::with_capacity(len);
            for previous in previous.iter().filter(|p| p.to_str().is_ok()) {
                forwarded_for.extend_from_slice(previous.as_bytes());
                forwarded_for.extend_from_slice(b", ");
            }
            forwarded_for.extend_from_slice(ip.as_bytes());
            req.insert_header(X_FORWARDED_FOR, forwarded_for)?;
        }
        Ok(())
    }
}

#[async_trait]
impl ProxyHttp for FicusProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx { started: Instant::now(), routing: None, shadow: None }
    }

    /// None. Pingora's default adds a response compression module, switched off, which is
    /// still set up and consulted on every request (three allocations each); ficus passes
    /// bodies on as the backend sent them.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    /// Refuses requests the table cannot route faithfully (400, returning true: answered),
    /// and routes the others (false: the request continues to a backend).
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let req = session.req_header();
        let host = req.headers.get(http::header::HOST).map(|h| h.as_bytes());
        let lengths =
            req.headers.get_all(http::header::CONTENT_LENGTH).iter().map(|v| v.as_bytes());
        let codings =
            req.headers.get_all(http::header::TRANSFER_ENCODING).iter().map(|v| v.as_bytes());
        let verdict = guard::check(&req.method, req.version, req.raw_path(), host)
            .and_then(|()| guard::check_framing(lengths, codings))
            .map_err(|refusal| refusal.as_str().to_string());
        let active = self.shared.active.load_full();
        let verdict = verdict.and_then(|()| normalize_path(session, &active.table));
        if let Err(reason) = verdict {
            tracing::debug!(%reason, "refused a request");
            // Its body, if any, is not read: the connection cannot carry another request.
            session.set_keepalive(None);
            session.respond_error(400).await?;
            return Ok(true);
        }
        session.set_read_timeout(Some(self.request_body_timeout));
        let routing = self.route(session, active);
        ctx.shadow = self.shadow_capture(session, &routing);
        ctx.routing = Some(routing);
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let (Some(capture), Some(chunk)) = (ctx.shadow.as_mut(), body.as_ref()) {
            capture.request_chunk(chunk);
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(capture) = ctx.shadow.as_mut() {
            capture.response_header(response);
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let (Some(capture), Some(chunk)) = (ctx.shadow.as_mut(), body.as_ref()) {
            capture.response_chunk(chunk);
        }
        Ok(None)
    }

    /// The peer of the chosen backend; called again after a failed connect, when the
    /// request may have fallen back to `from`.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let routing = routed(ctx)?;
        Ok(Box::new(routing.active.upstreams[routing.backend].peer.clone()))
    }

    /// Counts the failure and, when `to` refused us, retries on `from`. Nothing was sent yet,
    /// so this is safe for every method.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let Some(routing) = ctx.routing.as_mut() else { return e };
        self.shared.metrics.connect_failures.with_label_values(&[routing.backend_name()]).inc();
        if routing.may_fall_back {
            tracing::warn!(route = routing.route_name(), backend = routing.backend_name(), error = %e, "cannot connect; falling back");
            self.fall_back(routing, Fallback::ConnectFailed);
            e.set_retry(true);
        }
        e
    }

    /// Answers a request that could not be proxied: as Pingora does (502 for the backend's
    /// failures, 400 for a malformed request, nothing when the client is gone), except that a
    /// backend too slow to answer gets 504, and nothing is sent once a response has started.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        _ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = match (e.etype(), e.esource()) {
            (HTTPStatus(code), _) => *code,
            (ReadTimedout | WriteTimedout, ErrorSource::Upstream) => 504,
            (_, ErrorSource::Upstream) => 502,
            (WriteError | ReadError | ConnectionClosed, ErrorSource::Downstream) => 0,
            // The request body stalled past proxy.request_body_timeout.
            (ReadTimedout, ErrorSource::Downstream) => 408,
            (_, ErrorSource::Downstream) => 400,
            _ => 500,
        };
        if code > 0 && session.response_written().is_none() {
            if let Err(e) = session.respond_error(code).await {
                tracing::debug!(error = %e, "cannot answer the client");
            }
        }
        FailToProxy { error_code: code, can_reuse_downstream: false }
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let routing = routed(ctx)?;
        self.prepare_upstream_request(
            session,
            &routing.active,
            routing.route,
            routing.backend,
            upstream_request,
        )
    }

    /// Refuses a protocol switch the client did not ask for (502), and hands a newly
    /// identified client its id, so it stays on its backend from now on.
    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if response.status == http::StatusCode::SWITCHING_PROTOCOLS {
            let requested = session.req_header().headers.get(http::header::UPGRADE);
            let switched = response.headers.get(http::header::UPGRADE);
            if !guard::upgrade_accepted(
                requested.map(|v| v.as_bytes()),
                switched.map(|v| v.as_bytes()),
            ) {
                return Error::e_explain(
                    HTTPStatus(502),
                    "the backend switched to a protocol the client did not ask for",
                );
            }
        }
        let Some(routing) = ctx.routing.as_ref() else { return Ok(()) };
        if let Some(id) = &routing.minted_client_id {
            let cookie = format!(
                "{}={id}; Path=/; Max-Age={CLIENT_ID_MAX_AGE}; HttpOnly; SameSite=Lax",
                routing.active.table.client_id_cookie
            );
            response.append_header("Set-Cookie", cookie)?;
        }
        Ok(())
    }

    /// Records metrics and writes one access-log line.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let written = session.response_written().map(|r| r.status.as_u16());
        // A success the backend cut short (reset mid-body) is not a success: it counts as an
        // error, as a request that got no response does. A client that hung up is not the
        // backend's fault.
        let cut_short = e.is_some_and(|e| e.esource != ErrorSource::Downstream);
        let status = written.filter(|&status| !cut_short || status >= 400);
        let elapsed = ctx.started.elapsed();
        let (route, backend) = match &ctx.routing {
            Some(routing) => (routing.route_name(), routing.backend_name()),
            None => (NO_ROUTE, "-"),
        };
        if let Some(routing) = &ctx.routing {
            let series = routing.active.series.get(
                &self.shared.metrics,
                routing.route,
                routing.backend,
                route,
                backend,
            );
            series.requests[status_index(status)].inc();
            series.duration.observe(elapsed.as_secs_f64());
        } else {
            let metrics = &self.shared.metrics;
            metrics.requests.with_label_values(&[route, backend, status_class(status)]).inc();
        }
        // Only a complete answer is worth comparing.
        if let (Some(capture), Some(routing)) = (ctx.shadow.take(), &ctx.routing) {
            match e {
                None => self.dispatch_shadow(session, capture, routing),
                Some(_) => capture.skip(),
            }
        }
        // Off (`RUST_LOG`): nothing more to do, not even the error's text.
        if !tracing::enabled!(target: "ficus::access", tracing::Level::INFO) {
            return;
        }
        let req = session.req_header();
        let error = e.map(|e| e.to_string());
        let entry = access_log::Entry {
            method: req.method.as_str(),
            path: req.uri.path(),
            status: written.unwrap_or(0),
            outcome: status_class(status),
            route,
            backend,
            fallback: ctx.routing.as_ref().and_then(|r| r.fallback).map(Fallback::as_str),
            client: client_ip(session),
            duration: elapsed,
            error: error.as_deref(),
        };
        match access_log::installed() {
            Some(log) => log.record(&entry),
            None => tracing::info!(
                target: "ficus::access",
                method = entry.method,
                path = entry.path,
                status = entry.status,
                outcome = entry.outcome,
                route,
                backend,
                fallback = entry.fallback,
                client = entry.client.map(tracing::field::display),
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                error = entry.error,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn ip_text_is_what_display_writes() {
        for a in 0..=255u8 {
            for b in [0, 1, 9, 10, 42, 99, 100, 199, 200, 255] {
                let ip = IpAddr::V4(Ipv4Addr::new(a, b, 255 - a, b / 2));
                assert_eq!(IpText::new(ip).as_bytes(), ip.to_string().as_bytes());
            }
        }
        for ip in [
            Ipv6Addr::LOCALHOST,
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
            Ipv6Addr::new(0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff),
            Ipv4Addr::new(255, 255, 255, 255).to_ipv6_mapped(),
        ] {
            assert_eq!(IpText::new(IpAddr::V6(ip)).as_bytes(), ip.to_string().as_bytes());
        }
    }
}

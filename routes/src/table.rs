//! The compiled route table and the routing decision for one request.

use std::borrow::Cow;
use std::cell::RefCell;
use std::time::Duration;

use regex_automata::{meta, Input, MatchKind, PatternSet};

use crate::config::HealthConfig;
use crate::matcher::{is_segment_prefix, Matcher, PathMatch};
use crate::request::{find_query_param, RequestView};
use crate::sticky::{bucket_of, Sticky, BUCKETS};

/// Index of a backend in [`RouteTable::backends`].
pub type BackendId = usize;

/// A validated backend.
#[derive(Debug, Clone)]
pub struct Backend {
    pub name: String,
    /// The URL as written in the route file.
    pub url: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Prefixed to every forwarded path; empty or `/v2` (never a trailing `/`).
    pub path_prefix: String,
    pub health: Option<HealthConfig>,
    pub preserve_host: bool,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
}

impl Backend {
    /// The `host:port` to connect to.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The Host header of requests sent here when the client's is not kept: the authority,
    /// without the scheme's default port; an IPv6 address in brackets either way.
    pub fn host_header(&self) -> String {
        match (self.tls, self.port) {
            (true, 443) | (false, 80) if self.host.contains(':') => format!("[{}]", self.host),
            (true, 443) | (false, 80) => self.host.clone(),
            _ => self.authority(),
        }
    }
}

/// A validated route.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub matcher: Matcher,
    pub to: BackendId,
    pub from: BackendId,
    /// Buckets below this go to `to`: `percent * 100`, 0 to 10,000.
    pub threshold: u16,
    pub sticky: Sticky,
    /// Removed from the path of requests sent to `to`; no trailing `/`.
    pub strip_prefix: Option<String>,
    pub shadow: Option<crate::shadow::Shadow>,
    /// With a ramp, `threshold` is 0 and the ramp's state gives the share.
    pub ramp: Option<crate::ramp::Ramp>,
    /// A hash of the route's entry in the file: state kept per route (shadow results, learnt
    /// noise) starts over when it changes.
    pub fingerprint: u64,
}

impl Route {
    /// The share of clients sent to `to`, in percent.
    pub fn percent(&self) -> f64 {
        f64::from(self.threshold) / 100.0
    }
}

/// A whole route file, validated and compiled. Immutable: a reload builds a new one.
#[derive(Debug, Clone)]
pub struct RouteTable {
    pub backends: Vec<Backend>,
    pub routes: Vec<Route>,
    pub default_backend: BackendId,
    /// Lowercase header name, when overrides are enabled.
    pub override_header: Option<String>,
    /// Client networks allowed to override; empty: any.
    pub override_allow: Vec<ipnet::IpNet>,
    /// The secret that must follow the backend name in the override header, if any.
    pub override_token: Option<String>,
    pub client_id_cookie: String,
    /// Lowercase names of the client headers not forwarded.
    pub strip_headers: Vec<String>,
    /// Whether request paths are normalised before routing ([`RouteTable::request_path`]).
    pub normalize_path: bool,
    /// A hash of the table's content: equal files give equal versions, whatever their format.
    pub version: String,
    /// The routes by path, for matching without trying every route.
    pub index: RouteIndex,
}

/// An index of a table's routes by path, so that a request is checked only against the
/// routes its path can match, in file order, instead of against every route.
#[derive(Debug, Clone, Default)]
pub struct RouteIndex {
    /// Exact and prefix routes by the first segment of their path (`api` for `/api/orders`).
    by_segment: std::collections::HashMap<String, Vec<usize>>,
    /// Routes any path may match: no path condition or the root prefix.
    always: Vec<usize>,
    /// Every `path_regex`, compiled together: one search per request.
    regexes: Option<meta::Regex>,
    /// The route of each pattern of `regexes`.
    regex_routes: Vec<usize>,
}

/// The first segment of a path: `api` for `/api/orders/7`, empty for `/`.
fn first_segment(path: &str) -> &str {
    path.trim_start_matches('/').split('/').next().unwrap_or("")
}

/// The most memory the `path_regex` routes may take compiled together (their NFA); the lazy
/// DFA that searches them has a bounded cache of its own (2 MiB), so a request's search stays
/// bounded too. 10,000 regex routes of an ordinary shape take about 20 MiB.
pub const REGEX_SET_LIMIT: usize = 256 * 1024 * 1024;

impl RouteIndex {
    /// Indexes `routes`; fails when their `path_regex`es together exceed [`REGEX_SET_LIMIT`].
    pub fn new(routes: &[Route]) -> Result<RouteIndex, String> {
        RouteIndex::with_limit(routes, REGEX_SET_LIMIT)
    }

    /// Like [`RouteIndex::new`], with `limit` bytes for the regexes together.
    pub fn with_limit(routes: &[Route], limit: usize) -> Result<RouteIndex, String> {
        let mut index = RouteIndex::default();
        let mut patterns = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            match &route.matcher.path {
                PathMatch::Exact(path) => {
                    index.by_segment.entry(first_segment(path).to_string()).or_default().push(i)
                }
                PathMatch::Prefix(prefix) if !prefix.is_empty() => {
                    index.by_segment.entry(first_segment(prefix).to_string()).or_default().push(i)
                }
                PathMatch::Regex(regex) => {
                    patterns.push(regex.as_str().to_string());
                    index.regex_routes.push(i);
                }
                PathMatch::Prefix(_) | PathMatch::Any => index.always.push(i),
            }
        }
        if !patterns.is_empty() {
            // Every pattern that matches, not only the leftmost, as a `RegexSet` reports.
            // Without capture slots: which patterns match is all a route needs, and slots
            // for each of N patterns in each of the NFA's states made a search take memory
            // growing with N squared (gigabytes for a few thousand routes).
            let config = meta::Regex::config()
                .match_kind(MatchKind::All)
                .which_captures(regex_automata::nfa::thompson::WhichCaptures::None)
                .nfa_size_limit(Some(limit));
            let regexes = meta::Regex::builder().configure(config).build_many(&patterns).map_err(|e| {
                format!(
                    "the {} path_regex routes together exceed the {} KiB a route table's regexes may take: {e}",
                    patterns.len(),
                    limit >> 10
                )
            })?;
            index.regexes = Some(regexes);
        }
        Ok(index)
    }

    /// The first route, in file order, for which `matches` holds, among the routes `path`
    /// may match. `matches` is told whether the set search already matched the route's
    /// regex. Allocates nothing.
    fn first_match(&self, path: &str, matches: impl Fn(usize, bool) -> bool) -> Option<usize> {
        // Each list is in file order, so the answer is the least of each list's first match.
        let by_segment = self.by_segment.get(first_segment(path)).map_or(&[][..], Vec::as_slice);
        let first_in = |ids: &[usize]| ids.iter().copied().find(|&i| matches(i, false));
        let best = match (first_in(by_segment), first_in(&self.always)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let Some(regexes) = &self.regexes else { return best };
        // No regex route comes before the best so far: skip the search.
        if best.is_some_and(|best| self.regex_routes.first().is_none_or(|&first| first > best)) {
            return best;
        }
        let from_regex = MATCHED_PATTERNS.with_borrow_mut(|matched| {
            if matched.capacity() < regexes.pattern_len() {
                *matched = PatternSet::new(regexes.pattern_len());
            }
            matched.clear();
            regexes.which_overlapping_matches(&Input::new(path), matched);
            matched
                .iter()
                .map(|pattern| self.regex_routes[pattern.as_usize()])
                .take_while(|&i| best.is_none_or(|best| i < best))
                .find(|&i| matches(i, true))
        });
        from_regex.or(best)
    }
}

/// Compares two secrets in time that does not depend on where they differ.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

thread_local! {
    /// Which regexes matched the path, reused by every request of the thread.
    static MATCHED_PATTERNS: RefCell<PatternSet> = RefCell::new(PatternSet::new(0));
}

/// Where randomness comes from, so that decisions stay pure and testable.
pub trait Entropy {
    /// A fresh, unguessable client id for a client that has no sticky key.
    fn new_client_id(&mut self) -> String;
    /// A uniformly random bucket, for routes with `sticky = "none"`.
    fn random_bucket(&mut self) -> u16;
}

/// Where the key that bucketed a client came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// The route's sticky setting (header, cookie, query or ip).
    Sticky,
    /// The client-id cookie ficus handed out earlier.
    ClientIdCookie,
    /// Nothing identified the client: a new id was minted and must be sent back as a cookie.
    Minted,
    /// The route is not sticky; the bucket was drawn at random.
    Random,
}

/// The key a client was bucketed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientKey<'r> {
    pub source: KeySource,
    pub value: Cow<'r, str>,
}

/// Why a backend was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason<'r> {
    /// No route matched: the default backend.
    NoRoute,
    /// The override header named this backend.
    Override,
    /// The client's bucket against the route's threshold.
    Split { key: ClientKey<'r>, bucket: u16 },
}

/// The routing decision for one request.
#[derive(Debug, Clone)]
pub struct Decision<'t, 'r> {
    /// The matched route and its index in the file.
    pub route: Option<(usize, &'t Route)>,
    pub backend: BackendId,
    pub reason: Reason<'r>,
}

impl Decision<'_, '_> {
    /// True when the request goes to its route's `to`: the new service.
    pub fn is_to(&self) -> bool {
        self.route.is_some_and(|(_, route)| route.to == self.backend)
    }

    /// The id to hand the client in the client-id cookie, if one was minted.
    pub fn minted_client_id(&self) -> Option<&str> {
        match &self.reason {
            Reason::Split { key, .. } if key.source == KeySource::Minted => Some(&key.value),
            _ => None,
        }
    }
}

impl RouteTable {
    /// The path a request is routed and forwarded by: normalised ([`crate::path`]) unless
    /// the table turns that off; an error for a path that must be refused (400).
    pub fn request_path<'a>(
        &self,
        path: &'a str,
    ) -> Result<std::borrow::Cow<'a, str>, crate::path::PathError> {
        if self.normalize_path {
            crate::path::normalize(path)
        } else {
            Ok(std::borrow::Cow::Borrowed(path))
        }
    }

    /// Every request header name routing may look up ([`RequestView::header`]): the override
    /// header, sticky headers and matched headers, lowercase, each once.
    pub fn looked_up_headers(&self) -> Vec<&str> {
        let sticky = self.routes.iter().filter_map(|route| match &route.sticky {
            Sticky::Header(name) => Some(name.as_str()),
            _ => None,
        });
        let matched = self
            .routes
            .iter()
            .flat_map(|route| route.matcher.headers.iter().map(|(n, _)| n.as_str()));
        let mut names: Vec<&str> =
            self.override_header.as_deref().into_iter().chain(sticky).chain(matched).collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The backend with this name.
    pub fn backend_named(&self, name: &str) -> Option<BackendId> {
        self.backends.iter().position(|b| b.name == name)
    }

    /// The first route, in file order, that matches the request.
    pub fn match_route(&self, req: &impl RequestView) -> Option<(usize, &Route)> {
        let path = req.path();
        let index = self.index.first_match(path, |i, regex_matched| {
            self.routes[i]
                .matcher
                .matches_with(req, |condition| regex_matched || condition.matches(path))
        })?;
        Some((index, &self.routes[index]))
    }

    /// Decides which backend serves the request.
    pub fn decide<'t, 'r>(
        &'t self,
        req: &'r impl RequestView,
        entropy: &mut impl Entropy,
    ) -> Decision<'t, 'r> {
        self.decide_with(req, entropy, |_| None)
    }

    /// [`Self::decide`] with the share of some routes given from outside the file (a ramp's
    /// current step): `threshold(index)` overrides the route's own when it is `Some`.
    pub fn decide_with<'t, 'r>(
        &'t self,
        req: &'r impl RequestView,
        entropy: &mut impl Entropy,
        threshold: impl Fn(usize) -> Option<u16>,
    ) -> Decision<'t, 'r> {
        let Some((index, route)) = self.match_route(req) else {
            return Decision {
                route: None,
                backend: self.default_backend,
                reason: Reason::NoRoute,
            };
        };
        let route_ref = Some((index, route));
        if let Some(backend) = self.overridden_backend(route, req) {
            return Decision { route: route_ref, backend, reason: Reason::Override };
        }
        let (key, bucket) = self.client_key(route, req, entropy);
        let threshold = threshold(index).unwrap_or(route.threshold);
        let backend = if bucket < threshold { route.to } else { route.from };
        Decision { route: route_ref, backend, reason: Reason::Split { key, bucket } }
    }

    /// The override header's backend, when it names the route's `from` or `to` and the
    /// client may override: from an allowed network, with the token when one is set.
    fn overridden_backend(&self, route: &Route, req: &impl RequestView) -> Option<BackendId> {
        let value = req.header(self.override_header.as_deref()?)?.trim();
        if !self.override_allow.is_empty() {
            let ip = req.client_ip()?;
            if !self.override_allow.iter().any(|net| net.contains(&ip)) {
                return None;
            }
        }
        let wanted = match &self.override_token {
            None => value,
            Some(token) => {
                let (name, given) = value.split_once(char::is_whitespace)?;
                if !same_secret(given.trim().as_bytes(), token.as_bytes()) {
                    return None;
                }
                name
            }
        };
        [route.to, route.from].into_iter().find(|&id| self.backends[id].name == wanted)
    }

    /// Identifies the client: the route's sticky key, else the client-id cookie, else a new id.
    fn client_key<'r>(
        &self,
        route: &Route,
        req: &'r impl RequestView,
        entropy: &mut impl Entropy,
    ) -> (ClientKey<'r>, u16) {
        let sticky_value: Option<Cow<'r, str>> = match &route.sticky {
            Sticky::None => {
                let key = ClientKey { source: KeySource::Random, value: Cow::Borrowed("") };
                return (key, entropy.random_bucket() % BUCKETS);
            }
            Sticky::Header(name) => req.header(name).map(Cow::Borrowed),
            Sticky::Cookie(name) => req.cookie(name).map(Cow::Borrowed),
            Sticky::Query(name) => {
                req.query().and_then(|query| find_query_param(query, name)).map(Cow::Borrowed)
            }
            Sticky::Ip => req.client_ip().map(|ip| Cow::Owned(ip.to_string())),
        };
        let key = match sticky_value.filter(|value| !value.is_empty()) {
            Some(value) => ClientKey { source: KeySource::Sticky, value },
            None => match req.cookie(&self.client_id_cookie).filter(|v| !v.is_empty()) {
                Some(id) => {
                    ClientKey { source: KeySource::ClientIdCookie, value: Cow::Borrowed(id) }
                }
                None => ClientKey {
                    source: KeySource::Minted,
                    value: Cow::Owned(entropy.new_client_id()),
                },
            },
        };
        let bucket = bucket_of(&key.value);
        (key, bucket)
    }

    /// Whether requests of `route` sent to `backend` get a different path upstream: a
    /// backend path prefix, or the route's rewrite when `backend` is its `to`.
    pub fn rewrites_path(&self, route: Option<usize>, backend: BackendId) -> bool {
        !self.backends[backend].path_prefix.is_empty()
            || route
                .map(|index| &self.routes[index])
                .is_some_and(|route| route.to == backend && route.strip_prefix.is_some())
    }

    /// The path and query to send upstream: the route's rewrite (only when the request goes to
    /// the route's `to`), then the backend's path prefix.
    pub fn upstream_path(
        &self,
        route: Option<usize>,
        backend: BackendId,
        path: &str,
        query: Option<&str>,
    ) -> String {
        let target = &self.backends[backend];
        let mut path = path;
        let strip = route
            .map(|index| &self.routes[index])
            .filter(|route| route.to == backend)
            .and_then(|route| route.strip_prefix.as_deref());
        if let Some(strip) = strip {
            if is_segment_prefix(strip, path) {
                path = &path[strip.len()..];
            }
        }
        let mut out = String::with_capacity(target.path_prefix.len() + path.len() + 1);
        out.push_str(&target.path_prefix);
        if !path.starts_with('/') {
            out.push('/');
        }
        out.push_str(path);
        if let Some(query) = query {
            out.push('?');
            out.push_str(query);
        }
        out
    }
}

// Copyright 2026 Cloudflare, Inc.
//
// Licensed under the Apache License, Version 2.0 (the "License");
// you may not use this file except in compliance with the License.
// You may obtain a copy of the License at
//
// http://www.apache.org/licenses/LICENSE-2.0
//
// Unless required by applicable law or agreed to in writing, software
// distributed under the License is distributed on an "AS IS" BASIS,
// WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
// See the License for the specific language governing permissions and
// limitations under the License.

//! Connecting to servers

pub mod http;
mod idle_sweep;
pub mod l4;
mod local_pool;
#[cfg(feature = "any_tls")]
mod tls;

#[cfg(not(feature = "any_tls"))]
use crate::tls::connectors as tls;

use crate::protocols::l4::ext::attach_connect_local_addr;
use crate::protocols::{GetSocketDigest, Stream};
use crate::server::configuration::ServerConf;
use crate::upstreams::peer::{Peer, ALPN};

use crate::offload::OffloadRuntime;
pub use l4::Connect as L4Connect;
use l4::{connect as l4_connect, BindTo};
use log::{debug, error, warn};
use parking_lot::RwLock;
use pingora_error::{Error, ErrorType::*, OrErr, Result};
use pingora_pool::{ConnectionMeta, ConnectionPool};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tls::TlsConnector;
use tokio::io::{AsyncRead, ReadBuf};

#[derive(Clone, Debug)]
pub(crate) struct IdleConnection {
    connection: ConnectionMeta,
    idle_since: Instant,
}

impl IdleConnection {
    pub(crate) fn new(connection: ConnectionMeta) -> Self {
        Self {
            connection,
            idle_since: Instant::now(),
        }
    }

    fn elapsed(&self) -> Duration {
        self.idle_since.elapsed()
    }
}

/// Callback invoked when an idle upstream connection leaves the keep-alive pool
/// without being reused.
pub type PoolCallback = Arc<dyn Fn(Duration) + Send + Sync>;

/// The options to configure a [TransportConnector]
#[derive(Clone)]
pub struct ConnectorOptions {
    /// Path to the CA file used to validate server certs.
    ///
    /// If `None`, the CA in the [default](https://www.openssl.org/docs/manmaster/man3/SSL_CTX_set_default_verify_paths.html)
    /// locations will be loaded
    pub ca_file: Option<String>,
    /// The maximum number of unique s2n configs to cache. Creating a new s2n config is an
    /// expensive operation, so we cache and re-use config objects with identical configurations.
    /// Defaults to a cache size of 10. A value of 0 disables the cache.
    ///
    /// WARNING: Disabling the s2n config cache can result in poor performance
    #[cfg(feature = "s2n")]
    pub s2n_config_cache_size: Option<usize>,
    /// The default client cert and key to use for mTLS
    ///
    /// Each individual connection can use their own cert key to override this.
    pub cert_key_file: Option<(String, String)>,
    /// When enabled allows TLS keys to be written to a file specified by the SSLKEYLOG
    /// env variable. This can be used by tools like Wireshark to decrypt traffic
    /// for debugging purposes.
    pub debug_ssl_keylog: bool,
    /// Effective global cap for the keepalive pool. Derived from
    /// `server_conf.upstream_keepalive_pool_size * server_conf.threads`
    /// in [`Self::from_server_conf`] so that operator-facing config keeps
    /// its per-worker meaning even though the pool itself now uses a single
    /// global LRU.
    pub keepalive_pool_size: usize,
    /// Optionally offload the connection establishment to dedicated thread pools
    ///
    /// TCP and TLS connection establishment can be CPU intensive. Sometimes such tasks can slow
    /// down the entire service, which causes timeouts which leads to more connections which
    /// snowballs the issue. Use this option to isolate these CPU intensive tasks from impacting
    /// other traffic.
    ///
    /// Syntax: (#pools, #thread in each pool)
    pub offload_threadpool: Option<(usize, usize)>,
    /// Bind to any of the given source IPv6 addresses
    pub bind_to_v4: Vec<SocketAddr>,
    /// Bind to any of the given source IPv4 addresses
    pub bind_to_v6: Vec<SocketAddr>,
    /// Optional callback for observing how long upstream connections stayed idle
    /// before leaving the keep-alive pool without reuse.
    pub keepalive_pool_callback: Option<PoolCallback>,
    /// ficus patch: check idle pooled connections in sweeps this far apart, one task per
    /// thread, instead of a watch task for each released connection (`None`, the default).
    ///
    /// A connection the peer closes, or that receives data, is then closed at the next sweep
    /// rather than at once, and the idle timeout holds to within the interval; a connection
    /// closed by the peer is never reused either way (taking one checks its socket). Not
    /// used with a `keepalive_pool_callback`, which is told the idle time at eviction.
    ///
    /// On a single-thread runtime each thread then keeps the idle connections it released,
    /// without locks, the newest taken first; the pool's size limit still holds over all
    /// threads, and a release into a full pool closes that thread's oldest idle connection
    /// (or the released one, if the thread has none) rather than the oldest of any thread's.
    pub idle_check_interval: Option<Duration>,
}

impl ConnectorOptions {
    /// Derive the [ConnectorOptions] from a [ServerConf]
    pub fn from_server_conf(server_conf: &ServerConf) -> Self {
        // create SocketAddrs with port 0 for src addr bind

        let bind_to_v4 = server_conf
            .client_bind_to_ipv4
            .iter()
            .map(|v4| {
                let ip = v4.parse().unwrap();
                SocketAddr::new(ip, 0)
            })
            .collect();

        let bind_to_v6 = server_conf
            .client_bind_to_ipv6
            .iter()
            .map(|v6| {
                let ip = v6.parse().unwrap();
                SocketAddr::new(ip, 0)
            })
            .collect();
        ConnectorOptions {
            ca_file: server_conf.ca_file.clone(),
            cert_key_file: None, // TODO: use it
            #[cfg(feature = "s2n")]
            s2n_config_cache_size: server_conf.s2n_config_cache_size,
            debug_ssl_keylog: server_conf.upstream_debug_ssl_keylog,
            keepalive_pool_size: server_conf
                .upstream_keepalive_pool_size
                .saturating_mul(server_conf.threads.max(1)),
            offload_threadpool: server_conf.upstream_connect_offload_threadpool(),
            bind_to_v4,
            bind_to_v6,
            keepalive_pool_callback: None,
            idle_check_interval: None,
        }
    }

    /// Create a new [ConnectorOptions] with the given keepalive pool size
    pub fn new(keepalive_pool_size: usize) -> Self {
        ConnectorOptions {
            ca_file: None,
            #[cfg(feature = "s2n")]
            s2n_config_cache_size: None,
            cert_key_file: None,
            debug_ssl_keylog: false,
            keepalive_pool_size,
            offload_threadpool: None,
            bind_to_v4: vec![],
            bind_to_v6: vec![],
            keepalive_pool_callback: None,
            idle_check_interval: None,
        }
    }
}

/// [TransportConnector] provides APIs to connect to servers via TCP or TLS with connection reuse
pub struct TransportConnector {
    tls_ctx: tls::Connector,
    connection_pool: Arc<ConnectionPool<Arc<IdleStream>>>,
    offload: Option<OffloadRuntime>,
    bind_to_v4: Vec<SocketAddr>,
    bind_to_v6: Vec<SocketAddr>,
    preferred_http_version: PreferredHttpVersion,
    /// Wrapped in `Arc` so external consumers (e.g. proxy services) can clone a reference
    /// for periodic metric reporting without needing access to the connector itself.
    unexpected_data_conn_count: Arc<AtomicU64>,
    keepalive_pool_callback: Option<PoolCallback>,
    /// ficus patch: see [ConnectorOptions::idle_check_interval].
    idle_check_interval: Option<Duration>,
    /// ficus patch: where idle connections are kept on single-thread runtimes when they are
    /// checked in sweeps (see `local_pool`).
    local_pools: Option<local_pool::LocalPools>,
}

const DEFAULT_POOL_SIZE: usize = 128;

impl TransportConnector {
    /// Create a new [TransportConnector] with the given [ConnectorOptions]
    pub fn new(mut options: Option<ConnectorOptions>) -> Self {
        let pool_size = options
            .as_ref()
            .map_or(DEFAULT_POOL_SIZE, |c| c.keepalive_pool_size);
        // Take the offloading setting there because this layer has implement offloading,
        // so no need for stacks at lower layer to offload again.
        let offload = options.as_mut().and_then(|o| o.offload_threadpool.take());
        let bind_to_v4 = options
            .as_ref()
            .map_or_else(Vec::new, |o| o.bind_to_v4.clone());
        let bind_to_v6 = options
            .as_ref()
            .map_or_else(Vec::new, |o| o.bind_to_v6.clone());
        let keepalive_pool_callback = options
            .as_ref()
            .and_then(|o| o.keepalive_pool_callback.clone());
        let idle_check_interval = options.as_ref().and_then(|o| o.idle_check_interval);
        let local_pools = match (idle_check_interval, &keepalive_pool_callback) {
            (Some(interval), None) => Some(local_pool::LocalPools::new(pool_size, interval)),
            _ => None,
        };
        TransportConnector {
            tls_ctx: tls::Connector::new(options),
            connection_pool: Arc::new(ConnectionPool::new(pool_size)),
            offload: offload.map(|v| OffloadRuntime::new("upstream connect offload", v.0, v.1)),
            bind_to_v4,
            bind_to_v6,
            preferred_http_version: PreferredHttpVersion::new(),
            unexpected_data_conn_count: Arc::new(AtomicU64::new(0)),
            keepalive_pool_callback,
            idle_check_interval,
            local_pools,
        }
    }

    /// ficus patch: the pools idle connections are kept in by the threads that released them,
    /// when this connector has them and runs on a single-thread runtime.
    fn local_pools(&self) -> Option<&local_pool::LocalPools> {
        self.local_pools
            .as_ref()
            .filter(|_| crate::utils::on_single_thread_runtime())
    }

    /// Connect to the given server [Peer]
    ///
    /// No connection is reused.
    pub async fn new_stream<P: Peer + Send + Sync + 'static>(&self, peer: &P) -> Result<Stream> {
        let rt = self
            .offload
            .as_ref()
            .map(|o| o.get_runtime(peer.reuse_hash()));
        let bind_to = l4::bind_to_random(peer, &self.bind_to_v4, &self.bind_to_v6);
        let alpn_override = self.preferred_http_version.get(peer);
        let stream = if let Some(rt) = rt {
            let peer = peer.clone();
            let tls_ctx = self.tls_ctx.clone();
            let offload_start = Instant::now();
            rt.spawn(async move {
                let offload_wait = offload_start.elapsed();
                do_connect(
                    &peer,
                    bind_to,
                    alpn_override,
                    &tls_ctx.ctx,
                    Some(offload_wait),
                )
                .await
            })
            .await
            .or_err(InternalError, "offload runtime failure")??
        } else {
            // ficus patch: boxed, as connecting (TCP, proxy, TLS handshake) is a future of over
            // 8 KB that lived inline in every request's future, and was moved with it, though
            // most requests reuse a pooled connection and never get here.
            Box::pin(do_connect(
                peer,
                bind_to,
                alpn_override,
                &self.tls_ctx.ctx,
                None,
            ))
            .await?
        };

        Ok(stream)
    }

    /// Try to find a reusable connection to the given server [Peer]
    pub async fn reused_stream<P: Peer + Send + Sync>(&self, peer: &P) -> Option<Stream> {
        let mut stream = match self.local_pools() {
            Some(local) => local.take(peer.reuse_hash()),
            None => self.take_from_shared_pool(peer),
        }?;
        // test_reusable_stream: we assume server would never actively send data
        // first on an idle stream.
        // ficus patch: the peer's address is the one the stream's digest read once for the
        // connection, not asked of the kernel again (a `getpeername` call per request); the
        // read below still finds a connection the backend has closed or reset.
        #[cfg(unix)]
        let matches = match stream.get_socket_digest() {
            Some(digest) => match digest.peer_addr() {
                Some(addr) => peer.matches_addr(addr),
                None => peer.matches_fd(stream.id()),
            },
            None => peer.matches_fd(stream.id()),
        };
        #[cfg(windows)]
        let matches = {
            use std::os::windows::io::{AsRawSocket, RawSocket};
            struct WrappedRawSocket(RawSocket);
            impl AsRawSocket for WrappedRawSocket {
                fn as_raw_socket(&self) -> RawSocket {
                    self.0
                }
            }
            peer.matches_sock(WrappedRawSocket(stream.id() as RawSocket))
        };
        if matches && test_reusable_stream(&mut stream, &self.unexpected_data_conn_count) {
            Some(stream)
        } else {
            None
        }
    }

    /// ficus patch: [Self::reused_stream]'s search of the pool shared by the threads.
    fn take_from_shared_pool<P: Peer + Send + Sync>(&self, peer: &P) -> Option<Stream> {
        let Some(idle) = self.connection_pool.get(&pool_key(peer.reuse_hash())) else {
            debug!("No reusable connection found for {peer}");
            return None;
        };
        // ficus patch: the idle watch holds the stream only while it polls it, so the stream is
        // taken here and now; waiting for the watch to run and let go of it cost this request a
        // trip through the scheduler.
        let stream = idle.take();
        if stream.is_none() {
            error!("failed to acquire reusable stream");
        }
        stream
    }

    /// Return the [Stream] to the [TransportConnector] for connection reuse.
    ///
    /// Not all TCP/TLS connections can be reused. It is the caller's responsibility to make sure
    /// that protocol over the [Stream] supports connection reuse and the [Stream] itself is ready
    /// to be reused.
    ///
    /// If a [Stream] is dropped instead of being returned via this function. it will be closed.
    pub fn release_stream(
        &self,
        mut stream: Stream,
        key: u64, // usually peer.reuse_hash()
        idle_timeout: Option<Duration>,
    ) {
        if !test_reusable_stream(&mut stream, &self.unexpected_data_conn_count) {
            return;
        }
        if let Some(local) = self.local_pools() {
            debug!("Try to keepalive client session");
            local.put(key, stream, idle_timeout);
            return;
        }
        let id = stream.id();
        let meta = ConnectionMeta::new(pool_key(key), id);
        debug!("Try to keepalive client session");
        let stream = Arc::new(IdleStream(parking_lot::Mutex::new(Some(stream))));
        if let (Some(interval), None) = (self.idle_check_interval, &self.keepalive_pool_callback)
        {
            // ficus patch: checked by its thread's sweep (see `idle_sweep`), which needs
            // neither of the pool's signals: it holds the stream weakly, and a stream taken or
            // evicted is gone.
            let released = idle_sweep::Released {
                stream: Arc::downgrade(&stream),
                meta,
                pool: self.connection_pool.clone(),
                since: Instant::now(),
                timeout: idle_timeout,
                interval,
            };
            self.connection_pool.put_unwatched(&released.meta, stream);
            idle_sweep::record(released);
            return;
        }
        let (notify_close, watch_use) = self.connection_pool.put(&meta, stream.clone());
        let idle_meta = IdleConnection::new(meta);
        let pool = self.connection_pool.clone(); //clone the arc
        let keepalive_pool_callback = self.keepalive_pool_callback.clone();
        // ficus patch: the watch runs where the connection was released, which on a
        // single-thread runtime is where its socket is registered (see `pool_key`). It was
        // spawned on `pingora_runtime::current_handle()`, which under a no-steal runtime is a
        // random thread: the spawn, the watch's polls and the wake-up when a request takes
        // the connection then crossed threads, for every request.
        tokio::spawn(async move {
            if pool
                .idle_watch(
                    IdleRead(stream),
                    &idle_meta.connection,
                    idle_timeout,
                    notify_close,
                    watch_use,
                )
                .await
            {
                if let Some(callback) = keepalive_pool_callback {
                    callback(idle_meta.elapsed());
                }
            }
        });
    }

    /// Get a stream to the given server [Peer]
    ///
    /// This function will try to find a reusable [Stream] first. If there is none, a new connection
    /// will be made to the server.
    ///
    /// The returned boolean will indicate whether the stream is reused.
    pub async fn get_stream<P: Peer + Send + Sync + 'static>(
        &self,
        peer: &P,
    ) -> Result<(Stream, bool)> {
        let reused_stream = self.reused_stream(peer).await;
        if let Some(s) = reused_stream {
            Ok((s, true))
        } else {
            let s = self.new_stream(peer).await?;
            Ok((s, false))
        }
    }

    /// Tell the connector to always send h1 for ALPN for the given peer in the future.
    pub fn prefer_h1(&self, peer: &impl Peer) {
        self.preferred_http_version.add(peer, 1);
    }

    /// Return the number of times a pooled connection was found to contain unexpected data
    /// from the server.
    pub fn unexpected_data_connection_count(&self) -> u64 {
        self.unexpected_data_conn_count.load(Ordering::Relaxed)
    }

    /// Return a shared reference to the unexpected data connection counter.
    ///
    /// This allows external consumers (e.g. proxy services) to clone the `Arc` and
    /// periodically read the counter for metric reporting without needing ongoing
    /// access to the connector.
    pub fn unexpected_data_connection_counter(&self) -> Arc<AtomicU64> {
        self.unexpected_data_conn_count.clone()
    }
}

// Perform the actual L4 and tls connection steps while respecting the peer's
// connection timeout if there is one
async fn do_connect<P: Peer + Send + Sync>(
    peer: &P,
    bind_to: Option<BindTo>,
    alpn_override: Option<ALPN>,
    tls_ctx: &TlsConnector,
    offload_wait_duration: Option<Duration>,
) -> Result<Stream> {
    // Create the future that does the connections, but don't evaluate it until
    // we decide if we need a timeout or not
    let connect_future =
        do_connect_inner(peer, bind_to, alpn_override, tls_ctx, offload_wait_duration);

    match peer.total_connection_timeout() {
        Some(t) => match pingora_timeout::timeout(t, connect_future).await {
            Ok(res) => res,
            Err(_) => Error::e_explain(
                ConnectTimedout,
                format!("connecting to server {peer}, total-connection timeout {t:?}"),
            ),
        },
        None => connect_future.await,
    }
}

// Perform the actual L4 and tls connection steps with no timeout
async fn do_connect_inner<P: Peer + Send + Sync>(
    peer: &P,
    bind_to: Option<BindTo>,
    alpn_override: Option<ALPN>,
    tls_ctx: &TlsConnector,
    offload_wait_duration: Option<Duration>,
) -> Result<Stream> {
    let l4_connect_start = Instant::now();
    let mut stream = l4_connect(peer, bind_to).await?;
    stream.set_establishment_timing(l4_connect_start.elapsed(), offload_wait_duration);
    if peer.tls() {
        // Capture the local address before the handshake consumes the stream, so a TLS failure
        // can still report the address we connected from.
        // Arc clone plus a copy of the small SocketAddr, negligible next to the handshake.
        let local_addr = stream
            .get_socket_digest()
            .and_then(|digest| digest.local_addr().and_then(|addr| addr.as_inet()).copied());
        let tls_stream = tls::connect(stream, peer, alpn_override, tls_ctx)
            .await
            .map_err(|e| attach_connect_local_addr(e, local_addr))?;
        Ok(Box::new(tls_stream))
    } else {
        Ok(Box::new(stream))
    }
}

struct PreferredHttpVersion {
    // TODO: shard to avoid the global lock
    versions: RwLock<HashMap<u64, u8>>, // <hash of peer, version>
}

// TODO: limit the size of this

impl PreferredHttpVersion {
    pub fn new() -> Self {
        PreferredHttpVersion {
            versions: RwLock::default(),
        }
    }

    pub fn add(&self, peer: &impl Peer, version: u8) {
        let key = peer.reuse_hash();
        let mut v = self.versions.write();
        v.insert(key, version);
    }

    pub fn get(&self, peer: &impl Peer) -> Option<ALPN> {
        let key = peer.reuse_hash();
        let v = self.versions.read();
        v.get(&key)
            .copied()
            .map(|v| if v == 1 { ALPN::H1 } else { ALPN::H2H1 })
    }
}

use futures::future::FutureExt;
use tokio::io::AsyncReadExt;

/// ficus patch: a connection kept in the pool, until a request takes it or its idle watch
/// (see [TransportConnector::release_stream]) drops it.
struct IdleStream(parking_lot::Mutex<Option<Stream>>);

impl IdleStream {
    /// Only for the request that got this connection from the pool: `ConnectionPool::get`
    /// has then signalled the idle watch, which ends on that signal without reading again.
    /// Taken any other way, a watch with no idle timeout would wait forever. (Checked by a
    /// sweep instead, see `idle_sweep`, the connection has no watch to signal.)
    fn take(&self) -> Option<Stream> {
        self.0.lock().take()
    }
}

/// The idle watch's reader of a pooled connection: it locks the stream only for the length of
/// a poll, never across an await, so a request can take the stream at any time.
struct IdleRead(Arc<IdleStream>);

impl AsyncRead for IdleRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.0 .0.lock().as_mut() {
            Some(stream) => Pin::new(stream).poll_read(cx, buf),
            // Taken by a request: the pool's pick-up signal, which the watch checks first,
            // ends it.
            None => Poll::Pending,
        }
    }
}

/// ficus patch: the key under which the calling thread keeps and finds idle connections of the
/// peer whose `reuse_hash` is `key`.
///
/// On a single-thread runtime, as each thread of a no-steal server runs, a socket is registered
/// with the IO driver of the runtime that opened it, and only that thread sees its readiness:
/// a request on another thread that took the connection from a shared pool was woken through
/// the opening thread for each of its reads and writes. There each thread keeps its own idle
/// connections (as each NGINX worker keeps its own `keepalive` cache), under the peer's key
/// mixed with a random value of the thread's; the pool's size limit stays one for all. On a
/// multi-thread runtime, whose threads share one IO driver, the pool is shared as before.
fn pool_key(key: u64) -> u64 {
    use std::hash::BuildHasher;
    thread_local! {
        static THREAD_SALT: u64 = std::collections::hash_map::RandomState::new()
            .hash_one(std::thread::current().id());
    }
    if !crate::utils::on_single_thread_runtime() {
        return key;
    }
    // A thread being torn down has no salt left; its connections are closing anyway.
    THREAD_SALT.try_with(|salt| key ^ salt).unwrap_or(key)
}

/// Test whether a stream is already closed or not reusable (server sent unexpected data)
fn test_reusable_stream(stream: &mut Stream, unexpected_data_conn_count: &AtomicU64) -> bool {
    let mut buf = [0; 1];
    // tokio::task::unconstrained because now_or_never may yield None when the future is ready
    let result = tokio::task::unconstrained(stream.read(&mut buf[..])).now_or_never();
    if let Some(data_result) = result {
        match data_result {
            Ok(n) => {
                if n == 0 {
                    debug!("Idle connection is closed");
                } else {
                    warn!("Unexpected data read in idle connection");
                    unexpected_data_conn_count.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                debug!("Idle connection is broken: {e:?}");
            }
        }
        false
    } else {
        true
    }
}

/// Test utilities for creating mock acceptors.
#[cfg(all(test, unix))]
pub(crate) mod test_utils {
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixListener;

    /// Generates a unique socket path for testing to avoid conflicts when running in parallel
    pub fn unique_uds_path(test_name: &str) -> String {
        format!(
            "/tmp/test_{test_name}_{:?}_{}.sock",
            std::thread::current().id(),
            std::process::id()
        )
    }

    /// A mock UDS server that accepts one connection, sends data, and waits for shutdown signal
    ///
    /// Returns: (ready_rx, shutdown_tx, server_handle)
    /// - ready_rx: Wait on this to know when server is ready to accept connections
    /// - shutdown_tx: Send on this to tell server to shut down
    /// - server_handle: Join handle for the server task
    pub fn spawn_mock_uds_server(
        socket_path: String,
        response: &'static [u8],
    ) -> (
        tokio::sync::oneshot::Receiver<()>,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel();

        let server_handle = tokio::spawn(async move {
            let _ = std::fs::remove_file(&socket_path);
            let listener = UnixListener::bind(&socket_path).unwrap();
            // Signal that the server is ready to accept connections
            let _ = ready_tx.send(());

            if let Ok((mut stream, _addr)) = listener.accept().await {
                let _ = stream.write_all(response).await;
                // Keep the connection open until the test tells us to shutdown
                let _ = shutdown_rx.await;
            }
            let _ = std::fs::remove_file(&socket_path);
        });

        (ready_rx, shutdown_tx, server_handle)
    }

    /// A mock UDS server that immediately closes connections (for testing error handling)
    ///
    /// Returns: (ready_rx, shutdown_tx, server_handle)
    pub fn spawn_mock_uds_server_close_immediate(
        socket_path: String,
    ) -> (
        tokio::sync::oneshot::Receiver<()>,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel();

        let server_handle = tokio::spawn(async move {
            let _ = std::fs::remove_file(&socket_path);
            let listener = UnixListener::bind(&socket_path).unwrap();
            // Signal that the server is ready to accept connections
            let _ = ready_tx.send(());

            if let Ok((mut stream, _addr)) = listener.accept().await {
                let _ = stream.shutdown().await;
                // Wait for shutdown signal before cleaning up
                let _ = shutdown_rx.await;
            }
            let _ = std::fs::remove_file(&socket_path);
        });

        (ready_rx, shutdown_tx, server_handle)
    }
}

#[cfg(test)]
#[cfg(feature = "any_tls")]
mod tests {
    use std::time::Duration;

    use pingora_error::ErrorType;
    use tls::Connector;

    use super::*;
    use crate::upstreams::peer::BasicPeer;

    #[tokio::test]
    async fn test_connect() {
        let connector = TransportConnector::new(None);
        let peer = BasicPeer::new("1.1.1.1:80");
        // make a new connection to 1.1.1.1
        let stream = connector.new_stream(&peer).await.unwrap();
        let timing = stream.get_timing_digest();
        assert_eq!(timing.len(), 1);
        let l4_timing = timing[0].as_ref().unwrap();
        assert!(l4_timing.establishment_duration.is_some());
        assert!(l4_timing.offload_wait_duration.is_none());
        connector.release_stream(stream, peer.reuse_hash(), None);

        let (_, reused) = connector.get_stream(&peer).await.unwrap();
        assert!(reused);
    }

    #[tokio::test]
    async fn test_connect_with_offload_timing() {
        let mut conf = ConnectorOptions::new(1);
        conf.offload_threadpool = Some((1, 1));
        let connector = TransportConnector::new(Some(conf));
        let peer = BasicPeer::new("1.1.1.1:80");

        let stream = connector.new_stream(&peer).await.unwrap();
        let timing = stream.get_timing_digest();
        let l4_timing = timing[0].as_ref().unwrap();
        assert!(l4_timing.establishment_duration.is_some());
        assert!(l4_timing.offload_wait_duration.is_some());
    }

    #[tokio::test]
    async fn test_connect_tls() {
        let connector = TransportConnector::new(None);
        let mut peer = BasicPeer::new("1.1.1.1:443");
        // BasicPeer will use tls when SNI is set
        peer.sni = "one.one.one.one".to_string();
        // make a new connection to https://1.1.1.1
        let stream = connector.new_stream(&peer).await.unwrap();
        let timing = stream.get_timing_digest();
        assert_eq!(timing.len(), 2);
        let l4_timing = timing[0].as_ref().unwrap();
        assert!(l4_timing.establishment_duration.is_some());
        assert!(l4_timing.offload_wait_duration.is_none());
        let tls_timing = timing[1].as_ref().unwrap();
        assert!(tls_timing.establishment_duration.is_some());
        assert!(tls_timing.offload_wait_duration.is_none());
        connector.release_stream(stream, peer.reuse_hash(), None);

        let (_, reused) = connector.get_stream(&peer).await.unwrap();
        assert!(reused);
    }

    #[tokio::test(flavor = "multi_thread")]
    #[cfg(unix)]
    async fn test_connect_uds() {
        let socket_path = test_utils::unique_uds_path("transport_connector");
        let (ready_rx, shutdown_tx, server_handle) =
            test_utils::spawn_mock_uds_server(socket_path.clone(), b"it works!");

        // Wait for the server to be ready before connecting
        ready_rx.await.unwrap();

        // create a new service at /tmp
        let connector = TransportConnector::new(None);
        let peer = BasicPeer::new_uds(&socket_path).unwrap();
        // make a new connection to mock uds
        let mut stream = connector.new_stream(&peer).await.unwrap();
        let mut buf = [0; 9];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"it works!");

        // Test connection reuse by releasing and getting the stream back
        connector.release_stream(stream, peer.reuse_hash(), None);
        let (stream, reused) = connector.get_stream(&peer).await.unwrap();
        assert!(reused);

        // Clean up: drop the stream, tell server to shutdown, and wait for it
        drop(stream);
        let _ = shutdown_tx.send(());
        server_handle.await.unwrap();
    }

    // 192.0.2.1 is TEST-NET-1 (RFC 5737) — SYN packets are silently
    // dropped on Linux, producing ConnectTimedout. On macOS the kernel
    // may instead return ENETUNREACH (ConnectNoRoute).
    const BLACKHOLE: &str = "192.0.2.1:79";

    async fn do_test_conn_timeout(conf: Option<ConnectorOptions>) {
        let connector = TransportConnector::new(conf);
        let mut peer = BasicPeer::new(BLACKHOLE);
        peer.options.connection_timeout = Some(Duration::from_millis(1));
        let Err(e) = connector.new_stream(&peer).await else {
            panic!("should throw an error");
        };
        assert!(
            e.etype() == &ConnectTimedout || e.etype() == &ConnectNoRoute,
            "unexpected error type: {:?}",
            e.etype()
        );
    }

    #[tokio::test]
    async fn test_conn_timeout() {
        do_test_conn_timeout(None).await;
    }

    #[tokio::test]
    async fn test_conn_timeout_with_offload() {
        let mut conf = ConnectorOptions::new(8);
        conf.offload_threadpool = Some((2, 2));
        do_test_conn_timeout(Some(conf)).await;
    }

    #[tokio::test]
    async fn test_connector_bind_to() {
        // connect to remote while bind to localhost will fail
        let peer = BasicPeer::new("240.0.0.1:80");
        let mut conf = ConnectorOptions::new(1);
        conf.bind_to_v4.push("127.0.0.1:0".parse().unwrap());
        let connector = TransportConnector::new(Some(conf));

        let stream = connector.new_stream(&peer).await;
        let error = stream.unwrap_err();
        // The exact error varies by platform: Linux may return ConnectError,
        // some systems time out (ConnectTimedout), and macOS/others may
        // return ConnectNoRoute (ENETUNREACH) for unreachable addresses.
        assert!(
            error.etype() == &ConnectError
                || error.etype() == &ConnectTimedout
                || error.etype() == &ConnectNoRoute,
            "unexpected error type: {:?}",
            error.etype()
        )
    }

    /// Helper function for testing error handling in the `do_connect` function.
    /// This assumes that the connection will fail on the peer and returns
    /// the decomposed error type and message.
    async fn get_do_connect_failure_with_peer(peer: &BasicPeer) -> (ErrorType, String) {
        let tls_connector = Connector::new(None);
        let stream = do_connect(peer, None, None, &tls_connector.ctx, None).await;
        match stream {
            Ok(_) => panic!("should throw an error"),
            Err(e) => (
                e.etype().clone(),
                e.context
                    .as_ref()
                    .map(|ctx| ctx.as_str().to_owned())
                    .unwrap_or_default(),
            ),
        }
    }

    #[tokio::test]
    async fn test_do_connect_with_total_timeout() {
        let mut peer = BasicPeer::new(BLACKHOLE);
        peer.options.total_connection_timeout = Some(Duration::from_millis(1));
        let (etype, context) = get_do_connect_failure_with_peer(&peer).await;
        assert!(
            etype == ConnectTimedout || etype == ConnectNoRoute,
            "unexpected error type: {etype:?}"
        );
        if etype == ConnectTimedout {
            assert!(context.contains("total-connection timeout"));
        }
    }

    #[tokio::test]
    async fn test_tls_connect_timeout_supersedes_total() {
        let mut peer = BasicPeer::new(BLACKHOLE);
        peer.options.total_connection_timeout = Some(Duration::from_millis(10));
        peer.options.connection_timeout = Some(Duration::from_millis(1));
        let (etype, context) = get_do_connect_failure_with_peer(&peer).await;
        assert!(
            etype == ConnectTimedout || etype == ConnectNoRoute,
            "unexpected error type: {etype:?}"
        );
        if etype == ConnectTimedout {
            assert!(!context.contains("total-connection timeout"));
        }
    }

    #[tokio::test]
    async fn test_do_connect_without_total_timeout() {
        let peer = BasicPeer::new(BLACKHOLE);
        let (etype, context) = get_do_connect_failure_with_peer(&peer).await;
        assert!(etype != ConnectTimedout || !context.contains("total-connection timeout"));
    }

    #[tokio::test]
    async fn test_tls_handshake_failure_records_local_addr() {
        use crate::connectors::l4::ConnectErrorExt;

        // A plaintext listener that closes each connection immediately, so the TLS handshake fails
        // after the TCP connection is established.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });

        // Non-empty SNI makes BasicPeer request TLS against the plaintext listener.
        let mut peer = BasicPeer::new(&server_addr.to_string());
        peer.sni = "openrusty.org".to_string();
        // Safety net so the test fails fast rather than hanging if a platform does not surface the
        // handshake failure immediately; a handshake timeout still exercises the same code path.
        peer.options.connection_timeout = Some(Duration::from_secs(5));

        let tls_connector = Connector::new(None);
        let err = do_connect(&peer, None, None, &tls_connector.ctx, None)
            .await
            .unwrap_err();

        let local_addr = err
            .connect_local_addr()
            .expect("TLS handshake failure should retain the assigned local address");
        assert_ne!(local_addr.port(), 0);
    }

    #[tokio::test]
    async fn test_unexpected_data_connection_count_increments() {
        // Create a duplex stream where we control both ends
        let (mut server, client) = tokio::io::duplex(64);

        let counter = AtomicU64::new(0);
        let mut stream: Stream = Box::new(client);

        // With no data available, the stream should be considered reusable
        assert!(test_reusable_stream(&mut stream, &counter));
        assert_eq!(counter.load(Ordering::Relaxed), 0);

        // Write unexpected data from the server side
        use tokio::io::AsyncWriteExt;
        server.write_all(b"unexpected").await.unwrap();

        // Give the data a moment to be buffered
        tokio::task::yield_now().await;

        // Now test_reusable_stream should detect the unexpected data
        assert!(!test_reusable_stream(&mut stream, &counter));
        assert_eq!(
            counter.load(Ordering::Relaxed),
            1,
            "unexpected_data_connection_count should have incremented"
        );
    }

    // ficus patch: the tests below cover the pooled connection's hand-off and its idle watch.

    /// A connection to a listener on loopback, and the listener's end of it.
    async fn loopback_stream(
        connector: &TransportConnector,
    ) -> (BasicPeer, Stream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = BasicPeer::new(&listener.local_addr().unwrap().to_string());
        let stream = connector.new_stream(&peer).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (peer, stream, server)
    }

    #[test]
    fn connecting_is_boxed_out_of_the_callers_future() {
        let connector = TransportConnector::new(None);
        let peer = BasicPeer::new("127.0.0.1:1");
        // Inline, connecting (TCP, proxy, TLS handshake) made this future over 8 KB, carried
        // and moved by every request's future though most reuse a pooled connection.
        let connecting = connector.new_stream(&peer);
        let size = std::mem::size_of_val(&connecting);
        assert!(size < 512, "{size} bytes");
    }

    #[tokio::test]
    async fn a_released_stream_is_taken_without_waiting_for_its_idle_watch() {
        let connector = TransportConnector::new(None);
        let (peer, stream, _server) = loopback_stream(&connector).await;
        connector.release_stream(stream, peer.reuse_hash(), None);

        // The first poll has the stream: the idle watch, spawned but not yet run, holds no
        // lock on it.
        let reused = connector.reused_stream(&peer).now_or_never();
        assert!(matches!(reused, Some(Some(_))));
    }

    use crate::protocols::l4::socket::SocketAddr as L4Addr;

    /// A peer that shares another's pool key but not its address.
    #[derive(Clone)]
    struct SameKeyPeer {
        address: L4Addr,
        reuse_hash: u64,
    }

    impl std::fmt::Display for SameKeyPeer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}", self.address)
        }
    }

    impl Peer for SameKeyPeer {
        fn address(&self) -> &L4Addr {
            &self.address
        }
        fn tls(&self) -> bool {
            false
        }
        fn sni(&self) -> &str {
            ""
        }
        fn reuse_hash(&self) -> u64 {
            self.reuse_hash
        }
    }

    #[tokio::test]
    async fn a_pooled_stream_is_handed_only_to_the_peer_it_connects_to() {
        let connector = TransportConnector::new(None);
        let (peer, stream, _server) = loopback_stream(&connector).await;
        connector.release_stream(stream, peer.reuse_hash(), None);
        let elsewhere = SameKeyPeer {
            address: "127.0.0.2:1".parse::<std::net::SocketAddr>().unwrap().into(),
            reuse_hash: peer.reuse_hash(),
        };
        assert!(connector.reused_stream(&elsewhere).await.is_none());

        let (peer, stream, _server) = loopback_stream(&connector).await;
        connector.release_stream(stream, peer.reuse_hash(), None);
        let here = SameKeyPeer {
            address: peer.address().clone(),
            reuse_hash: peer.reuse_hash(),
        };
        assert!(connector.reused_stream(&here).await.is_some());
    }

    #[tokio::test]
    async fn a_pooled_streams_peer_is_the_address_its_digest_read_once() {
        let connector = TransportConnector::new(None);
        let (peer, mut stream, _server) = loopback_stream(&connector).await;
        // Had the kernel been asked at reuse, it would name the listener; the digest's
        // address, read once per connection, is the one checked.
        let digest = crate::protocols::SocketDigest::from_raw_fd(stream.id() as _);
        let recorded: L4Addr = "127.0.0.2:1".parse::<std::net::SocketAddr>().unwrap().into();
        assert!(digest.peer_addr.set(Some(recorded)).is_ok());
        stream.set_socket_digest(digest);
        connector.release_stream(stream, peer.reuse_hash(), None);
        assert!(connector.reused_stream(&peer).await.is_none());

        let (peer, stream, _server) = loopback_stream(&connector).await;
        let recorded = stream.get_socket_digest().expect("a digest");
        connector.release_stream(stream, peer.reuse_hash(), None);
        let stream = connector.reused_stream(&peer).await.expect("reused");
        assert_eq!(recorded.peer_addr.get(), Some(&Some(peer.address().clone())));
        drop(stream);
    }

    #[tokio::test]
    async fn a_socket_is_checked_against_its_peer_as_its_digest_is() {
        use crate::protocols::ConnFdReusable;
        let connector = TransportConnector::new(None);
        let (peer, stream, _server) = loopback_stream(&connector).await;
        let listener = peer.address().clone();
        let mut elsewhere = listener.clone();
        elsewhere.set_port(1);
        let unspecified: L4Addr = "0.0.0.0:1".parse::<std::net::SocketAddr>().unwrap().into();
        assert!(listener.check_fd_match(stream.id()));
        assert!(!elsewhere.check_fd_match(stream.id()));
        assert!(unspecified.check_fd_match(stream.id()));
        // A descriptor that is no socket: broken, whatever the address.
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(!listener.check_fd_match(std::os::unix::io::AsRawFd::as_raw_fd(&file)));
    }

    #[test]
    fn a_peer_address_matches_the_address_a_connection_reports() {
        let inet = |s: &str| -> L4Addr { s.parse::<std::net::SocketAddr>().unwrap().into() };
        let unix = |p: &str| {
            L4Addr::Unix(std::os::unix::net::SocketAddr::from_pathname(p).unwrap())
        };
        assert!(inet("127.0.0.1:80").matches_peer_addr(&inet("127.0.0.1:80")));
        assert!(!inet("127.0.0.1:80").matches_peer_addr(&inet("127.0.0.1:81")));
        assert!(!inet("127.0.0.1:80").matches_peer_addr(&inet("127.0.0.2:80")));
        assert!(!inet("[::1]:80").matches_peer_addr(&inet("127.0.0.1:80")));
        assert!(inet("0.0.0.0:80").matches_peer_addr(&inet("127.0.0.1:80")));
        assert!(unix("/tmp/a.sock").matches_peer_addr(&unix("/tmp/a.sock")));
        assert!(!unix("/tmp/a.sock").matches_peer_addr(&unix("/tmp/b.sock")));
        assert!(!unix("/tmp/a.sock").matches_peer_addr(&inet("127.0.0.1:80")));
        assert!(!inet("127.0.0.1:80").matches_peer_addr(&unix("/tmp/a.sock")));
    }

    #[tokio::test]
    async fn an_idle_stream_that_receives_data_is_closed_by_its_watch() {
        let connector = TransportConnector::new(None);
        let (peer, stream, mut server) = loopback_stream(&connector).await;
        connector.release_stream(stream, peer.reuse_hash(), None);

        // Data on an idle connection: the watch drops it, and the server sees it close (reset,
        // as the data was left unread).
        use tokio::io::AsyncWriteExt;
        server.write_all(b"unexpected").await.unwrap();
        assert!(closed_by_the_proxy(&mut server).await);
        assert!(connector.reused_stream(&peer).await.is_none());
    }

    /// A connector whose idle connections are checked in sweeps `interval` apart.
    fn sweeping_connector(interval: Duration) -> TransportConnector {
        let mut options = ConnectorOptions::new(DEFAULT_POOL_SIZE);
        options.idle_check_interval = Some(interval);
        TransportConnector::new(Some(options))
    }

    /// Polls `done` every few milliseconds until it holds or ten seconds pass.
    async fn eventually(mut done: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Whether the far end of a connection sees it closed (or reset, if data it sent was left
    /// unread) within ten seconds.
    async fn closed_by_the_proxy(server: &mut tokio::net::TcpStream) -> bool {
        let mut buf = [0; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), server.read(&mut buf)).await;
        match &read {
            Ok(Ok(n)) => *n == 0,
            Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn with_sweeps_a_connection_is_released_and_reused_without_a_task_each_time() {
        let connector = sweeping_connector(Duration::from_secs(3600));
        let (peer, mut stream, _server) = loopback_stream(&connector).await;
        let tasks = tokio::runtime::Handle::current().metrics();
        for _ in 0..100 {
            connector.release_stream(stream, peer.reuse_hash(), None);
            stream = connector.reused_stream(&peer).await.expect("reused");
        }
        // The thread's one sweep task, where each release spawned a watch (alive until run).
        assert_eq!(tasks.num_alive_tasks(), 1);
    }

    // A multi-thread runtime: its connector keeps idle connections in the shared pool and
    // records them in the releasing thread's list (on a single-thread runtime, see
    // `local_pool`, there is no list).
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn with_sweeps_the_list_of_released_connections_stays_bounded() {
        let connector = sweeping_connector(Duration::from_secs(3600));
        let (peer, mut stream, _server) = loopback_stream(&connector).await;
        for _ in 0..10_000 {
            connector.release_stream(stream, peer.reuse_hash(), None);
            stream = connector.reused_stream(&peer).await.expect("reused");
        }
        let recorded = idle_sweep::recorded_on_this_thread();
        assert!(recorded <= 2048, "{recorded} entries for one connection");
    }

    #[tokio::test]
    async fn with_sweeps_an_idle_connection_closed_by_its_peer_is_closed_and_not_reused() {
        let connector = sweeping_connector(Duration::from_millis(20));
        let (peer, stream, server) = loopback_stream(&connector).await;
        connector.release_stream(stream, peer.reuse_hash(), None);
        drop(server);
        // A sweep closes it and empties the list: the entry is gone, and so is the sweep task.
        let tasks = tokio::runtime::Handle::current().metrics();
        assert!(eventually(|| local_pool::idle_on_this_thread() == 0).await);
        assert!(eventually(|| tasks.num_alive_tasks() == 0).await);
        assert!(connector.reused_stream(&peer).await.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn with_sweeps_in_a_shared_pool_an_idle_connection_closed_by_its_peer_is_closed() {
        let connector = sweeping_connector(Duration::from_millis(20));
        let (peer, stream, server) = loopback_stream(&connector).await;
        connector.release_stream(stream, peer.reuse_hash(), None);
        assert_eq!(idle_sweep::recorded_on_this_thread(), 1);
        drop(server);
        assert!(eventually(|| idle_sweep::recorded_on_this_thread() == 0).await);
        assert!(connector.reused_stream(&peer).await.is_none());
    }

    #[tokio::test]
    async fn with_sweeps_on_a_single_thread_runtime_the_thread_keeps_its_idle_connections() {
        let connector = sweeping_connector(Duration::from_secs(3600));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = BasicPeer::new(&listener.local_addr().unwrap().to_string());
        let first = connector.new_stream(&peer).await.unwrap();
        let _first_server = listener.accept().await.unwrap();
        let second = connector.new_stream(&peer).await.unwrap();
        let _second_server = listener.accept().await.unwrap();
        let (first_id, second_id) = (first.id(), second.id());
        connector.release_stream(first, peer.reuse_hash(), None);
        connector.release_stream(second, peer.reuse_hash(), None);
        assert_eq!(local_pool::idle_on_this_thread(), 2);
        assert_eq!(idle_sweep::recorded_on_this_thread(), 0);
        // The newest first: the older one times out if fewer are needed.
        let taken = connector.reused_stream(&peer).await.expect("reused");
        assert_eq!(taken.id(), second_id);
        let taken = connector.reused_stream(&peer).await.expect("reused");
        assert_eq!(taken.id(), first_id);
        assert!(connector.reused_stream(&peer).await.is_none());
        assert_eq!(local_pool::idle_on_this_thread(), 0);
    }

    #[test]
    fn with_sweeps_on_single_thread_runtimes_the_limit_holds_over_all_threads() {
        let mut options = ConnectorOptions::new(1);
        options.idle_check_interval = Some(Duration::from_secs(3600));
        let connector = Arc::new(TransportConnector::new(Some(options)));
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let here = runtime();
        let (peer, _server) = here.block_on(async {
            let (peer, stream, server) = loopback_stream(&connector).await;
            connector.release_stream(stream, peer.reuse_hash(), None);
            (peer, server)
        });
        // The pool of one is full: a thread with no idle connection of its own to close
        // closes the one it releases.
        let elsewhere = std::thread::spawn({
            let connector = connector.clone();
            move || {
                runtime().block_on(async {
                    let (peer, stream, mut server) = loopback_stream(&connector).await;
                    connector.release_stream(stream, peer.reuse_hash(), None);
                    closed_by_the_proxy(&mut server).await
                })
            }
        });
        assert!(elsewhere.join().unwrap());
        assert!(here.block_on(connector.reused_stream(&peer)).is_some());
    }

    #[tokio::test]
    async fn with_sweeps_an_idle_connection_that_receives_data_is_closed() {
        let connector = sweeping_connector(Duration::from_millis(20));
        let (peer, stream, mut server) = loopback_stream(&connector).await;
        connector.release_stream(stream, peer.reuse_hash(), None);
        use tokio::io::AsyncWriteExt;
        server.write_all(b"unexpected").await.unwrap();
        assert!(closed_by_the_proxy(&mut server).await);
        assert!(connector.reused_stream(&peer).await.is_none());
    }

    #[tokio::test]
    async fn with_sweeps_an_idle_connection_is_closed_after_its_timeout() {
        let connector = sweeping_connector(Duration::from_millis(20));
        let (peer, stream, mut server) = loopback_stream(&connector).await;
        let released = Instant::now();
        let timeout = Duration::from_millis(200);
        connector.release_stream(stream, peer.reuse_hash(), Some(timeout));
        assert!(closed_by_the_proxy(&mut server).await);
        assert!(released.elapsed() >= timeout, "{:?}", released.elapsed());
        assert!(connector.reused_stream(&peer).await.is_none());
    }

    #[tokio::test]
    async fn with_sweeps_an_evicted_connection_is_closed_at_once() {
        let mut options = ConnectorOptions::new(1);
        options.idle_check_interval = Some(Duration::from_secs(3600));
        let connector = TransportConnector::new(Some(options));
        let (peer, first, mut first_server) = loopback_stream(&connector).await;
        let (_, second, _second_server) = loopback_stream(&connector).await;
        connector.release_stream(first, peer.reuse_hash(), None);
        // A pool of one: the second release evicts the first, closed then, not at a sweep.
        connector.release_stream(second, peer.reuse_hash(), None);
        assert!(closed_by_the_proxy(&mut first_server).await);
    }

    #[test]
    fn with_sweeps_a_new_runtime_on_the_thread_starts_its_own_sweep() {
        let connector = sweeping_connector(Duration::from_millis(20));
        for _ in 0..2 {
            // The first runtime is dropped with its sweep task still waiting; the second must
            // not take the thread's sweep for running.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let (peer, stream, mut server) = loopback_stream(&connector).await;
                connector.release_stream(stream, peer.reuse_hash(), Some(Duration::ZERO));
                assert!(closed_by_the_proxy(&mut server).await);
                let (peer, stream, _server) = loopback_stream(&connector).await;
                connector.release_stream(stream, peer.reuse_hash(), None);
            });
        }
    }

    #[test]
    fn on_single_thread_runtimes_each_thread_reuses_only_its_own_connections() {
        let connector = Arc::new(TransportConnector::new(None));
        let here = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (peer, _server) = here.block_on(async {
            let (peer, stream, server) = loopback_stream(&connector).await;
            connector.release_stream(stream, peer.reuse_hash(), None);
            (peer, server)
        });

        // Another thread with its own single-thread runtime (as no-steal servers run) does not
        // get it: its socket is registered with this thread's runtime.
        let elsewhere = std::thread::spawn({
            let (connector, peer) = (connector.clone(), peer.clone());
            move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(connector.reused_stream(&peer)).is_some()
            }
        });
        assert!(!elsewhere.join().unwrap());
        assert!(here.block_on(connector.reused_stream(&peer)).is_some());
    }

    #[test]
    fn on_a_multi_thread_runtime_the_pool_is_shared() {
        let connector = Arc::new(TransportConnector::new(None));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (peer, _server) = rt.block_on(async {
            let (peer, stream, server) = loopback_stream(&connector).await;
            connector.release_stream(stream, peer.reuse_hash(), None);
            (peer, server)
        });
        // Taken by a task on one of the runtime's worker threads, not the thread that released it.
        let reused = rt.block_on(rt.spawn({
            let (connector, peer) = (connector.clone(), peer.clone());
            async move { connector.reused_stream(&peer).await.is_some() }
        }));
        assert!(reused.unwrap());
    }
}

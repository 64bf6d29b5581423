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

//! The listening service
//!
//! A [Service] (listening service) responds to incoming requests on its endpoints.
//! Each [Service] can be configured with custom application logic (e.g. an `HTTPProxy`) and one or
//! more endpoints to listen to.

use crate::apps::ServerApp;
use crate::listeners::tls::TlsSettings;
#[cfg(feature = "connection_filter")]
use crate::listeners::AcceptAllFilter;
use crate::listeners::{
    ConnectionFilter, ListenerConfig, Listeners, ServerAddress, TcpSocketOptions, TransportStack,
};
use crate::protocols::Stream;
#[cfg(unix)]
use crate::server::ListenFds;
use crate::server::{RuntimeOpts, ShutdownWatch};
use crate::services::Service as ServiceTrait;

use async_trait::async_trait;
use log::{debug, error, info};
use pingora_error::Result;
use pingora_runtime::current_handle;
use pingora_timeout::timeout;
use std::fs::Permissions;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Override the runtime options used to run a listening service.
pub type RuntimeOptsOverride = Arc<dyn Fn(&RuntimeOpts) -> Option<RuntimeOpts> + Send + Sync>;

/// ficus patch: the most connections a [Service] holds open at once. At the limit the service
/// stops accepting (new connections wait in the listen backlog) until one of its connections
/// closes. Shared, so that the application can report it.
#[derive(Debug)]
pub struct ConnectionLimit {
    max: usize,
    slots: Arc<Semaphore>,
    /// Accepted connections still open (the accept loop also holds a slot while it waits
    /// in `accept()`, so the free slots do not say this).
    open: AtomicUsize,
    waits: AtomicU64,
}

/// An accepted connection: counted as open, and holding its slot, until dropped.
struct OpenConnection {
    limit: Arc<ConnectionLimit>,
    _slot: OwnedSemaphorePermit,
}

impl OpenConnection {
    fn new(limit: Arc<ConnectionLimit>, slot: OwnedSemaphorePermit) -> OpenConnection {
        limit.open.fetch_add(1, Ordering::Relaxed);
        OpenConnection { limit, _slot: slot }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.limit.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnectionLimit {
    /// A limit of `max` connections (at least one).
    pub fn new(max: usize) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        ConnectionLimit {
            max,
            slots: Arc::new(Semaphore::new(max)),
            open: AtomicUsize::new(0),
            waits: AtomicU64::new(0),
        }
    }

    /// The limit.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// How many times accepting had to wait for a connection to close.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    /// A slot for the next connection, waiting for one while all are taken.
    async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Some(slot);
        }
        self.waits.fetch_add(1, Ordering::Relaxed);
        info!("{} connections open: accepting paused until one closes", self.max);
        // the semaphore is never closed
        self.slots.clone().acquire_owned().await.ok()
    }
}

/// The type of service that is associated with a list of listening endpoints and a particular application
pub struct Service<A> {
    name: String,
    listeners: Listeners,
    app_logic: Option<A>,
    /// The number of preferred threads. `None` to follow global setting.
    pub threads: Option<usize>,
    runtime_opts_override: Option<RuntimeOptsOverride>,
    #[cfg(feature = "connection_filter")]
    connection_filter: Arc<dyn ConnectionFilter>,
    connection_limit: Option<Arc<ConnectionLimit>>,
}

impl<A> Service<A> {
    /// Create a new [`Service`] with the given application (see [`crate::apps`]).
    pub fn new(name: String, app_logic: A) -> Self {
        Service {
            name,
            listeners: Listeners::new(),
            app_logic: Some(app_logic),
            threads: None,
            runtime_opts_override: None,
            #[cfg(feature = "connection_filter")]
            connection_filter: Arc::new(AcceptAllFilter),
            connection_limit: None,
        }
    }

    /// Create a new [`Service`] with the given application (see [`crate::apps`]) and the given
    /// [`Listeners`].
    pub fn with_listeners(name: String, listeners: Listeners, app_logic: A) -> Self {
        Service {
            name,
            listeners,
            app_logic: Some(app_logic),
            threads: None,
            runtime_opts_override: None,
            #[cfg(feature = "connection_filter")]
            connection_filter: Arc::new(AcceptAllFilter),
            connection_limit: None,
        }
    }

    /// ficus patch: cap the connections this service holds open at once, over all its
    /// endpoints (default: no cap).
    pub fn set_connection_limit(&mut self, limit: Arc<ConnectionLimit>) {
        self.connection_limit = Some(limit);
    }

    /// Set a runtime options override for this service.
    ///
    /// Returning [`None`] from the override uses the global runtime options.
    pub fn set_runtime_opts_override(&mut self, override_fn: RuntimeOptsOverride) {
        self.runtime_opts_override = Some(override_fn);
    }

    /// Set a custom connection filter for this service.
    ///
    /// The connection filter will be applied to all incoming connections
    /// on all endpoints of this service. Connections that don't pass the
    /// filter will be dropped immediately at the TCP level, before TLS
    /// handshake or any HTTP processing.
    ///
    /// # Feature Flag
    ///
    /// This method requires the `connection_filter` feature to be enabled.
    /// When the feature is disabled, this method is a no-op.
    ///
    /// # Example
    ///
    /// ```rust,no_run
    /// # use std::sync::Arc;
    /// # use pingora_core::listeners::{ConnectionFilter, AcceptAllFilter};
    /// # struct MyService;
    /// # impl MyService {
    /// #   fn new() -> Self { MyService }
    /// # }
    /// let mut service = MyService::new();
    /// let filter = Arc::new(AcceptAllFilter);
    /// service.set_connection_filter(filter);
    /// ```
    #[cfg(feature = "connection_filter")]
    pub fn set_connection_filter(&mut self, filter: Arc<dyn ConnectionFilter>) {
        self.connection_filter = filter.clone();
        self.listeners.set_connection_filter(filter);
    }

    #[cfg(not(feature = "connection_filter"))]
    pub fn set_connection_filter(&mut self, _filter: Arc<dyn ConnectionFilter>) {}

    /// Get the [`Listeners`], mostly to add more endpoints.
    pub fn endpoints(&mut self) -> &mut Listeners {
        &mut self.listeners
    }

    // the follow add* function has no effect if the server is already started

    /// Add a TCP listening endpoint with the given address (e.g., `127.0.0.1:8000`).
    pub fn add_tcp(&mut self, addr: &str) {
        self.listeners.add_tcp(addr);
    }

    /// Add a listening endpoint configured by a [`ListenerConfig`].
    pub fn add_listener(&mut self, endpoint: ListenerConfig) {
        self.listeners.add_listener(endpoint);
    }

    /// Add a TCP listening endpoint with the given [`TcpSocketOptions`].
    pub fn add_tcp_with_settings(&mut self, addr: &str, sock_opt: TcpSocketOptions) {
        self.listeners.add_tcp_with_settings(addr, sock_opt);
    }

    /// Add a Unix domain socket listening endpoint with the given path.
    ///
    /// Optionally take a permission of the socket file. The default is read and write access for
    /// everyone (0o666).
    #[cfg(unix)]
    pub fn add_uds(&mut self, addr: &str, perm: Option<Permissions>) {
        self.listeners.add_uds(addr, perm);
    }

    /// Add a TLS listening endpoint with the given certificate and key paths.
    pub fn add_tls(&mut self, addr: &str, cert_path: &str, key_path: &str) -> Result<()> {
        self.listeners.add_tls(addr, cert_path, key_path)
    }

    /// Add a TLS listening endpoint with the given [`TlsSettings`] and [`TcpSocketOptions`].
    pub fn add_tls_with_settings(
        &mut self,
        addr: &str,
        sock_opt: Option<TcpSocketOptions>,
        settings: TlsSettings,
    ) {
        self.listeners
            .add_tls_with_settings(addr, sock_opt, settings)
    }

    /// Add an endpoint according to the given [`ServerAddress`]
    pub fn add_address(&mut self, addr: ServerAddress) {
        self.listeners.add_address(addr);
    }

    /// Get a reference to the application inside this service
    pub fn app_logic(&self) -> Option<&A> {
        self.app_logic.as_ref()
    }

    /// Get a mutable reference to the application inside this service
    pub fn app_logic_mut(&mut self) -> Option<&mut A> {
        self.app_logic.as_mut()
    }
}

impl<A: ServerApp + Send + Sync + 'static> Service<A> {
    pub async fn handle_event(event: Stream, app_logic: Arc<A>, shutdown: ShutdownWatch) {
        debug!("new event!");
        let mut reuse_event = app_logic.process_new(event, &shutdown).await;
        while let Some(event) = reuse_event {
            // TODO: with no steal runtime, consider spawn() the next event on
            // another thread for more evenly load balancing
            debug!("new reusable event!");
            reuse_event = app_logic.process_new(event, &shutdown).await;
        }
    }

    async fn run_endpoint(
        app_logic: Arc<A>,
        mut stack: TransportStack,
        mut shutdown: ShutdownWatch,
        limit: Option<Arc<ConnectionLimit>>,
    ) {
        // the accept loop, until the system is shutting down
        loop {
            let next = async {
                let slot = match &limit {
                    Some(limit) => limit.slot().await,
                    None => None,
                };
                (slot, stack.accept().await)
            };
            let (slot, new_io) = tokio::select! { // TODO: consider biased for perf reason?
                next = next => next,
                shutdown_signal = shutdown.changed() => {
                    match shutdown_signal {
                        Ok(()) => {
                            if !*shutdown.borrow() {
                                // happen in the initial read
                                continue;
                            }
                            info!("Shutting down {}", stack.as_str());
                            break;
                        }
                        Err(e) => {
                            error!("shutdown_signal error {e}");
                            break;
                        }
                    }
                }
            };
            match new_io {
                Ok(io) => {
                    let app = app_logic.clone();
                    let shutdown = shutdown.clone();
                    let open = limit.clone().zip(slot).map(|(l, s)| OpenConnection::new(l, s));
                    let accepted_on = std::thread::current().id();
                    current_handle().spawn(async move {
                        // held until the connection closes
                        let _open = open;
                        let mut io = io;
                        // ficus patch: with work stealing off, each thread runs its own
                        // runtime; the connection is served where it was spawned, so its
                        // socket is registered there too, not with the accepting thread's.
                        if crate::utils::on_single_thread_runtime()
                            && std::thread::current().id() != accepted_on
                        {
                            if let Err(e) = io.register_with_current_runtime() {
                                error!("Downstream connection dropped: {e}");
                                return;
                            }
                        }
                        let peer_addr = io.peer_addr();
                        match timeout(Duration::from_secs(60), io.handshake()).await {
                            Ok(handshake) => {
                                match handshake {
                                    Ok(io) => Self::handle_event(io, app, shutdown).await,
                                    Err(e) => {
                                        // TODO: Maybe IOApp trait needs a fn to handle/filter out this error
                                        if let Some(addr) = peer_addr {
                                            error!("Downstream handshake error from {}: {e}", addr);
                                        } else {
                                            error!("Downstream handshake error: {e}");
                                        }
                                    }
                                }
                            }
                            Err(_) => {
                                error!("Downstream handshake timeout");
                            }
                        }
                    });
                }
                Err(e) => {
                    error!("Accept() failed {e}");
                    if let Some(io_error) = e
                        .root_cause()
                        .downcast_ref::<std::io::Error>()
                        .and_then(|e| e.raw_os_error())
                    {
                        // 24: too many open files. In this case accept() will continue return this
                        // error without blocking, which could use up all the resources
                        if io_error == 24 {
                            // call sleep to calm the thread down and wait for others to release
                            // some resources
                            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        }
                    }
                    // ficus patch: accept() errors return at once. Yield, so that one that
                    // persists (a listener whose runtime has shut down, with work stealing
                    // off) cannot keep this thread from its other tasks and its own stop.
                    tokio::task::yield_now().await;
                }
            }
        }

        stack.cleanup();
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServiceTrait for Service<A> {
    async fn start_service(
        &mut self,
        #[cfg(unix)] fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        let runtime = current_handle();
        let endpoints = self
            .listeners
            .build(
                #[cfg(unix)]
                fds,
            )
            .await
            .expect("Failed to build listeners");

        let app_logic = self
            .app_logic
            .take()
            .expect("can only start_service() once");
        let app_logic = Arc::new(app_logic);

        let mut handlers = Vec::new();

        endpoints.into_iter().for_each(|endpoint| {
            for _ in 0..listeners_per_fd {
                let shutdown = shutdown.clone();
                let my_app_logic = app_logic.clone();
                let endpoint = endpoint.clone();

                let limit = self.connection_limit.clone();
                let jh = runtime.spawn(async move {
                    Self::run_endpoint(my_app_logic, endpoint, shutdown, limit).await;
                });

                handlers.push(jh);
            }
        });

        futures::future::join_all(handlers).await;
        self.listeners.cleanup();
        app_logic.cleanup().await;
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn threads(&self) -> Option<usize> {
        self.threads
    }

    fn runtime_opts_override(&self, global: &RuntimeOpts) -> Option<RuntimeOpts> {
        self.runtime_opts_override
            .as_ref()
            .and_then(|override_fn| override_fn(global))
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(self.listeners.addresses())
    }
}

// ficus patch
#[cfg(test)]
mod connection_limit_tests {
    use super::*;

    #[tokio::test]
    async fn a_full_limit_waits_for_a_connection_to_close() {
        let limit = Arc::new(ConnectionLimit::new(1));
        let first = limit.slot().await.expect("a free slot");
        // A slot taken while waiting in accept() is not an open connection.
        assert_eq!((limit.open(), limit.waits()), (0, 0));
        let first = OpenConnection::new(limit.clone(), first);
        assert_eq!(limit.open(), 1);
        let second = limit.slot();
        tokio::pin!(second);
        assert!(timeout(Duration::from_millis(50), &mut second).await.is_err());
        assert_eq!(limit.waits(), 1);
        drop(first);
        assert_eq!(limit.open(), 0);
        assert!(second.await.is_some());
    }
}

#[cfg(test)]
mod accept_loop_tests {
    use super::*;
    use crate::listeners::Listeners;
    use std::sync::mpsc;

    struct CloseEach;

    #[async_trait]
    impl ServerApp for CloseEach {
        async fn process_new(
            self: &Arc<Self>,
            _session: Stream,
            _shutdown: &ShutdownWatch,
        ) -> Option<Stream> {
            None
        }
    }

    fn current_thread_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime")
    }

    // ficus patch. With work stealing off, every thread runs its own runtime, and the
    // listener is registered with the runtime that built it, not with the one its accept
    // loop happens to run on. On a fast shutdown the listener's runtime can stop first;
    // from then on accept() fails at once, every time, and a loop that never yields keeps
    // its thread from ever seeing its own stop message.
    #[test]
    fn an_accept_loop_whose_listener_runtime_stopped_lets_its_own_thread_stop() {
        let listener_runtime = current_thread_runtime();
        let mut listeners = Listeners::tcp("127.0.0.1:0");
        let stack = listener_runtime
            .block_on(listeners.build(
                #[cfg(unix)]
                None,
            ))
            .expect("a listener")
            .pop()
            .expect("one endpoint");
        drop(listener_runtime);

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (stopped_tx, stopped_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let runtime = current_thread_runtime();
            let (_shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
            runtime.spawn(Service::run_endpoint(
                Arc::new(CloseEach),
                stack,
                shutdown,
                None,
            ));
            runtime.block_on(async {
                // Let the accept loop run before the stop message can be seen.
                tokio::task::yield_now().await;
                let _ = stop_rx.await;
            });
            runtime.shutdown_timeout(Duration::ZERO);
            let _ = stopped_tx.send(());
        });
        let _ = stop_tx.send(());
        assert!(
            stopped_rx.recv_timeout(Duration::from_secs(10)).is_ok(),
            "the accept loop's thread did not stop"
        );
    }
}

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

//! ficus patch: idle pooled connections checked in sweeps, one task per thread, instead of
//! a watch task spawned for each release (see [`ConnectorOptions::idle_check_interval`]).
//!
//! A busy proxy takes a released connection again within microseconds, so the watch spawned
//! for it was mostly a task made, polled, woken by the pick-up and polled again, for nothing.
//! Here a release records the connection in its thread's list, and a sweep of the list every
//! interval drops the entries whose connection has left the pool (taken or evicted: the list
//! holds it weakly, so neither waits for a sweep) and closes those that the peer closed, that
//! received data, or that stayed idle past their timeout. A connection closed by the peer is
//! still never handed out in the meantime: taking one checks the socket first, as it always
//! did.
//!
//! [`ConnectorOptions::idle_check_interval`]: super::ConnectorOptions::idle_check_interval

use super::IdleStream;
use crate::protocols::Stream;
use futures::FutureExt;
use log::{debug, warn};
use parking_lot::Mutex;
use pingora_pool::{ConnectionMeta, ConnectionPool};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// Entries a list holds before it is compacted: then, and each time it doubles past what a
/// compaction left, entries whose connection left the pool are dropped, so the list stays in
/// proportion to the thread's idle connections however fast releases come between sweeps.
const COMPACT_AT: usize = 1024;

/// A released connection, as its thread's list records it.
pub(super) struct Released {
    pub stream: Weak<IdleStream>,
    pub meta: ConnectionMeta,
    pub pool: Arc<ConnectionPool<Arc<IdleStream>>>,
    pub since: Instant,
    pub timeout: Option<Duration>,
    pub interval: Duration,
}

/// What a sweep found of one entry.
#[derive(Debug, PartialEq)]
enum Found {
    /// Still idle in the pool and usable.
    Idle,
    /// Taken or evicted since: nothing to do.
    Gone,
    /// To be closed: removed from the pool, which drops it.
    Close,
}

impl Released {
    fn check(&self, now: Instant) -> Found {
        let Some(idle) = self.stream.upgrade() else {
            return Found::Gone;
        };
        let mut slot = idle.0.lock();
        let Some(stream) = slot.as_mut() else {
            // Being taken by a request that got it from the pool just now.
            return Found::Gone;
        };
        if to_close(stream, self.since, self.timeout, now) {
            Found::Close
        } else {
            Found::Idle
        }
    }
}

/// Whether an idle connection, idle since `since`, is to be closed at `now`: it outstayed
/// `timeout`, or the peer closed it or sent on it.
pub(super) fn to_close(
    stream: &mut Stream,
    since: Instant,
    timeout: Option<Duration>,
    now: Instant,
) -> bool {
    if timeout.is_some_and(|t| now.duration_since(since) >= t) {
        debug!("Idle connection timed out, close it");
        return true;
    }
    peer_closed_or_sent(stream)
}

/// Whether the peer closed an idle connection or sent on it (either ends its reuse). Reads
/// only when the runtime has seen the socket readable; otherwise it costs no system call.
fn peer_closed_or_sent(stream: &mut Stream) -> bool {
    let mut buf = [0; 1];
    match tokio::task::unconstrained(stream.read(&mut buf[..])).now_or_never() {
        None => false,
        Some(Ok(0)) => {
            debug!("Peer closed the idle connection");
            true
        }
        Some(Ok(_)) => {
            warn!("Data received on idle client connection, close it");
            true
        }
        Some(Err(e)) => {
            debug!("error with the idle connection, close it {e:?}");
            true
        }
    }
}

/// One thread's released connections and whether a sweep task runs for them.
#[derive(Default)]
struct List {
    released: Vec<Released>,
    compact_at: usize,
    sweeping: bool,
}

type Shared = Arc<Mutex<List>>;

thread_local! {
    static LIST: Shared = Shared::default();
}

/// Records a connection just put in `released.pool`, and starts its thread's sweep if none
/// runs. Must be called from within a tokio runtime.
pub(super) fn record(released: Released) {
    // A thread being torn down has no list: its runtime, and the pool's use of it, end with it.
    let _ = LIST.try_with(|list| {
        let mut guard = list.lock();
        if guard.released.len() >= guard.compact_at.max(COMPACT_AT) {
            guard
                .released
                .retain(|r| r.stream.strong_count() > 0);
            guard.compact_at = guard.released.len() * 2;
        }
        guard.released.push(released);
        if !guard.sweeping {
            guard.sweeping = true;
            drop(guard);
            // The guard is made here, not in the task: a task dropped before its first poll
            // (its runtime shut down) must reset `sweeping` too.
            tokio::spawn(sweep(Sweeping {
                list: list.clone(),
                ended: false,
            }));
        }
    });
}

/// Resets the list's `sweeping` when its runtime drops its sweep task, so that the next
/// release starts another.
struct Sweeping {
    list: Shared,
    ended: bool,
}

impl Drop for Sweeping {
    fn drop(&mut self) {
        if !self.ended {
            self.list.lock().sweeping = false;
        }
    }
}

/// Sweeps a thread's list every interval (the shortest of its entries') until it is empty.
async fn sweep(mut sweeping: Sweeping) {
    loop {
        let interval = {
            let mut guard = sweeping.list.lock();
            match guard.released.iter().map(|r| r.interval).min() {
                Some(interval) => interval,
                None => {
                    // Under the lock that `record` takes, so a release now starts a new sweep.
                    guard.sweeping = false;
                    sweeping.ended = true;
                    return;
                }
            }
        };
        pingora_timeout::sleep(interval).await;
        let now = Instant::now();
        let mut to_close = Vec::new();
        {
            let mut guard = sweeping.list.lock();
            guard.released.retain(|r| match r.check(now) {
                Found::Idle => true,
                Found::Gone => false,
                Found::Close => {
                    to_close.push((r.pool.clone(), r.meta.clone()));
                    false
                }
            });
            guard.compact_at = guard.released.len() * 2;
        }
        // Outside the lock: closing deregisters sockets and takes the pool's locks.
        for (pool, meta) in to_close {
            pool.pop_closed(&meta);
        }
    }
}

/// For the connector tests, which need a TLS backend (`any_tls`) to compile.
#[cfg(all(test, feature = "any_tls"))]
pub(super) fn recorded_on_this_thread() -> usize {
    LIST.with(|list| list.lock().released.len())
}

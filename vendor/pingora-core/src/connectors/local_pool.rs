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

//! ficus patch: idle connections kept by the thread that released them, for a connector whose
//! idle connections are checked in sweeps (`idle_check_interval`) used on single-thread
//! runtimes.
//!
//! There a socket is registered with the runtime of the thread that opened it, so each thread
//! already kept and found only its own idle connections in the connector's shared pool (under
//! keys mixed with a value of the thread's, see `pool_key`). The shared pool still took its
//! locks, counted references and kept its LRU for every release and every take: some 25
//! atomic operations per proxied request, and a tenth of its user time. Here each thread keeps
//! them in a map of its own, without locks, the newest taken first (as an NGINX worker's
//! `keepalive` cache does), so that the older ones time out when fewer are needed.
//!
//! The connector's limit holds over all threads, kept by one count: a release into a full pool
//! closes the releasing thread's oldest idle connection of that connector (the shared pool
//! closed the oldest of any thread's), or the released one when the thread has none. One task
//! per thread sweeps the thread's map every interval and closes the connections that the peer
//! closed, that received data, or that stayed idle past their timeout; taking a connection
//! still checks its socket first, as it always did.

use super::idle_sweep::to_close;
use crate::protocols::Stream;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One connector's idle connections, kept by the threads that released them.
pub(super) struct LocalPools {
    /// Tells this connector's connections from other connectors' in a thread's map.
    owner: u64,
    limit: usize,
    interval: Duration,
    /// Idle connections of this connector, over all threads.
    idle: Arc<AtomicUsize>,
}

impl LocalPools {
    /// Pools of at most `limit` idle connections in all, swept every `interval`.
    pub(super) fn new(limit: usize, interval: Duration) -> Self {
        static OWNERS: AtomicU64 = AtomicU64::new(0);
        LocalPools {
            owner: OWNERS.fetch_add(1, Ordering::Relaxed),
            limit,
            interval,
            idle: Arc::default(),
        }
    }

    /// The newest idle connection this thread released under `key`, if any.
    pub(super) fn take(&self, key: u64) -> Option<Stream> {
        // A thread being torn down has no map left: nothing to take.
        THREAD
            .try_with(|thread| {
                let mut thread = thread.borrow_mut();
                thread.groups.get_mut(&(self.owner, key))?.take_newest()
            })
            .ok()
            .flatten()
    }

    /// Keeps `stream`, released under `key`, idle on this thread for `timeout` at most. Must be
    /// called from within a single-thread tokio runtime, where the thread's sweep runs.
    pub(super) fn put(&self, key: u64, stream: Stream, timeout: Option<Duration>) {
        let entry = Entry {
            stream,
            since: Instant::now(),
            timeout,
        };
        // What is closed here is dropped, and the sweep spawned, after the map is let go of:
        // a spawn on a runtime shutting down drops the task (and its guard) at once.
        let put = THREAD.try_with(|cell| {
            let mut thread = cell.borrow_mut();
            let closed = if self.idle.fetch_add(1, Ordering::Relaxed) >= self.limit {
                match thread.oldest_of(self.owner) {
                    Some(group) => group.take_oldest(),
                    None => {
                        self.idle.fetch_sub(1, Ordering::Relaxed);
                        return (Some(entry.stream), None);
                    }
                }
            } else {
                None
            };
            let group = thread
                .groups
                .entry((self.owner, key))
                .or_insert_with(|| Group {
                    idle: self.idle.clone(),
                    interval: self.interval,
                    entries: VecDeque::new(),
                });
            group.entries.push_back(entry);
            // The guard is made here, not in the task: a task dropped before its first poll
            // (its runtime shut down) must reset `sweeping` too.
            let sweeping = (!std::mem::replace(&mut thread.sweeping, true)).then(|| Sweeping {
                thread: thread_tag(cell),
                ended: false,
            });
            (closed, sweeping)
        });
        if let Ok((closed, sweeping)) = put {
            drop(closed);
            if let Some(sweeping) = sweeping {
                tokio::spawn(sweep(sweeping));
            }
        }
    }
}

/// An idle connection.
struct Entry {
    stream: Stream,
    since: Instant,
    timeout: Option<Duration>,
}

/// A thread's idle connections of one connector to one peer, oldest first.
struct Group {
    /// The connector's count, which these are part of.
    idle: Arc<AtomicUsize>,
    interval: Duration,
    entries: VecDeque<Entry>,
}

impl Group {
    fn take_newest(&mut self) -> Option<Stream> {
        let entry = self.entries.pop_back()?;
        self.idle.fetch_sub(1, Ordering::Relaxed);
        Some(entry.stream)
    }

    fn take_oldest(&mut self) -> Option<Stream> {
        let entry = self.entries.pop_front()?;
        self.idle.fetch_sub(1, Ordering::Relaxed);
        Some(entry.stream)
    }

    /// Takes out the connections to close at `now`.
    fn sweep(&mut self, now: Instant, closing: &mut Vec<Stream>) {
        let before = self.entries.len();
        for mut entry in std::mem::take(&mut self.entries) {
            if to_close(&mut entry.stream, entry.since, entry.timeout, now) {
                closing.push(entry.stream);
            } else {
                self.entries.push_back(entry);
            }
        }
        self.idle
            .fetch_sub(before - self.entries.len(), Ordering::Relaxed);
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.idle.fetch_sub(self.entries.len(), Ordering::Relaxed);
    }
}

/// A thread's idle connections, and whether its sweep runs.
#[derive(Default)]
struct Thread {
    /// By connector and peer key. The keys are a counter and a hash: hashing them again, as
    /// the default hasher does, bought nothing.
    groups: HashMap<(u64, u64), Group, BuildHasherDefault<KeyHasher>>,
    sweeping: bool,
}

impl Thread {
    /// The group holding `owner`'s oldest idle connection on this thread.
    fn oldest_of(&mut self, owner: u64) -> Option<&mut Group> {
        self.groups
            .iter_mut()
            .filter(|((o, _), _)| *o == owner)
            .filter_map(|(_, group)| Some((group.entries.front()?.since, group)))
            .min_by_key(|(since, _)| *since)
            .map(|(_, group)| group)
    }
}

thread_local! {
    static THREAD: RefCell<Thread> = RefCell::default();
}

/// Which thread's map this is: its address, the same for a thread as long as it lives.
fn thread_tag(cell: &RefCell<Thread>) -> usize {
    cell as *const RefCell<Thread> as usize
}

/// Mixes a connector's number and a peer's key (itself a hash) into a map's hash.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.write_u64(u64::from(*byte));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(29) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Resets its thread's `sweeping` when the runtime drops the sweep task, so that the next
/// release starts another.
struct Sweeping {
    /// The thread's [`thread_tag`].
    thread: usize,
    ended: bool,
}

impl Drop for Sweeping {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let _ = THREAD.try_with(|cell| {
            // A runtime dropped from another thread drops its tasks there: that thread's flag
            // is not this sweep's.
            if thread_tag(cell) == self.thread {
                cell.borrow_mut().sweeping = false;
            }
        });
    }
}

/// Sweeps its thread's idle connections every interval (the shortest of its groups') until
/// the thread has none.
async fn sweep(mut sweeping: Sweeping) {
    loop {
        let interval = THREAD.try_with(|thread| {
            let mut thread = thread.borrow_mut();
            thread.groups.retain(|_, group| !group.entries.is_empty());
            let interval = thread.groups.values().map(|g| g.interval).min();
            if interval.is_none() {
                // In the borrow that `put` takes, so a release now starts a new sweep.
                thread.sweeping = false;
            }
            interval
        });
        let Ok(Some(interval)) = interval else {
            sweeping.ended = true;
            return;
        };
        pingora_timeout::sleep(interval).await;
        let now = Instant::now();
        let mut closing = Vec::new();
        let _ = THREAD.try_with(|thread| {
            for group in thread.borrow_mut().groups.values_mut() {
                group.sweep(now, &mut closing);
            }
        });
        // Closed outside the borrow: closing deregisters sockets.
        drop(closing);
    }
}

/// Idle connections on this thread, of all connectors, for the connector tests.
#[cfg(all(test, feature = "any_tls"))]
pub(super) fn idle_on_this_thread() -> usize {
    THREAD.with(|thread| {
        let thread = thread.borrow();
        thread.groups.values().map(|g| g.entries.len()).sum()
    })
}

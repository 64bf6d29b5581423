// Copyright 2026 Cloudflare, Inc.
//
// Licensed under the Apache License, Version 2.0 (the "License");
// you may not use this file except in compliance with the License.
// You may obtain a copy of the License at
//
//     http://www.apache.org/licenses/LICENSE-2.0
//
// Unless required by applicable law or agreed to in writing, software
// distributed under the License is distributed on an "AS IS" BASIS,
// WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
// See the License for the specific language governing permissions and
// limitations under the License.

//! ficus patch: the bounded queues of [`HttpTask`]s by which the two halves of an HTTP/1
//! proxy exchange (`proxy_1to1`) hand each other request body and response pieces, and the
//! join that polls both halves.
//!
//! Both halves run joined in the frame that owns the pipes, so a pipe needs neither a heap
//! block nor reference counts: a `tokio::sync::mpsc` channel per direction cost two
//! allocations and some 1,000 instructions per request. A pipe keeps the part of `mpsc`'s
//! behaviour that the halves rely on: first in, first out, at most [`TASK_BUFFER_SIZE`]
//! tasks queued or reserved, a sender waits for room, dropping the receiver makes sends fail
//! (which tells the upstream half that the downstream one is finished), and dropping the
//! sender ends the receiver's stream once it is drained. Waiting is cancel-safe: a `recv` or
//! `reserve` future dropped before it is ready takes nothing from the pipe.
//!
//! Nor does a pipe wake anyone. Its ends are used only by the halves, which only
//! [`join_halves`] polls: when one half changes a pipe the other is waiting on, the join
//! polls the halves again before it returns. With `mpsc` that change woke the task itself,
//! and the scheduler polled the connection's whole future once more, usually to find the
//! task already taken in the same turn (a third poll per request where two do).
//!
//! A pipe and its ends must therefore not be used outside the halves given to
//! [`join_halves`] with it: a wait there would never end.

use std::cell::UnsafeCell;
use std::fmt;
use std::future::{poll_fn, Future};
use std::mem::ManuallyDrop;
use std::pin::Pin;
use std::task::{Context, Poll};

use pingora_core::protocols::http::HttpTask;
use pingora_error::Result;

use crate::TASK_BUFFER_SIZE;

pub(crate) struct TaskPipe {
    // Neither a lock nor atomics: both ends are only ever reached by one thread at a time (see
    // the `Sync` impl), where an uncontended lock still cost two atomic operations per step,
    // some 30 per request.
    state: UnsafeCell<State>,
}

// SAFETY: a pipe is reached only through its two ends (crate-private, made once by `split`)
// and through `join_halves`, which reads `changed`. The ends are held by the two halves that
// `join_halves` polls, and a half runs (is polled or dropped) only while the joined future,
// or the frame that owns the halves and the pipe, is polled or dropped: each takes `&mut`
// to do so, so at most one thread runs code that reaches a pipe at any time, and
// `TaskPipe::with` lends its state to one step at a time. `State` is `Send`, so the pipe may
// move between threads with the future that owns it.
unsafe impl Sync for TaskPipe {}

struct State {
    /// A ring: `queued` tasks from `head` on.
    slots: [Option<HttpTask>; TASK_BUFFER_SIZE],
    head: usize,
    queued: usize,
    /// Room promised to a [`Permit`] not yet used.
    reserved: usize,
    sender_gone: bool,
    receiver_gone: bool,
    /// The receiver waits for a task.
    receiver_waiting: bool,
    /// The sender waits for room.
    sender_waiting: bool,
    split: bool,
    /// The end that was waiting can go on: set by the half that changed the pipe, read by
    /// the join after it polled that half.
    changed: bool,
}

/// The pipe's receiver is gone: nothing sent now would be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TryReserveError {
    Full,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TryRecvError {
    Empty,
    /// The sender is gone and every task it sent was received.
    Disconnected,
}

/// The most times [`join_halves`] polls the halves in one turn of its task before it yields
/// (and asks to be polled again), so that two halves streaming to each other cannot keep the
/// thread from other tasks.
const JOINED_ROUNDS: usize = 16;

/// `tokio::try_join!(downstream, upstream)` for two halves that exchange tasks only through
/// `pipes`: polls each half in turn until both are done or one fails, and polls them again
/// at once when a pipe changed for a half waiting on it.
///
/// Like `try_join!`, it starts each turn with the other half. What wakes the task is mostly
/// the socket of the half that goes first by turns, which then produces what the other takes
/// in the same round: the request's end on the first turn, the response on the second.
///
/// The halves are pinned by the caller, where they were made: a proxy half's future is
/// kilobytes, and each move copies it.
pub(crate) fn join_halves<'a, D, U, T, V>(
    mut downstream: Pin<&'a mut D>,
    mut upstream: Pin<&'a mut U>,
    pipes: [&'a TaskPipe; 2],
) -> impl Future<Output = Result<(T, V)>> + 'a
where
    D: Future<Output = Result<T>>,
    U: Future<Output = Result<V>>,
    T: 'a,
    V: 'a,
{
    let (mut downstream_done, mut upstream_done) = (None, None);
    let mut upstream_first = true;
    poll_fn(move |cx| {
        upstream_first = !upstream_first;
        for _ in 0..JOINED_ROUNDS {
            if upstream_first {
                poll_half(upstream.as_mut(), &mut upstream_done, cx)?;
                poll_half(downstream.as_mut(), &mut downstream_done, cx)?;
            } else {
                poll_half(downstream.as_mut(), &mut downstream_done, cx)?;
                poll_half(upstream.as_mut(), &mut upstream_done, cx)?;
            }
            if let (Some(_), Some(_)) = (&downstream_done, &upstream_done) {
                if let (Some(d), Some(u)) = (downstream_done.take(), upstream_done.take()) {
                    return Poll::Ready(Ok((d, u)));
                }
            }
            // `|`, not `||`: both flags are cleared.
            if !(pipes[0].take_change() | pipes[1].take_change()) {
                // Each half waits on something outside the pipes, which wakes this task.
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
}

/// Polls `half` unless it is `done`, keeping its output; fails with its error.
fn poll_half<F, T>(half: Pin<&mut F>, done: &mut Option<T>, cx: &mut Context<'_>) -> Result<()>
where
    F: Future<Output = Result<T>>,
{
    if done.is_none() {
        if let Poll::Ready(output) = half.poll(cx) {
            *done = Some(output?);
        }
    }
    Ok(())
}

impl TaskPipe {
    pub(crate) fn new() -> Self {
        TaskPipe {
            state: UnsafeCell::new(State {
                slots: Default::default(),
                head: 0,
                queued: 0,
                reserved: 0,
                sender_gone: false,
                receiver_gone: false,
                receiver_waiting: false,
                sender_waiting: false,
                split: false,
                changed: false,
            }),
        }
    }

    /// The pipe's sender and receiver, to be taken once: a pipe has one of each.
    pub(crate) fn split(&self) -> (Sender<'_>, Receiver<'_>) {
        let split_before = self.with(|state| std::mem::replace(&mut state.split, true));
        debug_assert!(!split_before, "split twice");
        (Sender { pipe: self }, Receiver { pipe: self })
    }

    /// Runs one step `f` on the pipe's state. `f` is code of this module that neither reaches
    /// the pipe again nor drops a task (whose drop could run code of any kind).
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        // SAFETY: one thread at a time reaches the pipe (see the `Sync` impl), and within it
        // the steps do not nest, so this is the only reference to the state while `f` runs.
        f(unsafe { &mut *self.state.get() })
    }

    /// Whether a waiting end can go on since the last call.
    fn take_change(&self) -> bool {
        self.with(|state| std::mem::take(&mut state.changed))
    }
}

impl State {
    /// Tells the join that the receiver, if it was waiting, can go on.
    fn receiver_can_go_on(&mut self) {
        if std::mem::take(&mut self.receiver_waiting) {
            self.changed = true;
        }
    }

    /// Tells the join that the sender, if it was waiting, can go on.
    fn sender_can_go_on(&mut self) {
        if std::mem::take(&mut self.sender_waiting) {
            self.changed = true;
        }
    }

    fn has_room(&self) -> bool {
        self.queued + self.reserved < TASK_BUFFER_SIZE
    }

    fn push(&mut self, task: HttpTask) {
        let tail = (self.head + self.queued) % TASK_BUFFER_SIZE;
        self.slots[tail] = Some(task);
        self.queued += 1;
    }

    fn pop(&mut self) -> Option<HttpTask> {
        if self.queued == 0 {
            return None;
        }
        let task = self.slots[self.head].take();
        self.head = (self.head + 1) % TASK_BUFFER_SIZE;
        self.queued -= 1;
        task
    }
}

pub(crate) struct Sender<'p> {
    pipe: &'p TaskPipe,
}

impl Sender<'_> {
    /// Queues `task` once there is room; fails if the receiver is gone.
    pub(crate) async fn send(&self, task: HttpTask) -> Result<(), Closed> {
        let mut task = Some(task);
        poll_fn(|_| {
            self.pipe.with(|state| {
                if state.receiver_gone {
                    return Poll::Ready(Err(Closed));
                }
                if !state.has_room() {
                    state.sender_waiting = true;
                    return Poll::Pending;
                }
                if let Some(task) = task.take() {
                    state.push(task);
                }
                state.receiver_can_go_on();
                Poll::Ready(Ok(()))
            })
        })
        .await
    }

    /// Room for one task, once there is some; fails if the receiver is gone.
    pub(crate) async fn reserve(&self) -> Result<Permit<'_>, Closed> {
        poll_fn(|_| match self.try_reserve() {
            Ok(permit) => Poll::Ready(Ok(permit)),
            Err(TryReserveError::Closed) => Poll::Ready(Err(Closed)),
            Err(TryReserveError::Full) => {
                self.pipe.with(|state| state.sender_waiting = true);
                Poll::Pending
            }
        })
        .await
    }

    pub(crate) fn try_reserve(&self) -> Result<Permit<'_>, TryReserveError> {
        self.pipe.with(|state| {
            if state.receiver_gone {
                return Err(TryReserveError::Closed);
            }
            if !state.has_room() {
                return Err(TryReserveError::Full);
            }
            state.reserved += 1;
            Ok(())
        })?;
        Ok(Permit { pipe: self.pipe })
    }

    /// Whether the receiver is gone.
    pub(crate) fn is_closed(&self) -> bool {
        self.pipe.with(|state| state.receiver_gone)
    }
}

impl Drop for Sender<'_> {
    fn drop(&mut self) {
        self.pipe.with(|state| {
            state.sender_gone = true;
            state.receiver_can_go_on();
        });
    }
}

/// Room for one task in the pipe, given back if the permit is dropped unused.
pub(crate) struct Permit<'a> {
    pipe: &'a TaskPipe,
}

impl Permit<'_> {
    /// Queues `task` in the room reserved; it is dropped if the receiver is gone.
    pub(crate) fn send(self, task: HttpTask) {
        let permit = ManuallyDrop::new(self);
        let unread = permit.pipe.with(|state| {
            state.reserved -= 1;
            if state.receiver_gone {
                return Some(task);
            }
            state.push(task);
            state.receiver_can_go_on();
            None
        });
        drop(unread);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.pipe.with(|state| {
            state.reserved -= 1;
            state.sender_can_go_on();
        });
    }
}

impl fmt::Debug for Permit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Permit")
    }
}

pub(crate) struct Receiver<'p> {
    pipe: &'p TaskPipe,
}

impl Receiver<'_> {
    /// The next task, or `None` once the sender is gone and every task was received.
    pub(crate) async fn recv(&mut self) -> Option<HttpTask> {
        poll_fn(|_| match self.take(true) {
            Ok(task) => Poll::Ready(Some(task)),
            Err(TryRecvError::Disconnected) => Poll::Ready(None),
            Err(TryRecvError::Empty) => Poll::Pending,
        })
        .await
    }

    pub(crate) fn try_recv(&mut self) -> Result<HttpTask, TryRecvError> {
        self.take(false)
    }

    /// The next task; if there is none yet and `wait`, the receiver waits for one.
    fn take(&self, wait: bool) -> Result<HttpTask, TryRecvError> {
        self.pipe.with(|state| match state.pop() {
            Some(task) => {
                state.sender_can_go_on();
                Ok(task)
            }
            None if state.sender_gone => Err(TryRecvError::Disconnected),
            None => {
                state.receiver_waiting |= wait;
                Err(TryRecvError::Empty)
            }
        })
    }
}

impl Drop for Receiver<'_> {
    fn drop(&mut self) {
        // Dropped outside the step: a task holds headers and bodies of any size.
        let unread = self.pipe.with(|state| {
            state.receiver_gone = true;
            let mut unread = Vec::new();
            while let Some(task) = state.pop() {
                unread.push(task);
            }
            state.sender_can_go_on();
            unread
        });
        drop(unread);
    }
}

impl fmt::Display for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the task pipe's receiver is gone")
    }
}

impl std::error::Error for Closed {}

impl fmt::Display for TryReserveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TryReserveError::Full => f.write_str("the task pipe is full"),
            TryReserveError::Closed => Closed.fmt(f),
        }
    }
}

impl std::error::Error for TryReserveError {}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures::task::{waker, ArcWake};
    use futures::FutureExt;
    use pingora_error::{Error, ErrorType::InternalError};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::pin::pin;
    use std::sync::Arc;

    fn body(n: u8) -> HttpTask {
        HttpTask::Body(Some(Bytes::from(vec![n])), false)
    }

    fn number(task: HttpTask) -> u8 {
        match task {
            HttpTask::Body(Some(b), _) => b[0],
            other => panic!("not a numbered body: {}", other.type_str()),
        }
    }

    /// Polls `future` once with a waker that counts its wake-ups.
    fn poll_once<F: Future>(future: F) -> (Poll<F::Output>, usize) {
        struct Count(AtomicUsize);
        impl ArcWake for Count {
            fn wake_by_ref(count: &Arc<Self>) {
                count.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = waker(count.clone());
        let polled = pin!(future).poll(&mut Context::from_waker(&waker));
        (polled, count.0.load(Ordering::Relaxed))
    }

    #[test]
    fn tasks_come_out_in_order_across_the_ring_boundary() {
        let pipe = TaskPipe::new();
        let (tx, mut rx) = pipe.split();
        for round in 0..3u8 {
            for i in 0..TASK_BUFFER_SIZE as u8 {
                tx.send(body(round * 10 + i)).now_or_never().unwrap().unwrap();
            }
            for i in 0..TASK_BUFFER_SIZE as u8 {
                assert_eq!(number(rx.try_recv().unwrap()), round * 10 + i);
            }
            assert_eq!(rx.try_recv().err(), Some(TryRecvError::Empty));
            // Shift the ring's start so the next round wraps around.
            tx.send(body(99)).now_or_never().unwrap().unwrap();
            assert_eq!(number(rx.try_recv().unwrap()), 99);
        }
    }

    #[test]
    fn halves_stream_through_a_full_pipe_without_a_wake_up() {
        let pipe = TaskPipe::new();
        let unused = TaskPipe::new();
        let (tx, mut rx) = pipe.split();
        let sending = async move {
            for i in 0..100u8 {
                tx.send(body(i)).await.map_err(|_| Error::new(InternalError))?;
            }
            Ok(())
        };
        let receiving = async move {
            let mut got = vec![];
            while let Some(task) = rx.recv().await {
                got.push(number(task));
            }
            Ok(got)
        };
        let joined = async {
            let (got, ()) = join_halves(pin!(receiving), pin!(sending), [&pipe, &unused]).await?;
            Ok::<_, Box<Error>>(got)
        };
        // 100 tasks through 4 slots take 25 rounds: the join yields once, asking to go on.
        let mut joined = pin!(joined);
        let (first, wakes) = poll_once(joined.as_mut());
        assert!(first.is_pending());
        assert_eq!(wakes, 1, "a join that gives up its turn must ask to be polled again");
        let (second, wakes) = poll_once(joined.as_mut());
        let Poll::Ready(Ok(got)) = second else { panic!("not done in the second turn") };
        assert_eq!(got, (0..100).collect::<Vec<u8>>(), "every task, in order");
        assert_eq!(wakes, 0);
    }

    #[test]
    fn permits_count_as_room_until_used_or_dropped() {
        let pipe = TaskPipe::new();
        let (tx, mut rx) = pipe.split();
        let permits: Vec<_> = (0..TASK_BUFFER_SIZE).map(|_| tx.try_reserve().unwrap()).collect();
        assert_eq!(tx.try_reserve().err(), Some(TryReserveError::Full));
        assert!(tx.reserve().now_or_never().is_none());
        let mut permits = permits.into_iter();
        permits.next().unwrap().send(body(7));
        drop(permits);
        assert_eq!(number(rx.try_recv().unwrap()), 7);
        assert_eq!(rx.try_recv().err(), Some(TryRecvError::Empty));
        assert!(tx.try_reserve().is_ok(), "unused permits give their room back");
    }

    #[test]
    fn a_half_that_drops_its_receiver_fails_the_other_halfs_waiting_send() {
        let pipe = TaskPipe::new();
        let unused = TaskPipe::new();
        let (tx, rx) = pipe.split();
        for i in 0..TASK_BUFFER_SIZE as u8 {
            tx.send(body(i)).now_or_never().unwrap().unwrap();
        }
        // The sender is polled first and waits for room; the receiver half then finishes.
        let sending = async { Ok(tx.send(body(9)).await) };
        let finishing = async move {
            drop(rx);
            Ok(())
        };
        let (polled, _) = poll_once(join_halves(pin!(sending), pin!(finishing), [&pipe, &unused]));
        let Poll::Ready(Ok((sent, ()))) = polled else { panic!("the waiting send was not failed") };
        assert_eq!(sent, Err(Closed));
        assert!(tx.is_closed());
        assert_eq!(tx.try_reserve().err(), Some(TryReserveError::Closed));
        assert_eq!(tx.reserve().now_or_never().map(|r| r.err()), Some(Some(Closed)));
    }

    #[test]
    fn the_receiver_drains_what_was_sent_before_the_sender_went() {
        let pipe = TaskPipe::new();
        let unused = TaskPipe::new();
        let (tx, mut rx) = pipe.split();
        let receiving = async {
            let first = rx.recv().await.map(number);
            let second = rx.recv().await.map(number);
            let end = rx.recv().await.map(number);
            Ok((first, second, end, rx.try_recv().err()))
        };
        let sending = async move {
            tx.send(body(1)).await.map_err(|_| Error::new(InternalError))?;
            tx.try_reserve().map_err(|_| Error::new(InternalError))?.send(body(2));
            Ok(())
        };
        let (polled, wakes) = poll_once(join_halves(pin!(receiving), pin!(sending), [&pipe, &unused]));
        let Poll::Ready(Ok((got, ()))) = polled else { panic!("not done in one turn") };
        assert_eq!(got, (Some(1), Some(2), None, Some(TryRecvError::Disconnected)));
        assert_eq!(wakes, 0);
    }

    #[test]
    fn a_failing_half_ends_the_join_with_its_error() {
        let pipe = TaskPipe::new();
        let unused = TaskPipe::new();
        let (tx, mut rx) = pipe.split();
        let waiting = async move { Ok(rx.recv().await.is_some()) };
        let failing = async move {
            let _tx = tx;
            Err::<(), _>(Error::explain(InternalError, "upstream failed"))
        };
        let (polled, _) = poll_once(join_halves(pin!(waiting), pin!(failing), [&pipe, &unused]));
        let Poll::Ready(Err(e)) = polled else { panic!("the error did not end the join") };
        assert_eq!(e.etype, InternalError);
    }

    #[test]
    fn a_receive_cancelled_before_it_is_ready_takes_nothing() {
        let pipe = TaskPipe::new();
        let (tx, mut rx) = pipe.split();
        assert!(rx.recv().now_or_never().is_none());
        tx.send(body(5)).now_or_never().unwrap().unwrap();
        assert_eq!(number(rx.recv().now_or_never().unwrap().unwrap()), 5);
    }
}

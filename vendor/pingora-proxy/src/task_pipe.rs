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

//! ficus patch: the bounded queue of [`HttpTask`]s by which the two halves of an HTTP/1 proxy
//! exchange (`proxy_1to1`) hand each other request body and response pieces.
//!
//! Both halves run joined in the frame that owns the pipe, so it needs neither a heap block
//! nor reference counts: a `tokio::sync::mpsc` channel per direction cost two allocations and
//! some 1,400 instructions per request. It keeps the part of `mpsc`'s behaviour that the
//! halves rely on: first in, first out, at most [`TASK_BUFFER_SIZE`] tasks queued or
//! reserved, a sender waits for room, dropping the receiver makes sends fail (which tells the
//! upstream half that the downstream one is finished), and dropping the sender ends the
//! receiver's stream once it is drained. Waiting is cancel-safe: a `recv` or `reserve` future
//! dropped before it is ready takes nothing from the pipe.
//!
//! There is one sender and one receiver ([`TaskPipe::split`]), so one waker slot each.

use std::fmt;
use std::future::poll_fn;
use std::mem::ManuallyDrop;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use pingora_core::protocols::http::HttpTask;

use crate::TASK_BUFFER_SIZE;

pub(crate) struct TaskPipe {
    // A lock rather than atomics: never contended (both ends are polled by one task), it makes
    // each step one short critical section that reads as plain code.
    state: Mutex<State>,
}

struct State {
    /// A ring: `queued` tasks from `head` on.
    slots: [Option<HttpTask>; TASK_BUFFER_SIZE],
    head: usize,
    queued: usize,
    /// Room promised to a [`Permit`] not yet used.
    reserved: usize,
    sender_gone: bool,
    receiver_gone: bool,
    /// The receiver waiting for a task.
    receiver_waker: Option<Waker>,
    /// The sender waiting for room.
    sender_waker: Option<Waker>,
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

impl TaskPipe {
    pub(crate) fn new() -> Self {
        TaskPipe {
            state: Mutex::new(State {
                slots: Default::default(),
                head: 0,
                queued: 0,
                reserved: 0,
                sender_gone: false,
                receiver_gone: false,
                receiver_waker: None,
                sender_waker: None,
            }),
        }
    }

    /// The pipe's only sender and receiver.
    pub(crate) fn split(&mut self) -> (Sender<'_>, Receiver<'_>) {
        let pipe = &*self;
        (Sender { pipe }, Receiver { pipe })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code that can panic runs under the lock; a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn has_room(&self) -> bool {
        self.queued + self.reserved < TASK_BUFFER_SIZE
    }

    /// Queues `task` and returns the receiver to wake.
    fn push(&mut self, task: HttpTask) -> Option<Waker> {
        let tail = (self.head + self.queued) % TASK_BUFFER_SIZE;
        self.slots[tail] = Some(task);
        self.queued += 1;
        self.receiver_waker.take()
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

/// Keeps the waker to call when the pipe changes, cloning only a new one.
fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(waker) if waker.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

fn wake(waker: Option<Waker>) {
    if let Some(waker) = waker {
        waker.wake();
    }
}

pub(crate) struct Sender<'p> {
    pipe: &'p TaskPipe,
}

impl<'p> Sender<'p> {
    /// Queues `task` once there is room; fails if the receiver is gone.
    pub(crate) async fn send(&self, task: HttpTask) -> Result<(), Closed> {
        let mut task = Some(task);
        poll_fn(|cx| {
            let mut state = self.pipe.lock();
            if state.receiver_gone {
                return Poll::Ready(Err(Closed));
            }
            if !state.has_room() {
                register(&mut state.sender_waker, cx);
                return Poll::Pending;
            }
            let waker = task.take().and_then(|task| state.push(task));
            drop(state);
            wake(waker);
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Room for one task, once there is some; fails if the receiver is gone.
    pub(crate) async fn reserve(&self) -> Result<Permit<'_>, Closed> {
        poll_fn(|cx| {
            let mut state = self.pipe.lock();
            if state.receiver_gone {
                return Poll::Ready(Err(Closed));
            }
            if !state.has_room() {
                register(&mut state.sender_waker, cx);
                return Poll::Pending;
            }
            state.reserved += 1;
            Poll::Ready(Ok(Permit { pipe: self.pipe }))
        })
        .await
    }

    pub(crate) fn try_reserve(&self) -> Result<Permit<'_>, TryReserveError> {
        let mut state = self.pipe.lock();
        if state.receiver_gone {
            return Err(TryReserveError::Closed);
        }
        if !state.has_room() {
            return Err(TryReserveError::Full);
        }
        state.reserved += 1;
        Ok(Permit { pipe: self.pipe })
    }

    /// Whether the receiver is gone.
    pub(crate) fn is_closed(&self) -> bool {
        self.pipe.lock().receiver_gone
    }
}

impl Drop for Sender<'_> {
    fn drop(&mut self) {
        let mut state = self.pipe.lock();
        state.sender_gone = true;
        let waker = state.receiver_waker.take();
        drop(state);
        wake(waker);
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
        let mut state = permit.pipe.lock();
        state.reserved -= 1;
        if state.receiver_gone {
            drop(state);
            drop(task);
            return;
        }
        let waker = state.push(task);
        drop(state);
        wake(waker);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut state = self.pipe.lock();
        state.reserved -= 1;
        let waker = state.sender_waker.take();
        drop(state);
        wake(waker);
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
        poll_fn(|cx| match self.take(Some(cx)) {
            Ok(task) => Poll::Ready(Some(task)),
            Err(TryRecvError::Disconnected) => Poll::Ready(None),
            Err(TryRecvError::Empty) => Poll::Pending,
        })
        .await
    }

    pub(crate) fn try_recv(&mut self) -> Result<HttpTask, TryRecvError> {
        self.take(None)
    }

    /// The next task; if there is none yet, `cx`'s task is woken when there is.
    fn take(&self, cx: Option<&Context<'_>>) -> Result<HttpTask, TryRecvError> {
        let mut state = self.pipe.lock();
        match state.pop() {
            Some(task) => {
                let waker = state.sender_waker.take();
                drop(state);
                wake(waker);
                Ok(task)
            }
            None if state.sender_gone => Err(TryRecvError::Disconnected),
            None => {
                if let Some(cx) = cx {
                    register(&mut state.receiver_waker, cx);
                }
                Err(TryRecvError::Empty)
            }
        }
    }
}

impl Drop for Receiver<'_> {
    fn drop(&mut self) {
        let mut state = self.pipe.lock();
        state.receiver_gone = true;
        // Dropped outside the lock: a task holds headers and bodies of any size.
        let mut unread = Vec::new();
        while let Some(task) = state.pop() {
            unread.push(task);
        }
        let waker = state.sender_waker.take();
        drop(state);
        drop(unread);
        wake(waker);
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
    use futures::FutureExt;

    fn body(n: u8) -> HttpTask {
        HttpTask::Body(Some(Bytes::from(vec![n])), false)
    }

    fn number(task: HttpTask) -> u8 {
        match task {
            HttpTask::Body(Some(b), _) => b[0],
            other => panic!("not a numbered body: {}", other.type_str()),
        }
    }

    #[test]
    fn tasks_come_out_in_order_across_the_ring_boundary() {
        let mut pipe = TaskPipe::new();
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

    #[tokio::test]
    async fn a_full_pipe_holds_the_sender_until_the_receiver_takes_one() {
        let mut pipe = TaskPipe::new();
        let (tx, mut rx) = pipe.split();
        for i in 0..TASK_BUFFER_SIZE as u8 {
            tx.send(body(i)).await.unwrap();
        }
        assert_eq!(tx.try_reserve().err(), Some(TryReserveError::Full));
        assert!(tx.send(body(9)).now_or_never().is_none(), "sent past capacity");

        let sending = async {
            tx.send(body(4)).await.unwrap();
            drop(tx);
        };
        let receiving = async {
            let mut got = vec![];
            while let Some(task) = rx.recv().await {
                got.push(number(task));
            }
            got
        };
        let ((), got) = tokio::join!(sending, receiving);
        assert_eq!(got, vec![0, 1, 2, 3, 4], "the task sent while full must not be lost");
    }

    #[test]
    fn permits_count_as_room_until_used_or_dropped() {
        let mut pipe = TaskPipe::new();
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

    #[tokio::test]
    async fn dropping_the_receiver_fails_a_waiting_sender() {
        let mut pipe = TaskPipe::new();
        let (tx, rx) = pipe.split();
        for i in 0..TASK_BUFFER_SIZE as u8 {
            tx.send(body(i)).await.unwrap();
        }
        let sending = tx.send(body(9));
        let receiver_gone = async move {
            tokio::task::yield_now().await;
            drop(rx);
        };
        let (sent, ()) = tokio::join!(sending, receiver_gone);
        assert_eq!(sent, Err(Closed));
        assert!(tx.is_closed());
        assert_eq!(tx.try_reserve().err(), Some(TryReserveError::Closed));
        assert_eq!(tx.reserve().await.err(), Some(Closed));
    }

    #[tokio::test]
    async fn the_receiver_drains_what_was_sent_before_the_sender_went() {
        let mut pipe = TaskPipe::new();
        let (tx, mut rx) = pipe.split();
        let waiting = rx.recv();
        let sending = async move {
            tokio::task::yield_now().await;
            tx.send(body(1)).await.unwrap();
            tx.try_reserve().unwrap().send(body(2));
        };
        let (first, ()) = tokio::join!(waiting, sending);
        assert_eq!(number(first.unwrap()), 1);
        assert_eq!(number(rx.recv().await.unwrap()), 2);
        assert!(rx.recv().await.is_none());
        assert_eq!(rx.try_recv().err(), Some(TryRecvError::Disconnected));
    }

    #[test]
    fn a_receive_cancelled_before_it_is_ready_takes_nothing() {
        let mut pipe = TaskPipe::new();
        let (tx, mut rx) = pipe.split();
        assert!(rx.recv().now_or_never().is_none());
        tx.send(body(5)).now_or_never().unwrap().unwrap();
        assert_eq!(number(rx.recv().now_or_never().unwrap().unwrap()), 5);
    }
}

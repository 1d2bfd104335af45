//! Statements sent to the target without waiting for their results: the next one goes out
//! behind them in the same round trip (PostgreSQL's pipelining, which tokio-postgres does for
//! requests issued before earlier ones are answered).
//!
//! A group of single-row transactions costs one round trip — `BEGIN`, its statements, the
//! position and `COMMIT` go out together and their results are read together — where waiting
//! for each took three (bench P4: the applier spent most of a group's time in those waits).
//!
//! What it keeps: requests reach the server in the order they are sent ([`Pipeline::send`]
//! returns once the request is queued on the connection), the server runs them in that order,
//! and [`Pipeline::settle`] reports the first failure — a statement after a failed one fails
//! too (the transaction is aborted), and that later error would hide the cause.

use crate::ApplyError;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use tokio::task::JoinHandle;

type Request = Pin<Box<dyn Future<Output = Result<(), ApplyError>> + Send>>;

/// Requests sent to one target connection whose results are not read yet, oldest first.
#[derive(Default)]
pub(crate) struct Pipeline {
    sent: VecDeque<JoinHandle<Result<(), ApplyError>>>,
    /// Requests ever sent; those before the ones still in `sent` were read (or let go).
    sent_total: u64,
}

impl Pipeline {
    /// Sends `request` (a tokio-postgres call on an owned client handle) and returns without
    /// waiting for its result. Its first poll queues the request on the connection — a call's
    /// future does that before its first wait — so requests go out in `send` order; the rest
    /// (reading the result) runs on a task of its own, so a result nobody reads yet never
    /// holds up the connection's delivery of later ones.
    pub async fn send(&mut self, request: impl Future<Output = Result<(), ApplyError>> + Send + 'static) {
        let mut request: Request = Box::pin(request);
        let first = std::future::poll_fn(|cx| Poll::Ready(request.as_mut().poll(cx))).await;
        self.sent.push_back(match first {
            Poll::Ready(done) => tokio::spawn(std::future::ready(done)),
            Poll::Pending => tokio::spawn(request),
        });
        self.sent_total += 1;
    }

    /// Where the pipeline is now: [`Pipeline::settle_through`] this mark reads the results of
    /// every request sent so far, and of none sent later.
    pub fn mark(&self) -> u64 {
        self.sent_total
    }

    /// Waits for the requests sent before `mark`; the first failure, if any.
    pub async fn settle_through(&mut self, mark: u64) -> Result<(), ApplyError> {
        let mut first = None;
        while self.sent_total - (self.sent.len() as u64) < mark {
            let Some(sent) = self.sent.pop_front() else { break };
            let result = sent.await.unwrap_or_else(|e| Err(ApplyError::Pipelined(e)));
            if let Err(e) = result {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Waits for every sent request; the first failure, if any (later ones follow from it).
    pub async fn settle(&mut self) -> Result<(), ApplyError> {
        self.settle_through(self.sent_total).await
    }

    /// `e` (from a request made directly, after those sent here), unless a sent one failed
    /// first: then that one, the cause.
    pub async fn first_error(&mut self, e: ApplyError) -> ApplyError {
        match self.settle().await {
            Err(earlier) => earlier,
            Ok(()) => e,
        }
    }

    /// Forgets the sent requests (a rollback follows; their results no longer matter).
    pub fn clear(&mut self) {
        self.sent.clear();
    }
}

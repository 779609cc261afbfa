//! Watches: a stream of the changes to a key or range, resumed on another
//! endpoint from the last revision seen when its node goes away, so the
//! caller sees every change once, in revision order, with no gap.
//!
//! Each watch is a task. It opens the watch on the current endpoint (any
//! node serves one from its own state), hands what arrives to the
//! [`Watcher`], and remembers how far it got: every response says up to which
//! revision everything was sent. When the connection breaks, or the node goes
//! silent for longer than two progress intervals, it opens the watch again
//! elsewhere from the next revision. The responses of one watch queue up to
//! [`BUFFER`] on the connection; past that the connection drops the stream
//! (rather than stall the other requests on it) and the task opens it again
//! from where the caller is, reading the rest from the node's history.

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::{Client, ConnectFailure};
use crate::error::{is_callers_fault, is_retryable, Error};
use crate::proto::{
    request, response, ErrorCode, KeyRange, Request, WatchCancelRequest, WatchEvent, WatchRequest, WatchResponse,
};

/// Responses of one watch queued on its connection before the stream is
/// dropped and opened again.
pub(super) const BUFFER: usize = 64;

/// What to watch.
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    /// One key, or (when `range` is set instead) every key in a range.
    pub key: Vec<u8>,
    /// Every key in this range.
    pub range: Option<KeyRange>,
    /// From this revision on (0: from the next change).
    pub start_revision: u64,
    /// Each event carries the key's previous record too.
    pub prev_kv: bool,
    /// How often an idle watch hears that it is current (None: 10 s).
    pub progress_interval: Option<Duration>,
}

/// What a watch delivers.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchUpdate {
    /// Changes, in revision order; everything up to `revision` has been seen.
    Events {
        /// The changes.
        events: Vec<WatchEvent>,
        /// The watch is current up to this revision.
        revision: u64,
    },
    /// No change since the last update: the watch is current up to `revision`.
    Progress {
        /// The watch is current up to this revision.
        revision: u64,
    },
}

/// A running watch: [`Watcher::next`] gives each update. Dropping it cancels
/// the watch.
pub struct Watcher {
    updates: mpsc::Receiver<Result<WatchUpdate, Error>>,
    /// The revision the watch started from (its first event's at the earliest).
    start_revision: u64,
}

impl Watcher {
    /// The next update; `None` once the watch has ended (after an error).
    pub async fn next(&mut self) -> Option<Result<WatchUpdate, Error>> {
        self.updates.recv().await
    }

    /// The first revision the watch reports.
    pub fn start_revision(&self) -> u64 {
        self.start_revision
    }
}

impl Client {
    /// Starts watching; returns once a node has registered the watch (or
    /// refused it: a bad range, a compacted start revision).
    pub async fn watch(&self, options: WatchOptions) -> Result<Watcher, Error> {
        let request = WatchRequest {
            key: options.key,
            range: options.range,
            start_revision: options.start_revision,
            prev_kv: options.prev_kv,
            progress_interval_ms: options.progress_interval.map_or(0, |d| d.as_millis().max(1) as u64),
        };
        let (updates_tx, updates) = mpsc::channel(BUFFER);
        let (created_tx, created) = oneshot::channel();
        let task = WatchTask {
            client: self.clone(),
            request,
            updates: updates_tx,
            created: Some(created_tx),
            compacted: 0,
            answered: false,
        };
        tokio::spawn(task.run());
        match created.await {
            Ok(Ok(start_revision)) => Ok(Watcher {
                updates,
                start_revision,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Protocol("the watch ended before it started".into())),
        }
    }
}

struct WatchTask {
    client: Client,
    /// Its start revision is where to resume: the one after the last seen.
    request: WatchRequest,
    updates: mpsc::Sender<Result<WatchUpdate, Error>>,
    /// Told once the first node registered the watch (with its start).
    created: Option<oneshot::Sender<Result<u64, Error>>>,
    /// Nodes in a row that no longer had the history to resume from.
    compacted: usize,
    /// A node answered since the last failure: failures count afresh.
    answered: bool,
}

/// How one attempt on one node ended.
enum Attempt {
    /// The caller is gone, or the watch ended for good.
    Done,
    /// Go on elsewhere (the node failed or went silent).
    NextEndpoint(String),
    /// Go on at the same node (the stream was dropped for falling behind).
    Again,
}

impl WatchTask {
    async fn run(mut self) {
        let timeout = self.client.inner.options.timeout;
        let mut failing_since: Option<Instant> = None;
        loop {
            let endpoint = self.client.current_endpoint();
            let outcome = match self.client.connection(&endpoint, Instant::now() + timeout).await {
                Ok(connection) => self.attempt(&endpoint, connection).await,
                Err(ConnectFailure::Tls(message)) => {
                    self.fail(Error::Tls(message)).await;
                    return;
                }
                Err(failure) => Attempt::NextEndpoint(failure.message().to_string()),
            };
            match outcome {
                Attempt::Done => return,
                Attempt::Again => failing_since = None,
                Attempt::NextEndpoint(why) => {
                    self.client.rotate_from(&endpoint);
                    if std::mem::take(&mut self.answered) {
                        failing_since = None;
                    }
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= timeout {
                        let error = Error::Unavailable {
                            timeout,
                            endpoints: self.client.endpoints().join(","),
                            last: format!("{endpoint}: {why}"),
                        };
                        self.fail(error).await;
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            if self.updates.is_closed() {
                return;
            }
        }
    }

    /// Reports an error that ends the watch.
    async fn fail(&mut self, error: Error) {
        match self.created.take() {
            Some(created) => {
                let _ = created.send(Err(error));
            }
            None => {
                let _ = self.updates.send(Err(error)).await;
            }
        }
    }

    /// The watch on one connection, until it ends or must move.
    async fn attempt(&mut self, endpoint: &str, connection: std::sync::Arc<super::Connection>) -> Attempt {
        let id = self
            .client
            .inner
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel(BUFFER);
        connection
            .streams
            .lock()
            .unwrap()
            .insert(id, super::Stream::dropped_when_full(tx));
        let request = Request {
            id,
            command: Some(request::Command::Watch(self.request.clone())),
            ..Default::default()
        };
        if connection.outgoing.send(request).await.is_err() {
            connection.streams.lock().unwrap().remove(&id);
            return Attempt::NextEndpoint("the connection closed".into());
        }
        let progress = match self.request.progress_interval_ms {
            0 => crate::server::DEFAULT_PROGRESS_INTERVAL,
            ms => Duration::from_millis(ms),
        };
        // A node that says nothing for this long is taken for gone.
        let silence = 2 * progress + self.client.inner.options.timeout;
        let outcome = loop {
            let received = tokio::select! {
                received = tokio::time::timeout(silence, rx.recv()) => received,
                _ = self.updates.closed() => break Attempt::Done,
            };
            let response = match received {
                Err(_) => break Attempt::NextEndpoint(format!("no word from the node for {silence:?}")),
                Ok(None) if connection.is_closed() => break Attempt::NextEndpoint("the connection broke".into()),
                // Dropped for falling behind: open it again from where we are.
                Ok(None) => break Attempt::Again,
                Ok(Some(response)) => response,
            };
            match response.result {
                Some(response::Result::Watch(w)) => {
                    if let Some(outcome) = self.handle(w).await {
                        break outcome;
                    }
                }
                Some(response::Result::Error(e)) => {
                    let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified);
                    if is_retryable(code) {
                        break Attempt::NextEndpoint(e.message);
                    }
                    let error = match code {
                        ErrorCode::PermissionDenied => Error::PermissionDenied(e.message),
                        ErrorCode::Unauthenticated => Error::Tls(e.message),
                        c if is_callers_fault(c) => Error::InvalidArgument(e.message),
                        _ => Error::Server {
                            code,
                            message: format!("{endpoint}: {}", e.message),
                        },
                    };
                    self.fail(error).await;
                    break Attempt::Done;
                }
                other => {
                    break Attempt::NextEndpoint(format!("unexpected response {other:?} to a watch"));
                }
            }
        };
        connection.streams.lock().unwrap().remove(&id);
        if !connection.is_closed() {
            // The node's side of the watch ends too (also when the stream was
            // dropped for falling behind: the reopened one replaces it). Its
            // answer goes nowhere; the node ends its watches when the
            // connection closes in any case.
            let cancel = Request {
                id: self
                    .client
                    .inner
                    .next_id
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                command: Some(request::Command::WatchCancel(WatchCancelRequest { watch_id: id })),
                ..Default::default()
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), connection.outgoing.send(cancel)).await;
        }
        outcome
    }

    /// One response of the watch; `Some` when the attempt ends.
    async fn handle(&mut self, w: WatchResponse) -> Option<Attempt> {
        if w.canceled {
            // Resuming, another node may keep more history (a node that just
            // installed a snapshot keeps none from before it): try each.
            let resuming = self.created.is_none();
            if w.compact_revision > 0 && (!resuming || self.compacted >= self.client.endpoints().len()) {
                let error = Error::Server {
                    code: ErrorCode::Compacted,
                    message: w.cancel_reason,
                };
                self.fail(error).await;
                return Some(Attempt::Done);
            }
            if w.compact_revision > 0 {
                self.compacted += 1;
            }
            return Some(Attempt::NextEndpoint(format!(
                "the node ended the watch: {}",
                w.cancel_reason
            )));
        }
        // Everything up to `revision` was sent: resume after it.
        self.request.start_revision = w.revision + 1;
        if w.created {
            if let Some(created) = self.created.take() {
                let _ = created.send(Ok(w.revision + 1));
            }
            return None;
        }
        // The node serves the watch (a created one may still find its start
        // compacted): failures count afresh.
        self.compacted = 0;
        self.answered = true;
        let update = if w.events.is_empty() {
            WatchUpdate::Progress { revision: w.revision }
        } else {
            WatchUpdate::Events {
                events: w.events,
                revision: w.revision,
            }
        };
        if self.updates.send(Ok(update)).await.is_err() {
            return Some(Attempt::Done);
        }
        None
    }
}

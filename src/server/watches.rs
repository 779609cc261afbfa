//! `watch`: a stream of changes to a key or range, from a revision on,
//! served from this node's own applied state and change history (so
//! followers serve watches too).
//!
//! Each watch is a task that reads the history a page at a time from where
//! it is, sends what matches, and then waits for the next applied batch. It
//! holds no queue of its own: a watcher whose client reads slowly simply
//! reads the history later (its connection's writer drops a client that
//! takes nothing for the read timeout), and one that falls behind the
//! history this node keeps is canceled, saying which revision is the oldest
//! left. Events therefore go out in revision order, each once, with no gap.

use std::time::{Duration, Instant};

use ::metrics::{counter, gauge};
use tokio::sync::{mpsc, oneshot};

use super::client::{ClientPort, Reply};
use crate::error::WireError;
use crate::metrics;
use crate::proto::{
    request, response, watch_event, ErrorCode, KeyValue, Response, WatchEvent, WatchRequest, WatchResponse,
};
use crate::storage::history::{Event, Filter, HistoryError};
use crate::storage::{StateStore, StorageError};

/// Progress notifications go out after this long without events, unless the
/// watch asks for another interval.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(10);
/// The shortest progress interval a watch may ask for.
const MIN_PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// What the watch wants, checked: a key or a non-empty range.
fn filter_of(request: &WatchRequest, limits: super::Limits) -> Result<Filter, WireError> {
    match &request.range {
        Some(_) if !request.key.is_empty() => Err(WireError::invalid("a watch names a key or a range, not both")),
        Some(range) => {
            super::validate::range(&range.from, &range.to)?;
            if range.holds_no_key() {
                return Err(WireError::invalid(
                    "the watched range holds no key (its prefix and from/to do not overlap); nothing could ever match",
                ));
            }
            Ok(Filter::Range(range.clone()))
        }
        None => {
            super::validate::key(&request.key, limits)?;
            Ok(Filter::Key(request.key.clone()))
        }
    }
}

fn progress_interval(request: &WatchRequest) -> Result<Duration, WireError> {
    match request.progress_interval_ms {
        0 => Ok(DEFAULT_PROGRESS_INTERVAL),
        ms if Duration::from_millis(ms) < MIN_PROGRESS_INTERVAL => Err(WireError::invalid(format!(
            "progress_interval_ms {ms} is under the minimum of {} ms",
            MIN_PROGRESS_INTERVAL.as_millis()
        ))),
        ms => Ok(Duration::from_millis(ms)),
    }
}

/// Serves watch `id` until it is canceled (`cancel`), the client leaves, or
/// the history it needs is gone. Every response goes through `tx`.
pub(super) async fn stream(
    id: u64,
    request: WatchRequest,
    port: ClientPort,
    identity: Option<std::sync::Arc<str>>,
    tx: mpsc::Sender<Reply>,
    cancel: oneshot::Receiver<()>,
) {
    let command = request::Command::Watch(request.clone());
    let checked = port
        .access
        .check(identity.as_deref(), &command)
        .and_then(|()| Ok((filter_of(&request, port.limits)?, progress_interval(&request)?)));
    let (filter, interval) = match checked {
        Ok(checked) => checked,
        Err(error) => {
            let outcome = error.code.as_str_name().to_ascii_lowercase();
            counter!(metrics::REQUESTS, "op" => "watch", "outcome" => outcome).increment(1);
            let response = Response {
                id,
                result: Some(response::Result::Error(error.into())),
            };
            let _ = tx.send(Reply::without_slot(response)).await;
            return;
        }
    };
    counter!(metrics::REQUESTS, "op" => "watch", "outcome" => "ok").increment(1);
    gauge!(metrics::WATCHERS).increment(1.0);
    let watch = Watch {
        id,
        store: port.handle.store().clone(),
        filter,
        prev_kv: request.prev_kv,
        tx,
    };
    let reason = watch.run(request.start_revision, interval, cancel).await;
    gauge!(metrics::WATCHERS).decrement(1.0);
    if let Some(reason) = reason {
        counter!(metrics::WATCHES_CANCELED, "reason" => reason).increment(1);
    }
}

struct Watch {
    id: u64,
    store: std::sync::Arc<StateStore>,
    filter: Filter,
    prev_kv: bool,
    tx: mpsc::Sender<Reply>,
}

/// Why a watch ended (`None`: the client left).
type Ended = Option<&'static str>;

impl Watch {
    async fn send(&self, response: WatchResponse) -> Result<(), Ended> {
        let response = Response {
            id: self.id,
            result: Some(response::Result::Watch(response)),
        };
        self.tx.send(Reply::without_slot(response)).await.map_err(|_| None)
    }

    /// Tells the watcher every change up to `revision` has been delivered.
    async fn progress(&self, revision: u64) -> Result<(), Ended> {
        self.send(WatchResponse {
            revision,
            ..Default::default()
        })
        .await
    }

    /// Ends the watch as its client asked.
    async fn canceled_by_client(&self) -> Ended {
        self.cancel("client", "canceled by the client".into(), 0).await
    }

    /// Ends the watch with a last response saying why.
    async fn cancel(&self, label: &'static str, reason: String, compact_revision: u64) -> Ended {
        let _ = self
            .send(WatchResponse {
                canceled: true,
                cancel_reason: reason,
                compact_revision,
                ..Default::default()
            })
            .await;
        Some(label)
    }

    async fn run(self, start_revision: u64, interval: Duration, mut cancel: oneshot::Receiver<()>) -> Ended {
        // Subscribed before the first read: a batch applied meanwhile wakes us.
        let mut applied = self.store.subscribe_applied();
        let now = *applied.borrow();
        let mut next = if start_revision == 0 { now + 1 } else { start_revision };
        // Read before the watch is confirmed: a compacted start is refused
        // as the answer to the request itself.
        let mut first = Some(self.store.history(next, &self.filter));
        let compacted = matches!(first, Some(Err(HistoryError::Compacted { .. })));
        if !compacted {
            let created = WatchResponse {
                created: true,
                revision: next - 1,
                ..Default::default()
            };
            if let Err(ended) = self.send(created).await {
                return ended;
            }
        }
        let mut last_sent = Instant::now();
        loop {
            // Everything there is, a page at a time.
            loop {
                let read = first.take().unwrap_or_else(|| self.store.history(next, &self.filter));
                let page = match read {
                    Ok(page) => page,
                    Err(HistoryError::Compacted { oldest, .. }) => {
                        let why = format!(
                            "revision {next} is compacted: the oldest revision this node still has is {oldest}; \
                             watch from {oldest} or later (and read the current state first)"
                        );
                        return self.cancel("compacted", why, oldest).await;
                    }
                    Err(HistoryError::Store(e)) => {
                        tracing::error!(error = %e, "a watch could not read the change history");
                        let why = format!("this node could not read its change history ({e}); watch another node");
                        return self.cancel("store_failure", why, 0).await;
                    }
                };
                next = page.until + 1;
                let matched = !page.events.is_empty();
                if matched {
                    let events = match self.events(page.events) {
                        Ok(events) => events,
                        Err(e) => {
                            let why = format!("this node could not read its change history ({e}); watch another node");
                            return self.cancel("store_failure", why, 0).await;
                        }
                    };
                    counter!(metrics::WATCH_EVENTS).increment(events.len() as u64);
                    let response = WatchResponse {
                        events,
                        revision: page.until,
                        ..Default::default()
                    };
                    if let Err(ended) = self.send(response).await {
                        return ended;
                    }
                    last_sent = Instant::now();
                }
                if !page.more {
                    break;
                }
                if !matched {
                    // A page of changes none of which is watched (a rare key
                    // in a busy store): say how far the watcher is current
                    // now and then, and let the node's other tasks run.
                    if last_sent.elapsed() >= interval {
                        if let Err(ended) = self.progress(page.until).await {
                            return ended;
                        }
                        last_sent = Instant::now();
                    }
                    if self.tx.is_closed() {
                        return None;
                    }
                    if !matches!(cancel.try_recv(), Err(oneshot::error::TryRecvError::Empty)) {
                        return self.canceled_by_client().await;
                    }
                    tokio::task::yield_now().await;
                }
            }
            tokio::select! {
                changed = applied.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                _ = &mut cancel => {
                    return self.canceled_by_client().await;
                }
                _ = tokio::time::sleep_until((last_sent + interval).into()) => {
                    // Nothing new for a while: say how far the watcher is current.
                    if let Err(ended) = self.progress(next - 1).await {
                        return ended;
                    }
                    last_sent = Instant::now();
                }
                _ = self.tx.closed() => return None,
            }
        }
    }

    /// The wire form of history events, with the records they replaced when
    /// asked.
    fn events(&self, events: Vec<Event>) -> Result<Vec<WatchEvent>, StorageError> {
        // The replaced records, read together (each history chunk once).
        let mut previous = if self.prev_kv {
            let wanted: Vec<(u64, &[u8])> = events
                .iter()
                .map(|e| (e.change.prev_mod_revision, e.change.key.as_slice()))
                .collect();
            self.store.history_records(&wanted)?
        } else {
            Vec::new()
        }
        .into_iter();
        events
            .into_iter()
            .map(|event| {
                let key = event.change.key;
                let prev_kv = previous
                    .next()
                    .flatten()
                    .filter(|_| event.change.prev_mod_revision != 0)
                    .map(|record| record.into_key_value(key.clone()));
                let (kind, kv) = match event.change.record {
                    Some(record) => (watch_event::Type::Put, record.into_key_value(key)),
                    None => (
                        watch_event::Type::Delete,
                        KeyValue {
                            key,
                            mod_revision: event.revision,
                            ..Default::default()
                        },
                    ),
                };
                Ok(WatchEvent {
                    r#type: kind as i32,
                    kv: Some(kv),
                    prev_kv,
                })
            })
            .collect()
    }
}

/// At most this many watches are open on one connection at once.
pub const MAX_WATCHES_PER_CONNECTION: usize = 1024;

/// The watches open on one connection, by request id, with what cancels each.
#[derive(Default, Clone)]
pub(super) struct ConnectionWatches {
    open: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<u64, oneshot::Sender<()>>>>,
}

impl ConnectionWatches {
    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, oneshot::Sender<()>>> {
        self.open.lock().expect("watches lock poisoned")
    }

    /// True when no watch is open.
    pub(super) fn is_empty(&self) -> bool {
        self.map().is_empty()
    }

    /// Starts watch `id` (refused if the id is in use or the connection has
    /// its fill of watches).
    pub(super) async fn open(
        &self,
        id: u64,
        request: WatchRequest,
        port: ClientPort,
        identity: Option<std::sync::Arc<str>>,
        tx: mpsc::Sender<Reply>,
    ) {
        let (cancel, canceled) = oneshot::channel();
        let refusal = {
            let mut open = self.map();
            if open.contains_key(&id) {
                Some(WireError::invalid(format!(
                    "a watch with request id {id} is already open on this connection; use a new id"
                )))
            } else if open.len() >= MAX_WATCHES_PER_CONNECTION {
                Some(WireError::invalid(format!(
                    "this connection has {MAX_WATCHES_PER_CONNECTION} watches open, the most one may; cancel some or \
                     open another connection"
                )))
            } else {
                open.insert(id, cancel);
                None
            }
        };
        if let Some(error) = refusal {
            let response = Response {
                id,
                result: Some(response::Result::Error(error.into())),
            };
            let _ = tx.send(Reply::without_slot(response)).await;
            return;
        }
        let watches = self.clone();
        tokio::spawn(async move {
            stream(id, request, port, identity, tx, canceled).await;
            watches.map().remove(&id);
        });
    }

    /// Ends watch `watch_id`; answers request `id`.
    pub(super) async fn cancel(&self, id: u64, watch_id: u64, tx: &mpsc::Sender<Reply>) {
        let found = self.map().remove(&watch_id);
        let outcome = if found.is_some() { "ok" } else { "invalid_argument" };
        counter!(metrics::REQUESTS, "op" => "watch_cancel", "outcome" => outcome).increment(1);
        let result = match found {
            Some(cancel) => {
                let _ = cancel.send(());
                response::Result::Watch(WatchResponse {
                    canceled: true,
                    ..Default::default()
                })
            }
            None => response::Result::Error(
                WireError::new(
                    ErrorCode::InvalidArgument,
                    format!("no watch {watch_id} is open on this connection (it ended, or was opened on another one)"),
                )
                .into(),
            ),
        };
        let _ = tx
            .send(Reply::without_slot(Response {
                id,
                result: Some(result),
            }))
            .await;
    }

    /// Ends every watch (the connection is closing).
    pub(super) fn cancel_all(&self) {
        for (_, cancel) in self.map().drain() {
            let _ = cancel.send(());
        }
    }
}

//! [`Client`]: talks to a kvraft cluster through any of its nodes.
//!
//! - Several endpoints; the client sticks to one that works, follows leader
//!   hints, and moves on when a node is unreachable or knows no leader.
//! - Many requests in flight per connection (responses matched by id).
//! - Sets and deletes belong to the client's session (registered through
//!   raft on first use, and a number per write; see `crate::sessions`), so
//!   the state machine applies
//!   each once however often it is sent: they are retried on every failure,
//!   one node at a time (an attempt gets a third of the deadline), until the
//!   deadline. Reads are retried on any failure; membership changes (no
//!   session) only on errors that guarantee nothing was applied.
//! - When it gives up, the error is the most informative one seen
//!   (`attempts.rs`: outcome unknown if an attempt may have been applied,
//!   else no leader, then nothing listening, then the last failure). A leader
//!   hint that can't be reached is not followed again in that call.

mod attempts;
mod lease;
mod txn;
mod watch;

pub use lease::{Lease, LeaseKeeper, LeaseState};
pub use txn::{CasOutcome, CompareOp, Expect};
pub use watch::{WatchOptions, WatchUpdate, Watcher};

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::codec::{self, ByteStream, FrameReader, ReadError};
use crate::error::{is_callers_fault, is_retryable, Error};
use crate::proto::{
    request, response, AddNodeRequest, DeleteRequest, DeleteResponse, ErrorCode, GetRequest, InfoRequest, InfoResponse,
    KeyRange, KeyValue, Member, MembersRequest, PingRequest, RegisterSessionRequest, RemoveNodeRequest, Request,
    Response, ScanRequest, TxnRequest, TxnResponse,
};
use crate::tls::client::{explain_client_error, ClientTls, ClientTlsOptions};
use attempts::Attempts;

/// Default endpoint: a single local node with default flags.
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:7379";

/// How a [`Client`] behaves.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Client addresses of one or more nodes (`HOST:PORT`).
    pub endpoints: Vec<String>,
    /// Deadline for one call, retries included.
    pub timeout: Duration,
    /// Read the contacted node's local copy instead of a linearizable read.
    pub serializable: bool,
    /// TLS settings; off unless a CA is given.
    pub tls: ClientTlsOptions,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            endpoints: vec![DEFAULT_ENDPOINT.to_string()],
            timeout: Duration::from_secs(5),
            serializable: false,
            tls: ClientTlsOptions::default(),
        }
    }
}

/// What to scan.
#[derive(Debug, Clone, Default)]
pub struct ScanOptions {
    /// Only keys with this prefix.
    pub prefix: Vec<u8>,
    /// Start at this key (inclusive).
    pub from: Vec<u8>,
    /// Stop before this key (empty: no bound).
    pub to: Vec<u8>,
    /// At most this many pairs (0: all).
    pub limit: u64,
}

/// A client of a kvraft cluster. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    options: ClientOptions,
    /// This client's session: its writes apply exactly once, retries included.
    session: Mutex<Session>,
    /// Held while a session is registered, so concurrent writes register one.
    registering: tokio::sync::Mutex<()>,
    tls: Option<ClientTls>,
    endpoints: Mutex<Vec<String>>,
    current: AtomicUsize,
    connections: Mutex<HashMap<String, Arc<Connection>>>,
    next_id: AtomicU64,
}

impl Client {
    /// A client for these options. Connections are made on first use.
    pub fn new(options: ClientOptions) -> Result<Client, Error> {
        if options.endpoints.is_empty() {
            return Err(Error::InvalidArgument(
                "no endpoints given; pass --endpoints HOST:PORT[,HOST:PORT...]".into(),
            ));
        }
        for endpoint in &options.endpoints {
            crate::address::check_host_port(endpoint)
                .map_err(|e| Error::InvalidArgument(format!("endpoint {endpoint:?}: {e}")))?;
        }
        crate::tls::install_crypto_provider();
        let tls = ClientTls::new(&options.tls).map_err(|e| Error::Tls(e.to_string()))?;
        Ok(Client {
            inner: Arc::new(Inner {
                tls,
                endpoints: Mutex::new(options.endpoints.clone()),
                options,
                session: Mutex::new(Session::unregistered()),
                registering: tokio::sync::Mutex::new(()),
                current: AtomicUsize::new(0),
                connections: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
            }),
        })
    }

    /// Sets `key` to `value`; returns the log index that applied it.
    pub async fn set(&self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Result<u64, Error> {
        self.set_with_lease(key, value, 0).await
    }

    /// The value of `key`, or `None`.
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.get_record(key).await?.map(|kv| kv.value))
    }

    /// `key` with its value and history (`create_revision`, `mod_revision`,
    /// `version`, `lease`), or `None`.
    pub async fn get_record(&self, key: impl Into<Vec<u8>>) -> Result<Option<KeyValue>, Error> {
        let key = key.into();
        let command = request::Command::Get(GetRequest {
            key: key.clone(),
            serializable: self.inner.options.serializable,
        });
        match self.call(command, Kind::Read).await? {
            response::Result::Get(r) => Ok(r.into_key_value(key)),
            other => Err(mismatch(other)),
        }
    }

    /// Deletes `key`; returns whether it existed.
    pub async fn delete(&self, key: impl Into<Vec<u8>>) -> Result<bool, Error> {
        Ok(self.delete_record(key).await?.existed)
    }

    /// Deletes `key`; returns whether it existed and the revision.
    pub async fn delete_record(&self, key: impl Into<Vec<u8>>) -> Result<DeleteResponse, Error> {
        let command = request::Command::Delete(DeleteRequest {
            key: key.into(),
            range: None,
        });
        match self.write(command).await? {
            response::Result::Delete(r) => Ok(r),
            other => Err(mismatch(other)),
        }
    }

    /// Deletes every key in `range` at one revision; returns how many
    /// (`deleted`) and the revision. A range of over 100,000 keys is refused
    /// whole (delete it in parts).
    pub async fn delete_range(&self, range: KeyRange) -> Result<DeleteResponse, Error> {
        let command = request::Command::Delete(DeleteRequest {
            key: Vec::new(),
            range: Some(range),
        });
        match self.write(command).await? {
            response::Result::Delete(r) => Ok(r),
            other => Err(mismatch(other)),
        }
    }

    /// Runs a transaction: if every compare holds, `success` runs, else
    /// `failure`, at one revision. Applied exactly once, retries included
    /// (one that only reads needs no session: it is simply sent again).
    pub async fn txn(&self, txn: TxnRequest) -> Result<TxnResponse, Error> {
        let writes = txn.writes();
        let command = request::Command::Txn(txn);
        let result = if writes {
            self.write(command).await?
        } else {
            self.call(command, Kind::Read).await?
        };
        match result {
            response::Result::Txn(r) => Ok(r),
            other => Err(mismatch(other)),
        }
    }

    /// Sets `key` to `value` only if it is as `expect` says; else returns the
    /// key as it was.
    pub async fn cas(
        &self,
        key: impl Into<Vec<u8>>,
        expect: Expect,
        value: impl Into<Vec<u8>>,
    ) -> Result<CasOutcome, Error> {
        self.cas_with_lease(key, expect, value, 0).await
    }

    /// [`Client::cas`], the new value attached to lease `lease` (0: none):
    /// with [`Expect::Absent`], the way to claim a key only while alive
    /// (leader election, locks).
    pub async fn cas_with_lease(
        &self,
        key: impl Into<Vec<u8>>,
        expect: Expect,
        value: impl Into<Vec<u8>>,
        lease: u64,
    ) -> Result<CasOutcome, Error> {
        use crate::proto::{txn_op_result::Result as R, TxnOp};
        let key = key.into();
        let answer = self
            .txn(TxnRequest {
                compare: vec![expect.compare(&key)],
                success: vec![TxnOp::put_with_lease(key.clone(), value, lease)],
                failure: vec![TxnOp::get(key.clone())],
            })
            .await?;
        if answer.succeeded {
            return Ok(CasOutcome::Swapped {
                revision: answer.revision,
            });
        }
        let current = match answer.results.first().and_then(|r| r.result.as_ref()) {
            Some(R::Get(g)) => g.clone().into_key_value(key),
            // A retry answered from the session without its read (the value
            // was large): read it now, after the swap was tried.
            _ => self.get_record(key).await?,
        };
        Ok(CasOutcome::Failed { current })
    }

    /// Pairs in key order, fetched page by page (each page is one consistent
    /// read; a scan over several pages is not one snapshot).
    pub async fn scan(&self, options: ScanOptions) -> Result<Vec<KeyValue>, Error> {
        let mut pairs: Vec<KeyValue> = Vec::new();
        let mut from = options.from.clone();
        loop {
            let remaining = if options.limit == 0 {
                0
            } else {
                options.limit - pairs.len() as u64
            };
            let command = request::Command::Scan(ScanRequest {
                prefix: options.prefix.clone(),
                from: from.clone(),
                to: options.to.clone(),
                limit: remaining,
                serializable: self.inner.options.serializable,
            });
            let page = match self.call(command, Kind::Read).await? {
                response::Result::Scan(page) => page,
                other => return Err(mismatch(other)),
            };
            let last_key = page.pairs.last().map(|kv| kv.key.clone());
            pairs.extend(page.pairs);
            let done = options.limit > 0 && pairs.len() as u64 >= options.limit;
            match last_key {
                Some(mut key) if page.more && !done => {
                    // The smallest key after the last one returned.
                    key.push(0);
                    from = key;
                }
                _ => return Ok(pairs),
            }
        }
    }

    /// Adds a node as a learner; the leader promotes it to voter once it has
    /// caught up. Returns the member list after the change.
    pub async fn add_node(&self, node_id: u64, peer_addr: &str, client_addr: &str) -> Result<Vec<Member>, Error> {
        let command = request::Command::AddNode(AddNodeRequest {
            node_id,
            peer_addr: peer_addr.into(),
            client_addr: client_addr.into(),
        });
        match self.call(command, Kind::Admin).await? {
            response::Result::AddNode(r) => Ok(r.members),
            other => Err(mismatch(other)),
        }
    }

    /// Removes a node. Returns the member list after the change.
    pub async fn remove_node(&self, node_id: u64) -> Result<Vec<Member>, Error> {
        let command = request::Command::RemoveNode(RemoveNodeRequest { node_id });
        match self.call(command, Kind::Admin).await? {
            response::Result::RemoveNode(r) => Ok(r.members),
            other => Err(mismatch(other)),
        }
    }

    /// The members and the current leader id.
    pub async fn members(&self) -> Result<(Vec<Member>, u64), Error> {
        let command = request::Command::Members(MembersRequest {
            serializable: self.inner.options.serializable,
        });
        match self.call(command, Kind::Read).await? {
            response::Result::Members(r) => Ok((r.members, r.leader_id)),
            other => Err(mismatch(other)),
        }
    }

    /// Status of the first node that answers.
    pub async fn info(&self) -> Result<InfoResponse, Error> {
        match self.call(request::Command::Info(InfoRequest {}), Kind::Read).await? {
            response::Result::Info(r) => Ok(r),
            other => Err(mismatch(other)),
        }
    }

    /// Round trip to the first node that answers: its id and the time taken.
    pub async fn ping(&self) -> Result<(u64, Duration), Error> {
        let started = Instant::now();
        match self.call(request::Command::Ping(PingRequest {}), Kind::Read).await? {
            response::Result::Ping(r) => Ok((r.node_id, started.elapsed())),
            other => Err(mismatch(other)),
        }
    }

    /// Adds every member's client address to the endpoints, so the client can
    /// fail over to nodes it was not told about.
    pub async fn discover_endpoints(&self) -> Result<(), Error> {
        let (members, _) = self.members().await?;
        for m in members.iter().filter(|m| !m.client_addr.is_empty()) {
            self.add_endpoint(&m.client_addr);
        }
        Ok(())
    }

    /// The endpoints this client knows.
    pub fn endpoints(&self) -> Vec<String> {
        self.inner.endpoints.lock().unwrap().clone()
    }

    fn add_endpoint(&self, endpoint: &str) -> usize {
        let mut endpoints = self.inner.endpoints.lock().unwrap();
        match endpoints.iter().position(|e| e == endpoint) {
            Some(i) => i,
            None => {
                endpoints.push(endpoint.to_string());
                endpoints.len() - 1
            }
        }
    }

    fn current_endpoint(&self) -> String {
        let endpoints = self.inner.endpoints.lock().unwrap();
        let i = self.inner.current.load(Ordering::Relaxed) % endpoints.len();
        endpoints[i].clone()
    }

    /// Moves on from `failed` (unless another caller already did).
    fn rotate_from(&self, failed: &str) {
        let endpoints = self.inner.endpoints.lock().unwrap();
        let i = self.inner.current.load(Ordering::Relaxed) % endpoints.len();
        if endpoints[i] == failed {
            self.inner.current.store((i + 1) % endpoints.len(), Ordering::Relaxed);
        }
    }

    fn drop_connection(&self, endpoint: &str) {
        self.inner.connections.lock().unwrap().remove(endpoint);
    }

    async fn connection(&self, endpoint: &str, deadline: Instant) -> Result<Arc<Connection>, ConnectFailure> {
        if let Some(c) = self.inner.connections.lock().unwrap().get(endpoint) {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let budget = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(2));
        let stream = match tokio::time::timeout(budget, TcpStream::connect(endpoint)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err(ConnectFailure::Refused(e.to_string()))
            }
            Ok(Err(e)) => return Err(ConnectFailure::Retry(e.to_string())),
            Err(_) => return Err(ConnectFailure::Retry("connect timed out".into())),
        };
        let _ = stream.set_nodelay(true);
        let stream: Box<dyn ByteStream> = match &self.inner.tls {
            None => Box::new(stream),
            Some(tls) => match tokio::time::timeout(budget, tls.handshake(endpoint, stream)).await {
                Ok(Ok(stream)) => Box::new(stream),
                Ok(Err(e)) if e.settings => return Err(ConnectFailure::Tls(e.message)),
                Ok(Err(e)) => return Err(ConnectFailure::Retry(e.message)),
                Err(_) => return Err(ConnectFailure::Retry("TLS handshake timed out".into())),
            },
        };
        let tls_name = self.inner.tls.as_ref().map(|tls| {
            tls.name_for(endpoint)
                .map(|n| n.to_str().into_owned())
                .unwrap_or_default()
        });
        let connection = Arc::new(Connection::start(stream, endpoint.to_string(), tls_name));
        self.inner
            .connections
            .lock()
            .unwrap()
            .insert(endpoint.to_string(), connection.clone());
        Ok(connection)
    }

    /// Sends one command with failover and retries until the deadline.
    async fn call(&self, command: request::Command, kind: Kind) -> Result<response::Result, Error> {
        self.call_until(command, kind, Instant::now() + self.inner.options.timeout, None)
            .await
    }

    /// A set or delete in this client's session, registering one first if
    /// needed, and a new one if the cluster no longer knows it (only when no
    /// attempt in the old one may have been applied; see `call_until`).
    async fn write(&self, command: request::Command) -> Result<response::Result, Error> {
        let deadline = Instant::now() + self.inner.options.timeout;
        loop {
            let session = self.session_id(deadline).await?;
            // Numbered in that session, unless another write renewed it since.
            let Some(slot) = WriteSlot::take(&self.inner.session, session) else {
                continue;
            };
            match self
                .call_until(command.clone(), Kind::Write, deadline, Some(slot))
                .await
            {
                Err(Error::Server {
                    code: ErrorCode::SessionExpired,
                    ..
                }) => {
                    let mut s = self.inner.session.lock().unwrap();
                    if s.id == session {
                        *s = Session::unregistered();
                    }
                }
                other => return other,
            }
        }
    }

    /// This client's session, registered through raft on first use (its id
    /// is the log index that registered it, so no two clients share one).
    async fn session_id(&self, deadline: Instant) -> Result<u64, Error> {
        let current = self.inner.session.lock().unwrap().id;
        if current != 0 {
            return Ok(current);
        }
        let _one_at_a_time = self.inner.registering.lock().await;
        let current = self.inner.session.lock().unwrap().id;
        if current != 0 {
            return Ok(current);
        }
        // A lost reply makes an extra session, which expires unused.
        let command = request::Command::RegisterSession(RegisterSessionRequest {});
        match self.call_until(command, Kind::Read, deadline, None).await? {
            response::Result::RegisterSession(r) => {
                *self.inner.session.lock().unwrap() = Session::registered(r.session_id);
                Ok(r.session_id)
            }
            other => Err(mismatch(other)),
        }
    }

    /// [`Client::call`] with a given deadline; a write carries its place in
    /// the session on every attempt.
    async fn call_until(
        &self,
        command: request::Command,
        kind: Kind,
        deadline: Instant,
        write: Option<WriteSlot<'_>>,
    ) -> Result<response::Result, Error> {
        let timeout = self.inner.options.timeout;
        // One attempt may not take the whole deadline: a node that holds a
        // request (it lost its leader, say) must leave time for the others.
        // Not for a membership change: it can't be retried once sent, and a
        // leader removing itself hands leadership over first, which takes time.
        let attempt_time = match kind {
            Kind::Admin => timeout,
            Kind::Read | Kind::Write => (timeout / 3).max(Duration::from_secs(1)).min(timeout),
        };
        let mut backoff = Duration::from_millis(20);
        let mut attempts = Attempts::new(self.endpoints());
        let mut failures_in_a_row = 0usize;
        // A leader hint to try next, and hints that could not be reached in
        // this call (an address that only resolves inside the cluster's
        // network, say): those are not followed again.
        let mut hint: Option<String> = None;
        let mut unreachable_hints: HashSet<String> = HashSet::new();
        // A write's place in the session; every attempt carries the same.
        // Why an earlier attempt of this write may have been applied.
        let mut unknown: Option<String> = None;
        // A write sent just before the deadline would time out waiting for
        // its reply and be reported as "outcome unknown", though every
        // earlier attempt was refused before anything was proposed. So the
        // last tenth of the time (50 ms to 500 ms) starts no new write.
        let reply_time = if kind == Kind::Read {
            Duration::ZERO
        } else {
            (timeout / 10).clamp(Duration::from_millis(50), Duration::from_millis(500))
        };
        let mut tried = false;
        loop {
            let now = Instant::now();
            let last_start = deadline.checked_sub(reply_time).filter(|_| tried).unwrap_or(deadline);
            if now >= last_start || attempts.nothing_listens() {
                return Err(match unknown {
                    Some(why) => Error::OutcomeUnknown(why),
                    None => attempts.into_error(timeout),
                });
            }
            // After a full round of failed endpoints, wait before going again.
            if failures_in_a_row > 0 && failures_in_a_row.is_multiple_of(self.endpoints().len()) {
                tokio::time::sleep(backoff.min(last_start - now)).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                if Instant::now() >= last_start {
                    continue;
                }
            }
            tried = true;
            let following_hint = hint.is_some();
            let endpoint = hint.take().unwrap_or_else(|| self.current_endpoint());
            let connection = match self.connection(&endpoint, deadline).await {
                Ok(c) => c,
                Err(ConnectFailure::Tls(message)) => return Err(unknown_or(unknown, Error::Tls(message))),
                Err(failure) if following_hint => {
                    // Back to the endpoints we were given.
                    attempts.failed(&endpoint, &format!("the leader's address {}", failure.message()));
                    unreachable_hints.insert(endpoint);
                    continue;
                }
                Err(ConnectFailure::Refused(e)) => {
                    attempts.refused(&endpoint, &e);
                    self.rotate_from(&endpoint);
                    failures_in_a_row += 1;
                    continue;
                }
                Err(ConnectFailure::Retry(e)) => {
                    attempts.failed(&endpoint, &e);
                    self.rotate_from(&endpoint);
                    failures_in_a_row += 1;
                    continue;
                }
            };
            if following_hint {
                // It answers: keep it, and start there next time.
                let i = self.add_endpoint(&endpoint);
                self.inner.current.store(i, Ordering::Relaxed);
            }
            let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            let mut request = Request {
                id,
                command: Some(command.clone()),
                ..Default::default()
            };
            if let Some(slot) = &write {
                slot.stamp(&mut request);
            }
            let attempt_deadline = deadline.min(Instant::now() + attempt_time);
            let outcome = connection.request(request, attempt_deadline).await;
            match outcome {
                Ok(Response {
                    result: Some(response::Result::Error(e)),
                    ..
                }) => {
                    let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified);
                    let retry = is_retryable(code) || (kind != Kind::Admin && code == ErrorCode::OutcomeUnknown);
                    if !retry {
                        let error = match code {
                            // A copy below what we acknowledged: it was answered,
                            // but not to this call.
                            ErrorCode::OutcomeUnknown | ErrorCode::StaleWrite => Error::OutcomeUnknown(e.message),
                            ErrorCode::PermissionDenied => Error::PermissionDenied(e.message),
                            ErrorCode::LeaseNotFound => Error::LeaseNotFound(e.message),
                            ErrorCode::Unauthenticated => Error::Tls(e.message),
                            c if is_callers_fault(c) => Error::InvalidArgument(e.message),
                            // SESSION_EXPIRED among them: nothing of this write
                            // was applied, and `write` sends it again in a new
                            // session (unless an earlier attempt may have been).
                            _ => Error::Server {
                                code,
                                message: e.message,
                            },
                        };
                        // An earlier attempt may have applied it (so a new
                        // session, or a caller's retry, could apply it twice).
                        return Err(unknown_or(unknown, error));
                    }
                    if code == ErrorCode::OutcomeUnknown && kind == Kind::Write {
                        unknown = Some(format!("{endpoint}: {}", e.message));
                    }
                    if code == ErrorCode::NoLeader {
                        attempts.no_leader(&endpoint);
                    } else {
                        attempts.failed(&endpoint, &e.message);
                    }
                    let leader = e.leader_client_addr;
                    if code == ErrorCode::NotLeader && !leader.is_empty() && !unreachable_hints.contains(&leader) {
                        hint = Some(leader);
                        // Give a leadership transfer a moment to complete.
                        tokio::time::sleep(backoff.min(deadline.saturating_duration_since(Instant::now()))).await;
                    } else {
                        self.rotate_from(&endpoint);
                    }
                    failures_in_a_row += 1;
                }
                Ok(Response { result: Some(r), .. }) => return Ok(r),
                Ok(Response { result: None, .. }) => {
                    return Err(Error::Protocol(format!("{endpoint} sent a response without a result")))
                }
                Err(failure) => {
                    // Sent, and no answer: it may have run.
                    let (why, what) = match failure {
                        Failure::Closed(reason) => {
                            self.drop_connection(&endpoint);
                            match reason {
                                Some(CloseReason::Invalid(reason)) => {
                                    return Err(unknown_or(unknown, Error::InvalidArgument(reason)))
                                }
                                Some(CloseReason::Tls(reason)) => return Err(unknown_or(unknown, Error::Tls(reason))),
                                Some(CloseReason::NotRun(reason)) => {
                                    // The server promised the request did not run.
                                    attempts.failed(&endpoint, &reason);
                                    continue;
                                }
                                None => (
                                    format!("the connection to {endpoint} broke while the write was in flight"),
                                    "connection lost",
                                ),
                            }
                        }
                        Failure::Timeout => (
                            format!("no reply from {endpoint} within {:?}", attempt_time.min(timeout)),
                            "no reply",
                        ),
                    };
                    match kind {
                        Kind::Admin => return Err(Error::OutcomeUnknown(why)),
                        Kind::Write => unknown = Some(why),
                        Kind::Read => {}
                    }
                    attempts.failed(&endpoint, what);
                    // That node lost the connection or holds requests: try another.
                    self.rotate_from(&endpoint);
                    failures_in_a_row += 1;
                }
            }
        }
    }
}

/// How a call may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Changes nothing: retried on any failure.
    Read,
    /// A set or delete in the client's session: retried on any failure that
    /// leaves its outcome unknown, since the state machine applies it once.
    Write,
    /// A membership change (no session): its outcome, once unknown, stays so.
    Admin,
}

/// A client's session: its id (0 until registered) and the numbers of its
/// writes in flight.
#[derive(Debug)]
struct Session {
    id: u64,
    next_seq: u64,
    in_flight: BTreeSet<u64>,
}

impl Session {
    fn unregistered() -> Self {
        Self::registered(0)
    }

    fn registered(id: u64) -> Self {
        Session {
            id,
            next_seq: 1,
            in_flight: BTreeSet::new(),
        }
    }
}

/// One write's number in a session, held until the call returns (then the
/// server may forget its result).
struct WriteSlot<'a> {
    session: &'a Mutex<Session>,
    id: u64,
    seq: u64,
}

impl<'a> WriteSlot<'a> {
    /// The next number in session `id`; `None` if the client's session is
    /// no longer that one (another write renewed it).
    fn take(session: &'a Mutex<Session>, id: u64) -> Option<Self> {
        let mut s = session.lock().unwrap();
        if s.id != id {
            return None;
        }
        let seq = s.next_seq;
        s.next_seq += 1;
        s.in_flight.insert(seq);
        Some(WriteSlot { session, id, seq })
    }

    /// Puts the session fields on an attempt of this write.
    fn stamp(&self, request: &mut Request) {
        let s = self.session.lock().unwrap();
        request.session_id = self.id;
        request.seq = self.seq;
        // Writes of an older session still in flight don't hold this one back.
        request.first_incomplete = if s.id == self.id {
            s.in_flight.first().copied().unwrap_or(self.seq)
        } else {
            self.seq
        };
    }
}

impl Drop for WriteSlot<'_> {
    fn drop(&mut self) {
        let mut s = self.session.lock().unwrap();
        if s.id == self.id {
            s.in_flight.remove(&self.seq);
        }
    }
}

impl Client {
    /// Streams a consistent snapshot of a node's whole state (a backup),
    /// handing each checked frame to `on_frame`; returns the snapshot's
    /// header once its trailer checked out. Unless `serializable`, every
    /// write acknowledged before the call is in it. The timeout applies to
    /// each frame, not to the whole stream.
    pub async fn snapshot_save(
        &self,
        serializable: bool,
        mut on_frame: impl FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<crate::proto::SnapshotHeader, Error> {
        use crate::storage::snapshot_stream::{Checked, FrameCheck};
        let timeout = self.inner.options.timeout;
        let mut last = String::from("no endpoint answered");
        let mut connection = None;
        for _ in 0..self.endpoints().len() {
            let endpoint = self.current_endpoint();
            match self.connection(&endpoint, Instant::now() + timeout).await {
                Ok(c) => {
                    connection = Some((endpoint, c));
                    break;
                }
                Err(ConnectFailure::Tls(message)) => return Err(Error::Tls(message)),
                Err(failure) => {
                    last = format!("{endpoint}: {}", failure.message());
                    self.rotate_from(&endpoint);
                }
            }
        }
        let Some((endpoint, connection)) = connection else {
            return Err(Error::Unavailable {
                timeout,
                endpoints: self.endpoints().join(","),
                last,
            });
        };
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel(4);
        connection.streams.lock().unwrap().insert(id, Stream::blocking(tx));
        let request = Request {
            id,
            command: Some(request::Command::SnapshotSave(crate::proto::SnapshotSaveRequest {
                serializable,
            })),
            ..Default::default()
        };
        let sent = connection.outgoing.send(request).await;
        let result = async {
            sent.map_err(|_| Error::Protocol(format!("the connection to {endpoint} closed")))?;
            let mut check = FrameCheck::default();
            loop {
                let response = tokio::time::timeout(timeout, rx.recv())
                    .await
                    .map_err(|_| {
                        Error::Protocol(format!("{endpoint} sent nothing for {timeout:?} during the snapshot"))
                    })?
                    .ok_or_else(|| {
                        Error::Protocol(format!("the connection to {endpoint} broke during the snapshot"))
                    })?;
                match response.result {
                    Some(response::Result::SnapshotFrame(frame)) => {
                        let checked = check
                            .check(&frame)
                            .map_err(|e| Error::Protocol(format!("{endpoint}: {e}")))?;
                        on_frame(&frame)?;
                        if let Checked::Done(header) = checked {
                            return Ok(header);
                        }
                    }
                    Some(response::Result::Error(e)) => {
                        let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified);
                        return Err(match code {
                            ErrorCode::PermissionDenied => Error::PermissionDenied(e.message),
                            ErrorCode::Unauthenticated => Error::Tls(e.message),
                            _ => Error::Server {
                                code,
                                message: e.message,
                            },
                        });
                    }
                    other => return Err(Error::Protocol(format!("unexpected response {other:?} in a snapshot"))),
                }
            }
        }
        .await;
        connection.streams.lock().unwrap().remove(&id);
        result
    }
}

/// `error`, unless an earlier attempt of the write may have been applied:
/// then the outcome is unknown, whatever ended the call.
fn unknown_or(unknown: Option<String>, error: Error) -> Error {
    match unknown {
        Some(why) => Error::OutcomeUnknown(format!("{why}; then: {error}")),
        None => error,
    }
}

fn mismatch(result: response::Result) -> Error {
    Error::Protocol(format!("unexpected response {result:?}"))
}

enum Failure {
    /// The connection closed; with the server's reason if it gave one.
    Closed(Option<CloseReason>),
    Timeout,
}

/// Why a connection can't be made.
enum ConnectFailure {
    /// TLS settings don't fit the server: retrying can't help.
    Tls(String),
    /// Nothing listens there (the node is down, or the address is wrong).
    Refused(String),
    /// Another network failure; another endpoint or a later try may work.
    Retry(String),
}

impl ConnectFailure {
    fn message(&self) -> &str {
        match self {
            ConnectFailure::Tls(m) | ConnectFailure::Refused(m) | ConnectFailure::Retry(m) => m,
        }
    }
}

/// Why the server ended a connection, when it said so (or TLS did).
#[derive(Debug, Clone)]
enum CloseReason {
    /// The request was refused for good (e.g. a frame over the limit).
    Invalid(String),
    /// TLS: a certificate refused, TLS required, ...
    Tls(String),
    /// The server closed an idle connection: unanswered requests did not run.
    NotRun(String),
}

impl CloseReason {
    fn of(error: crate::proto::Error) -> CloseReason {
        match ErrorCode::try_from(error.code).unwrap_or(ErrorCode::Unspecified) {
            ErrorCode::Unauthenticated => CloseReason::Tls(error.message),
            code if is_retryable(code) => CloseReason::NotRun(error.message),
            _ => CloseReason::Invalid(error.message),
        }
    }
}

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;
/// Requests answered by a stream of responses (`snapshot_save`, `watch`), by id.
type Streams = Arc<Mutex<HashMap<u64, Stream>>>;

/// Where the responses of one streamed request go.
struct Stream {
    tx: mpsc::Sender<Response>,
    /// Full: drop the stream (its owner opens it again) instead of waiting,
    /// which would hold up every other request on the connection.
    drop_when_full: bool,
}

impl Stream {
    /// A stream that holds the connection's reader while it is full (a
    /// backup: pushes back on the server).
    fn blocking(tx: mpsc::Sender<Response>) -> Stream {
        Stream {
            tx,
            drop_when_full: false,
        }
    }

    /// A stream that is dropped when full (a watch, which resumes).
    fn dropped_when_full(tx: mpsc::Sender<Response>) -> Stream {
        Stream {
            tx,
            drop_when_full: true,
        }
    }
}

/// One multiplexed connection: a writer task and a reader task that routes
/// responses to waiters by request id.
struct Connection {
    outgoing: mpsc::Sender<Request>,
    waiters: Waiters,
    streams: Streams,
    /// Why the server closed the connection, if it said (e.g. frame too large).
    close_reason: Arc<Mutex<Option<CloseReason>>>,
    /// Set once the reader has stopped: the connection is of no further use.
    reader_done: Arc<std::sync::atomic::AtomicBool>,
}

impl Connection {
    /// Serves a connected (and, with TLS, handshaken) stream to `endpoint`;
    /// `tls_name` is the name its certificate was checked against.
    fn start(stream: Box<dyn ByteStream>, endpoint: String, tls_name: Option<String>) -> Connection {
        let (read_half, write_half) = tokio::io::split(stream);
        let sink = tokio_util::codec::FramedWrite::new(write_half, codec::codec(codec::CLIENT_MAX_FRAME));
        let mut frames = FrameReader::new(BufReader::new(read_half), codec::CLIENT_MAX_FRAME);
        let (outgoing, rx) = mpsc::channel::<Request>(1024);
        let waiters: Waiters = Arc::default();
        let streams: Streams = Arc::default();
        let reader_streams = streams.clone();
        let close_reason: Arc<Mutex<Option<CloseReason>>> = Arc::default();
        let reader_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        tokio::spawn(codec::write_frames(rx, sink, None, codec::encode));
        let reader_waiters = waiters.clone();
        let reader_reason = close_reason.clone();
        let done = reader_done.clone();
        tokio::spawn(async move {
            loop {
                let frame = match frames.next_frame().await {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(ReadError::Io(e)) => {
                        // A TLS alert after the handshake is how TLS 1.3
                        // reports a refused client certificate.
                        if let Some(name) = &tls_name {
                            if crate::tls::client::rustls_error(&e).is_some() {
                                let explained = explain_client_error(&e, &endpoint, name);
                                reader_reason
                                    .lock()
                                    .unwrap()
                                    .get_or_insert(CloseReason::Tls(explained.message));
                            }
                        }
                        break;
                    }
                    Err(_) => break,
                };
                let Ok(response) = Response::decode(frame) else {
                    break;
                };
                if response.id == 0 {
                    // A connection-level error (the server could not tell which
                    // request it was about).
                    if let Some(response::Result::Error(e)) = response.result {
                        *reader_reason.lock().unwrap() = Some(CloseReason::of(e));
                    }
                    continue;
                }
                let stream = reader_streams
                    .lock()
                    .unwrap()
                    .get(&response.id)
                    .map(|s| (s.tx.clone(), s.drop_when_full));
                if let Some((stream, drop_when_full)) = stream {
                    let id = response.id;
                    let delivered = if drop_when_full {
                        stream.try_send(response).is_ok()
                    } else {
                        // Waiting here pushes back on the server (TCP).
                        stream.send(response).await.is_ok()
                    };
                    if !delivered {
                        reader_streams.lock().unwrap().remove(&id);
                    }
                    continue;
                }
                if let Some(waiter) = reader_waiters.lock().unwrap().remove(&response.id) {
                    let _ = waiter.send(response);
                }
            }
            done.store(true, Ordering::Release);
            // Dropping the senders wakes every waiter with an error.
            reader_waiters.lock().unwrap().clear();
            reader_streams.lock().unwrap().clear();
        });
        Connection {
            outgoing,
            waiters,
            streams,
            close_reason,
            reader_done,
        }
    }

    fn is_closed(&self) -> bool {
        self.outgoing.is_closed() || self.reader_done.load(Ordering::Acquire)
    }

    async fn request(&self, request: Request, deadline: Instant) -> Result<Response, Failure> {
        let id = request.id;
        let (tx, rx) = oneshot::channel();
        {
            let mut waiters = self.waiters.lock().unwrap();
            if self.reader_done.load(Ordering::Acquire) {
                // Closed meanwhile: nothing was sent.
                return Err(Failure::Closed(Some(CloseReason::NotRun(
                    "the connection had closed".into(),
                ))));
            }
            waiters.insert(id, tx);
        }
        // Not sent, whatever happens here: the writer took nothing.
        let not_sent = |why: &str| {
            let reason = self.close_reason.lock().unwrap().clone();
            Failure::Closed(Some(reason.unwrap_or_else(|| CloseReason::NotRun(why.into()))))
        };
        match tokio::time::timeout_at(deadline.into(), self.outgoing.send(request)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                self.waiters.lock().unwrap().remove(&id);
                return Err(not_sent("the connection had closed"));
            }
            Err(_) => {
                self.waiters.lock().unwrap().remove(&id);
                return Err(not_sent("the connection was too busy to take the request in time"));
            }
        }
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(_)) => Err(Failure::Closed(self.close_reason.lock().unwrap().clone())),
            Err(_) => {
                self.waiters.lock().unwrap().remove(&id);
                Err(Failure::Timeout)
            }
        }
    }
}

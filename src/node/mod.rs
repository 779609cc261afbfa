//! The node: the raft loop that alone owns the `RawNode`, and the handle the
//! rest of the server uses to talk to it.
//!
//! - [`raft_loop`]: the loop, its `Ready` handling and apply.
//! - [`membership`]: the membership rules, as pure functions.
//! - [`pending`]: proposals and reads waiting for an answer.
//! - [`lessor`]: the leader's lease timers.
//! - [`transport`]: the `Transport` trait outgoing raft messages go through
//!   (the TCP one is `server::peer::outbound`).
//! - [`status`]: the status and gauges, published when they change.
//! - [`startup`]: data dir checks, bootstrap and recovery before the loop runs.
//! - [`restore`]: a backup made into the data dir of a new cluster's member.
//! - [`error`]: what can go wrong, in the node's terms (the server maps it to
//!   the wire once).
//!
//! Connection tasks send an [`Inbox`] message and wait on a oneshot; reads wait
//! on the applied-index watch and then read the shared state machine, so they
//! never queue behind the raft thread.

pub mod error;
pub mod lessor;
pub mod membership;
pub mod pending;
pub mod raft_loop;
pub mod restore;
pub mod startup;
pub mod status;
pub mod transport;

use std::sync::mpsc;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use raft::prelude::Message;
use tokio::sync::{oneshot, watch};

pub use self::error::{Error, LeaderHint};
use crate::proto::{Command, Member};
use crate::state_machine::{ApplyResult, StateMachine};

/// How many messages the raft loop's inbox holds. The loop drains up to
/// 4096 a round; past this, it is behind, and senders are refused
/// ([`Error::Overloaded`] for requests; peer messages are dropped, which raft
/// tolerates) instead of queueing without bound.
pub const INBOX_CAPACITY: usize = 16 * 1024;

/// The sending side of the raft loop's inbox (bounded: see
/// [`INBOX_CAPACITY`]). Senders in async tasks use `try_send`, never the
/// blocking `send`.
pub type InboxSender = mpsc::SyncSender<Inbox>;

/// The sending side of the raft loop's control channel: unbounded, because
/// only the node itself sends on it (its transport's delivery reports, which
/// follow the loop's own messages, and a shutdown request), and a report
/// that was lost could stall raft (a follower waiting forever on a snapshot
/// report). The loop drains it before every inbox message.
pub type ControlSender = mpsc::Sender<Inbox>;

/// What the raft loop is told.
pub enum Inbox {
    /// A raft message from a peer, with the address it says it listens on.
    Raft {
        /// The message.
        message: Box<Message>,
        /// The node the connection speaks for (a forwarded proposal's
        /// `from` may be another).
        sender: u64,
        /// The sender's advertised peer address.
        from_peer_addr: String,
        /// The cluster the sender belongs to.
        cluster_id: u64,
        /// The connection's TLS certificate names the sender: the message
        /// really comes from that node (without peer TLS, anyone who can
        /// send from a member's address can speak for it).
        certified: bool,
    },
    /// Replicate a command; the reply comes once it is applied.
    Propose {
        /// The command.
        command: Command,
        /// The request's span; the raft loop records its progress there.
        span: tracing::Span,
        /// Where the result goes.
        reply: oneshot::Sender<Result<ApplyResult, Error>>,
    },
    /// Find the index a linearizable read must wait for.
    ReadIndex {
        /// Where the index goes.
        reply: oneshot::Sender<Result<u64, Error>>,
    },
    /// A question about leases only the leader can answer (it alone times
    /// them); answered once a read-index round confirms it still leads.
    Lease {
        /// The question.
        query: LeaseQuery,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<LeaseAnswer, Error>>,
    },
    /// Add or remove a member.
    ChangeMembership {
        /// The change.
        change: MembershipChange,
        /// Where the new member list goes.
        reply: oneshot::Sender<Result<ApplyResult, Error>>,
    },
    /// The transport could not deliver to this peer.
    Unreachable(u64),
    /// A snapshot message was written to a peer (or failed to be).
    SnapshotSent {
        /// The peer.
        to: u64,
        /// Whether it went out.
        ok: bool,
    },
    /// A peer refused us for good (we were removed, or another cluster).
    RejectedByPeer {
        /// The peer that refused.
        peer: u64,
        /// Why.
        reason: String,
        /// We were removed from the cluster.
        removed: bool,
        /// Our data dir is not the one our member record was published from.
        replaced: bool,
    },
    /// Stop gracefully: hand leadership over, let in-flight requests finish,
    /// snapshot at the applied index, then stop, all before `deadline`.
    Shutdown {
        /// When the loop must have stopped.
        deadline: std::time::Instant,
    },
}

/// What the leader is asked about leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseQuery {
    /// Renew this lease.
    KeepAlive(u64),
    /// This lease's time left, and with `keys` its keys.
    TimeToLive {
        /// The lease.
        id: u64,
        /// List its keys too.
        keys: bool,
    },
    /// Every lease.
    List,
}

/// The leader's answer about leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseAnswer {
    /// Renewed: it has this many seconds to live.
    Renewed {
        /// Seconds.
        ttl: u64,
    },
    /// A lease's time left.
    TimeToLive {
        /// Seconds left, rounded up.
        ttl: u64,
        /// Seconds it was granted.
        granted_ttl: u64,
        /// Its keys (asked for), up to about 1 MiB of them.
        keys: Vec<Vec<u8>>,
        /// Keys left out of `keys`.
        keys_omitted: u64,
        /// Keys attached.
        key_count: u64,
    },
    /// Every lease's id.
    List(Vec<u64>),
    /// No such lease (or it ran out).
    NotFound(u64),
}

/// Runs a raft loop on its own OS thread (storage calls block on fsync);
/// the thread ends when the loop stops, with the loop's storage error if any.
/// The thread holds the data dir's lock: it is released only once the loop
/// can no longer write, however its caller goes away.
pub fn spawn(
    raft_loop: raft_loop::RaftLoop,
    id: u64,
    lock: crate::storage::DataDirLock,
) -> std::io::Result<std::thread::JoinHandle<Result<(), crate::storage::StorageError>>> {
    std::thread::Builder::new()
        .name(format!("raft-loop-{id}"))
        .spawn(move || {
            let _lock = lock;
            let span = tracing::info_span!("raft", node = id);
            let _guard = span.enter();
            raft_loop.run()
        })
}

/// A membership change request.
#[derive(Debug, Clone)]
pub enum MembershipChange {
    /// Add a node as a learner; the leader promotes it once it has caught up.
    Add(Member),
    /// Remove a node.
    Remove(u64),
}

/// The role of a node as `info` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Leads the cluster.
    Leader,
    /// Follows a leader (or waits for one).
    #[default]
    Follower,
    /// Campaigning.
    Candidate,
    /// Receives the log but does not vote (yet).
    Learner,
}

impl Role {
    /// The lower-case name used in `info`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::Learner => "learner",
        }
    }
}

/// What the raft loop publishes after every round, for `info`, leader hints and
/// readiness.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStatus {
    /// This node's id.
    pub id: u64,
    /// The cluster id (0 while a joining node hasn't heard from the cluster).
    pub cluster_id: u64,
    /// Current role.
    pub role: Role,
    /// Current term.
    pub term: u64,
    /// The leader (0: none known).
    pub leader_id: u64,
    /// The leader's client address, if known.
    pub leader_client_addr: String,
    /// Highest index known committed.
    pub commit_index: u64,
    /// Highest index applied to the state machine.
    pub applied_index: u64,
    /// Index of the newest snapshot on disk.
    pub snapshot_index: u64,
    /// First index in the log.
    pub first_index: u64,
    /// Last index in the log.
    pub last_index: u64,
    /// This node was removed from the cluster and has stopped.
    pub removed: bool,
    /// The ids removed from the cluster (never to be let in again), in order.
    pub removed_ids: Vec<u64>,
    /// A graceful shutdown has begun.
    pub stopping: bool,
    /// The raft loop has exited.
    pub stopped: bool,
}

/// How the server talks to the raft loop. Cheap to clone.
#[derive(Clone)]
pub struct NodeHandle {
    inbox: InboxSender,
    control: ControlSender,
    state_machine: Arc<RwLock<StateMachine>>,
    applied: watch::Receiver<u64>,
    status: watch::Receiver<NodeStatus>,
    request_timeout: Duration,
}

impl NodeHandle {
    pub(crate) fn new(
        inbox: InboxSender,
        control: ControlSender,
        state_machine: Arc<RwLock<StateMachine>>,
        applied: watch::Receiver<u64>,
        status: watch::Receiver<NodeStatus>,
        request_timeout: Duration,
    ) -> Self {
        NodeHandle {
            inbox,
            control,
            state_machine,
            applied,
            status,
            request_timeout,
        }
    }

    /// Hands a message to the raft loop. Fails if the loop has stopped, or
    /// is so far behind that its inbox is full (retryable: nothing was done).
    pub fn send(&self, message: Inbox) -> Result<(), Error> {
        match self.inbox.try_send(message) {
            Ok(()) => Ok(()),
            Err(mpsc::TrySendError::Full(_)) => {
                crate::metrics::inbox_full();
                Err(Error::Overloaded(
                    "this node's raft loop is behind (its inbox is full); retry shortly or on another endpoint".into(),
                ))
            }
            Err(mpsc::TrySendError::Disconnected(_)) => Err(stopped()),
        }
    }

    /// Asks the raft loop to stop gracefully by `deadline`. Goes on the
    /// control channel, so a full inbox can't lose it; the loop takes it
    /// before any request sent after this call.
    pub fn request_shutdown(&self, deadline: std::time::Instant) {
        let _ = self.control.send(Inbox::Shutdown { deadline });
    }

    /// Replicates a command and waits until it is applied.
    pub async fn propose(&self, command: Command) -> Result<ApplyResult, Error> {
        self.no_leader_check()?;
        let (reply, rx) = oneshot::channel();
        self.send(Inbox::Propose {
            command,
            span: tracing::Span::current(),
            reply,
        })?;
        rx.await.map_err(|_| stopped())?
    }

    /// Asks the leader about leases (this node, if it leads; otherwise the
    /// error names the leader).
    pub async fn lease(&self, query: LeaseQuery) -> Result<LeaseAnswer, Error> {
        self.no_leader_check()?;
        let (reply, rx) = oneshot::channel();
        self.send(Inbox::Lease { query, reply })?;
        rx.await.map_err(|_| stopped())?
    }

    /// Changes membership and waits until the change is applied.
    pub async fn change_membership(&self, change: MembershipChange) -> Result<ApplyResult, Error> {
        self.no_leader_check()?;
        let (reply, rx) = oneshot::channel();
        self.send(Inbox::ChangeMembership { change, reply })?;
        rx.await.map_err(|_| stopped())?
    }

    /// Waits until this node's state machine reflects every write acknowledged
    /// before the call: a ReadIndex round, then the applied index catching up.
    pub async fn linearizable_barrier(&self) -> Result<(), Error> {
        self.no_leader_check()?;
        let (reply, rx) = oneshot::channel();
        self.send(Inbox::ReadIndex { reply })?;
        let index = rx.await.map_err(|_| stopped())??;
        let mut applied = self.applied.clone();
        let waited = tokio::time::timeout(self.request_timeout, applied.wait_for(|a| *a >= index)).await;
        match waited.map(|r| r.is_ok()) {
            Ok(true) => Ok(()),
            Ok(false) => Err(stopped()),
            Err(_) => Err(Error::ReadTimeout(format!(
                "this node did not apply up to read index {index} in time; retry"
            ))),
        }
    }

    /// Runs `f` on the state machine under its read lock.
    pub fn read<T>(&self, f: impl FnOnce(&StateMachine) -> T) -> T {
        f(&self.state_machine.read().expect("state machine lock poisoned"))
    }

    /// The node's state store (the same object across snapshot installs).
    pub fn store(&self) -> Arc<crate::storage::StateStore> {
        self.read(|sm| sm.store().clone())
    }

    /// The latest status the raft loop published.
    pub fn status(&self) -> NodeStatus {
        self.status.borrow().clone()
    }

    /// Whether node `id` was removed from the cluster, as of the last
    /// published status (no state machine lock: the peer listener asks this
    /// for every inbound frame).
    pub fn is_removed(&self, id: u64) -> bool {
        self.status.borrow().removed_ids.binary_search(&id).is_ok()
    }

    /// The data dir incarnation member `id` published (0: not a member, or
    /// not published yet).
    pub fn member_incarnation(&self, id: u64) -> u64 {
        self.read(|sm| sm.member(id).map_or(0, |m| m.incarnation))
    }

    /// The cluster id as the raft loop, its one owner, last published it (0
    /// while a joining node waits to learn it).
    pub fn cluster_id(&self) -> u64 {
        self.status.borrow().cluster_id
    }

    /// A receiver that sees every status change.
    pub fn watch_status(&self) -> watch::Receiver<NodeStatus> {
        self.status.clone()
    }

    /// Fails fast, with a retryable error, when no leader is known: raft would
    /// drop the request silently and the caller would wait out its timeout.
    fn no_leader_check(&self) -> Result<(), Error> {
        let status = self.status.borrow();
        if status.removed {
            return Err(Error::removed(status.id));
        }
        // A stopping node may already have handed leadership over (and so
        // know no leader): say it is stopping, not that there is no leader.
        if status.stopping || status.stopped {
            return Err(Error::shutting_down());
        }
        if status.leader_id == 0 {
            return Err(Error::no_leader(status.id));
        }
        Ok(())
    }
}

fn stopped() -> Error {
    Error::shutting_down()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle_with_inbox(capacity: usize) -> (NodeHandle, mpsc::Receiver<Inbox>, tempfile::TempDir) {
        let (inbox, rx) = mpsc::sync_channel(capacity);
        let (control, _control_rx) = mpsc::channel();
        let (_applied_tx, applied) = watch::channel(0);
        let (_status_tx, status) = watch::channel(NodeStatus::default());
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::storage::StateStore::open(dir.path(), 1 << 20).unwrap());
        let state_machine = Arc::new(RwLock::new(StateMachine::open(store).unwrap()));
        let handle = NodeHandle::new(inbox, control, state_machine, applied, status, Duration::from_secs(1));
        (handle, rx, dir)
    }

    #[test]
    fn a_full_inbox_refuses_with_a_retryable_error_instead_of_growing() {
        let (handle, rx, _dir) = handle_with_inbox(2);
        handle.send(Inbox::Unreachable(1)).unwrap();
        handle.send(Inbox::Unreachable(2)).unwrap();
        let refused = handle.send(Inbox::Unreachable(3)).unwrap_err();
        assert!(matches!(refused, Error::Overloaded(_)), "{refused:?}");
        // Room again once the loop takes a message; what was refused is not queued.
        assert!(matches!(rx.recv().unwrap(), Inbox::Unreachable(1)));
        handle.send(Inbox::Unreachable(4)).unwrap();
        let queued: Vec<u64> = rx
            .try_iter()
            .map(|m| match m {
                Inbox::Unreachable(id) => id,
                _ => 0,
            })
            .collect();
        assert_eq!(queued, [2, 4]);
        drop(rx);
        assert!(matches!(
            handle.send(Inbox::Unreachable(5)),
            Err(Error::ShuttingDown(_))
        ));
    }
}

//! The raft loop: one OS thread that alone owns the `RawNode`. It drains its
//! inbox in batches, ticks, and handles `Ready` in `RaftLoop::handle_ready`,
//! in the order raft-rs documents. Storage calls block (fsync), which is why
//! this is a thread and not a task.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, Entry, EntryType, Snapshot,
};
use raft::{RawNode, SnapshotStatus, StateRole};
use raft_proto::ConfChangeI;
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

mod leases;

use super::lessor::Lessor;
use super::membership;
use super::pending::{Proposals, Reads};
use super::status::{RaftView, StatusPublisher};
use super::transport::Transport;
use super::{Error, Inbox, LeaderHint, MembershipChange, NodeStatus};
use crate::metrics;
use crate::peer_guard;
use crate::proto::{command, Command, Member, NodeIdentity, ProposalContext};
use crate::state_machine::{ApplyResult, Batch, StateMachine, StateMeta};
use crate::storage::{NodeIdentityFile, RaftStorage, StateStore, StorageError};
use ::metrics::{counter, gauge, histogram};

/// How often a node re-proposes its own addresses until they are applied.
const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);
/// At most this many inbox messages per round, so ticks and Ready keep up.
const INBOX_BATCH: usize = 4096;
/// Stale pinned views and staged snapshots are swept this often.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Settings the loop needs, fixed at start.
#[derive(Debug, Clone)]
pub struct LoopSettings {
    /// This node.
    pub id: u64,
    /// One raft tick.
    pub tick: Duration,
    /// Flush the store (and compact the log behind it) at least every this
    /// many applied entries; the flusher also flushes every five seconds.
    pub checkpoint_entries: u64,
    /// Entries kept in the log behind the store's durable applied index.
    pub catchup_entries: u64,
    /// Deadline for proposals and reads.
    pub request_timeout: Duration,
    /// The addresses this node publishes for itself.
    pub advertise_peer_addr: String,
    /// See `advertise_peer_addr`.
    pub advertise_client_addr: String,
    /// This data dir's incarnation, published in our member record.
    pub incarnation: u64,
    /// The shortest time to live a lease is granted (seconds): longer than
    /// an election takes, so a failover alone can't end a lease.
    pub min_lease_ttl: u64,
}

/// What the loop is built from (see `startup::prepare`).
pub struct LoopParts {
    /// The raft node over its storage.
    pub node: RawNode<RaftStorage>,
    /// The same storage, for compaction and snapshot installs.
    pub storage: RaftStorage,
    /// The state machine's store (the loop is its one writer).
    pub store: Arc<StateStore>,
    /// Where requests and peer messages arrive (bounded).
    pub inbox: mpsc::Receiver<Inbox>,
    /// Delivery reports and shutdown (unbounded; drained first).
    pub control: mpsc::Receiver<Inbox>,
    /// Shared with the node's handles, which read it.
    pub state_machine: Arc<RwLock<StateMachine>>,
    /// Where outgoing raft messages go.
    pub transport: Box<dyn Transport>,
    /// Tells readers how far the state machine has applied.
    pub applied_tx: watch::Sender<u64>,
    /// Feeds `NodeHandle::status`.
    pub status_tx: watch::Sender<NodeStatus>,
    /// The data dir's identity file (cluster id, removal).
    pub identity: NodeIdentityFile,
    /// The cluster id (0 until a joining node learns it).
    pub cluster_id: u64,
    /// Fixed settings.
    pub settings: LoopSettings,
    /// Counts loop rounds, for the watchdog.
    pub rounds: Arc<AtomicU64>,
}

/// The loop and everything it owns.
pub struct RaftLoop {
    node: RawNode<RaftStorage>,
    storage: RaftStorage,
    store: Arc<StateStore>,
    /// The flushed index the log was last compacted behind.
    compacted_for: u64,
    /// When stale pinned views and staged snapshots were last swept.
    last_sweep: Instant,
    inbox: mpsc::Receiver<Inbox>,
    control: mpsc::Receiver<Inbox>,
    state_machine: Arc<RwLock<StateMachine>>,
    transport: Box<dyn Transport>,
    applied_tx: watch::Sender<u64>,
    status: StatusPublisher,
    identity: NodeIdentityFile,
    /// The cluster id: this loop is its one owner; the rest of the node reads
    /// it from the status (`NodeHandle::cluster_id`).
    cluster_id: u64,
    settings: LoopSettings,
    proposals: Proposals,
    reads: Reads,
    /// Lease timers, while this node leads.
    lessor: Lessor,
    /// The members' peer addresses, the loop's own copy: refreshed under the
    /// state machine's write lock whenever entries or a snapshot are applied,
    /// so sending a message never takes that lock.
    peer_addrs: HashMap<u64, String>,
    /// Peer addresses learned from envelopes, for peers not (yet) in the
    /// member list (a joining node answers the leader before it knows members).
    learned_addrs: HashMap<u64, String>,
    leader_id: u64,
    removed: bool,
    /// Set when the leader shows that this node's log lost entries it had
    /// acknowledged; the loop stops with this message.
    lost_log: Option<String>,
    last_publish: Option<Instant>,
    /// Counts loop rounds, so a watchdog can tell the loop is alive.
    rounds: Arc<AtomicU64>,
    /// Set once a graceful shutdown has begun.
    shutdown: Option<Shutdown>,
    hooks: TestHooks,
    /// Rate-limits the log lines about refused peer messages.
    refusals: peer_guard::RefusalLog,
    /// Rate-limits the log lines about peers refusing us (they repeat on
    /// every reconnect until an operator acts).
    rejections: peer_guard::RefusalLog,
}

/// A graceful shutdown in progress.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shutdown {
    /// Stop by then, whatever is still pending.
    deadline: Instant,
    /// Stop waiting for in-flight requests and the leadership transfer by then.
    drain_until: Instant,
}

/// Faults the process-level tests inject (unset in production).
#[derive(Debug, Clone, Copy, Default)]
pub struct TestHooks {
    /// Stop making progress this long after start.
    pub wedge_after: Option<Duration>,
    /// Abort the process between the log reset and the store rename of a
    /// snapshot install, as a crash there would.
    pub crash_mid_install: bool,
}

/// What a node that lost acknowledged state must do instead of rejoining.
fn must_not_rejoin(id: u64) -> String {
    format!(
        "It must not rejoin under id {id} (it could undo committed writes or vote twice): on a live member run \
         `kvraft remove-node {id}`, then start this node with an empty data dir, --join and a new id, and run \
         `kvraft add-node NEW_ID PEER_ADDR` (README: \"Replacing a failed node\")"
    )
}

impl RaftLoop {
    /// A loop over `parts`, with nothing pending, and the faults `hooks` asks
    /// for.
    pub fn new(parts: LoopParts, hooks: TestHooks) -> Self {
        let id = parts.settings.id;
        let peer_addrs = member_addrs(parts.state_machine.read().expect("state machine lock poisoned").meta());
        RaftLoop {
            node: parts.node,
            storage: parts.storage,
            store: parts.store,
            compacted_for: 0,
            last_sweep: Instant::now(),
            inbox: parts.inbox,
            control: parts.control,
            state_machine: parts.state_machine,
            transport: parts.transport,
            applied_tx: parts.applied_tx,
            status: StatusPublisher::new(id, parts.status_tx),
            identity: parts.identity,
            cluster_id: parts.cluster_id,
            settings: parts.settings,
            proposals: Proposals::new(),
            reads: Reads::new(id),
            lessor: Lessor::default(),
            peer_addrs,
            learned_addrs: HashMap::new(),
            leader_id: 0,
            removed: false,
            lost_log: None,
            last_publish: None,
            rounds: parts.rounds,
            shutdown: None,
            hooks,
            refusals: peer_guard::RefusalLog::new("refused peer input", Duration::from_secs(300)),
            rejections: peer_guard::RefusalLog::new("a peer refused this node", Duration::from_secs(60)),
        }
    }

    /// Runs until shutdown, removal or a storage failure.
    pub fn run(mut self) -> Result<(), StorageError> {
        let result = self.run_rounds().and_then(|()| self.final_checkpoint());
        let why = if self.removed {
            "this node was removed from the cluster"
        } else {
            "this node is shutting down"
        };
        // Proposals already handed to raft may still commit elsewhere.
        self.proposals.fail_all(
            "shutdown",
            Error::OutcomeUnknown(format!("{why} while the write was in flight")),
        );
        self.reads.fail_all(if self.removed {
            Error::removed(self.settings.id)
        } else {
            Error::shutting_down()
        });
        match &result {
            Err(StorageError::Mismatch(message)) => error!("stopping: {message}"),
            Err(e) => error!(error = %e, "raft loop stopped on a storage error"),
            Ok(()) => {}
        }
        self.store.close();
        self.status.stopped();
        result
    }

    fn run_rounds(&mut self) -> Result<(), StorageError> {
        let tick = self.settings.tick;
        let started = Instant::now();
        let mut next_tick = Instant::now() + tick;
        self.publish_status();
        self.publish_lease_count();
        loop {
            if self.hooks.wedge_after.is_some_and(|after| started.elapsed() >= after) {
                warn!("test hook: wedging the raft loop");
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            self.rounds.fetch_add(1, Ordering::Relaxed);
            let wait = next_tick.saturating_duration_since(Instant::now());
            // Control messages first, before each inbox message: a shutdown
            // requested before a request was sent is seen before it.
            match self.inbox.recv_timeout(wait) {
                Ok(message) => {
                    self.drain_control();
                    self.handle(message);
                    for _ in 0..INBOX_BATCH {
                        self.drain_control();
                        match self.inbox.try_recv() {
                            Ok(message) => self.handle(message),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => self.drain_control(),
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            let now = Instant::now();
            if now >= next_tick {
                let before = (self.node.raft.state, self.node.raft.term);
                self.node.tick();
                self.count_campaign(before);
                next_tick = now + tick;
                self.on_tick(now);
            }
            if let Some(ctx) = self.reads.start_round(now + self.settings.request_timeout) {
                self.node.read_index(ctx);
            }
            self.handle_ready()?;
            if let Some(message) = self.lost_log.take() {
                return Err(StorageError::Mismatch(message));
            }
            self.maybe_checkpoint()?;
            self.publish_status();
            if self.removed || self.shutdown_done(now) {
                return Ok(());
            }
        }
    }

    fn drain_control(&mut self) {
        while let Ok(message) = self.control.try_recv() {
            self.handle(message);
        }
    }

    /// Starts a graceful shutdown: a leader hands leadership to the most
    /// caught-up voter so the cluster doesn't wait out an election timeout.
    fn begin_shutdown(&mut self, deadline: Instant) {
        let now = Instant::now();
        // Leave half the time for the final checkpoint.
        let drain_until = now + deadline.saturating_duration_since(now) / 2;
        self.shutdown = Some(Shutdown { deadline, drain_until });
        if self.node.raft.state == StateRole::Leader {
            if let Some(to) = self.most_caught_up_voter() {
                info!(to, "shutting down: transferring leadership");
                self.node.transfer_leader(to);
            }
        }
    }

    /// True once a shutdown may finish: leadership handed over (or nobody to
    /// hand it to) and nothing in flight, or the drain time is up.
    fn shutdown_done(&self, now: Instant) -> bool {
        let Some(shutdown) = self.shutdown else {
            return false;
        };
        if now >= shutdown.drain_until || now >= shutdown.deadline {
            return true;
        }
        let leading = self.node.raft.state == StateRole::Leader && self.most_caught_up_voter().is_some();
        !leading && self.proposals.is_empty() && self.reads.is_empty()
    }

    /// On a graceful stop: make the store durable at the applied index and
    /// compact, so the next start replays nothing.
    fn final_checkpoint(&mut self) -> Result<(), StorageError> {
        if self.shutdown.is_none() || self.removed {
            return Ok(());
        }
        self.store.flush()?;
        self.compact_behind_flush()?;
        info!(
            index = self.store.durable_index(),
            "shutdown checkpoint at the applied index"
        );
        Ok(())
    }

    /// Handles one inbox message.
    fn handle(&mut self, message: Inbox) {
        match message {
            Inbox::Raft {
                message,
                sender,
                from_peer_addr,
                cluster_id,
                certified,
            } => self.step(*message, sender, from_peer_addr, cluster_id, certified),
            Inbox::Propose { command, span, reply } => self.propose(command, span, reply),
            Inbox::ReadIndex { reply } => {
                if self.removed {
                    let _ = reply.send(Err(Error::removed(self.settings.id)));
                } else {
                    self.reads.push(reply);
                }
            }
            Inbox::Lease { query, reply } => self.answer_lease(query, reply),
            Inbox::ChangeMembership { change, reply } => {
                if let Err(e) = self.change_membership(change, reply) {
                    debug!(error = %e, "membership change refused");
                }
            }
            Inbox::Unreachable(peer) => self.node.report_unreachable(peer),
            Inbox::SnapshotSent { to, ok } => {
                if ok {
                    counter!(metrics::SNAPSHOTS, "kind" => "sent").increment(1);
                } else {
                    counter!(metrics::SNAPSHOT_FAILURES, "kind" => "send").increment(1);
                }
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.node.report_snapshot(to, status);
            }
            Inbox::RejectedByPeer {
                peer,
                reason,
                removed,
                replaced,
            } => {
                if replaced {
                    self.lost_log = Some(format!(
                        "node {peer} refused this node: {reason}. {}",
                        must_not_rejoin(self.settings.id)
                    ));
                } else if removed {
                    warn!(peer, %reason, "a peer says this node was removed from the cluster; stopping");
                    self.mark_removed();
                } else {
                    self.rejections.refused(&format!("node {peer}"), "refused", &reason);
                }
            }
            Inbox::Shutdown { deadline } => self.begin_shutdown(deadline),
        }
    }

    fn step(
        &mut self,
        message: raft::prelude::Message,
        sender: u64,
        from_peer_addr: String,
        cluster_id: u64,
        certified: bool,
    ) {
        let ours = self.cluster_id;
        if ours != 0 && cluster_id != ours {
            return;
        }
        // The last line of defence: raft panics on impossible input.
        if let Err(refusal) = peer_guard::check_against_state(&message, &self.raft_view()) {
            counter!(metrics::PEER_MESSAGES_REFUSED, "reason" => refusal.label()).increment(1);
            let detail = format!(
                "{:?} term {} index {} commit {} ({} entries); our term {}, last index {}",
                message.get_msg_type(),
                message.term,
                message.index,
                message.commit,
                message.entries.len(),
                self.node.raft.term,
                self.node.raft.raft_log.last_index()
            );
            self.refusals
                .refused(&format!("node {}", message.from), refusal.label(), &detail);
            // Only a certified leader is believed: without peer TLS one forged
            // heartbeat would otherwise stop a node for good.
            if certified
                && refusal == peer_guard::MessageRefusal::CommitBeyondLog
                && message.get_msg_type() == raft::prelude::MessageType::MsgHeartbeat
                && message.term >= self.node.raft.term
            {
                self.lost_log = Some(self.lost_log_message(&message));
            }
            return;
        }
        if message.get_msg_type() == raft::prelude::MessageType::MsgSnapshot {
            let meta = message.get_snapshot().get_metadata();
            if !self.store.staged_path(meta.index, meta.term).exists() {
                // The state travels in a stream that is staged first; a
                // snapshot message without it can't be installed.
                let refusal = peer_guard::MessageRefusal::SnapshotNotStaged;
                counter!(metrics::PEER_MESSAGES_REFUSED, "reason" => refusal.label()).increment(1);
                debug!(
                    index = meta.index,
                    "a snapshot message without its staged state; ignored"
                );
                return;
            }
        }
        if ours == 0 && cluster_id != 0 {
            // A joining node learns its cluster from the first leader that
            // contacts it, and keeps it.
            info!(cluster_id = format_args!("{cluster_id:016x}"), "joined cluster");
            let identity = NodeIdentity {
                node_id: self.settings.id,
                cluster_id,
                removed: false,
                incarnation: self.settings.incarnation,
            };
            if let Err(e) = self.identity.store(&identity) {
                error!(error = %e, "could not record the cluster id");
                return;
            }
            self.cluster_id = cluster_id;
            self.transport.set_cluster_id(cluster_id);
            self.publish_status();
        }
        // The address is the sender's own claim about itself: never store it
        // under another id (a forwarded proposal names its originator).
        if !from_peer_addr.is_empty() && message.from == sender {
            self.learned_addrs.insert(sender, from_peer_addr);
        }
        let before = (self.node.raft.state, self.node.raft.term);
        let stepped = self.node.step(message);
        self.count_campaign(before);
        if let Err(e) = stepped {
            debug!(error = %e, "raft refused a message");
        }
    }

    /// The raft state peer messages are checked against.
    fn raft_view(&self) -> peer_guard::RaftView {
        let raft = &self.node.raft;
        // raft tracks progress for every member: none means no configuration
        // yet (no state machine lock needed on this per-message path).
        let joining = raft.prs().iter().len() == 0;
        let committed = raft.raft_log.committed;
        peer_guard::RaftView {
            term: raft.term,
            leader_id: raft.leader_id,
            is_leader: raft.state == StateRole::Leader,
            is_candidate: matches!(raft.state, StateRole::Candidate | StateRole::PreCandidate),
            tracks_itself: raft.prs().get(self.settings.id).is_some(),
            committed,
            committed_term: raft.raft_log.term(committed).unwrap_or(0),
            last_index: raft.raft_log.last_index(),
            persisted: raft.raft_log.persisted,
            joining,
            cluster_id: self.cluster_id,
        }
    }

    /// The leader this node follows, for a caller to retry on.
    fn leader_hint(&self) -> Option<LeaderHint> {
        (self.leader_id != 0).then(|| LeaderHint {
            id: self.leader_id,
            client_addr: self
                .state_machine
                .read()
                .expect("state machine lock poisoned")
                .member(self.leader_id)
                .map(|m| m.client_addr.clone())
                .unwrap_or_default(),
        })
    }

    fn context(&self, proposal_id: u64, member: Option<Member>) -> Vec<u8> {
        ProposalContext {
            node_id: self.settings.id,
            proposal_id,
            member,
        }
        .encode_to_vec()
    }

    fn propose(
        &mut self,
        mut command: Command,
        span: tracing::Span,
        reply: oneshot::Sender<Result<ApplyResult, Error>>,
    ) {
        if self.removed {
            let _ = reply.send(Err(Error::removed(self.settings.id)));
            return;
        }
        if self.shutdown.is_some() {
            metrics::proposal_failed("shutdown");
            let _ = reply.send(Err(Error::shutting_down()));
            return;
        }
        if self.leader_id == 0 {
            metrics::proposal_failed("no_leader");
            let _ = reply.send(Err(Error::no_leader(self.settings.id)));
            return;
        }
        // The state machine's clock for session expiry (see sessions.rs).
        command.proposed_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        if let Some(command::Op::LeaseGrant(grant)) = &mut command.op {
            // Raised here, once: every node applies the same time to live.
            grant.ttl = grant.ttl.max(self.settings.min_lease_ttl);
        }
        let id = self.proposals.next_id();
        let before = self.node.raft.raft_log.last_index();
        match self.node.propose(self.context(id, None), command.encode_to_vec()) {
            Ok(()) => {
                let index = self.appended_index(before);
                let deadline = Instant::now() + self.settings.request_timeout;
                debug!(parent: &span, proposal_id = id, index, "proposed");
                self.proposals.insert(id, reply, deadline, index, span);
            }
            Err(raft::Error::ProposalDropped) => {
                metrics::proposal_failed("dropped");
                let _ = reply.send(Err(Error::Dropped {
                    message: "raft dropped the proposal (leader change or leadership transfer under way); retry".into(),
                    leader: self.leader_hint(),
                }));
            }
            Err(e) => {
                let _ = reply.send(Err(Error::Internal(format!("propose failed: {e}"))));
            }
        }
    }

    /// The index of the entry a leader just appended, if it appended one.
    fn appended_index(&self, before: u64) -> Option<u64> {
        let last = self.node.raft.raft_log.last_index();
        (self.node.raft.state == StateRole::Leader && last > before).then_some(last)
    }

    fn change_membership(
        &mut self,
        change: MembershipChange,
        reply: oneshot::Sender<Result<ApplyResult, Error>>,
    ) -> Result<(), Error> {
        let result = self.propose_membership(change);
        match result {
            Ok((id, index)) => {
                let deadline = Instant::now() + self.settings.request_timeout;
                self.proposals
                    .insert(id, reply, deadline, Some(index), tracing::Span::current());
                Ok(())
            }
            Err(e) => {
                let _ = reply.send(Err(e.clone()));
                Err(e)
            }
        }
    }

    /// Validates and proposes a membership change on the leader; returns the
    /// proposal id and the entry's index.
    fn propose_membership(&mut self, change: MembershipChange) -> Result<(u64, u64), Error> {
        if self.node.raft.state != StateRole::Leader {
            if self.leader_id == 0 {
                return Err(Error::no_leader(self.settings.id));
            }
            return Err(Error::NotLeader {
                message: format!("membership changes go through the leader, node {}", self.leader_id),
                leader: self.leader_hint(),
            });
        }
        if self.node.raft.has_pending_conf() {
            return Err(Error::ChangeInProgress(
                "another membership change is still being applied; retry once `kvraft members` shows it".into(),
            ));
        }
        let plan = {
            let sm = self.state_machine.read().expect("state machine lock poisoned");
            let prs = self.node.raft.prs();
            let matched = |id: u64| prs.get(id).map(|p| p.matched);
            membership::plan(
                change,
                &membership::ClusterView {
                    me: self.settings.id,
                    state: &sm,
                    matched: &matched,
                },
            )?
        };
        let mut single = ConfChangeSingle::default();
        let member = match plan {
            membership::Plan::AddLearner(member) => {
                single.set_change_type(ConfChangeType::AddLearnerNode);
                single.node_id = member.id;
                Some(member)
            }
            membership::Plan::Remove(id) => {
                single.set_change_type(ConfChangeType::RemoveNode);
                single.node_id = id;
                None
            }
            membership::Plan::HandOver { to, refusal } => {
                info!(to, "asked to remove myself: handing leadership over first");
                self.node.transfer_leader(to);
                return Err(refusal);
            }
        };
        let id = self.proposals.next_id();
        let context = self.context(id, member);
        self.propose_conf_change(context, single)?;
        Ok((id, self.node.raft.raft_log.last_index()))
    }

    /// Proposes one simple change (no joint state needed) and checks raft took
    /// it: raft turns a second pending change into an empty entry silently.
    fn propose_conf_change(&mut self, context: Vec<u8>, single: ConfChangeSingle) -> Result<(), Error> {
        let mut cc = ConfChangeV2::default();
        cc.set_transition(ConfChangeTransition::Auto);
        cc.set_changes(vec![single].into());
        self.node.propose_conf_change(context, cc).map_err(|e| Error::Dropped {
            message: format!("raft refused the change ({e}); retry"),
            leader: None,
        })?;
        if self.node.raft.pending_conf_index != self.node.raft.raft_log.last_index() {
            return Err(Error::ChangeInProgress(
                "another membership change is still being applied; retry".into(),
            ));
        }
        Ok(())
    }

    /// The voter best placed to take over from this node.
    fn most_caught_up_voter(&self) -> Option<u64> {
        let sm = self.state_machine.read().expect("state machine lock poisoned");
        let prs = self.node.raft.prs();
        membership::most_caught_up_voter(sm.conf_state(), self.settings.id, &|id| prs.get(id).map(|p| p.matched))
    }

    fn on_tick(&mut self, now: Instant) {
        self.proposals.expire(now);
        self.reads.expire(now);
        if now >= self.last_sweep + SWEEP_INTERVAL {
            // Even with no writes: stale views and staged snapshots each hold
            // as much disk as the state.
            self.last_sweep = now;
            self.store.prune_pins();
            self.store.remove_staged_up_to(*self.applied_tx.borrow());
            let reads = self.store.read_cache_stats();
            counter!(metrics::READ_CACHE_HITS).absolute(reads.hits);
            counter!(metrics::READ_CACHE_MISSES).absolute(reads.misses);
            gauge!(metrics::READ_CACHE_BYTES).set(reads.bytes as f64);
        }
        if self.node.raft.state == StateRole::Leader && !self.node.raft.has_pending_conf() {
            self.promote_caught_up_learner();
        }
        self.publish_own_addresses(now);
        self.expire_leases(now);
    }

    /// Leader only: promotes one learner whose log has caught up.
    fn promote_caught_up_learner(&mut self) {
        let committed = self.node.raft.raft_log.committed;
        let learner = {
            let sm = self.state_machine.read().expect("state machine lock poisoned");
            let prs = self.node.raft.prs();
            membership::learner_to_promote(sm.conf_state(), committed, &|id| prs.get(id).map(|p| p.matched))
        };
        if let Some(id) = learner {
            info!(node = id, "learner caught up: promoting to voter");
            let mut single = ConfChangeSingle::default();
            single.set_change_type(ConfChangeType::AddNode);
            single.node_id = id;
            let context = self.context(0, None);
            if let Err(e) = self.propose_conf_change(context, single) {
                debug!(error = %e, "promotion not proposed yet");
            }
        }
    }

    /// Every member publishes its own addresses through raft (static bootstrap
    /// knows only peer addresses, and addresses may change across restarts).
    fn publish_own_addresses(&mut self, now: Instant) {
        if self.leader_id == 0 || self.last_publish.is_some_and(|t| now < t + PUBLISH_INTERVAL) {
            return;
        }
        let current = {
            let sm = self.state_machine.read().expect("state machine lock poisoned");
            sm.member(self.settings.id).cloned()
        };
        let Some(current) = current else { return };
        if current.client_addr == self.settings.advertise_client_addr
            && current.peer_addr == self.settings.advertise_peer_addr
            && current.incarnation == self.settings.incarnation
        {
            return;
        }
        self.last_publish = Some(now);
        let update = Member {
            id: self.settings.id,
            peer_addr: self.settings.advertise_peer_addr.clone(),
            client_addr: self.settings.advertise_client_addr.clone(),
            role: 0,
            incarnation: self.settings.incarnation,
        };
        let command = Command {
            op: Some(command::Op::UpdateMember(update)),
            ..Default::default()
        };
        let _ = self.node.propose(self.context(0, None), command.encode_to_vec());
    }

    /// Handles one `Ready`, in the order raft-rs requires. Never reorder.
    fn handle_ready(&mut self) -> Result<(), StorageError> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut ready = self.node.ready();

        // 0. Role and leader changes: fail what can no longer complete.
        if let Some(ss) = ready.ss() {
            self.on_soft_state(ss.leader_id, ss.raft_state);
        }
        // 1. A leader's appends and heartbeats may leave before its own write:
        //    it counts itself towards commit only once persisted.
        let messages = ready.take_messages();
        self.send(messages);
        // 2. A snapshot from the leader replaces the state machine.
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            self.install_snapshot(snapshot)
                .inspect_err(|_| counter!(metrics::SNAPSHOT_FAILURES, "kind" => "apply").increment(1))?;
        }
        // 3. Committed entries are already durable here, so apply them now.
        let committed = ready.take_committed_entries();
        self.apply(committed)?;
        // 4. New entries and HardState: one write, one fsync.
        self.storage.append(ready.entries(), ready.hs(), ready.must_sync())?;
        // 5. Messages that promise the write above (votes, append acks,
        //    forwarded proposals): only now may they leave.
        let persisted = ready.take_persisted_messages();
        self.send(persisted);
        // 6. Completed ReadIndex rounds.
        for state in ready.take_read_states() {
            self.reads.complete(&state.request_ctx, state.index);
        }
        // 7. Advance; the LightReady carries what became committed meanwhile.
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.storage.set_commit(commit)?;
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.node.advance_apply();
        Ok(())
    }

    /// Counts a campaign this node started in the last tick or step: it turned
    /// (pre-)candidate, or its term rose without a message from a higher term
    /// (a one-node cluster campaigns and wins within one tick).
    fn count_campaign(&self, (state, term): (StateRole, u64)) {
        let campaigning = |r: StateRole| matches!(r, StateRole::PreCandidate | StateRole::Candidate);
        let raft = &self.node.raft;
        let started = (campaigning(raft.state) && !campaigning(state))
            || (raft.state == StateRole::Leader && state != StateRole::Leader && raft.term > term);
        if started {
            counter!(metrics::ELECTIONS).increment(1);
        }
    }

    fn on_soft_state(&mut self, leader_id: u64, role: StateRole) {
        self.follow_role(role);
        if leader_id != self.leader_id && leader_id != 0 {
            counter!(metrics::LEADER_CHANGES).increment(1);
        }
        if leader_id != self.leader_id {
            info!(leader = leader_id, term = self.node.raft.term, ?role, "leader changed");
            let previous = self.leader_id;
            self.leader_id = leader_id;
            if previous != 0 {
                // Forwarded proposals and read rounds went to the old leader.
                self.proposals
                    .fail_forwarded("the leader changed while the write was in flight");
                self.reads
                    .fail_all(Error::NoLeader("the leader changed during the read; retry".into()));
            }
        }
    }

    fn send(&mut self, messages: Vec<raft::prelude::Message>) {
        for message in messages {
            let to = message.to;
            let is_snapshot = message.get_msg_type() == raft::prelude::MessageType::MsgSnapshot;
            let addr = self.peer_addr(to);
            if !self.transport.send(message, addr.as_deref()) {
                self.node.report_unreachable(to);
                if is_snapshot {
                    self.store.unpin(to);
                    counter!(metrics::SNAPSHOT_FAILURES, "kind" => "send").increment(1);
                    self.node.report_snapshot(to, SnapshotStatus::Failure);
                }
            }
        }
    }

    fn peer_addr(&self, id: u64) -> Option<String> {
        self.peer_addrs
            .get(&id)
            .or_else(|| self.learned_addrs.get(&id))
            .cloned()
    }

    /// Installs a snapshot from the leader, whose state was streamed and
    /// staged before raft saw the message: the log first, then the store (a
    /// crash in between is completed at the next start).
    fn install_snapshot(&mut self, snapshot: Snapshot) -> Result<(), StorageError> {
        let started = Instant::now();
        counter!(metrics::SNAPSHOTS, "kind" => "received").increment(1);
        let meta = snapshot.get_metadata().clone();
        let staged = self.store.staged_path(meta.index, meta.term);
        // Check the file before anything changes: raft has taken the
        // snapshot, so a file that can't be installed stops the node here,
        // with its log and store as they were.
        let header = StateStore::read_staged_header(&staged)?;
        if (header.index, header.term) != (meta.index, meta.term) {
            return Err(StorageError::Corrupt(format!(
                "the staged snapshot {} holds index {} term {}, not {} term {}: remove that file and \
                 restart the node; the leader sends the snapshot again",
                staged.display(),
                header.index,
                header.term,
                meta.index,
                meta.term
            )));
        }
        // Decoded before the log is reset: a staged state that doesn't
        // decode must leave the log as it was.
        let state = StateMeta::from_header(&header)?;
        self.storage.start_at(meta.index, meta.term)?;
        if self.hooks.crash_mid_install {
            error!("test hook: aborting between the log reset and the store install");
            std::process::abort();
        }
        self.store.install(&staged)?;
        if state.is_removed(self.settings.id) {
            self.removed = true;
        }
        self.peer_addrs = member_addrs(&state);
        self.state_machine
            .write()
            .expect("state machine lock poisoned")
            .set_meta(state);
        self.compacted_for = header.index;
        // Proposals may be inside the snapshot: we can't tell which applied.
        self.proposals.fail_all(
            "snapshot",
            Error::OutcomeUnknown("this node caught up by snapshot while the write was in flight".into()),
        );
        self.applied_tx.send_replace(meta.index);
        self.store.remove_staged_up_to(meta.index);
        self.publish_lease_count();
        let size = self.store.size_on_disk();
        counter!(metrics::SNAPSHOTS, "kind" => "applied").increment(1);
        histogram!(metrics::SNAPSHOT_DURATION, "kind" => "applied").record(started.elapsed().as_secs_f64());
        gauge!(metrics::SNAPSHOT_SIZE).set(size as f64);
        info!(
            index = meta.index,
            term = meta.term,
            store_bytes = size,
            "installed snapshot from the leader"
        );
        if self.removed {
            self.mark_removed();
        }
        Ok(())
    }

    /// Applies committed entries to the state machine, as one batch, and
    /// answers the proposals this node made.
    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), StorageError> {
        if entries.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let mut replies = Vec::new();
        let store = self.store.clone();
        let meta = self
            .state_machine
            .read()
            .expect("state machine lock poisoned")
            .meta()
            .clone();
        let mut batch = Batch::begin(&store, meta)?;
        for entry in entries {
            let (index, term) = (entry.index, entry.term);
            let context = ProposalContext::decode(&entry.context[..]).ok();
            let ours = context
                .as_ref()
                .filter(|c| c.node_id == self.settings.id && c.proposal_id != 0)
                .map(|c| c.proposal_id);
            self.proposals.entry_applied(index, ours);
            if let Some(id) = ours {
                self.proposals.committed(id);
            }
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => batch.advance(index, term),
                EntryType::EntryNormal => match Command::decode(&entry.data[..]) {
                    Ok(command) => {
                        let result = batch.apply(index, term, command)?;
                        if let Some(id) = ours {
                            replies.push((id, Ok(result)));
                        }
                    }
                    Err(e) => {
                        error!(index, error = %e, "skipping an entry that does not decode");
                        batch.advance(index, term);
                    }
                },
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    let result = self.apply_conf_change(&mut batch, &entry, context.and_then(|c| c.member));
                    if let Some(id) = ours {
                        replies.push((id, result));
                    }
                }
            }
        }
        let lease_events = batch.take_lease_events();
        let state = batch.commit()?;
        self.leases_applied(&lease_events);
        let applied = state.applied_index();
        self.peer_addrs = member_addrs(&state);
        self.state_machine
            .write()
            .expect("state machine lock poisoned")
            .set_meta(state);
        histogram!(metrics::STORE_APPLY_DURATION).record(started.elapsed().as_secs_f64());
        // Publish the applied index before replying, so a read that follows an
        // acknowledged write on this node sees it.
        self.applied_tx.send_replace(applied);
        for (id, result) in replies {
            self.proposals.complete(id, result);
        }
        if self.removed {
            self.mark_removed();
        }
        Ok(())
    }

    fn apply_conf_change(
        &mut self,
        sm: &mut Batch<'_>,
        entry: &Entry,
        member: Option<Member>,
    ) -> Result<ApplyResult, Error> {
        let (index, term) = (entry.index, entry.term);
        let change = if entry.get_entry_type() == EntryType::EntryConfChange {
            ConfChange::parse_from_bytes(&entry.data).map(|cc| cc.into_v2())
        } else {
            // An empty EntryConfChangeV2 is raft leaving a joint configuration.
            ConfChangeV2::parse_from_bytes(&entry.data)
        };
        let change = match change {
            Ok(c) => c,
            Err(e) => {
                error!(index, error = %e, "skipping a membership entry that does not decode");
                sm.advance(index, term);
                return Err(Error::Internal("membership entry does not decode".into()));
            }
        };
        if change.changes.is_empty() && sm.meta().conf_state().voters_outgoing.is_empty() {
            sm.advance(index, term);
            return Ok(ApplyResult::Members(sm.meta().members()));
        }
        match self.node.apply_conf_change(&change) {
            Ok(conf_state) => {
                let added = member.filter(|m| change.changes.iter().any(|c| c.node_id == m.id));
                sm.apply_conf_state(index, term, conf_state, added);
                for single in change.changes.iter() {
                    if single.get_change_type() == ConfChangeType::RemoveNode {
                        self.transport.forget(single.node_id);
                        if single.node_id == self.settings.id {
                            self.removed = true;
                        }
                    }
                }
                info!(index, members = ?sm.meta().members().iter().map(|m| m.id).collect::<Vec<_>>(), "membership changed");
                Ok(ApplyResult::Members(sm.meta().members()))
            }
            Err(e) => {
                warn!(index, error = %e, "raft refused a committed membership change");
                sm.advance(index, term);
                Err(Error::Internal(format!("membership change failed: {e}")))
            }
        }
    }

    /// What to say when a leader's heartbeat commits past our log. The
    /// leader sends `min(what we acknowledged, its commit)`, and we
    /// acknowledge only what is on disk, so our disk lost acknowledged
    /// entries: the data dir was wiped, replaced or rolled back. Running on
    /// could undo committed writes (our acknowledgements counted toward
    /// their quorum) or vote twice in a term, so the node must not rejoin
    /// under this id.
    fn lost_log_message(&self, heartbeat: &raft::prelude::Message) -> String {
        let id = self.settings.id;
        format!(
            "this node's data dir has lost raft log entries it had acknowledged: its log ends at index {last}, \
             but the leader (node {leader}, term {term}) says node {id} acknowledged entries up to index {commit}. \
             This happens when a member's data dir is wiped or replaced (a new disk, a restored copy) and it starts \
             again under its old id. {}",
            must_not_rejoin(id),
            last = self.node.raft.raft_log.last_index(),
            leader = heartbeat.from,
            term = heartbeat.term,
            commit = heartbeat.commit,
        )
    }

    fn mark_removed(&mut self) {
        self.removed = true;
        let identity = NodeIdentity {
            node_id: self.settings.id,
            cluster_id: self.cluster_id,
            removed: true,
            incarnation: self.settings.incarnation,
        };
        if let Err(e) = self.identity.store(&identity) {
            error!(error = %e, "could not record the removal in the data dir");
        }
        self.status.removed();
    }

    /// Asks for a flush every `checkpoint_entries` applied entries (the
    /// flusher flushes every five seconds anyway) and compacts the log behind each
    /// new flush. A flush that failed stops the node.
    fn maybe_checkpoint(&mut self) -> Result<(), StorageError> {
        self.store.flush_failure()?;
        let applied = *self.applied_tx.borrow();
        let durable = self.store.durable_index();
        if applied >= durable + self.settings.checkpoint_entries {
            self.store.request_flush();
        }
        if durable > self.compacted_for {
            self.compact_behind_flush()?;
        }
        Ok(())
    }

    /// Compacts the log behind the store's flushed index, keeping
    /// `catchup_entries` for slow followers.
    fn compact_behind_flush(&mut self) -> Result<(), StorageError> {
        let durable = self.store.durable_index();
        self.storage
            .compact_to(durable.saturating_sub(self.settings.catchup_entries))?;
        self.compacted_for = durable;
        self.store.remove_staged_up_to(durable);
        gauge!(metrics::STORE_DURABLE_INDEX).set(durable as f64);
        gauge!(metrics::STORE_SIZE).set(self.store.size_on_disk() as f64);
        gauge!(metrics::STORE_VALUE_LOG_LIVE).set(self.store.value_log_bytes().1 as f64);
        gauge!(metrics::HISTORY_START).set(self.store.history_start() as f64);
        Ok(())
    }

    fn publish_status(&mut self) {
        let raft = &self.node.raft;
        let view = RaftView {
            state: raft.state,
            term: raft.term,
            leader_id: raft.leader_id,
            committed: raft.raft_log.committed,
            applied: *self.applied_tx.borrow(),
            first_index: raft.raft_log.first_index(),
            last_index: raft.raft_log.last_index(),
            snapshot_index: self.store.durable_index(),
            pending: self.proposals.len(),
            removed: self.removed,
            stopping: self.shutdown.is_some(),
            cluster_id: self.cluster_id,
        };
        self.status.offer(view, &self.state_machine);
    }
}

/// Member id -> peer address, as the state machine has them.
fn member_addrs(sm: &StateMeta) -> HashMap<u64, String> {
    sm.members().into_iter().map(|m| (m.id, m.peer_addr)).collect()
}

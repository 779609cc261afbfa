//! Every check a peer's input passes before it may reach raft, in one place.
//!
//! raft-rs trusts its input: an impossible term or commit index panics the
//! node, and since the term is persisted the panic comes back on every
//! restart. So nothing from the peer port reaches `RawNode::step` unless:
//!
//! 1. **The connection** belongs to a member ([`check_sender`]): with peer
//!    TLS, the certificate names the node (`kvraft-node-<id>`) the envelope
//!    claims to come from; without it, the connection comes from an address
//!    of that member. Its first frame is a small hello (the frame limit stays
//!    small until then), and it may only ever speak for that one node.
//! 2. **The envelope and message** agree on who sent them and to whom
//!    ([`check_addressing`]): `from` is the connection's node, `to` is us, and
//!    the type is one peers send (not a local-only one).
//! 3. **The message fits our raft state** ([`check_against_state`], run on
//!    the raft thread right before `step`): no value near `u64::MAX`, no term
//!    absurdly beyond ours, no commit index beyond our log, entries that
//!    follow each other, leader-only messages only from the leader we know,
//!    snapshots whose metadata and data make sense.
//!
//! A message that fails is dropped and counted
//! (`kvraft_peer_messages_refused_total{reason}`), a connection that fails is
//! closed and counted (`kvraft_peer_connections_refused_total{reason}`), and
//! each (peer, reason) is logged once, then at most every few minutes.
//!
//! Without peer TLS a stranger who can send from a member's own address can
//! still speak for that member: only certificates prevent that.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prost::Message as _;
use raft::prelude::{ConfState, EntryType, Message, MessageType};
use tracing::{debug, warn};

use crate::proto::SnapshotDescriptor;

/// A term this far above ours can't come from a correct peer: terms grow by
/// one per election, and pre-vote keeps partitioned nodes from inflating
/// theirs. Bounding the jump keeps terms far from overflow (the panic that
/// made one forged heartbeat fatal for good).
pub const MAX_TERM_JUMP: u64 = 1_000_000;
/// No term, index or commit of a real cluster gets near this.
pub const MAX_SANE_VALUE: u64 = 1 << 62;

/// Why a peer connection was closed before any of it reached raft.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionRefusal {
    /// Over the cap on peer connections (per address or in all).
    TooManyConnections,
    /// Plaintext on a port that requires TLS.
    TlsRequired,
    /// The TLS handshake failed (no certificate, another CA, ...).
    TlsHandshake,
    /// The certificate's common name is not `kvraft-node-<id>`.
    NotANodeCertificate,
    /// No valid hello in time: silent, oversized, or not an envelope.
    NoHello,
    /// The sender belongs to another cluster.
    ClusterMismatch,
    /// The sender was removed from the cluster.
    Removed,
    /// The sender's data dir was wiped or replaced since it last ran.
    ReplacedDataDir,
    /// The sender is not a member.
    NotMember,
    /// The connection does not come from the member's address (no TLS).
    AddressMismatch,
    /// The certificate names another node than the envelope claims.
    CertificateMismatch,
    /// A later envelope claimed another sender than the first.
    SenderChanged,
    /// A snapshot stream that was cut, damaged or did not match its message.
    BadSnapshotStream,
}

impl ConnectionRefusal {
    /// Every label, for zero-valued series at start.
    pub const LABELS: &'static [&'static str] = &[
        "too_many_connections",
        "tls_required",
        "tls_handshake",
        "not_a_node_certificate",
        "no_hello",
        "cluster_mismatch",
        "removed",
        "replaced_data_dir",
        "not_member",
        "address_mismatch",
        "certificate_mismatch",
        "sender_changed",
        "bad_snapshot_stream",
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        use ConnectionRefusal as R;
        match self {
            R::TooManyConnections => "too_many_connections",
            R::TlsRequired => "tls_required",
            R::TlsHandshake => "tls_handshake",
            R::NotANodeCertificate => "not_a_node_certificate",
            R::NoHello => "no_hello",
            R::ClusterMismatch => "cluster_mismatch",
            R::Removed => "removed",
            R::ReplacedDataDir => "replaced_data_dir",
            R::NotMember => "not_member",
            R::AddressMismatch => "address_mismatch",
            R::CertificateMismatch => "certificate_mismatch",
            R::SenderChanged => "sender_changed",
            R::BadSnapshotStream => "bad_snapshot_stream",
        }
    }
}

/// Why a raft message from a peer was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageRefusal {
    /// The bytes are not a raft message.
    Undecodable,
    /// The message's `from` is not the connection's node.
    SenderMismatch,
    /// The message is for another node.
    WrongRecipient,
    /// A type raft only generates locally (or we never send over the wire).
    NotAPeerMessage,
    /// A term, index or commit near `u64::MAX`.
    ImpossibleValue,
    /// A term far beyond ours.
    TermTooHigh,
    /// A commit index beyond our log (raft would panic).
    CommitBeyondLog,
    /// Entries that don't follow the message's index and term.
    MalformedEntries,
    /// A message only the current leader sends, from someone else.
    NotFromLeader,
    /// A snapshot whose metadata or data is impossible.
    MalformedSnapshot,
    /// A proposal or read request raft would choke on.
    MalformedRequest,
    /// A response acknowledging entries we don't have.
    IndexBeyondLog,
    /// A node that has not joined yet only listens to a leader.
    NotYetJoined,
    /// A snapshot message whose streamed state was not staged first.
    SnapshotNotStaged,
}

impl MessageRefusal {
    /// Every label, for zero-valued series at start.
    pub const LABELS: &'static [&'static str] = &[
        "undecodable",
        "sender_mismatch",
        "wrong_recipient",
        "not_a_peer_message",
        "impossible_value",
        "term_too_high",
        "commit_beyond_log",
        "malformed_entries",
        "not_from_leader",
        "malformed_snapshot",
        "malformed_request",
        "index_beyond_log",
        "not_yet_joined",
        "snapshot_not_staged",
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        use MessageRefusal as R;
        match self {
            R::Undecodable => "undecodable",
            R::SenderMismatch => "sender_mismatch",
            R::WrongRecipient => "wrong_recipient",
            R::NotAPeerMessage => "not_a_peer_message",
            R::ImpossibleValue => "impossible_value",
            R::TermTooHigh => "term_too_high",
            R::CommitBeyondLog => "commit_beyond_log",
            R::MalformedEntries => "malformed_entries",
            R::NotFromLeader => "not_from_leader",
            R::MalformedSnapshot => "malformed_snapshot",
            R::MalformedRequest => "malformed_request",
            R::IndexBeyondLog => "index_beyond_log",
            R::NotYetJoined => "not_yet_joined",
            R::SnapshotNotStaged => "snapshot_not_staged",
        }
    }
}

/// What is known about the other end of a peer connection.
#[derive(Debug, Clone)]
pub struct PeerConnection {
    /// Where it comes from.
    pub remote_ip: IpAddr,
    /// The node its TLS certificate names (peer TLS on), else `None`.
    pub certified_node: Option<u64>,
    /// Peer TLS is on for this port.
    pub tls: bool,
}

/// What the node knows about the claimed sender, read from the state machine.
#[derive(Debug, Clone, Default)]
pub struct SenderStanding {
    /// The claimed sender is a voter or learner.
    pub is_member: bool,
    /// This node has no configuration yet (it is waiting to be added), so it
    /// can't tell members from strangers.
    pub joining: bool,
    /// The addresses the claimed sender's peer address resolves to.
    pub member_ips: Vec<IpAddr>,
}

/// Checks that a connection may speak for node `from`: a member (or anyone
/// while this node waits to join), from its address (plaintext) or with its
/// certificate (TLS). A node that is not a member as far as this node knows
/// is refused even with a valid certificate: this node may have missed the
/// change that added it, but a certificate for an id that is not a member
/// must not be able to depose the leader (see the README on catching up).
pub fn check_sender(
    from: u64,
    connection: &PeerConnection,
    standing: &SenderStanding,
) -> Result<(), ConnectionRefusal> {
    if connection.tls {
        // With TLS, the certificate is the identity: it must name the sender.
        if connection.certified_node != Some(from) {
            return Err(ConnectionRefusal::CertificateMismatch);
        }
    }
    if standing.joining {
        return Ok(());
    }
    if !standing.is_member {
        return Err(ConnectionRefusal::NotMember);
    }
    if !connection.tls && !standing.member_ips.contains(&canonical(connection.remote_ip)) {
        return Err(ConnectionRefusal::AddressMismatch);
    }
    Ok(())
}

/// An IPv4-mapped IPv6 address as plain IPv4, so listeners on `[::]` compare
/// equal to resolved IPv4 addresses.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Checks who a raft message says it is from and for.
pub fn check_addressing(message: &Message, sender: u64, us: u64) -> Result<(), MessageRefusal> {
    use MessageType as T;
    // A forwarded proposal or read request keeps its originator's id, and may
    // be forwarded again (even back to its originator); everything else is
    // from the node at the other end of the connection, which is never us.
    let forwarded = matches!(message.get_msg_type(), T::MsgPropose | T::MsgReadIndex);
    if sender == us || message.from == 0 || (!forwarded && message.from != sender) {
        return Err(MessageRefusal::SenderMismatch);
    }
    if message.to != us {
        return Err(MessageRefusal::WrongRecipient);
    }
    match message.get_msg_type() {
        // Generated by raft itself; stepping them from the network would let
        // a peer start elections or fake reports about other peers.
        T::MsgHup | T::MsgBeat | T::MsgUnreachable | T::MsgSnapStatus | T::MsgCheckQuorum => {
            Err(MessageRefusal::NotAPeerMessage)
        }
        // kvraft only asks a leader to transfer leadership locally.
        T::MsgTransferLeader => Err(MessageRefusal::NotAPeerMessage),
        _ => Ok(()),
    }
}

/// The raft state a message is checked against, taken on the raft thread.
#[derive(Debug, Clone)]
pub struct RaftView {
    /// Current term.
    pub term: u64,
    /// The leader this node follows (0: none).
    pub leader_id: u64,
    /// This node leads.
    pub is_leader: bool,
    /// This node is campaigning (candidate or pre-candidate).
    pub is_candidate: bool,
    /// This node is in its own configuration's progress tracker.
    pub tracks_itself: bool,
    /// Highest committed index.
    pub committed: u64,
    /// The term of the committed index.
    pub committed_term: u64,
    /// Last index in the log.
    pub last_index: u64,
    /// Last index known durable.
    pub persisted: u64,
    /// This node has no configuration yet (waiting to be added).
    pub joining: bool,
    /// Our cluster id (0 while joining).
    pub cluster_id: u64,
}

/// Checks a message against our raft state; see the module docs. The rules
/// come from reading raft-rs 0.7's handling of every message type; the tests
/// step the survivors of random and extreme messages into real raft nodes.
pub fn check_against_state(m: &Message, view: &RaftView) -> Result<(), MessageRefusal> {
    use MessageType as T;
    let kind = m.get_msg_type();
    let snapshot_meta = m.get_snapshot().get_metadata();
    let values = [
        m.term,
        m.log_term,
        m.index,
        m.commit,
        m.reject_hint,
        m.request_snapshot,
        snapshot_meta.index,
        snapshot_meta.term,
    ];
    if values.iter().any(|v| *v >= MAX_SANE_VALUE)
        || m.entries
            .iter()
            .any(|e| e.index >= MAX_SANE_VALUE || e.term >= MAX_SANE_VALUE)
    {
        return Err(MessageRefusal::ImpossibleValue);
    }
    // raft treats term 0 as "local" and skips its term checks; only forwarded
    // proposals and read requests travel without a term (and raft asserts
    // they do when it forwards them again).
    let termless = matches!(kind, T::MsgPropose | T::MsgReadIndex);
    if termless != (m.term == 0) {
        return Err(MessageRefusal::ImpossibleValue);
    }
    if m.term > view.term.saturating_add(MAX_TERM_JUMP) {
        return Err(MessageRefusal::TermTooHigh);
    }
    if view.joining && !matches!(kind, T::MsgAppend | T::MsgHeartbeat | T::MsgSnapshot) {
        return Err(MessageRefusal::NotYetJoined);
    }
    // raft reads nothing but the type and sender of an older term's message
    // (it only answers, so a stale leader learns the new term).
    if !termless && m.term < view.term {
        return Ok(());
    }
    // Within one term there is one leader: leader-only messages at our term
    // from anyone else are forged (or a bug).
    let leader_kind = matches!(
        kind,
        T::MsgAppend | T::MsgHeartbeat | T::MsgSnapshot | T::MsgReadIndexResp
    );
    if leader_kind && m.term == view.term && view.leader_id != 0 && m.from != view.leader_id {
        return Err(MessageRefusal::NotFromLeader);
    }
    match kind {
        // A leader sends min(our match, its commit): never past our log.
        T::MsgHeartbeat if m.commit > view.last_index => return Err(MessageRefusal::CommitBeyondLog),
        T::MsgAppend => check_entries(m, view)?,
        T::MsgSnapshot => check_snapshot(m, view)?,
        // Starts an election that skips pre-vote and the leader lease: only
        // the current leader hands leadership over.
        T::MsgTimeoutNow if m.term != view.term || (view.leader_id != 0 && m.from != view.leader_id) => {
            return Err(MessageRefusal::NotFromLeader);
        }
        T::MsgReadIndexResp if m.term != view.term || m.from != view.leader_id => {
            return Err(MessageRefusal::NotFromLeader);
        }
        T::MsgReadIndexResp | T::MsgReadIndex if m.entries.len() != 1 => {
            // raft reads entries[0] as the request context.
            return Err(MessageRefusal::MalformedRequest);
        }
        // Followers forward clients' writes; never empty, never a membership
        // change (those only start on the leader itself).
        T::MsgPropose
            if m.entries.is_empty() || m.entries.iter().any(|e| e.get_entry_type() != EntryType::EntryNormal) =>
        {
            return Err(MessageRefusal::MalformedRequest);
        }
        T::MsgAppendResponse => {
            // A leader that applied its own removal has no progress of its
            // own, and raft unwraps it when counting acknowledgements.
            if view.is_leader && !view.tracks_itself {
                return Err(MessageRefusal::NotAPeerMessage);
            }
            if !m.reject && m.index > view.last_index {
                return Err(MessageRefusal::IndexBeyondLog);
            }
            // kvraft never asks for snapshots this way.
            if m.request_snapshot != 0 {
                return Err(MessageRefusal::MalformedRequest);
            }
        }
        // Winning asserts the log is durable; ours always is between rounds,
        // so a response that would find it otherwise is forged.
        T::MsgRequestVoteResponse | T::MsgRequestPreVoteResponse
            if view.is_candidate && view.persisted != view.last_index =>
        {
            return Err(MessageRefusal::NotAPeerMessage);
        }
        _ => {}
    }
    Ok(())
}

/// Entries of an append follow its index one by one, with terms that never
/// fall and never pass the message's term.
fn check_entries(m: &Message, view: &RaftView) -> Result<(), MessageRefusal> {
    // raft reads the term of an index past its log as 0, so a log_term of 0
    // would "match" anywhere; only index 0 really has term 0.
    if m.log_term > m.term || (m.log_term == 0) != (m.index == 0) {
        return Err(MessageRefusal::MalformedEntries);
    }
    // A leader's log holds our committed entries, so its term at any index
    // from our commit on is at least the committed entry's term; a lower one
    // would send raft's conflict search below the commit index.
    if m.index >= view.committed && m.log_term < view.committed_term {
        return Err(MessageRefusal::MalformedEntries);
    }
    let mut term = m.log_term;
    for (i, entry) in m.entries.iter().enumerate() {
        if entry.index != m.index + 1 + i as u64 || entry.term == 0 || entry.term < term || entry.term > m.term {
            return Err(MessageRefusal::MalformedEntries);
        }
        term = entry.term;
    }
    Ok(())
}

fn check_snapshot(m: &Message, view: &RaftView) -> Result<(), MessageRefusal> {
    let snapshot = m.get_snapshot();
    let meta = snapshot.get_metadata();
    if meta.index == 0 || meta.term == 0 || meta.term > m.term {
        return Err(MessageRefusal::MalformedSnapshot);
    }
    if !conf_state_is_simple(meta.get_conf_state()) {
        return Err(MessageRefusal::MalformedSnapshot);
    }
    match SnapshotDescriptor::decode(&snapshot.data[..]) {
        Ok(data) if view.cluster_id == 0 || data.cluster_id == view.cluster_id => Ok(()),
        _ => Err(MessageRefusal::MalformedSnapshot),
    }
}

/// A configuration kvraft can produce: some voters, learners apart from
/// them, and no joint state (membership changes are one node at a time).
fn conf_state_is_simple(cs: &ConfState) -> bool {
    !cs.voters.is_empty()
        && cs.voters_outgoing.is_empty()
        && cs.learners_next.is_empty()
        && !cs.auto_leave
        && !cs.voters.contains(&0)
        && !cs.learners.contains(&0)
        && cs.learners.iter().all(|l| !cs.voters.contains(l))
}

/// A peer (id or address) and a refusal reason.
type RefusalKey = (String, &'static str);

/// Logs each (peer, reason) once, then at most every `every`, with how many
/// were suppressed meanwhile: a hostile peer can't flood the log.
pub struct RefusalLog {
    what: &'static str,
    every: Duration,
    /// When each (peer, reason) was last logged, and how many since.
    seen: Mutex<HashMap<RefusalKey, (Option<Instant>, u64)>>,
}

impl RefusalLog {
    /// A log of `what` ("refused peer input", ...) that repeats a (peer,
    /// reason) at most every `every`.
    pub fn new(what: &'static str, every: Duration) -> Self {
        RefusalLog {
            what,
            every,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Logs a refusal of `peer` (an id or an address) for `reason`.
    pub fn refused(&self, peer: &str, reason: &'static str, detail: &str) {
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("refusal log lock poisoned");
        if seen.len() > 10_000 {
            // Many distinct strangers: forget the old ones rather than grow.
            seen.retain(|_, (at, _)| at.is_some_and(|at| now.duration_since(at) < self.every));
        }
        let entry = seen.entry((peer.to_string(), reason)).or_insert((None, 0));
        if entry.0.is_none_or(|at| now.duration_since(at) >= self.every) {
            warn!(peer, reason, suppressed = entry.1, "{}: {detail}", self.what);
            *entry = (Some(now), 0);
        } else {
            entry.1 += 1;
            debug!(peer, reason, "{}: {detail}", self.what);
        }
    }
}

#[cfg(test)]
mod tests;

//! The guard against real raft: an in-memory three-node cluster (raft-rs's
//! own `MemStorage`) whose every message passes the same checks as messages
//! from the network.
//!
//! - Correct traffic (elections, replication, a lagging follower caught up
//!   by snapshot, leadership transfer, forwarded proposals and reads) is never
//!   refused.
//! - The forged messages that killed or misled nodes are refused.
//! - Random and extreme messages from a member never reach a raft panic:
//!   every step (and the `Ready` handling after it) runs under
//!   `catch_unwind`, and any panic fails the test with the message that
//!   caused it.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};

use protobuf::Message as _;
use raft::prelude::{ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType, Snapshot};
use raft::storage::MemStorage;
use raft::{Config, RawNode, SnapshotStatus, StateRole};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

const IDS: [u64; 3] = [1, 2, 3];

fn config(id: u64) -> Config {
    Config {
        id,
        election_tick: 10,
        heartbeat_tick: 1,
        pre_vote: true,
        check_quorum: true,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        ..Default::default()
    }
}

fn view(node: &RawNode<MemStorage>) -> RaftView {
    let raft = &node.raft;
    let committed = raft.raft_log.committed;
    RaftView {
        term: raft.term,
        leader_id: raft.leader_id,
        is_leader: raft.state == StateRole::Leader,
        is_candidate: matches!(raft.state, StateRole::Candidate | StateRole::PreCandidate),
        tracks_itself: raft.prs().get(raft.id).is_some(),
        committed,
        committed_term: raft.raft_log.term(committed).unwrap_or(0),
        last_index: raft.raft_log.last_index(),
        persisted: raft.raft_log.persisted,
        joining: false,
        cluster_id: 0,
    }
}

/// The checks a message from a member's authenticated connection passes.
fn guard(node: &RawNode<MemStorage>, m: &Message) -> Result<(), MessageRefusal> {
    check_addressing(m, m.from, node.raft.id)?;
    check_against_state(m, &view(node))
}

struct Sim {
    nodes: BTreeMap<u64, RawNode<MemStorage>>,
    in_flight: VecDeque<Message>,
    cut: HashSet<u64>,
    refused: Vec<String>,
    /// Completed read-index rounds, by node.
    reads: Vec<(u64, raft::ReadState)>,
}

impl Sim {
    fn new() -> Sim {
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let nodes = IDS
            .iter()
            .map(|id| {
                let storage = MemStorage::new_with_conf_state(ConfState::from((IDS.to_vec(), vec![])));
                (*id, RawNode::new(&config(*id), storage, &logger).unwrap())
            })
            .collect();
        Sim {
            nodes,
            in_flight: VecDeque::new(),
            cut: HashSet::new(),
            refused: Vec::new(),
            reads: Vec::new(),
        }
    }

    fn node(&mut self, id: u64) -> &mut RawNode<MemStorage> {
        self.nodes.get_mut(&id).unwrap()
    }

    /// The leader among the nodes not cut off.
    fn leader(&self) -> Option<u64> {
        self.nodes
            .values()
            .find(|n| n.raft.state == StateRole::Leader && !self.cut.contains(&n.raft.id))
            .map(|n| n.raft.id)
    }

    /// Handles one node's Ready the way the raft loop does.
    fn process(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).unwrap();
        if !node.has_ready() {
            return;
        }
        let mut ready = node.ready();
        self.in_flight.extend(ready.take_messages());
        if !ready.snapshot().is_empty() {
            // MemStorage refuses a snapshot older than its own, which raft
            // may hand over after a forged (but panic-free) history; that is
            // this harness's storage, not the system under test.
            let _ = node.mut_store().wl().apply_snapshot(ready.snapshot().clone());
        }
        let committed = ready.take_committed_entries();
        apply(node, committed);
        node.mut_store().wl().append(ready.entries()).unwrap();
        if let Some(hs) = ready.hs() {
            node.mut_store().wl().set_hardstate(hs.clone());
        }
        self.in_flight.extend(ready.take_persisted_messages());
        self.reads.extend(ready.take_read_states().into_iter().map(|r| (id, r)));
        let mut light = node.advance(ready);
        if let Some(commit) = light.commit_index() {
            node.mut_store().wl().mut_hard_state().commit = commit;
        }
        self.in_flight.extend(light.take_messages());
        apply(node, light.take_committed_entries());
        node.advance_apply();
    }

    /// Delivers what is in flight through the guard, until the network is
    /// quiet (true) or 1000 rounds passed (false: forged leaders can make
    /// forwarded proposals bounce between nodes without end).
    fn settle(&mut self) -> bool {
        for _ in 0..1000 {
            for id in IDS {
                self.process(id);
            }
            if self.in_flight.is_empty() {
                return true;
            }
            while let Some(m) = self.in_flight.pop_front() {
                if self.cut.contains(&m.from) || self.cut.contains(&m.to) || !self.nodes.contains_key(&m.to) {
                    continue;
                }
                let to = m.to;
                let is_snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
                let from = m.from;
                let node = self.nodes.get_mut(&to).unwrap();
                match guard(node, &m) {
                    Ok(()) => {
                        let _ = node.step(m);
                        if is_snapshot {
                            // The transport reports a delivered snapshot.
                            self.node(from).report_snapshot(to, SnapshotStatus::Finish);
                        }
                    }
                    Err(refusal) => self.refused.push(format!("{refusal:?}: {m:?}")),
                }
            }
        }
        false
    }

    fn tick(&mut self, times: usize) {
        for _ in 0..times {
            for id in IDS {
                if !self.cut.contains(&id) {
                    self.node(id).tick();
                }
            }
            self.settle();
        }
    }

    fn propose(&mut self, on: u64, n: usize) {
        for i in 0..n {
            let _ = self.node(on).propose(vec![], format!("entry {i}").into_bytes());
            assert!(self.settle(), "a correct cluster settles");
        }
    }
}

fn apply(node: &mut RawNode<MemStorage>, entries: Vec<Entry>) {
    for entry in entries {
        if entry.get_entry_type() == EntryType::EntryConfChangeV2 && !entry.data.is_empty() {
            if let Ok(cc) = ConfChangeV2::parse_from_bytes(&entry.data) {
                if let Ok(cs) = node.apply_conf_change(&cc) {
                    node.mut_store().wl().set_conf_state(cs);
                }
            }
        }
    }
}

/// A running cluster with a leader and some history.
fn running_cluster() -> Sim {
    let mut sim = Sim::new();
    sim.node(1).campaign().unwrap();
    assert!(sim.settle());
    assert_eq!(sim.leader(), Some(1));
    sim.propose(1, 20);
    sim
}

#[test]
fn correct_traffic_is_never_refused() {
    let mut sim = running_cluster();

    // Node 3 falls behind; the leader compacts; node 3 catches up by snapshot.
    sim.cut.insert(3);
    sim.propose(1, 50);
    let applied = sim.node(1).raft.raft_log.applied;
    sim.node(1).mut_store().wl().compact(applied - 5).unwrap();
    sim.cut.clear();
    sim.tick(3);
    let leader_commit = sim.node(1).raft.raft_log.committed;
    assert_eq!(sim.node(3).raft.raft_log.committed, leader_commit);
    use raft::Storage as _;
    assert!(
        sim.node(3).store().first_index().unwrap() > 1,
        "node 3 caught up by snapshot"
    );

    // Leadership moves by transfer (MsgTimeoutNow).
    sim.node(1).transfer_leader(2);
    assert!(sim.settle());
    assert_eq!(sim.leader(), Some(2));

    // Followers forward proposals and read-index requests.
    sim.propose(3, 5);
    sim.node(1).read_index(b"ctx".to_vec());
    assert!(sim.settle());
    assert_eq!(sim.reads.len(), 1);
    assert_eq!((sim.reads[0].0, &sim.reads[0].1.request_ctx[..]), (1, &b"ctx"[..]));

    // The leader is cut off: the others elect a new one; it rejoins and follows.
    sim.cut.insert(2);
    for _ in 0..500 {
        sim.tick(1);
        if sim.leader().is_some() {
            break;
        }
    }
    let new_leader = sim.leader().expect("a new leader among nodes 1 and 3");
    sim.propose(new_leader, 5);
    sim.cut.clear();
    sim.tick(5);
    assert_eq!(sim.node(2).raft.leader_id, new_leader);
    let commits: Vec<u64> = IDS.iter().map(|id| sim.node(*id).raft.raft_log.committed).collect();
    assert!(commits.iter().all(|c| *c == commits[0]), "{commits:?}");

    assert!(
        sim.refused.is_empty(),
        "correct messages refused:\n{}",
        sim.refused.join("\n")
    );
}

fn message(kind: MessageType, from: u64, to: u64, term: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(kind);
    m.from = from;
    m.to = to;
    m.term = term;
    m
}

#[test]
fn the_forged_messages_from_the_report_are_refused() {
    let mut sim = running_cluster();
    let term = sim.node(2).raft.term;
    let last = sim.node(2).raft.raft_log.last_index();

    let max_term = message(MessageType::MsgHeartbeat, 1, 2, u64::MAX);
    assert_eq!(guard(sim.node(2), &max_term), Err(MessageRefusal::ImpossibleValue));
    let far_term = message(MessageType::MsgHeartbeat, 1, 2, term + MAX_TERM_JUMP + 1);
    assert_eq!(guard(sim.node(2), &far_term), Err(MessageRefusal::TermTooHigh));

    let mut commit = message(MessageType::MsgHeartbeat, 1, 2, term);
    commit.commit = 1_000_000_000;
    assert_eq!(guard(sim.node(2), &commit), Err(MessageRefusal::CommitBeyondLog));

    // Claiming to lead at our term when we follow someone else.
    let mut append = message(MessageType::MsgAppend, 3, 2, term);
    append.index = last;
    append.log_term = term;
    append.commit = last + 1;
    let mut entry = Entry::default();
    entry.index = last + 1;
    entry.term = term;
    entry.data = b"set injected=evil".to_vec().into();
    append.entries = vec![entry].into();
    assert_eq!(guard(sim.node(2), &append), Err(MessageRefusal::NotFromLeader));

    // Entries that don't follow the message's index.
    let mut gap = append.clone();
    gap.from = 1;
    gap.entries[0].index = last + 5;
    assert_eq!(guard(sim.node(2), &gap), Err(MessageRefusal::MalformedEntries));

    // Local-only messages, and messages for someone else.
    let hup = message(MessageType::MsgHup, 1, 2, 0);
    assert_eq!(guard(sim.node(2), &hup), Err(MessageRefusal::NotAPeerMessage));
    let other = message(MessageType::MsgHeartbeat, 1, 3, term);
    assert_eq!(guard(sim.node(2), &other), Err(MessageRefusal::WrongRecipient));
    let from_me = message(MessageType::MsgHeartbeat, 2, 2, term);
    assert_eq!(check_addressing(&from_me, 2, 2), Err(MessageRefusal::SenderMismatch));
    let claims_another = message(MessageType::MsgHeartbeat, 1, 2, term);
    assert_eq!(
        check_addressing(&claims_another, 3, 2),
        Err(MessageRefusal::SenderMismatch)
    );
    // Forwarded proposals keep their originator, even through a second hop.
    let mut forwarded = message(MessageType::MsgPropose, 3, 2, 0);
    forwarded.entries = vec![Entry::default()].into();
    assert_eq!(check_addressing(&forwarded, 1, 2), Ok(()));

    // An empty proposal ("stepped empty MsgProp") and a membership change.
    let empty = message(MessageType::MsgPropose, 2, 1, 0);
    assert_eq!(guard(sim.node(1), &empty), Err(MessageRefusal::MalformedRequest));
    let mut conf = message(MessageType::MsgPropose, 2, 1, 0);
    let mut cc = Entry::default();
    cc.set_entry_type(EntryType::EntryConfChangeV2);
    conf.entries = vec![cc].into();
    assert_eq!(guard(sim.node(1), &conf), Err(MessageRefusal::MalformedRequest));

    // A snapshot with an impossible configuration.
    let mut snap = message(MessageType::MsgSnapshot, 1, 2, term);
    let mut snapshot = Snapshot::default();
    snapshot.mut_metadata().index = last + 10;
    snapshot.mut_metadata().term = term;
    snapshot
        .mut_metadata()
        .set_conf_state(ConfState::from((vec![1, 2], vec![2])));
    snap.set_snapshot(snapshot);
    assert_eq!(guard(sim.node(2), &snap), Err(MessageRefusal::MalformedSnapshot));

    // None of it moved anything.
    assert_eq!(sim.node(2).raft.term, term);
    assert_eq!(sim.node(2).raft.leader_id, 1);
}

#[test]
fn sender_checks_follow_certificates_then_addresses() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let member = SenderStanding {
        is_member: true,
        joining: false,
        member_ips: vec![ip("10.0.0.2")],
    };
    let plain = |from: &str| PeerConnection {
        remote_ip: ip(from),
        certified_node: None,
        tls: false,
    };
    assert_eq!(check_sender(2, &plain("10.0.0.2"), &member), Ok(()));
    assert_eq!(
        check_sender(2, &plain("10.0.0.9"), &member),
        Err(ConnectionRefusal::AddressMismatch)
    );
    let stranger = SenderStanding::default();
    assert_eq!(
        check_sender(99, &plain("10.0.0.2"), &stranger),
        Err(ConnectionRefusal::NotMember)
    );
    let joining = SenderStanding {
        joining: true,
        ..Default::default()
    };
    assert_eq!(check_sender(1, &plain("10.0.0.9"), &joining), Ok(()));

    let certified = |node: u64| PeerConnection {
        remote_ip: ip("10.0.0.9"),
        certified_node: Some(node),
        tls: true,
    };
    // With TLS the address doesn't matter, the certificate does.
    assert_eq!(check_sender(2, &certified(2), &member), Ok(()));
    // A valid certificate for a node that is not a member gets no further.
    assert_eq!(
        check_sender(99, &certified(99), &stranger),
        Err(ConnectionRefusal::NotMember)
    );
    assert_eq!(
        check_sender(2, &certified(3), &member),
        Err(ConnectionRefusal::CertificateMismatch)
    );
    assert_eq!(
        check_sender(1, &certified(3), &joining),
        Err(ConnectionRefusal::CertificateMismatch)
    );
    assert_eq!(
        canonical(ip("::ffff:10.0.0.2")),
        ip("10.0.0.2"),
        "IPv4-mapped addresses compare as IPv4"
    );
}

fn pick(rng: &mut StdRng, options: &[u64]) -> u64 {
    options[rng.random_range(0..options.len())]
}

/// A message from a member that may be anything a hostile peer could send.
fn random_message(rng: &mut StdRng, to: u64, node: &RawNode<MemStorage>) -> Message {
    const KINDS: [MessageType; 19] = [
        MessageType::MsgHup,
        MessageType::MsgBeat,
        MessageType::MsgPropose,
        MessageType::MsgAppend,
        MessageType::MsgAppendResponse,
        MessageType::MsgRequestVote,
        MessageType::MsgRequestVoteResponse,
        MessageType::MsgSnapshot,
        MessageType::MsgHeartbeat,
        MessageType::MsgHeartbeatResponse,
        MessageType::MsgUnreachable,
        MessageType::MsgSnapStatus,
        MessageType::MsgCheckQuorum,
        MessageType::MsgTransferLeader,
        MessageType::MsgTimeoutNow,
        MessageType::MsgReadIndex,
        MessageType::MsgReadIndexResp,
        MessageType::MsgRequestPreVote,
        MessageType::MsgRequestPreVoteResponse,
    ];
    let raft = &node.raft;
    let (term, last, committed) = (raft.term, raft.raft_log.last_index(), raft.raft_log.committed);
    let first = raft.raft_log.first_index();
    let terms = [
        0,
        1,
        term.saturating_sub(1),
        term,
        term,
        term + 1,
        term + 2,
        term + MAX_TERM_JUMP,
        term + MAX_TERM_JUMP + 1,
        MAX_SANE_VALUE - 1,
        u64::MAX,
        rng.random::<u16>() as u64,
    ];
    let indexes = [
        0,
        1,
        first.saturating_sub(1),
        first,
        committed.saturating_sub(1),
        committed,
        committed + 1,
        last.saturating_sub(1),
        last,
        last + 1,
        last + 1000,
        MAX_SANE_VALUE - 1,
        u64::MAX,
        rng.random::<u16>() as u64,
    ];
    let mut m = Message::default();
    m.set_msg_type(KINDS[rng.random_range(0..KINDS.len())]);
    m.from = pick(rng, &[1, 2, 3]);
    m.to = to;
    m.term = pick(rng, &terms);
    m.log_term = pick(rng, &terms);
    m.index = pick(rng, &indexes);
    m.commit = pick(rng, &indexes);
    m.commit_term = pick(rng, &terms);
    m.reject = rng.random_bool(0.3);
    m.reject_hint = pick(rng, &indexes);
    m.request_snapshot = if rng.random_bool(0.8) { 0 } else { pick(rng, &indexes) };
    m.priority = rng.random_range(-2..3);
    if rng.random_bool(0.3) {
        m.context = vec![rng.random(); rng.random_range(0..8)].into();
    }
    let contiguous = rng.random_bool(0.6);
    let mut entry_term = m.log_term;
    for i in 0..rng.random_range(0..4u64) {
        let mut e = Entry::default();
        if contiguous {
            e.index = m.index.wrapping_add(1 + i);
            entry_term = if rng.random_bool(0.7) {
                entry_term
            } else {
                pick(rng, &terms)
            };
            e.term = entry_term;
        } else {
            e.index = pick(rng, &indexes);
            e.term = pick(rng, &terms);
        }
        match rng.random_range(0..4) {
            0 => e.set_entry_type(EntryType::EntryConfChange),
            1 => {
                e.set_entry_type(EntryType::EntryConfChangeV2);
                if rng.random_bool(0.5) {
                    e.data = random_conf_change(rng).write_to_bytes().unwrap().into();
                }
            }
            _ => {}
        }
        if e.data.is_empty() && rng.random_bool(0.5) {
            e.data = vec![rng.random(); rng.random_range(1..16)].into();
        }
        m.entries.push(e);
    }
    if m.get_msg_type() == MessageType::MsgSnapshot || rng.random_bool(0.05) {
        let mut snapshot = Snapshot::default();
        let meta = snapshot.mut_metadata();
        meta.index = pick(rng, &indexes);
        meta.term = pick(rng, &terms);
        let ids = [0u64, 1, 2, 3, 4, 99];
        let some = |rng: &mut StdRng| -> Vec<u64> { ids.iter().copied().filter(|_| rng.random_bool(0.4)).collect() };
        let mut cs = ConfState::from((some(rng), some(rng)));
        if rng.random_bool(0.2) {
            cs.voters_outgoing = some(rng);
            cs.auto_leave = rng.random_bool(0.5);
        }
        if rng.random_bool(0.7) {
            cs = ConfState::from((IDS.to_vec(), vec![]));
        }
        meta.set_conf_state(cs);
        if rng.random_bool(0.5) {
            snapshot.data = vec![rng.random(); rng.random_range(1..32)].into();
        }
        m.set_snapshot(snapshot);
    }
    m
}

fn random_conf_change(rng: &mut StdRng) -> ConfChangeV2 {
    use raft::prelude::{ConfChangeSingle, ConfChangeType};
    let mut cc = ConfChangeV2::default();
    let mut single = ConfChangeSingle::default();
    single.set_change_type(match rng.random_range(0..3) {
        0 => ConfChangeType::AddNode,
        1 => ConfChangeType::RemoveNode,
        _ => ConfChangeType::AddLearnerNode,
    });
    single.node_id = pick(rng, &[0, 1, 2, 3, 4]);
    cc.set_changes(vec![single].into());
    cc
}

#[test]
fn random_and_extreme_messages_from_members_never_panic_raft() {
    // Panics are caught and reported below; keep the default hook quiet.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    let mut accepted = 0usize;
    // KVRAFT_FUZZ_SEEDS=5000 for a deeper run; CI runs the default.
    let seeds: u64 = std::env::var("KVRAFT_FUZZ_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(48);
    for seed in 0..seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut sim = running_cluster();
        for round in 0..400 {
            let to = IDS[rng.random_range(0..IDS.len())];
            let m = random_message(&mut rng, to, sim.node(to));
            if m.from == to {
                // A connection claiming to be this node is refused first.
                assert!(check_addressing(&m, to, to).is_err());
                continue;
            }
            if guard(sim.node(to), &m).is_err() {
                continue;
            }
            accepted += 1;
            let shown = format!("{m:?}");
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                let _ = sim.node(to).step(m);
                if round % 7 == 0 {
                    sim.tick(1);
                } else {
                    let _ = sim.settle();
                }
            }));
            if let Err(panic) = outcome {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("seed {seed} round {round}: {what}\n  after stepping {shown}"));
                break;
            }
        }
    }
    std::panic::set_hook(hook);
    assert!(
        failures.is_empty(),
        "raft panicked on guarded input:\n{}",
        failures.join("\n")
    );
    assert!(
        accepted > 1000,
        "the fuzzer should get many messages past the guard ({accepted})"
    );
}

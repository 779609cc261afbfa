//! An in-process cluster: several kvraft nodes in one test process, each with
//! its raft loop on its own thread and real storage in a temp dir, joined by
//! an in-memory network instead of TCP. Links can be cut (one way or both),
//! delayed and healed from the test, without network namespaces.
//!
//! What crosses a link is exactly what the TCP transport delivers: an
//! `Inbox::Raft` with the sender's id, advertised address and cluster id, so
//! the raft loop's own checks (the peer guard's rules on the live raft state)
//! run on every message. A snapshot message's state is streamed the same
//! way as over TCP (frames from the sender's pinned view into the receiver's
//! stager) before the message is delivered.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvraft::config::NodeConfig;
use kvraft::node::transport::{LocalPeer, Transport, TransportContext, TransportFactory};
use kvraft::node::{Error, Inbox, NodeHandle};
use kvraft::proto::{command, Command, DeleteRequest, SetRequest};
use kvraft::storage::snapshot_stream::{SnapshotFrames, SnapshotStager};
use kvraft::storage::{StateStore, StorageError};
use raft::prelude::{Message, MessageType};

/// The links between nodes: who can reach whom, and how late.
#[derive(Default)]
pub struct Network {
    state: Mutex<NetState>,
}

#[derive(Default)]
struct NetState {
    /// Who listens at each peer address, and their inbox.
    inboxes: HashMap<String, (u64, kvraft::node::InboxSender, Arc<StateStore>)>,
    /// (from, to) pairs whose messages are lost.
    cut: HashSet<(u64, u64)>,
    /// (from, to) pairs whose messages arrive this much later.
    delay: HashMap<(u64, u64), Duration>,
    /// Messages delivered, per (from, to): lets a test see traffic flow.
    delivered: HashMap<(u64, u64), u64>,
}

impl Network {
    /// Loses every message from `from` to `to` (one way).
    pub fn cut(&self, from: u64, to: u64) {
        self.state.lock().unwrap().cut.insert((from, to));
    }

    /// Cuts every link between the two sides, both ways.
    pub fn partition(&self, side_a: &[u64], side_b: &[u64]) {
        let mut state = self.state.lock().unwrap();
        for &a in side_a {
            for &b in side_b {
                state.cut.insert((a, b));
                state.cut.insert((b, a));
            }
        }
    }

    /// Delays every message from `from` to `to`.
    pub fn delay(&self, from: u64, to: u64, by: Duration) {
        self.state.lock().unwrap().delay.insert((from, to), by);
    }

    /// Restores every link: no cuts, no delays.
    pub fn heal(&self) {
        let mut state = self.state.lock().unwrap();
        state.cut.clear();
        state.delay.clear();
    }

    /// Messages delivered so far from `from` to `to`.
    pub fn delivered(&self, from: u64, to: u64) -> u64 {
        self.state
            .lock()
            .unwrap()
            .delivered
            .get(&(from, to))
            .copied()
            .unwrap_or(0)
    }
}

/// One node's outbound side on the in-memory network.
struct MemTransport {
    net: Arc<Network>,
    local: LocalPeer,
    cluster_id: u64,
    reports: kvraft::node::ControlSender,
    runtime: tokio::runtime::Handle,
    store: Arc<StateStore>,
}

impl Network {
    /// Delivers `envelope` from `from` to the node listening at `addr`, if
    /// the link is up at this moment; counts it when it arrives.
    fn deliver(&self, from: u64, addr: &str, envelope: Inbox) -> bool {
        if let Inbox::Raft { message, .. } = &envelope {
            if message.get_msg_type() == MessageType::MsgSnapshot && !self.stream_snapshot(from, addr, message) {
                return false;
            }
        }
        let mut state = self.state.lock().unwrap();
        let Some((to, inbox, _)) = state.inboxes.get(addr).cloned() else {
            return false;
        };
        if state.cut.contains(&(from, to)) || inbox.try_send(envelope).is_err() {
            return false;
        }
        *state.delivered.entry((from, to)).or_default() += 1;
        true
    }
}

impl Network {
    /// Streams the state of snapshot `message` from `from`'s pinned view
    /// into the stager of the node at `addr`, frame by frame (each frame
    /// lost if the link is cut meanwhile). True once it is staged.
    fn stream_snapshot(&self, from: u64, addr: &str, message: &Message) -> bool {
        let (to, sender_store, receiver_store) = {
            let state = self.state.lock().unwrap();
            let Some((to, _, receiver)) = state.inboxes.get(addr).cloned() else {
                return false;
            };
            let sender = state
                .inboxes
                .values()
                .find(|(id, _, _)| *id == from)
                .map(|v| v.2.clone());
            let Some(sender) = sender else { return false };
            (to, sender, receiver)
        };
        let index = message.get_snapshot().get_metadata().index;
        let Some(view) = sender_store.take_pinned(to, index) else {
            return false;
        };
        let Ok(frames) = SnapshotFrames::new(view, from) else {
            return false;
        };
        let mut stager = SnapshotStager::new(&receiver_store.incoming_dir(), 0);
        for frame in frames {
            let Ok(frame) = frame else { return false };
            if self.state.lock().unwrap().cut.contains(&(from, to)) {
                return false;
            }
            match stager.push(&frame, |h| receiver_store.staged_path(h.index, h.term)) {
                Ok(Some(_)) => return true,
                Ok(None) => {}
                Err(_) => return false,
            }
        }
        false
    }
}

impl Transport for MemTransport {
    /// Like the TCP transport: no address, or nobody at it, is a send that
    /// could not be queued; a message on a cut link is lost on the way, and
    /// every snapshot message is reported, delivered or not.
    fn send(&mut self, message: Message, addr: Option<&str>) -> bool {
        let Some(addr) = addr.map(str::to_string) else {
            return false;
        };
        let (from, to) = (self.local.id, message.to);
        let (known, delay) = {
            let state = self.net.state.lock().unwrap();
            (state.inboxes.contains_key(&addr), state.delay.get(&(from, to)).copied())
        };
        if !known {
            return false;
        }
        let snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
        let reports = self.reports.clone();
        let report = move |ok: bool| {
            if snapshot {
                let _ = reports.send(Inbox::SnapshotSent { to, ok });
            }
        };
        let envelope = Inbox::Raft {
            message: Box::new(message),
            sender: from,
            from_peer_addr: self.local.peer_addr.clone(),
            cluster_id: self.cluster_id,
            certified: false,
        };
        let net = self.net.clone();
        match delay {
            // The link is checked when the message arrives: a partition that
            // starts while it is on the way loses it.
            Some(delay) => {
                self.runtime.spawn(async move {
                    tokio::time::sleep(delay).await;
                    if snapshot {
                        let _ = tokio::task::spawn_blocking(move || report(net.deliver(from, &addr, envelope))).await;
                    } else {
                        report(net.deliver(from, &addr, envelope));
                    }
                });
            }
            // A snapshot streams (it builds a store): off the raft thread, as over TCP.
            None if snapshot => {
                self.runtime
                    .spawn_blocking(move || report(net.deliver(from, &addr, envelope)));
            }
            None => report(net.deliver(from, &addr, envelope)),
        }
        true
    }

    fn forget(&mut self, _id: u64) {}

    fn set_cluster_id(&mut self, cluster_id: u64) {
        self.cluster_id = cluster_id;
    }
}

/// A running node of the in-process cluster.
pub struct MemNode {
    /// How the test talks to it, as the server would.
    pub handle: NodeHandle,
    thread: Option<std::thread::JoinHandle<Result<(), StorageError>>>,
}

/// Nodes 1..=n forming one cluster over a [`Network`].
pub struct MemCluster {
    /// The links, for the test to cut, delay and heal.
    pub net: Arc<Network>,
    nodes: BTreeMap<u64, MemNode>,
    _dir: tempfile::TempDir,
}

/// Fast timing, as the process tests use: 25 ms ticks, a 500 ms election
/// timeout, 50 ms heartbeats.
fn config(dir: &std::path::Path, id: u64, members: &str) -> NodeConfig {
    NodeConfig {
        id,
        data_dir: dir.join(format!("node{id}")),
        initial_cluster: Some(members.to_string()),
        tick_ms: 25,
        election_ticks: 20,
        heartbeat_ticks: 2,
        request_timeout_ms: 2000,
        ..NodeConfig::default()
    }
}

fn peer_addr(id: u64) -> String {
    format!("mem{id}:7380")
}

impl MemCluster {
    /// Starts nodes 1..=n from a static initial cluster. Call from within a
    /// multi-threaded tokio runtime (delayed deliveries run on it).
    pub fn start(n: u64) -> Self {
        Self::start_with(n, |_| {})
    }

    /// As [`MemCluster::start`], with `adjust` applied to each node's config.
    pub fn start_with(n: u64, adjust: impl Fn(&mut NodeConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let net = Arc::new(Network::default());
        let members: Vec<String> = (1..=n).map(|id| format!("{id}={}", peer_addr(id))).collect();
        let members = members.join(",");
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            let runtime = tokio::runtime::Handle::current();
            let transport_net = net.clone();
            let transport: TransportFactory = Box::new(move |context: TransportContext| {
                Box::new(MemTransport {
                    net: transport_net,
                    local: context.local,
                    cluster_id: context.cluster_id,
                    reports: context.reports,
                    runtime,
                    store: context.store,
                }) as Box<dyn Transport>
            });
            let mut node_config = config(dir.path(), id, &members);
            adjust(&mut node_config);
            let prepared =
                kvraft::node::startup::prepare(&node_config, format!("mem{id}:7379"), peer_addr(id), transport)
                    .unwrap_or_else(|e| panic!("node {id} did not start: {e}"));
            net.state
                .lock()
                .unwrap()
                .inboxes
                .insert(peer_addr(id), (id, prepared.inbox.clone(), prepared.handle.store()));
            let thread = kvraft::node::spawn(prepared.raft_loop, id, prepared.lock).unwrap();
            nodes.insert(
                id,
                MemNode {
                    handle: prepared.handle,
                    thread: Some(thread),
                },
            );
        }
        MemCluster { net, nodes, _dir: dir }
    }

    /// Node `id`'s handle.
    pub fn handle(&self, id: u64) -> &NodeHandle {
        &self.nodes[&id].handle
    }

    /// Waits until every node in `among` names the same leader, itself one of
    /// `among`; returns it.
    pub async fn wait_for_leader(&self, among: &[u64], within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let leaders: Vec<u64> = among.iter().map(|id| self.handle(*id).status().leader_id).collect();
            let leader = leaders[0];
            if leader != 0 && among.contains(&leader) && leaders.iter().all(|l| *l == leader) {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "no common leader among {among:?}: {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `check` holds, or fails with `what`.
    pub async fn wait_until(&self, within: Duration, what: &str, mut check: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + within;
        while !check(self) {
            assert!(Instant::now() < deadline, "not within {within:?}: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A write through node `id`, as the server would propose it.
    pub async fn put(&self, id: u64, key: &str, value: &str) -> Result<(), Error> {
        let command = Command {
            op: Some(command::Op::Set(SetRequest {
                key: key.as_bytes().to_vec(),
                value: value.as_bytes().to_vec(),
                lease: 0,
            })),
            ..Default::default()
        };
        self.handle(id).propose(command).await.map(|_| ())
    }

    /// A delete through node `id`.
    pub async fn delete(&self, id: u64, key: &str) -> Result<(), Error> {
        let command = Command {
            op: Some(command::Op::Delete(DeleteRequest {
                key: key.as_bytes().to_vec(),
                range: None,
            })),
            ..Default::default()
        };
        self.handle(id).propose(command).await.map(|_| ())
    }

    /// A linearizable read through node `id`: a read-index round, then the
    /// local state machine.
    pub async fn get(&self, id: u64, key: &str) -> Result<Option<String>, Error> {
        self.handle(id).linearizable_barrier().await?;
        Ok(self.local_get(id, key))
    }

    /// What node `id` has applied for `key`, without asking anyone.
    pub fn local_get(&self, id: u64, key: &str) -> Option<String> {
        self.handle(id)
            .read(|sm| sm.get(key.as_bytes()).unwrap())
            .map(|v| String::from_utf8(v).unwrap())
    }

    /// Stops node `id` gracefully (within 2 s) and waits for its thread.
    pub fn stop(&mut self, id: u64) {
        if let Some(node) = self.nodes.get_mut(&id) {
            node.handle.request_shutdown(Instant::now() + Duration::from_secs(2));
            if let Some(thread) = node.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for MemCluster {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.stop(id);
        }
    }
}

//! The node's status, as `info`, systemd's STATUS= and the gauges show it.
//! The raft loop offers it every round; it is published only when something
//! changed, so an idle loop takes no state machine lock for it, and the
//! gauges are handles registered once (no registry lookup per round).

use metrics::{gauge, Gauge};
use raft::StateRole;
use std::sync::RwLock;
use tokio::sync::watch;

use super::{NodeStatus, Role};
use crate::metrics as names;
use crate::state_machine::StateMachine;

/// What raft and the loop know without the state machine. If none of it
/// changed, nothing the status shows did either: the state machine (keys,
/// members, the leader's address) changes only as the applied index moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftView {
    /// raft's role.
    pub state: StateRole,
    /// Current term.
    pub term: u64,
    /// The leader (0: none known).
    pub leader_id: u64,
    /// Commit index.
    pub committed: u64,
    /// Applied index, as the loop last published it.
    pub applied: u64,
    /// First log index.
    pub first_index: u64,
    /// Last log index.
    pub last_index: u64,
    /// Newest snapshot on disk.
    pub snapshot_index: u64,
    /// Proposals waiting on this node.
    pub pending: usize,
    /// This node was removed.
    pub removed: bool,
    /// A graceful shutdown has begun.
    pub stopping: bool,
    /// The cluster id.
    pub cluster_id: u64,
}

struct Gauges {
    term: Gauge,
    is_leader: Gauge,
    has_leader: Gauge,
    commit: Gauge,
    applied: Gauge,
    first: Gauge,
    last: Gauge,
    pending: Gauge,
    keys: Gauge,
    voters: Gauge,
    learners: Gauge,
}

/// Publishes the status to the node's handles and the gauges.
pub struct StatusPublisher {
    id: u64,
    tx: watch::Sender<NodeStatus>,
    gauges: Gauges,
    last: Option<RaftView>,
}

impl StatusPublisher {
    /// Registers the gauges; `tx` feeds [`super::NodeHandle::status`].
    pub fn new(id: u64, tx: watch::Sender<NodeStatus>) -> Self {
        StatusPublisher {
            id,
            tx,
            gauges: Gauges {
                term: gauge!(names::TERM),
                is_leader: gauge!(names::IS_LEADER),
                has_leader: gauge!(names::HAS_LEADER),
                commit: gauge!(names::COMMIT_INDEX),
                applied: gauge!(names::APPLIED_INDEX),
                first: gauge!(names::LOG_FIRST_INDEX),
                last: gauge!(names::LOG_LAST_INDEX),
                pending: gauge!(names::PROPOSALS_PENDING),
                keys: gauge!(names::KEYS),
                voters: gauge!(names::MEMBERS, "role" => "voter"),
                learners: gauge!(names::MEMBERS, "role" => "learner"),
            },
            last: None,
        }
    }

    /// Publishes the status if `view` differs from the last one published.
    /// Returns whether it did.
    pub fn offer(&mut self, view: RaftView, state_machine: &RwLock<StateMachine>) -> bool {
        if self.last == Some(view) {
            return false;
        }
        self.last = Some(view);
        let sm = state_machine.read().expect("state machine lock poisoned");
        let conf = sm.conf_state();
        let role = match view.state {
            StateRole::Leader => Role::Leader,
            StateRole::Candidate | StateRole::PreCandidate => Role::Candidate,
            StateRole::Follower if conf.learners.contains(&self.id) => Role::Learner,
            StateRole::Follower => Role::Follower,
        };
        let g = &self.gauges;
        g.term.set(view.term as f64);
        g.is_leader.set(f64::from(u8::from(role == Role::Leader)));
        g.has_leader.set(f64::from(u8::from(view.leader_id != 0)));
        g.commit.set(view.committed as f64);
        g.applied.set(sm.applied_index() as f64);
        g.first.set(view.first_index as f64);
        g.last.set(view.last_index as f64);
        g.pending.set(view.pending as f64);
        g.keys.set(sm.store().len_as_flushed() as f64);
        g.voters.set(conf.voters.len() as f64);
        g.learners.set(conf.learners.len() as f64);
        let status = NodeStatus {
            id: self.id,
            cluster_id: view.cluster_id,
            role,
            term: view.term,
            leader_id: view.leader_id,
            leader_client_addr: sm
                .member(view.leader_id)
                .map(|m| m.client_addr.clone())
                .unwrap_or_default(),
            commit_index: view.committed,
            applied_index: sm.applied_index(),
            snapshot_index: view.snapshot_index,
            first_index: view.first_index,
            last_index: view.last_index,
            removed: view.removed,
            removed_ids: sm.removed_ids(),
            stopping: view.stopping,
            stopped: false,
        };
        self.tx.send_if_modified(|s| {
            let changed = *s != status;
            if changed {
                *s = status;
            }
            changed
        });
        true
    }

    /// Marks the node removed at once (before the loop exits).
    pub fn removed(&self) {
        self.tx.send_modify(|s| s.removed = true);
    }

    /// Marks the status stopped (the loop has exited).
    pub fn stopped(&self) {
        self.tx.send_modify(|s| s.stopped = true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> RaftView {
        RaftView {
            state: StateRole::Leader,
            term: 3,
            leader_id: 1,
            committed: 10,
            applied: 10,
            first_index: 1,
            last_index: 10,
            snapshot_index: 0,
            pending: 0,
            removed: false,
            stopping: false,
            cluster_id: 7,
        }
    }

    #[test]
    fn the_status_is_published_when_the_view_changes_and_only_then() {
        let (tx, rx) = watch::channel(NodeStatus::default());
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(crate::storage::StateStore::open(dir.path(), 1 << 20).unwrap());
        let sm = RwLock::new(StateMachine::open(store).unwrap());
        let mut publisher = StatusPublisher::new(1, tx);
        assert!(publisher.offer(view(), &sm));
        assert_eq!(
            (rx.borrow().role, rx.borrow().term, rx.borrow().leader_id),
            (Role::Leader, 3, 1)
        );
        // Unchanged: not even the state machine lock is taken.
        let write = sm.write().unwrap();
        assert!(!publisher.offer(view(), &sm));
        drop(write);
        let next = RaftView {
            term: 4,
            state: StateRole::Follower,
            leader_id: 2,
            ..view()
        };
        assert!(publisher.offer(next, &sm));
        assert_eq!(
            (rx.borrow().role, rx.borrow().term, rx.borrow().leader_id),
            (Role::Follower, 4, 2)
        );
    }
}

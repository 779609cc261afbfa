//! The raft loop's part in leases: it times them while it leads (through
//! its [`Lessor`](crate::node::lessor::Lessor)), answers the questions only
//! the leader can, and proposes the end of each lease that runs out.

use std::time::Instant;

use prost::Message as _;
use raft::StateRole;
use tokio::sync::oneshot;
use tracing::{debug, info};

use super::RaftLoop;
use crate::metrics;
use crate::node::{Error, LeaseAnswer, LeaseQuery};
use crate::proto::{command, Command, LeaseExpire};
use crate::state_machine::LeaseEvent;

/// At most this many expiries are proposed per tick (etcd revokes at most
/// 1000 a second), so a mass expiry can't flood the log.
const EXPIRIES_PER_TICK: usize = 64;
/// Keys a time-to-live answer lists, in bytes (the rest are counted).
const KEYS_LISTED_BYTES: usize = 1 << 20;

impl RaftLoop {
    /// Starts or stops timing leases as this node gains or loses the lead.
    pub(super) fn follow_role(&mut self, role: StateRole) {
        let leading = role == StateRole::Leader;
        if leading == self.lessor.is_leading() {
            return;
        }
        if leading {
            let leases: Vec<(u64, u64)> = self.store.working_leases().iter().map(|(id, l)| (id, l.ttl)).collect();
            info!(
                leases = leases.len(),
                "leading: every lease gets its full time to live from now"
            );
            // raft appended this term's first (empty) entry on becoming leader.
            let term_start = self.node.raft.raft_log.last_index();
            self.lessor.promote(leases, term_start, Instant::now());
        } else {
            self.lessor.demote();
        }
    }

    /// Follows the leases a batch granted and ended.
    pub(super) fn leases_applied(&mut self, events: &[LeaseEvent]) {
        if !events.is_empty() {
            self.lessor.applied(events, Instant::now());
            self.publish_lease_count();
        }
    }

    /// Sets the `kvraft_leases` gauge (at start, after an install, and when
    /// a batch changed the leases).
    pub(super) fn publish_lease_count(&self) {
        ::metrics::gauge!(metrics::LEASES).set(self.store.working_leases().len() as f64);
    }

    /// Proposes the end of leases that ran out (leader only).
    pub(super) fn expire_leases(&mut self, now: Instant) {
        // Raft's own state, not the lessor's (demoted only at the next
        // Ready): a node that just stepped down would forward its expiry to
        // the new leader, which may have renewed the lease.
        if self.node.raft.state != StateRole::Leader || !self.lessor.is_leading() || self.shutdown.is_some() {
            return;
        }
        let term = self.node.raft.term;
        for id in self.lessor.due(now, EXPIRIES_PER_TICK) {
            let command = Command {
                op: Some(command::Op::LeaseExpire(LeaseExpire { id, term })),
                ..Default::default()
            };
            match self.node.propose(self.context(0, None), command.encode_to_vec()) {
                Ok(()) => {
                    debug!(lease = id, "lease ran out: its end proposed");
                    ::metrics::counter!(metrics::LEASE_EXPIRIES_PROPOSED).increment(1);
                }
                // Proposed again after a while (see the lessor).
                Err(e) => debug!(lease = id, error = %e, "lease expiry not proposed"),
            }
        }
    }

    /// Answers a question about leases, once a read-index round confirms
    /// this node still leads (so a renewal it answers can't be undone by a
    /// leader elected before it).
    pub(super) fn answer_lease(&mut self, query: LeaseQuery, reply: oneshot::Sender<Result<LeaseAnswer, Error>>) {
        if self.removed {
            let _ = reply.send(Err(Error::removed(self.settings.id)));
            return;
        }
        if self.node.raft.state != StateRole::Leader || !self.lessor.is_leading() {
            let error = if self.leader_id == 0 {
                Error::no_leader(self.settings.id)
            } else {
                Error::NotLeader {
                    message: format!("leases are timed by the leader, node {}", self.leader_id),
                    leader: self.leader_hint(),
                }
            };
            let _ = reply.send(Err(error));
            return;
        }
        if !self.lessor.is_ready(*self.applied_tx.borrow()) {
            // An expiry an earlier leader proposed may still be in the log:
            // a renewal now could be undone by it.
            let _ = reply.send(Err(Error::Overloaded(format!(
                "node {} has just become leader and is applying the entries from before its term; retry shortly",
                self.settings.id
            ))));
            return;
        }
        let now = Instant::now();
        let answer = match query {
            LeaseQuery::KeepAlive(id) => match self.lessor.renew(id, now) {
                Some(ttl) => LeaseAnswer::Renewed { ttl },
                None => LeaseAnswer::NotFound(id),
            },
            LeaseQuery::TimeToLive { id, keys } => match self.lessor.remaining(id, now) {
                Some((left, ttl)) => {
                    let leases = self.store.working_leases();
                    let attached = leases.get(id).map(|l| &l.keys);
                    let key_count = attached.map_or(0, |k| k.len()) as u64;
                    let mut listed = Vec::new();
                    if keys {
                        let mut bytes = 0;
                        for key in attached.into_iter().flatten() {
                            bytes += key.len();
                            if bytes > KEYS_LISTED_BYTES {
                                break;
                            }
                            listed.push(key.clone());
                        }
                    }
                    LeaseAnswer::TimeToLive {
                        ttl: left.as_millis().div_ceil(1000) as u64,
                        granted_ttl: ttl.as_secs(),
                        keys_omitted: if keys { key_count - listed.len() as u64 } else { 0 },
                        keys: listed,
                        key_count,
                    }
                }
                None => LeaseAnswer::NotFound(id),
            },
            LeaseQuery::List => LeaseAnswer::List(self.lessor.ids()),
        };
        self.reads.push_confirmation(move |confirmed| {
            let _ = reply.send(confirmed.map(|_| answer));
        });
    }
}

//! The leader's lease timers. Only the leader times leases, on its monotonic
//! clock; when one runs out it proposes the lease's end, and the log (not
//! any clock) decides it on every node.
//!
//! The timers live only in the leader's memory. A node that becomes leader
//! gives every lease its full time to live from that moment (etcd's rule):
//! it can't know when the old leader last renewed each, and a lease must
//! never end before the time its holder was promised. A renewal is answered
//! only after a read-index round confirms this node still leads, so no
//! leader elected before the renewal can be the one timing it.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::state_machine::LeaseEvent;

/// An expiry proposed but not yet applied is proposed again after this
/// (the entry may have been dropped by a leader change).
const EXPIRY_RETRY: Duration = Duration::from_secs(3);

/// The leader's timers: each lease's deadline.
#[derive(Debug, Default)]
pub struct Lessor {
    leading: bool,
    /// The first index of this node's term as leader: until it is applied,
    /// an expiry proposed by an earlier leader may still apply, so no
    /// renewal is answered.
    term_start: u64,
    /// Lease id -> (time to live, deadline).
    timers: HashMap<u64, (Duration, Instant)>,
    /// The same deadlines, in order, to find the expired ones without a scan.
    by_deadline: BTreeSet<(Instant, u64)>,
    /// Expiries proposed and when, until the lease's end is applied.
    proposed: HashMap<u64, Instant>,
}

impl Lessor {
    /// True while this node leads (and so times leases).
    pub fn is_leading(&self) -> bool {
        self.leading
    }

    /// This node became leader with its term starting at log index
    /// `term_start`: every lease (`(id, ttl seconds)`) gets its full time to
    /// live from `now`.
    pub fn promote(&mut self, leases: impl IntoIterator<Item = (u64, u64)>, term_start: u64, now: Instant) {
        self.demote();
        self.leading = true;
        self.term_start = term_start;
        for (id, ttl) in leases {
            self.start(id, ttl, now);
        }
    }

    /// This node no longer leads: it times nothing.
    pub fn demote(&mut self) {
        *self = Lessor::default();
    }

    /// Whether every entry from before this node's term is applied (at
    /// `applied`): only then do its timers say which leases still exist.
    pub fn is_ready(&self, applied: u64) -> bool {
        self.leading && applied >= self.term_start
    }

    fn start(&mut self, id: u64, ttl: u64, now: Instant) {
        // Checked where leases are granted and loaded; clamped here too, as
        // an overflowing deadline would panic.
        let ttl = Duration::from_secs(ttl.min(crate::leases::MAX_TTL));
        self.stop(id);
        self.timers.insert(id, (ttl, now + ttl));
        self.by_deadline.insert((now + ttl, id));
    }

    fn stop(&mut self, id: u64) {
        if let Some((_, deadline)) = self.timers.remove(&id) {
            self.by_deadline.remove(&(deadline, id));
        }
        self.proposed.remove(&id);
    }

    /// Follows the leases a batch granted and ended (only while leading).
    pub fn applied(&mut self, events: &[LeaseEvent], now: Instant) {
        if !self.leading {
            return;
        }
        for event in events {
            match *event {
                LeaseEvent::Granted { id, ttl } => self.start(id, ttl, now),
                LeaseEvent::Ended { id } => self.stop(id),
            }
        }
    }

    /// Renews lease `id` for its whole time to live from `now`; returns that
    /// (in seconds), or `None` if there is no such lease or it already ran
    /// out (its end is on its way).
    pub fn renew(&mut self, id: u64, now: Instant) -> Option<u64> {
        let (ttl, deadline) = *self.timers.get(&id)?;
        if deadline <= now {
            return None;
        }
        self.by_deadline.remove(&(deadline, id));
        self.timers.insert(id, (ttl, now + ttl));
        self.by_deadline.insert((now + ttl, id));
        Some(ttl.as_secs())
    }

    /// Lease `id`'s time left and time to live, unless it ran out.
    pub fn remaining(&self, id: u64, now: Instant) -> Option<(Duration, Duration)> {
        let (ttl, deadline) = *self.timers.get(&id)?;
        (deadline > now).then(|| (deadline - now, ttl))
    }

    /// Every lease this node times, by id.
    pub fn ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.timers.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Up to `max` leases that ran out by `now` and whose end is not already
    /// on its way; each is marked as proposed.
    pub fn due(&mut self, now: Instant, max: usize) -> Vec<u64> {
        let mut due = Vec::new();
        for &(deadline, id) in &self.by_deadline {
            if deadline > now || due.len() >= max {
                break;
            }
            if self.proposed.get(&id).is_some_and(|at| now < *at + EXPIRY_RETRY) {
                continue;
            }
            due.push(id);
        }
        for id in &due {
            self.proposed.insert(*id, now);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_leader_gives_every_lease_its_full_time_to_live() {
        let start = Instant::now();
        let mut lessor = Lessor::default();
        lessor.applied(&[LeaseEvent::Granted { id: 1, ttl: 5 }], start);
        assert!(lessor.remaining(1, start).is_none(), "a follower times nothing");
        lessor.promote([(1, 5), (2, 10)], 7, start);
        assert!(!lessor.is_ready(6) && lessor.is_ready(7));
        assert_eq!(lessor.ids(), [1, 2]);
        assert_eq!(
            lessor.remaining(1, start),
            Some((Duration::from_secs(5), Duration::from_secs(5)))
        );
        assert!(lessor.due(start + Duration::from_millis(4999), 10).is_empty());
        assert_eq!(lessor.due(start + Duration::from_secs(5), 10), [1]);
        // Proposed once, then again only if its end has not come.
        assert!(lessor.due(start + Duration::from_secs(6), 10).is_empty());
        assert_eq!(lessor.due(start + Duration::from_secs(9), 10), [1]);
        // A lease past its deadline can't be renewed: its end is on its way.
        assert_eq!(lessor.renew(1, start + Duration::from_secs(9)), None);
        lessor.applied(&[LeaseEvent::Ended { id: 1 }], start);
        assert_eq!(lessor.ids(), [2]);
        lessor.demote();
        assert!(!lessor.is_leading());
        assert!(lessor.ids().is_empty());
    }

    #[test]
    fn a_renewal_moves_the_deadline_and_due_leases_come_in_deadline_order() {
        let start = Instant::now();
        let mut lessor = Lessor::default();
        lessor.promote([(1, 2), (2, 3), (3, 4)], 1, start);
        assert_eq!(lessor.renew(1, start + Duration::from_secs(1)), Some(2));
        assert_eq!(lessor.renew(9, start), None, "unknown lease");
        // 1 now ends at 3 s, 2 at 3 s, 3 at 4 s.
        assert_eq!(lessor.due(start + Duration::from_millis(2500), 10), Vec::<u64>::new());
        assert_eq!(lessor.due(start + Duration::from_secs(4), 2), [1, 2], "at most `max`");
        assert_eq!(lessor.due(start + Duration::from_secs(4), 2), [3]);
    }
}

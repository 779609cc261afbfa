//! How many peer connections may be open, and for how long.
//!
//! - **Before a connection has proven who it is** (TLS handshake and hello,
//!   at most a few seconds) it holds a *pending* slot: at most 16 per source
//!   address (an IPv6 /64 counts as one address) and 64 in all. Addresses of
//!   members are exempt from the overall cap, so strangers filling it can't
//!   keep members from reconnecting.
//! - **Once it has**, it is the *session* of the node it speaks for: a newer
//!   session of the same node closes the older one (a node keeps one
//!   connection to each peer; a newer one means it reconnected), so the
//!   number of sessions is bounded by the members.
//! - **A snapshot stream** is a session of its own, one per sender at a time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Pending connections from one address at once.
pub const PENDING_PER_ADDRESS: usize = 16;
/// Pending connections from addresses that are not members' at once.
pub const PENDING_FROM_STRANGERS: usize = 64;

/// The unit a per-address cap counts: an IPv4 address, or an IPv6 /64 (one
/// host usually has a whole /64 to draw addresses from).
fn address_group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::V6(octets.into())
        }
        v4 => v4,
    }
}

#[derive(Default)]
struct Counts {
    per_group: HashMap<IpAddr, usize>,
    strangers: usize,
}

/// Pending-connection accounting.
#[derive(Default)]
pub struct PendingSlots {
    counts: Mutex<Counts>,
}

/// A pending slot; given back on drop.
pub struct PendingSlot {
    slots: Arc<PendingSlots>,
    group: IpAddr,
    stranger: bool,
}

impl PendingSlots {
    /// Takes a slot for a connection from `ip` (`member_address`: `ip` is a
    /// member's), or `None` if a cap is reached.
    pub fn take(self: &Arc<Self>, ip: IpAddr, member_address: bool) -> Option<PendingSlot> {
        let group = address_group(ip);
        let mut counts = self.counts.lock().expect("peer slots lock poisoned");
        let here = counts.per_group.get(&group).copied().unwrap_or(0);
        if here >= PENDING_PER_ADDRESS || (!member_address && counts.strangers >= PENDING_FROM_STRANGERS) {
            return None;
        }
        *counts.per_group.entry(group).or_insert(0) += 1;
        if !member_address {
            counts.strangers += 1;
        }
        Some(PendingSlot {
            slots: self.clone(),
            group,
            stranger: !member_address,
        })
    }

    /// True if the cap on strangers is reached (so it is worth finding out
    /// whether an address is a member's before refusing it).
    pub fn strangers_full(&self) -> bool {
        self.counts.lock().expect("peer slots lock poisoned").strangers >= PENDING_FROM_STRANGERS
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut counts = self.slots.counts.lock().expect("peer slots lock poisoned");
        if let Some(n) = counts.per_group.get_mut(&self.group) {
            *n -= 1;
            if *n == 0 {
                counts.per_group.remove(&self.group);
            }
        }
        if self.stranger {
            counts.strangers -= 1;
        }
    }
}

/// The current session of each node.
#[derive(Default)]
pub struct Sessions {
    by_node: Mutex<HashMap<u64, (u64, Arc<Notify>)>>,
    next: Mutex<u64>,
}

/// A node's session; `superseded` resolves when a newer one starts.
pub struct Session {
    sessions: Arc<Sessions>,
    node: u64,
    number: u64,
    closed: Arc<Notify>,
}

impl Sessions {
    /// Makes this connection the session of `node`, closing the previous one.
    pub fn start(self: &Arc<Self>, node: u64) -> Session {
        let number = {
            let mut next = self.next.lock().expect("peer sessions lock poisoned");
            *next += 1;
            *next
        };
        let closed = Arc::new(Notify::new());
        let previous = self
            .by_node
            .lock()
            .expect("peer sessions lock poisoned")
            .insert(node, (number, closed.clone()));
        if let Some((_, previous)) = previous {
            previous.notify_one();
        }
        Session {
            sessions: self.clone(),
            node,
            number,
            closed,
        }
    }
}

impl Session {
    /// Resolves once a newer session of the same node has started.
    pub async fn superseded(&self) {
        self.closed.notified().await;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut by_node = self.sessions.by_node.lock().expect("peer sessions lock poisoned");
        if by_node
            .get(&self.node)
            .is_some_and(|(number, _)| *number == self.number)
        {
            by_node.remove(&self.node);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_slots_cap_each_address_and_strangers_but_not_members() {
        let slots = Arc::new(PendingSlots::default());
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let held: Vec<_> = (0..PENDING_PER_ADDRESS)
            .map(|_| slots.take(ip("10.0.0.1"), false).unwrap())
            .collect();
        assert!(slots.take(ip("10.0.0.1"), false).is_none());
        // A /64 is one address.
        let v6: Vec<_> = (1..=PENDING_PER_ADDRESS)
            .map(|i| slots.take(ip(&format!("2001:db8::{i:x}")), false).unwrap())
            .collect();
        assert!(slots.take(ip("2001:db8::ffff"), false).is_none());
        let more: Vec<_> = (0..PENDING_FROM_STRANGERS - 2 * PENDING_PER_ADDRESS)
            .map(|i| slots.take(ip(&format!("10.0.1.{i}")), false).unwrap())
            .collect();
        assert!(slots.strangers_full());
        assert!(
            slots.take(ip("10.0.2.1"), false).is_none(),
            "strangers are capped in all"
        );
        let member = slots.take(ip("10.0.2.2"), true).expect("a member's address is not");
        drop((held, v6, more, member));
        assert!(!slots.strangers_full());
        assert!(slots.take(ip("10.0.0.1"), false).is_some());
    }

    #[tokio::test]
    async fn a_newer_session_of_a_node_supersedes_the_older() {
        let sessions = Arc::new(Sessions::default());
        let first = sessions.start(2);
        let other = sessions.start(3);
        let second = sessions.start(2);
        tokio::time::timeout(std::time::Duration::from_secs(5), first.superseded())
            .await
            .expect("the first session of node 2 is told to close");
        drop(first);
        assert!(sessions
            .by_node
            .lock()
            .unwrap()
            .get(&2)
            .is_some_and(|(n, _)| *n == second.number));
        drop((other, second));
        assert!(sessions.by_node.lock().unwrap().is_empty());
    }
}

/// The senders with a snapshot stream running.
#[derive(Default)]
pub struct SnapshotStreams {
    running: Mutex<std::collections::HashSet<u64>>,
}

/// Held while a snapshot stream runs; frees its sender's slot when dropped.
pub struct SnapshotStream {
    streams: Arc<SnapshotStreams>,
    sender: u64,
}

impl SnapshotStreams {
    /// Starts `sender`'s stream, unless one is running already.
    pub fn start(self: &Arc<Self>, sender: u64) -> Option<SnapshotStream> {
        let fresh = self.running.lock().expect("streams lock poisoned").insert(sender);
        fresh.then(|| SnapshotStream {
            streams: self.clone(),
            sender,
        })
    }
}

impl Drop for SnapshotStream {
    fn drop(&mut self) {
        self.streams
            .running
            .lock()
            .expect("streams lock poisoned")
            .remove(&self.sender);
    }
}

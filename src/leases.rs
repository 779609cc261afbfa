//! Leases as the state machine keeps them: each lease's time to live and the
//! keys attached to it. When a lease ends (revoked, or expired as the leader
//! decided and the log recorded) every attached key is deleted.
//!
//! Like the client sessions, the raft loop works on its own copy
//! ([`Leases`], in memory whole, so ending a lease needs no scan of the
//! keys) and hands the store a [`LeaseDelta`] per batch, which the next
//! flush writes to the `leases` and `lease_keys` tables with the data. The
//! copy is loaded from those tables when the store opens: the cost is the
//! leases and their keys, not the whole state.
//!
//! Time is not here: when a lease runs out is the leader's business
//! (`node::lessor`), never a follower's clock.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// At most this many leases at once; a grant past it is refused.
pub const MAX_LEASES: usize = 100_000;
/// At most this many keys on one lease (ending it deletes them all in one
/// command, as a range delete of at most as many keys does).
pub const MAX_LEASE_KEYS: usize = crate::state_machine::MAX_RANGE_DELETE;
/// The longest time to live a lease may be granted, in seconds (one year).
pub const MAX_TTL: u64 = 365 * 24 * 3600;

/// One lease.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lease {
    /// Its time to live, in seconds.
    pub ttl: u64,
    /// The keys attached to it, in order.
    pub keys: BTreeSet<Vec<u8>>,
}

/// Every lease, and what changed since the last [`Leases::take_delta`].
#[derive(Debug, Clone, Default)]
pub struct Leases {
    leases: BTreeMap<u64, Lease>,
    /// Which lease each attached key is on: a put needs to know without
    /// reading the key's record from the file.
    by_key: HashMap<Vec<u8>, u64>,
    delta: LeaseDelta,
}

/// Changes to the lease tables, oldest first folded into one: a lease's
/// record (`None`: it ended) and each attachment (`true`: attached).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseDelta {
    /// Lease id -> its time to live, or `None` once it ended.
    pub leases: BTreeMap<u64, Option<u64>>,
    /// `lease_keys` key (see [`lease_key`]) -> attached or not.
    pub keys: BTreeMap<Vec<u8>, bool>,
}

impl LeaseDelta {
    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty() && self.keys.is_empty()
    }

    /// Folds a later delta into this one.
    pub fn absorb(&mut self, newer: LeaseDelta) {
        self.leases.extend(newer.leases);
        self.keys.extend(newer.keys);
    }

    /// Rough bytes it holds in memory.
    pub fn cost(&self) -> usize {
        self.leases.len() * 48 + self.keys.keys().map(|k| k.len() + 48).sum::<usize>()
    }
}

/// The `lease_keys` table's key for `key` attached to lease `id`: the id
/// (8 bytes, big-endian, so one lease's keys are together) then the key.
pub fn lease_key(id: u64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&id.to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// Splits a `lease_keys` key into the lease id and the key.
pub fn split_lease_key(k: &[u8]) -> Option<(u64, &[u8])> {
    let id = u64::from_be_bytes(k.get(..8)?.try_into().ok()?);
    Some((id, &k[8..]))
}

impl Leases {
    /// The leases as loaded from the store: `(id, ttl)` and `(id, key)` pairs.
    pub fn load(leases: impl IntoIterator<Item = (u64, u64)>, keys: impl IntoIterator<Item = (u64, Vec<u8>)>) -> Self {
        let mut table: BTreeMap<u64, Lease> = leases
            .into_iter()
            .map(|(id, ttl)| {
                (
                    id,
                    Lease {
                        ttl,
                        keys: BTreeSet::new(),
                    },
                )
            })
            .collect();
        let mut by_key = HashMap::new();
        for (id, key) in keys {
            // An attachment whose lease is gone can't be (both change in one
            // commit); it is kept with a lease of its own rather than lost.
            by_key.insert(key.clone(), id);
            table.entry(id).or_default().keys.insert(key);
        }
        Leases {
            leases: table,
            by_key,
            delta: LeaseDelta::default(),
        }
    }

    /// The lease `key` is attached to, if any.
    pub fn lease_of(&self, key: &[u8]) -> Option<u64> {
        self.by_key.get(key).copied()
    }

    /// One lease.
    pub fn get(&self, id: u64) -> Option<&Lease> {
        self.leases.get(&id)
    }

    /// Every lease, by id.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Lease)> {
        self.leases.iter().map(|(id, l)| (*id, l))
    }

    /// How many leases there are.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// Adds lease `id` with `ttl` seconds.
    pub fn grant(&mut self, id: u64, ttl: u64) {
        self.leases.insert(
            id,
            Lease {
                ttl,
                keys: BTreeSet::new(),
            },
        );
        self.delta.leases.insert(id, Some(ttl));
    }

    /// Removes lease `id` (its keys must have been detached already; any
    /// left are dropped with it).
    pub fn end(&mut self, id: u64) {
        if let Some(lease) = self.leases.remove(&id) {
            for key in lease.keys {
                if self.by_key.get(&key) == Some(&id) {
                    self.by_key.remove(&key);
                }
                self.delta.keys.insert(lease_key(id, &key), false);
            }
            self.delta.leases.insert(id, None);
        }
    }

    /// Moves `key` from lease `from` to lease `to` (0: none).
    pub fn attach(&mut self, key: &[u8], from: u64, to: u64) {
        if from == to {
            return;
        }
        if from != 0 {
            if let Some(lease) = self.leases.get_mut(&from) {
                lease.keys.remove(key);
            }
            if self.by_key.get(key) == Some(&from) {
                self.by_key.remove(key);
            }
            self.delta.keys.insert(lease_key(from, key), false);
        }
        if to != 0 {
            if let Some(lease) = self.leases.get_mut(&to) {
                lease.keys.insert(key.to_vec());
                self.by_key.insert(key.to_vec(), to);
                self.delta.keys.insert(lease_key(to, key), true);
            }
        }
    }

    /// What changed since the last call.
    pub fn take_delta(&mut self) -> LeaseDelta {
        std::mem::take(&mut self.delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attachments_move_between_leases_and_end_with_them() {
        let mut leases = Leases::default();
        leases.grant(5, 10);
        leases.grant(6, 20);
        leases.attach(b"a", 0, 5);
        leases.attach(b"b", 0, 5);
        leases.attach(b"a", 5, 6);
        assert_eq!(leases.get(5).unwrap().keys, BTreeSet::from([b"b".to_vec()]));
        assert_eq!(leases.get(6).unwrap().keys, BTreeSet::from([b"a".to_vec()]));
        assert_eq!((leases.lease_of(b"a"), leases.lease_of(b"b")), (Some(6), Some(5)));
        // Attaching to a lease that does not exist attaches nothing.
        leases.attach(b"c", 0, 99);
        assert!(leases.get(99).is_none());
        let first = leases.take_delta();
        assert_eq!(first.leases, BTreeMap::from([(5, Some(10)), (6, Some(20))]));
        assert_eq!(
            first.keys,
            BTreeMap::from([
                (lease_key(5, b"a"), false),
                (lease_key(5, b"b"), true),
                (lease_key(6, b"a"), true)
            ])
        );
        leases.end(5);
        assert_eq!((leases.lease_of(b"a"), leases.lease_of(b"b")), (Some(6), None));
        let second = leases.take_delta();
        assert_eq!(second.leases, BTreeMap::from([(5, None)]));
        assert_eq!(second.keys, BTreeMap::from([(lease_key(5, b"b"), false)]));
        let mut all = first;
        all.absorb(second);
        assert_eq!(all.leases[&5], None, "the later change wins");
        assert!(!all.keys[&lease_key(5, b"b")]);

        // What the tables would hold loads back to the same leases.
        let loaded = Leases::load([(6, 20)], [(6, b"a".to_vec())]);
        assert_eq!(loaded.iter().collect::<Vec<_>>(), leases.iter().collect::<Vec<_>>());
        assert_eq!(loaded.lease_of(b"a"), Some(6));
        assert_eq!(split_lease_key(&lease_key(6, b"a")), Some((6, &b"a"[..])));
        assert_eq!(split_lease_key(b"short"), None);
    }
}

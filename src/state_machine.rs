//! The replicated state: an ordered map of bytes to bytes, the member list
//! with addresses, and the applied index. Applying is deterministic, so every
//! node that applies the same log holds the same state.
//!
//! The raft loop is the only writer; connection tasks read through the shared
//! lock (reads never go through the raft thread).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use prost::Message;
use raft::prelude::ConfState;

use crate::proto::{command, Command, KeyValue, Member, MemberRole, SnapshotData};

/// What applying one command produced, for the waiting client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyResult {
    /// A set was applied at this index.
    Set {
        /// The log index that applied it.
        revision: u64,
    },
    /// A delete was applied at this index.
    Delete {
        /// Whether the key existed.
        existed: bool,
        /// The log index that applied it.
        revision: u64,
    },
    /// A membership change or member update; carries the new member list.
    Members(Vec<Member>),
}

/// One page of a scan.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScanPage {
    /// The pairs, in key order.
    pub pairs: Vec<KeyValue>,
    /// More pairs matched than fit the limits.
    pub more: bool,
}

/// The state machine.
#[derive(Debug, Default)]
pub struct StateMachine {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Addresses of every current member; roles come from `conf_state`.
    addresses: BTreeMap<u64, Member>,
    conf_state: ConfState,
    removed: BTreeSet<u64>,
    cluster_id: u64,
    applied_index: u64,
    applied_term: u64,
}

impl StateMachine {
    /// An empty state machine of this cluster.
    pub fn new(cluster_id: u64) -> Self {
        StateMachine {
            cluster_id,
            ..Default::default()
        }
    }

    /// The index of the last applied entry.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// The term of the last applied entry.
    pub fn applied_term(&self) -> u64 {
        self.applied_term
    }

    /// Notes that an entry without a command (an empty entry a new leader
    /// appends) was applied.
    pub fn advance(&mut self, index: u64, term: u64) {
        self.applied_index = index;
        self.applied_term = term;
    }

    /// Applies one command.
    pub fn apply(&mut self, index: u64, term: u64, command: Command) -> ApplyResult {
        self.advance(index, term);
        match command.op {
            Some(command::Op::Set(set)) => {
                self.map.insert(set.key, set.value);
                ApplyResult::Set { revision: index }
            }
            Some(command::Op::Delete(delete)) => ApplyResult::Delete {
                existed: self.map.remove(&delete.key).is_some(),
                revision: index,
            },
            Some(command::Op::UpdateMember(update)) => {
                if let Some(member) = self.addresses.get_mut(&update.id) {
                    if !update.peer_addr.is_empty() {
                        member.peer_addr = update.peer_addr;
                    }
                    member.client_addr = update.client_addr;
                }
                ApplyResult::Members(self.members())
            }
            None => ApplyResult::Members(self.members()),
        }
    }

    /// Applies a membership change: the new ConfState, and the addresses of a
    /// node being added. Members that left the configuration are remembered as
    /// removed so they can be told to stop.
    pub fn apply_conf_state(&mut self, index: u64, term: u64, conf_state: ConfState, added: Option<Member>) {
        self.advance(index, term);
        if let Some(member) = added {
            self.addresses.insert(member.id, member);
        }
        let current: BTreeSet<u64> = conf_ids(&conf_state).collect();
        let gone: Vec<u64> = self
            .addresses
            .keys()
            .copied()
            .filter(|id| !current.contains(id))
            .collect();
        for id in gone {
            self.addresses.remove(&id);
            self.removed.insert(id);
        }
        self.conf_state = conf_state;
    }

    /// The value of a key.
    pub fn get(&self, key: &[u8]) -> Option<&Vec<u8>> {
        self.map.get(key)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when the map holds no keys.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Keys in `[from, to)` (empty `to`: unbounded) that start with `prefix`, at
    /// most `limit` pairs (0: no limit) and about `max_bytes` of keys and values.
    pub fn scan(&self, prefix: &[u8], from: &[u8], to: &[u8], limit: usize, max_bytes: usize) -> ScanPage {
        let start = if from > prefix { from } else { prefix };
        let upper = if to.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(to.to_vec())
        };
        let mut page = ScanPage::default();
        let mut bytes = 0usize;
        for (key, value) in self.map.range((Bound::Included(start.to_vec()), upper)) {
            if !key.starts_with(prefix) {
                break;
            }
            let size = key.len() + value.len() + 8;
            if (limit > 0 && page.pairs.len() >= limit) || (!page.pairs.is_empty() && bytes + size > max_bytes) {
                page.more = true;
                break;
            }
            bytes += size;
            page.pairs.push(KeyValue {
                key: key.clone(),
                value: value.clone(),
            });
        }
        page
    }

    /// Every member with its role, by id.
    pub fn members(&self) -> Vec<Member> {
        let learners: BTreeSet<u64> = self.conf_state.learners.iter().copied().collect();
        self.addresses
            .values()
            .map(|m| Member {
                role: if learners.contains(&m.id) {
                    MemberRole::Learner
                } else {
                    MemberRole::Voter
                } as i32,
                ..m.clone()
            })
            .collect()
    }

    /// One member's record.
    pub fn member(&self, id: u64) -> Option<&Member> {
        self.addresses.get(&id)
    }

    /// True if this node id was removed from the cluster.
    pub fn is_removed(&self, id: u64) -> bool {
        self.removed.contains(&id)
    }

    /// Every id removed from the cluster, in order.
    pub fn removed_ids(&self) -> Vec<u64> {
        self.removed.iter().copied().collect()
    }

    /// The membership as of the applied index.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// The cluster this state belongs to.
    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    /// Serialises the whole state for a snapshot.
    pub fn snapshot_data(&self) -> Vec<u8> {
        SnapshotData {
            pairs: self
                .map
                .iter()
                .map(|(k, v)| KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            members: self.addresses.values().cloned().collect(),
            removed: self.removed.iter().copied().collect(),
            cluster_id: self.cluster_id,
        }
        .encode_to_vec()
    }

    /// Replaces the whole state with a snapshot's.
    pub fn restore(
        &mut self,
        data: &[u8],
        index: u64,
        term: u64,
        conf_state: ConfState,
    ) -> Result<(), prost::DecodeError> {
        let snap = SnapshotData::decode(data)?;
        *self = StateMachine {
            map: snap.pairs.into_iter().map(|kv| (kv.key, kv.value)).collect(),
            addresses: snap.members.into_iter().map(|m| (m.id, m)).collect(),
            conf_state,
            removed: snap.removed.into_iter().collect(),
            cluster_id: snap.cluster_id,
            applied_index: index,
            applied_term: term,
        };
        Ok(())
    }
}

/// Every node id in a configuration: voters (incoming and outgoing) and learners.
pub fn conf_ids(cs: &ConfState) -> impl Iterator<Item = u64> + '_ {
    cs.voters
        .iter()
        .chain(&cs.voters_outgoing)
        .chain(&cs.learners)
        .chain(&cs.learners_next)
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{DeleteRequest, SetRequest};

    fn set(k: &str, v: &str) -> Command {
        Command {
            op: Some(command::Op::Set(SetRequest {
                key: k.into(),
                value: v.into(),
            })),
        }
    }

    fn delete(k: &str) -> Command {
        Command {
            op: Some(command::Op::Delete(DeleteRequest { key: k.into() })),
        }
    }

    fn member(id: u64) -> Member {
        Member {
            id,
            peer_addr: format!("127.0.0.1:{}", 7000 + id),
            client_addr: String::new(),
            role: 0,
        }
    }

    fn voters(ids: &[u64]) -> ConfState {
        let mut cs = ConfState::default();
        cs.voters = ids.to_vec();
        cs
    }

    #[test]
    fn applies_sets_and_deletes_in_order() {
        let mut sm = StateMachine::new(7);
        assert_eq!(sm.apply(2, 1, set("a", "1")), ApplyResult::Set { revision: 2 });
        sm.apply(3, 1, set("a", "2"));
        assert_eq!(sm.get(b"a").unwrap(), b"2");
        assert_eq!(
            sm.apply(4, 2, delete("a")),
            ApplyResult::Delete {
                existed: true,
                revision: 4
            }
        );
        assert_eq!(
            sm.apply(5, 2, delete("a")),
            ApplyResult::Delete {
                existed: false,
                revision: 5
            }
        );
        assert_eq!((sm.applied_index(), sm.applied_term()), (5, 2));
        assert!(sm.is_empty());
    }

    #[test]
    fn scans_by_prefix_range_and_limit() {
        let mut sm = StateMachine::new(1);
        for (i, k) in ["a", "b/1", "b/2", "b/3", "c"].iter().enumerate() {
            sm.apply(i as u64 + 1, 1, set(k, "v"));
        }
        let keys = |p: &ScanPage| {
            p.pairs
                .iter()
                .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(&sm.scan(b"b/", b"", b"", 0, usize::MAX)), ["b/1", "b/2", "b/3"]);
        assert_eq!(keys(&sm.scan(b"", b"b/2", b"c", 0, usize::MAX)), ["b/2", "b/3"]);
        let page = sm.scan(b"", b"", b"", 2, usize::MAX);
        assert_eq!(keys(&page), ["a", "b/1"]);
        assert!(page.more);
        let page = sm.scan(b"", b"", b"", 0, 1);
        assert_eq!(keys(&page), ["a"], "a byte cap still returns one pair");
        assert!(page.more);
        assert!(!sm.scan(b"b/", b"", b"", 3, usize::MAX).more);
    }

    #[test]
    fn tracks_members_roles_and_removals() {
        let mut sm = StateMachine::new(1);
        sm.apply_conf_state(1, 1, voters(&[1]), Some(member(1)));
        let mut cs = voters(&[1]);
        cs.learners = vec![2];
        sm.apply_conf_state(2, 1, cs, Some(member(2)));
        let roles: Vec<(u64, i32)> = sm.members().iter().map(|m| (m.id, m.role)).collect();
        assert_eq!(roles, [(1, MemberRole::Voter as i32), (2, MemberRole::Learner as i32)]);
        sm.apply_conf_state(3, 1, voters(&[1, 2]), None);
        assert!(sm.members().iter().all(|m| m.role == MemberRole::Voter as i32));
        sm.apply_conf_state(4, 1, voters(&[2]), None);
        assert_eq!(sm.members().len(), 1);
        assert!(sm.is_removed(1));
        assert!(!sm.is_removed(2));
    }

    #[test]
    fn a_member_publishes_its_client_address() {
        let mut sm = StateMachine::new(1);
        sm.apply_conf_state(1, 1, voters(&[1]), Some(member(1)));
        let update = Member {
            id: 1,
            client_addr: "127.0.0.1:9999".into(),
            ..Default::default()
        };
        sm.apply(
            2,
            1,
            Command {
                op: Some(command::Op::UpdateMember(update)),
            },
        );
        let m = sm.member(1).unwrap();
        assert_eq!(m.client_addr, "127.0.0.1:9999");
        assert_eq!(m.peer_addr, "127.0.0.1:7001", "an empty peer address keeps the old one");
    }

    #[test]
    fn snapshot_and_restore_round_trip() {
        let mut sm = StateMachine::new(99);
        sm.apply_conf_state(1, 1, voters(&[1, 2]), Some(member(1)));
        sm.apply_conf_state(2, 1, voters(&[1, 2]), Some(member(2)));
        sm.apply(3, 1, set("k", "v"));
        sm.apply_conf_state(4, 1, voters(&[1]), None);
        let data = sm.snapshot_data();
        let mut restored = StateMachine::default();
        restored.restore(&data, 4, 1, voters(&[1])).unwrap();
        assert_eq!(restored.get(b"k").unwrap(), b"v");
        assert_eq!(restored.members(), sm.members());
        assert!(restored.is_removed(2));
        assert_eq!(restored.cluster_id(), 99);
        assert_eq!(restored.applied_index(), 4);
        assert!(restored.restore(b"\xff\xff\xff", 1, 1, ConfState::default()).is_err());
    }
}

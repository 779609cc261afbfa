//! The replicated state: an ordered map of bytes to bytes (on disk, in the
//! [`StateStore`]), the member list with addresses, and the applied index.
//! Applying is deterministic, so every node that applies the same log holds
//! the same state.
//!
//! The raft loop is the only writer: it applies each batch of committed
//! entries in one [`Batch`], which reaches the store (its memory first, the
//! file at the next flush) all at once with the resulting [`StateMeta`].
//! Connection tasks read keys from the store directly and membership from the
//! shared [`StateMachine`], so reads never wait for apply.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use protobuf::Message as _;
use raft::prelude::ConfState;

use crate::leases::Leases;
use crate::proto::{
    command, Command, DeleteRequest, HistoryEvent, Member, MemberRole, SetRequest, SnapshotHeader, StoredValue,
    TxnResponse,
};
use crate::sessions::{replay_txn, Outcome, Refusal, Sessions, Verdict, WriteId};
use crate::storage::history::Event;
use crate::storage::memtable::{self, Applied, Change, Layer};
use crate::storage::state_store::{FileReader, MemoryLookup, FORMAT};
use crate::storage::{StateStore, StorageError};

#[cfg(test)]
mod history_tests;
mod leases;
mod txn;
#[cfg(test)]
mod unresolved_tests;

pub use leases::LeaseEvent;

pub use txn::{get_response, holds, MAX_RANGE_DELETE, TXN_READ_BYTES};

/// What applying one command produced, for the waiting client.
#[derive(Debug, Clone, PartialEq)]
pub enum ApplyResult {
    /// A set was applied at this index.
    Set {
        /// The log index that applied it.
        revision: u64,
    },
    /// A delete (of a key or a range) was applied at this index.
    Delete {
        /// How many keys it deleted.
        deleted: u64,
        /// The log index that applied it.
        revision: u64,
    },
    /// A membership change or member update; carries the new member list.
    Members(Vec<Member>),
    /// A write of a client session that was refused unapplied (the session
    /// expired, the write is a late copy of one already answered, or the
    /// session has too many writes in flight).
    SessionRefused(Refusal, String),
    /// A transaction ran (or, retried, was answered from its session).
    Txn(Box<TxnResponse>),
    /// The request was refused unapplied when it came to apply (a range
    /// delete over the limit): the caller must change it.
    Refused(String),
    /// A client session was opened; its id is the entry's index.
    SessionRegistered {
        /// The new session's id.
        session_id: u64,
    },
    /// A lease was granted; its id is the entry's index.
    LeaseGranted {
        /// The new lease's id.
        id: u64,
        /// Its time to live, in seconds.
        ttl: u64,
    },
    /// A lease ended (revoked, or expired) with its keys.
    LeaseEnded {
        /// The log index that ended it.
        revision: u64,
        /// How many keys went with it.
        deleted: u64,
    },
    /// The write names a lease that does not exist (any more); nothing was
    /// applied.
    LeaseNotFound(u64),
}

/// Everything but the keys: small, kept in memory, and written with every
/// batch (as a `SnapshotHeader`) so it always matches the applied index.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StateMeta {
    /// Addresses of every current member; roles come from `conf_state`.
    addresses: BTreeMap<u64, Member>,
    conf_state: ConfState,
    removed: BTreeSet<u64>,
    cluster_id: u64,
    applied_index: u64,
    applied_term: u64,
}

impl StateMeta {
    /// An empty state of this cluster.
    pub fn new(cluster_id: u64) -> Self {
        StateMeta {
            cluster_id,
            ..Default::default()
        }
    }

    /// Reads the state record a store or snapshot carries.
    pub fn from_header(header: &SnapshotHeader) -> Result<Self, StorageError> {
        let conf_state = if header.conf_state.is_empty() {
            ConfState::default()
        } else {
            ConfState::parse_from_bytes(&header.conf_state).map_err(|e| {
                StorageError::Corrupt(format!("the membership in the state record does not decode: {e}"))
            })?
        };
        Ok(StateMeta {
            addresses: header.members.iter().map(|m| (m.id, m.clone())).collect(),
            conf_state,
            removed: header.removed.iter().copied().collect(),
            cluster_id: header.cluster_id,
            applied_index: header.index,
            applied_term: header.term,
        })
    }

    /// The state record for the store or a snapshot.
    pub fn to_header(&self) -> SnapshotHeader {
        SnapshotHeader {
            format: FORMAT,
            cluster_id: self.cluster_id,
            index: self.applied_index,
            term: self.applied_term,
            conf_state: self.conf_state.write_to_bytes().expect("ConfState always encodes"),
            members: self.addresses.values().cloned().collect(),
            removed: self.removed.iter().copied().collect(),
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

    /// Notes that an entry that changes no state was applied.
    pub fn advance(&mut self, index: u64, term: u64) {
        self.applied_index = index;
        self.applied_term = term;
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

    /// A member publishes its own addresses (an empty peer address keeps the
    /// old one).
    fn update_member(&mut self, update: Member) {
        if let Some(member) = self.addresses.get_mut(&update.id) {
            if member.incarnation != 0 && update.incarnation != 0 && member.incarnation != update.incarnation {
                // From a wiped or replaced data dir (its peers refuse it, so
                // this only arrives if it was proposed before the record was).
                return;
            }
            if update.incarnation != 0 {
                member.incarnation = update.incarnation;
            }
            if !update.peer_addr.is_empty() {
                member.peer_addr = update.peer_addr;
            }
            member.client_addr = update.client_addr;
        }
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
}

/// The state machine as readers see it: the store for keys, and the
/// membership as of the last committed batch. Dereferences to [`StateMeta`].
#[derive(Debug)]
pub struct StateMachine {
    store: Arc<StateStore>,
    meta: StateMeta,
}

impl std::ops::Deref for StateMachine {
    type Target = StateMeta;
    fn deref(&self) -> &StateMeta {
        &self.meta
    }
}

impl StateMachine {
    /// The state held by `store`.
    pub fn open(store: Arc<StateStore>) -> Result<Self, StorageError> {
        let meta = StateMeta::from_header(&store.header()?)?;
        Ok(StateMachine { store, meta })
    }

    /// The store the keys live in.
    pub fn store(&self) -> &Arc<StateStore> {
        &self.store
    }

    /// The membership and applied index, as of the last committed batch.
    pub fn meta(&self) -> &StateMeta {
        &self.meta
    }

    /// Publishes the state a committed batch (or installed snapshot) led to.
    pub fn set_meta(&mut self, meta: StateMeta) {
        self.meta = meta;
    }

    /// The value of a key.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.store.get(key)?.map(|v| v.value.into()))
    }
}

/// One batch of committed entries being applied: its changes and the state
/// it leads to. Nothing is visible until [`Batch::commit`].
pub struct Batch<'a> {
    store: &'a StateStore,
    changes: Layer,
    /// The history of `changes`, in revision order.
    events: Vec<Event>,
    keys_added: i64,
    /// See [`Applied::settle`].
    settle: Vec<(Vec<u8>, u64)>,
    meta: StateMeta,
    /// The raft loop's copy of the client sessions, held for the batch.
    sessions: std::sync::MutexGuard<'a, Sessions>,
    /// The raft loop's copy of the leases, held for the batch.
    leases: std::sync::MutexGuard<'a, Leases>,
    /// Leases granted and ended in the batch, for the leader's lessor.
    lease_events: Vec<LeaseEvent>,
    /// The file's read view for the batch's lookups.
    file: std::cell::RefCell<Option<FileReader>>,
}

/// The changes of one command, joined to the batch only once the whole
/// command applied: a transaction or range delete refused part-way leaves
/// nothing behind.
#[derive(Default)]
struct Pending {
    layer: Layer,
    events: Vec<Event>,
    keys_added: i64,
    /// See [`Applied::settle`].
    settle: Vec<(Vec<u8>, u64)>,
    /// Work budgets of one command (see txn.rs): store records examined by
    /// range reads and deletes, keys deleted by ranges, bytes read.
    examined: std::cell::Cell<usize>,
    range_deleted: usize,
    read_bytes: usize,
    /// Keys moved between leases: (key, from, to), 0 for none.
    lease_moves: Vec<(Vec<u8>, u64, u64)>,
}

/// What a change replaces.
#[derive(Debug, Clone, Copy)]
enum Previous {
    /// Nothing: the key was absent.
    Absent,
    /// This record.
    Record(Replaced),
    /// Not looked up (the change is a put applied unresolved, see
    /// [`memtable::is_unresolved`]): a record with no lease, or none.
    Unknown,
}

/// The record a change replaces: its revision and lease.
#[derive(Debug, Clone, Copy)]
struct Replaced {
    mod_revision: u64,
    lease: u64,
    /// Whether it was a put applied unresolved that created its key,
    /// counted as replacing one until now, and where it is.
    uncounted_create: Uncounted,
}

/// Where a put applied unresolved (counted as replacing a key) is, for
/// the change that replaces it to settle its count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Uncounted {
    /// Not such a put: resolved, or in the frozen layer, whose flush counts
    /// it from the file.
    No,
    /// In this batch: it never reaches memory, so it is settled here.
    InBatch,
    /// In memory's active layer: settled when the batch is committed, if it
    /// is still there (a flush may have taken it, and counted it, since).
    InActive,
}

impl Uncounted {
    /// `place` for a change that is a put applied unresolved, else `No`.
    fn of(change: &Change, place: Uncounted) -> Uncounted {
        if change.as_ref().is_some_and(memtable::is_unresolved) {
            place
        } else {
            Uncounted::No
        }
    }
}

/// A key's record as the batch sees it (see [`Batch::lookup`]).
struct Looked {
    record: Option<StoredValue>,
    /// See [`Replaced::uncounted_create`].
    uncounted_create: Uncounted,
}

impl Looked {
    /// What a change of the key replaces.
    fn previous(&self) -> Previous {
        match &self.record {
            Some(record) => Previous::Record(Replaced {
                mod_revision: record.mod_revision,
                lease: record.lease,
                uncounted_create: self.uncounted_create,
            }),
            None => Previous::Absent,
        }
    }
}

/// What the batch holds of a key before the file is read.
enum Seen {
    /// A change: the batch's, or the store memory's. `uncounted` says where
    /// it is if it is a put applied unresolved whose count the next flush
    /// does not settle (see [`Uncounted`]).
    Change { change: Change, uncounted: Uncounted },
    /// Nothing, and the file holds no key: absent.
    Absent,
    /// Nothing: the file has the key's record.
    InFile,
}

impl Pending {
    /// Records `key`'s change at `revision` and its history, replacing
    /// `previous`.
    fn change(&mut self, revision: u64, key: Vec<u8>, record: Option<StoredValue>, previous: Previous) {
        let (from, replaced_revision, existed) = match previous {
            Previous::Absent => (0, 0, 0),
            // The correction the replaced put's count was waiting for.
            Previous::Record(r) => match r.uncounted_create {
                Uncounted::No => (r.lease, r.mod_revision, 1),
                Uncounted::InBatch => (r.lease, r.mod_revision, 0),
                Uncounted::InActive => {
                    self.settle.push((key.clone(), r.mod_revision));
                    (r.lease, r.mod_revision, 1)
                }
            },
            // Counted as replacing a key until the flush finds out.
            Previous::Unknown => (0, 0, 1),
        };
        let to = record.as_ref().map_or(0, |r| r.lease);
        if from != to {
            self.lease_moves.push((key.clone(), from, to));
        }
        self.events.push(Event {
            revision,
            change: HistoryEvent {
                key: key.clone(),
                record: record.clone(),
                prev_mod_revision: replaced_revision,
            },
        });
        self.keys_added += i64::from(record.is_some()) - existed;
        self.layer.insert(key, record);
    }

    /// Keys this command attaches to `lease` so far.
    fn attached_to(&self, lease: u64) -> usize {
        self.lease_moves.iter().filter(|(_, _, to)| *to == lease).count()
    }
}

impl<'a> Batch<'a> {
    /// Starts a batch on `store` from the state `meta`.
    pub fn begin(store: &'a StateStore, meta: StateMeta) -> Result<Self, StorageError> {
        Ok(Batch {
            store,
            changes: Layer::default(),
            events: Vec::new(),
            keys_added: 0,
            settle: Vec::new(),
            meta,
            sessions: store.working_sessions(),
            leases: store.working_leases(),
            lease_events: Vec::new(),
            file: std::cell::RefCell::default(),
        })
    }

    /// Leases granted and ended so far in this batch (each reported once).
    pub fn take_lease_events(&mut self) -> Vec<LeaseEvent> {
        std::mem::take(&mut self.lease_events)
    }

    /// The state as of the entries applied so far.
    pub fn meta(&self) -> &StateMeta {
        &self.meta
    }

    /// See [`StateMeta::advance`].
    pub fn advance(&mut self, index: u64, term: u64) {
        self.meta.advance(index, term);
    }

    /// See [`StateMeta::apply_conf_state`].
    pub fn apply_conf_state(&mut self, index: u64, term: u64, conf_state: ConfState, added: Option<Member>) {
        self.meta.apply_conf_state(index, term, conf_state, added);
    }

    /// What the batch holds of `key` (`pending` included) without reading
    /// the file.
    fn find(&self, pending: &Pending, key: &[u8]) -> Seen {
        if let Some(change) = pending.layer.get(key).or_else(|| self.changes.get(key)) {
            return Seen::Change {
                uncounted: Uncounted::of(change, Uncounted::InBatch),
                change: change.clone(),
            };
        }
        match self.store.memory_lookup(key) {
            MemoryLookup::Change { change, frozen } => Seen::Change {
                uncounted: Uncounted::of(&change, if frozen { Uncounted::No } else { Uncounted::InActive }),
                change,
            },
            MemoryLookup::NotHeld { file_empty: true } => Seen::Absent,
            MemoryLookup::NotHeld { file_empty: false } => Seen::InFile,
        }
    }

    /// A key's record as of the entries applied so far, `pending` included,
    /// resolved from the file if it was applied unresolved.
    fn lookup(&self, pending: &Pending, key: &[u8]) -> Result<Looked, StorageError> {
        self.read_seen(self.find(pending, key), key)
    }

    /// [`Self::lookup`] of what [`Self::find`] saw.
    fn read_seen(&self, seen: Seen, key: &[u8]) -> Result<Looked, StorageError> {
        let mut file = self.file.borrow_mut();
        Ok(match seen {
            Seen::Change {
                change: Some(record),
                uncounted,
            } if memtable::is_unresolved(&record) => {
                let below = self.store.file_header(key, &mut file)?;
                Looked {
                    uncounted_create: if below.is_none() { uncounted } else { Uncounted::No },
                    record: Some(memtable::resolve(record, below.as_ref())),
                }
            }
            Seen::Change { change, .. } => Looked {
                record: change,
                uncounted_create: Uncounted::No,
            },
            Seen::Absent => Looked {
                record: None,
                uncounted_create: Uncounted::No,
            },
            Seen::InFile => Looked {
                record: self.store.file_record(key, &mut file)?,
                uncounted_create: Uncounted::No,
            },
        })
    }

    /// A key's record as of the entries applied so far (see [`Self::lookup`]).
    fn record(&self, pending: &Pending, key: &[u8]) -> Result<Option<StoredValue>, StorageError> {
        Ok(self.lookup(pending, key)?.record)
    }

    /// Sets `key` at revision `index`, carrying its history on, attached to
    /// `set.lease`; refused (unapplied) if that lease does not exist or
    /// holds as many keys as one may. A key memory doesn't hold and no
    /// lease has is put unresolved (see [`memtable::is_unresolved`]): its
    /// previous record, all a put needs of which is its create revision and
    /// version, is not read from the file here.
    fn put(&self, pending: &mut Pending, index: u64, set: SetRequest) -> Result<Result<(), ApplyResult>, StorageError> {
        let SetRequest { key, value, lease } = set;
        let looked = match self.find(pending, &key) {
            Seen::InFile if self.leases.lease_of(&key).is_none() => None,
            seen => Some(self.read_seen(seen, &key)?),
        };
        let previous = looked.as_ref().and_then(|l| l.record.as_ref());
        if lease != 0 && previous.is_none_or(|p| p.lease != lease) {
            if let Err(refusal) = self.check_attach(pending, lease) {
                return Ok(Err(refusal));
            }
        }
        let (create_revision, version) = match &looked {
            None => (0, 0),
            Some(_) => (
                previous.map_or(index, |p| p.create_revision),
                previous.map_or(1, |p| p.version + 1),
            ),
        };
        let record = StoredValue {
            value: value.into(),
            create_revision,
            mod_revision: index,
            version,
            lease,
            value_ref: None,
        };
        let previous = looked.as_ref().map_or(Previous::Unknown, Looked::previous);
        pending.change(index, key, Some(record), previous);
        Ok(Ok(()))
    }

    /// Deletes `key` at revision `index`; returns how many keys that deleted
    /// (0 or 1).
    fn delete_key(&self, pending: &mut Pending, index: u64, key: Vec<u8>) -> Result<u64, StorageError> {
        let looked = self.lookup(pending, &key)?;
        if looked.record.is_none() {
            return Ok(0);
        }
        pending.change(index, key, None, looked.previous());
        Ok(1)
    }

    /// Applies a set or delete (of a key or a range); a refusal is the
    /// result to answer with, nothing of the command applied.
    fn write(
        &self,
        pending: &mut Pending,
        index: u64,
        op: WriteOp,
    ) -> Result<Result<ApplyResult, ApplyResult>, StorageError> {
        Ok(Ok(match op {
            WriteOp::Set(set) => {
                if let Err(refusal) = self.put(pending, index, set)? {
                    return Ok(Err(refusal));
                }
                ApplyResult::Set { revision: index }
            }
            WriteOp::Delete(delete) => {
                let deleted = match delete.range {
                    Some(range) => match self.delete_range(pending, index, &range)? {
                        Ok(deleted) => deleted,
                        Err(why) => return Ok(Err(ApplyResult::Refused(why))),
                    },
                    None => self.delete_key(pending, index, delete.key)?,
                };
                ApplyResult::Delete {
                    deleted,
                    revision: index,
                }
            }
        }))
    }

    /// Joins a command's changes to the batch.
    fn absorb(&mut self, pending: Pending) {
        for (key, from, to) in &pending.lease_moves {
            self.leases.attach(key, *from, *to);
        }
        self.keys_added += pending.keys_added;
        self.settle.extend(pending.settle);
        self.changes.absorb(pending.layer);
        self.events.extend(pending.events);
    }

    /// Applies one command. A failure is the store's, and fatal. A write of
    /// a client session is applied once: a retry gets the first result.
    pub fn apply(&mut self, index: u64, term: u64, command: Command) -> Result<ApplyResult, StorageError> {
        self.meta.advance(index, term);
        if command.proposed_at_ms > 0 {
            self.sessions.advance_clock(command.proposed_at_ms);
        }
        let write = WriteId {
            session: command.session_id,
            seq: command.seq,
            first_incomplete: command.first_incomplete,
        };
        let in_session = write.session != 0
            && matches!(
                command.op,
                Some(command::Op::Set(_))
                    | Some(command::Op::Delete(_))
                    | Some(command::Op::Txn(_))
                    | Some(command::Op::LeaseGrant(_))
                    | Some(command::Op::LeaseRevoke(_))
            );
        if in_session {
            match self.sessions.check(write) {
                Verdict::Apply => {}
                Verdict::Duplicate(outcome) => return Ok(replay(outcome, &command, &self.leases)),
                Verdict::Refuse(refusal, why) => return Ok(ApplyResult::SessionRefused(refusal, why)),
            }
        }
        let result = match command.op {
            Some(command::Op::RegisterSession(_)) => {
                self.sessions.register(index);
                return Ok(ApplyResult::SessionRegistered { session_id: index });
            }
            Some(command::Op::UpdateMember(update)) => {
                self.meta.update_member(update);
                return Ok(ApplyResult::Members(self.meta.members()));
            }
            None => return Ok(ApplyResult::Members(self.meta.members())),
            Some(command::Op::Set(set)) => self.apply_write(index, WriteOp::Set(set))?,
            Some(command::Op::Delete(delete)) => self.apply_write(index, WriteOp::Delete(delete))?,
            Some(command::Op::Txn(txn)) => self.apply_txn(index, txn)?,
            Some(command::Op::LeaseGrant(grant)) => self.grant_lease(index, grant.ttl),
            Some(command::Op::LeaseRevoke(revoke)) => self.end_lease(index, revoke.id, false)?,
            // Only in the term of the leader that timed it out (see LeaseExpire).
            Some(command::Op::LeaseExpire(expire)) if expire.term == term => self.end_lease(index, expire.id, true)?,
            Some(command::Op::LeaseExpire(_)) => ApplyResult::LeaseEnded {
                revision: index,
                deleted: 0,
            },
        };
        if in_session {
            if let Some(outcome) = Outcome::of(&result) {
                self.sessions.record(write, outcome);
            }
        }
        Ok(result)
    }

    fn apply_write(&mut self, index: u64, op: WriteOp) -> Result<ApplyResult, StorageError> {
        let mut pending = Pending::default();
        Ok(match self.write(&mut pending, index, op)? {
            Ok(result) => {
                self.absorb(pending);
                result
            }
            Err(refusal) => refusal,
        })
    }

    /// Hands the batch to the store (readers see it at once; the file has
    /// it after the next flush) and returns the state it led to.
    pub fn commit(self) -> Result<StateMeta, StorageError> {
        let Batch {
            store,
            changes,
            events,
            keys_added,
            settle,
            meta,
            mut sessions,
            mut leases,
            lease_events: _,
            file,
        } = self;
        // The batch's read transaction ends before the batch is handed over
        // (commit_batch may wait for a flush).
        drop(file);
        let applied = Applied {
            changes,
            events,
            header: meta.to_header(),
            sessions: sessions.take_delta(),
            leases: leases.take_delta(),
            keys_added,
            settle,
        };
        drop((sessions, leases));
        store.commit_batch(applied)?;
        Ok(meta)
    }
}

/// The writes a command or a transaction operation makes.
enum WriteOp {
    Set(SetRequest),
    Delete(DeleteRequest),
}

/// The answer of a write applied before, for its retry `command`.
fn replay(outcome: Outcome, command: &Command, leases: &Leases) -> ApplyResult {
    match (outcome, &command.op) {
        // A lease's grant and revoke are kept as a set and a delete are.
        // The TTL the retry carries was raised by the node it went through;
        // the lease (if still there) says what was granted.
        (Outcome::Set { revision }, Some(command::Op::LeaseGrant(grant))) => ApplyResult::LeaseGranted {
            id: revision,
            ttl: leases.get(revision).map_or(grant.ttl, |l| l.ttl),
        },
        (Outcome::Delete { deleted, revision }, Some(command::Op::LeaseRevoke(_))) => {
            ApplyResult::LeaseEnded { revision, deleted }
        }
        (outcome, _) => replay_write(outcome, command),
    }
}

fn replay_write(outcome: Outcome, command: &Command) -> ApplyResult {
    match outcome {
        Outcome::Set { revision } => ApplyResult::Set { revision },
        Outcome::Delete { deleted, revision } => ApplyResult::Delete { deleted, revision },
        Outcome::Txn(kept) => {
            let txn = match &command.op {
                Some(command::Op::Txn(txn)) => txn.clone(),
                // Another command under the same number: a client bug; the
                // branch and revision still say what happened.
                _ => Default::default(),
            };
            ApplyResult::Txn(Box::new(replay_txn(&kept, &txn)))
        }
    }
}

impl Outcome {
    /// What a session keeps of an applied write's result (nothing of a
    /// refused one: it changed nothing, so a retry may apply).
    fn of(result: &ApplyResult) -> Option<Outcome> {
        match result {
            ApplyResult::Set { revision } => Some(Outcome::Set { revision: *revision }),
            ApplyResult::Delete { deleted, revision } => Some(Outcome::Delete {
                deleted: *deleted,
                revision: *revision,
            }),
            ApplyResult::Txn(response) => Some(Outcome::txn(response)),
            ApplyResult::LeaseGranted { id, .. } => Some(Outcome::Set { revision: *id }),
            ApplyResult::LeaseEnded { revision, deleted } => Some(Outcome::Delete {
                deleted: *deleted,
                revision: *revision,
            }),
            _ => None,
        }
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
    use crate::storage::state_store::ScanPage;

    pub(super) fn set(k: &str, v: &str) -> Command {
        Command {
            op: Some(command::Op::Set(SetRequest {
                key: k.into(),
                value: v.into(),
                lease: 0,
            })),
            ..Default::default()
        }
    }

    pub(super) fn delete(k: &str) -> Command {
        Command {
            op: Some(command::Op::Delete(DeleteRequest {
                key: k.into(),
                range: None,
            })),
            ..Default::default()
        }
    }

    fn member(id: u64) -> Member {
        Member {
            id,
            peer_addr: format!("127.0.0.1:{}", 7000 + id),
            client_addr: String::new(),
            role: 0,
            incarnation: 0,
        }
    }

    fn voters(ids: &[u64]) -> ConfState {
        let mut cs = ConfState::default();
        cs.voters = ids.to_vec();
        cs
    }

    pub(super) fn machine(dir: &std::path::Path) -> StateMachine {
        StateMachine::open(Arc::new(StateStore::open(dir, 8 << 20).unwrap())).unwrap()
    }

    /// Applies `commands` from `first` on, in one batch (flushed to the file
    /// when `durable`).
    pub(super) fn apply_all(
        sm: &mut StateMachine,
        first: u64,
        commands: Vec<Command>,
        durable: bool,
    ) -> Vec<ApplyResult> {
        let store = sm.store().clone();
        let mut batch = Batch::begin(&store, sm.meta().clone()).unwrap();
        let results = commands
            .into_iter()
            .enumerate()
            .map(|(i, c)| batch.apply(first + i as u64, 1, c).unwrap())
            .collect();
        sm.set_meta(batch.commit().unwrap());
        if durable {
            store.flush().unwrap();
        }
        results
    }

    pub(super) fn in_session(mut command: Command, session_id: u64, seq: u64, first_incomplete: u64) -> Command {
        command.session_id = session_id;
        command.seq = seq;
        command.first_incomplete = first_incomplete;
        command.proposed_at_ms = 1_000 + seq;
        command
    }

    pub(super) fn register() -> Command {
        Command {
            op: Some(command::Op::RegisterSession(crate::proto::RegisterSessionRequest {})),
            proposed_at_ms: 1_000,
            ..Default::default()
        }
    }

    #[test]
    fn a_retried_write_applies_once_even_after_a_flush_and_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = machine(dir.path());
        let registered = apply_all(&mut sm, 2, vec![register()], false);
        assert_eq!(registered, [ApplyResult::SessionRegistered { session_id: 2 }]);
        let first = apply_all(&mut sm, 3, vec![in_session(set("k", "a"), 2, 1, 1)], false);
        assert_eq!(first, [ApplyResult::Set { revision: 3 }]);
        apply_all(&mut sm, 4, vec![set("k", "b")], false);
        // The retry of write 1 (its reply was lost) answers as the first did,
        // and does not overwrite the newer value.
        let retry = apply_all(&mut sm, 5, vec![in_session(set("k", "a"), 2, 1, 1)], true);
        assert_eq!(retry, [ApplyResult::Set { revision: 3 }]);
        assert_eq!(sm.get(b"k").unwrap().unwrap(), b"b");
        let deleted = apply_all(&mut sm, 6, vec![in_session(delete("k"), 2, 2, 1)], true);
        let deleted_at_6 = ApplyResult::Delete {
            deleted: 1,
            revision: 6,
        };
        assert_eq!(deleted[0], deleted_at_6);

        // The sessions are in the file with the state record they match.
        sm.store().close();
        let mut sm = machine(dir.path());
        assert_eq!(sm.applied_index(), 6);
        let again = apply_all(
            &mut sm,
            7,
            vec![
                in_session(delete("k"), 2, 2, 1),
                in_session(set("k", "a"), 2, 1, 1),
                // Never registered, even as a first write.
                in_session(set("x", "y"), 78, 1, 1),
            ],
            false,
        );
        assert_eq!(again[0], deleted_at_6);
        assert_eq!(again[1], ApplyResult::Set { revision: 3 });
        assert!(
            matches!(&again[2], ApplyResult::SessionRefused(Refusal::Expired, why) if why.contains("expired")),
            "{again:?}"
        );
        assert_eq!(sm.get(b"k").unwrap(), None, "nothing was applied twice");
        assert_eq!(sm.get(b"x").unwrap(), None, "nor the refused write");
    }

    #[test]
    fn a_batch_reads_what_a_flush_moved_to_the_file_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = machine(dir.path());
        apply_all(&mut sm, 1, vec![set("k", "1")], false);
        let store = sm.store().clone();
        let mut batch = Batch::begin(&store, sm.meta().clone()).unwrap();
        // A lookup that goes to the file opens the batch's view of it...
        batch.apply(2, 1, set("x", "1")).unwrap();
        // ...then a flush moves "k" from memory to the file and drops it
        // from memory: the view must not be used for it any more.
        store.flush().unwrap();
        batch.apply(3, 1, set("k", "2")).unwrap();
        sm.set_meta(batch.commit().unwrap());
        let k = store.get(b"k").unwrap().unwrap();
        assert_eq!((k.create_revision, k.version, k.mod_revision), (1, 2, 3));
    }

    #[test]
    fn applies_sets_and_deletes_in_order_with_revisions() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = machine(dir.path());
        let results = apply_all(&mut sm, 2, vec![set("a", "1"), set("a", "2"), set("b", "x")], false);
        assert_eq!(results[0], ApplyResult::Set { revision: 2 });
        assert_eq!(sm.get(b"a").unwrap().unwrap(), b"2");
        let record = sm.store().get(b"a").unwrap().unwrap();
        assert_eq!((record.create_revision, record.mod_revision, record.version), (2, 3, 2));
        let results = apply_all(&mut sm, 5, vec![delete("a"), delete("a")], false);
        assert_eq!(
            results,
            [
                ApplyResult::Delete {
                    deleted: 1,
                    revision: 5
                },
                ApplyResult::Delete {
                    deleted: 0,
                    revision: 6
                }
            ]
        );
        assert_eq!(sm.applied_index(), 6);
        assert_eq!(sm.store().len().unwrap(), 1);
    }

    #[test]
    fn a_batch_not_committed_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = machine(dir.path());
        apply_all(&mut sm, 1, vec![set("kept", "1")], true);
        {
            let store = sm.store().clone();
            let mut batch = Batch::begin(&store, sm.meta().clone()).unwrap();
            batch.apply(2, 1, set("lost", "1")).unwrap();
            // dropped without commit
        }
        assert_eq!(sm.get(b"lost").unwrap(), None);
        assert_eq!(sm.store().header().unwrap().index, 1);
    }

    #[test]
    fn data_and_applied_index_come_back_together_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut sm = machine(dir.path());
            apply_all(&mut sm, 1, vec![set("a", "1")], true);
            apply_all(&mut sm, 2, vec![set("b", "2")], false);
            assert_eq!(sm.store().durable_index(), 1);
            assert_eq!(sm.get(b"b").unwrap().unwrap(), b"2", "readers see memory");
        }
        // What was only in memory is gone (the raft log replays it), and
        // the file's index says so.
        let mut sm = machine(dir.path());
        assert_eq!(sm.applied_index(), 1);
        assert_eq!(sm.get(b"a").unwrap().unwrap(), b"1");
        assert_eq!(sm.get(b"b").unwrap(), None);
        apply_all(&mut sm, 2, vec![set("b", "2")], true);
        drop(sm);
        let sm = machine(dir.path());
        assert_eq!(sm.get(b"b").unwrap().unwrap(), b"2");
        assert_eq!(sm.store().durable_index(), 2);
    }

    #[test]
    fn scans_merge_memory_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = machine(dir.path());
        let commands = ["a", "b", "c", "d", "e"].iter().map(|k| set(k, "file")).collect();
        apply_all(&mut sm, 1, commands, true);
        // In memory: "b" deleted, "c" changed, "bb" and "f" new.
        apply_all(
            &mut sm,
            6,
            vec![delete("b"), set("c", "mem"), set("bb", "mem"), set("f", "mem")],
            false,
        );
        let pairs = |p: &ScanPage| {
            p.pairs
                .iter()
                .map(|kv| {
                    format!(
                        "{}={}",
                        String::from_utf8_lossy(&kv.key),
                        String::from_utf8_lossy(&kv.value)
                    )
                })
                .collect::<Vec<_>>()
        };
        let all = sm.store().scan(b"", b"", b"", 0, usize::MAX).unwrap();
        assert_eq!(pairs(&all), ["a=file", "bb=mem", "c=mem", "d=file", "e=file", "f=mem"]);
        assert!(!all.more);
        assert_eq!(sm.store().len().unwrap(), 6);
        let crossed = sm.store().scan(b"e", b"", b"c", 0, usize::MAX).unwrap();
        assert_eq!(crossed, ScanPage::default(), "a prefix past `to` is an empty range");
        // Page by page (two at a time), nothing is lost or repeated.
        let (mut seen, mut from) = (Vec::new(), Vec::new());
        loop {
            let page = sm.store().scan(b"", &from, b"", 2, usize::MAX).unwrap();
            seen.extend(pairs(&page));
            if !page.more {
                break;
            }
            from = page.pairs.last().unwrap().key.clone();
            from.push(0);
        }
        assert_eq!(seen, pairs(&all));
        // The same after a flush moved memory into the file.
        sm.store().flush().unwrap();
        assert_eq!(
            pairs(&sm.store().scan(b"", b"", b"", 0, usize::MAX).unwrap()),
            pairs(&all)
        );
        assert_eq!(sm.store().view().unwrap().len().unwrap(), 6);
    }

    #[test]
    fn scans_by_prefix_range_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = machine(dir.path());
        let commands = ["a", "b/1", "b/2", "b/3", "c"].iter().map(|k| set(k, "v")).collect();
        apply_all(&mut sm, 1, commands, false);
        let keys = |p: &ScanPage| {
            p.pairs
                .iter()
                .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
                .collect::<Vec<_>>()
        };
        let scan =
            |prefix: &[u8], from: &[u8], to: &[u8], limit, max| sm.store().scan(prefix, from, to, limit, max).unwrap();
        assert_eq!(keys(&scan(b"b/", b"", b"", 0, usize::MAX)), ["b/1", "b/2", "b/3"]);
        assert_eq!(keys(&scan(b"", b"b/2", b"c", 0, usize::MAX)), ["b/2", "b/3"]);
        let page = scan(b"", b"", b"", 2, usize::MAX);
        assert_eq!(keys(&page), ["a", "b/1"]);
        assert!(page.more);
        let page = scan(b"", b"", b"", 0, 1);
        assert_eq!(keys(&page), ["a"], "a byte cap still returns one pair");
        assert!(page.more);
        assert!(!scan(b"b/", b"", b"", 3, usize::MAX).more);
    }

    #[test]
    fn tracks_members_roles_and_removals() {
        let mut sm = StateMeta::new(1);
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
        let dir = tempfile::tempdir().unwrap();
        let mut sm = machine(dir.path());
        let mut meta = sm.meta().clone();
        meta.apply_conf_state(1, 1, voters(&[1]), Some(member(1)));
        sm.set_meta(meta);
        let update = Member {
            id: 1,
            client_addr: "127.0.0.1:9999".into(),
            ..Default::default()
        };
        let command = Command {
            op: Some(command::Op::UpdateMember(update)),
            ..Default::default()
        };
        apply_all(&mut sm, 2, vec![command], false);
        let m = sm.member(1).unwrap();
        assert_eq!(m.client_addr, "127.0.0.1:9999");
        assert_eq!(m.peer_addr, "127.0.0.1:7001", "an empty peer address keeps the old one");
    }

    #[test]
    fn a_member_record_keeps_the_first_incarnation_published() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = machine(dir.path());
        let mut meta = sm.meta().clone();
        meta.apply_conf_state(1, 1, voters(&[1]), Some(member(1)));
        sm.set_meta(meta);
        let publish = |incarnation: u64, client_addr: &str| Command {
            op: Some(command::Op::UpdateMember(Member {
                id: 1,
                client_addr: client_addr.into(),
                incarnation,
                ..Default::default()
            })),
            ..Default::default()
        };
        apply_all(&mut sm, 2, vec![publish(7, "127.0.0.1:1")], false);
        assert_eq!(sm.member(1).unwrap().incarnation, 7);
        // Another data dir under the same id changes nothing.
        apply_all(&mut sm, 3, vec![publish(8, "127.0.0.1:2")], false);
        let m = sm.member(1).unwrap();
        assert_eq!((m.incarnation, m.client_addr.as_str()), (7, "127.0.0.1:1"));
        // A release that does not send one still updates its addresses.
        apply_all(&mut sm, 4, vec![publish(0, "127.0.0.1:3")], false);
        let m = sm.member(1).unwrap();
        assert_eq!((m.incarnation, m.client_addr.as_str()), (7, "127.0.0.1:3"));
    }

    #[test]
    fn the_state_record_round_trips() {
        let mut meta = StateMeta::new(99);
        meta.apply_conf_state(1, 1, voters(&[1, 2]), Some(member(1)));
        meta.apply_conf_state(2, 1, voters(&[1, 2]), Some(member(2)));
        meta.apply_conf_state(4, 3, voters(&[1]), None);
        let back = StateMeta::from_header(&meta.to_header()).unwrap();
        assert_eq!(back, meta);
        assert!(back.is_removed(2));
        let mut broken = meta.to_header();
        broken.conf_state = vec![0xff, 0xff, 0xff];
        assert!(StateMeta::from_header(&broken).is_err());
    }
}

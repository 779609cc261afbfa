//! Client sessions: what makes a retried write apply once (the Raft
//! dissertation, section 6.3).
//!
//! A client registers a session through raft (its id is the index of the
//! registering entry, so ids never repeat) and numbers its writes in it. The
//! state machine keeps, per session, the result of each applied write the
//! client may still be waiting for; a retry (same session, same number) is
//! answered from that record instead of being applied again. The client also
//! sends the lowest number it still waits for, so results below it are
//! forgotten and a late duplicate below it is refused, never applied.
//!
//! Everything here is decided in log order from the log alone, so every node
//! keeps the same table: time is the largest `proposed_at_ms` applied so far
//! (the proposer's clock, carried in the entry), a session idle for
//! [`SESSION_TTL_MS`] is treated exactly as one never seen, and the caps
//! below evict the least recently active session first.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::proto::{ClientSession, KeptTxn, SessionResult, SessionTable, TxnRequest, TxnResponse};

/// A session unused this long (by the state machine's clock) is gone. Far
/// longer than any client deadline, so a write is never retried into it.
pub const SESSION_TTL_MS: u64 = 15 * 60 * 1000;
/// At most this many sessions; the least recently active goes first.
pub const MAX_SESSIONS: usize = 4096;
/// At most this many results kept per session: a client with more writes in
/// flight in one session gets an error for the extra ones.
pub const MAX_RESULTS_PER_SESSION: usize = 1024;
/// At most this many results over all sessions (the table travels in the
/// state record and snapshot headers, so it must stay small).
pub const MAX_RESULTS: usize = 65_536;

/// A transaction's reads are kept for its retries only if they come to at
/// most this (encoded): the table travels in every state record, and a retry
/// (rare: a lost reply) still learns the branch and every write's result.
pub const MAX_KEPT_READ_BYTES: usize = 512;

/// What an applied write answered, as kept for its retries.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A set, at this revision.
    Set {
        /// The log index that applied it.
        revision: u64,
    },
    /// A delete (of a key or a range), at this revision.
    Delete {
        /// How many keys it deleted.
        deleted: u64,
        /// The log index that applied it.
        revision: u64,
    },
    /// A transaction, kept small (see [`Outcome::txn`] and [`replay_txn`]).
    Txn(Box<KeptTxn>),
}

impl Outcome {
    /// What is kept of a transaction's answer: its branch, revision and
    /// delete counts, and its reads if they are small.
    pub fn txn(response: &TxnResponse) -> Outcome {
        use crate::proto::txn_op_result::Result as R;
        use prost::Message as _;
        let mut kept = KeptTxn {
            succeeded: response.succeeded,
            revision: response.revision,
            ..Default::default()
        };
        for result in &response.results {
            match &result.result {
                Some(R::Delete(d)) => kept.deleted.push(d.deleted),
                Some(R::Put(_)) => {}
                _ => kept.reads.push(result.clone()),
            }
        }
        if kept.reads.iter().map(|r| r.encoded_len()).sum::<usize>() > MAX_KEPT_READ_BYTES {
            kept.reads.clear();
            kept.reads_omitted = true;
        }
        Outcome::Txn(Box::new(kept))
    }
}

/// A transaction's answer rebuilt from what was kept and the transaction
/// itself (a retry carries the same one).
pub fn replay_txn(kept: &KeptTxn, txn: &TxnRequest) -> TxnResponse {
    use crate::proto::{txn_op, txn_op_result::Result as R, DeleteResponse, SetResponse, TxnOpResult};
    let branch = if kept.succeeded { &txn.success } else { &txn.failure };
    let (mut deleted, mut reads) = (kept.deleted.iter(), kept.reads.iter());
    let results = branch
        .iter()
        .map(|op| match op.op {
            Some(txn_op::Op::Put(_)) => TxnOpResult {
                result: Some(R::Put(SetResponse {
                    revision: kept.revision,
                })),
            },
            Some(txn_op::Op::Delete(_)) => {
                let deleted = deleted.next().copied().unwrap_or_default();
                TxnOpResult {
                    result: Some(R::Delete(DeleteResponse {
                        existed: deleted > 0,
                        revision: kept.revision,
                        deleted,
                    })),
                }
            }
            _ => reads.next().cloned().unwrap_or_default(),
        })
        .collect();
    TxnResponse {
        succeeded: kept.succeeded,
        revision: kept.revision,
        results,
        reads_omitted: kept.reads_omitted,
    }
}

/// Which write of which session a command is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteId {
    /// The client's session (never 0 here).
    pub session: u64,
    /// The write's number in it.
    pub seq: u64,
    /// The lowest number the client still waits for.
    pub first_incomplete: u64,
}

/// What to do with a write.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Apply it (then [`Sessions::record`] its outcome).
    Apply,
    /// Already applied: answer with this, change nothing.
    Duplicate(Outcome),
    /// Refuse it, unapplied, for this reason.
    Refuse(Refusal, String),
}

/// Why a write of a session is refused (it is never applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The session is not (or no longer) known: register a new one.
    Expired,
    /// A copy of a write below what the client acknowledged.
    Stale,
    /// Too many of the session's writes in flight: retry later.
    Busy,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Session {
    first_incomplete: u64,
    last_active_ms: u64,
    results: BTreeMap<u64, Outcome>,
}

/// Every live session, with the state machine's clock.
///
/// The raft loop works on its own copy and hands the store what each batch
/// changed ([`Sessions::take_delta`]), so neither copies the whole table.
#[derive(Debug, Clone, Default)]
pub struct Sessions {
    clock_ms: u64,
    sessions: HashMap<u64, Session>,
    /// (last_active_ms, id), oldest first: expiry and eviction order.
    by_activity: BTreeSet<(u64, u64)>,
    results: usize,
    /// Sessions changed or removed since the last delta.
    dirty: BTreeSet<u64>,
}

impl PartialEq for Sessions {
    fn eq(&self, other: &Self) -> bool {
        self.clock_ms == other.clock_ms && self.sessions == other.sessions
    }
}

/// What one batch changed in the sessions.
#[derive(Debug, Clone, Default)]
pub struct SessionDelta {
    clock_ms: u64,
    changed: Vec<(u64, Option<Session>)>,
}

impl Sessions {
    /// Moves the clock to `proposed_at_ms` if that is later, and forgets the
    /// sessions that expired by then. Called for every write, in log order.
    pub fn advance_clock(&mut self, proposed_at_ms: u64) {
        self.clock_ms = self.clock_ms.max(proposed_at_ms);
        let horizon = self.clock_ms.saturating_sub(SESSION_TTL_MS);
        while let Some(&(active, id)) = self.by_activity.first() {
            if active >= horizon {
                break;
            }
            self.remove(id);
        }
    }

    /// Decides what to do with write `w` (after [`Sessions::advance_clock`]).
    pub fn check(&mut self, w: WriteId) -> Verdict {
        // Sessions exist only once registered ([`Sessions::register`]): an
        // unknown one may have held this very write's result, so nothing of
        // it is applied, ever.
        let Some(session) = self.sessions.get_mut(&w.session) else {
            return Verdict::Refuse(
                Refusal::Expired,
                format!(
                    "session {:016x} expired (idle over {} minutes, or evicted, or the cluster was restored from a backup); \
                     the write was not applied: retry it in a new session",
                    w.session,
                    SESSION_TTL_MS / 60_000
                ),
            );
        };
        if w.first_incomplete > session.first_incomplete {
            self.dirty.insert(w.session);
            session.first_incomplete = w.first_incomplete;
            // In place: this runs for nearly every write.
            while let Some(entry) = session.results.first_entry() {
                if *entry.key() >= w.first_incomplete {
                    break;
                }
                entry.remove();
                self.results -= 1;
            }
        }
        if w.seq < session.first_incomplete {
            return Verdict::Refuse(
                Refusal::Stale,
                format!(
                    "write {} of session {:016x} was answered already; this late copy was not applied",
                    w.seq, w.session
                ),
            );
        }
        if let Some(outcome) = session.results.get(&w.seq) {
            return Verdict::Duplicate(outcome.clone());
        }
        if session.results.len() >= MAX_RESULTS_PER_SESSION {
            return Verdict::Refuse(
                Refusal::Busy,
                format!(
                    "session {:016x} has over {MAX_RESULTS_PER_SESSION} writes in flight; the write was not applied: retry shortly",
                    w.session
                ),
            );
        }
        Verdict::Apply
    }

    /// Opens session `id` (the index of the entry that registers it).
    pub fn register(&mut self, id: u64) {
        let clock = self.clock_ms;
        self.put(
            id,
            Session {
                first_incomplete: 1,
                last_active_ms: clock,
                results: BTreeMap::new(),
            },
        );
        self.dirty.insert(id);
        self.enforce_caps(id);
    }

    /// Evicts the least recently active sessions (never `keep`) while over a cap.
    fn enforce_caps(&mut self, keep: u64) {
        while self.sessions.len() > MAX_SESSIONS || self.results > MAX_RESULTS {
            let Some(&(_, oldest)) = self.by_activity.iter().find(|(_, id)| *id != keep) else {
                break;
            };
            self.remove(oldest);
        }
    }

    /// Records the outcome of write `w`, which was just applied.
    pub fn record(&mut self, w: WriteId, outcome: Outcome) {
        let clock = self.clock_ms;
        let session = self.sessions.entry(w.session).or_insert_with(|| Session {
            first_incomplete: w.first_incomplete.max(1),
            last_active_ms: clock,
            results: BTreeMap::new(),
        });
        self.by_activity.remove(&(session.last_active_ms, w.session));
        session.last_active_ms = clock;
        self.by_activity.insert((clock, w.session));
        if session.results.insert(w.seq, outcome).is_none() {
            self.results += 1;
        }
        self.dirty.insert(w.session);
        self.enforce_caps(w.session);
    }

    fn remove(&mut self, id: u64) {
        if let Some(session) = self.sessions.remove(&id) {
            self.by_activity.remove(&(session.last_active_ms, id));
            self.results -= session.results.len();
            self.dirty.insert(id);
        }
    }

    fn put(&mut self, id: u64, session: Session) {
        self.remove(id);
        self.results += session.results.len();
        self.by_activity.insert((session.last_active_ms, id));
        self.sessions.insert(id, session);
    }

    /// What changed since the last call: for the store's copy.
    pub fn take_delta(&mut self) -> SessionDelta {
        let changed = std::mem::take(&mut self.dirty)
            .into_iter()
            .map(|id| (id, self.sessions.get(&id).cloned()))
            .collect();
        SessionDelta {
            clock_ms: self.clock_ms,
            changed,
        }
    }

    /// Brings this copy to where the one that produced `delta` is.
    pub fn apply_delta(&mut self, delta: SessionDelta) {
        self.clock_ms = delta.clock_ms;
        for (id, session) in delta.changed {
            match session {
                Some(session) => self.put(id, session),
                None => self.remove(id),
            }
        }
        self.dirty.clear();
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// True when no session is kept.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// The table for the state record, in a fixed order.
    pub fn to_proto(&self) -> SessionTable {
        let mut sessions: Vec<ClientSession> = self
            .sessions
            .iter()
            .map(|(id, s)| ClientSession {
                id: *id,
                first_incomplete: s.first_incomplete,
                last_active_ms: s.last_active_ms,
                results: s
                    .results
                    .iter()
                    .map(|(seq, outcome)| match outcome {
                        Outcome::Set { revision } => SessionResult {
                            seq: *seq,
                            revision: *revision,
                            ..Default::default()
                        },
                        Outcome::Delete { deleted, revision } => SessionResult {
                            seq: *seq,
                            revision: *revision,
                            delete: true,
                            existed: *deleted > 0,
                            deleted: *deleted,
                            txn: None,
                        },
                        Outcome::Txn(kept) => SessionResult {
                            seq: *seq,
                            revision: kept.revision,
                            txn: Some((**kept).clone()),
                            ..Default::default()
                        },
                    })
                    .collect(),
            })
            .collect();
        sessions.sort_by_key(|s| s.id);
        SessionTable {
            clock_ms: self.clock_ms,
            sessions,
        }
    }

    /// The table a state record carries (none: empty).
    pub fn from_proto(table: Option<&SessionTable>) -> Self {
        let mut sessions = Sessions::default();
        let Some(table) = table else { return sessions };
        sessions.clock_ms = table.clock_ms;
        for s in &table.sessions {
            let results: BTreeMap<u64, Outcome> = s
                .results
                .iter()
                .map(|r| {
                    let outcome = if let Some(txn) = &r.txn {
                        Outcome::Txn(Box::new(txn.clone()))
                    } else if r.delete {
                        // `existed` alone: recorded before range deletes.
                        Outcome::Delete {
                            deleted: r.deleted.max(u64::from(r.existed)),
                            revision: r.revision,
                        }
                    } else {
                        Outcome::Set { revision: r.revision }
                    };
                    (r.seq, outcome)
                })
                .collect();
            sessions.put(
                s.id,
                Session {
                    first_incomplete: s.first_incomplete,
                    last_active_ms: s.last_active_ms,
                    results,
                },
            );
        }
        sessions.dirty.clear();
        sessions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(session: u64, seq: u64, first_incomplete: u64) -> WriteId {
        WriteId {
            session,
            seq,
            first_incomplete,
        }
    }

    #[test]
    fn a_retry_is_answered_from_the_record_and_a_late_copy_is_refused() {
        let mut s = Sessions::default();
        s.advance_clock(1_000);
        s.register(7);
        assert_eq!(s.check(w(7, 1, 1)), Verdict::Apply);
        s.record(w(7, 1, 1), Outcome::Set { revision: 10 });
        // Writes 2 and 3 in flight at once, applied out of order.
        assert_eq!(s.check(w(7, 3, 2)), Verdict::Apply);
        let deleted = Outcome::Delete {
            deleted: 1,
            revision: 11,
        };
        s.record(w(7, 3, 2), deleted.clone());
        assert_eq!(s.check(w(7, 2, 2)), Verdict::Apply);
        s.record(w(7, 2, 2), Outcome::Set { revision: 12 });
        assert_eq!(s.check(w(7, 3, 2)), Verdict::Duplicate(deleted));
        // The client got 1..3: a copy of 2 arriving later is not applied.
        assert_eq!(s.check(w(7, 4, 4)), Verdict::Apply);
        assert!(matches!(s.check(w(7, 2, 2)), Verdict::Refuse(Refusal::Stale, m) if m.contains("answered already")));
        assert_eq!(s.results, 0, "results below first_incomplete are forgotten");
    }

    #[test]
    fn only_registered_sessions_apply_and_idle_ones_expire() {
        let mut s = Sessions::default();
        s.advance_clock(1_000);
        // Never registered (or dropped since): refused even as a first write,
        // which may be the retry of one applied before the session went.
        assert!(matches!(s.check(w(9, 1, 1)), Verdict::Refuse(Refusal::Expired, m) if m.contains("expired")));
        s.register(9);
        s.record(w(9, 1, 1), Outcome::Set { revision: 3 });
        s.advance_clock(1_000 + SESSION_TTL_MS - 1);
        assert_eq!(s.check(w(9, 1, 1)), Verdict::Duplicate(Outcome::Set { revision: 3 }));
        // A clock that goes back (another proposer's) changes nothing.
        s.advance_clock(5);
        s.advance_clock(1_000 + SESSION_TTL_MS + 1);
        assert!(s.is_empty(), "idle past the TTL");
        assert!(matches!(s.check(w(9, 1, 1)), Verdict::Refuse(Refusal::Expired, _)));
    }

    #[test]
    fn caps_evict_the_least_recently_active_session_and_the_table_round_trips() {
        let mut s = Sessions::default();
        for id in 1..=(MAX_SESSIONS as u64 + 1) {
            s.advance_clock(id);
            s.register(id);
            s.record(w(id, 1, 1), Outcome::Set { revision: id });
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        assert!(
            matches!(s.check(w(1, 1, 1)), Verdict::Refuse(Refusal::Expired, _)),
            "the oldest went"
        );
        assert_eq!(s.check(w(2, 1, 1)), Verdict::Duplicate(Outcome::Set { revision: 2 }));

        let mut busy = Sessions::default();
        busy.register(1);
        for seq in 1..=MAX_RESULTS_PER_SESSION as u64 {
            busy.record(w(1, seq, 1), Outcome::Set { revision: seq });
        }
        assert!(matches!(busy.check(w(1, 5_000, 1)), Verdict::Refuse(Refusal::Busy, m) if m.contains("in flight")));

        let back = Sessions::from_proto(Some(&s.to_proto()));
        assert_eq!(back, s);
        // A copy kept by deltas ends where the original is.
        let mut copy = Sessions::default();
        let mut original = Sessions::default();
        for id in 1..=20u64 {
            original.advance_clock(id * SESSION_TTL_MS / 10);
            original.register(id % 7 + 100);
            original.record(w(id % 7 + 100, id, 1), Outcome::Set { revision: id });
            if id % 5 == 0 {
                copy.apply_delta(original.take_delta());
            }
        }
        assert_eq!(copy, original);
        assert_eq!(copy.to_proto(), original.to_proto());
        assert_eq!(Sessions::from_proto(None), Sessions::default());
    }

    #[test]
    fn transactions_and_range_deletes_are_kept_small_and_replayed_whole() {
        use crate::proto::{txn_op_result::Result as R, GetResponse, TxnOp, TxnOpResult};
        let txn = TxnRequest {
            compare: vec![],
            success: vec![
                TxnOp::put("a", "1"),
                TxnOp::get("a"),
                TxnOp::delete("b"),
                TxnOp::put("c", "2"),
            ],
            failure: vec![],
        };
        let get = |value: Vec<u8>| TxnOpResult {
            result: Some(R::Get(GetResponse {
                found: true,
                value,
                ..Default::default()
            })),
        };
        let answer = |read: TxnOpResult| TxnResponse {
            succeeded: true,
            revision: 40,
            results: vec![
                TxnOpResult {
                    result: Some(R::Put(crate::proto::SetResponse { revision: 40 })),
                },
                read,
                TxnOpResult {
                    result: Some(R::Delete(crate::proto::DeleteResponse {
                        existed: true,
                        revision: 40,
                        deleted: 1,
                    })),
                },
                TxnOpResult {
                    result: Some(R::Put(crate::proto::SetResponse { revision: 40 })),
                },
            ],
            reads_omitted: false,
        };
        let small = answer(get(b"v".to_vec()));
        let Outcome::Txn(kept) = Outcome::txn(&small) else {
            panic!("a transaction is kept as one")
        };
        assert_eq!(kept.deleted, [1]);
        assert_eq!(replay_txn(&kept, &txn), small, "replayed exactly");
        let large = answer(get(vec![7; MAX_KEPT_READ_BYTES]));
        let Outcome::Txn(kept) = Outcome::txn(&large) else {
            panic!("a transaction is kept as one")
        };
        assert!(kept.reads.is_empty() && kept.reads_omitted);
        let replayed = replay_txn(&kept, &txn);
        assert!(replayed.reads_omitted && replayed.succeeded && replayed.revision == 40);
        assert_eq!(
            replayed.results[1],
            TxnOpResult::default(),
            "the read is left out, in place"
        );
        assert_eq!(
            (&replayed.results[0], &replayed.results[2], &replayed.results[3]),
            (&large.results[0], &large.results[2], &large.results[3]),
            "writes are exact"
        );

        let mut s = Sessions::default();
        s.advance_clock(1_000);
        s.register(5);
        s.record(w(5, 1, 1), Outcome::txn(&large));
        let range = Outcome::Delete {
            deleted: 300,
            revision: 41,
        };
        s.record(w(5, 2, 1), range.clone());
        let back = Sessions::from_proto(Some(&s.to_proto()));
        assert_eq!(back, s);
        assert_eq!(back.clone().check(w(5, 2, 1)), Verdict::Duplicate(range));
        // A record from before range deletes says only whether the key existed.
        let mut old = s.to_proto();
        old.sessions[0].results[1].deleted = 0;
        old.sessions[0].results[1].existed = true;
        let Verdict::Duplicate(Outcome::Delete { deleted, .. }) = Sessions::from_proto(Some(&old)).check(w(5, 2, 1))
        else {
            panic!("the delete is kept")
        };
        assert_eq!(deleted, 1);
    }
}

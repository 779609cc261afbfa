//! Transactions (etcd's `Txn`) and the reads a batch makes: compares, then
//! one branch of puts, deletes, gets and range reads, all at one revision.
//! Reads see the batch's changes before them, so a transaction sees every
//! entry applied before its own, and its own earlier operations.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::ops::Bound;

use super::{ApplyResult, Batch, Pending, Previous, Replaced, Seen, Uncounted, WriteOp};
use crate::proto::{
    compare, txn_op, txn_op_result, Compare, DeleteResponse, GetResponse, KeyRange, ScanResponse, SetResponse,
    StoredValue, TxnOpResult, TxnRequest, TxnResponse,
};
use crate::storage::memtable::{self, Change};
use crate::storage::state_store::ScanPage;
use crate::storage::StorageError;

/// At most this many keys go in range deletes of one command (a delete, or
/// all the range deletes of a transaction). They are applied on the raft
/// thread in one step; a larger range is refused (deterministically: every
/// node counts the same keys) and is deleted in parts.
pub const MAX_RANGE_DELETE: usize = 100_000;

/// At most this many stored records are examined by the range reads and
/// deletes of one command (deleted keys a later range passes over count
/// too), so no command holds the raft thread for long.
pub const MAX_EXAMINED: usize = 1_000_000;

/// The reads of one transaction (gets and ranges) return at most this many
/// bytes of keys and values together: a range stops there with `more`, and
/// a transaction whose gets alone pass it is refused. The answer must fit in
/// one response frame.
pub const TXN_READ_BYTES: usize = 8 << 20;

/// Records read from the store at a time when merging it with the batch,
/// and about as many bytes at most.
const PAGE: usize = 256;
const PAGE_BYTES: usize = 4 << 20;

/// Bytes a pair costs against [`TXN_READ_BYTES`].
fn read_size(key: &[u8], value: &[u8]) -> usize {
    key.len() + value.len() + 8
}

/// Whether `compare` holds for a key's current record (`None`: absent, which
/// has version, revisions and lease 0 and fails every value compare, as in
/// etcd).
pub fn holds(compare: &Compare, record: Option<&StoredValue>) -> bool {
    use compare::{Op, Target};
    let number = |field: fn(&StoredValue) -> u64| record.map_or(0, field).cmp(&compare.number);
    let ordering = match compare.target() {
        Target::Value => match record {
            Some(r) => r.value.as_ref().cmp(compare.value.as_slice()),
            None => return false,
        },
        Target::Version => number(|r| r.version),
        Target::CreateRevision => number(|r| r.create_revision),
        Target::ModRevision => number(|r| r.mod_revision),
        Target::Lease => number(|r| r.lease),
        Target::Unspecified => return false,
    };
    match compare.op() {
        Op::Equal => ordering == Ordering::Equal,
        Op::NotEqual => ordering != Ordering::Equal,
        Op::Less => ordering == Ordering::Less,
        Op::Greater => ordering == Ordering::Greater,
        Op::Unspecified => false,
    }
}

/// A get's answer for a key's record.
pub fn get_response(record: Option<StoredValue>) -> GetResponse {
    match record {
        Some(r) => GetResponse {
            found: true,
            value: r.value.into(),
            create_revision: r.create_revision,
            mod_revision: r.mod_revision,
            version: r.version,
            lease: r.lease,
        },
        None => GetResponse::default(),
    }
}

/// A transaction's result for one of its writes.
fn write_result(done: ApplyResult) -> Option<txn_op_result::Result> {
    use txn_op_result::Result as R;
    Some(match done {
        ApplyResult::Set { revision } => R::Put(SetResponse { revision }),
        ApplyResult::Delete { deleted, revision } => R::Delete(DeleteResponse {
            existed: deleted > 0,
            revision,
            deleted,
        }),
        other => unreachable!("a put or delete answers as one, not {other:?}"),
    })
}

impl Batch<'_> {
    /// Runs a transaction at revision `index`. A range delete over the limit
    /// refuses the whole transaction, unapplied.
    pub(super) fn apply_txn(&mut self, index: u64, txn: TxnRequest) -> Result<ApplyResult, StorageError> {
        use txn_op::Op;
        use txn_op_result::Result as R;
        let mut pending = Pending::default();
        let mut succeeded = true;
        for compare in &txn.compare {
            if !holds(compare, self.record(&pending, &compare.key)?.as_ref()) {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded { txn.success } else { txn.failure };
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            let result = match op.op {
                Some(Op::Put(set)) => match self.write(&mut pending, index, WriteOp::Set(set))? {
                    Ok(done) => write_result(done),
                    Err(refusal) => return Ok(refusal),
                },
                Some(Op::Delete(delete)) => match self.write(&mut pending, index, WriteOp::Delete(delete))? {
                    Ok(done) => write_result(done),
                    Err(refusal) => return Ok(refusal),
                },
                Some(Op::Get(get)) => {
                    let record = self.record(&pending, &get.key)?;
                    pending.read_bytes += record.as_ref().map_or(0, |r| read_size(&get.key, &r.value));
                    if pending.read_bytes > TXN_READ_BYTES {
                        return Ok(ApplyResult::Refused(format!(
                            "the transaction's reads come to over {} MiB; nothing was applied: read fewer or smaller keys",
                            TXN_READ_BYTES >> 20
                        )));
                    }
                    Some(R::Get(get_response(record)))
                }
                Some(Op::Range(scan)) => {
                    let range = KeyRange {
                        prefix: scan.prefix,
                        from: scan.from,
                        to: scan.to,
                    };
                    let budget = TXN_READ_BYTES.saturating_sub(pending.read_bytes);
                    let page = match self.range(&pending, &range, scan.limit as usize, budget, false)? {
                        Ok(page) => page,
                        Err(why) => return Ok(ApplyResult::Refused(why)),
                    };
                    pending.read_bytes += page.pairs.iter().map(|kv| read_size(&kv.key, &kv.value)).sum::<usize>();
                    Some(R::Range(ScanResponse {
                        pairs: page.pairs,
                        more: page.more,
                    }))
                }
                // Refused before proposing; answered with an empty result.
                None => None,
            };
            results.push(TxnOpResult { result });
        }
        self.absorb(pending);
        Ok(ApplyResult::Txn(Box::new(TxnResponse {
            succeeded,
            revision: index,
            results,
            reads_omitted: false,
        })))
    }

    /// Deletes every key in `range` at revision `index`; returns how many,
    /// or why not (over [`MAX_RANGE_DELETE`] keys in this command's range
    /// deletes, or over [`MAX_EXAMINED`] records examined).
    pub(super) fn delete_range(
        &self,
        pending: &mut Pending,
        index: u64,
        range: &KeyRange,
    ) -> Result<Result<u64, String>, StorageError> {
        let room = MAX_RANGE_DELETE - pending.range_deleted;
        let page = match self.range(pending, range, room + 1, usize::MAX, true)? {
            Ok(page) => page,
            Err(why) => return Ok(Err(why)),
        };
        if page.pairs.len() > room {
            return Ok(Err(format!(
                "the range holds more keys than one command deletes ({MAX_RANGE_DELETE} in all); nothing was \
                 deleted: delete it in parts (a longer --prefix, or --from/--to)"
            )));
        }
        let deleted = page.pairs.len() as u64;
        pending.range_deleted += page.pairs.len();
        for kv in page.pairs {
            let uncounted = match self.find(pending, &kv.key) {
                Seen::Change { uncounted, .. } => uncounted,
                _ => Uncounted::No,
            };
            let replaced = Replaced {
                mod_revision: kv.mod_revision,
                lease: kv.lease,
                // Resolved by the range against the file's record: version
                // 1 means it created the key.
                uncounted_create: if kv.version == 1 { uncounted } else { Uncounted::No },
            };
            pending.change(index, kv.key, None, Previous::Record(replaced));
        }
        Ok(Ok(deleted))
    }

    /// The keys in `range` as of the entries applied so far (`pending`
    /// included): the store's records a page at a time, with the batch's
    /// changes over them. At most `limit` pairs (0: no limit) and
    /// `max_bytes`, then `more` (with no room at all, an empty page and
    /// `more`). With `keys_only`, values are dropped as they are read. Refused
    /// past [`MAX_EXAMINED`] records examined by this command.
    pub(super) fn range(
        &self,
        pending: &Pending,
        range: &KeyRange,
        limit: usize,
        max_bytes: usize,
        keys_only: bool,
    ) -> Result<Result<ScanPage, String>, StorageError> {
        let KeyRange { prefix, to, .. } = range;
        let start = range.start();
        let mut page = ScanPage::default();
        if !to.is_empty() && start >= to.as_slice() {
            return Ok(Ok(page));
        }
        let end = if to.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(to.as_slice())
        };
        // The batch's changes in the range, this command's over them.
        let mut overlay: BTreeMap<&[u8], &Change> = BTreeMap::new();
        for layer in [&self.changes, &pending.layer] {
            for (key, change) in layer.range(start, end).take_while(|(k, _)| k.starts_with(prefix)) {
                overlay.insert(key, change);
            }
        }
        let mut bytes = 0usize;
        let mut cursor = start.to_vec();
        loop {
            let page_bytes = if keys_only {
                PAGE_BYTES
            } else {
                max_bytes.saturating_sub(bytes).clamp(1, PAGE_BYTES)
            };
            let mut stored = self.store.scan(prefix, &cursor, to, PAGE, page_bytes)?;
            let examined = pending.examined.get() + stored.pairs.len();
            pending.examined.set(examined);
            if examined > MAX_EXAMINED {
                return Ok(Err(format!(
                    "the command examines over {MAX_EXAMINED} stored keys; nothing was applied: use narrower ranges"
                )));
            }
            if keys_only {
                for kv in &mut stored.pairs {
                    kv.value = Vec::new();
                }
            }
            // This page of the store covers keys up to its last one (all the
            // rest of the range when it is the last page).
            let until = match (stored.more, stored.pairs.last()) {
                (true, Some(kv)) => Some(kv.key.clone()),
                _ => None,
            };
            let upper = until.as_deref().map_or(Bound::Unbounded, Bound::Included);
            let mut changes = overlay
                .range::<[u8], _>((Bound::Included(cursor.as_slice()), upper))
                .peekable();
            let mut records = stored.pairs.into_iter().peekable();
            loop {
                // The store's record of a key the batch changed: what the
                // batch's change replaced, which resolves it if it was
                // applied unresolved (the store's memory didn't hold the key
                // then, so this is the file's record).
                let mut below = None;
                let from_store = match (records.peek(), changes.peek()) {
                    (None, None) => break,
                    (Some(_), None) => true,
                    (None, Some(_)) => false,
                    (Some(kv), Some((key, _))) => match kv.key.as_slice().cmp(key) {
                        Ordering::Less => true,
                        Ordering::Equal => {
                            below = records.next();
                            false
                        }
                        Ordering::Greater => false,
                    },
                };
                let next = if from_store {
                    records.next()
                } else {
                    changes.next().and_then(|(key, change)| {
                        let below = below.map(|kv| StoredValue {
                            create_revision: kv.create_revision,
                            mod_revision: kv.mod_revision,
                            version: kv.version,
                            ..Default::default()
                        });
                        (*change)
                            .clone()
                            .map(|r| memtable::resolve(r, below.as_ref()).into_key_value(key.to_vec()))
                    })
                };
                let Some(mut kv) = next else { continue };
                if keys_only {
                    kv.value = Vec::new();
                }
                let size = read_size(&kv.key, &kv.value);
                if (limit > 0 && page.pairs.len() >= limit) || bytes + size > max_bytes {
                    page.more = true;
                    return Ok(Ok(page));
                }
                bytes += size;
                page.pairs.push(kv);
            }
            match until {
                Some(mut last) => {
                    last.push(0);
                    cursor = last;
                }
                None => return Ok(Ok(page)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{apply_all, in_session, machine, register, set};
    use super::*;
    use crate::proto::{command, Command, DeleteRequest, GetRequest, ScanRequest, SetRequest, TxnOp};
    use compare::{Op as CmpOp, Target};

    fn compare(key: &str, target: Target, op: CmpOp, number: u64, value: &str) -> Compare {
        Compare {
            key: key.into(),
            target: target as i32,
            op: op as i32,
            value: value.into(),
            number,
        }
    }

    fn put(k: &str, v: &str) -> TxnOp {
        TxnOp {
            op: Some(txn_op::Op::Put(SetRequest {
                key: k.into(),
                value: v.into(),
                lease: 0,
            })),
        }
    }

    fn get(k: &str) -> TxnOp {
        TxnOp {
            op: Some(txn_op::Op::Get(GetRequest {
                key: k.into(),
                serializable: false,
            })),
        }
    }

    fn range_op(prefix: &str) -> TxnOp {
        TxnOp {
            op: Some(txn_op::Op::Range(ScanRequest {
                prefix: prefix.into(),
                ..Default::default()
            })),
        }
    }

    fn delete_range(prefix: &str) -> DeleteRequest {
        DeleteRequest {
            key: vec![],
            range: Some(KeyRange {
                prefix: prefix.into(),
                ..Default::default()
            }),
        }
    }

    fn txn(compare: Vec<Compare>, success: Vec<TxnOp>, failure: Vec<TxnOp>) -> Command {
        Command {
            op: Some(command::Op::Txn(TxnRequest {
                compare,
                success,
                failure,
            })),
            ..Default::default()
        }
    }

    fn answer(result: &ApplyResult) -> &TxnResponse {
        match result {
            ApplyResult::Txn(r) => r,
            other => panic!("not a transaction's answer: {other:?}"),
        }
    }

    fn got(r: &TxnOpResult) -> &GetResponse {
        match &r.result {
            Some(txn_op_result::Result::Get(g)) => g,
            other => panic!("not a get: {other:?}"),
        }
    }

    fn keys(r: &TxnOpResult) -> Vec<String> {
        match &r.result {
            Some(txn_op_result::Result::Range(s)) => s
                .pairs
                .iter()
                .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
                .collect(),
            other => panic!("not a range: {other:?}"),
        }
    }

    #[test]
    fn every_compare_target_and_operator() {
        let record = StoredValue {
            value: b"m".to_vec().into(),
            create_revision: 3,
            mod_revision: 7,
            version: 2,
            lease: 9,
            value_ref: None,
        };
        let check = |target, op, number, value| holds(&compare("k", target, op, number, value), Some(&record));
        assert!(check(Target::Value, CmpOp::Equal, 0, "m"));
        assert!(check(Target::Value, CmpOp::Less, 0, "n") && check(Target::Value, CmpOp::Greater, 0, "l"));
        assert!(check(Target::Value, CmpOp::NotEqual, 0, "x") && !check(Target::Value, CmpOp::NotEqual, 0, "m"));
        assert!(check(Target::Version, CmpOp::Equal, 2, ""));
        assert!(check(Target::CreateRevision, CmpOp::Less, 4, ""));
        assert!(
            check(Target::ModRevision, CmpOp::Greater, 6, "") && !check(Target::ModRevision, CmpOp::Greater, 7, "")
        );
        assert!(check(Target::Lease, CmpOp::Equal, 9, ""));
        assert!(!check(Target::Unspecified, CmpOp::Equal, 0, "") && !check(Target::Version, CmpOp::Unspecified, 2, ""));
        // Absent: version 0 ("key absent"), and every value compare fails.
        let absent = |target, op, number, value| holds(&compare("k", target, op, number, value), None);
        assert!(absent(Target::Version, CmpOp::Equal, 0, "") && absent(Target::ModRevision, CmpOp::Less, 1, ""));
        assert!(!absent(Target::Value, CmpOp::Equal, 0, "") && !absent(Target::Value, CmpOp::NotEqual, 0, "x"));
    }

    #[test]
    fn compare_and_swap_runs_one_branch_at_one_revision() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = machine(dir.path());
        let absent = || vec![compare("lock", Target::Version, CmpOp::Equal, 0, "")];
        let take = |owner: &str| {
            txn(
                absent(),
                vec![put("lock", owner), put("owner", owner)],
                vec![get("lock")],
            )
        };
        let first = apply_all(&mut sm, 2, vec![take("a"), take("b")], false);
        let won = answer(&first[0]);
        assert!(won.succeeded);
        assert_eq!(won.revision, 2);
        assert_eq!(won.results.len(), 2);
        let lost = answer(&first[1]);
        assert!(!lost.succeeded, "the second sees the first's put in the same batch");
        let current = got(&lost.results[0]);
        assert_eq!(
            (current.value.as_slice(), current.version, current.mod_revision),
            (&b"a"[..], 1, 2)
        );
        let owner = sm.store().get(b"owner").unwrap().unwrap();
        assert_eq!(
            (owner.value.as_ref(), owner.mod_revision),
            (&b"a"[..], 2),
            "one revision for both puts"
        );

        // A swap on the value; its own later get sees its put.
        let swap = txn(
            vec![compare("lock", Target::Value, CmpOp::Equal, 0, "a")],
            vec![put("lock", "c"), get("lock"), range_op("")],
            vec![],
        );
        let swapped = apply_all(&mut sm, 4, vec![swap], true);
        let swapped = answer(&swapped[0]);
        assert!(swapped.succeeded);
        let after = got(&swapped.results[1]);
        assert_eq!(
            (after.value.as_slice(), after.version, after.create_revision),
            (&b"c"[..], 2, 2)
        );
        assert_eq!(keys(&swapped.results[2]), ["lock", "owner"]);
    }

    #[test]
    fn a_range_delete_takes_every_key_in_the_range_from_file_memory_and_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = machine(dir.path());
        let file: Vec<Command> = ["a", "p/1", "p/2", "p/3", "q"].iter().map(|k| set(k, "f")).collect();
        apply_all(&mut sm, 1, file, true);
        apply_all(&mut sm, 6, vec![set("p/4", "m"), set("p/0", "m")], false);
        let delete = |d: DeleteRequest| Command {
            op: Some(command::Op::Delete(d)),
            ..Default::default()
        };
        // In one batch: a new key in the range, then the delete, then a read.
        let results = apply_all(
            &mut sm,
            8,
            vec![
                set("p/5", "b"),
                delete(delete_range("p/")),
                txn(vec![], vec![range_op(""), get("p/1")], vec![]),
            ],
            false,
        );
        assert_eq!(
            results[1],
            ApplyResult::Delete {
                deleted: 6,
                revision: 9
            }
        );
        let after = answer(&results[2]);
        assert_eq!(keys(&after.results[0]), ["a", "q"]);
        assert!(!got(&after.results[1]).found);
        assert_eq!(sm.store().len().unwrap(), 2);
        // From/to within the whole key space.
        let bounded = DeleteRequest {
            key: vec![],
            range: Some(KeyRange {
                prefix: vec![],
                from: b"a".to_vec(),
                to: b"q".to_vec(),
            }),
        };
        let results = apply_all(&mut sm, 11, vec![delete(bounded), delete(delete_range("zz"))], true);
        assert_eq!(
            results,
            [
                ApplyResult::Delete {
                    deleted: 1,
                    revision: 11
                },
                ApplyResult::Delete {
                    deleted: 0,
                    revision: 12
                }
            ]
        );
        assert_eq!(sm.store().len().unwrap(), 1);
        assert!(sm.get(b"q").unwrap().is_some());
    }

    #[test]
    fn a_range_delete_over_the_limit_is_refused_and_its_transaction_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = machine(dir.path());
        let many: Vec<Command> = (0..=MAX_RANGE_DELETE).map(|i| set(&format!("m/{i:06}"), "")).collect();
        apply_all(&mut sm, 1, many, true);
        let next = MAX_RANGE_DELETE as u64 + 2;
        let delete_all = TxnOp {
            op: Some(txn_op::Op::Delete(delete_range("m/"))),
        };
        let results = apply_all(
            &mut sm,
            next,
            vec![txn(vec![], vec![put("x", "1"), delete_all], vec![])],
            false,
        );
        assert!(
            matches!(&results[0], ApplyResult::Refused(why) if why.contains("more keys than one command deletes (100000")),
            "{results:?}"
        );
        assert_eq!(sm.get(b"x").unwrap(), None, "the put before it was not applied");
        assert_eq!(sm.store().len().unwrap(), MAX_RANGE_DELETE as u64 + 1);
    }

    #[test]
    fn a_retried_transaction_gets_its_first_answer() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = machine(dir.path());
        apply_all(&mut sm, 2, vec![register()], false);
        let incr = |from: &str, to: &str| {
            in_session(
                txn(
                    vec![compare("n", Target::Value, CmpOp::Equal, 0, from)],
                    vec![put("n", to)],
                    vec![get("n")],
                ),
                2,
                1,
                1,
            )
        };
        apply_all(&mut sm, 3, vec![set("n", "1")], false);
        let first = apply_all(&mut sm, 4, vec![incr("1", "2")], false);
        assert!(answer(&first[0]).succeeded);
        // The retry would fail its compare now; it is answered, not run.
        let retry = apply_all(&mut sm, 5, vec![incr("1", "2")], true);
        assert_eq!(retry, first);
        assert_eq!(sm.store().get(b"n").unwrap().unwrap().version, 2);
    }
}

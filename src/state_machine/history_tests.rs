//! The change history the state machine records for watches: what each
//! write adds, how it reads back across memory and the file, and compaction.

use super::tests::{apply_all, machine, set};
use super::*;
use crate::proto::{DeleteRequest, KeyRange, TxnOp, TxnRequest};
use crate::storage::history::{Filter, HistoryError, Retention};

fn delete(d: DeleteRequest) -> Command {
    Command {
        op: Some(command::Op::Delete(d)),
        ..Default::default()
    }
}

fn txn(success: Vec<TxnOp>) -> Command {
    Command {
        op: Some(command::Op::Txn(TxnRequest {
            compare: vec![],
            success,
            failure: vec![],
        })),
        ..Default::default()
    }
}

/// (revision, key, value or "-" for a delete, prev_mod_revision) of a page.
fn seen(store: &StateStore, from: u64, filter: &Filter) -> Vec<(u64, String, String, u64)> {
    let mut out = Vec::new();
    let mut from = from;
    loop {
        let page = store.history(from, filter).unwrap();
        out.extend(page.events.iter().map(|e| {
            let value = e
                .change
                .record
                .as_ref()
                .map_or("-".to_string(), |r| String::from_utf8_lossy(&r.value).into_owned());
            (
                e.revision,
                String::from_utf8_lossy(&e.change.key).into_owned(),
                value,
                e.change.prev_mod_revision,
            )
        }));
        from = page.until + 1;
        if !page.more {
            return out;
        }
    }
}

fn all() -> Filter {
    Filter::Range(KeyRange::default())
}

#[test]
fn every_write_leaves_its_change_in_order_across_memory_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = machine(dir.path());
    apply_all(&mut sm, 1, vec![set("a", "1"), set("b", "1"), set("a", "2")], true);
    apply_all(
        &mut sm,
        4,
        vec![
            txn(vec![TxnOp::put("c", "1"), TxnOp::delete("b"), TxnOp::get("a")]),
            delete(DeleteRequest {
                key: vec![],
                range: Some(KeyRange::prefix("")),
            }),
            // Deleting what is not there changes nothing, and records nothing.
            delete(DeleteRequest {
                key: b"a".to_vec(),
                range: None,
            }),
            set("a", "3"),
        ],
        false,
    );
    let store = sm.store().clone();
    let expected: Vec<(u64, String, String, u64)> = [
        (1, "a", "1", 0),
        (2, "b", "1", 0),
        (3, "a", "2", 1),
        (4, "c", "1", 0),
        (4, "b", "-", 2),
        (5, "a", "-", 3),
        (5, "c", "-", 4),
        (7, "a", "3", 0),
    ]
    .into_iter()
    .map(|(r, k, v, p)| (r, k.to_string(), v.to_string(), p))
    .collect();
    assert_eq!(seen(&store, 1, &all()), expected, "from memory and the file");
    store.flush().unwrap();
    assert_eq!(seen(&store, 1, &all()), expected, "all from the file, none twice");
    assert_eq!(seen(&store, 5, &all()), expected[5..], "from a revision on");
    let a: Vec<_> = expected.iter().filter(|e| e.1 == "a").cloned().collect();
    assert_eq!(seen(&store, 1, &Filter::Key(b"a".to_vec())), a);
    // `until` runs to the applied index, and past it nothing is found.
    let page = store.history(8, &all()).unwrap();
    assert!(page.events.is_empty() && page.until == 7 && !page.more, "{page:?}");
    // The record a change replaced is found by its revision (prev_kv).
    let prev = store.history_record(3, b"a").unwrap().unwrap();
    assert_eq!((prev.value.as_ref(), prev.version), (&b"2"[..], 2));
    assert_eq!(store.history_record(3, b"b").unwrap(), None);

    // Kept across a restart.
    store.close();
    let sm = machine(dir.path());
    assert_eq!(seen(sm.store(), 1, &all()), expected);
}

#[test]
fn history_beyond_the_retention_is_compacted_a_whole_revision_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = machine(dir.path());
    sm.store().set_history_retention(Retention {
        revisions: 5,
        bytes: u64::MAX,
    });
    let writes: Vec<Command> = (0..10).map(|i| set(&format!("k{i}"), "v")).collect();
    apply_all(&mut sm, 1, writes, true);
    let store = sm.store().clone();
    match store.history(1, &all()) {
        Err(HistoryError::Compacted { asked: 1, oldest: 6 }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(seen(&store, 6, &all()).len(), 5);
    // A range delete of 3 keys is one revision: it goes whole or not at all.
    apply_all(
        &mut sm,
        11,
        vec![delete(DeleteRequest {
            key: vec![],
            range: Some(KeyRange::between("k7", "")),
        })],
        true,
    );
    store.set_history_retention(Retention {
        revisions: 1000,
        bytes: 1,
    });
    apply_all(&mut sm, 12, vec![set("z", "v")], true);
    match store.history(11, &all()) {
        Err(HistoryError::Compacted { oldest: 13, .. }) => {}
        other => panic!("the byte cap drops everything flushed before: {other:?}"),
    }
}

#[test]
fn a_store_from_before_the_history_starts_it_after_its_state() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut sm = machine(dir.path());
        apply_all(&mut sm, 1, vec![set("a", "1"), set("b", "1")], true);
    }
    // As an older release left it: no history marker.
    {
        let db = redb::Database::open(StateStore::path_in(dir.path())).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(crate::storage::state_store::META).unwrap();
            meta.remove(crate::storage::history::META_HISTORY_START).unwrap();
        }
        {
            let mut history = txn.open_table(crate::storage::history::HISTORY).unwrap();
            history.retain(|_, _| false).unwrap();
        }
        txn.commit().unwrap();
    }
    let sm = machine(dir.path());
    match sm.store().history(1, &all()) {
        Err(HistoryError::Compacted { oldest: 3, .. }) => {}
        other => panic!("revisions 1 and 2 are not in any history: {other:?}"),
    }
    assert!(sm.store().history(3, &all()).unwrap().events.is_empty());
}

#[test]
fn a_history_of_one_record_per_change_is_dropped_on_open() {
    use crate::storage::history::UNCHUNKED_HISTORY;
    let dir = tempfile::tempdir().unwrap();
    {
        let mut sm = machine(dir.path());
        apply_all(&mut sm, 1, vec![set("a", "1"), set("b", "1")], true);
    }
    // As the release before chunks left it: its own table, history from 1.
    {
        let db = redb::Database::open(StateStore::path_in(dir.path())).unwrap();
        let txn = db.begin_write().unwrap();
        txn.delete_table(crate::storage::history::HISTORY).unwrap();
        txn.open_table(UNCHUNKED_HISTORY)
            .unwrap()
            .insert(&[0u8; 12][..], &b"old"[..])
            .unwrap();
        {
            let mut meta = txn.open_table(crate::storage::state_store::META).unwrap();
            meta.insert(crate::storage::history::META_HISTORY_START, &1u64.to_be_bytes()[..])
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let mut sm = machine(dir.path());
    match sm.store().history(1, &all()) {
        Err(HistoryError::Compacted { oldest: 3, .. }) => {}
        other => panic!("the old history is given up, not misread: {other:?}"),
    }
    apply_all(&mut sm, 3, vec![set("c", "1")], true);
    assert_eq!(seen(sm.store(), 3, &all()), [(3, "c".into(), "1".into(), 0)]);
    sm.store().close();
    let db = redb::Database::open(StateStore::path_in(dir.path())).unwrap();
    let txn = db.begin_read().unwrap();
    assert!(
        matches!(
            txn.open_table(UNCHUNKED_HISTORY),
            Err(redb::TableError::TableDoesNotExist(_))
        ),
        "the old table is gone"
    );
}

#[test]
fn chunks_split_anywhere_and_read_back_from_any_revision() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = machine(dir.path());
    // 600 single puts, then one revision of 700 deletes (split over chunks
    // of 256 changes), then more puts, all in one flush.
    let puts: Vec<Command> = (0..600).map(|i| set(&format!("k{i:04}"), "v")).collect();
    apply_all(&mut sm, 1, puts, false);
    apply_all(
        &mut sm,
        601,
        vec![delete(DeleteRequest {
            key: vec![],
            range: Some(KeyRange::between("k0000", "k0700")),
        })],
        false,
    );
    apply_all(&mut sm, 602, vec![set("z1", "v"), set("z2", "v")], true);
    let every = seen(sm.store(), 1, &all());
    assert_eq!(every.len(), 600 + 600 + 2);
    assert!(every.windows(2).all(|w| w[0].0 <= w[1].0), "in revision order");
    // From inside the first chunk, from the revision split over chunks, and
    // a key filter that matches only in the last chunk.
    assert_eq!(seen(sm.store(), 300, &all()).len(), 301 + 600 + 2);
    let split = seen(sm.store(), 601, &all());
    assert_eq!(split.len(), 602);
    assert!(split[..600].iter().all(|e| e.0 == 601 && e.2 == "-"));
    assert_eq!(
        seen(sm.store(), 1, &Filter::Key(b"z2".to_vec())),
        [(603, "z2".into(), "v".into(), 0)]
    );
    // prev_kv of a delete in the middle of the split revision.
    assert_eq!(
        sm.store().history_record(450, b"k0449").unwrap().unwrap().value,
        &b"v"[..]
    );
    // Compacting into the split revision drops it whole.
    sm.store().set_history_retention(Retention {
        revisions: 3,
        bytes: u64::MAX,
    });
    apply_all(&mut sm, 604, vec![set("z3", "v")], true);
    match sm.store().history(601, &all()) {
        Err(HistoryError::Compacted { oldest: 602, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(seen(sm.store(), 602, &all()).len(), 3);
}

#[test]
fn a_watch_of_a_rare_key_reads_the_history_a_bounded_page_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = machine(dir.path());
    let mut writes: Vec<Command> = (0..25_000).map(|i| set(&format!("n{i}"), "v")).collect();
    writes.push(set("rare", "1"));
    apply_all(&mut sm, 1, writes, true);
    let rare = Filter::Key(b"rare".to_vec());
    let first = sm.store().history(1, &rare).unwrap();
    assert!(first.events.is_empty() && first.more, "{first:?}");
    assert!(
        first.until >= 19_999 && first.until < 25_001,
        "progress made: {}",
        first.until
    );
    assert_eq!(seen(sm.store(), 1, &rare), [(25_001, "rare".into(), "1".into(), 0)]);
}

#[test]
fn pages_cut_from_memory_end_on_a_revision_and_read_on_from_there() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = machine(dir.path());
    // 1,500 changes in the file, then 2,500 in memory, and a rare key in
    // memory behind 25,000 others.
    let writes =
        |from: usize, n: usize| -> Vec<Command> { (from..from + n).map(|i| set(&format!("k{i}"), "v")).collect() };
    apply_all(&mut sm, 1, writes(0, 1_500), true);
    apply_all(&mut sm, 1_501, writes(1_500, 2_500), false);
    let page = sm.store().history(1_501, &all()).unwrap();
    assert!(page.more, "memory held more than a page");
    assert!(
        (1_000..=1_100).contains(&page.events.len()),
        "a page, not all of memory: {}",
        page.events.len()
    );
    assert_eq!(page.until, page.events.last().unwrap().revision);
    let every = seen(sm.store(), 1, &all());
    assert_eq!(every.len(), 4_000);
    assert!(
        every.iter().enumerate().all(|(i, e)| e.0 == i as u64 + 1),
        "each once, in order"
    );

    let mut writes = writes(4_000, 25_000);
    writes.push(set("rare", "1"));
    apply_all(&mut sm, 4_001, writes, false);
    let rare = Filter::Key(b"rare".to_vec());
    let first = sm.store().history(4_001, &rare).unwrap();
    assert!(first.events.is_empty() && first.more, "{first:?}");
    assert!(first.until < 29_001, "a bounded look at memory: {}", first.until);
    assert_eq!(seen(sm.store(), 4_001, &rare), [(29_001, "rare".into(), "1".into(), 0)]);
    // A watcher that is current gets an empty page at the applied index.
    let current = sm.store().history(29_002, &all()).unwrap();
    assert!(
        current.events.is_empty() && !current.more && current.until == 29_001,
        "{current:?}"
    );
}

#[test]
fn replaced_records_are_found_in_any_order_across_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = machine(dir.path());
    let puts: Vec<Command> = (0..1_200).map(|i| set(&format!("k{i:04}"), &format!("v{i}"))).collect();
    apply_all(&mut sm, 1, puts, true);
    // Asked newest first and shuffled across the five chunks, and a key
    // that was not written at that revision.
    let wanted: Vec<(u64, Vec<u8>)> = [1_200u64, 3, 700, 256, 257, 1, 999, 512]
        .iter()
        .map(|&r| (r, format!("k{:04}", r - 1).into_bytes()))
        .chain([(5, b"k0000".to_vec()), (0, b"k0001".to_vec())])
        .collect();
    let asked: Vec<(u64, &[u8])> = wanted.iter().map(|(r, k)| (*r, k.as_slice())).collect();
    let found = sm.store().history_records(&asked).unwrap();
    let values: Vec<Option<String>> = found
        .into_iter()
        .map(|r| r.map(|r| String::from_utf8(r.value.to_vec()).unwrap()))
        .collect();
    let expected: Vec<Option<String>> = [1_200u64, 3, 700, 256, 257, 1, 999, 512]
        .iter()
        .map(|r| Some(format!("v{}", r - 1)))
        .chain([None, None])
        .collect();
    assert_eq!(values, expected);
}

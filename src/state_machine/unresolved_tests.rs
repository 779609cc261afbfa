//! Puts applied without reading the record they replace (memory held none:
//! see `memtable::is_unresolved`): every reader, the flush and the key count
//! see them as if the record had been read.

use super::tests::{apply_all, delete, machine, set};
use super::*;
use crate::proto::{compare, Compare, DeleteRequest, KeyRange, TxnOp, TxnRequest};
use crate::storage::history::Filter;

fn delete_range(prefix: &str) -> Command {
    Command {
        op: Some(command::Op::Delete(DeleteRequest {
            key: vec![],
            range: Some(KeyRange::prefix(prefix)),
        })),
        ..Default::default()
    }
}

/// A transaction that puts `key` = `value` if `key`'s version is `version`.
fn put_if_version(key: &str, version: u64, value: &str) -> Command {
    Command {
        op: Some(command::Op::Txn(TxnRequest {
            compare: vec![Compare {
                key: key.into(),
                target: compare::Target::Version as i32,
                op: compare::Op::Equal as i32,
                value: vec![],
                number: version,
            }],
            success: vec![TxnOp::put(key, value), TxnOp::get(key)],
            failure: vec![],
        })),
        ..Default::default()
    }
}

/// (create revision, mod revision, version) of a key.
fn revisions(store: &StateStore, key: &str) -> Option<(u64, u64, u64)> {
    store
        .get(key.as_bytes())
        .unwrap()
        .map(|r| (r.create_revision, r.mod_revision, r.version))
}

/// A state machine whose file holds `keys` (each set to "1" at revisions 1..),
/// memory empty: the next put of any key is applied unresolved.
fn flushed_with(keys: &[&str]) -> (tempfile::TempDir, StateMachine) {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = machine(dir.path());
    apply_all(&mut sm, 1, keys.iter().map(|k| set(k, "1")).collect(), true);
    (dir, sm)
}

/// True if memory holds `key`'s newest record unresolved.
fn held_unresolved(store: &StateStore, key: &str) -> bool {
    matches!(
        store.memory_lookup(key.as_bytes()),
        MemoryLookup::Change { change: Some(r), .. } if memtable::is_unresolved(&r)
    )
}

/// (revision, key, create revision, version, prev_mod_revision) of each put
/// in the history from `from`.
fn history(store: &StateStore, from: u64) -> Vec<(u64, String, u64, u64, u64)> {
    let page = store.history(from, &Filter::Range(KeyRange::default())).unwrap();
    page.events
        .into_iter()
        .filter_map(|e| {
            let r = e.change.record?;
            Some((
                e.revision,
                String::from_utf8(e.change.key).unwrap(),
                r.create_revision,
                r.version,
                e.change.prev_mod_revision,
            ))
        })
        .collect()
}

#[test]
fn puts_over_flushed_keys_read_back_as_if_the_record_they_replaced_was_read() {
    let (dir, mut sm) = flushed_with(&["a", "b"]);
    // a replaces a record only the file holds; c is new.
    apply_all(&mut sm, 3, vec![set("a", "2"), set("c", "1")], false);
    let store = sm.store().clone();
    assert!(held_unresolved(&store, "a") && held_unresolved(&store, "c"));

    let expect_memory = |store: &StateStore, when: &str| {
        assert_eq!(revisions(store, "a"), Some((1, 3, 2)), "{when}");
        assert_eq!(revisions(store, "c"), Some((4, 4, 1)), "{when}");
        let scan = store.scan(b"", b"", b"", 0, usize::MAX).unwrap();
        let listed: Vec<(Vec<u8>, u64, u64)> = scan
            .pairs
            .into_iter()
            .map(|kv| (kv.key, kv.create_revision, kv.version))
            .collect();
        assert_eq!(
            listed,
            [(b"a".to_vec(), 1, 2), (b"b".to_vec(), 2, 1), (b"c".to_vec(), 4, 1)],
            "{when}"
        );
        assert_eq!(
            history(store, 3)[..2],
            [(3, "a".into(), 1, 2, 1), (4, "c".into(), 4, 1, 0)],
            "{when}"
        );
        // A watcher's prev_kv of a later change finds the resolved record.
        let prev = store.history_record(3, b"a").unwrap().unwrap();
        assert_eq!((prev.create_revision, prev.version), (1, 2), "{when}");
    };
    expect_memory(&store, "in memory");
    assert_eq!(store.len().unwrap(), 3, "exact: c created its key");
    assert_eq!(store.len_as_flushed(), 2, "c counts as replacing until the flush");

    // A transaction compares the resolved version, and its put goes on from it.
    let results = apply_all(&mut sm, 5, vec![put_if_version("a", 2, "3")], false);
    let ApplyResult::Txn(response) = &results[0] else {
        panic!("{results:?}")
    };
    assert!(response.succeeded, "{response:?}");
    assert_eq!(revisions(&store, "a"), Some((1, 5, 3)));
    assert!(!held_unresolved(&store, "a"), "the second put read the file");

    store.flush().unwrap();
    assert_eq!(store.len_as_flushed(), 3, "the flush counted c");
    assert_eq!(revisions(&store, "c"), Some((4, 4, 1)));
    assert_eq!(
        history(&store, 3),
        [
            (3, "a".into(), 1, 2, 1),
            (4, "c".into(), 4, 1, 0),
            (5, "a".into(), 1, 3, 3)
        ],
        "the file's history holds the resolved changes"
    );
    store.close();
    let sm = machine(dir.path());
    assert_eq!(revisions(sm.store(), "a"), Some((1, 5, 3)));
    assert_eq!(revisions(sm.store(), "c"), Some((4, 4, 1)));
    assert_eq!(sm.store().len().unwrap(), 3);
}

#[test]
fn large_values_put_unresolved_are_written_resolved_and_release_the_records_they_replace_once() {
    let value = |tag: &str| format!("{tag}:{}", "v".repeat(300));
    let dir = tempfile::tempdir().unwrap();
    let mut sm = machine(dir.path());
    apply_all(
        &mut sm,
        1,
        ["a", "b", "c"].map(|k| set(k, &value("old"))).to_vec(),
        true,
    );
    // Memory holds none of them: each first change below is unresolved.
    let batch = vec![
        set("a", &value("new")),
        set("b", &value("new")),
        set("b", &value("newer")),
        delete("c"),
    ];
    apply_all(&mut sm, 4, batch, false);
    assert!(held_unresolved(sm.store(), "a"));
    sm.store().flush().unwrap();

    let check = |store: &StateStore, when: &str| {
        assert_eq!(revisions(store, "a"), Some((1, 4, 2)), "{when}");
        assert_eq!(revisions(store, "b"), Some((2, 6, 3)), "{when}");
        assert_eq!(revisions(store, "c"), None, "{when}");
        assert_eq!(
            store.get(b"a").unwrap().unwrap().value,
            value("new").as_bytes(),
            "{when}"
        );
        assert_eq!(
            store.get(b"b").unwrap().unwrap().value,
            value("newer").as_bytes(),
            "{when}"
        );
        assert_eq!(
            history(store, 4),
            [
                (4, "a".into(), 1, 2, 1),
                (5, "b".into(), 2, 2, 2),
                (6, "b".into(), 2, 3, 5)
            ],
            "{when}"
        );
        // Every replaced value in the log is dead, exactly once: live are
        // only the two records the keys point to (12-byte header, key, value).
        let live = [("a", "new"), ("b", "newer")]
            .iter()
            .map(|(key, tag)| 12 + (key.len() + value(tag).len()) as u64)
            .sum::<u64>();
        assert_eq!(store.value_log_bytes().1, live, "{when}");
        assert_eq!(store.len().unwrap(), 2, "{when}");
    };
    check(sm.store(), "after the flush");
    sm.store().close();
    let sm = machine(dir.path());
    check(sm.store(), "after reopening");
}

#[test]
fn keys_created_unresolved_and_deleted_again_count_once() {
    let (_dir, mut sm) = flushed_with(&["old"]);
    let store = sm.store().clone();
    // Created and deleted in one batch, then across batches, then by a
    // range; an update of a flushed key deleted too.
    apply_all(&mut sm, 2, vec![set("n1", "1"), delete("n1")], false);
    apply_all(
        &mut sm,
        4,
        vec![set("n2", "1"), set("x/1", "1"), set("x/2", "1")],
        false,
    );
    assert!(held_unresolved(&store, "n2"));
    assert_eq!(store.len().unwrap(), 4);
    let results = apply_all(&mut sm, 7, vec![delete("n2"), delete_range("x/")], false);
    assert_eq!(
        results,
        [
            ApplyResult::Delete {
                deleted: 1,
                revision: 7
            },
            ApplyResult::Delete {
                deleted: 2,
                revision: 8
            }
        ]
    );
    assert_eq!(store.len().unwrap(), 1);
    assert_eq!(
        store.len_as_flushed(),
        1,
        "a delete settles the count of the put it deletes"
    );
    apply_all(&mut sm, 9, vec![set("old", "2"), delete("old")], false);
    assert_eq!(store.len().unwrap(), 0);
    assert_eq!(store.len_as_flushed(), 0);
    // A new key after all that, then the flush.
    apply_all(&mut sm, 11, vec![set("new", "1")], false);
    assert_eq!((store.len().unwrap(), store.len_as_flushed()), (1, 0));
    store.flush().unwrap();
    assert_eq!((store.len().unwrap(), store.len_as_flushed()), (1, 1));
    assert_eq!(revisions(&store, "new"), Some((11, 11, 1)));
}

#[test]
fn the_file_empty_means_absent_without_deferring() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = machine(dir.path());
    apply_all(&mut sm, 1, vec![set("a", "1")], false);
    let store = sm.store().clone();
    assert!(!held_unresolved(&store, "a"), "nothing to read in an empty file");
    assert_eq!(store.len_as_flushed(), 1);
}

#[test]
fn a_flush_between_a_lookup_and_its_commit_counts_each_key_once() {
    // The second write of n, and the keys held after it.
    for (second, expected) in [(set("n", "2"), 2), (delete("n"), 1)] {
        let (_dir, mut sm) = flushed_with(&["old"]);
        apply_all(&mut sm, 2, vec![set("n", "1")], false);
        let store = sm.store().clone();
        assert!(held_unresolved(&store, "n"));
        // The batch finds n's put in the active layer, unresolved; the
        // flusher then takes that layer (and counts n) before the batch is
        // committed.
        let mut batch = Batch::begin(&store, sm.meta().clone()).unwrap();
        batch.apply(3, 1, second).unwrap();
        store.flush().unwrap();
        sm.set_meta(batch.commit().unwrap());
        assert_eq!(store.len().unwrap(), expected);
        assert_eq!(store.len_as_flushed(), expected);
        store.flush().unwrap();
        assert_eq!((store.len().unwrap(), store.len_as_flushed()), (expected, expected));
    }
}

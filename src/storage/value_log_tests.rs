//! The state store with its value log: values from 64 bytes on live in
//! segments the kv records point into; these tests reopen, damage, collect
//! and install real stores in temp dirs.

use super::*;
use crate::storage::memtable::Layer;
use crate::storage::value_log::{GC_SPACE, INLINE_MAX, VALUES_DIR};
use redb::ReadableTable;
use std::collections::BTreeMap;

fn header(index: u64) -> SnapshotHeader {
    SnapshotHeader {
        index,
        ..Default::default()
    }
}

fn record(value: &[u8], revision: u64) -> StoredValue {
    StoredValue {
        value: value.to_vec().into(),
        create_revision: revision,
        mod_revision: revision,
        version: 1,
        lease: 0,
        value_ref: None,
    }
}

fn large(tag: &str) -> Vec<u8> {
    format!("{tag}:{}", "v".repeat(300)).into_bytes()
}

/// Applies `changes` as one batch at `index` (not flushed).
fn commit(store: &StateStore, index: u64, changes: Layer) {
    store
        .commit_batch(Applied {
            changes,
            header: header(index),
            ..Default::default()
        })
        .unwrap();
}

/// A data dir with a store that flushed `pairs` at index 1 and was closed.
fn stopped_store_with(pairs: &[(&str, Vec<u8>)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), 1 << 20).unwrap();
    put_and_flush(&store, 1, pairs);
    store.close();
    dir
}

/// Applies `pairs` as one batch at `index` and flushes it.
fn put_and_flush(store: &StateStore, index: u64, pairs: &[(&str, Vec<u8>)]) {
    let mut changes = Layer::default();
    for (key, value) in pairs {
        changes.insert(key.as_bytes().to_vec(), Some(record(value, index)));
    }
    commit(store, index, changes);
    store.flush().unwrap();
}

/// The record the file holds for `key`, as written (value perhaps a ref).
fn raw_record(store: &StateStore, key: &str) -> StoredValue {
    let view = store.view().unwrap();
    let kv = open_existing(&view.txn, KV).unwrap();
    read_record(kv.as_ref(), key.as_bytes()).unwrap().unwrap()
}

fn value_of(store: &StateStore, key: &str) -> Vec<u8> {
    store
        .get(key.as_bytes())
        .unwrap()
        .expect("the key is there")
        .value
        .to_vec()
}

fn segment_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(VALUES_DIR).join(format!("{id:08}.seg"))
}

fn segment_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join(VALUES_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn large_values_go_to_the_log_small_ones_stay_inline_and_all_read_back_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let small = vec![b's'; INLINE_MAX - 1];
    {
        let store = StateStore::open(dir.path(), 1 << 20).unwrap();
        put_and_flush(&store, 1, &[("large", large("one")), ("small", small.clone())]);
        let on_file = raw_record(&store, "large");
        assert!(on_file.value.is_empty() && on_file.value_ref.is_some(), "{on_file:?}");
        let on_file = raw_record(&store, "small");
        assert_eq!((on_file.value.to_vec(), on_file.value_ref), (small.clone(), None));
        assert_eq!(value_of(&store, "large"), large("one"));
        let page = store.scan(b"", b"", b"", 0, 1 << 20).unwrap();
        let pairs: Vec<_> = page.pairs.iter().map(|p| (p.key.clone(), p.value.to_vec())).collect();
        assert_eq!(
            pairs,
            vec![(b"large".to_vec(), large("one")), (b"small".to_vec(), small.clone())]
        );
        store.close();
    }
    let store = StateStore::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(value_of(&store, "large"), large("one"));
    assert_eq!(value_of(&store, "small"), small);
    assert_eq!(segment_files(dir.path()), vec!["00000001.seg"]);
}

#[test]
fn what_a_flush_appended_but_never_committed_is_cut_off_at_open() {
    let dir = stopped_store_with(&[("a", large("a1"))]);
    // A crash after a flush's appends (and a new segment) reached the disk
    // but before its commit.
    let head = segment_path(dir.path(), 1);
    let committed = std::fs::metadata(&head).unwrap().len();
    let mut file = std::fs::OpenOptions::new().append(true).open(&head).unwrap();
    std::io::Write::write_all(&mut file, &[0xAB; 500]).unwrap();
    std::fs::write(segment_path(dir.path(), 2), b"never committed").unwrap();

    let store = StateStore::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(std::fs::metadata(&head).unwrap().len(), committed);
    assert_eq!(segment_files(dir.path()), vec!["00000001.seg"]);
    assert_eq!(value_of(&store, "a"), large("a1"));
    // Appends go on from the committed end.
    put_and_flush(&store, 2, &[("b", large("b2"))]);
    store.close();
    let store = StateStore::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(
        (value_of(&store, "a"), value_of(&store, "b")),
        (large("a1"), large("b2"))
    );
}

#[test]
fn damage_to_the_value_log_is_refused_with_what_to_do_never_served() {
    let dir = stopped_store_with(&[("a", large("a1")), ("b", large("b1"))]);
    let segment = segment_path(dir.path(), 1);
    let original = std::fs::read(&segment).unwrap();

    // A flipped byte inside a value: that read fails, the other still works.
    let mut flipped = original.clone();
    let at = flipped.windows(3).position(|w| w == b"a1:").unwrap() + 10;
    flipped[at] ^= 0x01;
    std::fs::write(&segment, &flipped).unwrap();
    {
        let store = StateStore::open(dir.path(), 1 << 20).unwrap();
        let err = store.get(b"a").unwrap_err();
        assert!(matches!(err, StorageError::Corrupt(_)), "{err}");
        let err = err.to_string();
        assert!(
            err.contains("checksum") && err.contains("00000001.seg") && err.contains("new id"),
            "{err}"
        );
        assert_eq!(value_of(&store, "b"), large("b1"));
        store.close();
    }

    // Cut short: bytes a commit covers are gone.
    std::fs::write(&segment, &original[..original.len() - 10]).unwrap();
    let err = StateStore::open(dir.path(), 1 << 20).unwrap_err().to_string();
    assert!(
        err.contains("committed") && err.contains("lost") && err.contains("new id"),
        "{err}"
    );

    // Gone.
    std::fs::remove_file(&segment).unwrap();
    let err = StateStore::open(dir.path(), 1 << 20).unwrap_err().to_string();
    assert!(err.contains("missing") && err.contains("00000001.seg"), "{err}");
}

#[test]
fn collection_moves_only_live_values_keeps_the_log_bounded_and_old_views_read_what_they_saw() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), 1 << 20).unwrap();
    // Segments of ~4 KiB (about 12 records), collected from 8 KiB on.
    store.values.set_limits(4 << 10, 8 << 10);
    // Every segment of the first flush holds a key kept for good among
    // keys deleted next: collection must move the kept ones, not drop them.
    let first: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| (format!("k-{i:02}"), large(&format!("first-{i}"))))
        .collect();
    let kept: Vec<(String, Vec<u8>)> = first.iter().step_by(10).cloned().collect();
    let pairs: Vec<(&str, Vec<u8>)> = first.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    put_and_flush(&store, 1, &pairs);
    let first_view = store.view().unwrap();
    let mut deletes = Layer::default();
    for (i, (key, _)) in first.iter().enumerate() {
        if i % 10 != 0 {
            deletes.insert(key.clone().into_bytes(), None);
        }
    }
    commit(&store, 2, deletes);
    store.flush().unwrap();
    let mut index = 2;
    let mut collected_first = false;
    for round in 0..30 {
        index += 1;
        let keys: Vec<String> = (0..5).map(|i| format!("hot-{i}")).collect();
        let pairs: Vec<(&str, Vec<u8>)> = keys
            .iter()
            .map(|k| (k.as_str(), large(&format!("{k}-{round}"))))
            .collect();
        put_and_flush(&store, index, &pairs);
        collected_first |= !store.values.segment_ids().contains(&1);
        let (total, live) = store.value_log_bytes();
        // Bounded: at most GC_SPACE times the live bytes, plus what is left
        // for the next flushes to collect.
        assert!(
            total <= GC_SPACE * live + (16 << 10),
            "round {round}: {total} bytes for {live} live"
        );
    }
    assert!(
        collected_first,
        "the first segment was never collected: {:?}",
        store.values.segment_ids()
    );
    assert!(!segment_path(dir.path(), 1).exists());
    for (key, value) in &kept {
        assert_eq!(&value_of(&store, key), value, "{key}");
    }
    assert_eq!(store.get(b"k-01").unwrap(), None);
    for i in 0..5 {
        let key = format!("hot-{i}");
        assert_eq!(value_of(&store, &key), large(&format!("{key}-29")));
    }
    // A view from before still reads its values from deleted segments.
    let seen: Vec<(Vec<u8>, Vec<u8>)> = first_view
        .records()
        .unwrap()
        .map(|r| r.unwrap())
        .filter(|(table, _, _)| *table == TABLE_KV)
        .map(|(_, key, bytes)| (key, StoredValue::decode(bytes.as_slice()).unwrap().value.to_vec()))
        .collect();
    let expected: Vec<(Vec<u8>, Vec<u8>)> = first.iter().map(|(k, v)| (k.clone().into_bytes(), v.clone())).collect();
    assert_eq!(seen, expected);
    drop(first_view);
    store.close();
    // And all of it after a reopen.
    let store = StateStore::open(dir.path(), 1 << 20).unwrap();
    for (key, value) in &kept {
        assert_eq!(&value_of(&store, key), value, "{key}");
    }
    assert_eq!(value_of(&store, "hot-3"), large("hot-3-29"));
}

#[test]
fn a_snapshot_carries_values_inline_and_an_install_replaces_the_value_log() {
    let source_dir = tempfile::tempdir().unwrap();
    let source = StateStore::open(source_dir.path(), 1 << 20).unwrap();
    put_and_flush(&source, 7, &[("k1", large("from-source")), ("k2", b"tiny".to_vec())]);

    let target_dir = tempfile::tempdir().unwrap();
    let target = StateStore::open(target_dir.path(), 1 << 20).unwrap();
    put_and_flush(&target, 3, &[("old", large("target-before"))]);
    let before_install = target.view().unwrap();

    std::fs::create_dir_all(target.incoming_dir()).unwrap();
    let mut builder = StoreBuilder::create(&target.staged_path(7, 1)).unwrap();
    let view = source.view().unwrap();
    for record in view.records().unwrap() {
        let (table, key, bytes) = record.unwrap();
        if table == TABLE_KV {
            let value = StoredValue::decode(bytes.as_slice()).unwrap();
            assert!(value.value_ref.is_none(), "a snapshot record with a ref: {value:?}");
        }
        builder.add(table, &key, &bytes).unwrap();
    }
    let staged = builder.finish(&view.header).unwrap();
    target.install(&staged).unwrap();

    assert_eq!(value_of(&target, "k1"), large("from-source"));
    assert_eq!(target.get(b"old").unwrap(), None);
    assert!(
        segment_files(target_dir.path()).is_empty(),
        "{:?}",
        segment_files(target_dir.path())
    );
    // A reader from before the install finishes on what it saw.
    let old: Vec<_> = before_install.records().unwrap().map(|r| r.unwrap()).collect();
    assert_eq!(old.len(), 1);
    assert_eq!(
        StoredValue::decode(old[0].2.as_slice()).unwrap().value.to_vec(),
        large("target-before")
    );
    // New values go to a new log.
    put_and_flush(&target, 8, &[("k3", large("after"))]);
    target.close();
    let target = StateStore::open(target_dir.path(), 1 << 20).unwrap();
    assert_eq!(
        (value_of(&target, "k1"), value_of(&target, "k3")),
        (large("from-source"), large("after"))
    );
}

#[test]
fn a_snapshot_record_that_points_into_a_value_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut builder = StoreBuilder::create(&dir.path().join("staged.redb")).unwrap();
    let forged = StoredValue {
        value_ref: Some(crate::proto::ValueRef {
            segment: 1,
            offset: 0,
            len: 300,
        }),
        ..record(b"", 1)
    };
    let err = builder
        .add(TABLE_KV, b"k", &forged.encode_to_vec())
        .unwrap_err()
        .to_string();
    assert!(err.contains("inline"), "{err}");
}

#[test]
fn a_store_written_with_every_value_inline_is_read_and_updated_in_place() {
    // What every release before the value log wrote.
    let dir = tempfile::tempdir().unwrap();
    let mut builder = StoreBuilder::create(&StateStore::path_in(dir.path())).unwrap();
    for (key, value) in [("a", large("old-a")), ("b", large("old-b"))] {
        builder
            .add(TABLE_KV, key.as_bytes(), &record(&value, 1).encode_to_vec())
            .unwrap();
    }
    builder.finish(&header(1)).unwrap();

    let store = StateStore::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(value_of(&store, "a"), large("old-a"));
    put_and_flush(&store, 2, &[("a", large("new-a"))]);
    assert!(raw_record(&store, "a").value_ref.is_some());
    assert!(raw_record(&store, "b").value_ref.is_none());
    assert_eq!(
        (value_of(&store, "a"), value_of(&store, "b")),
        (large("new-a"), large("old-b"))
    );
}

#[test]
fn only_the_newest_segment_may_hold_bytes_no_commit_covers() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = StateStore::open(dir.path(), 1 << 20).unwrap();
        store.values.set_limits(1 << 10, u64::MAX);
        let pairs: Vec<(String, Vec<u8>)> = (0..8).map(|i| (format!("k{i}"), large(&format!("{i}")))).collect();
        let pairs: Vec<(&str, Vec<u8>)> = pairs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        put_and_flush(&store, 1, &pairs);
        assert!(store.values.segment_ids().len() > 1, "{:?}", store.values.segment_ids());
        store.close();
    }
    // Bytes after an older, sealed segment's committed end: no flush
    // appends there, so the store's table is what is wrong.
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(segment_path(dir.path(), 1))
        .unwrap();
    std::io::Write::write_all(&mut file, &[0xAB; 100]).unwrap();
    let err = StateStore::open(dir.path(), 1 << 20).unwrap_err().to_string();
    assert!(
        err.contains("damaged") && err.contains("00000001.seg") && err.contains("new id"),
        "{err}"
    );
}

#[test]
fn a_damaged_ref_fails_the_flush_that_replaces_it_and_marks_nothing_dead() {
    let dir = stopped_store_with(&[("a", large("a1")), ("b", large("b1"))]);
    // Damage "a"'s header: an offset far past the segment's end.
    {
        let db = redb::Database::open(StateStore::path_in(dir.path())).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut kv = txn.open_table(KV).unwrap();
            let mut header = StoredValue::decode(kv.get(&b"a"[..]).unwrap().unwrap().value()).unwrap();
            header.value_ref.as_mut().unwrap().offset = 1 << 40;
            kv.insert(&b"a"[..], header.encode_to_vec().as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = StateStore::open(dir.path(), 1 << 20).unwrap();
    let mut changes = Layer::default();
    changes.insert(b"a".to_vec(), Some(record(&large("a2"), 2)));
    commit(&store, 2, changes);
    let err = store.flush().unwrap_err().to_string();
    assert!(err.contains("does not account for") && err.contains("new id"), "{err}");
    // Nothing was committed: "b" still reads from the log.
    assert_eq!(value_of(&store, "b"), large("b1"));
}

#[test]
fn a_flush_that_collects_moves_the_live_records_in_key_order_and_skips_the_keys_it_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), 1 << 20).unwrap();
    // Segments of ~4 KiB (12 records of 321 bytes), collected from 8 KiB on.
    store.values.set_limits(4 << 10, 8 << 10);
    let keys: Vec<String> = (0..40).map(|i| format!("k-{i:02}")).collect();
    let pairs: Vec<(&str, Vec<u8>)> = keys.iter().map(|k| (k.as_str(), large(k))).collect();
    put_and_flush(&store, 1, &pairs);
    // Every fourth key stays: each segment keeps three live records.
    let kept: Vec<&String> = keys.iter().step_by(4).collect();
    let mut deletes = Layer::default();
    for key in keys.iter().filter(|k| !kept.contains(k)) {
        deletes.insert(key.clone().into_bytes(), None);
    }
    commit(&store, 2, deletes);
    store.flush().unwrap();
    let before = store.values.segment_ids();
    // The flush that collects also overwrites one kept key of each segment
    // and deletes another; the third is left for collection to move.
    let mut by_segment: BTreeMap<u32, Vec<&String>> = BTreeMap::new();
    for key in &kept {
        let segment = raw_record(&store, key).value_ref.expect("a large value").segment;
        by_segment.entry(segment).or_default().push(key);
    }
    let mut expected: BTreeMap<String, Option<Vec<u8>>> = kept.iter().map(|k| ((*k).clone(), Some(large(k)))).collect();
    let mut changes = Layer::default();
    for held in by_segment.values() {
        let new_value = large(&format!("{}-new", held[0]));
        changes.insert(held[0].as_bytes().to_vec(), Some(record(&new_value, 3)));
        expected.insert(held[0].to_string(), Some(new_value));
        if let Some(deleted) = held.get(1) {
            changes.insert(deleted.as_bytes().to_vec(), None);
            expected.insert(deleted.to_string(), None);
        }
    }
    commit(&store, 3, changes);
    store.flush().unwrap();
    let after = store.values.segment_ids();
    let collected: Vec<u32> = before.iter().filter(|id| !after.contains(id)).copied().collect();
    assert!(
        !collected.is_empty(),
        "the third flush collected nothing: {before:?} then {after:?}"
    );
    let check = |store: &StateStore| {
        for (key, value) in &expected {
            let held = store.get(key.as_bytes()).unwrap().map(|r| r.value.to_vec());
            assert_eq!(&held, value, "{key}");
            if value.is_some() {
                let segment = raw_record(store, key).value_ref.expect("a large value").segment;
                assert!(
                    !collected.contains(&segment),
                    "{key} points into collected segment {segment}"
                );
            }
        }
        // The live bytes are exactly the records the keys point to.
        let live: u64 = expected
            .iter()
            .filter_map(|(key, value)| value.as_ref().map(|v| 12 + (key.len() + v.len()) as u64))
            .sum();
        assert_eq!(store.value_log_bytes().1, live);
    };
    check(&store);
    for id in &collected {
        assert!(!segment_path(dir.path(), *id).exists(), "segment {id} is still there");
    }
    store.close();
    let store = StateStore::open(dir.path(), 1 << 20).unwrap();
    check(&store);
}

//! Damage to a stopped follower's files in a 3-node cluster is found at
//! start and refused with what to do, never served and never a raft panic:
//! a flipped byte inside a fsynced log record, a store ahead of its log,
//! and a value log segment cut short.

mod support;

use std::time::Duration;

use support::Cluster;

const T: Duration = Duration::from_secs(30);

fn newest_log_file(data_dir: &std::path::Path) -> std::path::PathBuf {
    let mut files: Vec<_> = std::fs::read_dir(data_dir.join("raft-log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "raftlog"))
        .collect();
    files.sort();
    files.pop().expect("a raft log file")
}

/// Starts a cluster, writes, and stops a follower; returns it and the cluster.
async fn cluster_with_stopped_follower() -> (Cluster, u64) {
    cluster_with_stopped_follower_holding("").await
}

/// The same, with `padding` after each value (from 64 bytes on, values go
/// to the value log).
async fn cluster_with_stopped_follower_holding(padding: &str) -> (Cluster, u64) {
    let mut cluster = Cluster::start_static(3, &[]);
    let leader = cluster.wait_for_leader(&[1, 2, 3], T).await;
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    let client = cluster.client(&[1, 2, 3]);
    for i in 0..300 {
        support::put(&client, format!("key-{i:04}"), format!("value-{i:04}{padding}")).await;
    }
    cluster
        .wait_info(follower, T, "the follower applied everything, durably", |i| {
            i.applied_index >= 300 && i.snapshot_index >= 300
        })
        .await;
    cluster.kill(follower);
    (cluster, follower)
}

fn assert_refused(cluster: &mut Cluster, id: u64, says: &str) {
    cluster.start(id);
    let status = cluster.wait_exit(id, T).expect("the damaged node kept running");
    assert!(!status.success(), "{status:?}");
    assert_ne!(status.code(), Some(101), "a panic, not a refusal");
    let log = cluster.node_log(id);
    assert!(log.contains(says), "{log}");
    assert!(log.contains("new id"), "the message says what to do: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_followers_log_is_refused_at_start() {
    let (mut cluster, follower) = cluster_with_stopped_follower().await;
    let file = newest_log_file(&cluster.node(follower).data_dir);
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes
        .windows(8)
        .position(|w| w == b"key-0100")
        .expect("an early entry is in the newest file");
    bytes[at] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    assert_refused(&mut cluster, follower, "a complete record follows");
    // The others carry on.
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != follower).collect();
    support::put(&cluster.client(&others), "after", "yes").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_ahead_of_its_log_is_refused_at_start() {
    let (mut cluster, follower) = cluster_with_stopped_follower().await;
    // An older copy of the log next to a newer store: what a restore of
    // raft-log/ alone from an older backup of the disk would leave.
    let data_dir = cluster.node(follower).data_dir.clone();
    let file = newest_log_file(&data_dir);
    let bytes = std::fs::read(&file).unwrap();
    let first_record_end = bytes
        .windows(8)
        .position(|w| w == b"key-0000")
        .expect("the first entries are in the newest file");
    // Keep the file header and records up to the first write: everything
    // after is gone, as if the log were older than the store.
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(first_record_end as u64).unwrap();
    drop(f);
    assert_refused(&mut cluster, follower, "the log lost entries it had fsynced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_log_segment_cut_short_is_refused_at_start() {
    let (mut cluster, follower) = cluster_with_stopped_follower_holding(&"x".repeat(200)).await;
    let segment = cluster.node(follower).data_dir.join("values/00000001.seg");
    let len = std::fs::metadata(&segment)
        .expect("the values went to the value log")
        .len();
    assert!(len > 300 * 200, "{len} bytes");
    let f = std::fs::OpenOptions::new().write(true).open(&segment).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    assert_refused(&mut cluster, follower, "values of keys this node acknowledged are lost");
}

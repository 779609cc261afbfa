//! Snapshots and log compaction across a restart of the process. (A follower
//! that misses more than two thresholds of writes and catches up by snapshot
//! is tested on the in-process cluster, tests/in_process.rs.)

mod support;

use std::time::Duration;

use support::Cluster;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_recovers_from_its_snapshot_and_log() {
    let mut cluster = Cluster::start_static(1, &["--snapshot-threshold", "30"]);
    cluster.wait_for_leader(&[1], T).await;
    let client = cluster.client(&[1]);
    for i in 0..100 {
        support::put(&client, format!("k{i:03}"), format!("{i}")).await;
    }
    client.delete("k000").await.unwrap();
    // The store is made durable every 30 entries and every second.
    let before = cluster
        .wait_info(1, T, "the store durable past index 90", |i| i.snapshot_index >= 90)
        .await;
    assert!(before.first_index > 1, "log compacted: {before:?}");

    cluster.kill(1);
    cluster.start(1);
    cluster.wait_for_leader(&[1], T).await;
    let after = cluster.info(1).await.unwrap();
    assert_eq!(after.keys, 99);
    assert!(after.applied_index >= before.applied_index);
    let client = cluster.client(&[1]);
    assert_eq!(client.get("k000").await.unwrap(), None);
    assert_eq!(client.get("k099").await.unwrap().as_deref(), Some(&b"99"[..]));
}

/// A follower killed (-9) while a snapshot streams to it (more state than
/// one stream frame may carry) never installs a part: after the restart it
/// gets the snapshot again, whole, and serves every write acknowledged
/// before.
/// A 3-node cluster that compacts its log often, with one follower killed:
/// the cluster, the leader, the follower, and a client of the other two.
async fn with_a_follower_down() -> (Cluster, u64, u64, kvraft::Client) {
    let mut cluster = Cluster::start_static(3, &["--snapshot-threshold", "100"]);
    let leader = cluster.wait_for_leader(&[1, 2, 3], T).await;
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != follower).collect();
    cluster.kill(follower);
    let client = cluster.client(&others);
    (cluster, leader, follower, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_killed_mid_stream_gets_the_whole_snapshot_again_and_loses_nothing() {
    let (mut cluster, leader, follower, client) = with_a_follower_down().await;
    // More state than one frame of the stream may carry, so it takes a
    // while (many chunks), written past the catch-up tail so only a
    // snapshot can bring the follower back.
    let value = "x".repeat(8 * 1024);
    const KEYS: usize = 1600;
    assert!(KEYS * value.len() > kvraft::storage::snapshot_stream::MAX_FRAME);
    let mut acked = Vec::new();
    for i in 0..KEYS {
        support::put(&client, format!("k{i:05}"), &value).await;
        acked.push((format!("k{i:05}"), value.clone()));
    }
    let incoming = cluster.node(follower).data_dir.join("snapshot-incoming");
    cluster.start(follower);
    // Kill it as soon as a stream is being staged.
    let deadline = std::time::Instant::now() + T;
    loop {
        let staging = std::fs::read_dir(&incoming)
            .map(|d| {
                d.flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "partial"))
            })
            .unwrap_or(false);
        if staging {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no snapshot stream began");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    cluster.kill(follower);
    // Only what the restarted process logs counts below.
    let logged_before = cluster.node_log(follower).len();
    cluster.start(follower);
    let leader_info = cluster.info(leader).await.unwrap();
    let caught_up = cluster
        .wait_info(follower, T, "the follower caught up by a whole snapshot", |i| {
            i.applied_index >= leader_info.commit_index
        })
        .await;
    assert_eq!(caught_up.keys, KEYS as u64, "{caught_up:?}");
    let log = cluster.node_log(follower)[logged_before..].to_string();
    assert!(log.contains("installed snapshot from the leader"), "{log}");
    // Read the follower's own copy: it holds every acknowledged write.
    let local = cluster.client_with(&[follower], T, true);
    support::assert_all_readable(&local, &acked).await;
}

/// A crash between the two steps of a snapshot install (the log reset to the
/// snapshot's index, then the store file replaced by the staged one) is
/// finished at the next start: the follower serves every acknowledged write
/// and takes new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_log_reset_and_the_store_install_is_finished_at_the_next_start() {
    let (mut cluster, leader, follower, client) = with_a_follower_down().await;
    // Past the catch-up tail: only a snapshot can bring the follower back.
    let mut acked = Vec::new();
    for i in 0..600 {
        support::put(&client, format!("k{i:04}"), &format!("v{i}")).await;
        acked.push((format!("k{i:04}"), format!("v{i}")));
    }
    cluster
        .node(follower)
        .env(kvraft::node::startup::CRASH_MID_INSTALL_HOOK, "1");
    cluster.start(follower);
    let status = cluster
        .wait_exit(follower, T)
        .expect("the follower got a snapshot and aborted in the middle of installing it");
    assert!(!status.success(), "{status:?}");
    let log = cluster.node_log(follower);
    assert!(
        log.contains("aborting between the log reset and the store install"),
        "{log}"
    );

    cluster
        .node(follower)
        .env(kvraft::node::startup::CRASH_MID_INSTALL_HOOK, "0");
    cluster.start(follower);
    let leader_info = cluster.info(leader).await.unwrap();
    cluster
        .wait_info(
            follower,
            T,
            "the follower caught up after the interrupted install",
            |i| i.applied_index >= leader_info.commit_index,
        )
        .await;
    let log = cluster.node_log(follower);
    assert!(
        log.contains("completed a snapshot install interrupted by a crash"),
        "{log}"
    );
    let local = cluster.client_with(&[follower], T, true);
    support::assert_all_readable(&local, &acked).await;
    support::put(&client, "after", "the crash").await;
    acked.push(("after".to_string(), "the crash".to_string()));
    let everyone = cluster.client(&[1, 2, 3]);
    support::assert_all_readable(&everyone, &acked).await;
}

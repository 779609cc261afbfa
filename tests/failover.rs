//! Crashes: kill -9 of the leader, and of every node at once. Every
//! acknowledged write must survive.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::Cluster;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_elects_a_new_one_and_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start_static(3, &[]);
    let leader = cluster.wait_for_leader(&[1, 2, 3], T).await;
    let client = cluster.client(&[1, 2, 3]);
    let mut acked = BTreeMap::new();
    for i in 0..100 {
        let (k, v) = (format!("before/{i}"), format!("v{i}"));
        support::put(&client, k.clone(), v.clone()).await;
        acked.insert(k, v);
    }
    let term_before = cluster.info(leader).await.unwrap().term;

    cluster.kill(leader);
    let survivors: Vec<u64> = cluster.ids().into_iter().filter(|id| *id != leader).collect();
    let new_leader = cluster.wait_for_leader(&survivors, T).await;
    assert_ne!(new_leader, leader);
    assert!(cluster.info(new_leader).await.unwrap().term > term_before);

    let client = cluster.client(&survivors);
    for i in 0..50 {
        let (k, v) = (format!("after/{i}"), format!("w{i}"));
        support::put(&client, k.clone(), v.clone()).await;
        acked.insert(k, v);
    }
    for id in &survivors {
        let reader = cluster.client(&[*id]);
        for (k, v) in &acked {
            assert_eq!(
                reader.get(k.clone()).await.unwrap().as_deref(),
                Some(v.as_bytes()),
                "node {id} key {k}"
            );
        }
    }

    // The old leader comes back as a follower and catches up.
    cluster.start(leader);
    let commit = cluster.info(new_leader).await.unwrap().commit_index;
    cluster
        .wait_info(leader, T, "caught up", |i| {
            i.applied_index >= commit && i.role == "follower"
        })
        .await;
    let local = cluster.client_with(&[leader], Duration::from_secs(5), true);
    assert_eq!(local.get("after/49").await.unwrap().as_deref(), Some(&b"w49"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_every_node_under_load_loses_no_acknowledged_write() {
    // A small snapshot threshold so recovery goes through snapshot + log replay.
    let mut cluster = Cluster::start_static(3, &["--snapshot-threshold", "50"]);
    cluster.wait_for_leader(&[1, 2, 3], T).await;
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..4 {
        let client = cluster.client_with(&[1, 2, 3], Duration::from_secs(2), false);
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                // Half the writers' values are large enough for the value
                // log: its appends and commits are cut by the kills too.
                let padding = if w % 2 == 0 { "x".repeat(100) } else { String::new() };
                let (k, v) = (format!("w{w}/{i}"), format!("value-{w}-{i}{padding}"));
                match client.set(k.clone(), v.clone()).await {
                    Ok(_) => acked.lock().unwrap().push((k, v)),
                    Err(_) => return i,
                }
            }
            unreachable!()
        }));
    }
    support::eventually(T, "300 acknowledged writes", || {
        let n = acked.lock().unwrap().len();
        async move { n >= 300 }
    })
    .await;
    for id in [1, 2, 3] {
        cluster.kill(id);
    }
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    for id in [1, 2, 3] {
        cluster.start(id);
    }
    let leader = cluster.wait_for_leader(&[1, 2, 3], T).await;
    let info = cluster.info(leader).await.unwrap();
    assert!(info.snapshot_index > 1, "snapshots were taken during the run: {info:?}");
    let client = cluster.client(&[1, 2, 3]);
    support::assert_all_readable(&client, &acked).await;
}

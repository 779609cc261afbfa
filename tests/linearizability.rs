//! A concurrent history of sets, deletes and gets on a few keys, every write a
//! unique value, recorded across repeated kill -9 of the leader and checked
//! for linearizability with a Wing-Gong style search. Serializable reads run
//! alongside; they may be stale, but may only return values that were written.

#[path = "support/linearizability.rs"]
mod linearizability;
mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use linearizability::{check, Clock, Op};
use rand::Rng;
use support::Cluster;

const T: Duration = Duration::from_secs(30);
const KEYS: [&str; 3] = ["x", "y", "z"];

/// A serializable read: the key and the value it returned.
type StaleRead = (String, Vec<u8>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histories_across_leader_kills_are_linearizable() {
    let mut cluster = Cluster::start_static(3, &["--snapshot-threshold", "200"]);
    cluster.wait_for_leader(&[1, 2, 3], T).await;
    let clock = Clock::new();
    let history: Arc<Mutex<Vec<Op>>> = Arc::default();
    let run_until = Instant::now() + Duration::from_secs(8);

    let mut workers = Vec::new();
    for c in 0..5 {
        let client = cluster.client_with(&[1, 2, 3], Duration::from_secs(2), false);
        let history = history.clone();
        workers.push(tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < run_until {
                let key = KEYS[rand::rng().random_range(0..KEYS.len())];
                let roll = rand::rng().random_range(0..100);
                let invoke = clock.now();
                let op = if roll < 40 {
                    n += 1;
                    let value = format!("c{c}-{n}");
                    match client.set(key, value.clone()).await {
                        Ok(_) => Op::write(key, value, invoke, Some(clock.now())),
                        // Sent, but the client can't tell whether it applied:
                        // it may take effect at any time after `invoke`.
                        Err(kvraft::Error::OutcomeUnknown(_)) => Op::write(key, value, invoke, None),
                        // Definitely not applied: it never happened. (If the
                        // client were wrong, a read seeing it fails the check.)
                        Err(_) => continue,
                    }
                } else if roll < 55 {
                    match client.delete(key).await {
                        Ok(_) => Op::delete(key, invoke, Some(clock.now())),
                        Err(kvraft::Error::OutcomeUnknown(_)) => Op::delete(key, invoke, None),
                        Err(_) => continue,
                    }
                } else {
                    match client.get(key).await {
                        Ok(value) => Op::read(key, value, invoke, clock.now()),
                        Err(_) => continue,
                    }
                };
                history.lock().unwrap().push(op);
            }
        }));
    }
    // Serializable readers: any node's local copy, no read-index round.
    let stale_reads: Arc<Mutex<Vec<StaleRead>>> = Arc::default();
    for id in 1..=3u64 {
        let client = cluster.client_with(&[id], Duration::from_secs(2), true);
        let stale_reads = stale_reads.clone();
        workers.push(tokio::spawn(async move {
            while Instant::now() < run_until {
                let key = KEYS[rand::rng().random_range(0..KEYS.len())];
                if let Ok(Some(value)) = client.get(key).await {
                    stale_reads.lock().unwrap().push((key.to_string(), value));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }

    // Nemesis: kill -9 the leader, restart it, three times.
    let mut kills = Vec::new();
    cluster.kill_leaders(&[1, 2, 3], 3, || kills.push(clock.now())).await;
    for w in workers {
        w.await.unwrap();
    }

    let ops = history.lock().unwrap().clone();
    let completed_writes = ops
        .iter()
        .filter(|o| matches!(o.kind, linearizability::OpKind::Write(_)) && o.complete.is_some())
        .count();
    let reads_with_values = ops
        .iter()
        .filter(|o| matches!(&o.kind, linearizability::OpKind::Read(Some(_))))
        .count();
    assert!(
        completed_writes >= 100,
        "too little traffic got through: {completed_writes} writes"
    );
    assert!(
        reads_with_values >= 100,
        "too few reads saw values: {reads_with_values}"
    );
    // The kills hit live traffic: each had operations in flight across it,
    // and writes were acknowledged after it.
    for (i, kill) in kills.iter().enumerate() {
        let in_flight = ops
            .iter()
            .filter(|o| o.invoke < *kill && o.complete.is_none_or(|c| c > *kill))
            .count();
        assert!(in_flight > 0, "kill {i}: no operation was in flight across it");
        let acked_after = ops
            .iter()
            .filter(|o| o.invoke > *kill && matches!(o.kind, linearizability::OpKind::Write(_)) && o.complete.is_some())
            .count();
        assert!(acked_after > 0, "kill {i}: no write was acknowledged after it");
    }
    let deletes = ops
        .iter()
        .filter(|o| matches!(o.kind, linearizability::OpKind::Delete) && o.complete.is_some())
        .count();
    assert!(deletes >= 20, "too few deletes got through: {deletes}");
    // A serializable read may be stale, never invented.
    let written: std::collections::HashSet<(Vec<u8>, Vec<u8>)> = ops
        .iter()
        .filter_map(|o| match &o.kind {
            linearizability::OpKind::Write(v) => Some((o.key.clone(), v.clone())),
            _ => None,
        })
        .collect();
    let stale_reads = stale_reads.lock().unwrap().clone();
    assert!(
        stale_reads.len() >= 100,
        "too few serializable reads: {}",
        stale_reads.len()
    );
    for (key, value) in &stale_reads {
        assert!(
            written.contains(&(key.as_bytes().to_vec(), value.clone())),
            "a serializable read of {key} returned {:?}, which nobody wrote",
            value.escape_ascii().to_string()
        );
    }
    if let Err(violation) = check(&ops) {
        panic!("not linearizable: {violation:?}");
    }
    eprintln!(
        "checked {} operations ({completed_writes} acknowledged writes)",
        ops.len()
    );
}

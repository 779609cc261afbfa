//! A concurrent history of sets and gets on a few keys, every write a unique
//! value, recorded across repeated kill -9 of the leader and checked for
//! linearizability with a Wing-Gong style search.

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
                let write = rand::rng().random_bool(0.5);
                let invoke = clock.now();
                let op = if write {
                    n += 1;
                    let value = format!("c{c}-{n}");
                    let result = client.set(key, value.clone()).await;
                    // Any failed write may still have been applied: record it
                    // as "outcome unknown" (return time infinity).
                    let complete = result.is_ok().then(|| clock.now());
                    Op::write(key, value, invoke, complete)
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

    // Nemesis: kill -9 the leader, restart it, three times.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let leader = cluster.wait_for_leader(&[1, 2, 3], T).await;
        cluster.kill(leader);
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster.start(leader);
    }
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
    if let Err(violation) = check(&ops) {
        panic!("not linearizable: {violation:?}");
    }
    eprintln!(
        "checked {} operations ({completed_writes} acknowledged writes)",
        ops.len()
    );
}

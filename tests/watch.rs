//! Watches on real clusters: a watcher's stream across leader kills checked
//! against the cluster's final history (as etcd's robustness tests do),
//! compaction, progress, slow watchers, many watches on one connection, and
//! bad input.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvraft::proto::{watch_event, KeyRange, TxnOp, TxnRequest, WatchEvent};
use kvraft::{Client, WatchOptions, WatchUpdate, Watcher};
use support::{eventually, stderr, stdout, Cluster};

const T: Duration = Duration::from_secs(30);

/// One event as compared: (revision, key, value, or None for a delete).
type Seen = (u64, String, Option<String>);

fn seen(e: &WatchEvent) -> Seen {
    let kv = e.kv.clone().unwrap();
    let value = (e.r#type == watch_event::Type::Put as i32).then(|| String::from_utf8(kv.value).unwrap());
    (kv.mod_revision, String::from_utf8(kv.key).unwrap(), value)
}

/// Reads `watcher` until it has seen everything up to `revision`.
async fn read_until(watcher: &mut Watcher, revision: u64, into: &mut Vec<Seen>) {
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let update = tokio::time::timeout(left, watcher.next())
            .await
            .unwrap_or_else(|_| panic!("the watcher did not reach revision {revision}: {into:?}"))
            .expect("the watch ended")
            .expect("the watch failed");
        let current = match update {
            WatchUpdate::Events { events, revision } => {
                into.extend(events.iter().map(seen));
                revision
            }
            WatchUpdate::Progress { revision } => revision,
        };
        if current >= revision {
            return;
        }
    }
}

fn prefix(p: &str, start_revision: u64) -> WatchOptions {
    WatchOptions {
        range: Some(KeyRange::prefix(p)),
        start_revision,
        progress_interval: Some(Duration::from_millis(300)),
        ..Default::default()
    }
}

/// The revision every write so far was applied at (a write's, read back).
async fn current_revision(client: &Client) -> u64 {
    client.set("probe/now", "x").await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_sees_every_change_once_in_order_across_leader_kills() {
    let mut cluster = Cluster::start_static(3, &[]);
    let leader = cluster.wait_for_leader(&[1, 2, 3], T).await;
    // The watcher's first endpoint is the leader, so the first kill takes
    // its node away and it must resume elsewhere.
    let mut order = vec![leader];
    order.extend([1, 2, 3].into_iter().filter(|id| *id != leader));
    let watch_client = cluster.client_with(&order, Duration::from_secs(3), false);
    let mut watcher = watch_client.watch(prefix("w/", 1)).await.unwrap();

    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let run_until = Instant::now() + Duration::from_secs(7);
    let mut writers = Vec::new();
    for c in 0..3 {
        let client = cluster.client_with(&[1, 2, 3], Duration::from_secs(3), false);
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < run_until {
                n += 1;
                let key = format!("w/{}", n % 7);
                let value = format!("c{c}-{n}");
                let done = match n % 10 {
                    // A transaction: two keys at one revision.
                    0 => client
                        .txn(TxnRequest {
                            success: vec![TxnOp::put(key.clone(), value.clone()), TxnOp::delete(format!("w/t{c}"))],
                            ..Default::default()
                        })
                        .await
                        .is_ok(),
                    1 => client.delete(key.clone()).await.is_ok(),
                    _ => client.set(key.clone(), value.clone()).await.is_ok(),
                };
                if done && n % 10 != 1 {
                    acked.lock().unwrap().push((key, value));
                }
            }
        }));
    }
    // Read while the writes and kills go on: a watcher that is read keeps up.
    let mut stream: Vec<Seen> = Vec::new();
    let reader = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(9);
        while Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(500), watcher.next()).await {
                Ok(Some(Ok(WatchUpdate::Events { events, .. }))) => stream.extend(events.iter().map(seen)),
                Ok(Some(Ok(WatchUpdate::Progress { .. }))) | Err(_) => {}
                Ok(Some(Err(e))) => panic!("the watch failed: {e}"),
                Ok(None) => panic!("the watch ended"),
            }
        }
        (watcher, stream)
    });
    cluster.kill_leaders(&[1, 2, 3], 3, || {}).await;
    for w in writers {
        w.await.unwrap();
    }
    let (mut watcher, mut stream) = reader.await.unwrap();
    let client = cluster.client(&[1, 2, 3]);
    let last = current_revision(&client).await;
    read_until(&mut watcher, last, &mut stream).await;

    // The history as the cluster holds it: a new watch from revision 1.
    let mut history = Vec::new();
    let mut fresh = client.watch(prefix("w/", 1)).await.unwrap();
    read_until(&mut fresh, last, &mut history).await;
    assert_eq!(
        stream.len(),
        history.len(),
        "the watcher saw a different number of events"
    );
    assert_eq!(stream, history, "the watcher's stream differs from the history");
    // In revision order, each once.
    let mut keys_at: HashSet<(u64, String)> = HashSet::new();
    for pair in stream.windows(2) {
        assert!(pair[0].0 <= pair[1].0, "out of order: {pair:?}");
    }
    for (revision, key, _) in &stream {
        assert!(keys_at.insert((*revision, key.clone())), "{key} twice at {revision}");
    }
    // Every acknowledged write is in it, and the last event of each key is
    // the key's value now.
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 100, "too few writes got through: {}", acked.len());
    let puts: HashSet<(String, String)> = stream
        .iter()
        .filter_map(|(_, k, v)| v.clone().map(|v| (k.clone(), v)))
        .collect();
    for (key, value) in &acked {
        assert!(
            puts.contains(&(key.clone(), value.clone())),
            "acknowledged {key}={value} never seen"
        );
    }
    let mut last_of: BTreeMap<String, Option<String>> = BTreeMap::new();
    for (_, key, value) in &stream {
        last_of.insert(key.clone(), value.clone());
    }
    for (key, value) in last_of {
        let now = client
            .get(key.clone())
            .await
            .unwrap()
            .map(|v| String::from_utf8(v).unwrap());
        assert_eq!(now, value, "{key}");
    }
    eprintln!("{} events, {} acknowledged writes", stream.len(), acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_compacted_revision_fails_naming_the_oldest_one_left() {
    let cluster = Cluster::start_static(1, &["--history-retention-revisions", "20"]);
    cluster.wait_for_leader(&[1], T).await;
    let client = cluster.client(&[1]);
    for i in 0..40 {
        client.set(format!("c/{i}"), "v").await.unwrap();
    }
    // Compaction comes with the store's next flush (every few seconds).
    eventually(T, "the history to be compacted", || async {
        let out = cluster.cli(&[1], &["watch", "c/", "--prefix", "--rev", "1", "--count", "1"]);
        out.status.code() == Some(3)
    })
    .await;
    let out = cluster.cli(&[1], &["watch", "c/", "--prefix", "--rev", "1", "--count", "1"]);
    assert!(
        stderr(&out).contains("revision 1 is compacted: the oldest revision this node still has is"),
        "{}",
        stderr(&out)
    );
    let err = client.watch(prefix("c/", 2)).await.err().unwrap().to_string();
    assert!(err.contains("compacted"), "{err}");
    // From the oldest one left, it works, and replays to now.
    let oldest: u64 = err
        .split("still has is ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no revision in {err}"));
    let mut watcher = client.watch(prefix("c/", oldest)).await.unwrap();
    let mut got = Vec::new();
    let now = current_revision(&client).await;
    read_until(&mut watcher, now, &mut got).await;
    assert!(!got.is_empty() && got[0].0 >= oldest, "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_prev_kv_many_watches_on_one_connection_and_a_watcher_not_read() {
    let cluster = Cluster::start_static(1, &[]);
    cluster.wait_for_leader(&[1], T).await;
    let client = cluster.client(&[1]);
    let start = current_revision(&client).await + 1;
    // An idle watch hears that it is current.
    let mut idle = client.watch(prefix("idle/", 0)).await.unwrap();
    match tokio::time::timeout(T, idle.next()).await.unwrap().unwrap().unwrap() {
        WatchUpdate::Progress { revision } => assert!(revision >= start - 1, "{revision}"),
        other => panic!("{other:?}"),
    }
    // Ten watches on the client's one connection, one of them never read
    // while 500 changes go by (more than its connection queue holds).
    let mut watchers = Vec::new();
    for _ in 0..9 {
        watchers.push(client.watch(prefix("m/", start)).await.unwrap());
    }
    let mut unread = client
        .watch(WatchOptions {
            prev_kv: true,
            ..prefix("m/", start)
        })
        .await
        .unwrap();
    // More watches than a connection has request slots (64): they take
    // none, so requests on the same connection still go through.
    let mut quiet = Vec::new();
    for _ in 0..70 {
        quiet.push(client.watch(prefix("quiet/", 0)).await.unwrap());
    }
    let started = Instant::now();
    for i in 0..500 {
        client.set(format!("m/{}", i % 5), format!("v{i}")).await.unwrap();
    }
    eprintln!("500 writes with an unread watcher took {:?}", started.elapsed());
    let now = current_revision(&client).await;
    let mut expected = Vec::new();
    read_until(&mut watchers[0], now, &mut expected).await;
    assert_eq!(expected.len(), 500);
    for w in watchers.iter_mut().skip(1) {
        let mut got = Vec::new();
        read_until(w, now, &mut got).await;
        assert_eq!(got, expected);
    }
    // The unread one resumes from its history: the same events, each with
    // the record it replaced.
    let mut got = Vec::new();
    let mut prevs = Vec::new();
    let deadline = Instant::now() + T;
    while got.len() < 500 && Instant::now() < deadline {
        if let Some(Ok(WatchUpdate::Events { events, .. })) = unread.next().await {
            got.extend(events.iter().map(seen));
            prevs.extend(events.iter().map(|e| e.prev_kv.clone()));
        }
    }
    assert_eq!(got, expected);
    assert!(
        prevs[..5].iter().all(Option::is_none),
        "the first write of each key had none"
    );
    let prev = prevs[5].clone().unwrap();
    assert_eq!((prev.key.as_slice(), prev.value.as_slice()), (&b"m/0"[..], &b"v0"[..]));
    // Dropped watchers are canceled on the node too.
    let open = || cluster.metric(1, "kvraft_watchers", &[]);
    assert!(open() >= 80.0, "{}", open());
    drop((quiet, watchers, unread, idle));
    eventually(T, "the dropped watches to end on the node", || async { open() == 0.0 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_streams_events_as_json_and_refuses_bad_watches() {
    let cluster = Cluster::start_static(1, &[]);
    cluster.wait_for_leader(&[1], T).await;
    let client = cluster.client(&[1]);
    let from = (current_revision(&client).await + 1).to_string();
    client.set("cfg/a", "1").await.unwrap();
    client.set("cfg/a", "2").await.unwrap();
    client.delete("cfg/a").await.unwrap();
    client.set("other", "x").await.unwrap();
    let out = cluster.cli(
        &[1],
        &[
            "--output",
            "json",
            "watch",
            "cfg/",
            "--prefix",
            "--rev",
            &from,
            "--prev-kv",
            "--count",
            "3",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "{}", stdout(&out));
    assert_eq!(
        (lines[0]["type"].as_str(), lines[0]["value"].as_str()),
        (Some("put"), Some("1"))
    );
    assert_eq!(lines[1]["version"].as_u64(), Some(2));
    assert_eq!(lines[1]["prev_kv"]["value"].as_str(), Some("1"));
    assert_eq!(lines[2]["type"].as_str(), Some("delete"));
    assert_eq!(lines[2]["prev_kv"]["value"].as_str(), Some("2"));
    for field in ["key", "value", "create_revision", "mod_revision", "version"] {
        assert!(lines[0].get(field).is_some(), "{field} missing: {}", lines[0]);
    }
    let out = cluster.cli(&[1], &["watch", "cfg/", "--to", "cfg/"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("must sort after"), "{}", stderr(&out));
    let empty = WatchOptions {
        range: Some(KeyRange {
            prefix: b"a/".to_vec(),
            from: b"b".to_vec(),
            to: Vec::new(),
        }),
        ..Default::default()
    };
    let err = client.watch(empty).await.err().unwrap().to_string();
    assert!(err.contains("the watched range holds no key"), "{err}");
}

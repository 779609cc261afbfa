//! Compare-and-swap, transactions and range deletes, through the CLI as an
//! operator runs them and through the client library, on real clusters.

#[path = "support/cas_register.rs"]
mod cas_register;
mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvraft::proto::{compare, request, response, Compare, ErrorCode, KeyRange, TxnOp, TxnRequest};
use kvraft::{CasOutcome, Expect};
use serde_json::Value;
use support::{stderr, stdout, Cluster};

const T: Duration = Duration::from_secs(30);

fn json(out: &std::process::Output) -> Value {
    serde_json::from_str(stdout(out).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout(out)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_txn_and_range_deletes_from_the_cli_with_their_exit_statuses() {
    let cluster = Cluster::start_static(1, &[]);
    cluster.wait_for_leader(&[1], T).await;

    // cas: created when absent, then refused (exit 4, current value shown).
    let out = cluster.cli(&[1], &["cas", "cfg", "v1", "--expect-absent"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "OK");
    let out = cluster.cli(&[1], &["cas", "cfg", "other", "--expect-absent"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("FAILED: \"cfg\" is \"v1\" (version 1, mod_revision"),
        "{}",
        stdout(&out)
    );
    let out = cluster.cli(&[1], &["--output", "json", "cas", "cfg", "v2", "--expect-value", "v0"]);
    assert_eq!(out.status.code(), Some(4));
    let failed = json(&out);
    assert_eq!(failed["swapped"], false);
    assert_eq!(
        (
            failed["current"]["value"].as_str(),
            failed["current"]["version"].as_u64()
        ),
        (Some("v1"), Some(1))
    );
    let out = cluster.cli(&[1], &["--output", "json", "cas", "cfg", "v2", "--expect-version", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let swapped = json(&out);
    let revision = swapped["revision"].as_u64().unwrap();
    assert_eq!(swapped["swapped"], true);
    let record = json(&cluster.cli(&[1], &["--output", "json", "get", "cfg"]));
    assert_eq!(record["mod_revision"].as_u64(), Some(revision));
    assert_eq!(record["version"].as_u64(), Some(2));
    let expect_rev = revision.to_string();
    let out = cluster.cli(&[1], &["cas", "cfg", "v3", "--expect-mod-revision", &expect_rev]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = cluster.cli(&[1], &["cas", "cfg", "v4", "--expect-mod-revision", &expect_rev]);
    assert_eq!(out.status.code(), Some(4), "the revision moved on: {}", stdout(&out));
    let out = cluster.cli(&[1], &["cas", "cfg", "v4"]);
    assert_eq!(out.status.code(), Some(2), "an expectation is required");
    assert!(stderr(&out).contains("--expect-"), "{}", stderr(&out));

    // txn from stdin: the README's example, then again (its compare fails).
    let txn = br#"{
      "compare": [{"key": "svc/leader", "target": "version", "op": "=", "value": 0}],
      "success": [
        {"put": {"key": "svc/leader", "value": "node-a"}},
        {"put": {"key": "svc/term", "value": "1"}},
        {"range": {"prefix": "svc/"}}
      ],
      "failure": [{"get": {"key": "svc/leader"}}]
    }"#;
    let out = cluster.cli_with_stdin(&[1], &["--output", "json", "txn"], txn);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let ran = json(&out);
    assert_eq!(ran["succeeded"], true);
    let revision = ran["revision"].as_u64().unwrap();
    assert_eq!(ran["results"][0]["put"]["revision"].as_u64(), Some(revision));
    let kvs = ran["results"][2]["range"]["kvs"].as_array().unwrap();
    let keys: Vec<&str> = kvs.iter().map(|kv| kv["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["svc/leader", "svc/term"], "the range sees the puts before it");
    assert!(
        kvs.iter().all(|kv| kv["mod_revision"].as_u64() == Some(revision)),
        "{kvs:?}"
    );
    let out = cluster.cli_with_stdin(&[1], &["txn"], txn);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("FAILED (revision"), "{}", stdout(&out));
    assert!(stdout(&out).contains("svc/leader\tnode-a"), "{}", stdout(&out));

    // Bad transactions say what is wrong, and change nothing.
    for (input, says) in [
        (
            &br#"{"compare": [{"key": "k", "target": "colour", "op": "=", "value": 1}]}"#[..],
            "unknown target \"colour\"",
        ),
        (
            br#"{"success": [{"put": {"key": "a", "value": "1"}}, {"put": {"key": "a", "value": "2"}}]}"#,
            "\"a\" is written twice",
        ),
        (
            br#"{"success": [{"put": {"key": "", "value": "1"}}]}"#,
            "success branch: operation 1: the key is empty",
        ),
        (b"{not json", "the transaction on stdin"),
    ] {
        let out = cluster.cli_with_stdin(&[1], &["txn"], input);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}: {}",
            String::from_utf8_lossy(input),
            stderr(&out)
        );
        assert!(stderr(&out).contains(says), "{says:?} not in {}", stderr(&out));
    }
    assert_eq!(cluster.client(&[1]).get("a").await.unwrap(), None);

    // Range deletes: one revision for every key, the count reported.
    for k in ["p/1", "p/2", "p/3", "q/1", "q/2"] {
        cluster.client(&[1]).set(k, "x").await.unwrap();
    }
    let out = cluster.cli(&[1], &["--output", "json", "delete", "--prefix", "p/"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["count"].as_u64(), Some(3));
    assert_eq!(json(&out)["deleted"], true);
    let out = cluster.cli(&[1], &["delete", "--from", "q/2", "--to", "r"]);
    assert_eq!(stdout(&out).trim(), "deleted 1 key");
    let out = cluster.cli(&[1], &["delete", "--from", "z", "--to", "a"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("must sort after"), "{}", stderr(&out));
    let out = cluster.cli(&[1], &["delete", "--to", ""]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an empty --to is refused, not \"everything\""
    );
    let out = cluster.cli(&[1], &["delete", "k", "--prefix", "p"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a key and a range at once: {}",
        stderr(&out)
    );
    let left = cluster.cli(&[1], &["scan", "--prefix", ""]);
    let left: Vec<String> = stdout(&left)
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_string())
        .collect();
    assert_eq!(left, ["cfg", "q/1", "svc/leader", "svc/term"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_transactions_get_a_clear_error() {
    let cluster = Cluster::start_static(1, &[]);
    cluster.wait_for_leader(&[1], T).await;
    let addr = cluster.endpoints(&[1]);
    let unknown_target = TxnRequest {
        compare: vec![Compare {
            key: b"k".to_vec(),
            target: 42,
            op: compare::Op::Equal as i32,
            ..Default::default()
        }],
        ..Default::default()
    };
    match support::raw_request(&addr, request::Command::Txn(unknown_target)).await {
        response::Result::Error(e) => {
            assert_eq!(e.code(), ErrorCode::InvalidArgument);
            assert!(
                e.message.contains("compare 1: unknown compare target 42"),
                "{}",
                e.message
            );
        }
        other => panic!("{other:?}"),
    }
    let empty_op = TxnRequest {
        success: vec![TxnOp { op: None }],
        ..Default::default()
    };
    match support::raw_request(&addr, request::Command::Txn(empty_op)).await {
        response::Result::Error(e) => assert!(e.message.contains("no operation set"), "{}", e.message),
        other => panic!("{other:?}"),
    }
    // Over the frame limit (4 MiB by default): refused before it is read
    // whole, with the limit named.
    let client = cluster.client(&[1]);
    let big = TxnRequest {
        success: (0..5)
            .map(|i| TxnOp::put(format!("big{i}"), vec![b'x'; 1 << 20]))
            .collect(),
        ..Default::default()
    };
    let err = client.txn(big).await.unwrap_err().to_string();
    assert!(err.contains("frame") && err.contains("limit"), "{err}");
    assert_eq!(client.get("big0").await.unwrap(), None);
    // A read-only transaction needs no write: and the node is still fine.
    let read = client
        .txn(TxnRequest {
            success: vec![TxnOp::range(KeyRange::prefix(""), 0)],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(read.succeeded);
}

/// 4 clients increment one counter with compare-and-swap while the leader
/// is killed (kill -9) and restarted three times. Every value is tagged with
/// its writer, so the swaps form one chain, checked for linearizability
/// against real time; the counter ends at exactly the number of swaps that
/// took effect, so no update was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_increments_by_four_clients_across_leader_kills_lose_nothing_and_are_linearizable() {
    let mut cluster = Cluster::start_static(3, &[]);
    cluster.wait_for_leader(&[1, 2, 3], T).await;
    let clock = cas_register::Clock::new();
    let history: Arc<Mutex<Vec<cas_register::Op>>> = Arc::default();
    let acknowledged = Arc::new(Mutex::new(0u64));
    let run_until = Instant::now() + Duration::from_secs(8);
    let counter = |value: &[u8]| -> u64 {
        let text = std::str::from_utf8(value).unwrap();
        text.split(':').next().unwrap().parse().unwrap()
    };
    let mut workers = Vec::new();
    for c in 0..4 {
        let client = cluster.client_with(&[1, 2, 3], Duration::from_secs(3), false);
        let (history, acknowledged) = (history.clone(), acknowledged.clone());
        workers.push(tokio::spawn(async move {
            let mut attempt = 0;
            while Instant::now() < run_until {
                let invoke = clock.now();
                let Ok(current) = client.get("counter").await else {
                    continue;
                };
                let current = current.map(|v| v.to_vec());
                history
                    .lock()
                    .unwrap()
                    .push(cas_register::Op::read("counter", current.clone(), invoke, clock.now()));
                attempt += 1;
                let next = current.as_deref().map_or(0, counter) + 1;
                let new = format!("{next}:c{c}:{attempt}");
                let expect = match &current {
                    Some(v) => Expect::Value(v.clone()),
                    None => Expect::Absent,
                };
                let invoke = clock.now();
                let op = match client.cas("counter", expect, new.clone()).await {
                    Ok(CasOutcome::Swapped { .. }) => {
                        *acknowledged.lock().unwrap() += 1;
                        cas_register::Op::swap("counter", current, new, invoke, Some(clock.now()))
                    }
                    Ok(CasOutcome::Failed { current }) => {
                        cas_register::Op::failed_swap("counter", current.map(|kv| kv.value), invoke, clock.now())
                    }
                    Err(kvraft::Error::OutcomeUnknown(_)) => {
                        cas_register::Op::swap("counter", current, new, invoke, None)
                    }
                    // Not applied: it never happened.
                    Err(_) => continue,
                };
                history.lock().unwrap().push(op);
            }
        }));
    }
    cluster.kill_leaders(&[1, 2, 3], 3, || {}).await;
    for w in workers {
        w.await.unwrap();
    }
    let ops = history.lock().unwrap().clone();
    let summary = match cas_register::check(&ops) {
        Ok(s) => s,
        Err(violation) => panic!("compare-and-swap is not linearizable: {violation}"),
    };
    let chain = summary.key("counter").expect("the counter was swapped");
    let acknowledged = *acknowledged.lock().unwrap();
    assert!(acknowledged >= 50, "too few swaps got through: {acknowledged}");
    assert!(
        chain.swaps() as u64 >= acknowledged && chain.swaps() <= chain.known_swaps + chain.unknown_swaps_included,
        "{chain:?}"
    );
    // The value now: its count is every swap that took effect, none lost.
    let last = cluster.client(&[1, 2, 3]).get("counter").await.unwrap().unwrap();
    assert_eq!(
        Some(last.as_slice()),
        chain.final_value(),
        "the last read is the chain's end"
    );
    assert_eq!(counter(&last), chain.swaps() as u64, "an increment was lost");
    let failed = ops
        .iter()
        .filter(|o| matches!(o.kind, cas_register::OpKind::Read(_)))
        .count();
    eprintln!(
        "{} swaps in the chain ({acknowledged} acknowledged, {} of unknown outcome taken in), {failed} reads",
        chain.swaps(),
        chain.unknown_swaps_included
    );
}

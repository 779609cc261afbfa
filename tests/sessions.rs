//! Exactly-once writes: a retried write (same session, same number) is
//! answered with the first apply's revision and applied once, through any
//! node, after a restart and after a snapshot install; and a client under
//! leader kills and rolling restarts sees no error at all.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use kvraft::proto::{request, response, ErrorCode, RegisterSessionRequest, Request, SetRequest};
use prost::Message;
use support::Cluster;

const T: Duration = Duration::from_secs(30);

/// What one raw request got: a set's revision, or an error.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Revision(u64),
    Error(ErrorCode, String),
}

/// Sends `set key=value` as write `seq` of `session` straight to `addr`.
async fn set_in_session(addr: &str, key: &str, value: &str, session: u64, seq: u64, first_incomplete: u64) -> Answer {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut frames = kvraft::codec::framed(stream, kvraft::codec::CLIENT_MAX_FRAME);
    let request = Request {
        id: 1,
        command: Some(request::Command::Set(SetRequest {
            key: key.into(),
            value: value.into(),
            lease: 0,
        })),
        session_id: session,
        seq,
        first_incomplete,
    };
    frames.send(kvraft::codec::encode(&request)).await.unwrap();
    let frame = tokio::time::timeout(T, frames.next()).await.unwrap().unwrap().unwrap();
    match kvraft::proto::Response::decode(frame).unwrap().result.unwrap() {
        response::Result::Set(r) => Answer::Revision(r.revision),
        response::Result::Error(e) => Answer::Error(ErrorCode::try_from(e.code).unwrap(), e.message),
        other => panic!("unexpected {other:?}"),
    }
}

/// Registers a session through `addr`, as a client does before its first write.
async fn register(addr: &str) -> u64 {
    let deadline = std::time::Instant::now() + T;
    loop {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut frames = kvraft::codec::framed(stream, kvraft::codec::CLIENT_MAX_FRAME);
        let request = Request {
            id: 1,
            command: Some(request::Command::RegisterSession(RegisterSessionRequest {})),
            ..Default::default()
        };
        frames.send(kvraft::codec::encode(&request)).await.unwrap();
        let frame = tokio::time::timeout(T, frames.next()).await.unwrap().unwrap().unwrap();
        match kvraft::proto::Response::decode(frame).unwrap().result.unwrap() {
            response::Result::RegisterSession(r) => return r.session_id,
            other => assert!(std::time::Instant::now() < deadline, "{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends until a node answers with a revision (a node may be electing).
async fn set_until_answered(cluster: &Cluster, id: u64, key: &str, value: &str, session: u64, seq: u64) -> u64 {
    let deadline = std::time::Instant::now() + T;
    loop {
        match set_in_session(&cluster.endpoints(&[id]), key, value, session, seq, 1).await {
            Answer::Revision(r) => return r,
            other => assert!(std::time::Instant::now() < deadline, "node {id}: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_write_gets_the_first_revision_and_applies_once_across_nodes_restarts_and_snapshots() {
    // Small log thresholds: a follower that misses 300 writes gets a snapshot.
    let mut cluster = Cluster::start_static(3, &["--snapshot-threshold", "50", "--snapshot-catchup-entries", "20"]);
    cluster.wait_for_leader(&[1, 2, 3], T).await;
    let client = cluster.client(&[1, 2, 3]);
    let s = register(&cluster.endpoints(&[2])).await;

    let first = set_until_answered(&cluster, 1, "k", "first", s, 1).await;
    support::put(&client, "k", "newer").await;
    // The retry of write 1, through another node: the first revision, and
    // the newer value stays.
    assert_eq!(set_until_answered(&cluster, 2, "k", "first", s, 1).await, first);
    assert_eq!(client.get("k").await.unwrap().as_deref(), Some(&b"newer"[..]));

    // Write 2 says the client has its answer to 1: a late copy of 1 is
    // refused, unapplied.
    let second = set_until_answered(&cluster, 3, "k2", "x", s, 2).await;
    assert!(second > first);
    match set_in_session(&cluster.endpoints(&[1]), "k", "first", s, 1, 2).await {
        Answer::Error(ErrorCode::StaleWrite, why) => assert!(why.contains("answered already"), "{why}"),
        other => panic!("a late copy must be refused, got {other:?}"),
    }
    // A session the cluster does not know (never registered, or dropped):
    // refused even as its first write, which could be the retry of one
    // applied before the session went.
    match set_in_session(&cluster.endpoints(&[2]), "k", "lost", 0xdead, 1, 1).await {
        Answer::Error(ErrorCode::SessionExpired, why) => assert!(why.contains("new session"), "{why}"),
        other => panic!("an unknown session must be refused, got {other:?}"),
    }
    assert_eq!(client.get("k").await.unwrap().as_deref(), Some(&b"newer"[..]));

    // kill -9 of every node: the sessions come back with the state.
    for id in [1, 2, 3] {
        cluster.kill(id);
    }
    for id in [1, 2, 3] {
        cluster.start(id);
    }
    cluster.wait_for_leader(&[1, 2, 3], T).await;
    assert_eq!(set_until_answered(&cluster, 1, "k2", "x", s, 2).await, second);

    // A follower that is far behind gets the sessions in its snapshot.
    let leader = cluster.wait_for_leader(&[1, 2, 3], T).await;
    let follower = if leader == 3 { 2 } else { 3 };
    cluster.kill(follower);
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != follower).collect();
    let writer = cluster.client(&others);
    for i in 0..300 {
        support::put(&writer, format!("fill/{i}"), "v").await;
    }
    cluster.start(follower);
    cluster
        .wait_info(follower, T, "caught up by snapshot", |i| i.keys >= 302)
        .await;
    // The line is written just after the install that the key count shows.
    support::eventually(T, "the follower logs its snapshot install", || {
        let installed = cluster
            .node_log(follower)
            .contains("installed snapshot from the leader");
        async move { installed }
    })
    .await;
    assert_eq!(set_until_answered(&cluster, follower, "k2", "x", s, 2).await, second);
    // And what the session forgot stays forgotten there too.
    match set_in_session(&cluster.endpoints(&[follower]), "k", "first", s, 1, 1).await {
        Answer::Error(ErrorCode::StaleWrite, why) => assert!(why.contains("answered already"), "{why}"),
        other => panic!("a late copy must be refused, got {other:?}"),
    }
    assert_eq!(client.get("k").await.unwrap().as_deref(), Some(&b"newer"[..]));
}

/// Sends SIGTERM to a node and waits for it to exit by itself.
fn stop_gracefully(cluster: &mut Cluster, id: u64) {
    let pid = cluster.node(id).pid().expect("running") as i32;
    // SAFETY: a signal to a child process this test started.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let status = cluster.wait_exit(id, T).expect("exits after SIGTERM");
    assert!(status.success(), "node {id} exited with {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_see_no_error_through_leader_kills_and_a_rolling_restart() {
    let mut cluster = Cluster::start_static(3, &[]);
    cluster.wait_for_leader(&[1, 2, 3], T).await;

    // 16 writers on 4 clients (as `kvraft bench put --clients 16 --conns 4`),
    // each write a new key, every call with a 10 s deadline.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let issued = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for c in 0..4 {
        let client = cluster.client_with(&[1, 2, 3], Duration::from_secs(10), false);
        for w in 0..4 {
            let (client, stop, acked, errors, issued) = (
                client.clone(),
                stop.clone(),
                acked.clone(),
                errors.clone(),
                issued.clone(),
            );
            writers.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("w{c}-{w}/{i}");
                    issued.fetch_add(1, Ordering::Relaxed);
                    match client.set(key.clone(), "v").await {
                        Ok(_) => acked.lock().unwrap().push(key),
                        Err(e) => errors.lock().unwrap().push(format!("{key}: {e}")),
                    }
                    i += 1;
                }
            }));
        }
    }
    let progress = |acked: &Arc<Mutex<Vec<String>>>| acked.lock().unwrap().len();
    let wait_for_progress = |from: usize| {
        let acked = acked.clone();
        async move {
            support::eventually(T, "writes go on", || {
                let acked = acked.clone();
                async move { progress(&acked) >= from + 200 }
            })
            .await
        }
    };

    // kill -9 of the leader, twice.
    for _ in 0..2 {
        wait_for_progress(progress(&acked)).await;
        let leader = cluster.wait_for_leader(&[1, 2, 3], T).await;
        cluster.kill(leader);
        let others: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();
        cluster.wait_for_leader(&others, T).await;
        wait_for_progress(progress(&acked)).await;
        cluster.start(leader);
        cluster
            .wait_info(leader, T, "back as a follower", |i| i.role == "follower")
            .await;
    }
    // A rolling restart: SIGTERM each node in turn, the leader included.
    for id in [1, 2, 3] {
        wait_for_progress(progress(&acked)).await;
        stop_gracefully(&mut cluster, id);
        cluster.start(id);
        cluster
            .wait_info(id, T, "back and following a leader", |i| i.leader_id != 0)
            .await;
    }
    wait_for_progress(progress(&acked)).await;
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }

    let errors = errors.lock().unwrap().clone();
    let acked = acked.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "{} of {} writes failed: {errors:#?}",
        errors.len(),
        issued.load(Ordering::Relaxed)
    );
    assert!(acked.len() >= 1_400, "only {} writes", acked.len());
    // Every acknowledged write is there.
    let reader = cluster.client(&[1, 2, 3]);
    support::assert_all_readable(
        &reader,
        &acked.iter().map(|k| (k.clone(), "v".to_string())).collect::<Vec<_>>(),
    )
    .await;
}

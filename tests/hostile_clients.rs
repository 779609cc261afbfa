//! What a hostile client can cost a node: idle sockets, slow frames, many
//! partly sent large frames, and more connections than there are file
//! descriptors. Each is bounded: idle and slow connections are closed, the
//! memory of partial frames has a ceiling, and failed accepts back off
//! instead of spinning.

mod support;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kvraft::proto::{response, ErrorCode, Response};
use prost::Message as _;
use support::peer_probe::memory;
use support::{free_port, Cluster, FAST_TIMING};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(30);

fn client_addr(cluster: &Cluster, id: u64) -> String {
    cluster.nodes.iter().find(|n| n.id == id).unwrap().client_addr.clone()
}

/// The next frame the server sends, `None` once it closes.
async fn next_response(stream: TcpStream) -> (Option<Response>, TcpStream) {
    let mut frames = kvraft::codec::framed(stream, kvraft::codec::CLIENT_MAX_FRAME);
    let frame = tokio::time::timeout(T, frames.next())
        .await
        .expect("the server answers or closes");
    let response = frame.and_then(Result::ok).map(|f| Response::decode(f).unwrap());
    (response, frames.into_inner())
}

async fn closes(stream: TcpStream) -> bool {
    let mut frames = kvraft::codec::framed(stream, kvraft::codec::CLIENT_MAX_FRAME);
    matches!(
        tokio::time::timeout(T, frames.next()).await,
        Ok(None) | Ok(Some(Err(_)))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_with_a_notice_and_clients_reconnect_by_themselves() {
    let cluster = Cluster::start_static(1, &["--client-idle-timeout-ms", "300"]);
    cluster.wait_for_leader(&[1], T).await;

    // A connection that sends nothing at all.
    let silent = TcpStream::connect(client_addr(&cluster, 1)).await.unwrap();
    let started = Instant::now();
    assert!(closes(silent).await);
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());

    // A connection that made a request and then went quiet gets a notice.
    let mut used = TcpStream::connect(client_addr(&cluster, 1)).await.unwrap();
    let ping = kvraft::proto::Request {
        id: 1,
        command: Some(kvraft::proto::request::Command::Ping(Default::default())),
        ..Default::default()
    };
    let bytes = ping.encode_to_vec();
    used.write_all(&(bytes.len() as u32).to_be_bytes()).await.unwrap();
    used.write_all(&bytes).await.unwrap();
    let (pong, used) = next_response(used).await;
    assert!(matches!(pong.unwrap().result, Some(response::Result::Ping(_))));
    let (notice, used) = next_response(used).await;
    let notice = notice.expect("an idle notice before closing");
    assert_eq!(notice.id, 0);
    match notice.result {
        Some(response::Result::Error(e)) => {
            assert_eq!(e.code, ErrorCode::IdleClosed as i32);
            assert!(e.message.contains("were not run"), "{}", e.message);
        }
        other => panic!("expected an idle notice, got {other:?}"),
    }
    assert!(closes(used).await);

    // The client library sees the close and reconnects: the write after it
    // neither fails nor comes back "outcome unknown".
    let client = cluster.client(&[1]);
    let closed_before = cluster.metric(1, "kvraft_client_connections_closed_total", &[("reason", "idle")]);
    client.set("a", "1").await.unwrap();
    support::eventually(T, "the idle client connection is closed", || {
        let now = cluster.metric(1, "kvraft_client_connections_closed_total", &[("reason", "idle")]);
        async move { now > closed_before }
    })
    .await;
    client.set("a", "2").await.expect("a write after an idle close");
    assert_eq!(client.get("a").await.unwrap().as_deref(), Some(&b"2"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_frames_and_idle_sockets_cannot_hold_slots() {
    let cluster = Cluster::start_static(
        1,
        &[
            "--max-connections",
            "4",
            "--client-idle-timeout-ms",
            "1500",
            "--client-read-timeout-ms",
            "500",
        ],
    );
    cluster.wait_for_leader(&[1], T).await;
    let addr = client_addr(&cluster, 1);

    // Slowloris: a header and a few bytes of body, then nothing.
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(&[0, 0, 0, 100, 1, 2, 3]).await.unwrap();
    let started = Instant::now();
    assert!(closes(slow).await);
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert!(cluster.metric(1, "kvraft_client_connections_closed_total", &[("reason", "slow")]) >= 1.0);

    // Every slot held by a socket that says nothing.
    let mut holders = Vec::new();
    for _ in 0..4 {
        holders.push(TcpStream::connect(&addr).await.unwrap());
    }
    let quick = cluster.client_with(&[1], Duration::from_millis(300), false);
    assert!(quick.ping().await.is_err(), "every slot is taken");
    // They are closed after the idle timeout, and clients get in again.
    let patient = cluster.client_with(&[1], T, false);
    let started = Instant::now();
    patient.ping().await.expect("a slot frees up");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    drop(holders);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partly_sent_frames_share_a_bounded_budget() {
    let budget: u64 = 16 << 20;
    let cluster = Cluster::start_static(
        1,
        &[
            "--max-partial-frame-bytes",
            &budget.to_string(),
            "--client-read-timeout-ms",
            "3000",
        ],
    );
    cluster.wait_for_leader(&[1], T).await;
    let addr = client_addr(&cluster, 1);
    let pid = cluster.nodes[0].pid().unwrap();
    let (rss_before, _) = memory(pid);

    // 50 connections each send a 4 MiB frame but its last byte (200 MiB in
    // all without a bound).
    let frame = 4 << 20;
    let mut senders = Vec::new();
    for _ in 0..50 {
        let addr = addr.clone();
        senders.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(&addr).await.unwrap();
            let mut bytes = (frame as u32).to_be_bytes().to_vec();
            bytes.resize(4 + frame - 1, 7);
            let _ = tokio::time::timeout(Duration::from_secs(20), stream.write_all(&bytes)).await;
            stream
        }));
    }
    let mut peak = 0;
    let until = Instant::now() + Duration::from_secs(2);
    let client = cluster.client_with(&[1], Duration::from_secs(2), false);
    let mut small_writes = 0;
    while Instant::now() < until {
        peak = peak.max(memory(pid).0.saturating_sub(rss_before));
        // Ordinary requests don't wait behind the hoarded budget.
        client
            .set(format!("small/{small_writes}"), "x")
            .await
            .expect("a small write while the budget is taken");
        small_writes += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "50 partial 4 MiB frames with a {} MiB budget: RSS peak +{} MiB",
        budget >> 20,
        peak >> 20
    );
    assert!(peak < budget + (24 << 20), "RSS grew {} MiB", peak >> 20);
    for sender in senders {
        drop(sender.await.unwrap());
    }
    cluster.client(&[1]).set("still", "serving").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_headers_alone_take_none_of_the_budget() {
    // A budget of one largest frame, and 64 connections that each send only
    // a header declaring one.
    let budget = (4u32 << 20).to_string();
    let cluster = Cluster::start_static(1, &["--max-partial-frame-bytes", &budget]);
    cluster.wait_for_leader(&[1], T).await;
    let addr = client_addr(&cluster, 1);
    let mut headers = Vec::new();
    for _ in 0..64 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream.write_all(&(4u32 << 20).to_be_bytes()).await.unwrap();
        headers.push(stream);
    }
    // A 100 KiB write still gets its budget.
    let client = cluster.client_with(&[1], Duration::from_secs(5), false);
    client
        .set("big", vec![7u8; 100 * 1024])
        .await
        .expect("a large write next to bare headers");
    drop(headers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_holds_a_bounded_number_of_responses_briefly() {
    let cluster = Cluster::start_static(1, &["--client-read-timeout-ms", "2000"]);
    cluster.wait_for_leader(&[1], T).await;
    let value = vec![7u8; 1 << 20];
    cluster.client(&[1]).set("big", value).await.unwrap();
    let pid = cluster.nodes[0].pid().unwrap();
    let (rss_before, _) = memory(pid);

    // 300 reads of a 1 MiB value in one write, and never a byte read back.
    let mut stream = TcpStream::connect(client_addr(&cluster, 1)).await.unwrap();
    let mut requests = Vec::new();
    for id in 1..=300u64 {
        let get = kvraft::proto::Request {
            id,
            command: Some(kvraft::proto::request::Command::Get(kvraft::proto::GetRequest {
                key: b"big".to_vec(),
                serializable: true,
            })),
            ..Default::default()
        };
        let bytes = get.encode_to_vec();
        requests.extend((bytes.len() as u32).to_be_bytes());
        requests.extend(bytes);
    }
    stream.write_all(&requests).await.unwrap();
    let mut peak = 0;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        peak = peak.max(memory(pid).0.saturating_sub(rss_before));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("300 unread 1 MiB responses: RSS peak +{} MiB", peak >> 20);
    // At most 64 responses (64 MiB) are held, not 300.
    assert!(peak < 100 << 20, "RSS grew {} MiB", peak >> 20);

    // The connection is closed once it stalled for the read timeout: what
    // was already sent can be read, then the end, well short of 300 MiB.
    use tokio::io::AsyncReadExt;
    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let drained = tokio::time::timeout(T, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received += n,
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the node closed the connection");
    assert!(received < 300 << 20, "{received} bytes: every response was delivered");
    assert!(cluster.metric(1, "kvraft_client_connections_closed_total", &[("reason", "slow")]) >= 1.0);
    cluster.client(&[1]).set("still", "serving").await.unwrap();
}

/// A fake node that answers the requests it gets, one script step each:
/// "register" opens session 42, "not run" closes the connection with an
/// idle notice (nothing ran), "answer" answers a set with revision 7 + the
/// number of sets answered before, "vanish" closes without a word (the
/// request may or may not have run). Every request is recorded as
/// (kind, session_id, seq).
async fn fake_server(scripts: Vec<&'static str>) -> (String, Arc<Mutex<Vec<(String, u64, u64)>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen: Arc<Mutex<Vec<(String, u64, u64)>>> = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut frames = kvraft::codec::framed(stream, 1 << 20);
        let mut answered = 0;
        for script in scripts {
            let frame = frames.next().await.unwrap().unwrap();
            let request = kvraft::proto::Request::decode(frame).unwrap();
            let kind = match request.command {
                Some(kvraft::proto::request::Command::RegisterSession(_)) => "register",
                Some(kvraft::proto::request::Command::Set(_)) => "set",
                _ => "other",
            };
            record
                .lock()
                .unwrap()
                .push((kind.to_string(), request.session_id, request.seq));
            use futures::SinkExt;
            let reply = |result| Response {
                id: request.id,
                result: Some(result),
            };
            match script {
                "register" => {
                    let registered = kvraft::proto::RegisterSessionResponse { session_id: 42 };
                    let response = reply(response::Result::RegisterSession(registered));
                    frames.send(kvraft::codec::encode(&response)).await.unwrap();
                }
                "not run" => {
                    let notice = kvraft::proto::Error {
                        code: ErrorCode::IdleClosed as i32,
                        message: "closing an idle connection".into(),
                        ..Default::default()
                    };
                    let response = Response {
                        id: 0,
                        result: Some(response::Result::Error(notice)),
                    };
                    frames.send(kvraft::codec::encode(&response)).await.unwrap();
                    drop(frames);
                    let (stream, _) = listener.accept().await.unwrap();
                    frames = kvraft::codec::framed(stream, 1 << 20);
                }
                "answer" => {
                    let set = kvraft::proto::SetResponse { revision: 7 + answered };
                    answered += 1;
                    frames
                        .send(kvraft::codec::encode(&reply(response::Result::Set(set))))
                        .await
                        .unwrap();
                }
                _ => {
                    // Close without a word: the request may or may not have run.
                    drop(frames);
                    let (stream, _) = listener.accept().await.unwrap();
                    frames = kvraft::codec::framed(stream, 1 << 20);
                }
            }
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_sent_again_with_its_session_number_whether_or_not_the_server_ran_it() {
    let (addr, seen) = fake_server(vec!["register", "not run", "answer", "vanish", "answer"]).await;
    let client = kvraft::Client::new(kvraft::ClientOptions {
        endpoints: vec![addr],
        timeout: Duration::from_secs(5),
        ..Default::default()
    })
    .unwrap();
    // Registered, sent, answered with "not run" and a close: sent again on a
    // new connection, and answered there.
    assert_eq!(client.set("k", "v").await.unwrap(), 7);
    // Sent, and the connection closes without an answer: it may have run,
    // so it is sent again with the same session and number (the state
    // machine answers a copy from its record).
    assert_eq!(client.set("k", "w").await.unwrap(), 8);
    let seen = seen.lock().unwrap().clone();
    let expect: Vec<(String, u64, u64)> = [
        ("register", 0, 0),
        ("set", 42, 1),
        ("set", 42, 1),
        ("set", 42, 2),
        ("set", 42, 2),
    ]
    .iter()
    .map(|(k, s, n)| (k.to_string(), *s, *n))
    .collect();
    assert_eq!(seen, expect);
}

#[test]
fn failed_accepts_back_off_instead_of_spinning() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let (client_port, peer_port) = (free_port(), free_port());
    let client_addr = format!("127.0.0.1:{client_port}");
    let log_path = dir.path().join("kvraftd.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_kvraftd"));
    command
        .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
        .args(["--client-addr", &client_addr])
        .args(["--peer-addr", &format!("127.0.0.1:{peer_port}")])
        .args(["--metrics-addr", ""])
        .args(FAST_TIMING)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: setrlimit is async-signal-safe and touches only this process.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + T;
    while std::net::TcpStream::connect(&client_addr).is_err() {
        assert!(Instant::now() < deadline, "kvraftd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    // More connections than the process has descriptors left.
    let held: Vec<_> = (0..120)
        .filter_map(|_| std::net::TcpStream::connect(&client_addr).ok())
        .collect();
    let log_at_start = std::fs::read_to_string(&log_path).unwrap().len();
    let cpu_before = cpu_seconds(child.id());
    std::thread::sleep(Duration::from_secs(2));
    let cpu = cpu_seconds(child.id()) - cpu_before;
    let log = std::fs::read_to_string(&log_path).unwrap();
    let new_log = &log[log_at_start..];
    let warnings = log.matches("accept failed").count();
    eprintln!(
        "with descriptors exhausted: {cpu:.2} s of CPU in 2 s, {warnings} accept warnings, {} new log bytes",
        new_log.len()
    );
    assert!(warnings >= 1, "the failure is logged: {log}");
    assert!(warnings <= 4, "at a bounded rate: {warnings}");
    assert!(cpu < 0.5, "the accept loop spun: {cpu} s of CPU in 2 s");
    assert!(new_log.len() < 4096, "log flood: {} bytes", new_log.len());
    drop(held);
    let _ = child.kill();
    let _ = child.wait();
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

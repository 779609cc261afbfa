//! kvraftd as a system daemon: layered configuration, systemd notify and
//! watchdog, signals, the data dir lock, and the bootstrap script.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{free_port, kvraftd_once, stderr, stdout, Cluster};

const T: Duration = Duration::from_secs(30);

fn print_config(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvraftd"));
    cmd.args(args).arg("--print-config");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn signal(child_pid: u32, signal: i32) {
    // SAFETY: sending a signal to a child process we started.
    unsafe {
        libc::kill(child_pid as i32, signal);
    }
}

#[test]
fn config_layers_take_precedence_key_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kvraft.toml");
    std::fs::write(
        &file,
        "snapshot_threshold = 111\ntick_ms = 50\nelection_ticks = 20\nclient_addr = \"127.0.0.1:1111\"\nlog_format = \"json\"\n",
    )
    .unwrap();
    let out = print_config(
        &["--config", file.to_str().unwrap(), "--snapshot-threshold", "333"],
        &[
            ("KVRAFT_SNAPSHOT_THRESHOLD", "222"),
            ("KVRAFT_TICK_MS", "60"),
            ("KVRAFT_ENDPOINTS", "ignored:1"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let config: toml::Table = stdout(&out).parse().unwrap();
    assert_eq!(
        config["snapshot_threshold"].as_integer(),
        Some(333),
        "flag beats env and file"
    );
    assert_eq!(config["tick_ms"].as_integer(), Some(60), "env beats file");
    assert_eq!(config["election_ticks"].as_integer(), Some(20), "file beats default");
    assert_eq!(config["client_addr"].as_str(), Some("127.0.0.1:1111"));
    assert_eq!(config["heartbeat_ticks"].as_integer(), Some(1), "default");
    assert_eq!(config["log_format"].as_str(), Some("json"));
    assert_eq!(config["data_dir"].as_str(), Some("kvraft-data"));
    // The printed configuration is itself a valid config file.
    let again = dir.path().join("again.toml");
    std::fs::write(&again, stdout(&out)).unwrap();
    let out2 = print_config(&["--config", again.to_str().unwrap()], &[]);
    assert_eq!(stdout(&out2), stdout(&out));
}

#[test]
fn config_errors_name_the_key_the_source_and_what_is_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    let path = file.to_str().unwrap();

    std::fs::write(&file, "client_adr = \"127.0.0.1:1\"\n").unwrap();
    let out = print_config(&["--config", path], &[]);
    assert_eq!(
        out.status.code(),
        Some(78),
        "a configuration error exits 78 (EX_CONFIG)"
    );
    let err = stderr(&out);
    assert!(
        err.contains("unknown key `client_adr`") && err.contains("client_addr") && err.contains(path),
        "{err}"
    );

    std::fs::write(&file, "tick_ms = \"fast\"\n").unwrap();
    let err = stderr(&print_config(&["--config", path], &[]));
    assert!(
        err.contains("tick_ms") && err.contains(path) && err.contains("u64"),
        "{err}"
    );

    let err = stderr(&print_config(&[], &[("KVRAFT_ELECTION_TICKS", "many")]));
    assert!(
        err.contains("election_ticks") && err.contains("KVRAFT_ELECTION_TICKS"),
        "{err}"
    );

    let err = stderr(&print_config(&[], &[("KVRAFT_ELECTION_TICKS", "1")]));
    assert!(
        err.contains(
            "election_ticks (from environment variable KVRAFT_ELECTION_TICKS) (1) must be greater than heartbeat_ticks"
        ),
        "{err}"
    );

    std::fs::write(&file, "log_format = \"xml\"\n").unwrap();
    let err = stderr(&print_config(&["--config", path], &[]));
    assert!(
        err.contains("log_format") && err.contains("text") && err.contains("json"),
        "{err}"
    );
}

/// Collects sd_notify datagrams sent to a socket in a temp dir.
struct NotifySocket {
    path: std::path::PathBuf,
    messages: Arc<Mutex<Vec<(Instant, String)>>>,
    stop: Arc<AtomicBool>,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let messages: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s) = (messages.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !s.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    for line in text.lines() {
                        m.lock().unwrap().push((Instant::now(), line.to_string()));
                    }
                }
            }
        });
        NotifySocket {
            path,
            messages,
            stop,
            _dir: dir,
        }
    }

    fn count(&self, prefix: &str) -> usize {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, m)| m.starts_with(prefix))
            .count()
    }

    fn last(&self, prefix: &str) -> Option<(Instant, String)> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(_, m)| m.starts_with(prefix))
            .cloned()
    }

    fn wait(&self, what: &str, check: impl Fn(&NotifySocket) -> bool) {
        let deadline = Instant::now() + T;
        while !check(self) {
            assert!(
                Instant::now() < deadline,
                "{what}; got {:?}",
                self.messages.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn spawn_single(data_dir: &std::path::Path, env: &[(&str, &str)], log: &std::path::Path) -> Child {
    spawn_single_at(data_dir, env, log, &format!("127.0.0.1:{}", free_port()))
}

fn spawn_single_at(data_dir: &std::path::Path, env: &[(&str, &str)], log: &std::path::Path, metrics: &str) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvraftd"));
    cmd.arg("--data-dir")
        .arg(data_dir)
        .args(["--client-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--peer-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-addr", metrics])
        .args(support::FAST_TIMING)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// Waits until the node's log file contains `needle`, or fails the test with
/// the log.
fn wait_for_log(log: &std::path::Path, needle: &str) {
    let deadline = Instant::now() + T;
    loop {
        let text = std::fs::read_to_string(log).unwrap();
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log within {T:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "kvraftd did not exit within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn systemd_hears_ready_status_watchdog_and_stopping() {
    let notify = NotifySocket::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("log");
    let mut child = spawn_single(
        &data,
        &[
            ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
        &log,
    );
    notify.wait("READY=1", |n| n.count("READY=1") == 1);
    notify.wait("STATUS names the leader role", |n| {
        n.last("STATUS=")
            .is_some_and(|(_, s)| s.starts_with("STATUS=leader of cluster") && s.contains("term 2"))
    });
    notify.wait("watchdog pings keep coming", |n| n.count("WATCHDOG=1") >= 5);
    let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the data dir is private");

    signal(child.id(), libc::SIGTERM);
    notify.wait("STOPPING=1", |n| n.count("STOPPING=1") == 1);
    assert!(wait_exit(&mut child, T).success());
}

#[test]
fn a_wedged_raft_loop_stops_the_watchdog_pings() {
    let notify = NotifySocket::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut child = spawn_single_at(
        &dir.path().join("data"),
        &[
            ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
            ("KVRAFT_TEST_WEDGE_RAFT_LOOP_AFTER_MS", "1500"),
        ],
        &log,
        &metrics,
    );
    notify.wait("READY=1", |n| n.count("READY=1") == 1);
    notify.wait("pings while the loop runs", |n| n.count("WATCHDOG=1") >= 3);
    assert_eq!(
        support::http_get(&metrics, "/health").unwrap().0,
        200,
        "healthy before the wedge"
    );
    // Wedged after 1.5 s: wait for the log to say so, then for 1 s (10 ping
    // intervals) no ping may arrive.
    wait_for_log(&log, "withholding the watchdog ping");
    let before = notify.count("WATCHDOG=1");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        notify.count("WATCHDOG=1"),
        before,
        "pings continued with a wedged raft loop"
    );
    // /health says so too, once the loop has been silent for 3 s.
    let deadline = Instant::now() + T;
    loop {
        let (status, body) = support::http_get(&metrics, "/health").unwrap();
        if status == 503 {
            assert!(body.contains("raft loop made no progress"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/health kept answering {status} for a wedged loop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A second signal exits at once even though graceful shutdown can't finish.
    signal(child.id(), libc::SIGTERM);
    notify.wait("STOPPING=1", |n| n.count("STOPPING=1") == 1);
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    signal(child.id(), libc::SIGTERM);
    let status = wait_exit(&mut child, Duration::from_secs(5));
    assert_eq!(status.code(), Some(1));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(std::fs::read_to_string(&log).unwrap().contains("second signal"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_hands_leadership_over_snapshots_and_loses_nothing() {
    // Long election timeouts (40 ticks of 25 ms: 1-2 s) make a handover easy to
    // tell from an election.
    let mut cluster = Cluster::start_static(3, &["--election-ticks", "40"]);
    let leader = cluster.wait_for_leader(&[1, 2, 3], T).await;
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..3 {
        let client = cluster.client(&[1, 2, 3]);
        let (stop, acked) = (stop.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let (k, v) = (format!("w{w}/{i}"), format!("{i}"));
                if client.set(k.clone(), v.clone()).await.is_ok() {
                    acked.lock().unwrap().push((k, v));
                }
                i += 1;
            }
        }));
    }
    support::eventually(T, "writes flowing", || {
        let n = acked.lock().unwrap().len();
        async move { n > 100 }
    })
    .await;

    let pid = cluster.node(leader).pid().unwrap();
    let signalled = Instant::now();
    signal(pid, libc::SIGTERM);
    let mut new_leader = 0;
    while new_leader == 0 {
        for id in &others {
            if let Some(info) = cluster.info(*id).await {
                if info.role == "leader" {
                    new_leader = *id;
                }
            }
        }
        assert!(signalled.elapsed() < T, "no new leader");
    }
    let handover = signalled.elapsed();
    assert!(
        handover < Duration::from_millis(1000),
        "new leader after {handover:?}: no faster than an election"
    );
    let status = cluster.wait_exit(leader, T).expect("exits after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    let log = cluster.node_log(leader);
    assert!(log.contains("transferring leadership"), "{log}");
    let stopped_at: u64 = log
        .lines()
        .find_map(|l| l.split("shutdown checkpoint at the applied index index=").nth(1))
        .and_then(|rest| rest.trim().parse().ok())
        .expect("the shutdown checkpoint is logged");

    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    cluster.start(leader);
    let info = cluster.wait_info(leader, T, "restarted", |i| i.leader_id != 0).await;
    // The store was durable at the stop (later checkpoints may follow as it
    // catches up on what it missed).
    assert!(
        info.snapshot_index >= stopped_at && stopped_at > 0,
        "restart starts from the shutdown checkpoint: {} < {stopped_at}",
        info.snapshot_index
    );
    let client = cluster.client(&[1, 2, 3]);
    let acked = acked.lock().unwrap().clone();
    support::assert_all_readable(&client, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_in_use_is_refused_and_sighup_reloads_the_log_filter() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kvraft.toml");
    std::fs::write(&config, "log_filter = \"warn\"\n").unwrap();
    let mut cluster = Cluster::empty();
    cluster.add_node(1, None, vec!["--config".into(), config.to_str().unwrap().into()]);
    // The harness's KVRAFT_LOG_FILTER would beat the file; this node reads the file.
    cluster.node(1).env_remove("KVRAFT_LOG_FILTER");
    cluster.start(1);
    cluster.wait_for_leader(&[1], T).await;
    assert!(!cluster.node_log(1).contains(" INFO "), "filter from the file: warn");

    let data = cluster.node(1).data_dir.clone();
    let out = kvraftd_once(
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--client-addr",
            "127.0.0.1:0",
            "--peer-addr",
            "127.0.0.1:0",
        ],
        T,
    );
    assert_eq!(out.status.code(), Some(1));
    let pid = cluster.node(1).pid().unwrap();
    assert!(
        stderr(&out).contains(&format!("in use by another kvraftd (pid {pid})")),
        "{}",
        stderr(&out)
    );

    // A reloadable key and two that need a restart: the reload applies the
    // first and names the others.
    std::fs::write(
        &config,
        "log_filter = \"info\"\nsnapshot_threshold = 777\nmax_value_size = 4096\n",
    )
    .unwrap();
    signal(pid, libc::SIGHUP);
    support::eventually(T, "filter reloaded", || {
        let reloaded = cluster.node_log(1).contains("SIGHUP: log filter reloaded");
        async move { reloaded }
    })
    .await;
    let log = cluster.node_log(1);
    assert!(
        log.contains("only a restart applies were NOT applied: max_value_size, snapshot_threshold"),
        "{log}"
    );
    assert!(cluster.node(1).is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bootstrap_script_forms_a_cluster_and_a_second_run_changes_nothing() {
    let mut cluster = Cluster::empty();
    let seed_peer = format!("127.0.0.1:{}", free_port());
    cluster.add_node(
        1,
        Some(seed_peer.clone()),
        vec!["--initial-cluster".into(), format!("1={seed_peer}")],
    );
    cluster.add_node(2, None, vec!["--join".into()]);
    cluster.add_node(3, None, vec!["--join".into()]);
    for id in [1, 2, 3] {
        cluster.start(id);
    }
    let members = cluster.bootstrap_members();
    let run = |members: &[String]| {
        let kvraft = env!("CARGO_BIN_EXE_kvraft");
        Command::new("sh")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bootstrap.sh"))
            .args(["-t", "30"])
            .args(members)
            .env("KVRAFT", kvraft)
            .output()
            .unwrap()
    };
    let out = run(&members);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stderr(&out);
    assert!(
        log.contains("node 2 is a caught-up voter") && log.contains("node 3 is a caught-up voter"),
        "{log}"
    );

    let client = cluster.client(&[1, 2, 3]);
    let (listed, _) = client.members().await.unwrap();
    let roles: BTreeMap<u64, i32> = listed.iter().map(|m| (m.id, m.role)).collect();
    assert_eq!(roles.len(), 3);
    assert!(
        roles.values().all(|r| *r == kvraft::proto::MemberRole::Voter as i32),
        "{roles:?}"
    );
    support::put(&client, "formed", "yes").await;

    let before = cluster.info(1).await.unwrap().last_index;
    let out = run(&members);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("node 2 is already a voter; nothing to do"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        cluster.info(1).await.unwrap().last_index,
        before,
        "a second run changes nothing"
    );

    // A member that never comes up: a clear timeout naming the node.
    let ghost = format!("4=127.0.0.1:{}=127.0.0.1:{}", free_port(), free_port());
    let mut with_ghost = members.clone();
    with_ghost.push(ghost);
    let started = Instant::now();
    let out = Command::new("sh")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bootstrap.sh"))
        .args(["-t", "2"])
        .args(&with_ghost)
        .env("KVRAFT", env!("CARGO_BIN_EXE_kvraft"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("node 4 reachable"), "{}", stderr(&out));
    assert!(stderr(&out).contains("kvraftd --id 4 --join"), "{}", stderr(&out));
    // -t is seconds by the clock, not tries: each try of a step may itself
    // take seconds (the nodes before node 4 are voters already, so node 4's
    // step is the only wait).
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "-t 2 waited {:?}",
        started.elapsed()
    );

    // No CLI: said first, with what to do, instead of blaming the seed.
    let out = Command::new("sh")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bootstrap.sh"))
        .args(&members)
        .env("KVRAFT", "/nonexistent/kvraft")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the kvraft CLI ('/nonexistent/kvraft') was not found"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("seed"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bootstrap_script_passes_tls_settings_to_the_cli() {
    let pki = tempfile::tempdir().unwrap();
    support::certs_init(pki.path(), "1=127.0.0.1,2=127.0.0.1", "admin,reader");
    let file = |name: &str| pki.path().join(name).display().to_string();
    let tls_flags = |id: u64| -> Vec<String> {
        let mut flags = support::tls_node_flags(pki.path(), id);
        flags.extend(["--client-roles".into(), "admin=admin,reader=read".into()]);
        flags
    };
    let mut cluster = Cluster::empty();
    let seed_peer = format!("127.0.0.1:{}", free_port());
    let mut seed_args = vec!["--initial-cluster".to_string(), format!("1={seed_peer}")];
    seed_args.extend(tls_flags(1));
    cluster.add_node(1, Some(seed_peer), seed_args);
    let mut join_args = vec!["--join".to_string()];
    join_args.extend(tls_flags(2));
    cluster.add_node(2, None, join_args);
    for id in [1, 2] {
        cluster.start(id);
    }
    let members = cluster.bootstrap_members();
    let run = |options: &[String]| {
        Command::new("sh")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bootstrap.sh"))
            .args(["-t", "30"])
            .args(options)
            .args(&members)
            .env("KVRAFT", env!("CARGO_BIN_EXE_kvraft"))
            .env_remove("KVRAFT_CACERT")
            .env_remove("KVRAFT_CERT")
            .env_remove("KVRAFT_KEY")
            .env_remove("KVRAFT_SERVER_NAME")
            .output()
            .unwrap()
    };
    let identity = |name: &str| -> Vec<String> {
        vec![
            "-c".into(),
            file("ca.pem"),
            "-C".into(),
            file(&format!("client-{name}.pem")),
            "-k".into(),
            file(&format!("client-{name}.key")),
        ]
    };

    // Without TLS settings: stopped at once with the CLI's reason, not after
    // the timeout.
    let started = Instant::now();
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("requires TLS"), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());

    // The read-only identity may look but not add a node.
    let out = run(&identity("reader"));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("permission denied"), "{}", stderr(&out));

    let out = run(&identity("admin"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("node 2 is a caught-up voter"), "{}", stderr(&out));

    // The same through the environment, on the formed cluster: nothing to do.
    let out = Command::new("sh")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bootstrap.sh"))
        .args(["-t", "30"])
        .args(&members)
        .env("KVRAFT", env!("CARGO_BIN_EXE_kvraft"))
        .env("KVRAFT_CACERT", file("ca.pem"))
        .env("KVRAFT_CERT", file("client-admin.pem"))
        .env("KVRAFT_KEY", file("client-admin.key"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("node 2 is already a voter; nothing to do"),
        "{}",
        stderr(&out)
    );

    cluster.client_tls = kvraft::tls::client::ClientTlsOptions {
        ca_file: Some(pki.path().join("ca.pem")),
        cert_file: Some(pki.path().join("client-admin.pem")),
        key_file: Some(pki.path().join("client-admin.key")),
        server_name: None,
    };
    let (listed, _) = cluster.client(&[1, 2]).members().await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(
        listed.iter().all(|m| m.role == kvraft::proto::MemberRole::Voter as i32),
        "{listed:?}"
    );
}

#[test]
fn the_example_config_documents_every_key_with_its_default() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/kvraft.example.toml");
    let text = std::fs::read_to_string(example).unwrap();
    let with_file = print_config(&["--config", example], &[]);
    assert!(with_file.status.success(), "{}", stderr(&with_file));
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let defaults = print_config(&["--config", empty.to_str().unwrap()], &[]);
    assert_eq!(
        stdout(&with_file),
        stdout(&defaults),
        "the example sets every key to its default"
    );
    for key in kvraft::config::keys() {
        assert!(
            text.lines()
                .any(|l| l.trim_start_matches("# ").starts_with(&format!("{key} ="))),
            "the example does not document {key}"
        );
    }
}

#[test]
fn ready_is_sent_before_a_multi_node_cluster_has_a_leader() {
    // Node 1 of three, alone: it can never elect a leader, yet systemd must
    // hear READY=1 (or a cluster cold start would wait on itself).
    let notify = NotifySocket::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let peer = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvraftd"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--client-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--peer-addr", &format!("127.0.0.1:{peer}")])
        .args(["--metrics-addr", ""])
        .args([
            "--initial-cluster",
            &format!(
                "1=127.0.0.1:{peer},2=127.0.0.1:{},3=127.0.0.1:{}",
                free_port(),
                free_port()
            ),
        ])
        .args(support::FAST_TIMING)
        .env("NOTIFY_SOCKET", notify.path.to_str().unwrap())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    notify.wait("READY=1", |n| n.count("READY=1") == 1);
    notify.wait("STATUS says there is no leader", |n| {
        n.last("STATUS=").is_some_and(|(_, s)| s.contains("leader 0,"))
    });
    signal(child.id(), libc::SIGINT);
    assert!(wait_exit(&mut child, T).success(), "SIGINT stops it gracefully too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_gracefully_and_logs_can_be_json() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let client_port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvraftd"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--client-addr", &format!("127.0.0.1:{client_port}")])
        .args(["--peer-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-addr", "", "--log-format", "json"])
        .args(support::FAST_TIMING)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let client = kvraft::Client::new(kvraft::ClientOptions {
        endpoints: vec![format!("127.0.0.1:{client_port}")],
        timeout: T,
        serializable: false,
        tls: Default::default(),
    })
    .unwrap();
    // The node may not listen yet (the client says "nothing listening"
    // at once rather than wait): retry until it takes the write.
    support::eventually(T, "the node takes a write", || async {
        client.set("k", "v").await.is_ok()
    })
    .await;

    signal(child.id(), libc::SIGINT);
    let status = wait_exit(&mut child, T);
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    // Every line is a JSON object, and the stop was the graceful one.
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 3, "{text}");
    let messages: Vec<&str> = lines.iter().filter_map(|l| l["fields"]["message"].as_str()).collect();
    assert!(messages.contains(&"shutting down gracefully"), "{messages:?}");
    assert!(messages.contains(&"stopped"), "{messages:?}");
    assert!(
        lines.iter().any(|l| l["fields"]["signal"] == "SIGINT"),
        "the log names the signal: {text}"
    );
    // metrics_addr = "" turns the endpoint off.
    assert!(!messages.iter().any(|m| m.contains("serving /metrics")), "{messages:?}");
}

#[test]
fn a_graceful_stop_that_cannot_finish_ends_at_the_shutdown_deadline() {
    let notify = NotifySocket::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let mut child = spawn_single(
        &dir.path().join("data"),
        &[
            ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
            ("KVRAFT_SHUTDOWN_TIMEOUT_MS", "1000"),
            ("KVRAFT_TEST_WEDGE_RAFT_LOOP_AFTER_MS", "1000"),
        ],
        &log,
    );
    notify.wait("READY=1", |n| n.count("READY=1") == 1);
    wait_for_log(&log, "wedging the raft loop");
    // One signal only: the wedged loop can't hand over or snapshot, so the
    // daemon gives up once shutdown_timeout_ms (plus a second) has passed.
    let started = Instant::now();
    signal(child.id(), libc::SIGTERM);
    let status = wait_exit(&mut child, T);
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(started.elapsed() >= Duration::from_secs(1), "{:?}", started.elapsed());
    assert!(text.contains("graceful shutdown took too long"), "{text}");
}

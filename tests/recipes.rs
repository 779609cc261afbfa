//! The README's lease recipes, run as written (each block is read from the
//! README, so the two can't drift apart) against a real 3-node cluster:
//! service registration and leader election, with `kill -9` of the
//! processes holding the leases.

mod support;

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kvraft::proto::{watch_event, KeyRange};
use kvraft::{Client, WatchOptions, WatchUpdate};
use support::{eventually, Cluster};

const T: Duration = Duration::from_secs(30);

/// The shell block after `<!-- recipe: NAME -->` in the README.
fn recipe(name: &str) -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let marker = format!("<!-- recipe: {name} -->\n```sh\n");
    let start = readme
        .find(&marker)
        .unwrap_or_else(|| panic!("no recipe {name} in the README"))
        + marker.len();
    let end = start + readme[start..].find("\n```").expect("the recipe's block ends");
    readme[start..end].to_string()
}

/// A recipe running under `sh` in its own process group, its output in
/// `out` (so the test reads it while it runs).
struct Script {
    child: Child,
    out: PathBuf,
}

impl Script {
    fn start(dir: &Path, cluster: &Cluster, recipe: &str, name: &str, args: &[&str]) -> Script {
        let file = dir.join(format!("{name}.sh"));
        std::fs::write(&file, recipe).unwrap();
        let out = dir.join(format!("{name}.out"));
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_kvraft")).parent().unwrap();
        let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
        let child = Command::new("sh")
            .arg(&file)
            .args(args)
            .env("PATH", path)
            .env("KVRAFT_ENDPOINTS", cluster.endpoints(&cluster.ids()))
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).unwrap())
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("run sh");
        Script { child, out }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// `kill -9` of everything the script started (its lease keepalive too).
    fn kill_all(&mut self) {
        signal(&format!("-{}", self.child.id()), "KILL");
        let _ = self.child.wait();
    }

    /// A clean stop: TERM to the script alone (its traps clean up).
    fn terminate(&mut self) {
        signal(&self.child.id().to_string(), "TERM");
        let _ = self.child.wait();
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn signal(target: &str, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), "--", target])
        .status();
}

/// Lease expiries applied, summed over the nodes (a revoke is not one).
fn expiries(cluster: &Cluster) -> f64 {
    cluster
        .ids()
        .iter()
        .map(|id| cluster.metric(*id, "kvraft_leases_expired_total", &[]))
        .sum()
}

/// The keys under `prefix` now, with their values.
async fn keys(client: &Client, prefix: &str) -> Vec<(String, String)> {
    let page = client
        .scan(kvraft::client::ScanOptions {
            prefix: prefix.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    page.into_iter()
        .map(|kv| (String::from_utf8(kv.key).unwrap(), String::from_utf8(kv.value).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_registration_keeps_a_key_per_live_instance() {
    let cluster = Cluster::start_static(3, &[]);
    let ids = cluster.ids();
    cluster.wait_for_leader(&ids, T).await;
    let client = cluster.client(&ids);
    let dir = tempfile::tempdir().unwrap();
    let register = recipe("register");
    let mut watcher = client
        .watch(WatchOptions {
            range: Some(KeyRange::prefix("services/web/")),
            ..Default::default()
        })
        .await
        .unwrap();

    let mut a = Script::start(dir.path(), &cluster, &register, "a", &["a", "10.0.0.1:80"]);
    let mut b = Script::start(dir.path(), &cluster, &register, "b", &["b", "10.0.0.2:80"]);
    let both = vec![
        ("services/web/a".to_string(), "10.0.0.1:80".to_string()),
        ("services/web/b".to_string(), "10.0.0.2:80".to_string()),
    ];
    eventually(T, "both instances registered", || async {
        keys(&client, "services/web/").await == both
    })
    .await;
    let record = client.get_record("services/web/a").await.unwrap().unwrap();
    assert_ne!(record.lease, 0, "registered with a lease");

    // A crash: the instance and its keepalive die together; its key goes
    // once the lease runs out, and the watcher sees exactly that.
    a.kill_all();
    let mut changes = Vec::new();
    while !changes
        .iter()
        .any(|(t, k): &(i32, String)| *t == watch_event::Type::Delete as i32 && k.ends_with("/a"))
    {
        let update = tokio::time::timeout(T, watcher.next())
            .await
            .expect("the crashed instance's key never went")
            .unwrap()
            .unwrap();
        if let WatchUpdate::Events { events, .. } = update {
            for e in events {
                changes.push((e.r#type, String::from_utf8(e.kv.unwrap().key).unwrap()));
            }
        }
    }
    let deleted: Vec<&String> = changes
        .iter()
        .filter(|(t, _)| *t == watch_event::Type::Delete as i32)
        .map(|(_, k)| k)
        .collect();
    assert_eq!(deleted, ["services/web/a"], "{changes:?}");
    assert_eq!(keys(&client, "services/web/").await, both[1..]);

    // A clean stop revokes the lease: the key goes by a revoke, not by
    // running out (which would count an expiry on the node that applied it).
    eventually(T, "every node to apply the first expiry", || async {
        expiries(&cluster) == 3.0
    })
    .await;
    b.terminate();
    eventually(T, "the stopped instance's key to go", || async {
        keys(&client, "services/web/").await.is_empty()
    })
    .await;
    assert_eq!(expiries(&cluster), 3.0, "revoked, not expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_has_one_leader_and_a_successor_when_it_dies() {
    let cluster = Cluster::start_static(3, &[]);
    let ids = cluster.ids();
    cluster.wait_for_leader(&ids, T).await;
    let client = cluster.client(&ids);
    let dir = tempfile::tempdir().unwrap();
    let elect = recipe("elect");
    let names = ["a", "b", "c"];
    let mut candidates: Vec<Script> = names
        .iter()
        .map(|name| Script::start(dir.path(), &cluster, &elect, name, &[name, "sleep", "1000"]))
        .collect();
    let leaders = |candidates: &[Script]| -> Vec<usize> {
        (0..candidates.len())
            .filter(|i| candidates[*i].output().contains("leads"))
            .collect()
    };

    eventually(T, "a first leader", || async { !leaders(&candidates).is_empty() }).await;
    let first = leaders(&candidates);
    assert_eq!(first.len(), 1, "one leader at a time: {first:?}");
    let first = first[0];
    let held = client.get("election/web").await.unwrap().unwrap();
    assert_eq!(held, names[first].as_bytes());

    // The leader dies with its keepalive: one other takes over once its
    // lease has run out, and the key names it.
    candidates[first].kill_all();
    eventually(T, "a second leader", || async { leaders(&candidates).len() == 2 }).await;
    let second = *leaders(&candidates).iter().find(|i| **i != first).unwrap();
    let held = client.get("election/web").await.unwrap().unwrap();
    assert_eq!(held, names[second].as_bytes());

    // A clean stop hands over by revoking its lease (no expiry counted).
    eventually(T, "every node to apply the first expiry", || async {
        expiries(&cluster) == 3.0
    })
    .await;
    candidates[second].terminate();
    eventually(T, "the third candidate to lead", || async {
        leaders(&candidates).len() == 3
    })
    .await;
    assert_eq!(expiries(&cluster), 3.0, "revoked, not expired");
    let third = 3 - first - second;
    assert_eq!(
        client.get("election/web").await.unwrap().unwrap(),
        names[third].as_bytes()
    );
    assert!(candidates[second].output().contains("leads"));
}

//! Before the raft loop runs: check the data dir belongs to this node,
//! bootstrap a new cluster or wait to join one, recover storage and the state
//! machine, and build the `RawNode`.

use std::sync::atomic::AtomicU64;
use std::sync::mpsc;
use std::sync::{Arc, RwLock};

use raft::prelude::ConfState;
use raft::{RawNode, ReadOnlyOption};
use tokio::sync::watch;
use tracing::info;

use super::raft_loop::{LoopParts, LoopSettings, RaftLoop, TestHooks};
use super::transport::{LocalPeer, TransportContext, TransportFactory};
use super::{NodeHandle, NodeStatus};
use crate::address::parse_initial_cluster;
use crate::config::NodeConfig;
use crate::proto::{Member, NodeIdentity};
use crate::state_machine::{StateMachine, StateMeta};
use crate::storage::flush_schedule::FlushSchedule;
use crate::storage::identity::new_incarnation;
use crate::storage::state_store::FLUSH_INTERVAL;
use crate::storage::{upgrade, DataDirLock, NodeIdentityFile, RaftStorage, StateStore, StorageError};

/// The log index and term a new cluster starts from. Starting above zero
/// means a joining node's empty log never matches, so the leader sends it a
/// snapshot, which carries the member list (as TiKV does).
const BOOTSTRAP_INDEX: u64 = 1;
const BOOTSTRAP_TERM: u64 = 1;

/// Test hook: the raft loop stops making progress this many milliseconds after
/// start (to test that the systemd watchdog pings stop).
pub const WEDGE_HOOK: &str = "KVRAFT_TEST_WEDGE_RAFT_LOOP_AFTER_MS";
/// Test hook: set to 1, a snapshot install aborts the process after
/// the raft log was reset and before the store file is replaced.
pub const CRASH_MID_INSTALL_HOOK: &str = "KVRAFT_TEST_CRASH_MID_SNAPSHOT_INSTALL";

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad flags or a data dir that doesn't fit them.
    #[error("{0}")]
    Config(String),
    /// Storage could not be opened or recovered.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// raft refused the configuration or state.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
}

/// The cluster id of a static bootstrap: a stable hash of the sorted member
/// list, so every initial member computes the same one without talking.
pub fn cluster_id_of(members: &[(u64, String)]) -> u64 {
    // FNV-1a: stable across Rust versions, unlike the std hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (id, addr) in members {
        for byte in format!("{id}={addr},").bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash.max(1)
}

/// A node ready to run: the loop to put on its thread and the handle for
/// the listeners.
pub struct Prepared {
    /// Run this on a dedicated thread.
    pub raft_loop: RaftLoop,
    /// For the client and peer listeners.
    pub handle: NodeHandle,
    /// The raft loop's inbox, for the peer listener.
    pub inbox: crate::node::InboxSender,
    /// Counts raft loop rounds (for the watchdog).
    pub rounds: Arc<AtomicU64>,
    /// Keeps other daemons out of the data dir while this one runs.
    pub lock: DataDirLock,
}

/// Opens (or creates) the node's data and builds its raft loop: an
/// initialised data dir is recovered, an empty one joins or bootstraps.
pub fn prepare(
    config: &NodeConfig,
    advertise_client_addr: String,
    advertise_peer_addr: String,
    transport: TransportFactory,
) -> Result<Prepared, StartError> {
    let data_dir_refused =
        |path: &std::path::Path| StartError::Config(crate::storage::access::explain(&config.data_dir, path));
    match crate::storage::create_private_dir(&config.data_dir) {
        Err(StorageError::Io { source, .. }) if source.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(data_dir_refused(&config.data_dir))
        }
        other => other?,
    }
    if let Some(path) = crate::storage::access::first_inaccessible(&config.data_dir) {
        return Err(data_dir_refused(&path));
    }
    let lock = DataDirLock::acquire(&config.data_dir)?;
    let identity_file = NodeIdentityFile::in_dir(&config.data_dir);
    let shown_dir = config.data_dir.display().to_string();
    let mut storage = RaftStorage::open(&config.data_dir)?;
    if let Some(converted) = upgrade::convert_legacy_snapshots(&config.data_dir)? {
        info!(
            index = converted.index,
            keys = converted.keys,
            "converted this data dir from snapshot files to the state store"
        );
    }
    let store = Arc::new(
        StateStore::open(&config.data_dir, config.store_cache_bytes())?.with_read_cache(config.read_cache_bytes()),
    );
    store.set_history_retention(config.history_retention());
    store.spawn_flusher(FlushSchedule::new(FLUSH_INTERVAL, config.id));
    if finish_interrupted_install(&storage, &store)? {
        info!("completed a snapshot install interrupted by a crash");
    }

    let identity = match identity_file.load()? {
        Some(identity) => recover(config, identity, &identity_file, &shown_dir)?,
        None if config.join => join(config, &identity_file)?,
        None => bootstrap(config, &advertise_peer_addr, &storage, &store, &identity_file)?,
    };
    let state_machine = StateMachine::open(store.clone())?;
    check_consistency(&storage, state_machine.meta(), &shown_dir)?;
    storage.attach_store(store.clone(), state_machine.conf_state().clone());
    let applied = state_machine.applied_index();

    let raft_config = raft::Config {
        id: config.id,
        election_tick: config.election_ticks,
        heartbeat_tick: config.heartbeat_ticks,
        applied,
        pre_vote: true,
        check_quorum: true,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        read_only_option: ReadOnlyOption::Safe,
        ..Default::default()
    };
    raft_config.validate()?;
    let logger = slog::Logger::root(tracing_slog::TracingSlogDrain, slog::o!("node" => config.id));
    let node = RawNode::new(&raft_config, storage.clone(), &logger)?;

    let (inbox_tx, inbox_rx) = mpsc::sync_channel(crate::node::INBOX_CAPACITY);
    let (control_tx, control_rx) = mpsc::channel();
    let (applied_tx, applied_rx) = watch::channel(applied);
    let (status_tx, status_rx) = watch::channel(NodeStatus {
        id: config.id,
        cluster_id: identity.cluster_id,
        ..Default::default()
    });
    let state_machine = Arc::new(RwLock::new(state_machine));
    let rounds = Arc::new(AtomicU64::new(0));
    let local = LocalPeer {
        id: config.id,
        peer_addr: advertise_peer_addr.clone(),
        incarnation: identity.incarnation,
    };
    let parts = LoopParts {
        node,
        storage,
        store: store.clone(),
        inbox: inbox_rx,
        control: control_rx,
        state_machine: state_machine.clone(),
        transport: transport(TransportContext {
            local,
            cluster_id: identity.cluster_id,
            reports: control_tx.clone(),
            store: store.clone(),
        }),
        applied_tx,
        status_tx,
        identity: identity_file,
        cluster_id: identity.cluster_id,
        settings: LoopSettings {
            id: config.id,
            tick: config.tick(),
            checkpoint_entries: config.snapshot_threshold,
            catchup_entries: config.catchup_entries(),
            request_timeout: config.request_timeout(),
            advertise_peer_addr,
            advertise_client_addr,
            incarnation: identity.incarnation,
            min_lease_ttl: config.min_lease_ttl(),
        },
        rounds: rounds.clone(),
    };
    let hooks = TestHooks {
        wedge_after: std::env::var(WEDGE_HOOK)
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map(std::time::Duration::from_millis),
        crash_mid_install: std::env::var(CRASH_MID_INSTALL_HOOK).is_ok_and(|v| v == "1"),
    };
    let raft_loop = RaftLoop::new(parts, hooks);
    let handle = NodeHandle::new(
        inbox_tx.clone(),
        control_tx,
        state_machine,
        applied_rx,
        status_rx,
        config.request_timeout(),
    );
    Ok(Prepared {
        raft_loop,
        handle,
        inbox: inbox_tx,
        rounds,
        lock,
    })
}

/// A data dir that was initialised before: it must be this node's, and the
/// node must not have been removed.
fn recover(
    config: &NodeConfig,
    mut identity: NodeIdentity,
    identity_file: &NodeIdentityFile,
    shown_dir: &str,
) -> Result<NodeIdentity, StartError> {
    if identity.node_id != config.id {
        return Err(StartError::Config(format!(
            "data dir {shown_dir} belongs to node {}, but this node was started with --id {}; \
             start it with --id {} or point --data-dir at this node's own directory",
            identity.node_id, config.id, identity.node_id
        )));
    }
    if identity.removed {
        return Err(StartError::Config(format!(
            "node {} was removed from its cluster, so data dir {shown_dir} can't serve again; \
             wipe it and add the node back with `kvraft add-node` under a new id",
            config.id
        )));
    }
    if config.initial_cluster.is_some() || config.join {
        info!("data dir already initialised: --initial-cluster / --join are ignored");
    }
    if identity.incarnation == 0 {
        // A data dir from a release before incarnations: it gets one now.
        identity.incarnation = new_incarnation();
        identity_file.store(&identity)?;
    }
    Ok(identity)
}

/// An empty data dir and `join`: no cluster yet; the leader that adds this
/// node sends it a snapshot with the members and the cluster id.
fn join(config: &NodeConfig, identity_file: &NodeIdentityFile) -> Result<NodeIdentity, StartError> {
    info!("empty data dir and --join: waiting to be added with `kvraft add-node`");
    let identity = NodeIdentity {
        node_id: config.id,
        cluster_id: 0,
        removed: false,
        incarnation: new_incarnation(),
    };
    identity_file.store(&identity)?;
    Ok(identity)
}

/// An empty data dir: a new cluster from `initial_cluster` (or this node
/// alone), starting from the same snapshot on every initial member.
fn bootstrap(
    config: &NodeConfig,
    advertise_peer_addr: &str,
    storage: &RaftStorage,
    store: &StateStore,
    identity_file: &NodeIdentityFile,
) -> Result<NodeIdentity, StartError> {
    let spec = config
        .initial_cluster
        .clone()
        .unwrap_or_else(|| format!("{}={}", config.id, advertise_peer_addr));
    let members = parse_initial_cluster(&spec).map_err(StartError::Config)?;
    match members.iter().find(|(id, _)| *id == config.id) {
        None => {
            return Err(StartError::Config(format!(
                "--initial-cluster does not list this node (--id {}); list every initial member, this one included",
                config.id
            )))
        }
        Some((_, addr)) if addr != advertise_peer_addr => {
            return Err(StartError::Config(format!(
            "--initial-cluster gives node {} the peer address {addr}, but this node advertises {advertise_peer_addr}; \
                 make them agree (see --peer-addr / --advertise-peer-addr)",
            config.id
        )))
        }
        Some(_) => {}
    }
    let cluster_id = cluster_id_of(&members);
    // The store first: a crash before the log is started leaves a store at
    // the bootstrap index and an empty log, which the next start finishes.
    let state = initial_state(&members, cluster_id, BOOTSTRAP_INDEX, BOOTSTRAP_TERM);
    store.write_header(&state.to_header())?;
    storage.start_at(BOOTSTRAP_INDEX, BOOTSTRAP_TERM)?;
    let identity = NodeIdentity {
        node_id: config.id,
        cluster_id,
        removed: false,
        incarnation: new_incarnation(),
    };
    identity_file.store(&identity)?;
    info!(
        cluster_id = format_args!("{cluster_id:016x}"),
        members = ?members.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        "bootstrapped a new cluster"
    );
    Ok(identity)
}

/// Completes a snapshot install that a crash interrupted after the log was
/// started at the snapshot but before the staged store replaced the old one.
/// Every other staged file is a leftover, removed.
fn finish_interrupted_install(storage: &RaftStorage, store: &StateStore) -> Result<bool, StorageError> {
    let (index, term) = storage.truncated();
    let staged = store.staged_path(index, term);
    let applied = store.durable_index();
    let mut finished = false;
    if applied < index && staged.exists() {
        store.install(&staged)?;
        finished = true;
    }
    if let Ok(entries) = std::fs::read_dir(store.incoming_dir()) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(finished)
}

/// The store and the log must describe one history: the store applied up to
/// `A`, the log holds `(T, L]` and says `C` is committed. Anything else is
/// damage, refused with what was lost and what to do, never served and never
/// handed to raft (which would panic on it).
fn check_consistency(storage: &RaftStorage, state: &StateMeta, shown_dir: &str) -> Result<(), StorageError> {
    use raft::Storage as _;
    let applied = state.applied_index();
    let (truncated, _) = storage.truncated();
    let remedy = "this node can't rebuild its state from its own data: keep the data dir for inspection, \
                  remove the node (`kvraft remove-node`) and add a fresh one under a new id";
    let last = storage
        .last_index()
        .map_err(|e| StorageError::Corrupt(format!("the raft log in {shown_dir}/raft-log: {e}; {remedy}")))?;
    let commit = storage.hard_state().commit;
    if applied == 0 && truncated == 0 && last == 0 {
        return Ok(()); // a joining node, waiting for its first snapshot
    }
    if applied < truncated {
        return Err(StorageError::Corrupt(format!(
            "in {shown_dir}: the state store is at index {applied} but the raft log starts after {truncated}: \
             entries {}..={truncated} are gone (state.redb is older than the log); {remedy}",
            applied + 1
        )));
    }
    if applied > last {
        return Err(StorageError::Corrupt(format!(
            "in {shown_dir}: the state store applied up to index {applied} but the raft log ends at {last}: \
             the log lost entries it had fsynced (raft-log/ is damaged or older than state.redb); {remedy}"
        )));
    }
    if commit > last {
        return Err(StorageError::Corrupt(format!(
            "in {shown_dir}: the raft log says index {commit} is committed but ends at {last}: \
             entries {}..={commit} were lost (raft-log/ is damaged); {remedy}",
            last + 1
        )));
    }
    storage
        .verify_entries()
        .map_err(|e| StorageError::Corrupt(format!("in {shown_dir}/raft-log: {e}; {remedy}")))?;
    // Applied entries were committed, whatever an unsynced HardState says.
    storage.raise_commit(applied)?;
    Ok(())
}

/// The membership every member of a new cluster starts from, identical on
/// each, at `(index, term)` (the bootstrap's, or a restored backup's).
/// Client addresses are not known yet: each member publishes its own through
/// raft once a leader is elected.
pub(crate) fn initial_state(members: &[(u64, String)], cluster_id: u64, index: u64, term: u64) -> StateMeta {
    let mut conf_state = ConfState::default();
    conf_state.voters = members.iter().map(|(id, _)| *id).collect();
    let mut state = StateMeta::new(cluster_id);
    for (id, peer_addr) in members {
        let member = Member {
            id: *id,
            peer_addr: peer_addr.clone(),
            client_addr: String::new(),
            role: 0,
            incarnation: 0,
        };
        state.apply_conf_state(index, term, conf_state.clone(), Some(member));
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::prelude::{Entry, HardState};

    fn log_with(dir: &std::path::Path, last: u64, commit: u64) -> RaftStorage {
        let log = RaftStorage::open(dir).unwrap();
        log.start_at(10, 1).unwrap();
        let entries: Vec<Entry> = (11..=last)
            .map(|i| {
                let mut e = Entry::default();
                e.index = i;
                e.term = 1;
                e
            })
            .collect();
        let mut hs = HardState::default();
        hs.term = 1;
        hs.commit = commit;
        log.append(&entries, Some(&hs), true).unwrap();
        log
    }

    fn applied(index: u64) -> StateMeta {
        let mut state = StateMeta::new(1);
        state.advance(index, 1);
        state
    }

    fn refusal(log: &RaftStorage, index: u64) -> String {
        check_consistency(log, &applied(index), "DIR")
            .expect_err("damage went unnoticed")
            .to_string()
    }

    #[test]
    fn a_store_and_log_of_one_history_pass_and_the_commit_index_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), 40, 20);
        check_consistency(&log, &applied(30), "DIR").unwrap();
        assert_eq!(log.hard_state().commit, 30, "applied entries were committed");
    }

    #[test]
    fn a_log_that_lost_entries_the_store_applied_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), 40, 40);
        let err = refusal(&log, 45);
        assert!(
            err.contains("applied up to index 45") && err.contains("ends at 40"),
            "{err}"
        );
        assert!(err.contains("remove the node") && err.contains("new id"), "{err}");
    }

    #[test]
    fn a_log_that_ends_before_its_commit_index_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), 40, 55);
        let err = refusal(&log, 30);
        assert!(
            err.contains("committed but ends at 40") && err.contains("41..=55"),
            "{err}"
        );
    }

    #[test]
    fn an_install_interrupted_after_the_log_reset_is_finished_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), 1 << 20).unwrap();
        store.write_header(&applied(5).to_header()).unwrap();
        // The leader's snapshot at 50 was staged, and the log reset to it,
        // when the process died: the store is still at 5.
        let staged = store.staged_path(50, 3);
        std::fs::create_dir_all(staged.parent().unwrap()).unwrap();
        let mut state = applied(50);
        state.advance(50, 3);
        crate::storage::state_store::StoreBuilder::create(&staged)
            .unwrap()
            .finish(&state.to_header())
            .unwrap();
        let leftover = store.staged_path(40, 3);
        std::fs::write(&leftover, b"an older stream").unwrap();
        let log = RaftStorage::open(dir.path()).unwrap();
        log.start_at(50, 3).unwrap();

        assert!(finish_interrupted_install(&log, &store).unwrap());
        assert_eq!(store.header().unwrap().index, 50);
        assert!(!staged.exists() && !leftover.exists(), "staging is emptied");
        // Nothing to finish the next time.
        assert!(!finish_interrupted_install(&log, &store).unwrap());
    }

    #[test]
    fn a_store_older_than_the_compacted_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), 40, 40);
        let err = refusal(&log, 5);
        assert!(err.contains("starts after 10"), "{err}");
    }
}

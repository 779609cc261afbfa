//! Every metric kvraft exports, named in one place: prefix `kvraft_`, base
//! units (seconds, bytes), counters end in `_total`, labels lower-case.
//!
//! The recorder is global (one node per process). Every series is created at
//! start-up with a zero value, so dashboards and alerts see no gaps.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// `kvraft_commit_latency_seconds`: Time from proposing an entry to learning it is committed.
pub const COMMIT_LATENCY: &str = "kvraft_commit_latency_seconds";
/// `kvraft_apply_latency_seconds`: Time from proposing an entry to replying after it was applied.
pub const APPLY_LATENCY: &str = "kvraft_apply_latency_seconds";
/// `kvraft_requests_total`: Client requests handled, by operation and outcome.
pub const REQUESTS: &str = "kvraft_requests_total";
/// `kvraft_request_duration_seconds`: Client request handling time, by operation.
pub const REQUEST_DURATION: &str = "kvraft_request_duration_seconds";
/// `kvraft_elections_total`: Campaigns (pre-vote or vote) this node started.
pub const ELECTIONS: &str = "kvraft_elections_total";
/// `kvraft_leader_changes_total`: Times this node saw a new leader.
pub const LEADER_CHANGES: &str = "kvraft_leader_changes_total";
/// `kvraft_term`: Current raft term.
pub const TERM: &str = "kvraft_term";
/// `kvraft_is_leader`: 1 if this node is the leader.
pub const IS_LEADER: &str = "kvraft_is_leader";
/// `kvraft_has_leader`: 1 if this node knows a leader.
pub const HAS_LEADER: &str = "kvraft_has_leader";
/// `kvraft_snapshot_size_bytes`: Size of the last snapshot written.
pub const SNAPSHOT_SIZE: &str = "kvraft_snapshot_size_bytes";
/// `kvraft_snapshot_duration_seconds`: Time to create or apply a snapshot, by kind.
pub const SNAPSHOT_DURATION: &str = "kvraft_snapshot_duration_seconds";
/// `kvraft_snapshots_total`: Snapshots created, sent, received and applied.
pub const SNAPSHOTS: &str = "kvraft_snapshots_total";
/// `kvraft_snapshot_failures_total`: Snapshots that failed to be created, sent or applied.
pub const SNAPSHOT_FAILURES: &str = "kvraft_snapshot_failures_total";
/// `kvraft_store_apply_duration_seconds`: Time to apply one batch of committed entries (into the store's memory).
pub const STORE_APPLY_DURATION: &str = "kvraft_store_apply_duration_seconds";
/// `kvraft_store_checkpoint_duration_seconds`: Time to flush applied changes from memory into the store file (one fsynced commit).
pub const STORE_CHECKPOINT_DURATION: &str = "kvraft_store_checkpoint_duration_seconds";
/// `kvraft_store_durable_applied_index`: The applied index of the store's last flush (each is fsynced).
pub const STORE_DURABLE_INDEX: &str = "kvraft_store_durable_applied_index";
/// `kvraft_store_size_bytes`: The state store's size on disk (state.redb and the value log).
pub const STORE_SIZE: &str = "kvraft_store_size_bytes";
/// `kvraft_store_value_log_live_bytes`: Bytes of the value log that keys still point to (the rest is garbage to collect).
pub const STORE_VALUE_LOG_LIVE: &str = "kvraft_store_value_log_live_bytes";
/// `kvraft_read_cache_hits_total`: Gets answered from the read cache.
pub const READ_CACHE_HITS: &str = "kvraft_read_cache_hits_total";
/// `kvraft_read_cache_misses_total`: Gets that read the store file (the key was not in the read cache).
pub const READ_CACHE_MISSES: &str = "kvraft_read_cache_misses_total";
/// `kvraft_read_cache_bytes`: Bytes of records in the read cache.
pub const READ_CACHE_BYTES: &str = "kvraft_read_cache_bytes";
/// `kvraft_snapshot_stream_bytes_total`: Snapshot stream bytes, by peer and direction (sent, received).
pub const SNAPSHOT_STREAM_BYTES: &str = "kvraft_snapshot_stream_bytes_total";
/// `kvraft_snapshot_stream_duration_seconds`: How long a snapshot stream took, by peer and direction.
pub const SNAPSHOT_STREAM_DURATION: &str = "kvraft_snapshot_stream_duration_seconds";
/// `kvraft_wal_fsync_duration_seconds`: Time of a durable raft log write (write + fsync).
pub const WAL_FSYNC_DURATION: &str = "kvraft_wal_fsync_duration_seconds";
/// `kvraft_commit_index`: Highest log index known committed.
pub const COMMIT_INDEX: &str = "kvraft_commit_index";
/// `kvraft_applied_index`: Highest log index applied to the state machine.
pub const APPLIED_INDEX: &str = "kvraft_applied_index";
/// `kvraft_log_first_index`: First index in the raft log.
pub const LOG_FIRST_INDEX: &str = "kvraft_log_first_index";
/// `kvraft_log_last_index`: Last index in the raft log.
pub const LOG_LAST_INDEX: &str = "kvraft_log_last_index";
/// `kvraft_proposals_pending`: Proposals waiting to be applied on this node.
pub const PROPOSALS_PENDING: &str = "kvraft_proposals_pending";
/// `kvraft_proposals_failed_total`: Proposals that failed, by reason.
pub const PROPOSALS_FAILED: &str = "kvraft_proposals_failed_total";
/// `kvraft_inbox_full_total`: Requests refused and peer messages dropped because the raft loop's inbox was full.
pub const INBOX_FULL: &str = "kvraft_inbox_full_total";
/// `kvraft_peer_sent_bytes_total`: Bytes sent to a peer.
pub const PEER_SENT_BYTES: &str = "kvraft_peer_sent_bytes_total";
/// `kvraft_peer_received_bytes_total`: Bytes received from a peer.
pub const PEER_RECEIVED_BYTES: &str = "kvraft_peer_received_bytes_total";
/// `kvraft_peer_send_failures_total`: Failed connects or writes to a peer.
pub const PEER_SEND_FAILURES: &str = "kvraft_peer_send_failures_total";
/// `kvraft_peer_connections_refused_total`: Inbound peer connections refused before reaching raft, by reason.
pub const PEER_CONNECTIONS_REFUSED: &str = "kvraft_peer_connections_refused_total";
/// `kvraft_peer_messages_refused_total`: Raft messages from peers dropped by the peer checks, by reason.
pub const PEER_MESSAGES_REFUSED: &str = "kvraft_peer_messages_refused_total";
/// `kvraft_client_connections_closed_total`: Client connections the node closed (idle, slow, oversized frame, TLS), by reason.
pub const CLIENT_CONNECTIONS_CLOSED: &str = "kvraft_client_connections_closed_total";
/// `kvraft_tls_reloads_total`: TLS certificate reloads, by outcome (ok, failed).
pub const TLS_RELOADS: &str = "kvraft_tls_reloads_total";
/// `kvraft_keys`: Keys in the state machine.
pub const KEYS: &str = "kvraft_keys";
/// `kvraft_members`: Cluster members, by role.
pub const MEMBERS: &str = "kvraft_members";
/// `kvraft_watchers`: Watches open on this node.
pub const WATCHERS: &str = "kvraft_watchers";
/// `kvraft_watch_events_total`: Events sent to watchers.
pub const WATCH_EVENTS: &str = "kvraft_watch_events_total";
/// `kvraft_watches_canceled_total`: Watches the node ended, by reason.
pub const WATCHES_CANCELED: &str = "kvraft_watches_canceled_total";
/// `kvraft_history_start_revision`: The oldest revision the change history holds.
pub const HISTORY_START: &str = "kvraft_history_start_revision";
/// `kvraft_leases`: Leases held in the state machine.
pub const LEASES: &str = "kvraft_leases";
/// `kvraft_leases_expired_total`: Leases that ran out (applied on this node).
pub const LEASES_EXPIRED: &str = "kvraft_leases_expired_total";
/// `kvraft_lease_expiries_proposed_total`: Expiries this node proposed as leader.
pub const LEASE_EXPIRIES_PROPOSED: &str = "kvraft_lease_expiries_proposed_total";
// The process series (`process_resident_memory_bytes`, `process_cpu_seconds_total`,
// `process_open_fds`, `process_max_fds`, `process_start_time_seconds`, ...) carry
// Prometheus's standard names, without our prefix, so stock dashboards and
// alerts work; metrics-process collects them (see `update_process`).

/// Client operations, as the `op` label.
pub const OPS: &[&str] = &[
    "set",
    "get",
    "delete",
    "scan",
    "add_node",
    "remove_node",
    "members",
    "info",
    "ping",
    "snapshot_save",
    "register_session",
    "txn",
    "watch",
    "watch_cancel",
    "lease_grant",
    "lease_revoke",
    "lease_keep_alive",
    "lease_time_to_live",
    "lease_list",
];
/// Why the node ended a watch, as the `reason` label.
pub const WATCH_CANCEL_REASONS: &[&str] = &["client", "compacted", "store_failure"];
/// Snapshot events, as the `kind` label.
pub const SNAPSHOT_KINDS: &[&str] = &["created", "sent", "received", "applied"];
/// Why a proposal failed, as the `reason` label.
pub const FAILURE_REASONS: &[&str] = &[
    "dropped",
    "no_leader",
    "timeout",
    "leader_changed",
    "shutdown",
    "snapshot",
];

/// Why the node closed a client connection, as the `reason` label.
pub const CLIENT_CLOSE_REASONS: &[&str] = &["idle", "slow", "frame_too_large", "tls_handshake", "tls_required"];

/// Latency buckets from 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the global recorder and creates every series at zero.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    describe();
    zero();
    Ok(handle)
}

fn describe() {
    describe_histogram!(
        COMMIT_LATENCY,
        Unit::Seconds,
        "Time from proposing an entry to learning it is committed."
    );
    describe_histogram!(
        APPLY_LATENCY,
        Unit::Seconds,
        "Time from proposing an entry to replying after it was applied."
    );
    describe_counter!(REQUESTS, "Client requests handled, by operation and outcome.");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Client request handling time, by operation."
    );
    describe_counter!(ELECTIONS, "Campaigns (pre-vote or vote) this node started.");
    describe_counter!(LEADER_CHANGES, "Times this node saw a new leader.");
    describe_gauge!(TERM, "Current raft term.");
    describe_gauge!(IS_LEADER, "1 if this node is the leader.");
    describe_gauge!(HAS_LEADER, "1 if this node knows a leader.");
    describe_gauge!(
        SNAPSHOT_SIZE,
        Unit::Bytes,
        "Size of the store after the last snapshot install."
    );
    describe_histogram!(
        STORE_APPLY_DURATION,
        Unit::Seconds,
        "Time to apply one batch of committed entries (into the store's memory)."
    );
    describe_histogram!(
        STORE_CHECKPOINT_DURATION,
        Unit::Seconds,
        "Time to flush applied changes from memory into the store file (one fsynced commit)."
    );
    describe_gauge!(
        STORE_DURABLE_INDEX,
        "The applied index of the store's last flush (each is fsynced)."
    );
    describe_gauge!(
        STORE_SIZE,
        Unit::Bytes,
        "The state store's size on disk (state.redb and the value log)."
    );
    describe_gauge!(
        STORE_VALUE_LOG_LIVE,
        Unit::Bytes,
        "Bytes of the value log that keys still point to (the rest is garbage to collect)."
    );
    describe_counter!(READ_CACHE_HITS, "Gets answered from the read cache.");
    describe_counter!(
        READ_CACHE_MISSES,
        "Gets that read the store file (the key was not in the read cache)."
    );
    describe_gauge!(READ_CACHE_BYTES, Unit::Bytes, "Bytes of records in the read cache.");
    describe_counter!(
        SNAPSHOT_STREAM_BYTES,
        Unit::Bytes,
        "Snapshot stream bytes, by peer and direction (sent, received)."
    );
    describe_histogram!(
        SNAPSHOT_STREAM_DURATION,
        Unit::Seconds,
        "Time a snapshot stream took, by peer and direction (sent, received)."
    );
    describe_histogram!(
        SNAPSHOT_DURATION,
        Unit::Seconds,
        "Time to create or apply a snapshot, by kind."
    );
    describe_counter!(SNAPSHOTS, "Snapshots created, sent, received and applied.");
    describe_counter!(
        SNAPSHOT_FAILURES,
        "Snapshots that failed to be created, sent or applied."
    );
    describe_histogram!(
        WAL_FSYNC_DURATION,
        Unit::Seconds,
        "Time of a durable raft log write (write + fsync)."
    );
    describe_gauge!(COMMIT_INDEX, "Highest log index known committed.");
    describe_gauge!(APPLIED_INDEX, "Highest log index applied to the state machine.");
    describe_gauge!(LOG_FIRST_INDEX, "First index in the raft log.");
    describe_gauge!(LOG_LAST_INDEX, "Last index in the raft log.");
    describe_gauge!(PROPOSALS_PENDING, "Proposals waiting to be applied on this node.");
    describe_counter!(PROPOSALS_FAILED, "Proposals that failed, by reason.");
    describe_counter!(
        INBOX_FULL,
        "Requests refused and peer messages dropped because the raft loop's inbox was full."
    );
    describe_counter!(PEER_SENT_BYTES, Unit::Bytes, "Bytes sent to a peer.");
    describe_counter!(PEER_RECEIVED_BYTES, Unit::Bytes, "Bytes received from a peer.");
    describe_counter!(PEER_SEND_FAILURES, "Failed connects or writes to a peer.");
    describe_counter!(
        PEER_CONNECTIONS_REFUSED,
        "Inbound peer connections refused before reaching raft, by reason."
    );
    describe_counter!(
        PEER_MESSAGES_REFUSED,
        "Raft messages from peers dropped by the peer checks, by reason."
    );
    describe_counter!(
        CLIENT_CONNECTIONS_CLOSED,
        "Client connections the node closed (idle, slow, oversized frame, TLS), by reason."
    );
    describe_counter!(TLS_RELOADS, "TLS certificate reloads, by outcome (ok, failed).");
    describe_gauge!(KEYS, "Keys in the state machine.");
    describe_gauge!(MEMBERS, "Cluster members, by role.");
    describe_gauge!(WATCHERS, "Watches open on this node.");
    describe_counter!(WATCH_EVENTS, "Events sent to watchers.");
    describe_counter!(WATCHES_CANCELED, "Watches the node ended, by reason.");
    describe_gauge!(HISTORY_START, "The oldest revision the change history holds.");
    describe_gauge!(LEASES, "Leases held in the state machine.");
    describe_counter!(LEASES_EXPIRED, "Leases that ran out (applied on this node).");
    describe_counter!(LEASE_EXPIRIES_PROPOSED, "Lease expiries this node proposed as leader.");
    process_collector().describe();
}

fn zero() {
    for name in [
        COMMIT_LATENCY,
        APPLY_LATENCY,
        WAL_FSYNC_DURATION,
        STORE_APPLY_DURATION,
        STORE_CHECKPOINT_DURATION,
    ] {
        let _ = histogram!(name);
    }
    for op in OPS {
        counter!(REQUESTS, "op" => *op, "outcome" => "ok").absolute(0);
        let _ = histogram!(REQUEST_DURATION, "op" => *op);
    }
    process_collector().collect();
    for name in [ELECTIONS, LEADER_CHANGES] {
        counter!(name).absolute(0);
    }
    for name in [
        TERM,
        IS_LEADER,
        HAS_LEADER,
        SNAPSHOT_SIZE,
        COMMIT_INDEX,
        APPLIED_INDEX,
        LOG_FIRST_INDEX,
        LOG_LAST_INDEX,
        PROPOSALS_PENDING,
        KEYS,
        STORE_DURABLE_INDEX,
        STORE_SIZE,
        STORE_VALUE_LOG_LIVE,
        READ_CACHE_BYTES,
        WATCHERS,
        HISTORY_START,
        LEASES,
    ] {
        gauge!(name).set(0.0);
    }
    counter!(WATCH_EVENTS).absolute(0);
    counter!(READ_CACHE_HITS).absolute(0);
    counter!(READ_CACHE_MISSES).absolute(0);
    counter!(LEASES_EXPIRED).absolute(0);
    counter!(LEASE_EXPIRIES_PROPOSED).absolute(0);
    for reason in WATCH_CANCEL_REASONS {
        counter!(WATCHES_CANCELED, "reason" => *reason).absolute(0);
    }
    for kind in SNAPSHOT_KINDS {
        counter!(SNAPSHOTS, "kind" => *kind).absolute(0);
    }
    for kind in ["create", "send", "apply"] {
        counter!(SNAPSHOT_FAILURES, "kind" => kind).absolute(0);
    }
    let _ = histogram!(SNAPSHOT_DURATION, "kind" => "applied");
    for reason in FAILURE_REASONS {
        counter!(PROPOSALS_FAILED, "reason" => *reason).absolute(0);
    }
    counter!(INBOX_FULL).absolute(0);
    for role in ["voter", "learner"] {
        gauge!(MEMBERS, "role" => role).set(0.0);
    }
    for reason in crate::peer_guard::ConnectionRefusal::LABELS {
        counter!(PEER_CONNECTIONS_REFUSED, "reason" => *reason).absolute(0);
    }
    for reason in crate::peer_guard::MessageRefusal::LABELS {
        counter!(PEER_MESSAGES_REFUSED, "reason" => *reason).absolute(0);
    }
    for reason in CLIENT_CLOSE_REASONS {
        counter!(CLIENT_CONNECTIONS_CLOSED, "reason" => *reason).absolute(0);
    }
    for outcome in ["ok", "failed"] {
        counter!(TLS_RELOADS, "outcome" => outcome).absolute(0);
    }
}

/// Creates the per-peer series at zero when a peer becomes known.
pub fn zero_peer(peer: u64) {
    let peer = peer.to_string();
    counter!(PEER_SENT_BYTES, "peer" => peer.clone()).absolute(0);
    counter!(PEER_RECEIVED_BYTES, "peer" => peer.clone()).absolute(0);
    counter!(PEER_SEND_FAILURES, "peer" => peer.clone()).absolute(0);
    for direction in ["sent", "received"] {
        counter!(SNAPSHOT_STREAM_BYTES, "peer" => peer.clone(), "direction" => direction).absolute(0);
    }
}

/// Counts a failed proposal.
pub fn proposal_failed(reason: &'static str) {
    counter!(PROPOSALS_FAILED, "reason" => reason).increment(1);
}

/// Counts a message the raft loop's full inbox could not take.
pub fn inbox_full() {
    counter!(INBOX_FULL).increment(1);
}

/// Records a duration in a histogram.
pub fn observe(name: &'static str, elapsed: Duration) {
    histogram!(name).record(elapsed.as_secs_f64());
}

/// The collector of the standard process series.
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: std::sync::OnceLock<metrics_process::Collector> = std::sync::OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// Refreshes the process series (called before each scrape).
pub fn update_process() {
    process_collector().collect();
}

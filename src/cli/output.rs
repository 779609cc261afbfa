//! Printing results as text for people or JSON for scripts. Errors go to
//! stderr in both modes, so stdout stays parseable.

use std::time::Duration;

use serde_json::{json, Value};

use super::endpoint::Health;
use super::OutputFormat;
use crate::error::Error;
use crate::proto::{InfoResponse, KeyValue, Member, MemberRole};

/// Prints results in the chosen format.
pub struct Printer {
    format: OutputFormat,
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Writes a value's bytes to stdout exactly as stored (`get --raw`).
pub(crate) fn write_raw(value: &[u8]) -> Result<(), crate::error::Error> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(value)
        .and_then(|()| stdout.flush())
        .map_err(|e| crate::error::Error::InvalidArgument(format!("can't write the value to stdout: {e}")))
}

/// A pair as JSON, with etcd's names for its history.
pub(crate) fn record_json(kv: &KeyValue) -> Value {
    json!({
        "key": text(&kv.key),
        "value": text(&kv.value),
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
        "version": kv.version,
        "lease": kv.lease,
    })
}

fn role_name(member: &Member) -> &'static str {
    if member.role == MemberRole::Learner as i32 {
        "learner"
    } else {
        "voter"
    }
}

fn member_json(m: &Member) -> Value {
    json!({"id": m.id, "peer_addr": m.peer_addr, "client_addr": m.client_addr, "role": role_name(m)})
}

impl Printer {
    /// A printer for this format.
    pub fn new(format: OutputFormat) -> Self {
        Printer { format }
    }

    /// The chosen format.
    pub(crate) fn format(&self) -> OutputFormat {
        self.format
    }

    pub(crate) fn emit(&self, json: Value, text: impl FnOnce() -> String) {
        match self.format {
            OutputFormat::Json => println!("{json}"),
            OutputFormat::Text => {
                let t = text();
                if !t.is_empty() {
                    println!("{t}");
                }
            }
        }
    }

    pub(crate) fn set(&self, revision: u64) {
        self.emit(json!({"revision": revision}), || "OK".into());
    }

    /// A key's value (text) or its record with its history (json).
    pub(crate) fn record(&self, record: &KeyValue) {
        let mut json = record_json(record);
        json["found"] = json!(true);
        self.emit(json, || text(&record.value));
    }

    pub(crate) fn not_found(&self, key: &str) {
        if self.format == OutputFormat::Json {
            println!("{}", json!({"key": key, "found": false}));
        }
        eprintln!("kvraft: key {key:?} not found");
    }

    pub(crate) fn deleted(&self, key: &str, existed: bool, revision: u64) {
        self.emit(json!({"key": key, "deleted": existed, "revision": revision}), || {
            if existed {
                "deleted".into()
            } else {
                format!("{key:?} did not exist")
            }
        });
    }

    /// A range delete: how many keys went, at which revision.
    pub(crate) fn deleted_range(&self, deleted: u64, revision: u64) {
        self.emit(
            json!({"deleted": deleted > 0, "count": deleted, "revision": revision}),
            || format!("deleted {deleted} key{}", if deleted == 1 { "" } else { "s" }),
        );
    }

    pub(crate) fn pairs(&self, pairs: &[KeyValue]) {
        let json = Value::Array(pairs.iter().map(record_json).collect());
        self.emit(json, || {
            pairs
                .iter()
                .map(|kv| format!("{}\t{}", text(&kv.key), text(&kv.value)))
                .collect::<Vec<_>>()
                .join("\n")
        });
    }

    pub(crate) fn members_changed(&self, what: &str, members: &[Member]) {
        let json = json!({"message": what, "members": members.iter().map(member_json).collect::<Vec<_>>()});
        self.emit(json, || format!("{what}\n{}", members_table(members, 0)));
    }

    /// The members with the leader, and each one's health as seen from here.
    pub(crate) fn members(&self, members: &[Member], leader: u64, health: &[Option<Health>]) {
        let json = json!({"leader_id": leader, "members": members.iter().zip(health).map(|(m, h)| {
            let mut j = member_json(m);
            match h.as_ref().map(|h| &h.result) {
                Some(Ok(_)) => j["healthy"] = json!(true),
                Some(Err(e)) => {
                    j["healthy"] = json!(false);
                    j["health_error"] = json!(e.to_string());
                }
                None => j["healthy"] = Value::Null,
            }
            j
        }).collect::<Vec<_>>()});
        self.emit(json, || {
            let column: Vec<String> = health
                .iter()
                .map(|h| match h.as_ref().map(|h| &h.result) {
                    Some(Ok(_)) => "healthy".into(),
                    Some(Err(Error::NothingListening { .. })) => "down".into(),
                    Some(Err(Error::NoLeader { .. })) => "no leader".into(),
                    Some(Err(Error::Unavailable { .. })) => "unreachable".into(),
                    Some(Err(_)) => "unhealthy".into(),
                    None => "unknown (no client address yet)".into(),
                })
                .collect();
            members_table_with(members, leader, Some(&column))
        });
    }

    pub(crate) fn info(&self, info: &InfoResponse) {
        let json = json!({
            "id": info.id,
            "role": info.role,
            "term": info.term,
            "leader_id": info.leader_id,
            "commit_index": info.commit_index,
            "applied_index": info.applied_index,
            "snapshot_index": info.snapshot_index,
            "first_index": info.first_index,
            "last_index": info.last_index,
            "keys": info.keys,
            "cluster_id": format!("{:016x}", info.cluster_id),
            "version": info.version,
            "members": info.members.iter().map(member_json).collect::<Vec<_>>(),
        });
        self.emit(json, || {
            format!(
                "node {} ({}), term {}, leader {}\ncommit {}  applied {}  snapshot {}  log {}..{}\nkeys {}  cluster {:016x}  version {}\n{}",
                info.id,
                info.role,
                info.term,
                info.leader_id,
                info.commit_index,
                info.applied_index,
                info.snapshot_index,
                info.first_index,
                info.last_index,
                info.keys,
                info.cluster_id,
                info.version,
                members_table(&info.members, info.leader_id)
            )
        });
    }

    pub(crate) fn ping(&self, node: u64, rtt: Duration) {
        let ms = rtt.as_secs_f64() * 1000.0;
        self.emit(json!({"node_id": node, "rtt_ms": ms}), || {
            format!("pong from node {node} in {ms:.3} ms")
        });
    }

    pub(crate) fn certs(&self, summary: Value, text: String) {
        self.emit(summary, || text);
    }

    pub(crate) fn bench(&self, summary: Value, text: String) {
        self.emit(summary, || text);
    }

    pub(crate) fn emit_summary(&self, summary: Value, text: impl FnOnce() -> String) {
        self.emit(summary, text);
    }
}

fn members_table(members: &[Member], leader: u64) -> String {
    members_table_with(members, leader, None)
}

/// The members table, with a HEALTH column when `health` is given.
fn members_table_with(members: &[Member], leader: u64, health: Option<&[String]>) -> String {
    let header = format!("{:<6} {:<8} {:<24} {:<24}", "ID", "ROLE", "PEER", "CLIENT");
    let mut lines = vec![match health {
        Some(_) => format!("{header} HEALTH"),
        None => header,
    }];
    for (i, m) in members.iter().enumerate() {
        let role = if m.id == leader { "leader" } else { role_name(m) };
        let row = format!("{:<6} {:<8} {:<24} {:<24}", m.id, role, m.peer_addr, m.client_addr);
        lines.push(match health {
            Some(column) => format!("{row} {}", column[i]),
            None => row,
        });
    }
    lines.join("\n")
}

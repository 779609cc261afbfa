//! `kvraft snapshot save|restore|status`: backups of a cluster's state and
//! new clusters made from them (etcd's `snapshot save` / `restore`).

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::json;

use super::output::Printer;
use crate::client::Client;
use crate::error::Error;
use crate::proto::SnapshotHeader;
use crate::storage::backup_file::{self, BackupWriter};
use crate::storage::snapshot_stream::{Checked, FrameCheck};

/// Backups.
#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Stream a consistent snapshot of the state from a node into FILE
    /// (checksummed; every write acknowledged before it started is in it).
    Save {
        /// Where to write it (replaced only once complete).
        file: PathBuf,
    },
    /// Make the data dir of one member of a NEW cluster from a backup; run
    /// it for every member with the same --initial-cluster, then start them.
    Restore {
        /// A file written by `kvraft snapshot save`.
        file: PathBuf,
        /// The new member's data dir (must not exist or be empty).
        #[arg(long)]
        data_dir: PathBuf,
        /// The new member's id.
        #[arg(long)]
        id: u64,
        /// Every member of the new cluster: ID=PEER_HOST:PORT,...
        #[arg(long)]
        initial_cluster: String,
    },
    /// Check a backup file and print what it holds.
    Status {
        /// A file written by `kvraft snapshot save`.
        file: PathBuf,
    },
}

fn local(e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(e.to_string())
}

fn describe(header: &SnapshotHeader) -> serde_json::Value {
    json!({
        "index": header.index,
        "term": header.term,
        "keys": header.keys.unwrap_or(header.records),
        "cluster_id": format!("{:016x}", header.cluster_id),
        "source_node": header.source_node,
        "created_unix": header.created_unix,
        "members": header.members.iter().map(|m| json!({"id": m.id, "peer_addr": m.peer_addr})).collect::<Vec<_>>(),
    })
}

/// Runs a `snapshot` subcommand. `save` needs the cluster (`client`).
pub async fn run(
    command: SnapshotCommand,
    client: impl FnOnce() -> Result<Client, Error>,
    serializable: bool,
    printer: &Printer,
) -> Result<i32, Error> {
    match command {
        SnapshotCommand::Save { file } => {
            let client = client()?;
            let mut writer = BackupWriter::create(&file).map_err(local)?;
            let header = client
                .snapshot_save(serializable, |frame| writer.frame(frame).map_err(local))
                .await?;
            let bytes = writer.finish().map_err(local)?;
            let mut summary = describe(&header);
            summary["file"] = json!(file.display().to_string());
            summary["bytes"] = json!(bytes);
            printer.emit_summary(summary, || {
                format!(
                    "saved a snapshot at index {} (term {}, {} keys, {bytes} bytes) from node {} to {}",
                    header.index,
                    header.term,
                    header.keys.unwrap_or(header.records),
                    header.source_node,
                    file.display()
                )
            });
        }
        SnapshotCommand::Restore {
            file,
            data_dir,
            id,
            initial_cluster,
        } => {
            let restored = crate::node::restore::restore(&file, &data_dir, id, &initial_cluster).map_err(local)?;
            let mut summary = describe(&restored.backup);
            summary["new_cluster_id"] = json!(format!("{:016x}", restored.cluster_id));
            summary["data_dir"] = json!(data_dir.display().to_string());
            summary["id"] = json!(id);
            printer.emit_summary(summary, || {
                format!(
                    "restored {} keys at index {} into {} as node {id} of new cluster {:016x}; \
                     start it with `kvraftd --id {id} --data-dir {}` (the other members likewise)",
                    restored.backup.keys.unwrap_or(restored.backup.records),
                    restored.backup.index,
                    data_dir.display(),
                    restored.cluster_id,
                    data_dir.display()
                )
            });
        }
        SnapshotCommand::Status { file } => {
            let unusable = |e: &dyn std::fmt::Display| local(backup_file::unusable(&file, e));
            let mut check = FrameCheck::default();
            let mut done = None;
            for frame in backup_file::read_frames(&file).map_err(local)? {
                let frame = frame.map_err(|e| unusable(&e))?;
                if let Checked::Done(header) = check.check(&frame).map_err(|e| unusable(&e))? {
                    done = Some(header);
                    break;
                }
            }
            let header = done.ok_or_else(|| unusable(&"it ends before its trailer (cut short)"))?;
            printer.emit_summary(describe(&header), || {
                format!(
                    "{}: intact; index {} term {}, {} keys, cluster {:016x}, from node {}",
                    file.display(),
                    header.index,
                    header.term,
                    header.keys.unwrap_or(header.records),
                    header.cluster_id,
                    header.source_node
                )
            });
        }
    }
    Ok(0)
}

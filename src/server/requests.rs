//! One client request: validate it, route it to the node, build the response.
//! A rejected request never reaches raft, so it changes nothing.

use std::time::Instant;

use ::metrics::{counter, histogram};
use tracing::{debug, info_span, Instrument};

use super::access::AccessControl;
use super::{validate, Limits};
use crate::address::check_host_port;
use crate::error::WireError;
use crate::metrics;
use crate::node::{LeaseAnswer, LeaseQuery, MembershipChange, NodeHandle, NodeStatus};
use crate::proto::{
    command, request, response, AddNodeResponse, Command, DeleteResponse, ErrorCode, InfoResponse, LeaseGrantResponse,
    LeaseKeepAliveResponse, LeaseListResponse, LeaseRevokeResponse, LeaseTimeToLiveResponse, Member, MembersResponse,
    PingResponse, RegisterSessionResponse, RemoveNodeResponse, Request, Response, ScanResponse, SetResponse,
};
use crate::sessions::Refusal;
use crate::state_machine::{get_response, ApplyResult};

/// Handles one request and returns its response (never fails: errors become
/// error responses). Each request runs in a span carrying its id, operation and
/// this node's id; the raft loop adds "proposed", "committed" and "applied"
/// events to it.
pub async fn dispatch(
    request: Request,
    handle: &NodeHandle,
    limits: Limits,
    access: &AccessControl,
    identity: Option<&str>,
) -> Response {
    let id = request.id;
    let session = SessionFields {
        session_id: request.session_id,
        seq: request.seq,
        first_incomplete: request.first_incomplete,
    };
    let Some(command) = request.command else {
        let error = WireError::new(
            ErrorCode::MalformedRequest,
            "the request has no command; set one of set/get/delete/scan/add_node/remove_node/members/info/ping/snapshot_save",
        );
        return Response {
            id,
            result: Some(response::Result::Error(error.into())),
        };
    };
    let op = op_name(&command);
    let span = info_span!("request", request_id = id, op, node = handle.status().id);
    let started = Instant::now();
    let result = async {
        debug!("received");
        // A refused request never reaches the node, so it changes nothing.
        access.check(identity, &command)?;
        run(command, session, handle, limits).await
    }
    .instrument(span.clone())
    .await;
    let outcome = match &result {
        Ok(_) => "ok".to_string(),
        Err(e) => e.code.as_str_name().to_ascii_lowercase(),
    };
    debug!(parent: &span, %outcome, "replied");
    counter!(metrics::REQUESTS, "op" => op, "outcome" => outcome).increment(1);
    histogram!(metrics::REQUEST_DURATION, "op" => op).record(started.elapsed().as_secs_f64());
    Response {
        id,
        result: Some(match result {
            Ok(r) => r,
            Err(e) => response::Result::Error(e.into()),
        }),
    }
}

/// The `op` label of a command.
pub(super) fn op_name(command: &request::Command) -> &'static str {
    use request::Command as C;
    match command {
        C::Set(_) => "set",
        C::Get(_) => "get",
        C::Delete(_) => "delete",
        C::RegisterSession(_) => "register_session",
        C::Txn(_) => "txn",
        C::Watch(_) => "watch",
        C::WatchCancel(_) => "watch_cancel",
        C::Scan(_) => "scan",
        C::AddNode(_) => "add_node",
        C::RemoveNode(_) => "remove_node",
        C::Members(_) => "members",
        C::Info(_) => "info",
        C::Ping(_) => "ping",
        C::SnapshotSave(_) => "snapshot_save",
        C::LeaseGrant(_) => "lease_grant",
        C::LeaseRevoke(_) => "lease_revoke",
        C::LeaseKeepAlive(_) => "lease_keep_alive",
        C::LeaseTimeToLive(_) => "lease_time_to_live",
        C::LeaseList(_) => "lease_list",
    }
}

fn unexpected(result: ApplyResult) -> WireError {
    match result {
        ApplyResult::SessionRefused(refusal, why) => {
            let code = match refusal {
                Refusal::Expired => ErrorCode::SessionExpired,
                Refusal::Stale => ErrorCode::StaleWrite,
                // Nothing applied, and later it may be: retry as overloaded.
                Refusal::Busy => ErrorCode::Overloaded,
            };
            WireError::new(code, why)
        }
        ApplyResult::Refused(why) => WireError::invalid(why),
        ApplyResult::LeaseNotFound(id) => lease_not_found(id),
        other => WireError::new(ErrorCode::Internal, format!("unexpected apply result {other:?}")),
    }
}

/// The one way to say that a lease is gone.
fn lease_not_found(id: u64) -> WireError {
    WireError::new(
        ErrorCode::LeaseNotFound,
        format!(
            "lease {id} not found: it expired or was revoked (or never existed); nothing was done: grant a new one"
        ),
    )
}

/// A write's place in its client session (see `Request.session_id`).
#[derive(Debug, Clone, Copy)]
struct SessionFields {
    session_id: u64,
    seq: u64,
    first_incomplete: u64,
}

impl SessionFields {
    /// Outside any session.
    const NONE: SessionFields = SessionFields {
        session_id: 0,
        seq: 0,
        first_incomplete: 0,
    };

    /// The replicated command for `op`, in this session.
    fn command(self, op: command::Op) -> Command {
        Command {
            op: Some(op),
            session_id: self.session_id,
            seq: self.seq,
            first_incomplete: self.first_incomplete,
            ..Default::default()
        }
    }
}

async fn run(
    command: request::Command,
    session: SessionFields,
    handle: &NodeHandle,
    limits: Limits,
) -> Result<response::Result, WireError> {
    use request::Command as C;
    match command {
        C::RegisterSession(register) => {
            let op = Command {
                op: Some(command::Op::RegisterSession(register)),
                ..Default::default()
            };
            match handle.propose(op).await? {
                ApplyResult::SessionRegistered { session_id } => {
                    Ok(response::Result::RegisterSession(RegisterSessionResponse {
                        session_id,
                    }))
                }
                other => Err(unexpected(other)),
            }
        }
        C::Set(set) => {
            validate::set(&set, limits)?;
            let op = session.command(command::Op::Set(set));
            match handle.propose(op).await? {
                ApplyResult::Set { revision } => Ok(response::Result::Set(SetResponse { revision })),
                other => Err(unexpected(other)),
            }
        }
        C::Delete(delete) => {
            validate::delete(&delete, limits)?;
            let op = session.command(command::Op::Delete(delete));
            match handle.propose(op).await? {
                ApplyResult::Delete { deleted, revision } => Ok(response::Result::Delete(DeleteResponse {
                    existed: deleted > 0,
                    revision,
                    deleted,
                })),
                other => Err(unexpected(other)),
            }
        }
        C::Txn(txn) => {
            validate::txn(&txn, limits)?;
            // A transaction that writes nothing needs no session (it may run
            // twice), and one from a read-only identity must not touch one.
            let session = if txn.writes() { session } else { SessionFields::NONE };
            let op = session.command(command::Op::Txn(txn));
            match handle.propose(op).await? {
                ApplyResult::Txn(response) => Ok(response::Result::Txn(*response)),
                other => Err(unexpected(other)),
            }
        }
        C::LeaseGrant(grant) => {
            validate::lease_ttl(grant.ttl)?;
            let op = session.command(command::Op::LeaseGrant(grant));
            match handle.propose(op).await? {
                ApplyResult::LeaseGranted { id, ttl } => {
                    Ok(response::Result::LeaseGrant(LeaseGrantResponse { id, ttl }))
                }
                other => Err(unexpected(other)),
            }
        }
        C::LeaseRevoke(revoke) => {
            validate::lease_id(revoke.id)?;
            let op = session.command(command::Op::LeaseRevoke(revoke));
            match handle.propose(op).await? {
                ApplyResult::LeaseEnded { revision, deleted } => {
                    Ok(response::Result::LeaseRevoke(LeaseRevokeResponse { revision, deleted }))
                }
                other => Err(unexpected(other)),
            }
        }
        C::LeaseKeepAlive(keep) => {
            validate::lease_id(keep.id)?;
            match handle.lease(LeaseQuery::KeepAlive(keep.id)).await? {
                LeaseAnswer::Renewed { ttl } => Ok(response::Result::LeaseKeepAlive(LeaseKeepAliveResponse {
                    id: keep.id,
                    ttl,
                })),
                other => Err(unexpected_answer(other)),
            }
        }
        C::LeaseTimeToLive(ask) => {
            validate::lease_id(ask.id)?;
            let query = LeaseQuery::TimeToLive {
                id: ask.id,
                keys: ask.keys,
            };
            match handle.lease(query).await? {
                LeaseAnswer::TimeToLive {
                    ttl,
                    granted_ttl,
                    keys,
                    keys_omitted,
                    key_count,
                } => Ok(response::Result::LeaseTimeToLive(LeaseTimeToLiveResponse {
                    id: ask.id,
                    ttl,
                    granted_ttl,
                    keys,
                    keys_omitted,
                    key_count,
                })),
                other => Err(unexpected_answer(other)),
            }
        }
        C::LeaseList(_) => match handle.lease(LeaseQuery::List).await? {
            LeaseAnswer::List(ids) => Ok(response::Result::LeaseList(LeaseListResponse { ids })),
            other => Err(unexpected_answer(other)),
        },
        C::Get(get) => {
            validate::key(&get.key, limits)?;
            if !get.serializable {
                handle.linearizable_barrier().await?;
            }
            // Straight from the store: a read never holds the state machine
            // lock the raft loop takes after every batch.
            let record = handle.store().get(&get.key).map_err(store_failure)?;
            Ok(response::Result::Get(get_response(record)))
        }
        C::Scan(scan) => {
            validate::range(&scan.from, &scan.to)?;
            if !scan.serializable {
                handle.linearizable_barrier().await?;
            }
            // Leave room in the response frame for framing and field overhead.
            let max_bytes = limits.max_frame_size / 2;
            let page = handle
                .store()
                .scan(&scan.prefix, &scan.from, &scan.to, scan.limit as usize, max_bytes)
                .map_err(store_failure)?;
            Ok(response::Result::Scan(ScanResponse {
                pairs: page.pairs,
                more: page.more,
            }))
        }
        C::AddNode(add) => {
            check_host_port(&add.peer_addr)
                .map_err(|e| WireError::invalid(format!("peer address {:?}: {e}", add.peer_addr)))?;
            if !add.client_addr.is_empty() {
                check_host_port(&add.client_addr)
                    .map_err(|e| WireError::invalid(format!("client address {:?}: {e}", add.client_addr)))?;
            }
            let member = Member {
                id: add.node_id,
                peer_addr: add.peer_addr,
                client_addr: add.client_addr,
                role: 0,
                incarnation: 0,
            };
            match handle.change_membership(MembershipChange::Add(member)).await? {
                ApplyResult::Members(members) => Ok(response::Result::AddNode(AddNodeResponse { members })),
                other => Err(unexpected(other)),
            }
        }
        C::RemoveNode(remove) => match handle
            .change_membership(MembershipChange::Remove(remove.node_id))
            .await?
        {
            ApplyResult::Members(members) => Ok(response::Result::RemoveNode(RemoveNodeResponse { members })),
            other => Err(unexpected(other)),
        },
        C::Members(members) => {
            if !members.serializable {
                handle.linearizable_barrier().await?;
            }
            let status = handle.status();
            Ok(response::Result::Members(MembersResponse {
                members: handle.read(|sm| sm.members()),
                leader_id: status.leader_id,
            }))
        }
        C::Info(_) => Ok(response::Result::Info(info(handle))),
        // Streamed by `server::backup`, never dispatched here.
        C::SnapshotSave(_) => Err(WireError::invalid("snapshot_save is a stream; send it on its own")),
        // Streams of their connection, never dispatched here.
        C::Watch(_) | C::WatchCancel(_) => Err(WireError::invalid("watch is a stream; send it on its own")),
        C::Ping(_) => Ok(response::Result::Ping(PingResponse {
            node_id: handle.status().id,
        })),
    }
}

fn unexpected_answer(answer: LeaseAnswer) -> WireError {
    match answer {
        LeaseAnswer::NotFound(id) => lease_not_found(id),
        other => WireError::new(ErrorCode::Internal, format!("unexpected lease answer {other:?}")),
    }
}

fn info(handle: &NodeHandle) -> InfoResponse {
    let NodeStatus {
        id,
        cluster_id,
        role,
        term,
        leader_id,
        commit_index,
        applied_index,
        snapshot_index,
        first_index,
        last_index,
        ..
    } = handle.status();
    let (members, store) = handle.read(|sm| (sm.members(), sm.store().clone()));
    // Outside the state machine's lock: the exact count may read the file.
    let keys = store.len().unwrap_or(0);
    InfoResponse {
        id,
        role: role.as_str().into(),
        term,
        leader_id,
        commit_index,
        applied_index,
        snapshot_index,
        last_index,
        first_index,
        members,
        keys,
        cluster_id,
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// A read the store could not serve: said as it is, never as "not found".
fn store_failure(e: crate::storage::StorageError) -> WireError {
    tracing::error!(error = %e, "a read from the state store failed");
    WireError::new(
        ErrorCode::Internal,
        format!("this node could not read its state store ({e}); retry on another endpoint, and see this node's log"),
    )
}

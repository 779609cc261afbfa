//! Leases from the client: grant, revoke, renew, ask, and a [`LeaseKeeper`]
//! task that renews one for as long as it is held.
//!
//! Grants and revokes go through the client's session like every write, so
//! a retry never grants twice or reports a revoked lease as missing.
//! Renewals and questions go to the leader (the only node that times
//! leases): the client follows its hint.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{mismatch, Client, Kind};
use crate::error::Error;
use crate::proto::{
    request, response, DeleteResponse, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseListRequest, LeaseRevokeRequest,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, SetRequest,
};

/// A lease as granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Its id (the revision that granted it).
    pub id: u64,
    /// Its time to live, in seconds (at least the cluster's minimum).
    pub ttl: u64,
}

/// What a [`LeaseKeeper`] knows of its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseState {
    /// Renewed; it lives at least until `until` (as this client's clock
    /// counts from the renewal it sent).
    Alive {
        /// Seconds it had to live when last renewed.
        ttl: u64,
        /// When it runs out unless renewed again.
        until: Instant,
    },
    /// Gone: the cluster no longer has it (expired or revoked). Keys
    /// attached to it are deleted.
    Gone(String),
    /// Not renewed before it would run out (the cluster could not be
    /// reached in time): treat it as gone; its keys are about to be deleted.
    Lost(String),
}

impl Client {
    /// Grants a lease of `ttl_seconds` (raised to the cluster's minimum).
    pub async fn lease_grant(&self, ttl_seconds: u64) -> Result<Lease, Error> {
        let command = request::Command::LeaseGrant(LeaseGrantRequest { ttl: ttl_seconds });
        match self.write(command).await? {
            response::Result::LeaseGrant(r) => Ok(Lease { id: r.id, ttl: r.ttl }),
            other => Err(mismatch(other)),
        }
    }

    /// Ends lease `id` now, deleting every key attached to it at one
    /// revision; returns that revision and how many keys went.
    pub async fn lease_revoke(&self, id: u64) -> Result<DeleteResponse, Error> {
        let command = request::Command::LeaseRevoke(LeaseRevokeRequest { id });
        match self.write(command).await? {
            response::Result::LeaseRevoke(r) => Ok(DeleteResponse {
                existed: true,
                revision: r.revision,
                deleted: r.deleted,
            }),
            other => Err(mismatch(other)),
        }
    }

    /// Renews lease `id` once; returns the seconds it now has to live.
    pub async fn lease_keep_alive_once(&self, id: u64) -> Result<u64, Error> {
        self.lease_keep_alive_before(id, Instant::now() + self.inner.options.timeout)
            .await
    }

    /// Renews lease `id` once, giving up at `deadline` (a keeper passes the
    /// moment the lease runs out: past it, a renewal comes too late).
    pub async fn lease_keep_alive_before(&self, id: u64, deadline: Instant) -> Result<u64, Error> {
        let command = request::Command::LeaseKeepAlive(LeaseKeepAliveRequest { id });
        match self.call_until(command, Kind::Read, deadline, None).await? {
            response::Result::LeaseKeepAlive(r) => Ok(r.ttl),
            other => Err(mismatch(other)),
        }
    }

    /// Lease `id`'s time left (and with `keys`, the keys attached to it).
    pub async fn lease_time_to_live(&self, id: u64, keys: bool) -> Result<LeaseTimeToLiveResponse, Error> {
        let command = request::Command::LeaseTimeToLive(LeaseTimeToLiveRequest { id, keys });
        match self.call(command, Kind::Read).await? {
            response::Result::LeaseTimeToLive(r) => Ok(r),
            other => Err(mismatch(other)),
        }
    }

    /// Every lease's id.
    pub async fn lease_list(&self) -> Result<Vec<u64>, Error> {
        match self
            .call(request::Command::LeaseList(LeaseListRequest {}), Kind::Read)
            .await?
        {
            response::Result::LeaseList(r) => Ok(r.ids),
            other => Err(mismatch(other)),
        }
    }

    /// Sets `key` to `value`, attached to lease `lease` (0: none; a key set
    /// without a lease loses the one it had); returns the revision.
    pub async fn set_with_lease(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease: u64,
    ) -> Result<u64, Error> {
        let command = request::Command::Set(SetRequest {
            key: key.into(),
            value: value.into(),
            lease,
        });
        match self.write(command).await? {
            response::Result::Set(r) => Ok(r.revision),
            other => Err(mismatch(other)),
        }
    }

    /// Keeps lease `lease` alive from a background task, renewing it every
    /// third of its time to live, until the keeper is dropped (the lease
    /// then runs out by itself) or the lease is lost.
    pub fn keep_alive(&self, lease: Lease) -> LeaseKeeper {
        // Nothing is promised until the first renewal (made at once): the
        // lease may have been granted a while ago.
        self.keep_alive_from(lease, None)
    }

    /// [`Client::keep_alive`] for a lease renewed at `renewed_at` (its
    /// `ttl` as that renewal answered): the next renewal comes a third of
    /// the TTL later.
    pub(crate) fn keep_alive_from(&self, lease: Lease, renewed_at: Option<Instant>) -> LeaseKeeper {
        let ttl = lease.ttl.min(crate::leases::MAX_TTL);
        let until = renewed_at.map_or_else(Instant::now, |at| at + Duration::from_secs(ttl));
        let (state_tx, state) = watch::channel(LeaseState::Alive { ttl, until });
        let client = self.clone();
        let task = tokio::spawn(async move { renew_until_lost(client, lease, renewed_at, state_tx).await });
        LeaseKeeper { lease, state, task }
    }
}

/// Renews `lease` until it is lost, publishing each outcome.
async fn renew_until_lost(client: Client, lease: Lease, renewed_at: Option<Instant>, state: watch::Sender<LeaseState>) {
    let mut ttl = lease.ttl.min(crate::leases::MAX_TTL);
    // Unless renewed just now, the first renewal is made at once and may
    // take a whole TTL: the grant was at least that recent, as far as this
    // keeper can tell.
    let mut until = renewed_at.unwrap_or_else(Instant::now) + Duration::from_secs(ttl);
    let mut first = renewed_at.is_none();
    loop {
        if !first {
            tokio::time::sleep(Duration::from_millis(ttl * 1000 / 3).max(Duration::from_millis(200))).await;
        }
        first = false;
        loop {
            let sent = Instant::now();
            match client.lease_keep_alive_before(lease.id, until).await {
                Ok(renewed) => {
                    // Whatever a server says, no more than a lease may have.
                    let renewed = renewed.min(crate::leases::MAX_TTL);
                    ttl = renewed;
                    until = sent + Duration::from_secs(renewed);
                    state.send_replace(LeaseState::Alive { ttl, until });
                    break;
                }
                Err(Error::LeaseNotFound(why)) => {
                    state.send_replace(LeaseState::Gone(why));
                    return;
                }
                Err(e) if Instant::now() >= until => {
                    state.send_replace(LeaseState::Lost(format!(
                        "lease {} could not be renewed before it ran out: {e}",
                        lease.id
                    )));
                    return;
                }
                // The cluster may be electing a leader: try again soon.
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

/// Keeps a lease alive while held (see [`Client::keep_alive`]).
pub struct LeaseKeeper {
    lease: Lease,
    state: watch::Receiver<LeaseState>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    /// The lease kept.
    pub fn lease(&self) -> Lease {
        self.lease
    }

    /// What is known of the lease now.
    pub fn state(&self) -> LeaseState {
        self.state.borrow().clone()
    }

    /// Waits for the next renewal or the loss, and returns it.
    pub async fn next(&mut self) -> LeaseState {
        if self.state.changed().await.is_err() {
            return LeaseState::Lost(format!("the keeper of lease {} stopped", self.lease.id));
        }
        self.state.borrow_and_update().clone()
    }

    /// Waits until the lease is gone or lost; returns why.
    pub async fn lost(&mut self) -> String {
        let mut state = self.state.borrow_and_update().clone();
        loop {
            if let LeaseState::Gone(why) | LeaseState::Lost(why) = state {
                return why;
            }
            state = self.next().await;
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

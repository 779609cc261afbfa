//! What this node knows about the members a peer connection may speak for:
//! whether a claimed sender is a member, and the addresses members' peer
//! addresses resolve to (cached for a while: they may be DNS names).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::debug;

use crate::node::NodeHandle;
use crate::peer_guard::{self, SenderStanding};
use crate::state_machine::conf_ids;

/// How long a resolved member address is trusted.
const RESOLVE_TTL: Duration = Duration::from_secs(30);

/// Membership as the peer listener sees it.
pub struct Members {
    handle: NodeHandle,
    resolved: Mutex<HashMap<String, (Instant, Vec<IpAddr>)>>,
}

impl Members {
    /// Reads membership through `handle`.
    pub fn new(handle: NodeHandle) -> Self {
        Members {
            handle,
            resolved: Mutex::new(HashMap::new()),
        }
    }

    /// The addresses `peer_addr` resolves to, cached for a while.
    async fn resolve(&self, peer_addr: &str) -> Vec<IpAddr> {
        if let Some((at, ips)) = self
            .resolved
            .lock()
            .expect("resolve cache lock poisoned")
            .get(peer_addr)
        {
            if at.elapsed() < RESOLVE_TTL {
                return ips.clone();
            }
        }
        let ips: Vec<IpAddr> = match tokio::net::lookup_host(peer_addr).await {
            Ok(addrs) => addrs.map(|a| peer_guard::canonical(a.ip())).collect(),
            Err(e) => {
                debug!(peer_addr, error = %e, "could not resolve a member's peer address");
                Vec::new()
            }
        };
        let mut cache = self.resolved.lock().expect("resolve cache lock poisoned");
        if cache.len() > 1024 {
            cache.clear();
        }
        cache.insert(peer_addr.to_string(), (Instant::now(), ips.clone()));
        ips
    }

    /// What we know of the node an envelope claims to come from; its
    /// addresses are resolved only if `needs_address`.
    pub async fn standing(&self, from: u64, needs_address: bool) -> SenderStanding {
        let (is_member, joining, peer_addr) = self.handle.read(|sm| {
            let cs = sm.conf_state();
            let joining = cs.voters.is_empty() && cs.learners.is_empty();
            let is_member = conf_ids(cs).any(|id| id == from);
            (is_member, joining, sm.member(from).map(|m| m.peer_addr.clone()))
        });
        let member_ips = match (needs_address && is_member, peer_addr) {
            (true, Some(addr)) => self.resolve(&addr).await,
            _ => Vec::new(),
        };
        SenderStanding {
            is_member,
            joining,
            member_ips,
        }
    }

    /// True if `ip` is an address some member's peer address resolves to.
    pub async fn is_member_address(&self, ip: IpAddr) -> bool {
        let addrs: Vec<String> = self
            .handle
            .read(|sm| sm.members().into_iter().map(|m| m.peer_addr).collect());
        let ip = peer_guard::canonical(ip);
        for addr in addrs {
            if self.resolve(&addr).await.contains(&ip) {
                return true;
            }
        }
        false
    }

    /// This node's applied index, for messages about what it may have missed.
    pub fn applied_index(&self) -> u64 {
        self.handle.status().applied_index
    }
}

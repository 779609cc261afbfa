//! Leases in the state machine: granting one, ending one with its keys, and
//! the check a put makes before it attaches a key. When a lease runs out is
//! decided by the leader (`node::lessor`), which proposes its end; here an
//! end is the same whether revoked or expired.

use super::{ApplyResult, Batch, Pending};
use crate::leases::{MAX_LEASES, MAX_LEASE_KEYS, MAX_TTL};
use crate::storage::StorageError;

/// A lease granted or ended by a batch, for the leader's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEvent {
    /// Granted with this time to live (seconds).
    Granted {
        /// Its id.
        id: u64,
        /// Seconds.
        ttl: u64,
    },
    /// Revoked or expired.
    Ended {
        /// Its id.
        id: u64,
    },
}

impl Batch<'_> {
    /// Grants a lease of `ttl` seconds at `index` (its id). Refused when the
    /// time to live is out of range or the cluster holds as many leases as
    /// it may.
    pub(super) fn grant_lease(&mut self, index: u64, ttl: u64) -> ApplyResult {
        if ttl == 0 || ttl > MAX_TTL {
            return ApplyResult::Refused(format!(
                "a lease's time to live must be 1 to {MAX_TTL} seconds, not {ttl}"
            ));
        }
        if self.leases.len() >= MAX_LEASES {
            return ApplyResult::Refused(format!(
                "the cluster holds {MAX_LEASES} leases, as many as it may: revoke unused ones (kvraft lease list)"
            ));
        }
        self.leases.grant(index, ttl);
        self.lease_events.push(LeaseEvent::Granted { id: index, ttl });
        ApplyResult::LeaseGranted { id: index, ttl }
    }

    /// Ends lease `id` at `index`: every key attached to it is deleted at
    /// that revision. An unknown lease is an error for a revoke, and nothing
    /// for an expiry (the lease went another way first).
    pub(super) fn end_lease(&mut self, index: u64, id: u64, expired: bool) -> Result<ApplyResult, StorageError> {
        let Some(lease) = self.leases.get(id) else {
            return Ok(if expired {
                ApplyResult::LeaseEnded {
                    revision: index,
                    deleted: 0,
                }
            } else {
                ApplyResult::LeaseNotFound(id)
            });
        };
        let keys: Vec<Vec<u8>> = lease.keys.iter().cloned().collect();
        let mut pending = Pending::default();
        let mut deleted = 0;
        for key in keys {
            let looked = self.lookup(&pending, &key)?;
            match &looked.record {
                Some(record) if record.lease == id => {
                    pending.change(index, key, None, looked.previous());
                    deleted += 1;
                }
                // The key moved on without the index following: a bug, but
                // the key is not this lease's to delete.
                other => tracing::error!(
                    lease = id,
                    key = %String::from_utf8_lossy(&key),
                    now = other.as_ref().map_or(0, |r| r.lease),
                    "a key listed under a lease is not attached to it; left alone"
                ),
            }
        }
        self.absorb(pending);
        self.leases.end(id);
        self.lease_events.push(LeaseEvent::Ended { id });
        if expired {
            metrics::counter!(crate::metrics::LEASES_EXPIRED).increment(1);
        }
        Ok(ApplyResult::LeaseEnded {
            revision: index,
            deleted,
        })
    }

    /// Whether this command may attach one more key to `lease`.
    pub(super) fn check_attach(&self, pending: &Pending, lease: u64) -> Result<(), ApplyResult> {
        let Some(held) = self.leases.get(lease) else {
            return Err(ApplyResult::LeaseNotFound(lease));
        };
        if held.keys.len() + pending.attached_to(lease) >= MAX_LEASE_KEYS {
            return Err(ApplyResult::Refused(format!(
                "lease {lease} holds {MAX_LEASE_KEYS} keys, as many as one lease may: use another lease"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{apply_all, in_session, machine, register, set};
    use super::*;
    use crate::proto::{command, Command, LeaseExpire, LeaseGrantRequest, LeaseRevokeRequest, SetRequest};
    use crate::storage::history::Filter;

    fn grant(ttl: u64) -> Command {
        Command {
            op: Some(command::Op::LeaseGrant(LeaseGrantRequest { ttl })),
            ..Default::default()
        }
    }

    fn revoke(id: u64) -> Command {
        Command {
            op: Some(command::Op::LeaseRevoke(LeaseRevokeRequest { id })),
            ..Default::default()
        }
    }

    /// An expiry timed out by the leader of `term` (the tests apply in term 1).
    fn expire_in(id: u64, term: u64) -> Command {
        Command {
            op: Some(command::Op::LeaseExpire(LeaseExpire { id, term })),
            ..Default::default()
        }
    }

    fn expire(id: u64) -> Command {
        expire_in(id, 1)
    }

    fn set_leased(k: &str, v: &str, lease: u64) -> Command {
        Command {
            op: Some(command::Op::Set(SetRequest {
                key: k.into(),
                value: v.into(),
                lease,
            })),
            ..Default::default()
        }
    }

    fn keys_of(sm: &super::super::StateMachine, id: u64) -> Vec<String> {
        let leases = sm.store().working_leases();
        leases.get(id).map_or(Vec::new(), |l| {
            l.keys.iter().map(|k| String::from_utf8(k.clone()).unwrap()).collect()
        })
    }

    #[test]
    fn puts_over_flushed_keys_keep_lease_attachments_right() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = machine(dir.path());
        apply_all(
            &mut sm,
            1,
            vec![grant(10), set_leased("held", "1", 1), set("free", "1")],
            true,
        );
        // Memory holds neither key now. "held" is on a lease, so its put
        // reads the record (to detach it); "free" is on none, so its put to
        // lease 1 attaches it without a read.
        apply_all(&mut sm, 4, vec![set("held", "2"), set_leased("free", "2", 1)], false);
        assert_eq!(keys_of(&sm, 1), ["free"]);
        let free = sm.store().get(b"free").unwrap().unwrap();
        assert_eq!((free.lease, free.create_revision, free.version), (1, 3, 2));
        assert_eq!(sm.store().get(b"held").unwrap().unwrap().lease, 0);
        // Ending the lease deletes the key attached unresolved.
        let ended = apply_all(&mut sm, 6, vec![revoke(1)], false);
        assert_eq!(
            ended,
            [ApplyResult::LeaseEnded {
                revision: 6,
                deleted: 1
            }]
        );
        assert_eq!(sm.store().get(b"free").unwrap(), None);
        assert_eq!(sm.store().len().unwrap(), 1);
        sm.store().flush().unwrap();
        assert_eq!(sm.store().len_as_flushed(), 1);
        assert!(sm.store().working_leases().lease_of(b"free").is_none());
    }

    #[test]
    fn a_revoked_lease_deletes_its_keys_at_one_revision_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = machine(dir.path());
        let granted = apply_all(&mut sm, 1, vec![grant(10), grant(20)], false);
        assert_eq!(
            granted,
            [
                ApplyResult::LeaseGranted { id: 1, ttl: 10 },
                ApplyResult::LeaseGranted { id: 2, ttl: 20 }
            ]
        );
        apply_all(
            &mut sm,
            3,
            vec![
                set_leased("a", "1", 1),
                set_leased("b", "1", 1),
                set_leased("moved", "1", 1),
                set_leased("moved", "2", 2),
                set_leased("detached", "1", 1),
                set("detached", "2"),
                set_leased("deleted", "1", 1),
                Command {
                    op: Some(command::Op::Delete(crate::proto::DeleteRequest {
                        key: b"deleted".to_vec(),
                        range: None,
                    })),
                    ..Default::default()
                },
                set("plain", "1"),
            ],
            false,
        );
        assert_eq!(keys_of(&sm, 1), ["a", "b"]);
        assert_eq!(keys_of(&sm, 2), ["moved"]);
        assert_eq!(sm.store().get(b"a").unwrap().unwrap().lease, 1);
        assert_eq!(
            sm.store().get(b"detached").unwrap().unwrap().lease,
            0,
            "a put without a lease detaches"
        );
        // The state survives a flush and a restart.
        sm.store().flush().unwrap();
        sm.store().close();
        let mut sm = machine(dir.path());
        assert_eq!(keys_of(&sm, 1), ["a", "b"]);

        let ended = apply_all(&mut sm, 12, vec![revoke(1)], false);
        assert_eq!(
            ended,
            [ApplyResult::LeaseEnded {
                revision: 12,
                deleted: 2
            }]
        );
        for gone in ["a", "b"] {
            assert_eq!(sm.get(gone.as_bytes()).unwrap(), None, "{gone}");
        }
        for kept in ["moved", "detached", "plain"] {
            assert!(sm.get(kept.as_bytes()).unwrap().is_some(), "{kept}");
        }
        // Watchers see both deletes, at the revoke's revision.
        let page = sm.store().history(12, &Filter::Range(Default::default())).unwrap();
        let deletes: Vec<(u64, Vec<u8>, bool)> = page
            .events
            .iter()
            .map(|e| (e.revision, e.change.key.clone(), e.change.record.is_none()))
            .collect();
        assert_eq!(deletes, [(12, b"a".to_vec(), true), (12, b"b".to_vec(), true)]);

        // An expiry from a deposed leader, appended in a later term by its
        // successor (which may have renewed the lease), changes nothing.
        let stale = apply_all(&mut sm, 13, vec![expire_in(2, 7)], false);
        assert_eq!(
            stale,
            [ApplyResult::LeaseEnded {
                revision: 13,
                deleted: 0
            }]
        );
        assert_eq!(keys_of(&sm, 2), ["moved"]);
        // Gone: a second revoke, and a put naming it, are refused; an expiry
        // that comes late is nothing.
        let again = apply_all(
            &mut sm,
            14,
            vec![revoke(1), set_leased("late", "1", 1), expire(1), expire(2)],
            false,
        );
        assert_eq!(again[0], ApplyResult::LeaseNotFound(1));
        assert_eq!(again[1], ApplyResult::LeaseNotFound(1));
        assert_eq!(sm.get(b"late").unwrap(), None, "a refused put applies nothing");
        assert_eq!(
            again[2],
            ApplyResult::LeaseEnded {
                revision: 16,
                deleted: 0
            }
        );
        assert_eq!(
            again[3],
            ApplyResult::LeaseEnded {
                revision: 17,
                deleted: 1
            }
        );
        assert_eq!(sm.get(b"moved").unwrap(), None, "expired with lease 2");
        assert!(sm.store().working_leases().is_empty());
        // The file agrees once flushed.
        sm.store().flush().unwrap();
        sm.store().close();
        let sm = machine(dir.path());
        assert!(sm.store().working_leases().is_empty());
        assert_eq!(sm.get(b"detached").unwrap().unwrap(), b"2");
    }

    #[test]
    fn a_transaction_attaches_keys_only_if_it_applies() {
        use crate::proto::{txn_op, DeleteRequest, KeyRange, TxnOp, TxnRequest};
        let dir = tempfile::tempdir().unwrap();
        let mut sm = machine(dir.path());
        apply_all(&mut sm, 1, vec![grant(10)], false);
        let put = |k: &str, lease| TxnOp {
            op: Some(txn_op::Op::Put(SetRequest {
                key: k.into(),
                value: b"v".to_vec(),
                lease,
            })),
        };
        let txn = |success| Command {
            op: Some(command::Op::Txn(TxnRequest {
                compare: vec![],
                success,
                failure: vec![],
            })),
            ..Default::default()
        };
        // Refused part-way (an unknown lease after a good put): nothing of it
        // stays, attachments included.
        let refused = apply_all(&mut sm, 2, vec![txn(vec![put("t1", 1), put("t2", 99)])], false);
        assert_eq!(refused, [ApplyResult::LeaseNotFound(99)]);
        assert!(keys_of(&sm, 1).is_empty());
        assert_eq!(sm.get(b"t1").unwrap(), None);
        let range_delete = TxnOp {
            op: Some(txn_op::Op::Delete(DeleteRequest {
                key: Vec::new(),
                range: Some(KeyRange::prefix(b"x".to_vec())),
            })),
        };
        apply_all(&mut sm, 3, vec![txn(vec![put("t1", 1), range_delete])], false);
        assert_eq!(keys_of(&sm, 1), ["t1"]);
    }

    #[test]
    fn a_retried_grant_or_revoke_answers_as_the_first_did() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = machine(dir.path());
        apply_all(&mut sm, 1, vec![register()], false);
        let first = apply_all(&mut sm, 2, vec![in_session(grant(30), 1, 1, 1)], false);
        // Retried through a node that raises TTLs further: the answer is
        // still the lease as granted.
        let retry = apply_all(&mut sm, 3, vec![in_session(grant(45), 1, 1, 1)], false);
        assert_eq!(first, retry);
        assert_eq!(first, [ApplyResult::LeaseGranted { id: 2, ttl: 30 }]);
        assert_eq!(sm.store().working_leases().len(), 1, "granted once");
        apply_all(&mut sm, 4, vec![set_leased("k", "v", 2)], false);
        let first = apply_all(&mut sm, 5, vec![in_session(revoke(2), 1, 2, 1)], false);
        let retry = apply_all(&mut sm, 6, vec![in_session(revoke(2), 1, 2, 1)], false);
        assert_eq!(
            first,
            [ApplyResult::LeaseEnded {
                revision: 5,
                deleted: 1
            }]
        );
        assert_eq!(retry, first, "not \"lease not found\"");
    }

    #[test]
    fn grants_out_of_range_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = machine(dir.path());
        let refused = apply_all(&mut sm, 1, vec![grant(0), grant(MAX_TTL + 1)], false);
        assert!(refused
            .iter()
            .all(|r| matches!(r, ApplyResult::Refused(why) if why.contains("time to live"))));
        assert!(sm.store().working_leases().is_empty());
    }
}

//! The lease tables of the state store (see `crate::leases` for what they
//! hold and why the raft loop keeps them in memory too):
//!
//! ```text
//! leases     lease id (8 bytes BE)           -> LeaseRecord
//! lease_keys lease id (8 bytes BE) + user key -> (empty)
//! ```

use prost::Message as _;
use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};

use super::StorageError;
use crate::leases::{split_lease_key, LeaseDelta, Leases};
use crate::proto::LeaseRecord;

pub(super) const LEASES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("leases");
pub(super) const LEASE_KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("lease_keys");

/// Writes a batch of lease changes into `txn`.
pub(super) fn write_delta(txn: &WriteTransaction, delta: &LeaseDelta) -> Result<(), StorageError> {
    if delta.is_empty() {
        return Ok(());
    }
    let mut leases = txn.open_table(LEASES)?;
    for (id, ttl) in &delta.leases {
        match ttl {
            Some(ttl) => {
                let record = LeaseRecord { id: *id, ttl: *ttl };
                leases.insert(&id.to_be_bytes()[..], record.encode_to_vec().as_slice())?;
            }
            None => {
                leases.remove(&id.to_be_bytes()[..])?;
            }
        }
    }
    let mut keys = txn.open_table(LEASE_KEYS)?;
    for (key, attached) in &delta.keys {
        if *attached {
            keys.insert(key.as_slice(), &[][..])?;
        } else {
            keys.remove(key.as_slice())?;
        }
    }
    Ok(())
}

/// Every lease and attachment in the file.
pub(super) fn load(txn: &ReadTransaction) -> Result<Leases, StorageError> {
    let damaged = |what: &str| StorageError::Corrupt(format!("state store: {what}: state.redb is damaged"));
    let mut leases = Vec::new();
    match txn.open_table(LEASES) {
        Ok(table) => {
            for item in table.iter()? {
                let (_, value) = item?;
                let record = LeaseRecord::decode(value.value())
                    .map_err(|e| damaged(&format!("a lease record does not decode ({e})")))?;
                leases.push((record.id, record.ttl));
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let mut keys = Vec::new();
    match txn.open_table(LEASE_KEYS) {
        Ok(table) => {
            for item in table.iter()? {
                let (key, _) = item?;
                let (id, key) = split_lease_key(key.value()).ok_or_else(|| damaged("a lease key is too short"))?;
                keys.push((id, key.to_vec()));
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Leases::load(leases, keys))
}

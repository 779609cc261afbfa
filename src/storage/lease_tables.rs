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
use crate::leases::{split_lease_key, LeaseDelta, Leases, MAX_TTL};
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
                if record.ttl == 0 || record.ttl > MAX_TTL {
                    return Err(damaged(&format!(
                        "lease {} has a time to live of {} s, outside 1 to {MAX_TTL}",
                        record.id, record.ttl
                    )));
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StateStore;

    #[test]
    fn a_lease_record_out_of_range_is_damage_not_a_timer_that_overflows() {
        let dir = tempfile::tempdir().unwrap();
        StateStore::open(dir.path(), 1 << 20).unwrap().close();
        {
            let db = redb::Database::open(StateStore::path_in(dir.path())).unwrap();
            let txn = db.begin_write().unwrap();
            let record = LeaseRecord { id: 9, ttl: u64::MAX };
            txn.open_table(LEASES)
                .unwrap()
                .insert(&9u64.to_be_bytes()[..], record.encode_to_vec().as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let err = StateStore::open(dir.path(), 1 << 20).unwrap_err().to_string();
        assert!(
            err.contains("lease 9 has a time to live") && err.contains("damaged"),
            "{err}"
        );
    }
}

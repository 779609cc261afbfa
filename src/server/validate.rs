//! Checks a request before it reaches raft: a request refused here changes
//! nothing, and its error says what to fix.

use std::collections::BTreeSet;

use super::Limits;
use crate::error::WireError;
use crate::proto::{compare, txn_op, Compare, DeleteRequest, KeyRange, SetRequest, TxnOp, TxnRequest};

/// At most this many compares, and this many operations per branch, in one
/// transaction (etcd's default `--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;

/// A key: not empty, not over `--max-key-size`.
pub fn key(key: &[u8], limits: Limits) -> Result<(), WireError> {
    if key.is_empty() {
        return Err(WireError::invalid("the key is empty; keys must be at least one byte"));
    }
    if key.len() > limits.max_key_size {
        return Err(WireError::invalid(format!(
            "the key is {} bytes, over the limit of {} bytes (--max-key-size)",
            key.len(),
            limits.max_key_size
        )));
    }
    Ok(())
}

/// A set: its key, and a value not over `--max-value-size`.
pub fn set(set: &SetRequest, limits: Limits) -> Result<(), WireError> {
    key(&set.key, limits)?;
    if set.value.len() > limits.max_value_size {
        return Err(WireError::invalid(format!(
            "the value is {} bytes, over the limit of {} bytes (--max-value-size)",
            set.value.len(),
            limits.max_value_size
        )));
    }
    Ok(())
}

/// A lease's time to live (seconds): at least 1, at most a year (it is
/// raised to the cluster's minimum when proposed).
pub fn lease_ttl(ttl: u64) -> Result<(), WireError> {
    if ttl == 0 || ttl > crate::leases::MAX_TTL {
        return Err(WireError::invalid(format!(
            "a lease's time to live must be 1 to {} seconds, not {ttl}",
            crate::leases::MAX_TTL
        )));
    }
    Ok(())
}

/// A lease id: never 0 (0 means "no lease").
pub fn lease_id(id: u64) -> Result<(), WireError> {
    if id == 0 {
        return Err(WireError::invalid(
            "lease id 0 means no lease; give the id `lease grant` printed",
        ));
    }
    Ok(())
}

/// A range: `to`, when given, sorts after `from`.
pub fn range(from: &[u8], to: &[u8]) -> Result<(), WireError> {
    if !to.is_empty() && to <= from {
        return Err(WireError::invalid(
            "the range's end (to) must sort after its start (from)",
        ));
    }
    Ok(())
}

/// A delete: of one key, or of a range (not both).
pub fn delete(delete: &DeleteRequest, limits: Limits) -> Result<(), WireError> {
    match &delete.range {
        Some(_) if !delete.key.is_empty() => {
            Err(WireError::invalid("a delete names either a key or a range, not both"))
        }
        Some(r) => range(&r.from, &r.to),
        None => key(&delete.key, limits),
    }
}

/// A transaction: known compare targets and operators, well-formed
/// operations, each key written at most once per branch.
pub fn txn(txn: &TxnRequest, limits: Limits) -> Result<(), WireError> {
    if txn.compare.len() > MAX_TXN_OPS {
        return Err(WireError::invalid(format!(
            "the transaction has {} compares, over the limit of {MAX_TXN_OPS}",
            txn.compare.len()
        )));
    }
    for (i, c) in txn.compare.iter().enumerate() {
        compare_clause(c, limits).map_err(|e| WireError::invalid(format!("compare {}: {}", i + 1, e.message)))?;
    }
    for (name, ops) in [("success", &txn.success), ("failure", &txn.failure)] {
        branch(ops, limits).map_err(|e| WireError::invalid(format!("{name} branch: {}", e.message)))?;
    }
    Ok(())
}

fn compare_clause(c: &Compare, limits: Limits) -> Result<(), WireError> {
    key(&c.key, limits)?;
    if compare::Target::try_from(c.target).is_err() || c.target == compare::Target::Unspecified as i32 {
        return Err(WireError::invalid(format!(
            "unknown compare target {}; use value, version, create_revision, mod_revision or lease",
            c.target
        )));
    }
    if compare::Op::try_from(c.op).is_err() || c.op == compare::Op::Unspecified as i32 {
        return Err(WireError::invalid(format!(
            "unknown compare operator {}; use =, !=, < or >",
            c.op
        )));
    }
    Ok(())
}

/// One branch: at most [`MAX_TXN_OPS`] operations, each well-formed, and no
/// key written twice (a put and a delete of it, or a put inside a deleted
/// range, included), so each write of the branch is one change of one key.
fn branch(ops: &[TxnOp], limits: Limits) -> Result<(), WireError> {
    use txn_op::Op;
    if ops.len() > MAX_TXN_OPS {
        return Err(WireError::invalid(format!(
            "{} operations, over the limit of {MAX_TXN_OPS}",
            ops.len()
        )));
    }
    let mut written: BTreeSet<&[u8]> = BTreeSet::new();
    let mut deleted_ranges: Vec<&KeyRange> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let at = |e: WireError| WireError::invalid(format!("operation {}: {}", i + 1, e.message));
        match &op.op {
            None => {
                return Err(at(WireError::invalid(
                    "no operation set; use put, delete, get or range",
                )))
            }
            Some(Op::Get(get)) => key(&get.key, limits).map_err(at)?,
            Some(Op::Range(scan)) => range(&scan.from, &scan.to).map_err(at)?,
            Some(Op::Put(put)) => {
                set(put, limits).map_err(at)?;
                if !written.insert(&put.key) {
                    return Err(at(twice(&put.key)));
                }
            }
            Some(Op::Delete(d)) => {
                delete(d, limits).map_err(at)?;
                match &d.range {
                    Some(r) => deleted_ranges.push(r),
                    None if !written.insert(&d.key) => return Err(at(twice(&d.key))),
                    None => {}
                }
            }
        }
    }
    for r in deleted_ranges {
        if let Some(k) = written.iter().find(|k| r.contains(k)) {
            return Err(WireError::invalid(format!(
                "{:?} is written and also in a deleted range; write each key at most once per branch",
                String::from_utf8_lossy(k)
            )));
        }
    }
    Ok(())
}

fn twice(key: &[u8]) -> WireError {
    WireError::invalid(format!(
        "{:?} is written twice; write each key at most once per branch",
        String::from_utf8_lossy(key)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{GetRequest, ScanRequest};
    use std::time::Duration;

    fn limits() -> Limits {
        Limits {
            max_frame_size: 1 << 20,
            max_key_size: 16,
            max_value_size: 32,
            max_connections: 1,
            idle_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
            max_partial_frame_bytes: 1 << 20,
        }
    }

    fn put(k: &str) -> TxnOp {
        TxnOp {
            op: Some(txn_op::Op::Put(SetRequest {
                key: k.into(),
                value: b"v".to_vec(),
                lease: 0,
            })),
        }
    }

    fn delete_prefix(p: &str) -> TxnOp {
        TxnOp {
            op: Some(txn_op::Op::Delete(DeleteRequest {
                key: vec![],
                range: Some(KeyRange {
                    prefix: p.into(),
                    ..Default::default()
                }),
            })),
        }
    }

    fn error(t: &TxnRequest) -> String {
        txn(t, limits()).unwrap_err().message
    }

    #[test]
    fn a_transaction_is_refused_with_what_to_fix() {
        let ok = TxnRequest {
            compare: vec![Compare {
                key: b"k".to_vec(),
                target: compare::Target::Version as i32,
                op: compare::Op::Equal as i32,
                ..Default::default()
            }],
            success: vec![
                put("a"),
                put("b"),
                TxnOp {
                    op: Some(txn_op::Op::Get(GetRequest {
                        key: b"a".to_vec(),
                        serializable: false,
                    })),
                },
                TxnOp {
                    op: Some(txn_op::Op::Range(ScanRequest::default())),
                },
                delete_prefix("c/"),
            ],
            failure: vec![put("a")],
        };
        txn(&ok, limits()).unwrap();

        let mut unknown_target = ok.clone();
        unknown_target.compare[0].target = 99;
        assert!(error(&unknown_target).contains("compare 1: unknown compare target 99"));
        let mut no_op = ok.clone();
        no_op.compare[0].op = 0;
        assert!(error(&no_op).contains("unknown compare operator"));
        let mut twice = ok.clone();
        twice.success.push(put("b"));
        assert!(error(&twice).contains("success branch: operation 6: \"b\" is written twice"));
        let mut in_deleted = ok.clone();
        in_deleted.failure.extend([put("c/1"), delete_prefix("c")]);
        assert!(error(&in_deleted).contains("failure branch: \"c/1\" is written and also in a deleted range"));
        let mut big = ok.clone();
        big.success[0] = TxnOp {
            op: Some(txn_op::Op::Put(SetRequest {
                key: b"a".to_vec(),
                value: vec![0; 33],
                lease: 0,
            })),
        };
        assert!(error(&big).contains("operation 1: the value is 33 bytes"));
        let mut empty = ok.clone();
        empty.success.push(TxnOp { op: None });
        assert!(error(&empty).contains("no operation set"));
        let mut many = ok;
        many.failure = (0..=MAX_TXN_OPS).map(|i| put(&i.to_string())).collect();
        assert!(error(&many).contains("129 operations, over the limit of 128"));
    }

    #[test]
    fn ranges_and_deletes() {
        assert!(range(b"b", b"a").is_err());
        assert!(range(b"a", b"b").is_ok());
        let both = DeleteRequest {
            key: b"k".to_vec(),
            range: Some(KeyRange::default()),
        };
        assert!(delete(&both, limits()).unwrap_err().message.contains("not both"));
    }
}

//! Building transactions: constructors for compares and operations, and
//! compare-and-swap on top of them.
//!
//! ```no_run
//! # async fn demo(client: kvraft::Client) -> Result<(), kvraft::Error> {
//! use kvraft::proto::{Compare, TxnOp, TxnRequest};
//! use kvraft::CompareOp;
//! // Take a lock if nobody holds it; else learn who does.
//! let answer = client
//!     .txn(TxnRequest {
//!         compare: vec![Compare::version("lock", CompareOp::Equal, 0)],
//!         success: vec![TxnOp::put("lock", "me")],
//!         failure: vec![TxnOp::get("lock")],
//!     })
//!     .await?;
//! println!("took it: {}", answer.succeeded);
//! # Ok(()) }
//! ```

use crate::proto::{
    compare, txn_op, Compare, DeleteRequest, GetRequest, KeyRange, KeyValue, ScanRequest, SetRequest, TxnOp,
};

/// A compare's operator: `=`, `!=`, `<` or `>`.
pub use crate::proto::compare::Op as CompareOp;

impl CompareOp {
    /// Reads `=`, `!=`, `<` or `>` (also `==`).
    pub fn parse(s: &str) -> Option<CompareOp> {
        Some(match s {
            "=" | "==" => CompareOp::Equal,
            "!=" => CompareOp::NotEqual,
            "<" => CompareOp::Less,
            ">" => CompareOp::Greater,
            _ => return None,
        })
    }
}

impl Compare {
    fn number(key: impl Into<Vec<u8>>, target: compare::Target, op: CompareOp, number: u64) -> Compare {
        Compare {
            key: key.into(),
            target: target as i32,
            op: op as i32,
            value: Vec::new(),
            number,
        }
    }

    /// The key's value against `value`, as bytes (fails for an absent key).
    pub fn value(key: impl Into<Vec<u8>>, op: CompareOp, value: impl Into<Vec<u8>>) -> Compare {
        Compare {
            key: key.into(),
            target: compare::Target::Value as i32,
            op: op as i32,
            value: value.into(),
            number: 0,
        }
    }

    /// The key's version: writes since it was created (0: absent).
    pub fn version(key: impl Into<Vec<u8>>, op: CompareOp, version: u64) -> Compare {
        Compare::number(key, compare::Target::Version, op, version)
    }

    /// The revision that created the key (0: absent).
    pub fn create_revision(key: impl Into<Vec<u8>>, op: CompareOp, revision: u64) -> Compare {
        Compare::number(key, compare::Target::CreateRevision, op, revision)
    }

    /// The revision of the key's last change (0: absent).
    pub fn mod_revision(key: impl Into<Vec<u8>>, op: CompareOp, revision: u64) -> Compare {
        Compare::number(key, compare::Target::ModRevision, op, revision)
    }

    /// The lease the key is attached to (0: none).
    pub fn lease(key: impl Into<Vec<u8>>, op: CompareOp, lease: u64) -> Compare {
        Compare::number(key, compare::Target::Lease, op, lease)
    }
}

impl TxnOp {
    /// Sets `key` to `value`.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> TxnOp {
        TxnOp::put_with_lease(key, value, 0)
    }

    /// Sets `key` to `value`, attached to lease `lease` (0: none).
    pub fn put_with_lease(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>, lease: u64) -> TxnOp {
        TxnOp {
            op: Some(txn_op::Op::Put(SetRequest {
                key: key.into(),
                value: value.into(),
                lease,
            })),
        }
    }

    /// Deletes `key`.
    pub fn delete(key: impl Into<Vec<u8>>) -> TxnOp {
        TxnOp {
            op: Some(txn_op::Op::Delete(DeleteRequest {
                key: key.into(),
                range: None,
            })),
        }
    }

    /// Deletes every key in `range`.
    pub fn delete_range(range: KeyRange) -> TxnOp {
        TxnOp {
            op: Some(txn_op::Op::Delete(DeleteRequest {
                key: Vec::new(),
                range: Some(range),
            })),
        }
    }

    /// Reads `key`.
    pub fn get(key: impl Into<Vec<u8>>) -> TxnOp {
        TxnOp {
            op: Some(txn_op::Op::Get(GetRequest {
                key: key.into(),
                serializable: false,
            })),
        }
    }

    /// Reads the keys in `range`, at most `limit` (0: as many as fit).
    pub fn range(range: KeyRange, limit: u64) -> TxnOp {
        TxnOp {
            op: Some(txn_op::Op::Range(ScanRequest {
                prefix: range.prefix,
                from: range.from,
                to: range.to,
                limit,
                serializable: false,
            })),
        }
    }
}

/// What a compare-and-swap expects of the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// This value.
    Value(Vec<u8>),
    /// This version (writes since creation).
    Version(u64),
    /// This revision of its last change.
    ModRevision(u64),
    /// That the key does not exist.
    Absent,
}

impl Expect {
    /// The compare that checks it on `key`.
    pub fn compare(&self, key: &[u8]) -> Compare {
        match self {
            Expect::Value(v) => Compare::value(key, CompareOp::Equal, v.clone()),
            Expect::Version(v) => Compare::version(key, CompareOp::Equal, *v),
            Expect::ModRevision(r) => Compare::mod_revision(key, CompareOp::Equal, *r),
            Expect::Absent => Compare::version(key, CompareOp::Equal, 0),
        }
    }
}

/// How a compare-and-swap ended.
#[derive(Debug, Clone, PartialEq)]
pub enum CasOutcome {
    /// The key held what was expected and now holds the new value.
    Swapped {
        /// The revision of the swap.
        revision: u64,
    },
    /// It did not; nothing changed. The key as it was (`None`: absent).
    Failed {
        /// The key's record when the swap was tried (read again just after,
        /// in the rare case of a retried swap whose large value the session
        /// did not keep).
        current: Option<KeyValue>,
    },
}

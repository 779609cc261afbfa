//! Methods on the wire types that the client, the server and the state
//! machine share, so each rule (what a range holds, whether a transaction
//! writes, how a record becomes a pair) is written once.

use crate::proto::{txn_op, GetResponse, KeyRange, KeyValue, StoredValue, TxnRequest};

impl KeyRange {
    /// Every key that starts with `prefix` (empty: every key).
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> KeyRange {
        KeyRange {
            prefix: prefix.into(),
            ..Default::default()
        }
    }

    /// Keys in `[from, to)` (an empty `to`: no upper bound).
    pub fn between(from: impl Into<Vec<u8>>, to: impl Into<Vec<u8>>) -> KeyRange {
        KeyRange {
            prefix: Vec::new(),
            from: from.into(),
            to: to.into(),
        }
    }

    /// The smallest key the range can hold: `from` or `prefix`, the larger.
    pub fn start(&self) -> &[u8] {
        if self.from > self.prefix {
            &self.from
        } else {
            &self.prefix
        }
    }

    /// Whether `key` is in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        key.starts_with(&self.prefix) && key >= self.from.as_slice() && (self.to.is_empty() || key < self.to.as_slice())
    }

    /// Whether no key can ever be in the range (its prefix and from/to do
    /// not overlap).
    pub fn holds_no_key(&self) -> bool {
        let start = self.start();
        !start.starts_with(&self.prefix) || (!self.to.is_empty() && start >= self.to.as_slice())
    }
}

impl TxnRequest {
    /// Whether either branch may write (has a put or a delete).
    pub fn writes(&self) -> bool {
        self.success
            .iter()
            .chain(&self.failure)
            .any(|op| matches!(op.op, Some(txn_op::Op::Put(_)) | Some(txn_op::Op::Delete(_))))
    }
}

impl StoredValue {
    /// The pair a scan, a transaction or a watch reports for `key`.
    pub fn into_key_value(self, key: Vec<u8>) -> KeyValue {
        KeyValue {
            key,
            value: self.value.into(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            lease: self.lease,
        }
    }
}

impl GetResponse {
    /// The pair a get found for `key` (`None`: not found).
    pub fn into_key_value(self, key: Vec<u8>) -> Option<KeyValue> {
        self.found.then_some(KeyValue {
            key,
            value: self.value,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            lease: self.lease,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_hold_what_their_prefix_and_bounds_allow() {
        let r = KeyRange {
            prefix: b"a/".to_vec(),
            from: b"a/b".to_vec(),
            to: b"a/d".to_vec(),
        };
        assert_eq!(r.start(), b"a/b");
        assert!(r.contains(b"a/c"));
        assert!(!r.contains(b"a/a") && !r.contains(b"a/d") && !r.contains(b"b"));
        assert!(!r.holds_no_key());
        assert!(KeyRange {
            prefix: b"a/".to_vec(),
            from: b"b".to_vec(),
            to: vec![]
        }
        .holds_no_key());
        assert!(KeyRange::between("b", "b").holds_no_key());
        assert!(!KeyRange::prefix("").holds_no_key());
    }
}

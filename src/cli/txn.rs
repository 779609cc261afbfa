//! `kvraft cas` and `kvraft txn`: compare-and-swap, and transactions read as
//! JSON from stdin (the format is in the README, "Transactions").

use serde::Deserialize;
use serde_json::{json, Value};

use super::output::{record_json, text};
use super::{OutputFormat, Printer};
use crate::client::{CasOutcome, CompareOp};
use crate::error::Error;
use crate::proto::{txn_op, txn_op_result, Compare, KeyRange, TxnOp, TxnRequest, TxnResponse};

/// The exit status of a compare that did not hold (`cas`, and a `txn` that
/// ran its failure branch).
pub const COMPARE_FAILED: i32 = 4;

/// A transaction as written on stdin.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TxnJson {
    #[serde(default)]
    compare: Vec<CompareJson>,
    #[serde(default)]
    success: Vec<OpJson>,
    #[serde(default)]
    failure: Vec<OpJson>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompareJson {
    key: String,
    target: String,
    op: String,
    value: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum OpJson {
    Put {
        key: String,
        value: String,
        #[serde(default)]
        lease: u64,
    },
    Get {
        key: String,
    },
    Delete {
        key: Option<String>,
        prefix: Option<String>,
        from: Option<String>,
        to: Option<String>,
    },
    Range {
        #[serde(default)]
        prefix: String,
        #[serde(default)]
        from: String,
        #[serde(default)]
        to: String,
        #[serde(default)]
        limit: u64,
    },
}

/// Reads a transaction from JSON (see the README for the format).
pub fn parse(input: &str) -> Result<TxnRequest, Error> {
    let bad = |what: String| Error::InvalidArgument(format!("the transaction on stdin: {what}"));
    let txn: TxnJson = serde_json::from_str(input).map_err(|e| bad(e.to_string()))?;
    let compare = txn
        .compare
        .into_iter()
        .enumerate()
        .map(|(i, c)| compare_of(c).map_err(|e| bad(format!("compare {}: {e}", i + 1))))
        .collect::<Result<_, _>>()?;
    let branch = |name: &str, ops: Vec<OpJson>| -> Result<Vec<TxnOp>, Error> {
        ops.into_iter()
            .enumerate()
            .map(|(i, op)| op_of(op).map_err(|e| bad(format!("{name} operation {}: {e}", i + 1))))
            .collect()
    };
    Ok(TxnRequest {
        compare,
        success: branch("success", txn.success)?,
        failure: branch("failure", txn.failure)?,
    })
}

fn compare_of(c: CompareJson) -> Result<Compare, String> {
    let op = CompareOp::parse(&c.op).ok_or_else(|| format!("unknown op {:?}; use =, !=, < or >", c.op))?;
    let number = || {
        c.value
            .as_u64()
            .ok_or_else(|| format!("{} compares with a whole number, not {}", c.target, c.value))
    };
    Ok(match c.target.as_str() {
        "value" => {
            let value = c
                .value
                .as_str()
                .ok_or_else(|| format!("value compares with a string, not {}", c.value))?;
            Compare::value(c.key, op, value)
        }
        "version" => Compare::version(c.key, op, number()?),
        "create_revision" => Compare::create_revision(c.key, op, number()?),
        "mod_revision" => Compare::mod_revision(c.key, op, number()?),
        "lease" => Compare::lease(c.key, op, number()?),
        other => {
            return Err(format!(
                "unknown target {other:?}; use value, version, create_revision, mod_revision or lease"
            ))
        }
    })
}

fn op_of(op: OpJson) -> Result<TxnOp, String> {
    Ok(match op {
        OpJson::Put { key, value, lease } => TxnOp::put_with_lease(key, value, lease),
        OpJson::Get { key } => TxnOp::get(key),
        OpJson::Delete {
            key: Some(key),
            prefix: None,
            from: None,
            to: None,
        } => TxnOp::delete(key),
        OpJson::Delete { key: Some(_), .. } => {
            return Err("a delete names a key or a range (prefix, from, to), not both".into())
        }
        OpJson::Delete {
            key: None,
            prefix: None,
            from: None,
            to: None,
        } => return Err("a delete needs a key, or a range: prefix, from, to".into()),
        OpJson::Delete {
            key: None,
            prefix,
            from,
            to,
        } => TxnOp::delete_range(KeyRange {
            prefix: prefix.unwrap_or_default().into_bytes(),
            from: from.unwrap_or_default().into_bytes(),
            to: to.unwrap_or_default().into_bytes(),
        }),
        OpJson::Range {
            prefix,
            from,
            to,
            limit,
        } => TxnOp::range(
            KeyRange {
                prefix: prefix.into_bytes(),
                from: from.into_bytes(),
                to: to.into_bytes(),
            },
            limit,
        ),
    })
}

/// The key (or range) an operation names, for the text output.
fn op_key(op: &TxnOp) -> String {
    use txn_op::Op;
    match &op.op {
        Some(Op::Put(p)) => text(&p.key),
        Some(Op::Get(g)) => text(&g.key),
        Some(Op::Delete(d)) => text(&d.key),
        Some(Op::Range(_)) | None => String::new(),
    }
}

/// Prints a transaction's answer: per operation of the branch that ran.
pub fn print(printer: &Printer, ops: &[TxnOp], answer: &TxnResponse) {
    use txn_op_result::Result as R;
    let results: Vec<Value> = answer
        .results
        .iter()
        .zip(ops)
        .map(|(r, op)| match &r.result {
            Some(R::Put(p)) => json!({"put": {"key": op_key(op), "revision": p.revision}}),
            Some(R::Delete(d)) => json!({"delete": {"deleted": d.existed, "count": d.deleted, "revision": d.revision}}),
            Some(R::Get(g)) => {
                let j = match g.clone().into_key_value(op_key(op).into_bytes()) {
                    Some(kv) => {
                        let mut j = record_json(&kv);
                        j["found"] = json!(true);
                        j
                    }
                    None => json!({"key": op_key(op), "found": false}),
                };
                json!({ "get": j })
            }
            Some(R::Range(s)) => {
                json!({"range": {"kvs": s.pairs.iter().map(record_json).collect::<Vec<_>>(), "more": s.more}})
            }
            None => Value::Null,
        })
        .collect();
    let json = json!({
        "succeeded": answer.succeeded,
        "revision": answer.revision,
        "results": results,
        "reads_omitted": answer.reads_omitted,
    });
    printer.emit(json, || {
        let mut lines = vec![format!(
            "{} (revision {})",
            if answer.succeeded { "SUCCEEDED" } else { "FAILED" },
            answer.revision
        )];
        for (r, op) in answer.results.iter().zip(ops) {
            match &r.result {
                Some(R::Put(_)) => lines.push("OK".into()),
                Some(R::Delete(d)) => lines.push(format!("deleted {}", d.deleted)),
                Some(R::Get(g)) if g.found => lines.push(format!("{}\t{}", op_key(op), text(&g.value))),
                Some(R::Get(_)) => lines.push(format!("{} not found", op_key(op))),
                Some(R::Range(s)) => {
                    lines.extend(
                        s.pairs
                            .iter()
                            .map(|kv| format!("{}\t{}", text(&kv.key), text(&kv.value))),
                    );
                    if s.more {
                        lines.push("(more keys match; narrow the range or page with from)".into());
                    }
                }
                None => lines.push("(read left out: this answer is a retry's)".into()),
            }
        }
        lines.join("\n")
    });
}

/// Prints a compare-and-swap's outcome; returns the exit status.
pub fn print_cas(printer: &Printer, key: &str, outcome: &CasOutcome) -> i32 {
    match outcome {
        CasOutcome::Swapped { revision } => {
            printer.emit(json!({"swapped": true, "key": key, "revision": revision}), || {
                "OK".into()
            });
            0
        }
        CasOutcome::Failed { current } => {
            let json = json!({"swapped": false, "key": key, "current": current.as_ref().map(record_json)});
            printer.emit(json, || match current {
                Some(kv) => format!(
                    "FAILED: {key:?} is {:?} (version {}, mod_revision {})",
                    text(&kv.value),
                    kv.version,
                    kv.mod_revision
                ),
                None => format!("FAILED: {key:?} does not exist"),
            });
            if printer.format() == OutputFormat::Text {
                eprintln!("kvraft: the comparison failed; nothing was changed");
            }
            COMPARE_FAILED
        }
    }
}

/// The branch of `txn` that produced `answer`.
pub fn branch_ran<'a>(txn: &'a TxnRequest, answer: &TxnResponse) -> &'a [TxnOp] {
    if answer.succeeded {
        &txn.success
    } else {
        &txn.failure
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_documented_format() {
        let txn = parse(
            r#"{
              "compare": [
                {"key": "config", "target": "mod_revision", "op": "<", "value": 40},
                {"key": "owner", "target": "value", "op": "!=", "value": "me"}
              ],
              "success": [
                {"put": {"key": "config", "value": "v2"}},
                {"delete": {"key": "old"}},
                {"delete": {"prefix": "tmp/"}},
                {"get": {"key": "config"}},
                {"range": {"prefix": "svc/", "limit": 10}}
              ],
              "failure": [{"get": {"key": "config"}}]
            }"#,
        )
        .unwrap();
        assert_eq!(txn.compare[0], Compare::mod_revision("config", CompareOp::Less, 40));
        assert_eq!(txn.compare[1], Compare::value("owner", CompareOp::NotEqual, "me"));
        assert_eq!(txn.success[2], TxnOp::delete_range(KeyRange::prefix("tmp/")));
        assert_eq!(txn.success[4], TxnOp::range(KeyRange::prefix("svc/"), 10));
        assert_eq!(txn.failure, [TxnOp::get("config")]);
        assert_eq!(parse("{}").unwrap(), TxnRequest::default());
    }

    #[test]
    fn says_what_is_wrong() {
        let error = |s: &str| parse(s).unwrap_err().to_string();
        assert!(
            error(r#"{"compare": [{"key": "k", "target": "colour", "op": "=", "value": 1}]}"#)
                .contains("compare 1: unknown target \"colour\"; use value, version")
        );
        assert!(
            error(r#"{"compare": [{"key": "k", "target": "version", "op": "~", "value": 1}]}"#)
                .contains("unknown op \"~\"")
        );
        assert!(
            error(r#"{"compare": [{"key": "k", "target": "version", "op": "=", "value": "x"}]}"#)
                .contains("version compares with a whole number")
        );
        assert!(error(r#"{"success": [{"putt": {"key": "k"}}]}"#).contains("unknown variant `putt`"));
        assert!(error(r#"{"failure": [{"delete": {}}]}"#).contains("failure operation 1: a delete needs a key"));
        assert!(error(r#"{"succes": []}"#).contains("unknown field `succes`"));
        assert!(error("not json").contains("the transaction on stdin"));
    }
}

//! Where `kvraft set` takes its value from: the argument, stdin (`-`) or a
//! file (`--value-file`). Stdin and files are read as bytes, so binary values
//! and values too large for the shell's argument limit round-trip.

use std::io::Read;
use std::path::Path;

use crate::error::Error;
use crate::storage::snapshot_stream::MAX_FRAME;

/// No server takes a value this large (a key and its value must fit one
/// snapshot frame), so reading stops here instead of filling memory with a
/// file that would be refused anyway.
const READ_LIMIT: usize = MAX_FRAME;

/// Which server limit a value over [`READ_LIMIT`] passes.
const VALUE_LIMIT: &str = "(max_value_size, 1 MiB by default)";

/// The value to set: `value` itself, stdin when it is `-`, or the file.
pub fn read(value: Option<&str>, file: Option<&Path>) -> Result<Vec<u8>, Error> {
    match (value, file) {
        (Some("-"), None) => bounded(std::io::stdin().lock(), "the value from stdin", VALUE_LIMIT),
        (Some(value), None) => Ok(value.as_bytes().to_vec()),
        (None, Some(path)) => {
            let file = std::fs::File::open(path)
                .map_err(|e| Error::InvalidArgument(format!("can't read the value file {}: {e}", path.display())))?;
            bounded(file, &format!("the value from {}", path.display()), VALUE_LIMIT)
        }
        // clap enforces exactly one of them; this keeps the library honest.
        _ => Err(Error::InvalidArgument(
            "give the value as an argument, `-` for stdin, or --value-file PATH (exactly one)".into(),
        )),
    }
}

/// A transaction from stdin, as text; no server takes one over
/// [`READ_LIMIT`] (the default frame limit is smaller still).
pub fn read_transaction() -> Result<String, Error> {
    let bytes = bounded(std::io::stdin().lock(), "the transaction on stdin", "in one request")?;
    String::from_utf8(bytes)
        .map_err(|_| Error::InvalidArgument("the transaction on stdin is not UTF-8 text; send JSON".into()))
}

/// Reads all of `source` (`what` names it in errors), refusing more than
/// [`READ_LIMIT`] bytes, which no server takes (`limit` says which of its
/// limits).
fn bounded(source: impl Read, what: &str, limit: &str) -> Result<Vec<u8>, Error> {
    let mut value = Vec::new();
    source
        .take(READ_LIMIT as u64 + 1)
        .read_to_end(&mut value)
        .map_err(|e| Error::InvalidArgument(format!("can't read {what}: {e}")))?;
    if value.len() > READ_LIMIT {
        return Err(Error::InvalidArgument(format!(
            "{what} is over {} MiB, more than any kvraft server accepts {limit}",
            READ_LIMIT >> 20
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_argument_a_file_or_refuses_what_no_server_takes() {
        assert_eq!(read(Some("v"), None).unwrap(), b"v");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("value");
        let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        std::fs::write(&path, &binary).unwrap();
        assert_eq!(read(None, Some(&path)).unwrap(), binary);

        let missing = read(None, Some(&dir.path().join("nope"))).unwrap_err().to_string();
        assert!(
            missing.contains("can't read the value file") && missing.contains("nope"),
            "{missing}"
        );

        let huge = bounded(
            std::io::repeat(7).take(READ_LIMIT as u64 + 10),
            "the value from stdin",
            VALUE_LIMIT,
        )
        .unwrap_err()
        .to_string();
        assert!(huge.contains("more than any kvraft server accepts"), "{huge}");
        assert_eq!(
            bounded(&[1u8, 2, 3][..], "the value from stdin", VALUE_LIMIT).unwrap(),
            [1, 2, 3]
        );
    }
}

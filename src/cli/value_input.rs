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

/// The value to set: `value` itself, stdin when it is `-`, or the file.
pub fn read(value: Option<&str>, file: Option<&Path>) -> Result<Vec<u8>, Error> {
    match (value, file) {
        (Some("-"), None) => bounded(std::io::stdin().lock(), "stdin"),
        (Some(value), None) => Ok(value.as_bytes().to_vec()),
        (None, Some(path)) => {
            let file = std::fs::File::open(path)
                .map_err(|e| Error::InvalidArgument(format!("can't read the value file {}: {e}", path.display())))?;
            bounded(file, &path.display().to_string())
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
    let mut text = String::new();
    std::io::stdin()
        .lock()
        .take(READ_LIMIT as u64 + 1)
        .read_to_string(&mut text)
        .map_err(|e| Error::InvalidArgument(format!("can't read the transaction from stdin (UTF-8 JSON): {e}")))?;
    if text.len() > READ_LIMIT {
        return Err(Error::InvalidArgument(format!(
            "the transaction on stdin is over {} MiB, more than any kvraft server accepts in one request",
            READ_LIMIT >> 20
        )));
    }
    Ok(text)
}

/// Reads all of `source`, refusing more than [`READ_LIMIT`] bytes.
fn bounded(source: impl Read, name: &str) -> Result<Vec<u8>, Error> {
    let mut value = Vec::new();
    source
        .take(READ_LIMIT as u64 + 1)
        .read_to_end(&mut value)
        .map_err(|e| Error::InvalidArgument(format!("can't read the value from {name}: {e}")))?;
    if value.len() > READ_LIMIT {
        return Err(Error::InvalidArgument(format!(
            "the value from {name} is over {} MiB, more than any kvraft server accepts (max_value_size, 1 MiB by default)",
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

        let huge = bounded(std::io::repeat(7).take(READ_LIMIT as u64 + 10), "stdin")
            .unwrap_err()
            .to_string();
        assert!(huge.contains("more than any kvraft server accepts"), "{huge}");
        assert_eq!(bounded(&[1u8, 2, 3][..], "stdin").unwrap(), [1, 2, 3]);
    }
}

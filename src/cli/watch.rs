//! `kvraft watch`: every change to a key or range, one line each, as it
//! happens (or from a past revision), until interrupted.

use serde_json::{json, Value};

use super::output::{record_json, text};
use super::{OutputFormat, Printer};
use crate::client::{Client, WatchOptions, WatchUpdate};
use crate::error::Error;
use crate::proto::{watch_event, KeyRange, WatchEvent};

/// What `kvraft watch` was asked.
#[derive(clap::Args)]
pub struct WatchArgs {
    /// The key (or, with --prefix or --to, where the range starts).
    key: String,
    /// Watch every key that starts with KEY.
    #[arg(long, conflicts_with = "to")]
    prefix: bool,
    /// Watch the keys from KEY up to, not including, END.
    #[arg(long, value_name = "END", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    to: Option<String>,
    /// Start at revision R (the changes since R first); default: the next change.
    #[arg(long, value_name = "R", default_value_t = 0)]
    rev: u64,
    /// Each event also carries the key's previous record.
    #[arg(long)]
    prev_kv: bool,
    /// Also print progress notifications (no change up to a revision).
    #[arg(long)]
    progress: bool,
    /// Seconds between progress notifications of an idle watch.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    progress_interval: u64,
    /// Exit after this many events (default: run until interrupted).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
}

impl WatchArgs {
    fn options(&self) -> WatchOptions {
        let key = self.key.as_bytes().to_vec();
        let range = if self.prefix {
            Some(KeyRange::prefix(key.clone()))
        } else {
            self.to.as_ref().map(|to| KeyRange::between(key.clone(), to.as_bytes()))
        };
        WatchOptions {
            key: if range.is_some() { Vec::new() } else { key },
            range,
            start_revision: self.rev,
            prev_kv: self.prev_kv,
            progress_interval: Some(std::time::Duration::from_secs(self.progress_interval.max(1))),
        }
    }
}

/// Runs the watch; returns the exit status (0 after --count events).
pub async fn run(args: WatchArgs, client: Client, printer: &Printer) -> Result<i32, Error> {
    let mut watcher = client.watch(args.options()).await?;
    if printer.format() == OutputFormat::Text {
        eprintln!("kvraft: watching from revision {}", watcher.start_revision());
    }
    let mut seen = 0u64;
    while let Some(update) = watcher.next().await {
        match update? {
            WatchUpdate::Events { events, .. } => {
                for event in &events {
                    print_event(printer, event);
                    seen += 1;
                    if args.count.is_some_and(|n| seen >= n) {
                        return Ok(0);
                    }
                }
            }
            WatchUpdate::Progress { revision } if args.progress => {
                printer.emit(json!({"type": "progress", "revision": revision}), || {
                    format!("PROGRESS\t{revision}")
                });
            }
            WatchUpdate::Progress { .. } => {}
        }
    }
    Ok(0)
}

fn print_event(printer: &Printer, event: &WatchEvent) {
    let kv = event.kv.clone().unwrap_or_default();
    let put = event.r#type == watch_event::Type::Put as i32;
    let mut json: Value = record_json(&kv);
    json["type"] = json!(if put { "put" } else { "delete" });
    if let Some(prev) = &event.prev_kv {
        json["prev_kv"] = record_json(prev);
    }
    printer.emit(json, || {
        let mut line = if put {
            format!("PUT\t{}\t{}", text(&kv.key), text(&kv.value))
        } else {
            format!("DELETE\t{}", text(&kv.key))
        };
        if let Some(prev) = &event.prev_kv {
            line.push_str(&format!("\t(was {})", text(&prev.value)));
        }
        line
    });
}

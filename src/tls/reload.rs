//! A TLS configuration that follows its files: every new connection asks for
//! the current one, which is rebuilt when a file changed (and on SIGHUP). A
//! rebuild that fails (a half-written file, an expired certificate, a key that
//! doesn't match) is logged and the previous configuration stays in use.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tracing::{error, info};

use super::files::{stamp, FileStamp};
use super::TlsError;
use crate::metrics;
use ::metrics::counter;

type Build<T> = Box<dyn Fn() -> Result<T, TlsError> + Send + Sync>;

/// A value built from files, rebuilt when they change.
pub struct Reloading<T> {
    what: &'static str,
    files: Vec<PathBuf>,
    build: Build<T>,
    state: Mutex<State<T>>,
}

struct State<T> {
    value: Arc<T>,
    stamps: Vec<Option<FileStamp>>,
}

impl<T> Reloading<T> {
    /// Builds the first value; an error here is a start-up error.
    pub fn new(
        what: &'static str,
        files: Vec<PathBuf>,
        build: impl Fn() -> Result<T, TlsError> + Send + Sync + 'static,
    ) -> Result<Self, TlsError> {
        let stamps = files.iter().map(|f| stamp(f)).collect();
        let value = Arc::new(build()?);
        Ok(Reloading {
            what,
            files,
            build: Box::new(build),
            state: Mutex::new(State { value, stamps }),
        })
    }

    /// The current value, rebuilt first if a file changed since the last look.
    pub fn current(&self) -> Arc<T> {
        let stamps: Vec<Option<FileStamp>> = self.files.iter().map(|f| stamp(f)).collect();
        let mut state = self.state.lock().expect("tls reload lock poisoned");
        if stamps != state.stamps {
            // Record the stamps even if the rebuild fails, so a broken file is
            // reported once per change rather than on every connection.
            state.stamps = stamps;
            if let Err(e) = self.rebuild(&mut state, "a file changed") {
                error!(what = self.what, error = %e, "TLS certificates not reloaded; the previous ones stay in use");
            }
        }
        state.value.clone()
    }

    /// Rebuilds now (SIGHUP). On failure the previous value stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let mut state = self.state.lock().expect("tls reload lock poisoned");
        state.stamps = self.files.iter().map(|f| stamp(f)).collect();
        self.rebuild(&mut state, "SIGHUP")
    }

    fn rebuild(&self, state: &mut State<T>, why: &str) -> Result<(), TlsError> {
        let built = (self.build)();
        let outcome = if built.is_ok() { "ok" } else { "failed" };
        counter!(metrics::TLS_RELOADS, "outcome" => outcome).increment(1);
        state.value = Arc::new(built?);
        info!(what = self.what, why, "TLS certificates reloaded");
        Ok(())
    }
}

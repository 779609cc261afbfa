//! Logging to stderr (journald picks it up) as text or JSON, with a filter
//! that SIGHUP can replace without a restart.

use std::io::IsTerminal;

use tracing::{error, info};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

use crate::config::{LogFormat, NodeConfig};

/// The installed logger.
pub struct Logging {
    filter: reload::Handle<EnvFilter, Registry>,
}

/// Installs the global logger.
pub fn init(config: &NodeConfig) -> Logging {
    // The filter was validated with the configuration.
    let filter = EnvFilter::try_new(&config.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    match config.log_format {
        LogFormat::Text => {
            let color = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            registry
                .with(fmt::layer().with_writer(std::io::stderr).with_ansi(color))
                .init()
        }
        LogFormat::Json => registry.with(fmt::layer().json().with_writer(std::io::stderr)).init(),
    }
    Logging { filter: handle }
}

impl Logging {
    /// Replaces the log filter.
    pub fn reload(&self, filter: &str) {
        match EnvFilter::try_new(filter) {
            Ok(new) => match self.filter.reload(new) {
                Ok(()) => info!(filter, "SIGHUP: log filter reloaded"),
                Err(e) => error!(error = %e, "SIGHUP: could not reload the log filter"),
            },
            Err(e) => error!(filter, error = %e, "SIGHUP: invalid log filter; keeping the old one"),
        }
    }
}

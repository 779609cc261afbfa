//! Logging to stderr (journald picks it up) as text or JSON, with a filter
//! that SIGHUP can replace without a restart; and, when `otlp_endpoint` is
//! set, request spans exported over OTLP/HTTP.

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::{error, info, Level};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Layer};

use crate::config::{LogFormat, NodeConfig};

type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// The installed logger (and tracer, if any).
pub struct Logging {
    reload: Reload,
    tracer: Option<SdkTracerProvider>,
}

/// Installs the global logger, and the OTLP exporter when configured. Call it
/// before starting a tokio runtime: the exporter's HTTP client blocks.
pub fn init(config: &NodeConfig) -> Result<Logging, String> {
    // The filter was validated with the configuration.
    let filter = EnvFilter::try_new(&config.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt_layer = match config.log_format {
        LogFormat::Text => {
            let color = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            fmt::layer().with_writer(std::io::stderr).with_ansi(color).boxed()
        }
        LogFormat::Json => fmt::layer().json().with_writer(std::io::stderr).boxed(),
    };
    let tracer = if config.otlp_endpoint.is_empty() {
        None
    } else {
        Some(otlp_provider(config)?)
    };
    // Spans go to OTLP with their debug events (received, proposed, committed,
    // applied, replied) whatever the log filter says.
    let otel_layer = tracer.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("kvraft"))
            .with_filter(Targets::new().with_target("kvraft", Level::DEBUG))
    });
    tracing_subscriber::registry()
        .with(fmt_layer.with_filter(filter))
        .with(otel_layer)
        .init();
    let reload: Reload = Box::new(move |new| handle.reload(new).map_err(|e| e.to_string()));
    Ok(Logging { reload, tracer })
}

fn otlp_provider(config: &NodeConfig) -> Result<SdkTracerProvider, String> {
    let base = config.otlp_endpoint.trim_end_matches('/');
    let endpoint = if base.ends_with("/v1/traces") {
        base.to_string()
    } else {
        format!("{base}/v1/traces")
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| format!("otlp_endpoint {:?}: {e}", config.otlp_endpoint))?;
    let resource = Resource::builder()
        .with_service_name("kvraft")
        .with_attribute(KeyValue::new("service.instance.id", config.id.to_string()))
        .with_attribute(KeyValue::new("kvraft.node_id", config.id as i64))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

impl Logging {
    /// Replaces the log filter.
    pub fn reload(&self, filter: &str) {
        match EnvFilter::try_new(filter) {
            Ok(new) => match (self.reload)(new) {
                Ok(()) => info!(filter, "SIGHUP: log filter reloaded"),
                Err(e) => error!(error = %e, "SIGHUP: could not reload the log filter"),
            },
            Err(e) => error!(filter, error = %e, "SIGHUP: invalid log filter; keeping the old one"),
        }
    }

    /// Flushes spans not yet exported.
    pub fn shutdown(&self) {
        if let Some(provider) = &self.tracer {
            if let Err(e) = provider.shutdown() {
                eprintln!("kvraftd: flushing traces: {e}");
            }
        }
    }
}

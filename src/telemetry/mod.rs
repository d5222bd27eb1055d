//! Logging set-up: human-readable or JSON lines on stderr, filtered by config or `RUST_LOG`.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber (once; later calls are ignored). The embedded broker (rumqttd) is silent
/// unless asked through `RUST_LOG`: it logs every closed connection as an error. GPU training's kernel
/// autotuner (cubecl) logs each kernel it tunes at `info`: warnings only, unless asked.
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},rumqttd=off,cubecl_runtime=warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

pub mod http;
pub mod metrics;
pub mod sd_notify;

pub use metrics::{Histogram, Metrics, metrics};

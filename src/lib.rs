//! emotiond: camera streams in, per-frame emotion labels out over MQTT.
//!
//! ```text
//! source (GStreamer) → detect (YuNet via ort / Haar) → classify (ort, batched) → publish (MQTT JSON)
//! ```
//! `main.rs` only parses the command line; everything here is testable as a library. `train` (behind the
//! default `train` feature) and `eval` share the model contract in `model/` with the daemon.

pub mod bench;
pub mod broker;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod eval;
pub mod model;
pub mod pipeline;
pub mod telemetry;
#[cfg(feature = "train")]
pub mod train;

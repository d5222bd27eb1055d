//! emotiond: camera streams in, per-frame emotion labels out over MQTT.
//!
//! ```text
//! source (GStreamer) → detect (YuNet via ort / Haar) → classify (ort, batched) → publish (MQTT JSON)
//! ```
//! `main.rs` only parses the command line; everything here is testable as a library.

pub mod bench;
pub mod broker;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod model;
pub mod pipeline;
pub mod telemetry;

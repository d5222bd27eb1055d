//! emotiond: camera streams in, per-frame emotion labels out over MQTT.
//!
//! ```text
//! source (GStreamer) → detect (OpenCV / YuNet) → classify (ort, batched) → publish (MQTT JSON)
//! ```
//! `main.rs` only parses the command line; everything here is testable as a library.

pub mod eval;
pub mod model;
pub mod train;

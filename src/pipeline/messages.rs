//! The typed messages that flow between stages, and the JSON published for each processed frame.
//!
//! `Frame` (source → detect) · `Detection` (detect → crop) · `FrameResult` (classify → publish).
//! [`FrameResult::to_json`] is the wire format, `schema` 1; `tests/` parse it back.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opencv::core::Mat;
use serde::{Deserialize, Serialize};

/// What camera threads and the daemon hand to the publish stage.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// A processed frame → `<prefix>/<node>/<camera>/emotions`.
    Frame(FrameResult),
    /// A camera's state → retained `<prefix>/<node>/<camera>/status`.
    CameraStatus { camera: String, state: CameraState },
    /// The periodic stats JSON → `<prefix>/<node>/stats`.
    Stats(String),
}

/// A camera's state as published on its status topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CameraState {
    Online,
    Reconnecting,
    Offline,
}

impl CameraState {
    pub fn as_str(self) -> &'static str {
        match self {
            CameraState::Online => "online",
            CameraState::Reconnecting => "reconnecting",
            CameraState::Offline => "offline",
        }
    }
}

/// Version of the published JSON; bump on incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;

/// One decoded frame: contiguous BGR.
pub struct Frame {
    pub camera: Arc<str>,
    /// 1, 2, 3... per camera and pipeline start.
    pub seq: u64,
    /// Media timestamp.
    pub pts: Option<Duration>,
    /// Capture time on the wall clock.
    pub wall: SystemTime,
    /// When we pulled it (for latency).
    pub received: Instant,
    pub image: Mat,
}

/// A face found by the detector, in full-frame pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    /// x, y, width, height.
    pub bbox: [f32; 4],
    pub score: f32,
}

/// Box in pixels or normalised to 0..1 of the frame size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BBox {
    pub x: f32,
    pub y: f32,
    pub w: f32,
    pub h: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaceResult {
    /// Pixels of the full frame.
    pub bbox: BBox,
    /// The same box as fractions of the frame's width and height.
    pub bbox_norm: BBox,
    /// Detector confidence 0..1.
    pub score: f32,
    /// The most probable emotion.
    pub label: String,
    /// Its probability.
    pub confidence: f32,
    /// Every label's probability; sums to 1.
    pub probabilities: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FrameSize {
    pub width: u32,
    pub height: u32,
}

/// What is published for one processed frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrameResult {
    pub schema: u32,
    pub node: String,
    pub camera: String,
    pub seq: u64,
    /// Capture time, RFC 3339 UTC with milliseconds.
    pub ts: String,
    /// Capture time, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    pub frame: FrameSize,
    pub faces: Vec<FaceResult>,
    /// Time from pulling the frame to handing it to the publisher, milliseconds.
    pub latency_ms: f32,
}

impl FrameResult {
    pub fn new(node: &str, frame: &Frame, width: u32, height: u32) -> Self {
        let wall = frame.wall;
        Self {
            schema: SCHEMA_VERSION,
            node: node.to_owned(),
            camera: frame.camera.to_string(),
            seq: frame.seq,
            ts: humantime::format_rfc3339_millis(wall).to_string(),
            ts_ms: wall
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            frame: FrameSize { width, height },
            faces: Vec::new(),
            latency_ms: 0.0,
        }
    }

    pub fn push_face(&mut self, det: &Detection, labels: &[String], probs: &[f32]) {
        let (w, h) = (
            self.frame.width.max(1) as f32,
            self.frame.height.max(1) as f32,
        );
        let [x, y, bw, bh] = det.bbox;
        let (best, conf) =
            probs.iter().enumerate().fold(
                (0, f32::MIN),
                |acc, (i, p)| if *p > acc.1 { (i, *p) } else { acc },
            );
        self.faces.push(FaceResult {
            bbox: BBox { x, y, w: bw, h: bh },
            bbox_norm: BBox {
                x: x / w,
                y: y / h,
                w: bw / w,
                h: bh / h,
            },
            score: det.score,
            label: labels[best].clone(),
            confidence: conf,
            probabilities: labels
                .iter()
                .zip(probs)
                .map(|(l, p)| (l.clone(), serde_json::Value::from(*p as f64)))
                .collect(),
        });
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("FrameResult serialises: this is a bug")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_and_normalises() {
        let frame = Frame {
            camera: "cam".into(),
            seq: 7,
            pts: None,
            wall: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            received: Instant::now(),
            image: Mat::default(),
        };
        let mut r = FrameResult::new("node", &frame, 640, 360);
        let labels: Vec<String> = crate::model::FER_LABELS
            .iter()
            .map(|s| s.to_string())
            .collect();
        r.push_face(
            &Detection {
                bbox: [320.0, 180.0, 64.0, 36.0],
                score: 0.9,
            },
            &labels,
            &[0.1, 0.0, 0.0, 0.7, 0.1, 0.1, 0.0],
        );
        let back: FrameResult = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.ts, "2023-11-14T22:13:20.123Z");
        assert_eq!(back.ts_ms, 1_700_000_000_123);
        let f = &back.faces[0];
        assert_eq!(f.label, "happy");
        assert!((f.bbox_norm.x - 0.5).abs() < 1e-6 && (f.bbox_norm.h - 0.1).abs() < 1e-6);
    }
}

//! The per-camera pipeline and how the stages are wired.
//!
//! ```text
//! camera thread (one per camera):  source::Source ─► detect::Detector ─► crop + preprocess ─┐
//!                                                                                           │ ClassifyRequest
//! inference thread (one):          classify ◄──────────────────────────────────────────────┘ (batched across cameras)
//!                                     │ probabilities
//! camera thread:                   FrameResult ─► bounded channel ─► publish task (tokio, MQTT)
//! ```
//! A camera that fails is restarted with exponential backoff; it never takes the others down.

pub mod classify;
pub mod detect;
pub mod messages;
pub mod publish;
pub mod source;
pub mod spool;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use opencv::core::Mat;
use opencv::prelude::*;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::classify::ClassifierHandle;
use self::detect::{DetectError, Detector};
use self::messages::{CameraState, Frame, FrameResult, Outgoing};
use self::source::{Pulled, Source};
use crate::config::{CameraConfig, DetectConfig};
use crate::model::{crop_to_input, face_crop_rect};
use crate::telemetry::Histogram;

/// Counters for one camera, shared with whoever reports them (`/metrics`, the stats message, the watchdog).
pub struct CameraStats {
    /// Frames pulled from the source.
    pub frames: AtomicU64,
    /// Frames that went through detection and classification.
    pub processed: AtomicU64,
    /// Results dropped because the publish queue was full.
    pub dropped: AtomicU64,
    /// Frames dropped at the source because detection/inference was still busy (overload).
    pub source_dropped: AtomicU64,
    /// Faces classified.
    pub faces: AtomicU64,
    /// Source (re)starts that failed, streams that broke, and stalls.
    pub errors: AtomicU64,
    /// Frames are flowing.
    pub online: AtomicBool,
    /// Detection time per frame.
    pub detect_seconds: Histogram,
    /// Processed frames per second over the last second, as f64 bits.
    fps_bits: AtomicU64,
    /// Last time the camera thread was alive (its loop turns at least every 100 ms), ms since `EPOCH`.
    beat_ms: AtomicU64,
}

static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

impl Default for CameraStats {
    fn default() -> Self {
        Self {
            frames: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            source_dropped: AtomicU64::new(0),
            faces: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            online: AtomicBool::new(false),
            detect_seconds: Histogram::new(crate::telemetry::metrics::LATENCY_BUCKETS),
            fps_bits: AtomicU64::new(0),
            beat_ms: AtomicU64::new(EPOCH.elapsed().as_millis() as u64),
        }
    }
}

impl CameraStats {
    pub fn fps(&self) -> f64 {
        f64::from_bits(self.fps_bits.load(Ordering::Relaxed))
    }

    fn beat(&self) {
        self.beat_ms
            .store(EPOCH.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long since the camera thread last showed it is alive.
    pub fn since_beat(&self) -> Duration {
        Duration::from_millis(
            (EPOCH.elapsed().as_millis() as u64)
                .saturating_sub(self.beat_ms.load(Ordering::Relaxed)),
        )
    }
}

/// Time spent in each step of one frame.
#[derive(Debug, Default, Clone, Copy)]
pub struct StageTimes {
    pub detect: Duration,
    pub preprocess: Duration,
    pub classify: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(transparent)]
    Detect(#[from] DetectError),
    #[error("cropping a face failed: {0}")]
    Crop(#[from] opencv::Error),
    #[error("classification failed: {0}")]
    Classify(#[from] classify::ClassifyError),
}

/// Detect → crop → classify for one frame. Owns the camera's detector; shares the inference thread.
pub struct FrameProcessor {
    detector: Detector,
    classifier: ClassifierHandle,
    margin: Option<f32>,
    square: bool,
    node: String,
    inputs: Vec<f32>,
}

impl FrameProcessor {
    pub fn new(
        detect: &DetectConfig,
        ort_library: Option<&std::path::Path>,
        classifier: ClassifierHandle,
        node: &str,
    ) -> Result<Self, DetectError> {
        Ok(Self {
            detector: Detector::new(detect, ort_library)?,
            classifier,
            margin: detect.margin,
            square: detect.square,
            node: node.to_owned(),
            inputs: Vec::new(),
        })
    }

    /// Runs one frame through detection and classification.
    pub fn process(&mut self, frame: &Frame) -> Result<(FrameResult, StageTimes), ProcessError> {
        let mut times = StageTimes::default();
        let img: &Mat = &frame.image;
        let (w, h) = (img.cols(), img.rows());
        let t = Instant::now();
        let dets = self.detector.detect(img)?;
        times.detect = t.elapsed();

        // A model swap (config reload) between cropping and classifying turns the crops away; they are made
        // once more for the new model. Swaps are seconds apart, so a second turn-away cannot happen in practice.
        let mut attempts = 0;
        let (spec, probs) = loop {
            attempts += 1;
            let spec = self.classifier.spec();
            // The crop must match what the model was trained on: the config may override the model's margin.
            let margin = self.margin.or(spec.crop_margin).unwrap_or(0.1);
            let t = Instant::now();
            self.inputs.clear();
            for d in &dets {
                let rect = face_crop_rect(w, h, d.bbox, margin, self.square);
                crop_to_input(img, rect, &spec, &mut self.inputs)?;
            }
            times.preprocess += t.elapsed();

            let t = Instant::now();
            let r = self
                .classifier
                .classify(&spec, std::mem::take(&mut self.inputs), dets.len());
            times.classify += t.elapsed();
            match r {
                Err(classify::ClassifyError::ModelChanged) if attempts < 3 => continue,
                r => break (spec, r?),
            }
        };

        let mut result = FrameResult::new(&self.node, frame, w as u32, h as u32);
        for (d, p) in dets.iter().zip(&probs) {
            result.push_face(d, &spec.labels, p);
        }
        result.latency_ms = frame.received.elapsed().as_secs_f32() * 1000.0;
        Ok((result, times))
    }
}

/// Everything a camera thread needs besides its own config.
#[derive(Clone)]
pub struct CameraContext {
    pub node: String,
    pub detect: DetectConfig,
    pub ort_library: Option<std::path::PathBuf>,
    pub classifier: ClassifierHandle,
    pub out: mpsc::Sender<Outgoing>,
    pub publish_empty: bool,
    /// Restart a failed source with backoff (daemon) or give up with the error (one-shot `classify`).
    pub retry: bool,
}

/// Exponential backoff: 1 s, 2 s, 4 s ... 30 s, with ±20% jitter so cameras do not retry in lockstep.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Self {
        Self { next: Self::FIRST }
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    fn step(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let nanos = Instant::now().elapsed().as_nanos() as u64 ^ std::process::id() as u64;
        let jitter = 0.8 + 0.4 * ((nanos % 1000) as f64 / 1000.0);
        base.mul_f64(jitter)
    }
}

/// Sleeps `d` unless cancelled first (the thread keeps beating); returns false when cancelled.
fn sleep_unless(token: &CancellationToken, stats: &CameraStats, d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        stats.beat();
        if token.is_cancelled() {
            return false;
        }
        std::thread::sleep(
            Duration::from_millis(50).min(until.saturating_duration_since(Instant::now())),
        );
    }
    !token.is_cancelled()
}

/// A camera's whole life: start the source, process frames, restart on failure, until `token` is cancelled or a
/// non-looping file ends. Runs on its own thread. Returns an error only when it cannot go on: the detector
/// cannot start, or the source failed and `ctx.retry` is off.
pub fn run_camera(
    cam: CameraConfig,
    ctx: CameraContext,
    stats: Arc<CameraStats>,
    token: CancellationToken,
) -> Result<(), String> {
    let camera = cam.id.clone();
    let mut processor = match FrameProcessor::new(
        &ctx.detect,
        ctx.ort_library.as_deref(),
        ctx.classifier.clone(),
        &ctx.node,
    ) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(camera = %camera, "Camera stopped: its face detector could not start: {e}.");
            return Err(e.to_string());
        }
    };
    // Status changes are rare and must not be lost behind frames: they wait for room in the queue.
    let status = |state: CameraState| {
        let _ = ctx.out.blocking_send(Outgoing::CameraStatus {
            camera: camera.clone(),
            state,
        });
    };
    let mut backoff = Backoff::new();
    let mut dropped_since_warn = 0u64;
    let mut last_warn: Option<Instant> = None;
    'restart: while !token.is_cancelled() {
        let mut src = match Source::start(&cam) {
            Ok(s) => s,
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                if !ctx.retry {
                    return Err(e.to_string());
                }
                status(CameraState::Reconnecting);
                let wait = backoff.step();
                tracing::error!(camera = %camera, "{e}; retrying in {:.1} s.", wait.as_secs_f32());
                if !sleep_unless(&token, &stats, wait) {
                    break;
                }
                continue;
            }
        };
        tracing::info!(camera = %camera, "Camera started.");
        // Online once frames flow: a pipeline can start and then fail on its first buffer.
        let mut online = false;
        let mut last_frame = Instant::now();
        let (mut window_start, mut window_frames) = (Instant::now(), 0u32);
        // Source drops of earlier pipeline instances of this camera.
        let dropped_before = stats.source_dropped.load(Ordering::Relaxed);
        while !token.is_cancelled() {
            stats.beat();
            let failure = match src.next(Duration::from_millis(100)) {
                Ok(Pulled::Frame(f)) => Ok(f),
                Ok(Pulled::Skipped) => {
                    last_frame = Instant::now();
                    continue;
                }
                Ok(Pulled::Idle) => match cam.stall_timeout() {
                    Some(limit) if last_frame.elapsed() > limit => Err(format!(
                        "camera `{camera}`: no frame for {:.0} s (stalled)",
                        last_frame.elapsed().as_secs_f32()
                    )),
                    _ => continue,
                },
                Ok(Pulled::End) => {
                    tracing::info!(camera = %camera, frames = src.seq(), "Camera stream ended.");
                    break 'restart;
                }
                Err(e) => Err(e.to_string()),
            };
            let frame = match failure {
                Ok(f) => f,
                Err(e) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    stats.online.store(false, Ordering::Relaxed);
                    if !ctx.retry {
                        return Err(e);
                    }
                    status(CameraState::Reconnecting);
                    let wait = backoff.step();
                    tracing::error!(camera = %camera, "{e}; restarting the camera in {:.1} s.", wait.as_secs_f32());
                    drop(src);
                    if !sleep_unless(&token, &stats, wait) {
                        break 'restart;
                    }
                    continue 'restart;
                }
            };
            last_frame = Instant::now();
            if !online {
                online = true;
                backoff.reset();
                stats.online.store(true, Ordering::Relaxed);
                status(CameraState::Online);
            }
            stats
                .source_dropped
                .store(dropped_before + src.dropped(), Ordering::Relaxed);
            window_frames += 1;
            if window_start.elapsed() >= Duration::from_secs(1) {
                let fps = window_frames as f64 / window_start.elapsed().as_secs_f64();
                stats.fps_bits.store(fps.to_bits(), Ordering::Relaxed);
                (window_start, window_frames) = (Instant::now(), 0);
            }
            stats.frames.fetch_add(1, Ordering::Relaxed);
            let result = match processor.process(&frame) {
                Ok((r, times)) => {
                    stats.detect_seconds.observe_duration(times.detect);
                    r
                }
                Err(e) => {
                    tracing::error!(camera = %camera, seq = frame.seq, "Frame skipped: {e}.");
                    continue;
                }
            };
            stats.processed.fetch_add(1, Ordering::Relaxed);
            stats
                .faces
                .fetch_add(result.faces.len() as u64, Ordering::Relaxed);
            if result.faces.is_empty() && !ctx.publish_empty {
                continue;
            }
            if cam.realtime {
                // Never wait for the publisher: a live camera drops results rather than falling behind.
                if ctx.out.try_send(Outgoing::Frame(result)).is_err() {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                    dropped_since_warn += 1;
                    if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(camera = %camera, dropped = dropped_since_warn, "Results dropped: the publisher's queue is full (the publisher or the spool's disk is stalled).");
                        dropped_since_warn = 0;
                        last_warn = Some(Instant::now());
                    }
                }
            } else if ctx.out.blocking_send(Outgoing::Frame(result)).is_err() {
                break 'restart;
            }
        }
    }
    stats.online.store(false, Ordering::Relaxed);
    status(CameraState::Offline);
    tracing::info!(camera = %camera, "Camera stopped.");
    Ok(())
}

//! Process-wide metrics: counters, gauges and histograms that the stages update and `/metrics` renders in the
//! Prometheus text format. Labels stay low-cardinality: camera id yes, face or frame ids never.
//!
//! In: `metrics().camera(id)` / global fields, updated lock-free with atomics. Out: [`Metrics::render`].

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use crate::pipeline::CameraStats;

/// A fixed-bucket histogram (cumulative buckets rendered as Prometheus expects).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

/// Seconds: 0.5 ms .. 1 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 1.0,
];
/// Faces per inference batch.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros
            .fetch_add((v * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn mean(&self) -> f64 {
        let n = self.count();
        if n == 0 {
            0.0
        } else {
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6 / n as f64
        }
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count()
        );
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count());
    }
}

/// Everything `/metrics` shows.
pub struct Metrics {
    started: Instant,
    cameras: RwLock<BTreeMap<String, Arc<CameraStats>>>,
    pub inference_seconds: Histogram,
    pub batch_faces: Histogram,
    pub publish_queue_depth: AtomicU64,
    pub publish_queue_capacity: AtomicU64,
    pub published: AtomicU64,
    pub publish_failures: AtomicU64,
    pub spool_bytes: AtomicU64,
    pub spool_dropped: AtomicU64,
    pub mqtt_reconnects: AtomicU64,
    pub mqtt_connected: AtomicBool,
    pub model_loaded: AtomicBool,
    pub model_reloads: AtomicU64,
    /// The inference thread died (panicked): faces can no longer be classified.
    pub inference_failed: AtomicBool,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    METRICS.get_or_init(|| Metrics {
        started: Instant::now(),
        cameras: RwLock::new(BTreeMap::new()),
        inference_seconds: Histogram::new(LATENCY_BUCKETS),
        batch_faces: Histogram::new(BATCH_BUCKETS),
        publish_queue_depth: AtomicU64::new(0),
        publish_queue_capacity: AtomicU64::new(0),
        published: AtomicU64::new(0),
        publish_failures: AtomicU64::new(0),
        spool_bytes: AtomicU64::new(0),
        spool_dropped: AtomicU64::new(0),
        mqtt_reconnects: AtomicU64::new(0),
        mqtt_connected: AtomicBool::new(false),
        model_loaded: AtomicBool::new(false),
        model_reloads: AtomicU64::new(0),
        inference_failed: AtomicBool::new(false),
    })
}

impl Metrics {
    /// Registers (or returns) a camera's counters.
    pub fn camera(&self, id: &str) -> Arc<CameraStats> {
        if let Some(s) = self
            .cameras
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            return s.clone();
        }
        let mut map = self.cameras.write().unwrap_or_else(|p| p.into_inner());
        map.entry(id.to_owned()).or_default().clone()
    }

    pub fn cameras(&self) -> Vec<(String, Arc<CameraStats>)> {
        self.cameras
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let cams = self.cameras();
        let family = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        let per_camera = |o: &mut String,
                          name: &str,
                          kind: &str,
                          help: &str,
                          f: &dyn Fn(&CameraStats) -> String| {
            family(o, name, kind, help);
            for (id, s) in &cams {
                let _ = writeln!(o, "{name}{{camera=\"{id}\"}} {}", f(s));
            }
        };
        per_camera(
            &mut o,
            "emotiond_frames_received_total",
            "counter",
            "Frames pulled from the camera.",
            &|s| ld(&s.frames).to_string(),
        );
        per_camera(
            &mut o,
            "emotiond_frames_processed_total",
            "counter",
            "Frames detected and classified.",
            &|s| ld(&s.processed).to_string(),
        );
        family(
            &mut o,
            "emotiond_frames_dropped_total",
            "counter",
            "Frames dropped: at the source while busy (overload), or results refused by a full publish queue.",
        );
        for (id, s) in &cams {
            let _ = writeln!(
                o,
                "emotiond_frames_dropped_total{{camera=\"{id}\",reason=\"source\"}} {}",
                ld(&s.source_dropped)
            );
            let _ = writeln!(
                o,
                "emotiond_frames_dropped_total{{camera=\"{id}\",reason=\"publish_queue\"}} {}",
                ld(&s.dropped)
            );
        }
        per_camera(
            &mut o,
            "emotiond_faces_total",
            "counter",
            "Faces classified.",
            &|s| ld(&s.faces).to_string(),
        );
        per_camera(
            &mut o,
            "emotiond_camera_restarts_total",
            "counter",
            "Camera pipeline failures and stalls that caused a restart.",
            &|s| ld(&s.errors).to_string(),
        );
        per_camera(
            &mut o,
            "emotiond_camera_fps",
            "gauge",
            "Processed frames per second over the last interval.",
            &|s| format!("{:.2}", s.fps()),
        );
        per_camera(
            &mut o,
            "emotiond_camera_up",
            "gauge",
            "1 when frames are flowing.",
            &|s| u8::from(s.online.load(Ordering::Relaxed)).to_string(),
        );
        family(
            &mut o,
            "emotiond_detect_seconds",
            "histogram",
            "Face detection time per frame.",
        );
        for (id, s) in &cams {
            s.detect_seconds.render(
                &mut o,
                "emotiond_detect_seconds",
                &format!("camera=\"{id}\""),
            );
        }
        family(
            &mut o,
            "emotiond_inference_seconds",
            "histogram",
            "Emotion model time per batch.",
        );
        self.inference_seconds
            .render(&mut o, "emotiond_inference_seconds", "");
        family(
            &mut o,
            "emotiond_batch_faces",
            "histogram",
            "Faces per inference batch.",
        );
        self.batch_faces.render(&mut o, "emotiond_batch_faces", "");
        let gauges: [(&str, &str, &str, String); 10] = [
            (
                "emotiond_publish_queue_depth",
                "gauge",
                "Messages waiting for the MQTT client.",
                ld(&self.publish_queue_depth).to_string(),
            ),
            (
                "emotiond_publish_queue_capacity",
                "gauge",
                "Capacity of the publish queue.",
                ld(&self.publish_queue_capacity).to_string(),
            ),
            (
                "emotiond_published_total",
                "counter",
                "Messages handed to the MQTT client.",
                ld(&self.published).to_string(),
            ),
            (
                "emotiond_publish_failures_total",
                "counter",
                "Messages the MQTT client refused.",
                ld(&self.publish_failures).to_string(),
            ),
            (
                "emotiond_spool_bytes",
                "gauge",
                "Bytes in the on-disk spool.",
                ld(&self.spool_bytes).to_string(),
            ),
            (
                "emotiond_spool_dropped_total",
                "counter",
                "Spooled messages dropped because the spool was full.",
                ld(&self.spool_dropped).to_string(),
            ),
            (
                "emotiond_mqtt_reconnects_total",
                "counter",
                "Lost MQTT connections.",
                ld(&self.mqtt_reconnects).to_string(),
            ),
            (
                "emotiond_mqtt_connected",
                "gauge",
                "1 while connected to the broker.",
                u8::from(self.mqtt_connected.load(Ordering::Relaxed)).to_string(),
            ),
            (
                "emotiond_model_reloads_total",
                "counter",
                "Models swapped in by SIGHUP.",
                ld(&self.model_reloads).to_string(),
            ),
            (
                "emotiond_uptime_seconds",
                "gauge",
                "Seconds since start.",
                format!("{:.0}", self.uptime().as_secs_f64()),
            ),
        ];
        for (name, kind, help, value) in gauges {
            family(&mut o, name, kind, help);
            let _ = writeln!(o, "{name} {value}");
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.5, 0.7, 5.0] {
            h.observe(v);
        }
        let mut s = String::new();
        h.render(&mut s, "x", "camera=\"a\"");
        assert!(s.contains("x_bucket{camera=\"a\",le=\"0.1\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{camera=\"a\",le=\"1\"} 3\n"), "{s}");
        assert!(s.contains("x_bucket{camera=\"a\",le=\"+Inf\"} 4\n"), "{s}");
        assert!(s.contains("x_count{camera=\"a\"} 4\n"), "{s}");
        assert!((h.mean() - 1.5625).abs() < 1e-6);
    }

    #[test]
    fn renders_camera_series() {
        let m = metrics();
        let cam = m.camera("test-cam");
        cam.frames.fetch_add(3, Ordering::Relaxed);
        let text = m.render();
        assert!(
            text.contains("emotiond_frames_received_total{camera=\"test-cam\"} 3"),
            "{text}"
        );
        assert!(text.contains("# TYPE emotiond_inference_seconds histogram"));
    }
}

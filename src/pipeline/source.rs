//! GStreamer sources: one pipeline per camera, frames pulled from an appsink as BGR.
//!
//! In: a [`CameraConfig`]. Out: [`Frame`]s (contiguous BGR `Mat`, sequence number, capture time) from
//! [`Source::next`]. The appsink keeps only the newest frame (`max-buffers=1 drop=true`) for real-time sources,
//! so a slow consumer never builds latency; GStreamer's streaming threads never wait for us.

use std::time::{Duration, Instant, SystemTime};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use gstreamer_video::prelude::*;
use opencv::core::{CV_8UC3, Mat};
use opencv::prelude::*;

use super::messages::Frame;
use crate::config::{CameraConfig, SourceKind};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("camera `{camera}`: {reason}")]
    Config { camera: String, reason: String },
    #[error("camera `{camera}`: could not build the GStreamer pipeline `{description}`: {reason}")]
    Build {
        camera: String,
        description: String,
        reason: String,
    },
    #[error("camera `{camera}`: element `{element}` failed: {message}{}", debug.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Stream {
        camera: String,
        element: String,
        message: String,
        debug: Option<String>,
    },
    #[error("camera `{camera}`: could not start: {reason}")]
    Start { camera: String, reason: String },
    #[error("camera `{camera}`: unsupported frame: {reason}")]
    Frame { camera: String, reason: String },
}

/// What [`Source::next`] saw.
pub enum Pulled {
    Frame(Frame),
    /// No frame within the poll interval (caller checks for shutdown and stalls).
    Idle,
    /// A frame arrived and was skipped by the `max_fps` cap: the camera is alive, there is nothing to process.
    Skipped,
    /// The stream ended and does not loop.
    End,
}

pub struct Source {
    camera: String,
    pipeline: gst::Pipeline,
    sink: gst_app::AppSink,
    looping: bool,
    realtime: bool,
    /// A camera or network stream (not a file): timestamps always follow the clock, and its end is a failure
    /// to reconnect from.
    live: bool,
    /// Whether `live` is settled; a custom pipeline's is asked of GStreamer once it runs ([`Source::probe_live`]).
    live_known: bool,
    min_interval: Option<Duration>,
    last_pts: Option<gst::ClockTime>,
    last_emit: Option<Instant>,
    seq: u64,
    /// Samples pulled but skipped by the frame-rate cap.
    pub skipped: u64,
    /// Buffers that reached the appsink, counted in GStreamer's streaming thread (a counter, never a wait).
    arrived: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Makes sure GStreamer is initialised (idempotent).
pub fn init() -> Result<(), gst::glib::Error> {
    gst::init()
}

/// The pipeline text for a camera's source.
pub fn describe(kind: &SourceKind) -> String {
    let sink = "appsink name=sink";
    match kind {
        SourceKind::Uri(uri) => {
            format!(
                "uridecodebin uri=\"{}\" ! videoconvert ! videoscale ! {sink}",
                uri.replace('"', "%22")
            )
        }
        SourceKind::Device(dev) => format!("v4l2src device=\"{dev}\" ! videoconvert ! {sink}"),
        SourceKind::Pipeline(p) => p.clone(),
    }
}

impl Source {
    /// Builds and starts the camera's pipeline.
    pub fn start(cam: &CameraConfig) -> Result<Self, SourceError> {
        let camera = cam.id.clone();
        init().map_err(|e| SourceError::Start {
            camera: camera.clone(),
            reason: e.to_string(),
        })?;
        let kind = cam.source().map_err(|reason| SourceError::Config {
            camera: camera.clone(),
            reason,
        })?;
        let description = describe(&kind);
        let build = |reason: String| SourceError::Build {
            camera: camera.clone(),
            description: description.clone(),
            reason,
        };
        let pipeline = gst::parse::launch(&description)
            .map_err(|e| build(e.to_string()))?
            .downcast::<gst::Pipeline>()
            .map_err(|_| build("the description is not a pipeline".into()))?;
        let sink = pipeline
            .by_name("sink")
            .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
            .ok_or_else(|| build("no element `appsink name=sink`".into()))?;
        sink.set_caps(Some(
            &gst_video::VideoCapsBuilder::new()
                .format(gst_video::VideoFormat::Bgr)
                .build(),
        ));
        // Live behaviour: only the newest frame waits; older ones are dropped inside GStreamer.
        // Batch behaviour: every frame waits for us (back-pressure), nothing is dropped.
        sink.set_max_buffers(if cam.realtime { 1 } else { 4 });
        sink.set_drop(cam.realtime);
        let is_file = matches!(&kind, SourceKind::Uri(u) if u.starts_with("file://"));
        sink.set_sync(cam.realtime && is_file);
        let is_live_uri = matches!(&kind, SourceKind::Uri(u) if !u.starts_with("file://"));
        let live = is_live_uri || matches!(kind, SourceKind::Device(_));
        let live_known = !matches!(kind, SourceKind::Pipeline(_));
        let arrived = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        if let Some(pad) = sink.static_pad("sink") {
            let counter = arrived.clone();
            pad.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                gst::PadProbeReturn::Ok
            });
        }

        let src = Self {
            camera: camera.clone(),
            pipeline,
            sink,
            looping: cam.looping,
            realtime: cam.realtime,
            live,
            live_known,
            min_interval: (cam.max_fps > 0.0)
                .then(|| Duration::try_from_secs_f64(1.0 / cam.max_fps).ok())
                .flatten(),
            last_pts: None,
            last_emit: None,
            seq: 0,
            skipped: 0,
            arrived,
        };
        if let Err(e) = src.pipeline.set_state(gst::State::Playing) {
            let err = src.bus_error().unwrap_or(SourceError::Start {
                camera,
                reason: e.to_string(),
            });
            let _ = src.pipeline.set_state(gst::State::Null);
            return Err(err);
        }
        Ok(src)
    }

    /// The first error waiting on the bus, if any.
    fn bus_error(&self) -> Option<SourceError> {
        let bus = self.pipeline.bus()?;
        while let Some(msg) = bus.pop_filtered(&[gst::MessageType::Error]) {
            if let gst::MessageView::Error(err) = msg.view() {
                return Some(self.stream_error(err));
            }
        }
        None
    }

    /// A bus error as our error, naming the camera and the element that failed.
    fn stream_error(&self, err: &gst::message::Error) -> SourceError {
        SourceError::Stream {
            camera: self.camera.clone(),
            element: err
                .src()
                .map(|s| s.name().to_string())
                .unwrap_or_else(|| "pipeline".into()),
            message: err.error().to_string(),
            debug: err.debug().map(|d| d.to_string()),
        }
    }

    /// Waits up to `poll` for the next frame.
    pub fn next(&mut self, poll: Duration) -> Result<Pulled, SourceError> {
        // Bus first: errors must surface even when no frame ever arrives.
        if let Some(bus) = self.pipeline.bus() {
            while let Some(msg) =
                bus.pop_filtered(&[gst::MessageType::Error, gst::MessageType::Eos])
            {
                match msg.view() {
                    gst::MessageView::Error(err) => return Err(self.stream_error(err)),
                    gst::MessageView::Eos(_) => return self.end_of_stream(),
                    _ => {}
                }
            }
        }
        let Some(sample) = self
            .sink
            .try_pull_sample(gst::ClockTime::from_nseconds(poll.as_nanos() as u64))
        else {
            if self.sink.is_eos() {
                return self.end_of_stream();
            }
            return Ok(Pulled::Idle);
        };
        self.probe_live();
        let buffer = sample
            .buffer()
            .ok_or_else(|| self.frame_err("sample without buffer"))?;
        let pts = buffer.pts();
        if let Some(min) = self.min_interval {
            // Live: cap by arrival time. Batch: cap by media time, so the result does not depend on speed.
            let too_soon = if self.realtime {
                self.last_emit.is_some_and(|t| t.elapsed() < min)
            } else {
                matches!((pts, self.last_pts), (Some(p), Some(l)) if p >= l && Duration::from_nanos((p - l).nseconds()) < min)
            };
            if too_soon {
                self.skipped += 1;
                return Ok(Pulled::Skipped);
            }
        }
        let caps = sample
            .caps()
            .ok_or_else(|| self.frame_err("sample without caps"))?;
        let info =
            gst_video::VideoInfo::from_caps(caps).map_err(|e| self.frame_err(&e.to_string()))?;
        let wall = self.wall_time(&sample, pts);
        let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer, &info)
            .map_err(|_| self.frame_err("buffer could not be mapped"))?;
        let (w, h) = (info.width() as i32, info.height() as i32);
        let stride = frame.plane_stride()[0] as usize;
        let data = frame
            .plane_data(0)
            .map_err(|e| self.frame_err(&e.to_string()))?;
        // Copy row by row: GStreamer rows are padded to `stride`, the Mat is contiguous. The copy (0.7 MB at
        // 640×360) lets the frame outlive the GStreamer buffer and cross threads.
        let mut mat = Mat::new_rows_cols_with_default(h, w, CV_8UC3, 0.into())
            .map_err(|e| self.frame_err(&e.to_string()))?;
        {
            let dst = mat
                .data_bytes_mut()
                .map_err(|e| self.frame_err(&e.to_string()))?;
            let row = w as usize * 3;
            for y in 0..h as usize {
                dst[y * row..(y + 1) * row].copy_from_slice(&data[y * stride..y * stride + row]);
            }
        }
        self.last_pts = pts;
        self.last_emit = Some(Instant::now());
        self.seq += 1;
        Ok(Pulled::Frame(Frame {
            camera: self.camera.clone().into(),
            seq: self.seq,
            pts: pts.map(|p| Duration::from_nanos(p.nseconds())),
            wall,
            received: Instant::now(),
            image: mat,
        }))
    }

    /// Settles whether a custom pipeline is live by asking it (a latency query: `v4l2src`, `rtspsrc`,
    /// `videotestsrc is-live=true` are; `filesrc` is not). Answerable once data flows.
    fn probe_live(&mut self) {
        if self.live_known {
            return;
        }
        // Asked upstream of the appsink: an unsynchronised sink answers "not live" for the whole pipeline.
        let mut q = gst::query::Latency::new();
        // Asked once: a pipeline that cannot answer while data flows will not later, and counts as not live.
        self.live_known = true;
        if self
            .sink
            .static_pad("sink")
            .is_some_and(|pad| pad.peer_query(&mut q))
        {
            self.live = q.result().0;
        }
        tracing::debug!(camera = %self.camera, live = self.live, "Custom pipeline probed.");
    }

    fn end_of_stream(&mut self) -> Result<Pulled, SourceError> {
        self.probe_live();
        if self.live {
            // A camera or network stream has no end: EOS means it went away, so the caller reconnects.
            return Err(SourceError::Stream {
                camera: self.camera.clone(),
                element: "source".into(),
                message: "the stream ended (EOS)".into(),
                debug: None,
            });
        }
        if !self.looping {
            return Ok(Pulled::End);
        }
        self.last_pts = None;
        self.pipeline
            .seek_simple(
                gst::SeekFlags::FLUSH | gst::SeekFlags::KEY_UNIT,
                gst::ClockTime::ZERO,
            )
            .map_err(|e| SourceError::Start {
                camera: self.camera.clone(),
                reason: format!("could not loop: {e}"),
            })?;
        Ok(Pulled::Idle)
    }

    /// Capture time: the buffer's running time mapped through the pipeline clock to wall-clock time, so the
    /// timestamp is when the frame was due, not when we got to it. Unsynchronised playback (batch) has no
    /// meaningful clock relation, so it uses the time the frame was pulled.
    fn wall_time(&self, sample: &gst::Sample, pts: Option<gst::ClockTime>) -> SystemTime {
        let now = SystemTime::now();
        let (Some(pts), Some(clock), Some(base)) =
            (pts, self.pipeline.clock(), self.pipeline.base_time())
        else {
            return now;
        };
        if !self.sink.is_sync() && !self.live {
            return now;
        }
        let running = sample.segment().and_then(|s| {
            s.downcast_ref::<gst::ClockTime>()
                .and_then(|s| s.to_running_time(pts))
        });
        let Some(running) = running else { return now };
        let clock_now = clock.time();
        let due = base + running;
        if clock_now >= due {
            now - Duration::from_nanos((clock_now - due).nseconds())
        } else {
            now + Duration::from_nanos((due - clock_now).nseconds())
        }
    }

    fn frame_err(&self, reason: &str) -> SourceError {
        SourceError::Frame {
            camera: self.camera.clone(),
            reason: reason.to_owned(),
        }
    }

    /// Frames delivered so far.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Frames the appsink dropped because we were still busy with an older one (real-time sources only):
    /// what reached it minus what we pulled. The newest frame may still be waiting, hence the saturation.
    pub fn dropped(&self) -> u64 {
        self.arrived
            .load(std::sync::atomic::Ordering::Relaxed)
            .saturating_sub(self.seq + self.skipped + 1)
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A camera reading `pipeline` as fast as possible (every frame, nothing dropped).
    fn custom(pipeline: &str, max_fps: f64) -> CameraConfig {
        CameraConfig {
            uri: None,
            pipeline: Some(pipeline.into()),
            realtime: false,
            max_fps,
            ..CameraConfig::from_uri("t", "unused")
        }
    }

    /// Pulls until the end; returns (frames, skipped, how it ended).
    fn drain(cam: &CameraConfig) -> (u32, u32, Result<(), SourceError>) {
        let mut src = Source::start(cam).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut frames, mut skipped) = (0, 0);
        while Instant::now() < deadline {
            match src.next(Duration::from_millis(100)) {
                Ok(Pulled::Frame(_)) => frames += 1,
                Ok(Pulled::Skipped) => skipped += 1,
                Ok(Pulled::Idle) => {}
                Ok(Pulled::End) => return (frames, skipped, Ok(())),
                Err(e) => return (frames, skipped, Err(e)),
            }
        }
        panic!("{:?} did not end", cam.pipeline);
    }

    #[test]
    fn a_custom_pipeline_that_ends_is_a_failure_only_when_live() {
        let p = |live: bool| {
            format!(
                "videotestsrc is-live={live} num-buffers=3 ! video/x-raw,width=64,height=48 ! videoconvert ! \
                 appsink name=sink"
            )
        };
        // Not live (like a file): its end is the end of the camera.
        let (frames, _, end) = drain(&custom(&p(false), 0.0));
        assert_eq!(frames, 3);
        assert!(end.is_ok(), "{end:?}");
        // Live (like a camera): its end is a failure the camera thread reconnects from.
        let (frames, _, end) = drain(&custom(&p(true), 0.0));
        assert_eq!(frames, 3);
        let e = end
            .expect_err("a live stream's end must be an error")
            .to_string();
        assert!(e.contains("EOS"), "{e}");
    }

    #[test]
    fn frames_over_the_rate_cap_are_reported_as_skipped() {
        // 30 frames/s of media time capped at 10: every third frame is processed, the others are skipped (the
        // camera thread counts a skipped frame as a sign of life for its stall timer).
        let (frames, skipped, end) = drain(&custom(
            "videotestsrc num-buffers=9 ! video/x-raw,width=64,height=48,framerate=30/1 ! videoconvert ! \
             appsink name=sink",
            10.0,
        ));
        assert!(end.is_ok(), "{end:?}");
        assert_eq!((frames, skipped), (3, 6));
    }
}

//! The one-shot subcommands: `classify` (a still image, video file or URI → JSON lines on stdout) and
//! `validate` (check a config and every file it names; start nothing).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result, bail};
use opencv::imgcodecs;
use opencv::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::config::{CameraConfig, Config};
use crate::daemon::classifier_options;
use crate::model::Classifier;
use crate::pipeline::classify::{self, BatchPolicy};
use crate::pipeline::detect::Detector;
use crate::pipeline::messages::{Frame, Outgoing};
use crate::pipeline::{CameraContext, CameraStats, FrameProcessor, run_camera};

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff"];

fn is_image(input: &str) -> bool {
    !input.contains("://")
        && Path::new(input)
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Classifies `input` with the config's detector and model; writes one JSON line per frame to `out` (frames
/// without faces included). Returns the number of lines written.
pub fn classify(config: &Config, input: &str, out: &mut dyn Write) -> Result<u64> {
    let classifier = Classifier::load(&config.classify.model, &classifier_options(config))?;
    let policy = BatchPolicy {
        max_batch: config.classify.max_batch,
        max_delay: std::time::Duration::ZERO,
    };
    let (handle, inference) = classify::spawn(classifier, policy, None)?;

    let written = if is_image(input) {
        let image = imgcodecs::imread(input, imgcodecs::IMREAD_COLOR)
            .with_context(|| format!("could not read image {input}"))?;
        if image.empty() {
            bail!("could not read image {input}: missing, unreadable or not an image");
        }
        let frame = Frame {
            camera: "input".into(),
            seq: 1,
            pts: None,
            wall: SystemTime::now(),
            received: Instant::now(),
            image,
        };
        let mut processor = FrameProcessor::new(
            &config.detect,
            config.classify.ort_library.as_deref(),
            handle,
            &config.node.id,
        )?;
        let (result, _) = processor.process(&frame)?;
        writeln!(out, "{}", result.to_json())?;
        1
    } else {
        crate::pipeline::source::init().context("GStreamer could not start")?;
        let mut cam = CameraConfig::from_uri("input", input);
        cam.realtime = false;
        cam.source().map_err(anyhow::Error::msg)?;
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let ctx = CameraContext {
            node: config.node.id.clone(),
            detect: config.detect.clone(),
            ort_library: config.classify.ort_library.clone(),
            classifier: handle,
            out: tx,
            publish_empty: true,
            retry: false,
        };
        let worker = std::thread::spawn(move || {
            run_camera(
                cam,
                ctx,
                Arc::new(CameraStats::default()),
                CancellationToken::new(),
            )
        });
        let mut n = 0;
        while let Some(msg) = rx.blocking_recv() {
            if let Outgoing::Frame(result) = msg {
                writeln!(out, "{}", result.to_json())?;
                n += 1;
            }
        }
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("the video thread panicked: this is a bug"))?
            .map_err(anyhow::Error::msg)?;
        n
    };
    let _ = inference.join();
    Ok(written)
}

/// Checks the config and loads everything it names (models, cascade, ONNX Runtime) without starting streams.
pub fn validate(config: &Config) -> Result<String> {
    config.validate()?;
    let classifier = Classifier::load(&config.classify.model, &classifier_options(config))?;
    Detector::new(&config.detect, config.classify.ort_library.as_deref())?;
    let spec = classifier.spec();
    Ok(format!(
        "configuration OK: {} camera(s) [{}]; model {} ({}×{} {} {}, labels {}); detector {:?}; MQTT {}",
        config.cameras.len(),
        config
            .cameras
            .iter()
            .map(|c| c.id.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        config.classify.model.display(),
        spec.input_size,
        spec.input_size,
        spec.color,
        spec.layout,
        spec.labels.join(","),
        config.detect.backend,
        config.mqtt.broker,
    ))
}

//! `emotiond run`: start every stage, run until shutdown, stop in order.
//!
//! In: a validated [`Config`] and a cancellation token (SIGINT/SIGTERM in `main`). Out: a [`RunSummary`] once
//! sources are stopped, in-flight frames drained, `offline` published and the client disconnected. The daemon
//! also ends by itself when every camera has ended (non-looping files).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{BrokerAddr, Config, ConfigError};
use crate::model::{Classifier, ClassifierError, ClassifierOptions};
use crate::pipeline::classify::{self, BatchPolicy};
use crate::pipeline::{CameraContext, CameraStats, publish, run_camera};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Model(#[from] ClassifierError),
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    #[error("could not start a thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Totals over the run, per camera.
#[derive(Debug, Default)]
pub struct RunSummary {
    pub cameras: Vec<(String, Arc<CameraStats>)>,
    pub published: u64,
}

pub fn classifier_options(config: &Config) -> ClassifierOptions {
    ClassifierOptions {
        ort_library: config.classify.ort_library.clone(),
        intra_threads: config.classify.threads,
        provider: config.classify.provider,
    }
}

/// Runs the daemon until `shutdown` is cancelled or every camera has ended.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<RunSummary, DaemonError> {
    config.validate()?;
    crate::pipeline::source::init()
        .map_err(|e| std::io::Error::other(format!("GStreamer could not start: {e}")))?;

    let classifier = Classifier::load(&config.classify.model, &classifier_options(&config))?;
    tracing::info!(
        model = %config.classify.model.display(),
        provider = classifier.provider(),
        labels = %classifier.spec().labels.join(","),
        "Emotion model loaded; inference runs on {}.",
        classifier.provider()
    );
    let policy = BatchPolicy {
        max_batch: config.classify.max_batch,
        max_delay: std::time::Duration::from_millis(config.classify.max_delay_ms),
    };
    let (handle, inference) = classify::spawn(classifier, policy, None)?;

    if let Ok(BrokerAddr::Embedded { bind, port }) = config.mqtt.addr() {
        crate::broker::start(&bind, port)?;
    }
    let (tx, rx) = mpsc::channel(config.mqtt.queue);
    let publisher = tokio::spawn(publish::run(
        config.mqtt.clone(),
        config.node.id.clone(),
        rx,
    ));

    let ctx = CameraContext {
        node: config.node.id.clone(),
        detect: config.detect.clone(),
        ort_library: config.classify.ort_library.clone(),
        classifier: handle,
        out: tx,
        publish_empty: config.mqtt.publish_empty,
        retry: true,
    };
    let mut summary = RunSummary::default();
    let mut threads = Vec::new();
    for cam in &config.cameras {
        let stats = Arc::new(CameraStats::default());
        summary.cameras.push((cam.id.clone(), stats.clone()));
        let (cam, ctx, token) = (cam.clone(), ctx.clone(), shutdown.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("cam-{}", cam.id))
                .spawn(move || {
                    let _ = run_camera(cam, ctx, stats, token);
                })?,
        );
    }
    // The camera threads hold the only other senders and classifier handles: once they end, the channel closes
    // and the publisher drains what is left.
    drop(ctx);
    tracing::info!(cameras = config.cameras.len(), node = %config.node.id, "emotiond is running.");

    let cameras_done = tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    });
    let _ = cameras_done.await;
    if !shutdown.is_cancelled() {
        tracing::info!("Every camera has ended; shutting down.");
    }
    let stats = publisher.await.unwrap_or_default();
    let _ = tokio::task::spawn_blocking(move || inference.join()).await;
    summary.published = stats.published;
    for (id, s) in &summary.cameras {
        tracing::info!(
            camera = %id,
            frames = s.frames.load(Ordering::Relaxed),
            processed = s.processed.load(Ordering::Relaxed),
            faces = s.faces.load(Ordering::Relaxed),
            dropped = s.dropped.load(Ordering::Relaxed),
            "Camera totals."
        );
    }
    tracing::info!(published = stats.published, "emotiond stopped.");
    Ok(summary)
}

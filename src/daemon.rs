//! `emotiond run`: start every stage, run until shutdown, stop in order.
//!
//! In: a validated [`Config`] and [`RunOptions`] (shutdown token from SIGINT/SIGTERM, reload requests from
//! SIGHUP). Out: a [`RunSummary`] once sources are stopped, in-flight frames drained, `offline` published and the
//! client disconnected. The daemon also ends by itself when every camera has ended (non-looping files).
//! Around the pipeline: the `/metrics` endpoint, the periodic stats message, systemd notifications and the
//! watchdog heartbeat, and config reload with a model hot-swap.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{BrokerAddr, Config, ConfigError};
use crate::model::{Classifier, ClassifierError, ClassifierOptions};
use crate::pipeline::classify::{self, BatchPolicy, ClassifierHandle};
use crate::pipeline::messages::Outgoing;
use crate::pipeline::{CameraContext, CameraStats, publish, run_camera};
use crate::telemetry::{http, metrics, sd_notify};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Model(#[from] ClassifierError),
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    #[error(
        "metrics endpoint {addr}: {source}; set `metrics.listen` to a free address or \"\" to disable it"
    )]
    Metrics {
        addr: String,
        source: std::io::Error,
    },
    #[error("could not start a thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// How the caller controls a running daemon.
#[derive(Default)]
pub struct RunOptions {
    /// Cancel to stop.
    pub shutdown: CancellationToken,
    /// Each message asks for a config reload (SIGHUP).
    pub reload: Option<mpsc::Receiver<()>>,
    /// The file to reload from (`None`: the built-in defaults plus environment).
    pub config_path: Option<PathBuf>,
}

/// Totals over the run, per camera.
#[derive(Default)]
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
pub async fn run(config: Config, opts: RunOptions) -> Result<RunSummary, DaemonError> {
    let shutdown = opts.shutdown.clone();
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
    let m = metrics();
    m.model_loaded.store(true, Ordering::Relaxed);
    let policy = BatchPolicy {
        max_batch: config.classify.max_batch,
        max_delay: Duration::from_millis(config.classify.max_delay_ms),
    };
    let observer = Box::new(|b: classify::BatchStats| {
        metrics().inference_seconds.observe_duration(b.infer);
        metrics().batch_faces.observe(b.faces as f64);
    });
    let (handle, inference) = classify::spawn(classifier, policy, Some(observer))?;

    // Background services stop after the publisher has said `offline`.
    let services = CancellationToken::new();
    if !config.metrics.listen.is_empty() {
        let addr = config.metrics.listen.clone();
        let listener = http::bind(&addr)
            .await
            .map_err(|source| DaemonError::Metrics {
                addr: addr.clone(),
                source,
            })?;
        tracing::info!(%addr, "Serving /metrics, /healthz and /readyz.");
        tokio::spawn(http::serve(listener, services.clone()));
    }
    if let Ok(BrokerAddr::Embedded { bind, port }) = config.mqtt.addr() {
        crate::broker::start(&bind, port)?;
    }
    let (tx, rx) = mpsc::channel(config.mqtt.queue);
    m.publish_queue_capacity
        .store(config.mqtt.queue as u64, Ordering::Relaxed);
    let publisher = tokio::spawn(publish::run(
        config.mqtt.clone(),
        config.node.id.clone(),
        rx,
    ));

    let ctx = CameraContext {
        node: config.node.id.clone(),
        detect: config.detect.clone(),
        ort_library: config.classify.ort_library.clone(),
        classifier: handle.clone(),
        out: tx.clone(),
        publish_empty: config.mqtt.publish_empty,
        retry: true,
    };
    let mut summary = RunSummary::default();
    let mut threads = Vec::new();
    for cam in &config.cameras {
        let stats = m.camera(&cam.id);
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
    // The camera threads hold the remaining senders and classifier handles: once they end, the channel closes and
    // the publisher drains what is left.
    drop(ctx);
    tracing::info!(cameras = config.cameras.len(), node = %config.node.id, "emotiond is running.");
    sd_notify::ready();
    sd_notify::status(&format!("{} camera(s)", config.cameras.len()));

    tokio::spawn(watchdog(services.clone()));
    if config.metrics.stats_interval_s > 0 {
        let every = Duration::from_secs(config.metrics.stats_interval_s);
        tokio::spawn(stats_loop(
            tx.clone(),
            config.node.id.clone(),
            every,
            services.clone(),
        ));
    }
    drop(tx);
    let reloader = opts
        .reload
        .map(|rx| tokio::spawn(reload_loop(rx, config.clone(), opts.config_path, handle)));

    let cameras_done = tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    });
    let _ = cameras_done.await;
    sd_notify::stopping();
    if !shutdown.is_cancelled() {
        tracing::info!("Every camera has ended; shutting down.");
    }
    // Stats and reload hold a sender and a classifier handle: stop them so the channel and the model can close.
    services.cancel();
    if let Some(r) = reloader {
        r.abort();
        let _ = r.await;
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
            dropped_at_source = s.source_dropped.load(Ordering::Relaxed),
            "Camera totals."
        );
    }
    tracing::info!(published = stats.published, "emotiond stopped.");
    Ok(summary)
}

/// Pets systemd's watchdog at half its interval while every camera thread is alive; a wedged pipeline stops
/// the pings and systemd restarts the service.
async fn watchdog(stop: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_interval() else {
        return;
    };
    let mut tick = tokio::time::interval(interval / 2);
    let mut was_healthy = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match http::healthy() {
            Ok(()) => {
                sd_notify::watchdog();
                was_healthy = true;
            }
            Err(e) if was_healthy => {
                tracing::error!(
                    "The pipeline is wedged ({e}); no longer answering systemd's watchdog."
                );
                was_healthy = false;
            }
            Err(_) => {}
        }
    }
}

/// Publishes the stats message (per camera fps, counters and state; inference; publishing) periodically.
async fn stats_loop(
    tx: mpsc::Sender<Outgoing>,
    node: String,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let m = metrics();
        m.publish_queue_depth.store(
            (tx.max_capacity() - tx.capacity()) as u64,
            Ordering::Relaxed,
        );
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let cameras: serde_json::Map<String, serde_json::Value> = m
            .cameras()
            .into_iter()
            .map(|(id, s)| {
                let v = serde_json::json!({
                    "online": s.online.load(Ordering::Relaxed),
                    "fps": (s.fps() * 100.0).round() / 100.0,
                    "frames": ld(&s.frames),
                    "processed": ld(&s.processed),
                    "dropped": ld(&s.dropped),
                    "dropped_at_source": ld(&s.source_dropped),
                    "faces": ld(&s.faces),
                    "restarts": ld(&s.errors),
                    "detect_ms": (s.detect_seconds.mean() * 1e5).round() / 100.0,
                });
                (id, v)
            })
            .collect();
        let stats = serde_json::json!({
            "node": node,
            "uptime_s": m.uptime().as_secs(),
            "cameras": cameras,
            "inference": {
                "batches": m.inference_seconds.count(),
                "mean_ms": (m.inference_seconds.mean() * 1e5).round() / 100.0,
                "mean_batch": (m.batch_faces.mean() * 100.0).round() / 100.0,
            },
            "mqtt": {
                "connected": m.mqtt_connected.load(Ordering::Relaxed),
                "published": ld(&m.published),
                "reconnects": ld(&m.mqtt_reconnects),
                "queue_depth": ld(&m.publish_queue_depth),
            },
        });
        // Stats are expendable: never wait for room.
        let _ = tx.try_send(Outgoing::Stats(stats.to_string()));
    }
}

/// SIGHUP: re-read the config; if it is valid, load the model it names and swap it in between batches. Streams
/// keep running. An invalid config or model is rejected and the running one stays.
async fn reload_loop(
    mut rx: mpsc::Receiver<()>,
    started: Config,
    path: Option<PathBuf>,
    handle: ClassifierHandle,
) {
    while rx.recv().await.is_some() {
        sd_notify::reloading();
        let source = path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "built-in defaults".into());
        tracing::info!("Reloading the configuration from {source}.");
        let next = match Config::load(path.as_deref()).and_then(|c| c.validate().map(|()| c)) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("Reload rejected, the running configuration stays: {e}");
                sd_notify::ready();
                continue;
            }
        };
        let opts = classifier_options(&next);
        let model = next.classify.model.clone();
        let loaded = tokio::task::spawn_blocking(move || Classifier::load(&model, &opts)).await;
        match loaded {
            Ok(Ok(classifier)) => {
                let h = handle.clone();
                match tokio::task::spawn_blocking(move || h.swap(classifier)).await {
                    Ok(Ok(())) => {
                        metrics().model_reloads.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(model = %next.classify.model.display(), "Model reloaded; the next frames use it.");
                    }
                    _ => tracing::error!("Reload failed: the inference thread has stopped."),
                }
            }
            Ok(Err(e)) => tracing::error!("Reload rejected, the running model stays: {e}"),
            Err(e) => tracing::error!("Reload failed: {e}"),
        }
        // Against the configuration the daemon started with: these settings are still the running ones.
        let restart_needed: Vec<&str> = [
            ("[cameras]", differs(&started.cameras, &next.cameras)),
            ("[detect]", differs(&started.detect, &next.detect)),
            ("[mqtt]", differs(&started.mqtt, &next.mqtt)),
            ("[metrics]", differs(&started.metrics, &next.metrics)),
            ("[log]", differs(&started.log, &next.log)),
            ("node.id", started.node.id != next.node.id),
            (
                "classify.max_batch",
                started.classify.max_batch != next.classify.max_batch,
            ),
            (
                "classify.ort_library",
                started.classify.ort_library != next.classify.ort_library,
            ),
            (
                "classify.max_delay_ms",
                started.classify.max_delay_ms != next.classify.max_delay_ms,
            ),
        ]
        .into_iter()
        .filter_map(|(k, changed)| changed.then_some(k))
        .collect();
        if !restart_needed.is_empty() {
            tracing::warn!(
                "Changes to {} take effect at the next restart (systemctl restart emotiond).",
                restart_needed.join(", ")
            );
        }
        sd_notify::ready();
    }
}

/// Whether two config sections differ, compared by value (serialised: `Debug` hides secrets, so a new password
/// would go unnoticed).
fn differs<T: serde::Serialize>(a: &T, b: &T) -> bool {
    serde_json::to_value(a).ok() != serde_json::to_value(b).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MqttConfig, Secret};

    #[test]
    fn a_new_password_is_a_change() {
        let a = MqttConfig::default();
        let b = MqttConfig {
            password: Some(Secret("new".into())),
            ..MqttConfig::default()
        };
        // `Debug` prints a password as `***`; the comparison must see through that.
        assert!(differs(&a, &b));
        assert!(!differs(&a, &a.clone()));
    }
}

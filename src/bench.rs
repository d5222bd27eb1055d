//! `emotiond bench`: per-stage times and end-to-end throughput/latency on a video, as a table.
//!
//! In: a config (detector, model, threads) and a video. Out: a Markdown table on stdout. Stages are timed in
//! isolation on the same decoded frames; the end-to-end run is the real daemon (real-time playback, embedded
//! broker, a subscriber in-process) and measures capture timestamp → message received by the subscriber.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use opencv::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::config::{CameraConfig, Config, DetectorBackend};
use crate::daemon::classifier_options;
use crate::model::{Classifier, crop_to_input, face_crop_rect};
use crate::pipeline::detect::Detector;
use crate::pipeline::messages::Frame;
use crate::pipeline::source::{Pulled, Source};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Video to measure on.
    #[arg(long, default_value = "media/sample.mp4")]
    pub video: String,
    /// Frames decoded and used for the per-stage timings.
    #[arg(long, default_value_t = 150)]
    pub frames: usize,
    /// Seconds of real-time end-to-end running.
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn stats_ms(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    (mean, percentile(&v, 0.5), percentile(&v, 0.99))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn run(config: &Config, args: &BenchArgs) -> Result<()> {
    crate::pipeline::source::init().context("GStreamer could not start")?;
    let mut rows: Vec<(String, String, String, String)> = Vec::new();
    let mut row = |stage: &str, (mean, p50, p99): (f64, f64, f64)| {
        rows.push((
            stage.to_owned(),
            format!("{mean:.3}"),
            format!("{p50:.3}"),
            format!("{p99:.3}"),
        ));
    };

    // Decode: GStreamer as fast as it goes, BGR conversion and the copy out of the buffer included.
    let mut cam = CameraConfig::from_uri("bench", &args.video);
    cam.realtime = false;
    let mut src = Source::start(&cam)?;
    let mut frames: Vec<Frame> = Vec::new();
    let mut decode = Vec::new();
    let mut t = Instant::now();
    while frames.len() < args.frames {
        match src.next(Duration::from_secs(5))? {
            Pulled::Frame(f) => {
                decode.push(ms(t.elapsed()));
                frames.push(f);
                t = Instant::now();
            }
            Pulled::Idle | Pulled::Skipped => continue,
            Pulled::End => break,
        }
    }
    drop(src);
    anyhow::ensure!(!frames.is_empty(), "no frames decoded from {}", args.video);
    let (w, h) = (frames[0].image.cols(), frames[0].image.rows());
    row(&format!("decode ({w}×{h}, per frame)"), stats_ms(decode));

    // Detection, both backends.
    let mut faces = Vec::new();
    for backend in [DetectorBackend::Yunet, DetectorBackend::Haar] {
        let mut dcfg = config.detect.clone();
        dcfg.backend = backend;
        let mut det = Detector::new(&dcfg, config.classify.ort_library.as_deref())?;
        let mut times = Vec::new();
        for f in &frames {
            let t = Instant::now();
            let d = det.detect(&f.image)?;
            times.push(ms(t.elapsed()));
            if backend == config.detect.backend {
                faces.push(d);
            }
        }
        row(&format!("detect {backend:?} (per frame)"), stats_ms(times));
    }

    // Preprocessing and inference.
    let mut classifier = Classifier::load(&config.classify.model, &classifier_options(config))?;
    let spec = classifier.spec().clone();
    let margin = config.detect.margin.or(spec.crop_margin).unwrap_or(0.1);
    let mut pre = Vec::new();
    let mut one = Vec::new();
    for (f, dets) in frames.iter().zip(&faces) {
        for d in dets {
            let t = Instant::now();
            let mut v = Vec::new();
            crop_to_input(
                &f.image,
                face_crop_rect(w, h, d.bbox, margin, config.detect.square),
                &spec,
                &mut v,
            )?;
            pre.push(ms(t.elapsed()));
            if one.is_empty() {
                one = v;
            }
        }
    }
    anyhow::ensure!(
        !one.is_empty(),
        "no face found in the first {} frames",
        frames.len()
    );
    row("crop + preprocess (per face)", stats_ms(pre));
    for batch in [1usize, 4, 8, 16] {
        let mut times = Vec::new();
        for _ in 0..(200 / batch).max(10) {
            let input: Vec<f32> = one
                .iter()
                .copied()
                .cycle()
                .take(one.len() * batch)
                .collect();
            let t = Instant::now();
            classifier.run(input)?;
            times.push(ms(t.elapsed()));
        }
        let (mean, p50, p99) = stats_ms(times);
        row(
            &format!(
                "infer batch {batch} (per batch; {:.2} ms/face)",
                mean / batch as f64
            ),
            (mean, p50, p99),
        );
    }
    let mut ser = Vec::new();
    let mut result =
        crate::pipeline::messages::FrameResult::new("bench", &frames[0], w as u32, h as u32);
    for d in &faces[0] {
        result.push_face(
            d,
            &spec.labels,
            &vec![1.0 / spec.labels.len() as f32; spec.labels.len()],
        );
    }
    for _ in 0..1000 {
        let t = Instant::now();
        std::hint::black_box(result.to_json());
        ser.push(ms(t.elapsed()));
    }
    row("JSON encode (per message)", stats_ms(ser));
    drop(frames);

    let e2e = end_to_end(config, args)?;
    println!("| stage | mean ms | p50 ms | p99 ms |\n|---|---:|---:|---:|");
    for (s, a, b, c) in rows {
        println!("| {s} | {a} | {b} | {c} |");
    }
    println!(
        "| **end to end** capture → subscriber ({:.1} frames/s over {} s, {} messages) | {:.2} | {:.2} | {:.2} |",
        e2e.fps, args.seconds, e2e.count, e2e.mean, e2e.p50, e2e.p99
    );
    Ok(())
}

struct EndToEnd {
    fps: f64,
    count: usize,
    mean: f64,
    p50: f64,
    p99: f64,
}

/// The real daemon on the video in real time, through the embedded broker to a subscriber in this process.
fn end_to_end(config: &Config, args: &BenchArgs) -> Result<EndToEnd> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut cfg = config.clone();
    let mut cam = CameraConfig::from_uri("bench", &args.video);
    cam.looping = true;
    cfg.cameras = vec![cam];
    cfg.mqtt.broker = "embedded".into();
    cfg.mqtt.embedded_port = port;
    cfg.mqtt.publish_empty = true;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let opts = crate::daemon::RunOptions {
            shutdown: shutdown.clone(),
            ..Default::default()
        };
        let daemon = tokio::spawn(crate::daemon::run(cfg, opts));
        let mut opts = rumqttc::MqttOptions::new("emotiond-bench", "127.0.0.1", port);
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = rumqttc::AsyncClient::new(opts, 100);
        client
            .subscribe("emotiond/+/bench/emotions", rumqttc::QoS::AtMostOnce)
            .await?;
        let mut lat = Vec::new();
        let start = Instant::now();
        let warmup = Duration::from_secs(2);
        let until = start + warmup + Duration::from_secs(args.seconds);
        while Instant::now() < until {
            match tokio::time::timeout(Duration::from_millis(200), events.poll()).await {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64() * 1000.0;
                    let r: crate::pipeline::messages::FrameResult =
                        serde_json::from_slice(&p.payload)?;
                    if start.elapsed() > warmup {
                        lat.push(now - r.ts_ms as f64);
                    }
                }
                Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
                _ => {}
            }
        }
        shutdown.cancel();
        daemon.await??;
        let count = lat.len();
        let (mean, p50, p99) = stats_ms(lat);
        Ok(EndToEnd {
            fps: count as f64 / args.seconds as f64,
            count,
            mean,
            p50,
            p99,
        })
    })
}

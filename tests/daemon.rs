//! End to end with real parts: GStreamer decodes the real sample video, YuNet/Haar find the face, the baseline
//! model runs through ONNX Runtime, and results travel through a real MQTT broker to a real subscriber.

mod common;

use std::time::Duration;

use common::*;

/// The whole sample video, every frame, through mosquitto. Returns the frames received.
fn run_sample_through_mosquitto(detect: &str) -> Vec<emotiond::pipeline::messages::FrameResult> {
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port);
    let cfg = write_config(&format!(
        "{}\npublish_empty = true\n{}\n[detect]\n{detect}\n",
        mqtt_external(broker.port),
        // Haar is slow: 5 frames per second of video is plenty to measure it.
        camera(
            "cam1",
            SAMPLE,
            false,
            false,
            if detect.contains("haar") { 5.0 } else { 0.0 }
        ),
    ));
    let daemon = Daemon::start(&cfg.path);
    // Non-looping file, batch mode: the daemon ends by itself when the video ends.
    let (status, log) = daemon.wait(Duration::from_secs(300));
    assert!(status.success(), "emotiond failed: {status}\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    sub.collect_until(Duration::from_secs(5), |m| {
        m.iter()
            .any(|m| m.topic == "emotiond/testnode/status" && m.payload == "offline")
    });

    let frames = sub.emotions();
    for f in &frames {
        check_message(f);
        assert_eq!((f.node.as_str(), f.camera.as_str()), ("testnode", "cam1"));
    }
    let seqs: Vec<u64> = frames.iter().map(|f| f.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] > w[0]),
        "sequence numbers must increase: {seqs:?}"
    );
    assert_eq!(sub.statuses().first().map(String::as_str), Some("online"));
    assert_eq!(
        sub.statuses().last().map(String::as_str),
        Some("offline"),
        "{:?}",
        sub.statuses()
    );
    frames
}

#[test]
fn sample_video_yunet_through_mosquitto() {
    let frames = run_sample_through_mosquitto("backend = \"yunet\"");
    // 19.7 s at 24 fps: every frame is processed and published (publish_empty = true).
    assert!(frames.len() >= 450, "only {} frames arrived", frames.len());
    let with_face = frames.iter().filter(|f| !f.faces.is_empty()).count();
    // The woman is in every frame of the clip.
    assert!(
        with_face as f64 >= 0.9 * frames.len() as f64,
        "face in {with_face} of {} frames",
        frames.len()
    );
    assert!(
        frames.iter().all(|f| f.faces.len() <= 1),
        "one person, at most one face per frame"
    );
}

#[test]
fn sample_video_haar_through_mosquitto() {
    let frames = run_sample_through_mosquitto("backend = \"haar\"");
    assert!(frames.len() >= 80, "only {} frames arrived", frames.len());
    let with_face = frames.iter().filter(|f| !f.faces.is_empty()).count();
    assert!(
        with_face as f64 >= 0.9 * frames.len() as f64,
        "face in {with_face} of {} frames",
        frames.len()
    );
}

#[test]
fn embedded_broker_serves_subscribers_and_sigterm_publishes_offline() {
    let port = free_port();
    let cfg = write_config(&format!(
        "[node]\nid = \"robot\"\n[mqtt]\nbroker = \"embedded\"\nembedded_port = {port}\n{}",
        camera("front", SAMPLE, true, true, 10.0)
    ));
    let mut daemon = Daemon::start(&cfg.path);
    assert!(
        wait_for_port(port, Duration::from_secs(30)),
        "embedded broker never listened"
    );
    let mut sub = Subscriber::connect(port);
    let got = sub.collect_until(Duration::from_secs(30), |m| {
        m.iter().filter(|m| m.topic.ends_with("/emotions")).count() >= 20
    });
    assert!(
        got,
        "fewer than 20 messages in 30 s: {:?}",
        sub.received.len()
    );
    assert!(daemon.is_running());
    assert!(
        sub.received
            .iter()
            .all(|m| m.topic.starts_with("emotiond/robot/"))
    );
    // max_fps = 10: frames are paced, not every 24 fps frame.
    let frames = sub.emotions();
    let span = frames.last().unwrap().ts_ms - frames.first().unwrap().ts_ms;
    let rate = (frames.len() - 1) as f64 / (span as f64 / 1000.0);
    assert!(
        rate <= 11.5,
        "max_fps = 10 but {rate:.1} frames/s were published"
    );
    let (status, log) = daemon.stop();
    assert!(status.success(), "exit {status}\n{log}");
    assert!(log.contains("SIGTERM"), "{log}");
    sub.collect_until(Duration::from_secs(5), |m| {
        m.iter()
            .any(|m| m.topic == "emotiond/robot/status" && m.payload == "offline")
    });
    assert_eq!(
        sub.statuses().last().map(String::as_str),
        Some("offline"),
        "{:?}",
        sub.statuses()
    );
    for f in &frames {
        check_message(f);
    }
}

#[test]
fn broken_camera_does_not_stop_the_good_one() {
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port);
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("broken.mp4");
    std::fs::write(
        &garbage,
        (0..300_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let cfg = write_config(&format!(
        "{}{}{}",
        mqtt_external(broker.port),
        camera("good", SAMPLE, true, true, 0.0),
        camera("bad", garbage.to_str().unwrap(), true, true, 0.0),
    ));
    let mut daemon = Daemon::start(&cfg.path);
    let got = sub.collect_until(Duration::from_secs(40), |m| {
        m.iter()
            .filter(|m| m.topic.ends_with("/good/emotions"))
            .count()
            >= 30
    });
    assert!(
        got,
        "the good camera published too little: {}",
        sub.received.len()
    );
    assert!(
        !sub.received
            .iter()
            .any(|m| m.topic.contains("/bad/emotions"))
    );
    // It never delivered a frame, so it never went online.
    assert!(
        sub.camera_statuses("bad")
            .iter()
            .all(|s| s == "reconnecting"),
        "{:?}",
        sub.camera_statuses("bad")
    );
    assert!(!sub.camera_statuses("bad").is_empty());
    assert_eq!(sub.camera_statuses("good"), ["online"]);
    assert!(daemon.is_running());
    let (status, log) = daemon.stop();
    assert!(status.success(), "{log}");
    // The broken camera's error names the camera and the GStreamer element, and says it retries.
    assert!(
        log.contains("camera `bad`") && log.contains("restarting the camera in"),
        "{log}"
    );
    assert!(log.contains("typefind") || log.contains("demux"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn unreachable_broker_then_broker_appears() {
    let port = free_port();
    let cfg = write_config(&format!(
        "{}{}",
        mqtt_external(port),
        camera("cam", SAMPLE, true, true, 0.0)
    ));
    let mut daemon = Daemon::start(&cfg.path);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        daemon.is_running(),
        "the daemon must keep running without a broker"
    );
    let broker = Mosquitto::start_on(port);
    let mut sub = Subscriber::connect(broker.port);
    let got = sub.collect_until(Duration::from_secs(30), |m| {
        m.iter().filter(|m| m.topic.ends_with("/emotions")).count() >= 10
    });
    assert!(got, "nothing published after the broker appeared");
    let (status, log) = daemon.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("unreachable") && log.contains("Reconnected"),
        "{log}"
    );
}

#[test]
fn sighup_rejects_a_broken_config_then_hot_swaps_the_model_and_metrics_report_it() {
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port);
    let metrics_port = free_port();
    let base = format!(
        "{}[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\nstats_interval_s = 1\n{}",
        mqtt_external(broker.port),
        camera("cam", SAMPLE, true, true, 0.0)
    );
    let cfg = write_config(&base);
    let mut daemon = Daemon::start_with(
        &cfg.path,
        &[(
            "EMOTIOND__METRICS__LISTEN",
            &format!("127.0.0.1:{metrics_port}"),
        )],
    );
    assert!(sub.collect_until(Duration::from_secs(30), |m| {
        m.iter().filter(|m| m.topic.ends_with("/emotions")).count() >= 10
    }));
    let labels = |f: &emotiond::pipeline::messages::FrameResult| {
        f.faces[0].probabilities.keys().cloned().collect::<Vec<_>>()
    };
    assert!(labels(&sub.emotions()[0]).contains(&"happy".to_string()));

    // The endpoints answer while frames flow.
    let (code, body) = http_get(metrics_port, "/metrics");
    assert_eq!(code, 200);
    assert!(
        body.contains("emotiond_frames_received_total{camera=\"cam\"}"),
        "{body}"
    );
    assert!(
        body.contains("emotiond_inference_seconds_bucket{le=\"+Inf\"}"),
        "{body}"
    );
    assert_eq!(http_get(metrics_port, "/healthz").0, 200);
    let (code, why) = http_get(metrics_port, "/readyz");
    assert_eq!(code, 200, "{why}");
    // The stats message arrives every second.
    assert!(sub.collect_until(Duration::from_secs(5), |m| {
        m.iter().any(|m| m.topic == "emotiond/testnode/stats")
    }));
    let stats = sub
        .received
        .iter()
        .find(|m| m.topic.ends_with("/stats"))
        .unwrap();
    let stats: serde_json::Value = serde_json::from_str(&stats.payload).unwrap();
    assert!(
        stats["cameras"]["cam"]["frames"].as_u64().unwrap() > 0,
        "{stats}"
    );

    // A broken config is rejected; the daemon keeps running on the old one.
    std::fs::write(&cfg.path, format!("{base}[classify]\nmax_btch = 4\n")).unwrap();
    daemon.signal("HUP");
    std::thread::sleep(Duration::from_secs(1));
    assert!(daemon.is_running());

    // A new model: the same network with a contract that renames its labels, so the messages show the swap.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("renamed.onnx");
    std::fs::copy("models/fer2013_mini_xception_64.onnx", &model).unwrap();
    let sidecar = std::fs::read_to_string("models/fer2013_mini_xception_64.onnx.json")
        .unwrap()
        .replace(
            "angry,disgust,fear,happy,sad,surprise,neutral",
            "r-angry,r-disgust,r-fear,r-happy,r-sad,r-surprise,r-neutral",
        );
    std::fs::write(dir.path().join("renamed.onnx.json"), sidecar).unwrap();
    std::fs::write(
        &cfg.path,
        // max_batch cannot change while running: the daemon must say so.
        format!(
            "{base}[classify]\nmodel = \"{}\"\nmax_batch = 3\n",
            model.display()
        ),
    )
    .unwrap();
    daemon.signal("HUP");
    let swapped = sub.collect_until(Duration::from_secs(20), |m| {
        m.iter()
            .any(|m| m.topic.ends_with("/emotions") && m.payload.contains("\"r-happy\""))
    });
    assert!(swapped, "no message from the new model after SIGHUP");
    assert!(daemon.is_running());
    assert!(
        http_get(metrics_port, "/metrics")
            .1
            .contains("emotiond_model_reloads_total 1")
    );
    // Frames kept flowing: sequence numbers never restarted (the stream was not dropped).
    let seqs: Vec<u64> = sub.emotions().iter().map(|f| f.seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "{seqs:?}");

    let (status, log) = daemon.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("Reload rejected") && log.contains("max_btch"),
        "{log}"
    );
    assert!(log.contains("Model reloaded"), "{log}");
    assert!(
        log.contains("Changes to classify.max_batch take effect at the next restart"),
        "{log}"
    );
}

/// A reload swaps the model while a camera thread may hold crops made for the old one. The inference thread must
/// turn those away (the camera then crops again) instead of running a tensor of the wrong size, which used to
/// kill the thread; and the served contract must change at the moment the model does.
#[test]
fn model_swap_turns_away_crops_made_for_the_old_model() {
    use emotiond::model::{Classifier, ClassifierOptions};
    use emotiond::pipeline::classify::{self, BatchPolicy, ClassifyError};
    ort_library();
    let opts = ClassifierOptions::default();
    let old = Classifier::load("models/fer2013_mini_xception_64.onnx".as_ref(), &opts).unwrap();
    let new =
        Classifier::load("models/fer2013_efficientnet_lite0_96.onnx".as_ref(), &opts).unwrap();
    let policy = BatchPolicy {
        max_batch: 8,
        max_delay: Duration::from_millis(1),
    };
    let (handle, thread) = classify::spawn(old, policy, None).unwrap();
    let old_spec = handle.spec();
    let crops = |spec: &emotiond::model::ModelSpec, n: usize| vec![0.5f32; n * spec.input_len()];
    assert_eq!(
        handle
            .classify(&old_spec, crops(&old_spec, 2), 2)
            .unwrap()
            .len(),
        2
    );

    handle.swap(new).unwrap();
    let new_spec = handle.spec();
    assert_eq!(
        new_spec.input_size, 96,
        "the contract switches with the model"
    );
    assert_ne!(old_spec.input_len(), new_spec.input_len());
    assert!(matches!(
        handle.classify(&old_spec, crops(&old_spec, 1), 1),
        Err(ClassifyError::ModelChanged)
    ));
    // A malformed request is an error for its sender only.
    assert!(matches!(
        handle.classify(&new_spec, vec![0.0; 5], 1),
        Err(ClassifyError::Inference(_))
    ));
    let probs = handle.classify(&new_spec, crops(&new_spec, 3), 3).unwrap();
    assert_eq!(probs.len(), 3);
    assert!(
        probs
            .iter()
            .all(|p| p.len() == 7 && (p.iter().sum::<f32>() - 1.0).abs() < 1e-4)
    );
    drop(handle);
    thread.join().expect("the inference thread ends cleanly");
    assert!(
        !emotiond::telemetry::metrics()
            .inference_failed
            .load(std::sync::atomic::Ordering::Relaxed)
    );
}

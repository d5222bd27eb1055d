//! The command line with good and bad input: every user error is a clear message, never a panic.

mod common;

use common::*;

fn assert_clean_failure(code: i32, stderr: &str, needles: &[&str]) {
    assert_ne!(code, 0, "expected failure; stderr:\n{stderr}");
    assert!(
        !stderr.contains("panicked"),
        "panic instead of an error:\n{stderr}"
    );
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}:\n{stderr}");
    }
}

#[test]
fn classify_still_image_finds_one_face() {
    let (code, out, err) = run_cli(&["classify", "media/single_face.jpg"], &[]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1);
    let r: emotiond::pipeline::messages::FrameResult = serde_json::from_str(lines[0]).unwrap();
    check_message(&r);
    assert_eq!(r.faces.len(), 1, "{out}");
    assert!(FER_LABELS.contains(&r.faces[0].label.as_str()));
    assert!(r.faces[0].score > 0.8);
}

#[test]
fn classify_group_photo_finds_several_faces() {
    let (code, out, err) = run_cli(&["classify", "media/multi_face.jpg"], &[]);
    assert_eq!(code, 0, "{err}");
    let r: emotiond::pipeline::messages::FrameResult = serde_json::from_str(out.trim()).unwrap();
    check_message(&r);
    assert!(r.faces.len() >= 3, "{} faces", r.faces.len());
}

#[test]
fn validate_accepts_the_shipped_config() {
    let (code, out, err) = run_cli(&["validate", "--config", "config/emotiond.toml"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("configuration OK"), "{out}");
}

#[test]
fn unknown_config_key_names_key_and_file() {
    let cfg = write_config("[mqtt]\nbrokr = \"embedded\"\n");
    let (code, _, err) = run_cli(&["validate", "--config", cfg.path.to_str().unwrap()], &[]);
    assert_clean_failure(code, &err, &["brokr", "emotiond.toml"]);
}

#[test]
fn wrong_type_names_key() {
    let cfg = write_config("[classify]\nmax_batch = \"lots\"\n");
    let (code, _, err) = run_cli(&["validate", "--config", cfg.path.to_str().unwrap()], &[]);
    assert_clean_failure(code, &err, &["max_batch"]);
}

#[test]
fn environment_override_is_checked_too() {
    let (code, _, err) = run_cli(&["validate"], &[("EMOTIOND__MQTT__QOS", "7")]);
    assert_clean_failure(code, &err, &["mqtt.qos"]);
}

#[test]
fn missing_model_is_named() {
    let (code, _, err) = run_cli(
        &["run"],
        &[("EMOTIOND__CLASSIFY__MODEL", "/nonexistent/emotions.onnx")],
    );
    assert_clean_failure(
        code,
        &err,
        &["classify.model", "/nonexistent/emotions.onnx"],
    );
}

#[test]
fn corrupt_model_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("corrupt.onnx");
    std::fs::write(&model, b"this is not an onnx file").unwrap();
    let (code, _, err) = run_cli(
        &["validate"],
        &[("EMOTIOND__CLASSIFY__MODEL", model.to_str().unwrap())],
    );
    assert_clean_failure(code, &err, &["corrupt.onnx", "valid .onnx"]);
}

#[test]
fn model_without_contract_says_how_to_fix() {
    // YuNet is a valid ONNX file without emotiond metadata or sidecar.
    let (code, _, err) = run_cli(
        &["validate"],
        &[(
            "EMOTIOND__CLASSIFY__MODEL",
            "models/face_detection_yunet_2023mar.onnx",
        )],
    );
    assert_clean_failure(code, &err, &["no emotiond metadata", "sidecar"]);
}

#[test]
fn missing_onnx_runtime_library_is_named() {
    let (code, _, err) = run_cli(
        &["run"],
        &[(
            "EMOTIOND__CLASSIFY__ORT_LIBRARY",
            "/nonexistent/libonnxruntime.so",
        )],
    );
    assert_clean_failure(
        code,
        &err,
        &[
            "ONNX Runtime library",
            "/nonexistent/libonnxruntime.so",
            "make deps",
        ],
    );
}

#[test]
fn nonexistent_video_is_named() {
    let (code, _, err) = run_cli(&["classify", "/nonexistent/clip.mp4"], &[]);
    assert_clean_failure(code, &err, &["/nonexistent/clip.mp4", "does not exist"]);
    let cfg = write_config(&camera("door", "/nonexistent/door.mp4", true, false, 0.0));
    let (code, _, err) = run_cli(&["run", "--config", cfg.path.to_str().unwrap()], &[]);
    assert_clean_failure(code, &err, &["camera `door`", "/nonexistent/door.mp4"]);
}

#[test]
fn corrupt_video_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("corrupt.mp4");
    let mut bytes = std::fs::read(SAMPLE).unwrap()[..64].to_vec(); // a real MP4 header...
    bytes.extend((0..200_000u32).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)); // ...then noise
    std::fs::write(&clip, bytes).unwrap();
    let (code, _, err) = run_cli(&["classify", clip.to_str().unwrap()], &[]);
    assert_clean_failure(code, &err, &["camera `input`", "failed"]);
}

#[test]
fn bad_broker_address_is_rejected() {
    let (code, _, err) = run_cli(
        &["validate"],
        &[("EMOTIOND__MQTT__BROKER", "mqtt://host:70000")],
    );
    assert_clean_failure(code, &err, &["mqtt.broker", "70000"]);
}

/// Without the `gpu` feature, `--device gpu` says how to get it before any data is read.
#[cfg(all(feature = "train", not(feature = "gpu")))]
#[test]
fn train_on_gpu_without_the_feature_says_how_to_build_it() {
    let out = tempfile::tempdir().unwrap();
    let (code, _, err) = run_cli(
        &[
            "train",
            "--data",
            "/nonexistent/fer2013",
            "--out",
            out.path().to_str().unwrap(),
            "--device",
            "gpu",
        ],
        &[],
    );
    assert_clean_failure(code, &err, &["--device gpu", "--features gpu"]);
    assert!(!err.contains("/nonexistent/fer2013"), "{err}");
}

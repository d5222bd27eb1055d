//! Property-based fuzzing of the two parsers that read untrusted text: the config (TOML + environment) and the
//! model contract (ONNX metadata / sidecar). Neither may panic on any input; whatever they accept must be
//! internally consistent. `PROPTEST_CASES` raises the case count for a longer fuzzing run.

use std::collections::BTreeMap;
use std::path::Path;

use emotiond::config::Config;
use emotiond::model::{ModelSpec, keys};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// TOML-shaped text built from our real section and key names plus noise, so the fuzzer reaches deep paths.
fn toml_like() -> impl Strategy<Value = String> {
    let section = prop::sample::select(vec![
        "node",
        "log",
        "detect",
        "classify",
        "mqtt",
        "metrics",
        "bogus",
        "[cameras]",
    ]);
    let key = prop::sample::select(vec![
        "id",
        "uri",
        "device",
        "pipeline",
        "max_fps",
        "loop",
        "realtime",
        "backend",
        "score_threshold",
        "margin",
        "model",
        "max_batch",
        "max_delay_ms",
        "broker",
        "qos",
        "queue",
        "listen",
        "password",
        "format",
        "level",
        "stall_timeout_s",
        "nonsense",
    ]);
    let value = prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| format!("{v:?}")),
        any::<bool>().prop_map(|v| v.to_string()),
        "[a-z/:.0-9_-]{0,20}".prop_map(|s| format!("{s:?}")),
        Just("[1, 2]".to_string()),
        Just("{ a = 1 }".to_string()),
        "\\PC{0,12}",
    ];
    prop::collection::vec((section, prop::collection::vec((key, value), 0..5)), 0..5).prop_map(
        |sections| {
            let mut t = String::new();
            for (s, kvs) in sections {
                t.push_str(&format!("[{s}]\n"));
                for (k, v) in kvs {
                    t.push_str(&format!("{k} = {v}\n"));
                }
            }
            t
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn config_parser_never_panics(text in toml_like()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzz.toml");
        std::fs::write(&path, &text).unwrap();
        if let Ok(cfg) = Config::load(Some(&path)) {
            // Whatever parses can be validated without panicking.
            let _ = cfg.validate();
        }
    }

    #[test]
    fn config_parser_survives_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzz.toml");
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(c) = Config::load(Some(&path)) {
            let _ = c.validate();
        }
    }

    #[test]
    fn model_metadata_parser_never_panics_and_round_trips(
        entries in prop::collection::btree_map(
            prop::sample::select(vec![keys::LABELS, keys::INPUT_SIZE, keys::LAYOUT, keys::COLOR, keys::MEAN, keys::STD,
                                      keys::OUTPUT, keys::OUTPUT_KIND, keys::CROP_MARGIN, "emotiond.extra"]),
            prop_oneof![
                "\\PC{0,30}",
                "[0-9.,-]{0,12}",
                prop::sample::select(vec!["NCHW", "NHWC", "gray", "gray3", "rgb", "bgr", "logits", "probabilities",
                                          "64", "0.5", "0.5,0.5,0.5", "a,b,c", "angry,disgust,fear,happy,sad,surprise,neutral"])
                    .prop_map(str::to_string),
            ],
            0..10,
        )
    ) {
        let map: BTreeMap<String, String> = entries.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        if let Ok(spec) = ModelSpec::from_map(Path::new("fuzz.onnx"), &map) {
            prop_assert!(spec.labels.len() >= 2);
            prop_assert!(spec.std.iter().all(|s| *s > 0.0));
            prop_assert!(spec.input_len() > 0);
            let again = ModelSpec::from_map(Path::new("fuzz.onnx"), &spec.to_map()).unwrap();
            prop_assert_eq!(again, spec);
        }
    }
}

//! End to end on a tiny generated data set: train a few steps at 48 px, loss falls and accuracy beats chance;
//! export ONNX; burn vs ONNX Runtime parity; `eval` through the daemon's Classifier; `--resume` continues.
//! Needs the ONNX Runtime library (ORT_DYLIB_PATH, the installed copy, or the `onnxruntime` Python wheel).
#![cfg(feature = "train")]

mod common;

use common::{make_dataset, ort_library};

use std::path::{Path, PathBuf};

use burn::module::Module;
use clap::Parser;
use emotiond::model::{Classifier, ClassifierOptions, build_session};
use emotiond::train::model::{Arch, ModelConfig};
use emotiond::train::{TrainArgs, burn_logits, device, export, model_spec};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: TrainArgs,
}

#[derive(Parser)]
struct SoupCli {
    #[command(flatten)]
    args: emotiond::train::soup::SoupArgs,
}

/// The tiny run's flags with the plain head and a larger validation part.
fn args(data: &Path, out: &Path, extra: &[&str]) -> TrainArgs {
    let mut v = vec!["--plain-head", "--val-fraction", "0.15"];
    v.extend(extra);
    common::tiny_train_args(data, out, &v)
}

/// Max |Δ| between burn's inference forward and ort's `logits`/`probabilities` on random inputs.
fn parity(
    model: &emotiond::train::model::EfficientNet,
    onnx: &Path,
    size: usize,
    batches: &[usize],
    tta_flip: bool,
) -> f32 {
    let (mut session, _) = build_session(onnx, &ClassifierOptions::default()).unwrap();
    let mut worst = 0.0f32;
    let mut seed = 7u32;
    for &n in batches {
        let x: Vec<f32> = (0..n * 3 * size * size)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
            })
            .collect();
        let want = burn_logits(model, x.clone(), size, tta_flip);
        let t = ort::value::Tensor::from_array(([n, 3, size, size], x)).unwrap();
        let out = session.run(ort::inputs!["input" => t]).unwrap();
        let (shape, logits) = out["logits"].try_extract_tensor::<f32>().unwrap();
        assert_eq!(&shape[..], &[n as i64, 7]);
        let (_, probs) = out["probabilities"].try_extract_tensor::<f32>().unwrap();
        for (row, (l, p)) in want.chunks(7).zip(logits.chunks(7).zip(probs.chunks(7))) {
            let soft = emotiond::model::softmax(row);
            for j in 0..7 {
                worst = worst.max((row[j] - l[j]).abs()).max((soft[j] - p[j]).abs());
            }
        }
    }
    worst
}

/// `emotiond eval` on the test part of `data`, one thread, plots on, output next to the model.
fn eval_args(model: &Path, data: &Path) -> emotiond::eval::EvalArgs {
    emotiond::eval::EvalArgs {
        model: model.to_owned(),
        data: data.to_owned(),
        format: emotiond::train::data::DataFormat::Auto,
        split: None,
        val_fraction: 0.1,
        test_fraction: 0.1,
        seed: 42,
        label_map: None,
        ferplus: None,
        skip_bad: false,
        out: None,
        history: None,
        batch: 32,
        threads: 1,
        ort_library: None,
        no_plots: false,
    }
}

/// Largest element-wise |a − b|.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn train_export_parity_eval_resume() {
    ort_library();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tiny");
    make_dataset(&data, 24, 8);
    let out = dir.path().join("run");
    let t0 = std::time::Instant::now();

    // 1. Train: 4 epochs of 8 steps of 16 images at 48 px from random init; focal loss + class weights.
    let summary =
        emotiond::train::train(&args(&data, &out, &["--epochs", "8", "--class-weights"])).unwrap();
    eprintln!("trained in {:.1} s", t0.elapsed().as_secs_f64());
    let h = &summary.history;
    assert_eq!(h.len(), 8);
    assert!(
        h[7].train_loss < h[0].train_loss * 0.9,
        "loss did not fall: {h:?}"
    );
    let test = summary.test.as_ref().expect("held-out evaluation");
    eprintln!(
        "tiny test accuracy {:.3}, macro-F1 {:.3}",
        test.metrics.accuracy, test.metrics.macro_f1
    );
    assert!(
        test.metrics.accuracy > 2.0 / 7.0,
        "accuracy {} not above chance",
        test.metrics.accuracy
    );
    for f in [
        "model.onnx",
        "run_config.json",
        "history.json",
        "best.bpk",
        "checkpoint/state.json",
        "eval/metrics.json",
        "eval/predictions.csv",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }

    // 2. The daemon loads the export with no extra configuration, and reads our metadata.
    let onnx = out.join("model.onnx");
    let c = Classifier::load(&onnx, &ClassifierOptions::default()).unwrap();
    assert_eq!(c.spec().input_size, 48);
    assert_eq!(c.spec().color, emotiond::model::Color::Gray3);
    assert_eq!(
        c.spec()
            .extra
            .get("emotiond.architecture")
            .map(String::as_str),
        Some("efficientnet-lite0")
    );
    assert!(c.spec().extra.contains_key("emotiond.val_macro_f1"));
    drop(c);

    // 3. Parity: the best checkpoint in burn vs ort, two batch sizes.
    let mut cfg = ModelConfig::new(Arch::Lite0, 7);
    cfg.plain_head = true;
    let best = cfg
        .init(&device())
        .try_load_file(out.join("best.bpk"))
        .unwrap()
        .valid();
    let d = parity(&best, &onnx, 48, &[1, 5], false);
    eprintln!("parity max |Δ| = {d:e}");
    assert!(d <= 1e-4, "parity {d}");

    // 4. `eval` on the data set's test part writes metrics and plots.
    let eval_out = dir.path().join("eval");
    emotiond::eval::run(emotiond::eval::EvalArgs {
        out: Some(eval_out.clone()),
        ..eval_args(&onnx, &data)
    })
    .unwrap();
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval_out.join("metrics.json")).unwrap())
            .unwrap();
    assert_eq!(m["n"], 56);
    assert!((m["accuracy"].as_f64().unwrap() - test.metrics.accuracy).abs() < 1e-9);
    for f in [
        "confusion_matrix.png",
        "class_distribution.png",
        "training_curves.png",
    ] {
        assert!(eval_out.join(f).is_file(), "{f} missing");
    }
    //    `predictions.csv`: one row per image whose predicted column, and whose argmax of the seven
    //    probabilities, agree with each other and reproduce the reported accuracy.
    let csv = std::fs::read_to_string(eval_out.join("predictions.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "source,truth,predicted,p_angry,p_disgust,p_fear,p_happy,p_sad,p_surprise,p_neutral"
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 56);
    let mut correct = 0;
    for r in &rows {
        assert_eq!(r.len(), 10, "{r:?}");
        let p: Vec<f32> = r[3..].iter().map(|v| v.parse().unwrap()).collect();
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-3, "{r:?}");
        assert_eq!(
            emotiond::model::FER_LABELS[emotiond::train::data::argmax(&p)],
            r[2],
            "{r:?}"
        );
        correct += usize::from(r[1] == r[2]);
    }
    assert!((correct as f64 / 56.0 - test.metrics.accuracy).abs() < 1e-9);

    //    `--split val` measures the validation part the run held out: the same number of images, and the
    //    accuracy the run logged for the exported (best) epoch, to within one image (burn vs ort rounding).
    let val_out = dir.path().join("eval-val");
    emotiond::eval::run(emotiond::eval::EvalArgs {
        split: Some("val".into()),
        val_fraction: 0.15,
        out: Some(val_out.clone()),
        no_plots: true,
        ..eval_args(&onnx, &data)
    })
    .unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(val_out.join("metrics.json")).unwrap())
            .unwrap();
    let run_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run_config.json")).unwrap())
            .unwrap();
    let n_val = v["n"].as_u64().unwrap();
    assert_eq!(
        n_val,
        run_config["validation_images"].as_u64().unwrap(),
        "{v}"
    );
    let logged = h[summary.best_epoch - 1].val_acc;
    let measured = v["accuracy"].as_f64().unwrap();
    eprintln!("validation accuracy: logged {logged:.4}, eval --split val {measured:.4}");
    assert!(
        (measured - logged).abs() <= 1.0 / n_val as f64 + 1e-9,
        "{measured} vs {logged}"
    );

    // 5. `--init` fine-tunes the export: after one step at a negligible learning rate the new run's export
    //    classifies the held-out part like the source did. It also fine-tunes at another input size. A model
    //    `emotiond train` did not write is refused.
    let init = onnx.to_str().unwrap();
    let init_args = |out: &str| {
        let extra = [
            "--epochs",
            "1",
            "--max-steps-per-epoch",
            "1",
            "--init",
            init,
        ];
        args(&data, &dir.path().join(out), &extra)
    };
    let mut a = init_args("tuned");
    a.lr = 1e-9;
    let t = emotiond::train::train(&a).unwrap();
    let after = t
        .test
        .as_ref()
        .expect("held-out evaluation")
        .metrics
        .accuracy;
    eprintln!(
        "--init: held-out accuracy {after:.3} (source {:.3})",
        test.metrics.accuracy
    );
    assert!(
        (after - test.metrics.accuracy).abs() <= 3.0 / 56.0,
        "--init changed the model: {after} vs {}",
        test.metrics.accuracy
    );
    // The same weights fine-tuned at a higher resolution: the export declares the new input size, and the
    // daemon's classifier serves it.
    let mut up = init_args("up");
    up.input_size = 64;
    up.no_final_eval = true;
    // (Accuracy is not compared: these classes are ring frequencies, which a change of scale moves.)
    emotiond::train::train(&up).unwrap();
    let c = Classifier::load(
        &dir.path().join("up/model.onnx"),
        &ClassifierOptions::default(),
    )
    .unwrap();
    assert_eq!(c.spec().input_size, 64);
    drop(c);
    // `soup` averages the export and its fine-tuned copy: weight 1 on the source reproduces the source's
    // held-out accuracy exactly; the even mix (two nearly equal weight sets) stays within the same margin as
    // `--init`, and measuring on `--data` writes the soup's validation numbers into its metadata. A model of
    // another input size is refused by name.
    let tuned = dir.path().join("tuned/model.onnx");
    let soup = |weights: Option<[f64; 2]>, other: &Path, name: &str| {
        let out = dir.path().join(name);
        emotiond::train::soup::run(
            SoupCli::parse_from(
                [
                    "soup",
                    onnx.to_str().unwrap(),
                    other.to_str().unwrap(),
                    "--out",
                    out.to_str().unwrap(),
                    "--data",
                    data.to_str().unwrap(),
                    "--val-fraction",
                    "0.15",
                ]
                .into_iter()
                .map(String::from)
                .chain(weights.map(|w: [f64; 2]| format!("--weights={},{}", w[0], w[1]))),
            )
            .args,
        )
        .map(|()| out)
    };
    let test_accuracy = |model: &Path| {
        let out = dir.path().join("eval-soup");
        emotiond::eval::run(emotiond::eval::EvalArgs {
            out: Some(out.clone()),
            no_plots: true,
            ..eval_args(model, &data)
        })
        .unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap())
                .unwrap();
        v["accuracy"].as_f64().unwrap()
    };
    let only_source = soup(Some([1.0, 0.0]), &tuned, "soup-1-0.onnx").unwrap();
    assert_eq!(test_accuracy(&only_source), test.metrics.accuracy);
    let even = soup(None, &tuned, "soup-even.onnx").unwrap();
    let even_acc = test_accuracy(&even);
    eprintln!(
        "soup: held-out accuracy {even_acc:.3} (source {:.3})",
        test.metrics.accuracy
    );
    assert!((even_acc - test.metrics.accuracy).abs() <= 3.0 / 56.0);
    let c = Classifier::load(&even, &ClassifierOptions::default()).unwrap();
    let val_acc: f64 = c.spec().extra["emotiond.val_accuracy"].parse().unwrap();
    assert!(
        (val_acc - logged).abs() <= 3.0 / n_val as f64,
        "{val_acc} vs {logged}"
    );
    assert!(c.spec().extra["emotiond.recipe"].contains("\"soup\""));
    drop(c);
    let e = soup(None, &dir.path().join("up/model.onnx"), "soup-up.onnx")
        .unwrap_err()
        .to_string();
    assert!(e.contains("emotiond.input_size"), "{e}");
    let foreign = args(
        &data,
        &dir.path().join("foreign"),
        &[
            "--epochs",
            "1",
            "--init",
            "models/fer2013_mini_xception_64.onnx",
        ],
    );
    let e = emotiond::train::train(&foreign).unwrap_err().to_string();
    assert!(e.contains("--init") && e.contains("emotiond train"), "{e}");

    // 6. --resume continues after epoch 4 (the first four epochs are kept, one more runs).
    let resumed = emotiond::train::train(&args(
        &data,
        &out,
        &[
            "--epochs",
            "9",
            "--class-weights",
            "--resume",
            "--no-final-eval",
        ],
    ))
    .unwrap();
    assert_eq!(resumed.history.len(), 9);
    assert!((resumed.history[7].train_loss - h[7].train_loss).abs() < 1e-9); // kept from the checkpoint (JSON round trip)
    assert_eq!(resumed.history[8].epoch, 9);
    // A different architecture cannot resume this run.
    let mut other = args(&data, &out, &["--epochs", "10", "--resume"]);
    other.arch = Arch::B0;
    let e = emotiond::train::train(&other).unwrap_err();
    assert!(e.to_string().contains("--resume"), "{e}");
    eprintln!("total {:.1} s", t0.elapsed().as_secs_f64());
}

/// B0 (SE, SiLU) and Lite0 with the recipe head: export after BN statistics moved, parity at two batch sizes
/// and two input sizes, with and without flip averaging built into the graph.
#[test]
fn export_parity_b0_and_lite0() {
    ort_library();
    let dir = tempfile::tempdir().unwrap();
    for (arch, plain, size) in [(Arch::B0, false, 64), (Arch::Lite0, false, 48)] {
        let dev = device().autodiff();
        let mut cfg = ModelConfig::new(arch, 7);
        cfg.plain_head = plain;
        let model = cfg.init(&dev);
        // Training-mode forwards move the running statistics from (0, 1) to the activations' real statistics:
        // folding is exercised, and the inference-mode network stays sensitive to its input (with the initial
        // statistics the signal fades through the blocks and every input gives almost the same logits).
        for _ in 0..30 {
            let x = burn::tensor::Tensor::<4>::random(
                [4, 3, size, size],
                burn::tensor::Distribution::Normal(0.3, 1.5),
                &dev,
            );
            let _ = model.forward(x);
        }
        let model = model.valid();
        for tta in [false, true] {
            let path: PathBuf = dir.path().join(format!("{arch:?}-{tta}.onnx"));
            export(&model, &model_spec(size as u32, None), tta, &path).unwrap();
            let d = parity(&model, &path, size, &[1, 3], tta);
            eprintln!("{arch:?} {size}px tta {tta}: parity max |Δ| = {d:e}");
            assert!(d <= 1e-4, "{arch:?} tta {tta}: parity {d}");
        }
        // Flip averaging really averages: a mirrored input gives the same logits, the plain export does not.
        let tta: PathBuf = dir.path().join(format!("{arch:?}-true.onnx"));
        let (mut session, _) = build_session(&tta, &ClassifierOptions::default()).unwrap();
        let loaded = Classifier::load(&tta, &ClassifierOptions::default()).unwrap();
        assert_eq!(
            loaded.spec().extra.get("emotiond.tta").map(String::as_str),
            Some("hflip")
        );
        // Bright left third, dark elsewhere, plus a vertical ramp: nothing like its own mirror image.
        let img: Vec<f32> = (0..3 * size * size)
            .map(|i| {
                let (x, y) = (i % size, (i / size) % size);
                if x < size / 3 {
                    2.5
                } else {
                    -1.5 + 3.0 * y as f32 / size as f32
                }
            })
            .collect();
        let mirrored: Vec<f32> = img
            .chunks(size)
            .flat_map(|row| row.iter().rev().copied().collect::<Vec<_>>())
            .collect();
        let mut run = |x: Vec<f32>| {
            let t = ort::value::Tensor::from_array(([1usize, 3, size, size], x)).unwrap();
            let out = session.run(ort::inputs!["input" => t]).unwrap();
            out["logits"]
                .try_extract_tensor::<f32>()
                .unwrap()
                .1
                .to_vec()
        };
        let (a, b) = (run(img.clone()), run(mirrored.clone()));
        let sym = max_abs_diff(&a, &b);
        assert!(
            sym <= 1e-4,
            "{arch:?}: flip-averaged logits differ on a mirrored input by {sym}"
        );
        let plain = burn_logits(&model, img, size, false);
        let plain_m = burn_logits(&model, mirrored, size, false);
        let asym = max_abs_diff(&plain, &plain_m);
        eprintln!(
            "{arch:?}: mirrored input moves plain logits by {asym:e}, flip-averaged by {sym:e}"
        );
        assert!(
            asym > 1e-6 && asym > 100.0 * sym,
            "{arch:?}: the test cannot tell ({asym} vs {sym})"
        );
    }
}

/// `train --init`: an exported model's weights load back into burn (batch norms folded away and restored as
/// identities), compute what the file computes, keep doing so after the batch norms are re-estimated, and
/// after re-estimation a training-mode forward (batch statistics) agrees with inference. A file of another
/// architecture is refused by name.
#[test]
fn init_from_export_round_trips() {
    use burn::tensor::{Distribution, Tensor, TensorData};
    use emotiond::train::onnx::{load_weights, to_onnx};
    for (arch, size) in [(Arch::Lite0, 48), (Arch::B0, 48)] {
        let dev = device().autodiff();
        let mut cfg = ModelConfig::new(arch, 7);
        // Deterministic training-mode forward for the last check.
        (cfg.dropout, cfg.drop_path) = (0.0, 0.0);
        let trained = cfg.init(&dev);
        for _ in 0..30 {
            let x = Tensor::<4>::random([4, 3, size, size], Distribution::Normal(0.3, 1.5), &dev);
            let _ = trained.forward(x);
        }
        let trained = trained.valid();
        let mut meta = model_spec(size as u32, None).to_map();
        meta.insert("emotiond.architecture".into(), arch.name().into());
        let bytes = to_onnx(&trained, size, &meta, false);

        let mut imported = cfg.init(&dev);
        let n = load_weights(&mut imported, &bytes, &meta, &dev).unwrap();
        let convs = if arch == Arch::B0 { 49 + 2 * 16 } else { 49 };
        assert_eq!(
            n,
            2 * (convs + 2),
            "{arch:?}: weight + bias per conv and linear"
        );

        let calib: Vec<f32> = (0..64 * 3 * size * size)
            .map(|i| ((i * 7919 % 1000) as f32 / 250.0 - 2.0) * 0.8 + 0.3)
            .collect();
        let probe: Vec<f32> = calib[..3 * 3 * size * size].iter().rev().copied().collect();
        let want = burn_logits(&trained, probe.clone(), size, false);
        let close = |got: &[f32], what: &str, tol: f32| {
            let d = max_abs_diff(&want, got);
            eprintln!("{arch:?} {what}: max |Δ| = {d:e}");
            assert!(d <= tol, "{arch:?} {what}: {d}");
        };
        close(
            &burn_logits(&imported.clone().valid(), probe.clone(), size, false),
            "imported",
            1e-4,
        );
        let x = Tensor::<4>::from_data(TensorData::new(calib.clone(), [64, 3, size, size]), &dev);
        imported.recalibrate_bn(x.clone());
        close(
            &burn_logits(&imported.clone().valid(), probe, size, false),
            "re-estimated",
            1e-4,
        );
        // Training mode normalises with the batch's own statistics: on the calibration batch they are the
        // re-estimated ones, so the logits match inference (the spread of the logits is the scale).
        let infer = burn_logits(&imported.clone().valid(), calib, size, false);
        let train_mode: Vec<f32> = imported
            .forward(x)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        let spread = infer.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = max_abs_diff(&infer, &train_mode);
        eprintln!(
            "{arch:?} training mode vs inference on the calibration batch: {d:e} (logits up to {spread:e})"
        );
        assert!(
            d <= 1e-3 * spread.max(1.0),
            "{arch:?}: training-mode forward is off by {d}"
        );

        // Another architecture is refused, naming the key.
        let other = if arch == Arch::B0 {
            Arch::Lite0
        } else {
            Arch::B0
        };
        let mut m = ModelConfig::new(other, 7).init(&dev);
        let mut want_meta = meta.clone();
        want_meta.insert("emotiond.architecture".into(), other.name().into());
        let err = load_weights(&mut m, &bytes, &want_meta, &dev).unwrap_err();
        assert!(err.contains("emotiond.architecture"), "{err}");
    }
}

#[test]
fn ferplus_blend_is_checked_before_training() {
    // The weight is bounded at parse time.
    for bad in ["0", "1.5", "x"] {
        let err = Cli::try_parse_from(["train", "--data", "d", "--ferplus-weight", bad])
            .err()
            .unwrap_or_else(|| panic!("--ferplus-weight {bad} was accepted"))
            .to_string();
        assert!(err.contains("(0, 1]"), "{err}");
    }
    // Votes for other images than the data set's: a blend that would change nothing is an error naming the file.
    let dir = tempfile::tempdir().unwrap();
    make_dataset(dir.path(), 4, 1);
    let votes = dir.path().join("votes.csv");
    std::fs::write(
        &votes,
        "jpeg_path,ferplus_image,rmse,ambiguous_duplicate,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF\n\
         train/angry/Training_1.jpg,a.png,1,0,2,0,0,0,8,0,0,0,0,0\n",
    )
    .unwrap();
    let a = args(
        dir.path(),
        &dir.path().join("run"),
        &[
            "--ferplus",
            votes.to_str().unwrap(),
            "--ferplus-weight",
            "0.3",
        ],
    );
    let err = emotiond::train::train(&a).expect_err("no vote matched, yet training ran");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("votes.csv") && msg.contains("no training image matched"),
        "{msg}"
    );
}

//! `train --device gpu` (the `gpu` cargo feature): the GPU computes what the CPU computes, and a whole `train`
//! run on it exports a model ONNX Runtime serves. Runs on any Vulkan device, including Mesa's lavapipe on a
//! machine without a GPU (`mesa-vulkan-drivers`, installed by deploy/install-test-tools.sh), which is how CI
//! exercises this path. `make test-gpu` runs it.
#![cfg(feature = "gpu")]

mod common;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use emotiond::train::device::{self, Compute};
use emotiond::train::loss::{LossKind, loss};
use emotiond::train::model::{Arch, EfficientNet, ModelConfig};

const SIZE: usize = 48;
const BATCH: usize = 8;

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// Loss, logits and two gradients (first and last layer) of one training-mode step (batch statistics on,
/// dropout and stochastic depth off, so both devices compute the same function).
fn step(model: &EfficientNet, x: &[f32], t: &[f32], dev: &Device) -> [Vec<f32>; 4] {
    let xs = Tensor::<4>::from_data(TensorData::new(x.to_vec(), [BATCH, 3, SIZE, SIZE]), dev);
    let ts = Tensor::<2>::from_data(TensorData::new(t.to_vec(), [BATCH, 7]), dev);
    let logits = model.forward(xs);
    let l = loss(
        logits.clone(),
        ts,
        None,
        LossKind::Focal {
            alpha: 0.25,
            gamma: 2.0,
        },
    );
    let grads = GradientsParams::from_grads(l.backward(), model);
    let g_stem = grads
        .get::<4>(model.stem.conv.weight.id)
        .expect("stem gradient");
    let g_fc1 = grads.get::<2>(model.fc1.weight.id).expect("fc1 gradient");
    [to_vec(l), to_vec(logits), to_vec(g_stem), to_vec(g_fc1)]
}

/// ‖a − b‖ / ‖a‖ (Euclidean), in f64.
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let norm = |it: &mut dyn Iterator<Item = f64>| it.map(|v| v * v).sum::<f64>().sqrt();
    let diff = norm(&mut a.iter().zip(b).map(|(x, y)| (*x - *y) as f64));
    diff / norm(&mut a.iter().map(|x| *x as f64)).max(1e-30)
}

/// The GPU, with the autotuner at its minimal level: on a CPU-emulated device (lavapipe, in CI) full tuning
/// benchmarks every kernel variant for minutes; the kernels' results are the same either way.
fn gpu() -> Device {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("CUBECL_AUTOTUNE_LEVEL").is_none() {
            // SAFETY: set before the GPU runtime starts, which is the first thing to read it.
            unsafe { std::env::set_var("CUBECL_AUTOTUNE_LEVEL", "minimal") };
        }
    });
    device::select(Compute::Gpu).expect("a Vulkan device (mesa-vulkan-drivers gives lavapipe)");
    device::device()
}

#[test]
fn gpu_training_step_matches_cpu() {
    let gpu = gpu().autodiff();
    let cpu = Device::flex().autodiff();
    cpu.seed(7);
    let mut cfg = ModelConfig::new(Arch::Lite0, 7);
    cfg.dropout = 0.0;
    cfg.drop_path = 0.0;
    let on_cpu = cfg.init(&cpu);
    // The same weights on the GPU, through the checkpoint format `--resume` reads.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.bpk");
    on_cpu.clone().save_file(&file).unwrap();
    let on_gpu = cfg.init(&gpu).try_load_file(&file).unwrap();

    let x = to_vec(Tensor::<4>::random(
        [BATCH, 3, SIZE, SIZE],
        Distribution::Normal(0.0, 1.0),
        &Device::flex(),
    ));
    let t: Vec<f32> = (0..BATCH)
        .flat_map(|i| (0..7).map(move |k| if k == i % 7 { 1.0 } else { 0.0 }))
        .collect();
    let a = step(&on_cpu, &x, &t, &cpu);
    let b = step(&on_gpu, &x, &t, &gpu);
    // Summation orders differ between the engines, and the difference grows through the backward pass: at
    // 48 px the last stages see 2×2 maps, whose batch norms (statistics over 32 values) amplify it. Measured
    // on lavapipe: 3e-5 down to the last block, 3e-4 at block 13, 3e-3 below block 12, 7e-3 at the stem.
    // A wrong kernel gives differences of order 1.
    for (name, a, b, tol) in [
        ("loss", &a[0], &b[0], 1e-4),
        ("logits", &a[1], &b[1], 1e-4),
        ("fc1 gradient", &a[3], &b[3], 1e-3),
        ("stem gradient", &a[2], &b[2], 3e-2),
    ] {
        let d = rel_diff(a, b);
        eprintln!("{name}: relative difference {d:.2e} (tolerance {tol:.0e})");
        assert!(d < tol, "{name}: GPU and CPU differ by {d:.2e} (relative)");
    }
    // Not a trivial agreement: the loss is a real, non-zero number and the gradients are not all zero.
    assert!(a[0][0].is_finite() && a[0][0] > 0.0, "loss {:?}", a[0]);
    assert!(a[2].iter().any(|g| g.abs() > 0.0) && a[3].iter().any(|g| g.abs() > 0.0));
}

#[test]
fn train_on_the_gpu_exports_a_model_onnx_runtime_serves() {
    common::ort_library();
    gpu();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tiny");
    common::make_dataset(&data, 16, 4);
    let out = dir.path().join("run");
    let args = |out: &std::path::Path, extra: &[&str]| {
        let mut v = vec!["--device", "gpu"];
        v.extend(extra);
        common::tiny_train_args(&data, out, &v)
    };
    let summary =
        emotiond::train::train(&args(&out, &["--epochs", "2"])).expect("train --device gpu");

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run_config.json")).unwrap())
            .unwrap();
    assert!(
        config["backend"].as_str().unwrap().contains("wgpu"),
        "{}",
        config["backend"]
    );
    assert_eq!(summary.history.len(), 2);
    assert!(
        summary.history[1].train_loss < summary.history[0].train_loss,
        "training on the GPU does not lower the loss: {:?}",
        summary.history
    );
    for e in &summary.history {
        assert!(
            e.train_loss.is_finite() && e.train_loss > 0.0 && e.val_loss.is_finite(),
            "{e:?}"
        );
    }
    // The export went through ONNX Runtime (the daemon's path) on the held-out images.
    let test = summary.test.expect("final evaluation");
    assert_eq!(
        test.metrics.n,
        7 * 4,
        "the test/ folder, 4 images per class"
    );
    assert!(summary.onnx.is_file());

    // Fine-tuning that export on the GPU: the weights load there and the batch norms are re-estimated there.
    let tuned = dir.path().join("tuned");
    let onnx = summary.onnx.to_str().unwrap().to_owned();
    let again = emotiond::train::train(&args(&tuned, &["--epochs", "1", "--init", &onnx]))
        .expect("train --device gpu --init");
    let e = &again.history[0];
    assert!(e.train_loss.is_finite() && e.val_loss.is_finite(), "{e:?}");
    assert!(again.onnx.is_file());
}

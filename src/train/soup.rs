//! `emotiond soup`: averages the weights of models fine-tuned from the same start ("model soup", Wortsman et
//! al. 2022) into one model of the same size and speed.
//!
//! In: two or more ONNX files `emotiond train` exported with the same architecture, head, input size, labels and
//! graph (runs that continued from one shared model with `--init`, so their weights lie in one basin), and
//! optional weights. Out: one ONNX file whose weight and bias tensors are the weighted means of the inputs'
//! (batch norms were folded into them at export, so each layer is the mean of the inputs' effective layers); its
//! metadata keeps the shared serving contract and lists the ingredients and their recipes (`emotiond.recipe` =
//! `{"soup": [...]}`). With `--data`, every ingredient and the soup are measured on the validation part the runs
//! held out, through the daemon's path, and the soup's numbers go into its metadata, as `train` does for a run's
//! best epoch.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use prost::Message;

use super::onnx::{ModelProto, StringStringEntryProto};
use crate::eval::{Metrics, evaluate};
use crate::model::{Classifier, ClassifierOptions};
use crate::train::data::{self, DataFormat, LoadOptions};

/// Metadata that describes one training run rather than the model's contract; rewritten for a soup.
const PER_RUN: [&str; 6] = [
    "emotiond.best_epoch",
    "emotiond.recipe",
    "emotiond.dataset",
    "emotiond.val_accuracy",
    "emotiond.val_macro_f1",
    "emotiond.val_f1_per_class",
];

/// Initialiser name prefixes of trained weights and biases (the rest are constants of the graph).
const TRAINED: [&str; 4] = ["w_", "b_", "fc_w_", "fc_b_"];

#[derive(clap::Args, Debug, Clone)]
pub struct SoupArgs {
    /// The models to average: ONNX files `emotiond train` exported from the same start.
    #[arg(required = true, num_args = 2..)]
    pub models: Vec<PathBuf>,
    /// Where to write the averaged model.
    #[arg(long)]
    pub out: PathBuf,
    /// Weight of each model, comma-separated, in the order given (normalised to sum to 1); default equal.
    #[arg(long, value_delimiter = ',')]
    pub weights: Option<Vec<f64>>,
    /// Data set the runs trained on: measures every ingredient and the soup on the validation part they held
    /// out (`--val-fraction`, `--seed` as in those runs) and records the soup's numbers in its metadata.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f32,
    /// The runs' `--test-fraction` (plain folders only).
    #[arg(long, default_value_t = 0.1)]
    pub test_fraction: f32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// ONNX Runtime shared library (default: `ORT_DYLIB_PATH`, then the system's).
    #[arg(long)]
    pub ort_library: Option<PathBuf>,
}

fn meta(m: &ModelProto) -> BTreeMap<String, String> {
    m.metadata_props
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect()
}

fn is_trained(name: &str) -> bool {
    TRAINED.iter().any(|p| name.starts_with(p))
}

/// Averages `models` (decoded, with their paths for messages) with `weights` (summing to 1). The first model's
/// graph and contract are the reference; every other must match them exactly but for trained tensors' values.
pub fn average(models: &[(PathBuf, ModelProto)], weights: &[f64]) -> anyhow::Result<ModelProto> {
    let (first_path, first) = models.first().context("no models to average")?;
    if weights.len() != models.len() {
        bail!("{} weights for {} models", weights.len(), models.len());
    }
    let graph0 = first
        .graph
        .as_ref()
        .context("the first model has no graph")?;
    let meta0 = meta(first);
    let mut sums: Vec<Option<Vec<f64>>> = graph0
        .initializer
        .iter()
        .map(|t| {
            let n = t.dims.iter().product::<i64>().max(0) as usize;
            is_trained(&t.name).then(|| vec![0.0; n])
        })
        .collect();
    for ((path, m), &w) in models.iter().zip(weights) {
        let name = path.display();
        if m.producer_name != "emotiond" {
            bail!(
                "{name} was produced by `{}`; only models `emotiond train` exported can be averaged",
                m.producer_name
            );
        }
        let g = m
            .graph
            .as_ref()
            .with_context(|| format!("{name} has no graph"))?;
        let mt = meta(m);
        for key in meta0.keys().chain(mt.keys()) {
            if PER_RUN.contains(&key.as_str()) {
                continue;
            }
            let (a, b) = (meta0.get(key), mt.get(key));
            if a != b {
                bail!(
                    "{name}: metadata `{key}` is {:?}, {} has {:?}; only models of the same architecture, head, \
                     input size, labels and preprocessing can be averaged",
                    b.map_or("(missing)", String::as_str),
                    first_path.display(),
                    a.map_or("(missing)", String::as_str)
                );
            }
        }
        if g.node != graph0.node
            || g.input != graph0.input
            || g.output != graph0.output
            || g.initializer.len() != graph0.initializer.len()
        {
            bail!(
                "{name} has a different graph than {} (another export option, e.g. --tta-flip, or another \
                 version of the exporter); export both the same way",
                first_path.display()
            );
        }
        for ((t, t0), sum) in g.initializer.iter().zip(&graph0.initializer).zip(&mut sums) {
            if t.name != t0.name || t.dims != t0.dims || t.data_type != t0.data_type {
                bail!(
                    "{name}: tensor `{}` {:?} does not match `{}` {:?} of {}",
                    t.name,
                    t.dims,
                    t0.name,
                    t0.dims,
                    first_path.display()
                );
            }
            match sum {
                Some(sum) if t.raw_data.len() == 4 * sum.len() => {
                    for (s, c) in sum.iter_mut().zip(t.raw_data.chunks_exact(4)) {
                        *s += w * f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64;
                    }
                }
                Some(_) => bail!("{name}: tensor `{}` is not stored as raw fp32", t.name),
                None if t.raw_data != t0.raw_data => bail!(
                    "{name}: graph constant `{}` differs from {}'s",
                    t.name,
                    first_path.display()
                ),
                None => {}
            }
        }
    }
    let mut out = first.clone();
    let graph = out.graph.as_mut().expect("checked above");
    for (t, sum) in graph.initializer.iter_mut().zip(sums) {
        if let Some(sum) = sum {
            t.raw_data = sum.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect();
        }
    }
    // The contract stays; what described one run is replaced by the list of ingredients.
    let mut m: BTreeMap<String, String> = meta0
        .into_iter()
        .filter(|(k, _)| !PER_RUN.contains(&k.as_str()))
        .collect();
    let ingredients: Vec<serde_json::Value> = models
        .iter()
        .zip(weights)
        .map(|((path, model), w)| {
            let mt = meta(model);
            let recipe = mt
                .get("emotiond.recipe")
                .and_then(|r| serde_json::from_str::<serde_json::Value>(r).ok());
            serde_json::json!({
                "model": short_name(path),
                "weight": (w * 1e4).round() / 1e4,
                "best_epoch": mt.get("emotiond.best_epoch"),
                "val_accuracy": mt.get("emotiond.val_accuracy"),
                "val_macro_f1": mt.get("emotiond.val_macro_f1"),
                "recipe": recipe,
            })
        })
        .collect();
    m.insert(
        "emotiond.recipe".into(),
        serde_json::json!({ "soup": ingredients }).to_string(),
    );
    if let Some(d) = meta(first).get("emotiond.dataset") {
        m.insert("emotiond.dataset".into(), d.clone());
    }
    out.metadata_props = m
        .into_iter()
        .map(|(key, value)| StringStringEntryProto { key, value })
        .collect();
    Ok(out)
}

/// `stage4/model.onnx` for `/any/where/stage4/model.onnx`: names runs apart without the machine's paths.
fn short_name(path: &Path) -> String {
    let parts: Vec<_> = path.components().rev().take(2).collect();
    parts
        .iter()
        .rev()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

fn normalised(weights: Option<&[f64]>, n: usize) -> anyhow::Result<Vec<f64>> {
    let w = weights.map_or_else(|| vec![1.0; n], <[f64]>::to_vec);
    if w.len() != n {
        bail!(
            "--weights has {} values for {n} models; give one per model",
            w.len()
        );
    }
    if w.iter().any(|&x| !x.is_finite() || x < 0.0) || w.iter().sum::<f64>() <= 0.0 {
        bail!("--weights must be non-negative numbers, not all zero: {w:?}");
    }
    let sum: f64 = w.iter().sum();
    Ok(w.into_iter().map(|x| x / sum).collect())
}

fn write(path: &Path, model: &ModelProto) -> anyhow::Result<()> {
    let tmp = path.with_extension("onnx.tmp");
    std::fs::write(&tmp, model.encode_to_vec())
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing {}", path.display()))
}

pub fn run(args: SoupArgs) -> anyhow::Result<()> {
    let weights = normalised(args.weights.as_deref(), args.models.len())?;
    let models = args
        .models
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            let m = ModelProto::decode(bytes.as_slice())
                .with_context(|| format!("{} is not an ONNX model", p.display()))?;
            Ok((p.clone(), m))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut soup = average(&models, &weights)?;
    write(&args.out, &soup)?;

    if let Some(data_path) = &args.data {
        let copts = ClassifierOptions {
            ort_library: args.ort_library.clone(),
            intra_threads: 2,
            ..Default::default()
        };
        let opts = LoadOptions {
            format: Some(DataFormat::Auto),
            skip_bad: false,
            label_map: Default::default(),
            ferplus: None,
            test_fraction: 0.0,
            seed: 0,
        };
        let (ds, split) = data::load_validation(
            data_path,
            &opts,
            args.val_fraction,
            args.test_fraction,
            args.seed,
        )?;
        eprintln!(
            "Measuring on {} ({split}): {} images.",
            data_path.display(),
            ds.len()
        );
        let measure = |path: &Path| -> anyhow::Result<Metrics> {
            let mut c = Classifier::load(path, &copts)?;
            Ok(evaluate(&mut c, &ds, 64)?.0)
        };
        println!(
            "{:<44} {:>7} {:>9} {:>9}",
            "model", "weight", "val acc", "macro-F1"
        );
        for ((path, _), w) in models.iter().zip(&weights) {
            let m = measure(path)?;
            println!(
                "{:<44} {w:>7.3} {:>9.4} {:>9.4}",
                path.display(),
                m.accuracy,
                m.macro_f1
            );
        }
        let m = measure(&args.out)?;
        println!(
            "{:<44} {:>7} {:>9.4} {:>9.4}",
            "soup", "", m.accuracy, m.macro_f1
        );
        let mut props: BTreeMap<String, String> = meta(&soup);
        props.extend(m.validation_metadata());
        soup.metadata_props = props
            .into_iter()
            .map(|(key, value)| StringStringEntryProto { key, value })
            .collect();
        write(&args.out, &soup)?;
    }
    eprintln!("Wrote {}.", args.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::onnx::{GraphProto, TensorProto};

    fn tensor(name: &str, v: &[f32]) -> TensorProto {
        TensorProto {
            dims: vec![v.len() as i64],
            data_type: 1,
            name: name.into(),
            raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    fn model(w: &[f32], six: f32, size: &str) -> (PathBuf, ModelProto) {
        let m = ModelProto {
            producer_name: "emotiond".into(),
            graph: Some(GraphProto {
                initializer: vec![tensor("w_0", w), tensor("six_1", &[six])],
                ..Default::default()
            }),
            metadata_props: [
                ("emotiond.input_size", size),
                ("emotiond.val_accuracy", "0.5"),
                ("emotiond.recipe", r#"{"loss":"Focal"}"#),
            ]
            .into_iter()
            .map(|(k, v)| StringStringEntryProto {
                key: k.into(),
                value: v.into(),
            })
            .collect(),
            ..Default::default()
        };
        (PathBuf::from(format!("m{}.onnx", w[0])), m)
    }

    fn values(m: &ModelProto, i: usize) -> Vec<f32> {
        m.graph.as_ref().unwrap().initializer[i]
            .raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn weighted_mean_of_trained_tensors_only() {
        let ms = [model(&[1.0, 2.0], 6.0, "96"), model(&[3.0, 6.0], 6.0, "96")];
        let soup = average(&ms, &normalised(Some(&[1.0, 3.0][..]), 2).unwrap()).unwrap();
        assert_eq!(values(&soup, 0), [2.5, 5.0]);
        assert_eq!(values(&soup, 1), [6.0]);
        let meta = meta(&soup);
        assert_eq!(meta["emotiond.input_size"], "96");
        // Per-run numbers do not describe the soup; the ingredients and their recipes are listed instead.
        assert!(!meta.contains_key("emotiond.val_accuracy"));
        let recipe: serde_json::Value = serde_json::from_str(&meta["emotiond.recipe"]).unwrap();
        assert_eq!(recipe["soup"][1]["weight"], 0.75);
        assert_eq!(recipe["soup"][1]["model"], "m3.onnx");
        assert_eq!(
            short_name(Path::new("/runs/stage4/model.onnx")),
            "stage4/model.onnx"
        );
        assert_eq!(recipe["soup"][0]["recipe"]["loss"], "Focal");
        // Weight 1 for one model reproduces it bit for bit.
        let one = average(&ms, &normalised(Some(&[0.0, 1.0][..]), 2).unwrap()).unwrap();
        assert_eq!(values(&one, 0), [3.0, 6.0]);
    }

    #[test]
    fn refuses_what_does_not_match() {
        let a = model(&[1.0, 2.0], 6.0, "96");
        let e = average(&[a.clone(), model(&[1.0, 2.0], 6.0, "64")], &[0.5, 0.5]).unwrap_err();
        assert!(e.to_string().contains("emotiond.input_size"), "{e}");
        let e = average(&[a.clone(), model(&[1.0, 2.0], 5.0, "96")], &[0.5, 0.5]).unwrap_err();
        assert!(e.to_string().contains("six_1"), "{e}");
        let e = average(&[a.clone(), model(&[1.0], 6.0, "96")], &[0.5, 0.5]).unwrap_err();
        assert!(e.to_string().contains("w_0"), "{e}");
        let mut foreign = a.clone();
        foreign.1.producer_name = "tf2onnx".into();
        let e = average(&[a, foreign], &[0.5, 0.5]).unwrap_err();
        assert!(e.to_string().contains("tf2onnx"), "{e}");
        assert!(normalised(Some(&[1.0][..]), 2).is_err());
        assert!(normalised(Some(&[0.0, 0.0][..]), 2).is_err());
        assert!(normalised(Some(&[-1.0, 2.0][..]), 2).is_err());
    }
}

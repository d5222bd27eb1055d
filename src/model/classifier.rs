//! One ort session for an emotion model plus its [`ModelSpec`].
//!
//! In: a batch of preprocessed inputs (`n × spec.input_len()` f32). Out: one probability vector per input, in
//! the model's label order. The daemon's inference thread, `classify`, `eval` and `train`'s final evaluation
//! all go through [`Classifier::run`], so they measure the same thing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{Tensor, ValueType};

use super::runtime::{RuntimeError, init_runtime};
use super::spec::{Layout, ModelSpec, OutputKind, SpecError};

/// Which ONNX Runtime execution provider to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    /// CUDA when this build has the `cuda` feature and a GPU answers, else CPU.
    #[default]
    Auto,
    Cpu,
    /// CUDA or fail (needs the `cuda` build feature and the GPU ONNX Runtime library).
    Cuda,
}

/// Session settings. Thread counts matter on small hosts: one intra-op thread per core the host can spare for
/// inference (`classify.threads`), one inter-op thread, no spinning.
#[derive(Debug, Clone)]
pub struct ClassifierOptions {
    pub ort_library: Option<PathBuf>,
    pub intra_threads: usize,
    pub provider: ExecutionProvider,
}

impl Default for ClassifierOptions {
    fn default() -> Self {
        Self {
            ort_library: None,
            intra_threads: 1,
            provider: ExecutionProvider::Auto,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClassifierError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("model {0}: file not found; check `classify.model` in the config")]
    NotFound(PathBuf),
    #[error("model {path}: ONNX Runtime could not load it ({reason}); is it a valid .onnx file?")]
    Load { path: PathBuf, reason: String },
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("model {path}: {reason}")]
    Shape { path: PathBuf, reason: String },
    #[error("model {path}: inference failed: {reason}")]
    Run { path: PathBuf, reason: String },
    #[error(
        "execution provider {0:?} requested but this build has no `cuda` feature; rebuild with `--features cuda`"
    )]
    ProviderUnavailable(ExecutionProvider),
}

pub struct Classifier {
    session: Session,
    spec: ModelSpec,
    path: PathBuf,
    input_name: String,
    output_name: String,
    provider: &'static str,
}

/// Builds an ort session with our thread policy: `intra_threads` workers that sleep instead of spin-waiting
/// (spinning was measured to slow OpenCV's detection in the same process by 30–45% on 2 cores).
pub fn build_session(
    path: &Path,
    opts: &ClassifierOptions,
) -> Result<(Session, &'static str), ClassifierError> {
    if !path.is_file() {
        return Err(ClassifierError::NotFound(path.to_owned()));
    }
    let env = init_runtime(opts.ort_library.as_deref())?;
    let load = |e: String| ClassifierError::Load {
        path: path.to_owned(),
        reason: e,
    };
    // ort's builder error carries the builder back (large); it is turned into our error at once.
    #[allow(clippy::result_large_err)]
    let mut builder = Session::builder(&env)
        .map_err(|e| load(e.to_string()))?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .and_then(|b| b.with_intra_threads(opts.intra_threads.max(1)))
        .and_then(|b| b.with_inter_threads(1))
        .and_then(|b| b.with_intra_op_spinning(false))
        .and_then(|b| b.with_inter_op_spinning(false))
        .map_err(|e| load(e.to_string()))?;
    let provider = match opts.provider {
        ExecutionProvider::Cpu => "CPU",
        #[cfg(feature = "cuda")]
        p => {
            let cuda = ort::ep::CUDA::default().build();
            let cuda = if p == ExecutionProvider::Cuda {
                cuda.error_on_failure()
            } else {
                cuda
            };
            builder = builder
                .with_execution_providers([cuda])
                .map_err(|e| load(e.to_string()))?;
            use ort::ep::ExecutionProvider as _;
            if ort::ep::CUDA::is_available().unwrap_or(false) {
                "CUDA"
            } else {
                "CPU"
            }
        }
        #[cfg(not(feature = "cuda"))]
        ExecutionProvider::Auto => "CPU",
        #[cfg(not(feature = "cuda"))]
        p @ ExecutionProvider::Cuda => return Err(ClassifierError::ProviderUnavailable(p)),
    };
    let session = builder
        .commit_from_file(path)
        .map_err(|e| load(e.to_string()))?;
    Ok((session, provider))
}

impl Classifier {
    /// Loads a model; its contract comes from ONNX metadata, else from the sidecar `<model>.json`.
    pub fn load(path: &Path, opts: &ClassifierOptions) -> Result<Self, ClassifierError> {
        let (session, provider) = build_session(path, opts)?;
        let spec = read_spec(&session, path)?;

        let shape_err = |reason: String| ClassifierError::Shape {
            path: path.to_owned(),
            reason,
        };
        let input = session
            .inputs()
            .first()
            .ok_or_else(|| shape_err("the model has no input".into()))?;
        if let ValueType::Tensor { shape, .. } = input.dtype() {
            let dims: Vec<i64> = shape.iter().copied().collect();
            let s = spec.input_size as i64;
            let c = spec.color.channels() as i64;
            let want = match spec.layout {
                Layout::Nchw => [-1, c, s, s],
                Layout::Nhwc => [-1, s, s, c],
            };
            let ok = dims.len() == 4
                && dims
                    .iter()
                    .zip(want)
                    .skip(1)
                    .all(|(d, w)| *d < 0 || *d == w);
            if !ok {
                return Err(shape_err(format!(
                    "input `{}` has shape {dims:?} but the metadata says {} {}×{}×{} ({})",
                    input.name(),
                    spec.layout,
                    s,
                    s,
                    c,
                    spec.color
                )));
            }
        }
        let input_name = input.name().to_owned();
        let output_name = match &spec.output {
            Some(name) => session
                .outputs()
                .iter()
                .find(|o| o.name() == name)
                .map(|o| o.name().to_owned())
                .ok_or_else(|| {
                    shape_err(format!(
                        "metadata names output `{name}` but the model has no such output"
                    ))
                })?,
            None => session
                .outputs()
                .iter()
                .find(|o| o.name() == "probabilities")
                .or_else(|| session.outputs().first())
                .map(|o| o.name().to_owned())
                .ok_or_else(|| shape_err("the model has no output".into()))?,
        };
        Ok(Self {
            session,
            spec,
            path: path.to_owned(),
            input_name,
            output_name,
            provider,
        })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `CPU` or `CUDA`: the execution provider this session asked for.
    pub fn provider(&self) -> &'static str {
        self.provider
    }

    /// Classifies `inputs.len() / spec.input_len()` preprocessed images; returns one probability vector each.
    pub fn run(&mut self, inputs: Vec<f32>) -> Result<Vec<Vec<f32>>, ClassifierError> {
        let per = self.spec.input_len();
        let n = inputs.len() / per;
        if n * per != inputs.len() {
            return Err(ClassifierError::Run {
                path: self.path.clone(),
                reason: format!(
                    "{} input values are not a whole number of {per}-value images",
                    inputs.len()
                ),
            });
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let s = self.spec.input_size as usize;
        let c = self.spec.color.channels();
        let shape = match self.spec.layout {
            Layout::Nchw => [n, c, s, s],
            Layout::Nhwc => [n, s, s, c],
        };
        let run_err = |e: String| ClassifierError::Run {
            path: self.path.clone(),
            reason: e,
        };
        let tensor = Tensor::from_array((shape, inputs)).map_err(|e| run_err(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs![self.input_name.as_str() => tensor])
            .map_err(|e| run_err(e.to_string()))?;
        let (out_shape, data) = outputs[self.output_name.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(|e| run_err(e.to_string()))?;
        let k = self.spec.labels.len();
        if out_shape.len() != 2 || out_shape[1] as usize != k || out_shape[0] as usize != n {
            return Err(run_err(format!(
                "output has shape {:?}, expected [{n}, {k}]",
                &out_shape[..]
            )));
        }
        Ok(data
            .chunks(k)
            .map(|row| match self.spec.output_kind {
                OutputKind::Probabilities => row.to_vec(),
                OutputKind::Logits => softmax(row),
            })
            .collect())
    }
}

fn read_spec(session: &Session, path: &Path) -> Result<ModelSpec, ClassifierError> {
    let mut map = BTreeMap::new();
    if let Ok(meta) = session.metadata() {
        for key in meta.custom_keys().unwrap_or_default() {
            if let Some(v) = meta.custom(&key) {
                map.insert(key, v);
            }
        }
    }
    if map.keys().any(|k| k == super::keys::LABELS) {
        return Ok(ModelSpec::from_map(path, &map)?);
    }
    let sidecar = ModelSpec::sidecar_path(path);
    match ModelSpec::read_sidecar(&sidecar)? {
        Some(side) => Ok(ModelSpec::from_map(&sidecar, &side)?),
        None => Err(SpecError::Missing {
            model: path.to_owned(),
            sidecar,
        }
        .into()),
    }
}

/// Numerically stable softmax.
pub fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = row.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

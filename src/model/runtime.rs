//! Loads the ONNX Runtime shared library once per process.
//!
//! In: an optional explicit path (config `classify.ort_library`), else `ORT_DYLIB_PATH`, else the places our
//! installer and Debian package put it. Out: a process-wide `ort` environment, or an error naming what to do.
//! `ort` panics when the file is missing, so we check the file first.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// Environment variable naming the library, as understood by the `ort` crate too.
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// Where `deploy/install-deps.sh` and the Debian package install the library.
const WELL_KNOWN: &[&str] = &[
    "/usr/local/lib/emotiond/libonnxruntime.so",
    "/usr/lib/emotiond/libonnxruntime.so",
];

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "ONNX Runtime library not found (looked at {looked}); install it with `make deps` \
         (deploy/install-deps.sh), or point `classify.ort_library` or {ORT_DYLIB_ENV} at libonnxruntime.so"
    )]
    NotFound { looked: String },
    #[error(
        "ONNX Runtime library {path} could not be loaded: {reason}; it must be ONNX Runtime 1.31 or newer for this CPU/OS"
    )]
    Load { path: PathBuf, reason: String },
}

/// The path that would be loaded, without loading it.
pub fn resolve_library(explicit: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    let mut looked = Vec::new();
    let env = std::env::var_os(ORT_DYLIB_ENV).map(PathBuf::from);
    let candidates = explicit
        .map(Path::to_path_buf)
        .into_iter()
        .chain(env)
        .chain(WELL_KNOWN.iter().map(PathBuf::from));
    for c in candidates {
        if c.is_file() {
            return Ok(c);
        }
        looked.push(c.display().to_string());
        // An explicit path that is wrong must not silently fall back to another library.
        if explicit.is_some() {
            break;
        }
    }
    Err(RuntimeError::NotFound {
        looked: looked.join(", "),
    })
}

static ENV: OnceLock<ort::environment::Environment> = OnceLock::new();
static INIT: Mutex<()> = Mutex::new(());

/// Loads the library and creates the process-wide environment (idempotent; the first path wins).
pub fn init_runtime(
    explicit: Option<&Path>,
) -> Result<ort::environment::Environment, RuntimeError> {
    let _guard = INIT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(env) = ENV.get() {
        return Ok(env.clone());
    }
    let path = resolve_library(explicit)?;
    let load = |reason: String| RuntimeError::Load {
        path: path.clone(),
        reason,
    };
    let env = ort::init_from(&path)
        .map_err(|e| load(e.to_string()))?
        .with_name("emotiond")
        // No usage telemetry from the host (the binary also sets ORT_DISABLE_TELEMETRY at start-up).
        .with_telemetry(false)
        .build()
        .map_err(|e| load(e.to_string()))?;
    tracing::debug!(library = %path.display(), "Loaded ONNX Runtime.");
    Ok(ENV.get_or_init(|| env).clone())
}

//! The model contract shared by serving (`run`, `classify`), `eval` and `train`.
//!
//! In: an ONNX file, its metadata (keys `emotiond.*`) or a JSON sidecar next to it (`<model>.json`).
//! Out: a [`ModelSpec`] that says how a face crop becomes an input tensor (size, layout, colour,
//! normalisation) and how the output becomes seven probabilities. Keeping this in one place means the
//! trainer, the evaluator and the daemon cannot disagree about preprocessing.

mod classifier;
mod preprocess;
mod runtime;
mod spec;

pub use classifier::{
    Classifier, ClassifierError, ClassifierOptions, ExecutionProvider, build_session, softmax,
};
pub use preprocess::{crop_to_input, face_crop_rect, normalize_into};
pub use runtime::{ORT_DYLIB_ENV, RuntimeError, init_runtime, resolve_library};
pub use spec::{Color, Layout, ModelSpec, OutputKind, SpecError, keys};

/// The seven FER-2013 classes in the data set's own order (`emotion` column 0..=6 of `fer2013.csv`).
/// Models we train use this order; a model may declare another order in its metadata.
pub const FER_LABELS: [&str; 7] = [
    "angry", "disgust", "fear", "happy", "sad", "surprise", "neutral",
];

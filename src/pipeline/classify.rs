//! The inference thread: owns the one ort emotion session and batches faces across all cameras.
//!
//! In: [`ClassifyRequest`]s (the preprocessed crops of one frame) from any camera thread. Out: one probability
//! vector per crop, through the request's reply channel. A batch closes when it holds `max_batch` faces or when
//! its first request has waited `max_delay`, whichever comes first.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::model::{Classifier, ModelSpec};
use crate::telemetry::metrics;

#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    #[error("the inference thread has stopped")]
    Stopped,
    /// The model was replaced after the crops were made for the old one; make them again for [`ClassifierHandle::spec`].
    #[error("the model changed while the crops were being prepared")]
    ModelChanged,
    #[error("{0}")]
    Inference(String),
}

enum Msg {
    Classify {
        inputs: Vec<f32>,
        count: usize,
        /// The contract the crops were made for; a request for a replaced model is turned away.
        spec: Arc<ModelSpec>,
        reply: SyncSender<Result<Vec<Vec<f32>>, ClassifyError>>,
    },
    /// Replace the model between batches (config reload): the batch being gathered runs on the old model first;
    /// requests cropped for the old model that arrive later are turned away and cropped again.
    Swap(Box<Classifier>, SyncSender<()>),
}

/// What a camera thread holds to classify crops. Cheap to clone.
#[derive(Clone)]
pub struct ClassifierHandle {
    tx: SyncSender<Msg>,
    spec: Arc<std::sync::RwLock<Arc<ModelSpec>>>,
}

/// Batching policy.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    pub max_batch: usize,
    pub max_delay: Duration,
}

/// Per-batch figures, reported to an optional observer (benchmarks, metrics).
#[derive(Debug, Clone, Copy)]
pub struct BatchStats {
    pub faces: usize,
    pub infer: Duration,
}

impl ClassifierHandle {
    /// The model contract currently served (changes after [`ClassifierHandle::swap`]).
    pub fn spec(&self) -> Arc<ModelSpec> {
        self.spec.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Classifies `count` crops preprocessed for `spec` (what [`ClassifierHandle::spec`] returned); blocks until
    /// their batch has run. [`ClassifyError::ModelChanged`] when the model was swapped in between.
    pub fn classify(
        &self,
        spec: &Arc<ModelSpec>,
        inputs: Vec<f32>,
        count: usize,
    ) -> Result<Vec<Vec<f32>>, ClassifyError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let (reply, rx) = mpsc::sync_channel(1);
        self.tx
            .send(Msg::Classify {
                inputs,
                count,
                spec: spec.clone(),
                reply,
            })
            .map_err(|_| ClassifyError::Stopped)?;
        rx.recv().map_err(|_| ClassifyError::Stopped)?
    }

    /// Serves `next` from the next batch on. The inference thread switches the served contract at the moment it
    /// switches models, so a crop made for the old model is never run on the new one.
    pub fn swap(&self, next: Classifier) -> Result<(), ClassifyError> {
        let (done, rx) = mpsc::sync_channel(1);
        self.tx
            .send(Msg::Swap(Box::new(next), done))
            .map_err(|_| ClassifyError::Stopped)?;
        rx.recv().map_err(|_| ClassifyError::Stopped)
    }
}

/// Starts the inference thread. It ends when every handle is dropped.
pub fn spawn(
    classifier: Classifier,
    policy: BatchPolicy,
    observer: Option<Box<dyn Fn(BatchStats) + Send>>,
) -> std::io::Result<(ClassifierHandle, JoinHandle<()>)> {
    let (tx, rx) = mpsc::sync_channel(256);
    let spec = Arc::new(std::sync::RwLock::new(Arc::new(classifier.spec().clone())));
    let join = std::thread::Builder::new()
        .name("inference".into())
        .spawn({
            let spec = spec.clone();
            move || {
                let _watch = PanicWatch;
                run(classifier, spec, rx, policy, observer)
            }
        })?;
    Ok((ClassifierHandle { tx, spec }, join))
}

/// Marks the process unhealthy (`/healthz`, the systemd watchdog) when the inference thread unwinds.
struct PanicWatch;

impl Drop for PanicWatch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            metrics().inference_failed.store(true, Ordering::Relaxed);
        }
    }
}

fn run(
    mut classifier: Classifier,
    shared: Arc<std::sync::RwLock<Arc<ModelSpec>>>,
    rx: Receiver<Msg>,
    policy: BatchPolicy,
    observer: Option<Box<dyn Fn(BatchStats) + Send>>,
) {
    let mut current = shared.read().unwrap_or_else(|p| p.into_inner()).clone();
    let mut pending: Option<Msg> = None;
    loop {
        let first = match pending.take() {
            Some(m) => m,
            None => match rx.recv() {
                Ok(m) => m,
                Err(_) => return,
            },
        };
        let mut batch = match first {
            Msg::Swap(next, done) => {
                tracing::info!(model = %next.path().display(), provider = next.provider(), "Now classifying with a new model.");
                classifier = *next;
                current = Arc::new(classifier.spec().clone());
                *shared.write().unwrap_or_else(|p| p.into_inner()) = current.clone();
                let _ = done.send(());
                continue;
            }
            m @ Msg::Classify { .. } => vec![m],
        };
        let mut faces = count(&batch[0]);
        let deadline = Instant::now() + policy.max_delay;
        while faces < policy.max_batch {
            let wait = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(m @ Msg::Classify { .. }) => {
                    faces += count(&m);
                    batch.push(m);
                }
                // A swap waits until this batch has run on the model it was prepared for.
                Ok(m @ Msg::Swap(..)) => {
                    pending = Some(m);
                    break;
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        let mut inputs = Vec::with_capacity(faces * current.input_len());
        let mut replies = Vec::with_capacity(batch.len());
        let mut faces = 0;
        for m in batch {
            if let Msg::Classify {
                inputs: i,
                count,
                spec,
                reply,
            } = m
            {
                // Prepared before the last swap, or malformed: its tensor would not fit this model.
                if !Arc::ptr_eq(&spec, &current) {
                    let _ = reply.send(Err(ClassifyError::ModelChanged));
                } else if i.len() != count * current.input_len() {
                    let _ = reply.send(Err(ClassifyError::Inference(format!(
                        "{} values for {count} crops of {} each",
                        i.len(),
                        current.input_len()
                    ))));
                } else {
                    inputs.extend_from_slice(&i);
                    faces += count;
                    replies.push((count, reply));
                }
            }
        }
        if replies.is_empty() {
            continue;
        }
        let started = Instant::now();
        let result = classifier.run(inputs);
        if let Some(obs) = &observer {
            obs(BatchStats {
                faces,
                infer: started.elapsed(),
            });
        }
        match result {
            Ok(probs) => {
                let mut it = probs.into_iter();
                for (n, reply) in replies {
                    let _ = reply.send(Ok(it.by_ref().take(n).collect()));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for (_, reply) in replies {
                    let _ = reply.send(Err(ClassifyError::Inference(msg.clone())));
                }
            }
        }
    }
}

fn count(m: &Msg) -> usize {
    match m {
        Msg::Classify { count, .. } => *count,
        Msg::Swap(..) => 0,
    }
}

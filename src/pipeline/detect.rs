//! Face detection on a full BGR frame.
//!
//! In: a frame (`Mat`, BGR). Out: [`Detection`]s in full-frame pixels, best first.
//! Two backends: YuNet 2023mar run through ONNX Runtime with its anchor-free decoding done here plus OpenCV's
//! NMS (OpenCV 4.6's `FaceDetectorYN` only understands the older 2022 output format), and OpenCV's Haar
//! cascade. Both detect on a downscaled copy; the caller crops from the full frame.

use std::path::{Path, PathBuf};

use opencv::core::{self, Mat, Rect, Scalar, Size, Vector};
use opencv::objdetect::CascadeClassifier;
use opencv::prelude::*;
use opencv::{dnn, imgproc};
use ort::session::Session;
use ort::value::Tensor;

use super::messages::Detection;
use crate::config::{DetectConfig, DetectorBackend};
use crate::model::{ClassifierError, ClassifierOptions, ExecutionProvider, build_session};

/// YuNet 2023mar's fixed input side.
const YUNET_SIDE: i32 = 640;
const YUNET_STRIDES: [i32; 3] = [8, 16, 32];

/// Where Debian's `opencv-data` and source builds put the default frontal-face cascade.
const CASCADE_DIRS: &[&str] = &[
    "/usr/share/opencv4/haarcascades",
    "/usr/local/share/opencv4/haarcascades",
    "/usr/share/opencv/haarcascades",
];
const CASCADE_FILE: &str = "haarcascade_frontalface_default.xml";

#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error(
        "Haar cascade not found (looked at {0}); install Debian's `opencv-data` or set `detect.haar_cascade`"
    )]
    CascadeMissing(String),
    #[error("Haar cascade {path}: OpenCV could not load it{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    CascadeLoad {
        path: PathBuf,
        reason: Option<String>,
    },
    #[error("YuNet model: {0}")]
    Yunet(#[from] ClassifierError),
    #[error("YuNet model {path}: {reason}")]
    YunetOutput { path: PathBuf, reason: String },
    #[error("face detection failed: {0}")]
    OpenCv(#[from] opencv::Error),
}

/// The cascade file: `explicit` or the first default that exists.
pub fn find_cascade(explicit: Option<&Path>) -> Result<PathBuf, DetectError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_owned())
        } else {
            Err(DetectError::CascadeMissing(p.display().to_string()))
        };
    }
    let candidates: Vec<PathBuf> = CASCADE_DIRS
        .iter()
        .map(|d| Path::new(d).join(CASCADE_FILE))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            DetectError::CascadeMissing(
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })
}

pub enum Detector {
    Yunet(Yunet),
    Haar(Haar),
}

impl Detector {
    /// Builds the configured backend. `ort_library` is needed by YuNet only.
    pub fn new(cfg: &DetectConfig, ort_library: Option<&Path>) -> Result<Self, DetectError> {
        if cfg.opencv_threads > 0 {
            core::set_num_threads(cfg.opencv_threads)?;
        }
        Ok(match cfg.backend {
            DetectorBackend::Yunet => Detector::Yunet(Yunet::new(cfg, ort_library)?),
            DetectorBackend::Haar => Detector::Haar(Haar::new(cfg)?),
        })
    }

    pub fn detect(&mut self, bgr: &Mat) -> Result<Vec<Detection>, DetectError> {
        match self {
            Detector::Yunet(d) => d.detect(bgr),
            Detector::Haar(d) => d.detect(bgr),
        }
    }
}

pub struct Yunet {
    session: Session,
    path: PathBuf,
    score_threshold: f32,
    nms_threshold: f32,
    min_face: f32,
    letterbox: Mat,
}

impl Yunet {
    fn new(cfg: &DetectConfig, ort_library: Option<&Path>) -> Result<Self, DetectError> {
        // One intra-op thread that sleeps when idle: every camera has its own detector thread.
        let opts = ClassifierOptions {
            ort_library: ort_library.map(Path::to_path_buf),
            intra_threads: 1,
            provider: ExecutionProvider::Cpu,
        };
        let (session, _) = build_session(&cfg.yunet_model, &opts)?;
        let names: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        for s in YUNET_STRIDES {
            for kind in ["cls", "obj", "bbox"] {
                let want = format!("{kind}_{s}");
                if !names.contains(&want.as_str()) {
                    return Err(DetectError::YunetOutput {
                        path: cfg.yunet_model.clone(),
                        reason: format!(
                            "no output `{want}`; this needs YuNet 2023mar (outputs {names:?})"
                        ),
                    });
                }
            }
        }
        Ok(Self {
            session,
            path: cfg.yunet_model.clone(),
            score_threshold: cfg.score_threshold,
            nms_threshold: cfg.nms_threshold,
            min_face: cfg.min_face as f32,
            letterbox: Mat::default(),
        })
    }

    fn detect(&mut self, bgr: &Mat) -> Result<Vec<Detection>, DetectError> {
        let (w, h) = (bgr.cols(), bgr.rows());
        if w == 0 || h == 0 {
            return Ok(Vec::new());
        }
        // Fit the frame into 640×640 keeping its aspect ratio, padding bottom/right with black.
        let scale = YUNET_SIDE as f32 / w.max(h) as f32;
        let (sw, sh) = (
            ((w as f32 * scale).round() as i32).min(YUNET_SIDE),
            ((h as f32 * scale).round() as i32).min(YUNET_SIDE),
        );
        let mut resized = Mat::default();
        imgproc::resize(
            bgr,
            &mut resized,
            Size::new(sw, sh),
            0.0,
            0.0,
            imgproc::INTER_LINEAR,
        )?;
        core::copy_make_border(
            &resized,
            &mut self.letterbox,
            0,
            YUNET_SIDE - sh,
            0,
            YUNET_SIDE - sw,
            core::BORDER_CONSTANT,
            Scalar::all(0.0),
        )?;
        // NCHW float BGR 0..255, no normalisation: what YuNet was trained with.
        let blob = dnn::blob_from_image(
            &self.letterbox,
            1.0,
            Size::new(YUNET_SIDE, YUNET_SIDE),
            Scalar::all(0.0),
            false,
            false,
            core::CV_32F,
        )?;
        let data = blob.data_typed::<f32>()?.to_vec();
        let side = YUNET_SIDE as usize;
        let out_err = |reason: String| DetectError::YunetOutput {
            path: self.path.clone(),
            reason,
        };
        let tensor = Tensor::from_array(([1usize, 3, side, side], data))
            .map_err(|e| out_err(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs![tensor])
            .map_err(|e| out_err(e.to_string()))?;

        let mut boxes = Vector::<Rect>::new();
        let mut scores = Vector::<f32>::new();
        let mut cands: Vec<[f32; 4]> = Vec::new();
        for stride in YUNET_STRIDES {
            let get = |kind: &str| {
                outputs[format!("{kind}_{stride}").as_str()]
                    .try_extract_tensor::<f32>()
                    .map(|(_, d)| d)
                    .map_err(|e| out_err(e.to_string()))
            };
            let (cls, obj, bbox) = (get("cls")?, get("obj")?, get("bbox")?);
            let cols = (YUNET_SIDE / stride) as usize;
            let s = stride as f32;
            for (idx, (c, o)) in cls.iter().zip(obj).enumerate() {
                let score = (c.clamp(0.0, 1.0) * o.clamp(0.0, 1.0)).sqrt();
                if score < self.score_threshold {
                    continue;
                }
                let (r, col) = ((idx / cols) as f32, (idx % cols) as f32);
                let b = &bbox[idx * 4..idx * 4 + 4];
                let (cx, cy) = ((col + b[0]) * s, (r + b[1]) * s);
                let (bw, bh) = (b[2].exp() * s, b[3].exp() * s);
                let full = [
                    (cx - bw / 2.0) / scale,
                    (cy - bh / 2.0) / scale,
                    bw / scale,
                    bh / scale,
                ];
                if full[2].min(full[3]) < self.min_face {
                    continue;
                }
                boxes.push(Rect::new(
                    full[0].round() as i32,
                    full[1].round() as i32,
                    full[2].round() as i32,
                    full[3].round() as i32,
                ));
                scores.push(score);
                cands.push(full);
            }
        }
        let mut keep = Vector::<i32>::new();
        dnn::nms_boxes(
            &boxes,
            &scores,
            self.score_threshold,
            self.nms_threshold,
            &mut keep,
            1.0,
            0,
        )?;
        let mut dets: Vec<Detection> = keep
            .iter()
            .map(|i| i as usize)
            .map(|i| Detection {
                bbox: clip(cands[i], w as f32, h as f32),
                score: scores.get(i).unwrap_or(0.0),
            })
            .filter(|d| d.bbox[2] > 1.0 && d.bbox[3] > 1.0)
            .collect();
        dets.sort_by(|a, b| b.score.total_cmp(&a.score));
        Ok(dets)
    }
}

/// Clips an x, y, w, h box to the frame.
fn clip(b: [f32; 4], w: f32, h: f32) -> [f32; 4] {
    let (x0, y0) = (b[0].clamp(0.0, w), b[1].clamp(0.0, h));
    let (x1, y1) = ((b[0] + b[2]).clamp(0.0, w), (b[1] + b[3]).clamp(0.0, h));
    [x0, y0, x1 - x0, y1 - y0]
}

pub struct Haar {
    cascade: CascadeClassifier,
    max_side: i32,
    min_face: i32,
    gray: Mat,
    small: Mat,
}

/// Neighbour votes a Haar candidate needs.
const HAAR_MIN_NEIGHBORS: i32 = 5;

impl Haar {
    fn new(cfg: &DetectConfig) -> Result<Self, DetectError> {
        let path = find_cascade(cfg.haar_cascade.as_deref())?;
        let load_err = |reason: Option<String>| DetectError::CascadeLoad {
            path: path.clone(),
            reason,
        };
        let cascade =
            CascadeClassifier::new(path.as_os_str()).map_err(|e| load_err(Some(e.to_string())))?;
        if cascade.empty().unwrap_or(true) {
            return Err(load_err(None));
        }
        Ok(Self {
            cascade,
            max_side: cfg.max_side as i32,
            min_face: cfg.min_face as i32,
            gray: Mat::default(),
            small: Mat::default(),
        })
    }

    fn detect(&mut self, bgr: &Mat) -> Result<Vec<Detection>, DetectError> {
        let (w, h) = (bgr.cols(), bgr.rows());
        if w == 0 || h == 0 {
            return Ok(Vec::new());
        }
        imgproc::cvt_color_def(bgr, &mut self.gray, imgproc::COLOR_BGR2GRAY)?;
        let scale = (self.max_side as f64 / w.max(h) as f64).min(1.0);
        if scale < 1.0 {
            let size = Size::new(
                (w as f64 * scale).round() as i32,
                (h as f64 * scale).round() as i32,
            );
            imgproc::resize(
                &self.gray,
                &mut self.small,
                size,
                0.0,
                0.0,
                imgproc::INTER_AREA,
            )?;
        } else {
            self.gray.copy_to(&mut self.small)?;
        }
        let mut eq = Mat::default();
        imgproc::equalize_hist(&self.small, &mut eq)?;
        let min = ((self.min_face as f64 * scale).round() as i32).max(12);
        let mut rects = Vector::<Rect>::new();
        let mut votes = Vector::<i32>::new();
        self.cascade.detect_multi_scale2(
            &eq,
            &mut rects,
            &mut votes,
            1.1,
            HAAR_MIN_NEIGHBORS,
            0,
            Size::new(min, min),
            Size::default(),
        )?;
        let mut dets: Vec<Detection> = rects
            .iter()
            .zip(votes.iter())
            .map(|(r, n)| {
                let b = [r.x as f32, r.y as f32, r.width as f32, r.height as f32]
                    .map(|v| v / scale as f32);
                // Haar has no probability; more neighbour votes mean a surer face.
                let score = n as f32 / (n as f32 + HAAR_MIN_NEIGHBORS as f32);
                Detection {
                    bbox: clip(b, w as f32, h as f32),
                    score,
                }
            })
            .collect();
        dets.sort_by(|a, b| b.score.total_cmp(&a.score));
        Ok(dets)
    }
}

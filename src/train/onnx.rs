//! ONNX export of a trained [`EfficientNet`], written directly as protobuf.
//!
//! In: the module (its parameters and structure) and the metadata to embed. Out: an opset-17 `.onnx` file
//! with input `input` (`batch×3×S×S`, dynamic batch) and outputs `probabilities` and `logits` (`batch×K`).
//! Batch norms are folded into the preceding convolution / linear layer, dropout and stochastic depth vanish
//! (inference), SiLU is `x·sigmoid(x)`, ReLU6 is `Clip(0, 6)`.
//!
//! With test-time flip averaging the graph runs each image and its mirror image as one batch of `2·batch`
//! (`Concat(input, Slice(input, W reversed))`) and averages the two halves' logits before the softmax, so
//! callers see the same inputs and outputs, at twice the compute.
//!
//! The message structs below are the subset of `onnx.proto` (ONNX 1.x, field numbers unchanged since IR v3)
//! we write, hand-written with `prost` derives so the build needs no `protoc`.

use std::collections::BTreeMap;
use std::path::Path;

use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, Linear, PaddingConfig2d};
use burn::tensor::Tensor;
use prost::Message;

use super::model::{ConvBn, EfficientNet, MbConv};

pub const OPSET: i64 = 17;
/// IR version 8 is what opset 17 shipped with (ONNX 1.12).
pub const IR_VERSION: i64 = 8;
pub const INPUT: &str = "input";

#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    #[prost(string, tag = "2")]
    pub producer_name: String,
    #[prost(string, tag = "3")]
    pub producer_version: String,
    #[prost(string, tag = "6")]
    pub doc_string: String,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
    #[prost(message, repeated, tag = "14")]
    pub metadata_props: Vec<StringStringEntryProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(int64, tag = "2")]
    pub version: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct StringStringEntryProto {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(string, tag = "4")]
    pub op_type: String,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct AttributeProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(float, tag = "2")]
    pub f: f32,
    #[prost(int64, tag = "3")]
    pub i: i64,
    #[prost(int64, repeated, tag = "8")]
    pub ints: Vec<i64>,
    /// AttributeType: FLOAT = 1, INT = 2, INTS = 7.
    #[prost(int32, tag = "20")]
    pub r#type: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    /// DataType: FLOAT = 1.
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    #[prost(string, tag = "8")]
    pub name: String,
    #[prost(bytes = "vec", tag = "9")]
    pub raw_data: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ValueInfoProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TypeProto {
    #[prost(message, optional, tag = "1")]
    pub tensor_type: Option<TypeProtoTensor>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TypeProtoTensor {
    #[prost(int32, tag = "1")]
    pub elem_type: i32,
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<Dimension>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Dimension {
    #[prost(int64, optional, tag = "1")]
    pub dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    pub dim_param: Option<String>,
}

const FLOAT: i32 = 1;
const INT64: i32 = 7;

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: v.to_vec(),
        r#type: 7,
        ..Default::default()
    }
}
fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i: v,
        r#type: 2,
        ..Default::default()
    }
}
fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        f: v,
        r#type: 1,
        ..Default::default()
    }
}

fn value_info(name: &str, dims: &[Result<i64, &str>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| match d {
            Ok(v) => Dimension {
                dim_value: Some(*v),
                dim_param: None,
            },
            Err(p) => Dimension {
                dim_value: None,
                dim_param: Some(p.to_string()),
            },
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: FLOAT,
                shape: Some(TensorShapeProto { dim }),
            }),
        }),
    }
}

fn data<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 tensor data: this is a bug")
}

/// Builds the graph node by node.
struct Builder {
    nodes: Vec<NodeProto>,
    init: Vec<TensorProto>,
    n: usize,
}

impl Builder {
    fn fresh(&mut self, hint: &str) -> String {
        self.n += 1;
        format!("{hint}_{}", self.n)
    }

    fn constant(&mut self, hint: &str, dims: &[usize], values: &[f32]) -> String {
        let name = self.fresh(hint);
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.init.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: FLOAT,
            name: name.clone(),
            raw_data: raw,
        });
        name
    }

    fn constant_i64(&mut self, hint: &str, values: &[i64]) -> String {
        let name = self.fresh(hint);
        self.init.push(TensorProto {
            dims: vec![values.len() as i64],
            data_type: INT64,
            name: name.clone(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        name
    }

    fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        out: Option<&str>,
    ) -> String {
        let o = out
            .map(str::to_owned)
            .unwrap_or_else(|| self.fresh(&op.to_ascii_lowercase()));
        let name = self.fresh(op);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![o.clone()],
            name,
            op_type: op.into(),
            attribute: attrs,
        });
        o
    }

    /// Conv with BN folded in: `w' = w·s`, `b' = (b − μ)·s + β`, `s = γ / √(σ² + ε)` per output channel.
    fn conv(&mut self, x: &str, conv: &Conv2d, bn: Option<&BatchNorm>) -> String {
        let dims = conv.weight.dims();
        let mut w = data(conv.weight.val());
        let cout = dims[0];
        let mut b = match &conv.bias {
            Some(b) => data(b.val()),
            None => vec![0.0; cout],
        };
        if let Some(bn) = bn {
            let (scale, shift) = bn_affine(bn);
            let per = w.len() / cout;
            for o in 0..cout {
                for v in &mut w[o * per..(o + 1) * per] {
                    *v *= scale[o];
                }
                b[o] = b[o] * scale[o] + shift[o];
            }
        }
        let wn = self.constant("w", &dims, &w);
        let bname = self.constant("b", &[cout], &b);
        let pads = match &conv.padding {
            PaddingConfig2d::Explicit(t, l, b, r) => [*t, *l, *b, *r],
            PaddingConfig2d::Valid => [0; 4],
            PaddingConfig2d::Same => {
                let (ph, pw) = ((dims[2] - 1) / 2, (dims[3] - 1) / 2);
                [ph, pw, ph, pw]
            }
        };
        let attrs = vec![
            ints("kernel_shape", &[dims[2] as i64, dims[3] as i64]),
            ints("strides", &conv.stride.map(|s| s as i64)),
            ints("pads", &pads.map(|p| p as i64)),
            ints("dilations", &conv.dilation.map(|s| s as i64)),
            int("group", conv.groups as i64),
        ];
        self.node("Conv", &[x, &wn, &bname], attrs, None)
    }

    fn act(&mut self, x: &str, relu6: bool) -> String {
        if relu6 {
            let lo = self.constant("zero", &[], &[0.0]);
            let hi = self.constant("six", &[], &[6.0]);
            self.node("Clip", &[x, &lo, &hi], vec![], None)
        } else {
            let s = self.node("Sigmoid", &[x], vec![], None);
            self.node("Mul", &[x, &s], vec![], None)
        }
    }

    fn conv_bn(&mut self, x: &str, cb: &ConvBn) -> String {
        self.conv(x, &cb.conv, Some(&cb.bn))
    }

    fn block(&mut self, x: &str, b: &MbConv) -> String {
        let mut h = x.to_owned();
        if let Some(e) = &b.expand {
            h = self.conv_bn(&h, e);
            h = self.act(&h, b.relu6);
        }
        h = self.conv_bn(&h, &b.depthwise);
        h = self.act(&h, b.relu6);
        if let Some(se) = &b.se {
            let s = self.node("GlobalAveragePool", &[&h], vec![], None);
            let s = self.conv(&s, &se.reduce, None);
            let s = self.act(&s, false);
            let s = self.conv(&s, &se.expand, None);
            let s = self.node("Sigmoid", &[&s], vec![], None);
            h = self.node("Mul", &[&h, &s], vec![], None);
        }
        h = self.conv_bn(&h, &b.project);
        if b.residual {
            self.node("Add", &[&h, x], vec![], None)
        } else {
            h
        }
    }

    /// Gemm with an optional following BN folded in (`Linear → Dropout → BN`; dropout is identity here).
    fn linear(&mut self, x: &str, l: &Linear, bn: Option<&BatchNorm>, out: Option<&str>) -> String {
        let [din, dout] = l.weight.dims();
        let mut w = data(l.weight.val()); // burn stores [in, out]
        let mut b = match &l.bias {
            Some(b) => data(b.val()),
            None => vec![0.0; dout],
        };
        if let Some(bn) = bn {
            let (scale, shift) = bn_affine(bn);
            for i in 0..din {
                for o in 0..dout {
                    w[i * dout + o] *= scale[o];
                }
            }
            for o in 0..dout {
                b[o] = b[o] * scale[o] + shift[o];
            }
        }
        let wn = self.constant("fc_w", &[din, dout], &w);
        let bn_ = self.constant("fc_b", &[dout], &b);
        self.node(
            "Gemm",
            &[x, &wn, &bn_],
            vec![float("alpha", 1.0), float("beta", 1.0)],
            out,
        )
    }
}

/// Per-channel `(scale, shift)` of an inference-mode batch norm.
fn bn_affine(bn: &BatchNorm) -> (Vec<f32>, Vec<f32>) {
    let g = data(bn.gamma.val());
    let beta = data(bn.beta.val());
    let mean = data(bn.running_mean.value());
    let var = data(bn.running_var.value());
    let eps = bn.epsilon as f32;
    let scale: Vec<f32> = g
        .iter()
        .zip(&var)
        .map(|(g, v)| g / (v + eps).sqrt())
        .collect();
    let shift = beta
        .iter()
        .zip(&mean)
        .zip(&scale)
        .map(|((b, m), s)| b - m * s)
        .collect();
    (scale, shift)
}

/// Serialises the model to ONNX bytes; `tta_flip` builds horizontal-flip averaging into the graph.
pub fn to_onnx(
    model: &EfficientNet,
    input_size: usize,
    metadata: &BTreeMap<String, String>,
    tta_flip: bool,
) -> Vec<u8> {
    let mut g = Builder {
        nodes: Vec::new(),
        init: Vec::new(),
        n: 0,
    };
    let mut x = INPUT.to_owned();
    if tta_flip {
        // W reversed: start at the last column, step −1 down to before the first (INT64_MIN = "past the start").
        let starts = g.constant_i64("flip_starts", &[-1]);
        let ends = g.constant_i64("flip_ends", &[i64::MIN]);
        let axes = g.constant_i64("flip_axes", &[3]);
        let steps = g.constant_i64("flip_steps", &[-1]);
        let mirrored = g.node(
            "Slice",
            &[INPUT, &starts, &ends, &axes, &steps],
            vec![],
            None,
        );
        x = g.node("Concat", &[INPUT, &mirrored], vec![int("axis", 0)], None);
    }
    x = g.conv_bn(&x, &model.stem);
    x = g.act(&x, model.relu6);
    for b in &model.blocks {
        x = g.block(&x, b);
    }
    x = g.conv_bn(&x, &model.head_conv);
    x = g.act(&x, model.relu6);
    x = g.node("GlobalAveragePool", &[&x], vec![], None);
    x = g.node("Flatten", &[&x], vec![int("axis", 1)], None);
    let k = model.classes() as i64;
    let final_name = (!tta_flip).then_some("logits");
    let mut logits = match (&model.head_bn, &model.fc2) {
        (Some(bn), Some(fc2)) => {
            let h = g.linear(&x, &model.fc1, Some(bn), None);
            g.linear(&h, fc2, None, final_name)
        }
        _ => g.linear(&x, &model.fc1, None, final_name),
    };
    if tta_flip {
        // [2·batch, K] → [2, batch, K] (originals first, as concatenated) → mean over the pair.
        let shape = g.constant_i64("pair_shape", &[2, -1, k]);
        let pairs = g.node("Reshape", &[&logits, &shape], vec![], None);
        logits = g.node(
            "ReduceMean",
            &[&pairs],
            vec![ints("axes", &[0]), int("keepdims", 0)],
            Some("logits"),
        );
    }
    g.node(
        "Softmax",
        &[&logits],
        vec![int("axis", -1)],
        Some("probabilities"),
    );
    let s = input_size as i64;
    let graph = GraphProto {
        node: g.nodes,
        name: "emotiond".into(),
        initializer: g.init,
        input: vec![value_info(INPUT, &[Err("batch"), Ok(3), Ok(s), Ok(s)])],
        output: vec![
            value_info("probabilities", &[Err("batch"), Ok(k)]),
            value_info("logits", &[Err("batch"), Ok(k)]),
        ],
    };
    let model = ModelProto {
        ir_version: IR_VERSION,
        producer_name: "emotiond".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: "Face-expression classifier trained with `emotiond train`.".into(),
        graph: Some(graph),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        metadata_props: metadata
            .iter()
            .map(|(k, v)| StringStringEntryProto {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
    };
    model.encode_to_vec()
}

pub fn write_onnx(
    model: &EfficientNet,
    input_size: usize,
    metadata: &BTreeMap<String, String>,
    tta_flip: bool,
    path: &Path,
) -> std::io::Result<()> {
    let bytes = to_onnx(model, input_size, metadata, tta_flip);
    let tmp = path.with_extension("onnx.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// The next stored tensor, checked against the shape the architecture wants.
type NextTensor<'a> = dyn FnMut(&[usize]) -> Result<Vec<f32>, String> + 'a;

/// Loads the weights of an ONNX file that [`to_onnx`] wrote for the same architecture and head into `model`,
/// so a shipped model can be fine-tuned (`emotiond train --init`). The export folded every batch norm into the
/// layer before it, so each batch norm comes back as the exact identity plus the folded bias (`γ = √(1+ε)`,
/// `β = b'`, `μ = 0`, `σ² = 1`): the inference-mode model computes what the file computes. Call
/// [`EfficientNet::recalibrate_bn`] on real images before training, so that batch statistics match again.
/// Returns the number of tensors loaded.
pub fn load_weights(
    model: &mut EfficientNet,
    bytes: &[u8],
    expect: &BTreeMap<String, String>,
    device: &burn::tensor::Device,
) -> Result<usize, String> {
    use burn::module::{Param, RunningState};
    use burn::tensor::TensorData;

    let proto = ModelProto::decode(bytes).map_err(|e| format!("not an ONNX model: {e}"))?;
    let graph = proto.graph.ok_or("the file has no graph")?;
    if proto.producer_name != "emotiond" {
        return Err(format!(
            "it was produced by `{}`, not by `emotiond train`; only models this tool exported can be \
             fine-tuned",
            proto.producer_name
        ));
    }
    // The same architecture, head and labels (whatever `expect` names), or the tensors would not mean the same thing.
    let meta: BTreeMap<&str, &str> = proto
        .metadata_props
        .iter()
        .map(|e| (e.key.as_str(), e.value.as_str()))
        .collect();
    for (key, want) in expect {
        let have = meta.get(key.as_str()).copied().unwrap_or("(missing)");
        if have != want {
            return Err(format!(
                "its metadata `{key}` is `{have}`, this run trains `{want}`; pass the matching \
                 --arch / head"
            ));
        }
    }
    // Weights and biases in the order the export visited the layers (constants of other ops are skipped).
    let mut tensors = graph.initializer.into_iter().filter(|t| {
        ["w_", "b_", "fc_w_", "fc_b_"]
            .iter()
            .any(|p| t.name.starts_with(p))
    });
    let mut loaded = 0usize;
    let mut next = |want: &[usize]| -> Result<Vec<f32>, String> {
        let t = tensors
            .next()
            .ok_or("the file has fewer layers than the chosen architecture")?;
        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        if dims != want
            || t.data_type != FLOAT
            || t.raw_data.len() != 4 * want.iter().product::<usize>()
        {
            return Err(format!(
                "tensor `{}` has shape {dims:?}, the chosen architecture expects {want:?}",
                t.name
            ));
        }
        loaded += 1;
        Ok(t.raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    let t1 = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v.clone(), [v.len()]), device);
    let identity_bn = |bn: &mut BatchNorm, bias: Vec<f32>| {
        let n = bias.len();
        bn.gamma = Param::from_tensor(t1(vec![(1.0 + bn.epsilon as f32).sqrt(); n]));
        bn.beta = Param::from_tensor(t1(bias));
        bn.running_mean = RunningState::new(t1(vec![0.0; n]));
        bn.running_var = RunningState::new(t1(vec![1.0; n]));
    };
    let load_conv = |conv: &mut Conv2d,
                     bn: Option<&mut BatchNorm>,
                     next: &mut NextTensor<'_>|
     -> Result<(), String> {
        let dims = conv.weight.dims();
        let w = next(&dims)?;
        let b = next(&[dims[0]])?;
        conv.weight = Param::from_tensor(Tensor::<4>::from_data(TensorData::new(w, dims), device));
        match bn {
            Some(bn) => identity_bn(bn, b),
            None => conv.bias = Some(Param::from_tensor(t1(b))),
        }
        Ok(())
    };
    load_conv(&mut model.stem.conv, Some(&mut model.stem.bn), &mut next)?;
    for b in &mut model.blocks {
        if let Some(e) = &mut b.expand {
            load_conv(&mut e.conv, Some(&mut e.bn), &mut next)?;
        }
        load_conv(&mut b.depthwise.conv, Some(&mut b.depthwise.bn), &mut next)?;
        if let Some(se) = &mut b.se {
            load_conv(&mut se.reduce, None, &mut next)?;
            load_conv(&mut se.expand, None, &mut next)?;
        }
        load_conv(&mut b.project.conv, Some(&mut b.project.bn), &mut next)?;
    }
    load_conv(
        &mut model.head_conv.conv,
        Some(&mut model.head_conv.bn),
        &mut next,
    )?;
    let load_linear = |l: &mut Linear, next: &mut NextTensor<'_>| -> Result<(), String> {
        let dims = l.weight.dims();
        let w = next(&dims)?;
        let b = next(&[dims[1]])?;
        l.weight = Param::from_tensor(Tensor::<2>::from_data(TensorData::new(w, dims), device));
        l.bias = Some(Param::from_tensor(t1(b)));
        Ok(())
    };
    load_linear(&mut model.fc1, &mut next)?;
    if let (Some(bn), Some(fc2)) = (&mut model.head_bn, &mut model.fc2) {
        let n = bn.gamma.dims()[0];
        identity_bn(bn, vec![0.0; n]);
        load_linear(fc2, &mut next)?;
    }
    if let Some(t) = tensors.next() {
        return Err(format!(
            "the file has more layers than the chosen architecture (`{}` is left over)",
            t.name
        ));
    }
    Ok(loaded)
}

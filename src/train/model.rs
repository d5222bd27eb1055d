//! EfficientNet-B0 and EfficientNet-Lite0 as burn modules, with the recipe's classifier head.
//!
//! In: an `N×3×S×S` tensor (S = 48..=224; FER's grey faces replicated to 3 channels, `color = gray3`, so the
//! ImageNet stem weights apply unchanged). Out: `N×classes` logits (softmax is added at export).
//!
//! The backbones follow the reference architectures: B0 as in torchvision (SiLU, squeeze-and-excitation,
//! symmetric padding, stochastic depth up to 0.2), Lite0 as in the TF-Lite variant (ReLU6, no SE, same block
//! table, stem 32 and head 1280 not scaled). The head is the recipe's `Linear(64) → Dropout(0.2) → BatchNorm →
//! Linear(7)` over the pooled 1280 features, or a plain `Dropout(0.2) → Linear(7)` with `plain_head`.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{
    BatchNorm, BatchNormConfig, Dropout, DropoutConfig, Linear, LinearConfig, PaddingConfig2d,
};
use burn::tensor::{Device, Distribution, Tensor, activation};

/// Which backbone.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// EfficientNet-B0 (SiLU + squeeze-and-excitation), torchvision layout.
    B0,
    /// EfficientNet-Lite0 (ReLU6, no SE): cheaper and quantisation-friendly.
    Lite0,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::B0 => "efficientnet-b0",
            Arch::Lite0 => "efficientnet-lite0",
        }
    }
    /// Batch-norm epsilon of the reference weights (torchvision B0: 1e-5; TF Lite0: 1e-3).
    pub fn bn_eps(self) -> f64 {
        match self {
            Arch::B0 => 1e-5,
            Arch::Lite0 => 1e-3,
        }
    }
}

/// One MBConv stage of the B0/Lite0 table: (expand ratio, kernel, stride, in, out, repeats).
pub const STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
];
pub const STEM: usize = 32;
pub const FEATURES: usize = 1280;
/// Width of the recipe's bottleneck layer.
pub const BOTTLENECK: usize = 64;

/// Everything that shapes the network.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub classes: usize,
    /// Plain `Dropout → Linear(classes)` head instead of the recipe's bottleneck head.
    pub plain_head: bool,
    pub dropout: f64,
    /// Stochastic depth probability of the last block (linearly scaled from 0 at the first).
    pub drop_path: f64,
}

impl ModelConfig {
    pub fn new(arch: Arch, classes: usize) -> Self {
        Self {
            arch,
            classes,
            plain_head: false,
            dropout: 0.2,
            drop_path: 0.2,
        }
    }

    pub fn init(&self, device: &Device) -> EfficientNet {
        let eps = self.arch.bn_eps();
        let se = self.arch == Arch::B0;
        let stem = ConvBn::new(3, STEM, 3, 2, 1, eps, device);
        let total: usize = STAGES.iter().map(|s| s.5).sum();
        let mut blocks = Vec::with_capacity(total);
        for &(expand, kernel, stride, cin, cout, repeats) in STAGES.iter() {
            for r in 0..repeats {
                let (cin, stride) = if r == 0 { (cin, stride) } else { (cout, 1) };
                let p = self.drop_path * blocks.len() as f64 / total as f64;
                blocks.push(MbConv::new(
                    cin, cout, expand, kernel, stride, se, p, eps, device,
                ));
            }
        }
        let head_conv = ConvBn::new(320, FEATURES, 1, 1, 1, eps, device);
        let dropout = DropoutConfig::new(self.dropout).init();
        let (fc1, head_bn, fc2) = if self.plain_head {
            (
                LinearConfig::new(FEATURES, self.classes).init(device),
                None,
                None,
            )
        } else {
            (
                LinearConfig::new(FEATURES, BOTTLENECK).init(device),
                Some(BatchNormConfig::new(BOTTLENECK).init(device)),
                Some(LinearConfig::new(BOTTLENECK, self.classes).init(device)),
            )
        };
        EfficientNet {
            stem,
            blocks,
            head_conv,
            dropout,
            fc1,
            head_bn,
            fc2,
            relu6: self.arch == Arch::Lite0,
        }
    }
}

/// Convolution (no bias) followed by batch norm.
#[derive(Module, Debug)]
pub struct ConvBn {
    pub conv: Conv2d,
    pub bn: BatchNorm,
}

impl ConvBn {
    fn new(
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        groups: usize,
        eps: f64,
        device: &Device,
    ) -> Self {
        let pad = (kernel - 1) / 2;
        let conv = Conv2dConfig::new([cin, cout], [kernel, kernel])
            .with_stride([stride, stride])
            .with_groups(groups)
            .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
            .with_bias(false)
            .init(device);
        let bn = BatchNormConfig::new(cout).with_epsilon(eps).init(device);
        Self { conv, bn }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.bn.forward(self.conv.forward(x))
    }

    fn recalibrate(&mut self, x: Tensor<4>) -> Tensor<4> {
        recalibrate_bn(&mut self.bn, self.conv.forward(x))
    }
}

/// Re-parametrises `bn` around the batch statistics `(m, v)` of its input `z` without changing its inference
/// function `y = s·z + t`: `γ' = s·√(v+ε)`, `β' = s·m + t`, `μ' = m`, `σ²' = v`. Afterwards a training-mode
/// forward on such a batch computes what inference does. Returns `y` (inference mode, detached).
fn recalibrate_bn(bn: &mut BatchNorm, z: Tensor<4>) -> Tensor<4> {
    use burn::module::{Param, RunningState};
    use burn::tensor::TensorData;
    let vec = |t: Tensor<1>| {
        t.into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32 tensor data: this is a bug")
    };
    let device = z.device();
    let z = z.detach();
    let c = z.dims()[1];
    let per_channel = |t: Tensor<4>| t.mean_dim(0).mean_dim(2).mean_dim(3).reshape([c]);
    let m = vec(per_channel(z.clone()));
    let centred = z.clone()
        - Tensor::<1>::from_data(TensorData::new(m.clone(), [c]), &device).reshape([1, c, 1, 1]);
    let v = vec(per_channel(centred.clone() * centred));
    let eps = bn.epsilon as f32;
    let (g, b) = (vec(bn.gamma.val()), vec(bn.beta.val()));
    let (mu, var) = (vec(bn.running_mean.value()), vec(bn.running_var.value()));
    let s: Vec<f32> = (0..c).map(|i| g[i] / (var[i] + eps).sqrt()).collect();
    let t: Vec<f32> = (0..c).map(|i| b[i] - mu[i] * s[i]).collect();
    let t1 = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v, [c]), &device);
    let y = z * t1(s.clone()).reshape([1, c, 1, 1]) + t1(t.clone()).reshape([1, c, 1, 1]);
    bn.gamma = Param::from_tensor(t1((0..c).map(|i| s[i] * (v[i] + eps).sqrt()).collect()));
    bn.beta = Param::from_tensor(t1((0..c).map(|i| s[i] * m[i] + t[i]).collect()));
    bn.running_mean = RunningState::new(t1(m));
    bn.running_var = RunningState::new(t1(v));
    y
}

/// Squeeze-and-excitation (B0 only): global pool → 1×1 conv → SiLU → 1×1 conv → sigmoid gate.
#[derive(Module, Debug)]
pub struct SqueezeExcite {
    pub reduce: Conv2d,
    pub expand: Conv2d,
}

impl SqueezeExcite {
    fn new(channels: usize, squeeze: usize, device: &Device) -> Self {
        Self {
            reduce: Conv2dConfig::new([channels, squeeze], [1, 1]).init(device),
            expand: Conv2dConfig::new([squeeze, channels], [1, 1]).init(device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let s = x.clone().mean_dim(2).mean_dim(3);
        let s = activation::silu(self.reduce.forward(s));
        let s = activation::sigmoid(self.expand.forward(s));
        x * s
    }
}

/// Inverted residual block: optional 1×1 expansion, depthwise k×k, optional SE, 1×1 projection.
#[derive(Module, Debug)]
pub struct MbConv {
    pub expand: Option<ConvBn>,
    pub depthwise: ConvBn,
    pub se: Option<SqueezeExcite>,
    pub project: ConvBn,
    pub residual: bool,
    pub drop_path: f64,
    pub relu6: bool,
}

impl MbConv {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cin: usize,
        cout: usize,
        expand_ratio: usize,
        kernel: usize,
        stride: usize,
        se: bool,
        drop_path: f64,
        eps: f64,
        device: &Device,
    ) -> Self {
        let hidden = cin * expand_ratio;
        Self {
            expand: (expand_ratio != 1).then(|| ConvBn::new(cin, hidden, 1, 1, 1, eps, device)),
            depthwise: ConvBn::new(hidden, hidden, kernel, stride, hidden, eps, device),
            // torchvision: squeeze channels = max(1, block input channels / 4).
            se: se.then(|| SqueezeExcite::new(hidden, (cin / 4).max(1), device)),
            project: ConvBn::new(hidden, cout, 1, 1, 1, eps, device),
            residual: stride == 1 && cin == cout,
            drop_path,
            relu6: !se,
        }
    }

    fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let act = |x: Tensor<4>| act(x, self.relu6);
        let mut x = input.clone();
        if let Some(e) = &self.expand {
            x = act(e.forward(x));
        }
        x = act(self.depthwise.forward(x));
        if let Some(se) = &self.se {
            x = se.forward(x);
        }
        x = self.project.forward(x);
        if !self.residual {
            return x;
        }
        // Stochastic depth ("row" mode): drop the whole residual branch per sample while training.
        if self.drop_path > 0.0 && x.device().is_autodiff() {
            let keep = 1.0 - self.drop_path;
            let n = x.dims()[0];
            let mask =
                Tensor::<4>::random([n, 1, 1, 1], Distribution::Bernoulli(keep), &x.device());
            x = x * mask.div_scalar(keep);
        }
        x + input
    }

    fn recalibrate(&mut self, input: Tensor<4>) -> Tensor<4> {
        let mut x = input.clone();
        if let Some(e) = &mut self.expand {
            x = act(e.recalibrate(x), self.relu6);
        }
        x = act(self.depthwise.recalibrate(x), self.relu6);
        if let Some(se) = &self.se {
            x = se.forward(x).detach();
        }
        x = self.project.recalibrate(x);
        if self.residual { x + input } else { x }
    }
}

pub(crate) fn act(x: Tensor<4>, relu6: bool) -> Tensor<4> {
    if relu6 {
        x.clamp(0.0, 6.0)
    } else {
        activation::silu(x)
    }
}

#[derive(Module, Debug)]
pub struct EfficientNet {
    pub stem: ConvBn,
    pub blocks: Vec<MbConv>,
    pub head_conv: ConvBn,
    pub dropout: Dropout,
    /// The bottleneck `Linear(1280→64)`, or the whole classifier `Linear(1280→classes)` for a plain head.
    pub fc1: Linear,
    pub head_bn: Option<BatchNorm>,
    pub fc2: Option<Linear>,
    pub relu6: bool,
}

impl EfficientNet {
    /// Pooled 1280-dimensional features.
    pub fn features(&self, x: Tensor<4>) -> Tensor<2> {
        let mut x = act(self.stem.forward(x), self.relu6);
        for b in &self.blocks {
            x = b.forward(x);
        }
        let x = act(self.head_conv.forward(x), self.relu6);
        let [n, c, _, _] = x.dims();
        x.mean_dim(2).mean_dim(3).reshape([n, c])
    }

    /// Logits.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let f = self.features(x);
        match (&self.head_bn, &self.fc2) {
            (Some(bn), Some(fc2)) => {
                let h = self.dropout.forward(self.fc1.forward(f));
                fc2.forward(bn.forward(h))
            }
            _ => self.fc1.forward(self.dropout.forward(f)),
        }
    }

    /// Re-parametrises every batch norm around the statistics its input has on `x` (real, preprocessed
    /// images; a few hundred), leaving the inference-mode function unchanged. Needed after loading weights
    /// whose batch norms were folded away ([`super::onnx::load_weights`]): training mode normalises with batch
    /// statistics, and without this the first steps would see a different network.
    pub fn recalibrate_bn(&mut self, x: Tensor<4>) {
        let mut x = act(self.stem.recalibrate(x.detach()), self.relu6);
        for b in &mut self.blocks {
            x = b.recalibrate(x);
        }
        let x = act(self.head_conv.recalibrate(x), self.relu6);
        if let Some(bn) = &mut self.head_bn {
            let [n, c, _, _] = x.dims();
            let f = x.mean_dim(2).mean_dim(3).reshape([n, c]);
            let h = self.fc1.forward(f).detach();
            let k = h.dims()[1];
            recalibrate_bn(bn, h.reshape([n, k, 1, 1]));
        }
    }

    pub fn classes(&self) -> usize {
        match &self.fc2 {
            Some(fc2) => fc2.weight.dims()[1],
            None => self.fc1.weight.dims()[1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_at_small_and_odd_sizes() {
        let device = Device::flex();
        for (arch, size) in [(Arch::Lite0, 48), (Arch::B0, 50)] {
            let m = ModelConfig::new(arch, 7).init(&device);
            let y = m.forward(Tensor::zeros([2, 3, size, size], &device));
            assert_eq!(y.dims(), [2, 7]);
        }
        // The published parameter counts with the 1000-class classifier (B0 5,288,548; Lite0 4,652,008);
        // burn's count also includes the 2 × 21,008 batch-norm running statistics.
        for (arch, published) in [(Arch::B0, 5_288_548), (Arch::Lite0, 4_652_008)] {
            let mut cfg = ModelConfig::new(arch, 1000);
            cfg.plain_head = true;
            assert_eq!(
                cfg.init(&device).num_params(),
                published + 2 * 21_008,
                "{arch:?}"
            );
        }
    }
}

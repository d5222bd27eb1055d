//! `emotiond bench-train`: seconds per training step and images/s for B0 and Lite0 at several input sizes.
//!
//! In: sizes, architectures, batch, steps. Out: a table on stdout. Random data and weights: this measures
//! the engine (forward + backward + AdamW step), not accuracy. Not a test: run it by hand.

use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Distribution, Tensor};

use super::data::K;
use super::loss::{LossKind, loss};
use super::model::{Arch, ModelConfig};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Input sizes in pixels.
    #[arg(long, value_delimiter = ',', default_values_t = vec![48, 64, 96, 112])]
    pub sizes: Vec<usize>,
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![Arch::B0, Arch::Lite0])]
    pub archs: Vec<Arch>,
    #[arg(long, default_value_t = 24)]
    pub batch: usize,
    /// Timed steps per configuration (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// `cpu` or `gpu` (a binary built with `--features gpu`), as for `train`.
    #[arg(long, value_enum, default_value_t = super::device::Compute::Cpu)]
    pub device: super::device::Compute,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    super::device::select(args.device)?;
    println!("{}", super::device::describe());
    println!("| arch | input | batch | s/step | img/s |");
    println!("|---|---|---|---|---|");
    for &arch in &args.archs {
        for &size in &args.sizes {
            let (s, ips) = measure(arch, size, args.batch, args.steps);
            println!(
                "| {} | {size} | {} | {s:.3} | {ips:.1} |",
                arch.name(),
                args.batch
            );
        }
    }
    Ok(())
}

/// Mean seconds per step and images per second for one configuration.
pub fn measure(arch: Arch, size: usize, batch: usize, steps: usize) -> (f64, f64) {
    let dev = super::device().autodiff();
    dev.seed(1);
    let mut model = ModelConfig::new(arch, K).init(&dev);
    let mut optim = AdamWConfig::new().init();
    let mut step = |model: super::model::EfficientNet| {
        let x = Tensor::<4>::random([batch, 3, size, size], Distribution::Normal(0.0, 1.0), &dev);
        let t = Tensor::<2>::zeros([batch, K], &dev)
            .slice_assign([0..batch, 0..1], Tensor::ones([batch, 1], &dev));
        let l = loss(
            model.forward(x),
            t,
            None,
            LossKind::Focal {
                alpha: 0.25,
                gamma: 2.0,
            },
        );
        let grads = GradientsParams::from_grads(l.backward(), &model);
        let m = optim.step(1e-3, model, grads);
        // Force execution before the clock stops.
        let _ = m.fc1.weight.val().into_data();
        m
    };
    model = step(model);
    let start = Instant::now();
    for _ in 0..steps {
        model = step(model);
    }
    let _ = model.num_params();
    let s = start.elapsed().as_secs_f64() / steps.max(1) as f64;
    (s, batch as f64 / s)
}

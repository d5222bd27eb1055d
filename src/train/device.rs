//! Where burn computes: the `flex` CPU backend, or with the `gpu` cargo feature a GPU reached through wgpu
//! (Vulkan on Linux). `--device` picks one per process; everything in `train` and
//! `bench-train` asks [`device`] for it. Exports, soups and evaluation do not depend on it: weights leave burn
//! as plain `f32` and are served by ONNX Runtime.

use std::sync::{Mutex, OnceLock};

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

/// `--device`: where training runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compute {
    /// burn's `flex` backend on the CPU cores.
    #[default]
    Cpu,
    /// The first GPU wgpu finds (a discrete GPU before an integrated or software one). Needs a binary built
    /// with `--features gpu` and the GPU's Vulkan driver.
    Gpu,
}

static SELECTED: OnceLock<(Compute, Device)> = OnceLock::new();

/// Chooses the device for this process. The first call wins; a later call asking for another device is an
/// error (burn's runtimes cannot be re-initialised).
pub fn select(compute: Compute) -> anyhow::Result<()> {
    // One initialisation at a time: a runtime started twice fails the second time.
    static INIT: Mutex<()> = Mutex::new(());
    let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((current, _)) = SELECTED.get() {
        if *current != compute {
            anyhow::bail!(
                "--device {}: this process already trains on {}",
                name(compute),
                name(*current)
            );
        }
        return Ok(());
    }
    let device = match compute {
        Compute::Cpu => Device::flex(),
        Compute::Gpu => gpu()?,
    };
    let _ = SELECTED.set((compute, device));
    Ok(())
}

/// The selected device (the CPU unless [`select`] chose the GPU).
pub fn device() -> Device {
    SELECTED
        .get()
        .map(|(_, d)| d.clone())
        .unwrap_or_else(Device::flex)
}

/// One line for logs and `run_config.json`.
pub fn describe() -> String {
    match SELECTED.get().map(|(c, _)| *c).unwrap_or_default() {
        Compute::Cpu => "burn 0.22.1 flex (CPU) + autodiff".into(),
        Compute::Gpu => "burn 0.22.1 wgpu (GPU) + autodiff".into(),
    }
}

fn name(c: Compute) -> &'static str {
    match c {
        Compute::Cpu => "cpu",
        Compute::Gpu => "gpu",
    }
}

#[cfg(feature = "gpu")]
fn gpu() -> anyhow::Result<Device> {
    // Initialised eagerly so that a missing driver is reported here, before any data is loaded.
    let device = Device::wgpu_options().init().map_err(|e| {
        anyhow::anyhow!(
            "--device gpu: no usable GPU ({e}). Install the GPU's Vulkan driver (NVIDIA: the driver's Vulkan \
             ICD; Debian's mesa-vulkan-drivers covers AMD, Intel and the lavapipe CPU fallback) and check \
             it with `vulkaninfo --summary`; CUBECL_WGPU_DEFAULT_DEVICE picks among several"
        )
    })?;
    // A one-element round trip: adapters that enumerate but cannot run compute fail here, not mid-epoch.
    let probe = burn::tensor::Tensor::<1>::from_floats([1.0], &device) + 1.0;
    let v = probe.into_data().convert::<f32>().try_to_vec::<f32>();
    match v.as_deref() {
        Ok([x]) if (*x - 2.0).abs() < 1e-6 => Ok(device),
        other => {
            anyhow::bail!("--device gpu: the GPU returned {other:?} for 1 + 1; not training on it")
        }
    }
}

#[cfg(not(feature = "gpu"))]
fn gpu() -> anyhow::Result<Device> {
    anyhow::bail!(
        "--device gpu: this emotiond was built without GPU training. Rebuild it with \
         `cargo build --release --features gpu` (burn's wgpu backend; Vulkan on Linux)"
    )
}

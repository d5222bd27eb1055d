//! Sample → model input, with and without augmentation.
//!
//! In: a grey [`Sample`] and the model's [`ModelSpec`]. Out: `input_len()` f32 values.
//! Without augmentation this is exactly the daemon's path ([`crop_to_input`] on the whole image, which ends in
//! [`normalize_into`]), so validation numbers measure what serving will see. With augmentation one affine warp
//! (random resized crop, small rotation, horizontal flip) resamples the image straight to the input size, a
//! brightness/contrast jitter follows on the 8-bit pixels, and [`normalize_into`] does the rest.

use opencv::core::{Mat, Rect, Scalar, Size};
use opencv::imgproc;
use opencv::prelude::*;

use crate::model::{ModelSpec, crop_to_input, normalize_into};

use super::data::Sample;
use super::rng::Rng;

/// Augmentation strengths. `Augment::none()` turns everything off.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Augment {
    pub flip: bool,
    /// Random resized crop: the crop's area is `[min_scale, 1]` of the image.
    pub min_scale: f32,
    /// Aspect ratio jitter of the crop, `[1/r, r]`.
    pub max_aspect: f32,
    /// Rotation in degrees, `±rotate`.
    pub rotate: f32,
    /// Brightness shift `±brightness × 255` and contrast factor `1 ± contrast`.
    pub brightness: f32,
    pub contrast: f32,
}

impl Default for Augment {
    fn default() -> Self {
        Self {
            flip: true,
            min_scale: 0.8,
            max_aspect: 1.1,
            rotate: 10.0,
            brightness: 0.2,
            contrast: 0.2,
        }
    }
}

impl Augment {
    pub fn none() -> Self {
        Self {
            flip: false,
            min_scale: 1.0,
            max_aspect: 1.0,
            rotate: 0.0,
            brightness: 0.0,
            contrast: 0.0,
        }
    }
    pub fn is_none(&self) -> bool {
        *self == Self::none()
    }
}

fn mat_of(s: &Sample) -> opencv::Result<Mat> {
    let m = Mat::new_rows_cols_with_data(s.height as i32, s.width as i32, &s.pixels)?;
    m.try_clone()
}

/// The serving path: the whole image is the face crop.
pub fn plain_input(s: &Sample, spec: &ModelSpec, out: &mut Vec<f32>) -> opencv::Result<()> {
    let m = mat_of(s)?;
    crop_to_input(
        &m,
        Rect::new(0, 0, s.width as i32, s.height as i32),
        spec,
        out,
    )
}

/// An augmented input, appended to `out`.
pub fn augmented_input(
    s: &Sample,
    spec: &ModelSpec,
    aug: &Augment,
    rng: &mut Rng,
    out: &mut Vec<f32>,
) -> opencv::Result<()> {
    if aug.is_none() {
        return plain_input(s, spec, out);
    }
    let (w, h) = (s.width as f32, s.height as f32);
    let side = spec.input_size as f32;
    // Random resized crop (area fraction and aspect), centred at a random point where it fits.
    let area = rng.range(aug.min_scale.min(1.0), 1.0);
    let log_r = aug.max_aspect.max(1.0).ln();
    let aspect = rng.range(-log_r, log_r).exp();
    let cw = (w * (area * aspect).sqrt()).min(w);
    let ch = (h * (area / aspect).sqrt()).min(h);
    let cx = rng.range(cw / 2.0, w - cw / 2.0);
    let cy = rng.range(ch / 2.0, h - ch / 2.0);
    let angle = rng.range(-aug.rotate, aug.rotate);
    let flip = aug.flip && rng.f32() < 0.5;

    // Map output pixel centres back to the crop: rotate about the crop centre, scale, optional mirror.
    let (sx, sy) = (cw / side, ch / side);
    let (sin, cos) = angle.to_radians().sin_cos();
    let fx = if flip { -1.0 } else { 1.0 };
    // src = C + R · diag(fx·sx, sy) · (dst − side/2)
    let a = [cos * fx * sx, -sin * sy, sin * fx * sx, cos * sy];
    let half = side / 2.0 - 0.5;
    let tx = cx - 0.5 - (a[0] * half + a[1] * half);
    let ty = cy - 0.5 - (a[2] * half + a[3] * half);
    let m = Mat::from_slice_2d(&[
        [a[0] as f64, a[1] as f64, tx as f64],
        [a[2] as f64, a[3] as f64, ty as f64],
    ])?;
    let src = mat_of(s)?;
    let mut dst = Mat::default();
    imgproc::warp_affine(
        &src,
        &mut dst,
        &m,
        Size::new(side as i32, side as i32),
        imgproc::INTER_LINEAR | imgproc::WARP_INVERSE_MAP,
        opencv::core::BORDER_REFLECT_101,
        Scalar::default(),
    )?;
    let mut px = dst.data_bytes()?.to_vec();
    if aug.brightness > 0.0 || aug.contrast > 0.0 {
        let c = 1.0 + rng.range(-aug.contrast, aug.contrast);
        let b = rng.range(-aug.brightness, aug.brightness) * 255.0;
        let mean = px.iter().map(|&v| v as f32).sum::<f32>() / px.len() as f32;
        for v in px.iter_mut() {
            *v = ((*v as f32 - mean) * c + mean + b)
                .round()
                .clamp(0.0, 255.0) as u8;
        }
    }
    let start = out.len();
    out.resize(start + spec.input_len(), 0.0);
    normalize_into(spec, &px, &mut out[start..]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Color, Layout};

    fn spec(size: u32) -> ModelSpec {
        ModelSpec::fer(size, Layout::Nchw, Color::Gray3, vec![0.5], vec![0.25])
    }

    #[test]
    fn identity_warp_matches_the_serving_path() {
        // A gradient image: with no jitter the warp must reproduce the resize closely.
        let pixels: Vec<u8> = (0..48 * 48).map(|i| ((i % 48) * 5) as u8).collect();
        let s = Sample {
            pixels,
            width: 48,
            height: 48,
            label: 0,
            target: [0.0; 7],
            source: String::new(),
        };
        let spec = spec(48);
        let mut a = Vec::new();
        plain_input(&s, &spec, &mut a).unwrap();
        let mut b = Vec::new();
        let aug = Augment {
            flip: false,
            min_scale: 1.0,
            max_aspect: 1.0,
            rotate: 0.0,
            brightness: 0.0,
            contrast: 1e-9,
        };
        augmented_input(&s, &spec, &aug, &mut Rng::new(1), &mut b).unwrap();
        assert_eq!(a.len(), 3 * 48 * 48);
        let max = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(max < 0.05, "{max}");
        // A flip mirrors columns.
        let aug = Augment {
            flip: true,
            ..Augment::none()
        };
        let mut rng = Rng::new(3);
        let mut c = Vec::new();
        for _ in 0..8 {
            c.clear();
            augmented_input(&s, &spec, &aug, &mut rng, &mut c).unwrap();
            if (c[0] - a[47]).abs() < 0.05 {
                return;
            }
        }
        panic!("no flipped sample in 8 draws");
    }
}

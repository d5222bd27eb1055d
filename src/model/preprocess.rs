//! Face crop → model input. The one implementation used by the daemon, `classify`, `eval` and `train`.
//!
//! In: a BGR (or grey) OpenCV image and a face rectangle. Out: `input_size² × channels` f32 values in the
//! model's layout, colour and normalisation ([`ModelSpec`]).

use opencv::core::{Mat, Rect, Size};
use opencv::imgproc;
use opencv::prelude::*;

use super::spec::{Color, Layout, ModelSpec};

/// The crop rectangle for a detected face box (`x, y, w, h` in pixels): grown by `margin` × side on every side,
/// made square around its centre when `square`, shifted inside the image where it fits and clamped where it
/// does not. Always non-empty for a non-empty image.
pub fn face_crop_rect(img_w: i32, img_h: i32, bbox: [f32; 4], margin: f32, square: bool) -> Rect {
    let [x, y, w, h] = bbox;
    let (cx, cy) = (x + w / 2.0, y + h / 2.0);
    let (mut cw, mut ch) = (w * (1.0 + 2.0 * margin), h * (1.0 + 2.0 * margin));
    if square {
        let s = cw.max(ch);
        cw = s;
        ch = s;
    }
    let clamp_axis = |c: f32, len: f32, limit: i32| -> (i32, i32) {
        let len = len.round().clamp(1.0, limit as f32) as i32;
        let start = (c - len as f32 / 2.0).round() as i32;
        (start.clamp(0, limit - len), len)
    };
    let (x0, w0) = clamp_axis(cx, cw, img_w.max(1));
    let (y0, h0) = clamp_axis(cy, ch, img_h.max(1));
    Rect::new(x0, y0, w0, h0)
}

/// Crops `rect` out of `img` (BGR with 3 channels, or grey with 1), converts it to the model's colour, resizes it
/// to the model's input size and appends the normalised values to `out`.
pub fn crop_to_input(
    img: &Mat,
    rect: Rect,
    spec: &ModelSpec,
    out: &mut Vec<f32>,
) -> opencv::Result<()> {
    let roi = Mat::roi(img, rect)?;
    let src_channels = img.channels();
    let mut converted = Mat::default();
    let code = match (src_channels, spec.color) {
        (3, Color::Gray | Color::Gray3) => Some(imgproc::COLOR_BGR2GRAY),
        (3, Color::Rgb) => Some(imgproc::COLOR_BGR2RGB),
        (1, Color::Rgb | Color::Bgr) => Some(imgproc::COLOR_GRAY2BGR),
        _ => None,
    };
    let side = spec.input_size as i32;
    // INTER_AREA when shrinking (anti-aliased, what FER-2013's 48 px crops look like); linear when growing.
    let interp = if rect.width > side {
        imgproc::INTER_AREA
    } else {
        imgproc::INTER_LINEAR
    };
    let mut resized = Mat::default();
    let size = Size::new(side, side);
    match code {
        Some(code) => {
            imgproc::cvt_color_def(&roi, &mut converted, code)?;
            imgproc::resize(&converted, &mut resized, size, 0.0, 0.0, interp)?;
        }
        None => imgproc::resize(&roi, &mut resized, size, 0.0, 0.0, interp)?,
    }
    let resized = if resized.is_continuous() {
        resized
    } else {
        resized.try_clone()?
    };
    let bytes = resized.data_bytes()?;
    let start = out.len();
    out.resize(start + spec.input_len(), 0.0);
    normalize_into(spec, bytes, &mut out[start..]);
    Ok(())
}

/// Normalises one `input_size²` image to the model's layout. `pixels` is HWC with 1 channel for `gray`/`gray3`
/// and 3 channels (already in the model's channel order) for `rgb`/`bgr`; `out.len()` must be
/// [`ModelSpec::input_len`].
pub fn normalize_into(spec: &ModelSpec, pixels: &[u8], out: &mut [f32]) {
    let hw = (spec.input_size * spec.input_size) as usize;
    let channels = spec.color.channels();
    let src_channels = if spec.color == Color::Gray3 {
        1
    } else {
        channels
    };
    assert_eq!(
        pixels.len(),
        hw * src_channels,
        "normalize_into: pixel buffer size: this is a bug"
    );
    assert_eq!(
        out.len(),
        hw * channels,
        "normalize_into: output size: this is a bug"
    );
    for c in 0..channels {
        let (mean, std) = spec.norm(c);
        let (scale, shift) = (1.0 / (255.0 * std), -mean / std);
        let sc = if src_channels == 1 { 0 } else { c };
        for i in 0..hw {
            let v = pixels[i * src_channels + sc] as f32 * scale + shift;
            match spec.layout {
                Layout::Nchw => out[c * hw + i] = v,
                Layout::Nhwc => out[i * channels + c] = v,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(color: Color, layout: Layout, size: u32) -> ModelSpec {
        ModelSpec::fer(size, layout, color, vec![0.5], vec![0.5])
    }

    #[test]
    fn crop_rect_is_square_and_inside() {
        // A face touching the right edge: the square crop shifts left to stay inside.
        let r = face_crop_rect(640, 360, [600.0, 100.0, 40.0, 60.0], 0.1, true);
        assert_eq!(r.width, r.height);
        assert!(
            r.x >= 0 && r.x + r.width <= 640 && r.y >= 0 && r.y + r.height <= 360,
            "{r:?}"
        );
        assert_eq!(r.width, 72); // 60 * 1.2
        // Bigger than the image: clamped to the image.
        let r = face_crop_rect(100, 50, [0.0, 0.0, 100.0, 50.0], 0.5, true);
        assert_eq!((r.x, r.y, r.width, r.height), (0, 0, 100, 50));
        // No margin, not square: the box itself.
        let r = face_crop_rect(640, 360, [10.0, 20.0, 30.0, 40.0], 0.0, false);
        assert_eq!((r.x, r.y, r.width, r.height), (10, 20, 30, 40));
    }

    #[test]
    fn normalises_in_both_layouts() {
        let s = spec(Color::Gray3, Layout::Nchw, 2);
        let mut out = vec![0.0; 12];
        normalize_into(&s, &[0, 255, 0, 255], &mut out);
        assert_eq!(&out[..4], &[-1.0, 1.0, -1.0, 1.0]);
        assert_eq!(&out[4..8], &out[..4]); // replicated channels

        let s = spec(Color::Rgb, Layout::Nhwc, 1);
        let mut out = vec![0.0; 3];
        normalize_into(&s, &[0, 51, 255], &mut out);
        assert!((out[1] - (0.2 - 0.5) / 0.5).abs() < 1e-6);
        assert_eq!((out[0], out[2]), (-1.0, 1.0));
    }

    #[test]
    fn crops_a_bgr_image_to_grey_input() {
        let img = Mat::new_rows_cols_with_default(
            100,
            100,
            opencv::core::CV_8UC3,
            opencv::core::Scalar::all(255.0),
        )
        .unwrap();
        let s = spec(Color::Gray, Layout::Nhwc, 64);
        let mut out = Vec::new();
        crop_to_input(&img, Rect::new(10, 10, 80, 80), &s, &mut out).unwrap();
        assert_eq!(out.len(), 64 * 64);
        assert!(out.iter().all(|v| (v - 1.0).abs() < 1e-6));
    }
}

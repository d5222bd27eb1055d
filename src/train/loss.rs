//! Losses and class-imbalance strategies.
//!
//! In: logits `N×K`, soft targets `N×K` (one-hot, label-smoothed, mixed-up or FER+ vote distributions) and
//! optional per-class weights. Out: a scalar loss. The three imbalance strategies of the recipe are
//! independent and combinable: undersampling (a cap per class, applied to the sample list), inverse-frequency
//! class weights (normalised so the K weights sum to K) and focal loss
//! `FL = −α Σ_c t_c (1 − p_c)^γ log p_c`, which is `−α (1 − p_t)^γ log p_t` for one-hot targets.

use burn::tensor::{Tensor, activation};

/// Which loss to optimise.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum LossKind {
    CrossEntropy,
    Focal { alpha: f32, gamma: f32 },
}

/// Mean over the batch of `−Σ_c w_c t_c m_c log p_c`, with `m_c = α (1 − p_c)^γ` for focal loss and 1 for
/// cross-entropy. `weights` (length K) multiplies each class's term.
pub fn loss(
    logits: Tensor<2>,
    targets: Tensor<2>,
    weights: Option<&[f32]>,
    kind: LossKind,
) -> Tensor<1> {
    let [n, k] = logits.dims();
    let device = logits.device();
    let log_p = activation::log_softmax(logits, 1);
    let mut per = targets * log_p.clone();
    if let LossKind::Focal { alpha, gamma } = kind {
        // (1 − p)^γ with 1 − p clamped away from 0: finite gradients even for γ < 1 when p → 1.
        let one_minus_p = log_p.exp().neg().add_scalar(1.0).clamp_min(1e-12);
        let modulating = if gamma == 0.0 {
            one_minus_p.ones_like()
        } else {
            one_minus_p.powf_scalar(gamma)
        };
        per = per * modulating.mul_scalar(alpha);
    }
    if let Some(w) = weights {
        assert_eq!(w.len(), k, "class weights: one per class: this is a bug");
        let w = Tensor::<1>::from_floats(w, &device).reshape([1, k]);
        per = per * w;
    }
    per.sum().neg().div_scalar(n as f32)
}

/// Inverse-frequency weights normalised so they sum to the number of classes. A class with no samples gets
/// weight 0 (it cannot contribute to the loss anyway) and is left out of the normalisation.
pub fn inverse_frequency_weights(counts: &[usize]) -> Vec<f32> {
    let inv: Vec<f64> = counts
        .iter()
        .map(|&c| if c == 0 { 0.0 } else { 1.0 / c as f64 })
        .collect();
    let sum: f64 = inv.iter().sum();
    if sum == 0.0 {
        return vec![1.0; counts.len()];
    }
    let k = counts.len() as f64;
    inv.iter().map(|v| (v * k / sum) as f32).collect()
}

/// One-hot targets smoothed towards uniform: `t = (1 − ε) t + ε / K`.
pub fn smooth(target: &mut [f32], epsilon: f32) {
    let k = target.len() as f32;
    for t in target.iter_mut() {
        *t = (1.0 - epsilon) * *t + epsilon / k;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn t2(rows: &[[f32; 3]], device: &Device) -> Tensor<2> {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_data(TensorData::new(flat, [rows.len(), 3]), device)
    }

    fn scalar(t: Tensor<1>) -> f32 {
        t.into_data().try_to_vec::<f32>().unwrap()[0]
    }

    #[test]
    fn focal_matches_hand_computed_values() {
        let d = Device::flex();
        // logits (0, ln 3, 0): p = (0.2, 0.6, 0.2). Target class 1: p_t = 0.6.
        let logits = t2(&[[0.0, 3f32.ln(), 0.0]], &d);
        let target = t2(&[[0.0, 1.0, 0.0]], &d);
        let ce = -(0.6f32).ln(); // 0.5108
        let got = scalar(loss(
            logits.clone(),
            target.clone(),
            None,
            LossKind::CrossEntropy,
        ));
        assert!((got - ce).abs() < 1e-5, "{got}");
        // γ = 0: α-weighted cross-entropy.
        let got = scalar(loss(
            logits.clone(),
            target.clone(),
            None,
            LossKind::Focal {
                alpha: 0.25,
                gamma: 0.0,
            },
        ));
        assert!((got - 0.25 * ce).abs() < 1e-5, "{got}");
        // γ = 2: 0.25 · 0.4² · 0.5108 = 0.020433.
        let got = scalar(loss(
            logits.clone(),
            target.clone(),
            None,
            LossKind::Focal {
                alpha: 0.25,
                gamma: 2.0,
            },
        ));
        assert!((got - 0.25 * 0.16 * ce).abs() < 1e-6, "{got}");
        // Class weights multiply the target class's term; batch mean over two rows.
        let logits2 = t2(&[[0.0, 3f32.ln(), 0.0], [0.0, 3f32.ln(), 0.0]], &d);
        let target2 = t2(&[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], &d);
        let w = [2.0, 0.5, 0.5];
        let got = scalar(loss(logits2, target2, Some(&w), LossKind::CrossEntropy));
        let want = (0.5 * ce + 2.0 * -(0.2f32).ln()) / 2.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        // Soft targets: the vote-weighted sum of the per-class terms.
        let soft = t2(&[[0.5, 0.5, 0.0]], &d);
        let got = scalar(loss(
            logits,
            soft,
            None,
            LossKind::Focal {
                alpha: 0.25,
                gamma: 2.0,
            },
        ));
        let want = 0.25 * (0.5 * 0.64 * -(0.2f32).ln() + 0.5 * 0.16 * ce);
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn focal_gradients_are_finite_when_p_goes_to_one() {
        let d = Device::flex().autodiff();
        for gamma in [2.0, 0.5] {
            let logits = t2(&[[60.0, -60.0, 0.0], [0.0, 0.0, 200.0]], &d).require_grad();
            let target = t2(&[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], &d);
            let l = loss(
                logits.clone(),
                target,
                None,
                LossKind::Focal { alpha: 0.25, gamma },
            );
            let grads = l.backward();
            let g = logits
                .grad(&grads)
                .unwrap()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            assert!(g.iter().all(|v| v.is_finite()), "γ={gamma}: {g:?}");
        }
    }

    #[test]
    fn inverse_frequency_weights_sum_to_k() {
        let w = inverse_frequency_weights(&[100, 50, 25, 25]);
        // 1/n ∝ (1, 2, 4, 4) → × 4/11.
        let want = [4.0 / 11.0, 8.0 / 11.0, 16.0 / 11.0, 16.0 / 11.0];
        for (a, b) in w.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{w:?}");
        }
        // FER-2013 training counts in our label order.
        let w = inverse_frequency_weights(&[3995, 436, 4097, 7215, 4830, 3171, 4965]);
        assert!((w.iter().sum::<f32>() - 7.0).abs() < 1e-5);
        assert!((w[1] - 4.39).abs() < 0.01, "{w:?}");
        assert_eq!(inverse_frequency_weights(&[10, 0])[1], 0.0);
    }

    #[test]
    fn smoothing() {
        let mut t = [0.0, 1.0, 0.0, 0.0];
        smooth(&mut t, 0.1);
        assert!((t[1] - 0.925).abs() < 1e-6 && (t[0] - 0.025).abs() < 1e-6);
    }
}

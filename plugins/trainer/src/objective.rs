//! The Prefix-RFT losses on summed completion log-probabilities (DESIGN.md, "The Prefix-RFT
//! objective"): DPO on preference pairs, SFT on demonstrations and KTO on unpaired thumbs.
//!
//! Every function takes candle tensors so gradients flow back to the adapter; reference
//! log-probabilities are plain (detached) tensors. Nothing here runs a model: the trainer
//! computes the log-probabilities and this module only turns them into a loss. Sigmoids are
//! written through the stable `log σ(x) = −relu(−x) − log(1 + e^{−|x|})`, so no `exp` of a
//! large positive number is ever taken.

use candle_core::Tensor;

/// `log σ(x)` element-wise, stable for large `|x|`.
pub fn log_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    let soft = ((x.abs()?.neg()?.exp()? + 1.0)?).log()?;
    x.neg()?.relu()?.neg()? - soft
}

/// Per-pair DPO loss `−log σ(β (ρ_w − ρ_l))` with `ρ = log π − log π_ref`; all inputs `[n]`.
pub fn dpo_losses(
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
    beta: f64,
) -> candle_core::Result<Tensor> {
    let margin = implicit_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)?;
    log_sigmoid(&margin.affine(beta, 0.0)?)?.neg()
}

/// `ρ_w − ρ_l` per pair: the implicit reward margin (before the factor β).
pub fn implicit_margin(
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
) -> candle_core::Result<Tensor> {
    let rho_w = (policy_chosen - ref_chosen.detach())?;
    let rho_l = (policy_rejected - ref_rejected.detach())?;
    rho_w - rho_l
}

/// Mean token negative log-likelihood of demonstrations: `−Σ logp / Σ tokens`, where
/// `logp_sums` `[n]` holds each demonstration's summed completion log-probability and
/// `tokens` is the total number of completion tokens (must be positive).
pub fn sft_loss(logp_sums: &Tensor, tokens: usize) -> candle_core::Result<Tensor> {
    if tokens == 0 {
        candle_core::bail!("SFT loss over zero tokens");
    }
    logp_sums.sum_all()?.affine(-1.0 / tokens as f64, 0.0)
}

/// KTO weights and temperature.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KtoParams {
    /// β, as in DPO.
    pub beta: f64,
    /// λ_D, the weight of a desirable example's loss.
    pub desirable_weight: f64,
    /// λ_U, the weight of an undesirable example's loss.
    pub undesirable_weight: f64,
}

/// The KL reference point `z0`: the mean of `ρ` over the batch, detached and clamped at 0 as
/// TRL's `KTOTrainer` does. TRL estimates it on mismatched (prompt, completion) pairs; we use
/// the completions the batch already scores, which costs no extra forward.
pub fn kto_reference_point(rho: &Tensor) -> candle_core::Result<f64> {
    let n = rho.elem_count();
    if n == 0 {
        return Ok(0.0);
    }
    let mean = rho
        .detach()
        .to_dtype(candle_core::DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?
        / n as f64;
    Ok(mean.max(0.0))
}

/// Per-example KTO loss: desirable `λ_D (1 − σ(β(ρ − z0)))`, undesirable
/// `λ_U (1 − σ(β(z0 − ρ)))`; `rho` is `[n]` and `desirable[i]` says which applies.
/// `1 − σ(u)` is computed as `exp(log σ(−u))`.
pub fn kto_losses(
    rho: &Tensor,
    desirable: &[bool],
    z0: f64,
    params: KtoParams,
) -> candle_core::Result<Tensor> {
    let n = rho.elem_count();
    if desirable.len() != n {
        candle_core::bail!("{} desirability flags for {n} examples", desirable.len());
    }
    // sign = +1 for desirable (u = β(ρ − z0)), −1 for undesirable (u = β(z0 − ρ)); the loss is
    // σ(−u) = exp(log σ(−sign·β(ρ − z0))).
    let signs: Vec<f64> = desirable
        .iter()
        .map(|&d| if d { -1.0 } else { 1.0 })
        .collect();
    let weights: Vec<f64> = desirable
        .iter()
        .map(|&d| {
            if d {
                params.desirable_weight
            } else {
                params.undesirable_weight
            }
        })
        .collect();
    let dev = rho.device();
    let signs = Tensor::new(signs, dev)?.to_dtype(rho.dtype())?;
    let weights = Tensor::new(weights, dev)?.to_dtype(rho.dtype())?;
    let u = (rho.affine(params.beta, -params.beta * z0)? * signs)?;
    log_sigmoid(&u)?.exp()? * weights
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn t(v: &[f64]) -> Tensor {
        Tensor::new(v, &Device::Cpu).expect("tensor")
    }

    fn vec(x: &Tensor) -> Vec<f64> {
        x.to_dtype(DType::F64)
            .and_then(|x| x.to_vec1::<f64>())
            .expect("vec")
    }

    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    #[test]
    fn log_sigmoid_matches_closed_form_and_stays_finite() {
        let xs = [-800.0, -30.0, -1.5, 0.0, 0.3, 12.0, 800.0];
        let got = vec(&log_sigmoid(&t(&xs)).expect("log sigmoid"));
        for (x, g) in xs.iter().zip(&got) {
            let want = if *x < -700.0 { *x } else { sigmoid(*x).ln() };
            assert!((g - want).abs() < 1e-12, "log σ({x}) = {g}, want {want}");
        }
        assert_eq!(got[3], -std::f64::consts::LN_2);
    }

    #[test]
    fn dpo_loss_matches_hand_computed_values() {
        // ρ_w = −3 − (−4) = 1, ρ_l = −5 − (−4.5) = −0.5: margin 1.5, loss −log σ(0.1·1.5).
        // Second pair: ρ_w = 0, ρ_l = 2: margin −2, loss −log σ(−0.2).
        let losses = dpo_losses(
            &t(&[-3.0, -7.0]),
            &t(&[-5.0, -6.0]),
            &t(&[-4.0, -7.0]),
            &t(&[-4.5, -8.0]),
            0.1,
        )
        .expect("dpo");
        let got = vec(&losses);
        assert!((got[0] - (1.0 + (-0.15f64).exp()).ln()).abs() < 1e-12);
        assert!((got[1] - (1.0 + 0.2f64.exp()).ln()).abs() < 1e-12);
        assert!((got[0] - 0.620_957_047_789_532).abs() < 1e-12, "{}", got[0]);
    }

    #[test]
    fn dpo_loss_is_ln2_when_policy_equals_reference() {
        let lp = t(&[-12.25, -3.5]);
        let got = vec(&dpo_losses(&lp, &lp, &lp, &lp, 0.1).expect("dpo"));
        assert_eq!(got, vec![std::f64::consts::LN_2; 2]);
    }

    #[test]
    fn sft_loss_is_mean_token_nll() {
        let got = sft_loss(&t(&[-6.0, -2.0]), 8).expect("sft");
        assert_eq!(got.to_scalar::<f64>().expect("scalar"), 1.0);
        assert!(sft_loss(&t(&[-1.0]), 0).is_err());
    }

    #[test]
    fn kto_loss_matches_hand_computed_values() {
        let p = KtoParams {
            beta: 0.5,
            desirable_weight: 1.0,
            undesirable_weight: 2.0,
        };
        let rho = t(&[1.0, -0.5, 3.0]);
        let z0 = kto_reference_point(&rho).expect("z0");
        assert!((z0 - 3.5 / 3.0).abs() < 1e-12);
        assert_eq!(kto_reference_point(&t(&[-1.0, -2.0])).expect("z0"), 0.0);
        let got = vec(&kto_losses(&rho, &[true, false, true], z0, p).expect("kto"));
        let want = [
            1.0 - sigmoid(0.5 * (1.0 - z0)),
            2.0 * (1.0 - sigmoid(0.5 * (z0 + 0.5))),
            1.0 - sigmoid(0.5 * (3.0 - z0)),
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{g} vs {w}");
        }
    }

    /// Central finite differences of `f` at `x` against candle's gradient.
    fn check_gradient(x0: &[f64], f: impl Fn(&Tensor) -> Tensor) {
        let var = Var::new(x0, &Device::Cpu).expect("var");
        let loss = f(var.as_tensor());
        let grads = loss.backward().expect("backward");
        let g = vec(grads.get(var.as_tensor()).expect("gradient"));
        let h = 1e-6;
        for i in 0..x0.len() {
            let mut up = x0.to_vec();
            up[i] += h;
            let mut down = x0.to_vec();
            down[i] -= h;
            let fu = f(&t(&up)).to_scalar::<f64>().expect("scalar");
            let fd = f(&t(&down)).to_scalar::<f64>().expect("scalar");
            let numeric = (fu - fd) / (2.0 * h);
            assert!(
                (numeric - g[i]).abs() < 1e-7 * (1.0 + numeric.abs()),
                "d/dx{i}: analytic {} vs numeric {numeric}",
                g[i]
            );
        }
    }

    #[test]
    fn dpo_gradient_matches_finite_differences() {
        // x = [policy_w (2), policy_l (2)], references fixed; includes a large margin.
        check_gradient(&[-3.0, -1.0, -5.0, -40.0], |x| {
            let w = x.narrow(0, 0, 2).expect("narrow");
            let l = x.narrow(0, 2, 2).expect("narrow");
            dpo_losses(&w, &l, &t(&[-4.0, -2.0]), &t(&[-4.5, -3.0]), 0.7)
                .and_then(|l| l.sum_all())
                .expect("loss")
        });
    }

    #[test]
    fn kto_and_sft_gradients_match_finite_differences() {
        let p = KtoParams {
            beta: 0.3,
            desirable_weight: 1.0,
            undesirable_weight: 1.5,
        };
        check_gradient(&[0.4, -2.0, 1.7], |rho| {
            kto_losses(rho, &[true, false, false], 0.25, p)
                .and_then(|l| l.sum_all())
                .expect("loss")
        });
        check_gradient(&[-3.0, -0.25], |x| sft_loss(x, 5).expect("loss"));
    }
}

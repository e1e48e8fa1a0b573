//! The training objective: what the network predicts (ε, x₀ or v), how a prediction converts
//! back to ε and x₀ for sampling, and the per-timestep loss weights.
use tch::{Device, Kind, Tensor};

use crate::config::{DiffusionConfig, LossWeighting, Prediction};
use crate::schedule::{DeviceSchedule, NoiseSchedule};

/// Loss weight w(t) for each timestep, in f64 (Hang et al. 2023 for min-SNR-γ).
pub fn loss_weights(
    schedule: &NoiseSchedule,
    weighting: LossWeighting,
    prediction: Prediction,
    gamma: f64,
) -> Vec<f64> {
    (0..schedule.timesteps())
        .map(|t| {
            let snr = schedule.snr(t);
            match weighting {
                LossWeighting::None => 1.0,
                LossWeighting::InvOneMinusAlphabar => 1.0 / (1.0 - schedule.alphas_cumprod[t]),
                LossWeighting::Snr => snr,
                LossWeighting::MinSnr => match prediction {
                    Prediction::Epsilon => snr.min(gamma) / snr,
                    Prediction::X0 => snr.min(gamma),
                    Prediction::V => snr.min(gamma) / (snr + 1.0),
                },
            }
        })
        .collect()
}

/// The objective on the training device.
pub struct Objective {
    pub prediction: Prediction,
    schedule: DeviceSchedule,
    weights: Option<Tensor>,
}

impl Objective {
    pub fn new(config: &DiffusionConfig, schedule: &NoiseSchedule, device: Device) -> Self {
        let weights = (config.loss_weighting != LossWeighting::None).then(|| {
            NoiseSchedule::to_device(
                &loss_weights(
                    schedule,
                    config.loss_weighting,
                    config.prediction,
                    config.min_snr_gamma,
                ),
                device,
            )
        });
        Objective {
            prediction: config.prediction,
            schedule: DeviceSchedule::new(schedule, device),
            weights,
        }
    }

    pub fn q_sample(&self, x0: &Tensor, t: &Tensor, noise: &Tensor) -> Tensor {
        self.schedule.q_sample(x0, t, noise)
    }

    /// The regression target for (x₀, ε, t).
    pub fn target(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Tensor {
        match self.prediction {
            Prediction::Epsilon => noise.shallow_clone(),
            Prediction::X0 => x0.shallow_clone(),
            Prediction::V => {
                let (a, b) = self.schedule.coefficients(t);
                a * noise - b * x0
            }
        }
    }

    /// Per-sample squared error (mean over pixels), weighted by w(t), averaged over the batch.
    /// Reduced-precision predictions are compared in f32.
    pub fn loss(&self, prediction: &Tensor, target: &Tensor, t: &Tensor) -> Tensor {
        self.loss_and_errors(prediction, target, t).0
    }

    /// The loss, and each sample's unweighted error (detached) for monitoring by timestep.
    pub fn loss_and_errors(
        &self,
        prediction: &Tensor,
        target: &Tensor,
        t: &Tensor,
    ) -> (Tensor, Tensor) {
        let per_sample = per_sample_error(prediction, target);
        let loss = match &self.weights {
            Some(w) => (&per_sample * w.index_select(0, t)).mean(None),
            None => per_sample.mean(None),
        };
        (loss, per_sample.detach())
    }
}

/// Mean squared error per sample, [B]; at least f32.
pub fn per_sample_error(prediction: &Tensor, target: &Tensor) -> Tensor {
    let kind = match target.kind() {
        Kind::Double => Kind::Double,
        _ => Kind::Float,
    };
    (prediction.to_kind(kind) - target.to_kind(kind))
        .square()
        .mean_dim(&[1i64, 2, 3][..], false, kind)
}

/// Converts a network output at one timestep into (ε̂, x̂₀), given √ᾱ_t and √(1−ᾱ_t).
pub fn to_eps_and_x0(
    prediction: Prediction,
    output: &Tensor,
    x_t: &Tensor,
    sqrt_ab: f64,
    sqrt_1m_ab: f64,
) -> (Tensor, Tensor) {
    match prediction {
        Prediction::Epsilon => {
            let x0 = (x_t - sqrt_1m_ab * output) / sqrt_ab;
            (output.shallow_clone(), x0)
        }
        Prediction::X0 => {
            let eps = (x_t - sqrt_ab * output) / sqrt_1m_ab;
            (eps, output.shallow_clone())
        }
        Prediction::V => {
            let eps = sqrt_ab * output + sqrt_1m_ab * x_t;
            let x0 = sqrt_ab * x_t - sqrt_1m_ab * output;
            (eps, x0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::linear_betas;

    fn schedule() -> NoiseSchedule {
        NoiseSchedule::from_betas(linear_betas(1000, 1e-4, 0.02))
    }

    #[test]
    fn min_snr_weights_match_f64_formulas() {
        let s = schedule();
        let gamma = 5.0;
        for t in [0usize, 50, 200, 999] {
            let ab = (0..=t)
                .map(|i| 1.0 - (1e-4 + (0.02 - 1e-4) * i as f64 / 999.0))
                .product::<f64>();
            let snr = ab / (1.0 - ab);
            let clipped = if snr < gamma { snr } else { gamma };
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs();
            assert!(close(
                loss_weights(&s, LossWeighting::MinSnr, Prediction::Epsilon, gamma)[t],
                clipped / snr
            ));
            assert!(close(
                loss_weights(&s, LossWeighting::MinSnr, Prediction::X0, gamma)[t],
                clipped
            ));
            assert!(close(
                loss_weights(&s, LossWeighting::MinSnr, Prediction::V, gamma)[t],
                clipped / (snr + 1.0)
            ));
            assert!(close(
                loss_weights(
                    &s,
                    LossWeighting::InvOneMinusAlphabar,
                    Prediction::Epsilon,
                    gamma
                )[t],
                1.0 / (1.0 - ab)
            ));
            assert!(close(
                loss_weights(&s, LossWeighting::Snr, Prediction::Epsilon, gamma)[t],
                snr
            ));
            assert_eq!(
                loss_weights(&s, LossWeighting::None, Prediction::V, gamma)[t],
                1.0
            );
        }
        // Low t has high SNR, so min-SNR-γ down-weights it for ε.
        assert!(loss_weights(&s, LossWeighting::MinSnr, Prediction::Epsilon, gamma)[0] < 0.01);
    }

    #[test]
    fn targets_convert_back_to_eps_and_x0() {
        let s = schedule();
        let config = crate::config::RunConfig::preset("tiny").unwrap().diffusion;
        for prediction in [Prediction::Epsilon, Prediction::X0, Prediction::V] {
            let objective = Objective::new(
                &DiffusionConfig {
                    prediction,
                    ..config.clone()
                },
                &s,
                Device::Cpu,
            );
            let x0 = Tensor::rand([4, 1, 8, 8], (Kind::Double, Device::Cpu)) * 2 - 1;
            let eps = Tensor::randn([4, 1, 8, 8], (Kind::Double, Device::Cpu));
            let step = 437usize;
            let t = Tensor::full([4], step as i64, (Kind::Int64, Device::Cpu));
            let ab = s.alphas_cumprod[step];
            let x_t = ab.sqrt() * &x0 + (1.0 - ab).sqrt() * &eps;
            let target = objective.target(&x0, &eps, &t).to_kind(Kind::Double);
            let (eps_hat, x0_hat) =
                to_eps_and_x0(prediction, &target, &x_t, ab.sqrt(), (1.0 - ab).sqrt());
            // The device tables are f32, so the v target itself carries f32 rounding.
            let tol = if prediction == Prediction::V {
                1e-6
            } else {
                1e-12
            };
            assert!(
                (eps_hat - &eps).abs().max().double_value(&[]) < tol,
                "{prediction:?}"
            );
            assert!(
                (x0_hat - &x0).abs().max().double_value(&[]) < tol,
                "{prediction:?}"
            );
        }
    }

    #[test]
    fn weighted_loss_applies_weights_per_sample() {
        let s = schedule();
        let config = crate::config::RunConfig::preset("tiny").unwrap().diffusion;
        let objective = Objective::new(
            &DiffusionConfig {
                loss_weighting: LossWeighting::Snr,
                ..config
            },
            &s,
            Device::Cpu,
        );
        let pred = Tensor::ones([2, 1, 2, 2], (Kind::Float, Device::Cpu));
        let target = Tensor::zeros([2, 1, 2, 2], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[10i64, 500]);
        let loss = objective.loss(&pred, &target, &t).double_value(&[]);
        let expected = (s.snr(10) + s.snr(500)) / 2.0;
        assert!(
            (loss - expected).abs() < 1e-4 * expected,
            "{loss} vs {expected}"
        );
    }
}

//! Noise schedules: β, ᾱ and every derived table, computed in f64 on the host, plus the same
//! tables as f32 tensors on the training device for gathering by timestep.
use tch::{Device, Kind, Tensor};

use crate::config::{DiffusionConfig, ScheduleKind};

/// The tables of a T-step forward process q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I), t = 0..T−1.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    pub betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
    /// ᾱ_{t−1}, with ᾱ_{−1} = 1.
    pub alphas_cumprod_prev: Vec<f64>,
    /// β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)
    pub posterior_variance: Vec<f64>,
    /// Coefficients of x₀ and x_t in the posterior mean μ̃_t(x_t, x₀).
    pub posterior_mean_coef_x0: Vec<f64>,
    pub posterior_mean_coef_xt: Vec<f64>,
}

impl NoiseSchedule {
    pub fn from_config(config: &DiffusionConfig) -> Self {
        let t = config.timesteps;
        let betas = match config.schedule {
            ScheduleKind::Linear => linear_betas(t, config.beta_start, config.beta_end),
            ScheduleKind::Cosine => cosine_betas(t, config.cosine_s),
            ScheduleKind::Sigmoid => sigmoid_betas(t, config.beta_start, config.beta_end),
        };
        Self::from_betas(betas)
    }

    pub fn from_betas(betas: Vec<f64>) -> Self {
        let mut alphas_cumprod = Vec::with_capacity(betas.len());
        let mut product = 1.0;
        for &beta in &betas {
            product *= 1.0 - beta;
            alphas_cumprod.push(product);
        }
        let alphas_cumprod_prev: Vec<f64> = std::iter::once(1.0)
            .chain(alphas_cumprod[..betas.len() - 1].iter().copied())
            .collect();
        let n = betas.len();
        let (mut var, mut coef_x0, mut coef_xt) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        for t in 0..n {
            let (ab, ab_prev, beta) = (alphas_cumprod[t], alphas_cumprod_prev[t], betas[t]);
            var[t] = beta * (1.0 - ab_prev) / (1.0 - ab);
            coef_x0[t] = beta * ab_prev.sqrt() / (1.0 - ab);
            coef_xt[t] = (1.0 - ab_prev) * (1.0 - beta).sqrt() / (1.0 - ab);
        }
        NoiseSchedule {
            betas,
            alphas_cumprod,
            alphas_cumprod_prev,
            posterior_variance: var,
            posterior_mean_coef_x0: coef_x0,
            posterior_mean_coef_xt: coef_xt,
        }
    }

    pub fn timesteps(&self) -> usize {
        self.betas.len()
    }

    /// Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t).
    pub fn snr(&self, t: usize) -> f64 {
        let ab = self.alphas_cumprod[t];
        ab / (1.0 - ab)
    }

    /// A host table as an f32 tensor on `device`.
    pub fn to_device(table: &[f64], device: Device) -> Tensor {
        Tensor::from_slice(table)
            .to_kind(Kind::Float)
            .to_device(device)
    }
}

/// β rising linearly from `start` to `end` (Ho et al. 2020: 1e-4 → 0.02).
pub fn linear_betas(t: usize, start: f64, end: f64) -> Vec<f64> {
    (0..t)
        .map(|i| start + (end - start) * i as f64 / (t - 1) as f64)
        .collect()
}

/// Nichol & Dhariwal 2021: ᾱ(t) = f(t)/f(0), f(t) = cos²(π/2 · (t/T + s)/(1 + s)), β clipped at 0.999.
pub fn cosine_betas(t: usize, s: f64) -> Vec<f64> {
    let f = |i: usize| {
        (((i as f64 / t as f64) + s) / (1.0 + s) * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    (0..t).map(|i| (1.0 - f(i + 1) / f(i)).min(0.999)).collect()
}

/// β = start + (end − start) · sigmoid(x), x evenly spaced on [−6, 6] (as in GeoDiff, Xu et al. 2022).
pub fn sigmoid_betas(t: usize, start: f64, end: f64) -> Vec<f64> {
    (0..t)
        .map(|i| {
            let x = -6.0 + 12.0 * i as f64 / (t - 1) as f64;
            start + (end - start) / (1.0 + (-x).exp())
        })
        .collect()
}

/// The schedule's tables on the training device, gathered per sample by timestep.
pub struct DeviceSchedule {
    sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor,
}

impl DeviceSchedule {
    pub fn new(schedule: &NoiseSchedule, device: Device) -> Self {
        let sqrt_ab: Vec<f64> = schedule.alphas_cumprod.iter().map(|a| a.sqrt()).collect();
        let sqrt_1m_ab: Vec<f64> = schedule
            .alphas_cumprod
            .iter()
            .map(|a| (1.0 - a).sqrt())
            .collect();
        DeviceSchedule {
            sqrt_alphas_cumprod: NoiseSchedule::to_device(&sqrt_ab, device),
            sqrt_one_minus_alphas_cumprod: NoiseSchedule::to_device(&sqrt_1m_ab, device),
        }
    }

    /// √ᾱ_t and √(1 − ᾱ_t) for each sample's t, shaped [B, 1, 1, 1] to broadcast over images.
    pub fn coefficients(&self, t: &Tensor) -> (Tensor, Tensor) {
        let shape = [-1, 1, 1, 1];
        (
            self.sqrt_alphas_cumprod.index_select(0, t).view(shape),
            self.sqrt_one_minus_alphas_cumprod
                .index_select(0, t)
                .view(shape),
        )
    }

    /// x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε
    pub fn q_sample(&self, x0: &Tensor, t: &Tensor, noise: &Tensor) -> Tensor {
        let (a, b) = self.coefficients(t);
        a * x0 + b * noise
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RunConfig;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1e-300)
    }

    /// ᾱ_t of the linear schedule as a closed-form product, independently of the table code.
    fn linear_alphabar(t: usize) -> f64 {
        (0..=t)
            .map(|i| 1.0 - (1e-4 + (0.02 - 1e-4) * i as f64 / 999.0))
            .product()
    }

    #[test]
    fn linear_schedule_matches_closed_form() {
        let s = NoiseSchedule::from_betas(linear_betas(1000, 1e-4, 0.02));
        assert_eq!(s.betas[0], 1e-4);
        assert!(close(s.betas[999], 0.02, 1e-15));
        for t in [0, 499, 999] {
            assert!(
                close(s.alphas_cumprod[t], linear_alphabar(t), 1e-12),
                "t={t}"
            );
        }
        // Published values for this schedule (e.g. the DDPM reference code): ᾱ_999 ≈ 4.036e-5.
        assert!(
            close(s.alphas_cumprod[999], 4.0358e-5, 1e-3),
            "{}",
            s.alphas_cumprod[999]
        );
        assert!(close(s.alphas_cumprod[0], 0.9999, 1e-15));
    }

    #[test]
    fn cosine_alphabar_follows_the_formula() {
        let (t, s) = (1000, 0.008);
        let sched = NoiseSchedule::from_betas(cosine_betas(t, s));
        let f = |i: f64| {
            (((i / t as f64) + s) / (1.0 + s) * std::f64::consts::PI / 2.0)
                .cos()
                .powi(2)
        };
        // Without clipping, ᾱ_t = f(t+1)/f(0) exactly; clipping only bites at the very end.
        for i in [0usize, 100, 500, 900] {
            assert!(
                close(sched.alphas_cumprod[i], f(i as f64 + 1.0) / f(0.0), 1e-10),
                "t={i}"
            );
        }
        assert!(sched.betas.iter().all(|&b| b > 0.0 && b <= 0.999));
        assert_eq!(sched.betas[t - 1], 0.999);
    }

    #[test]
    fn sigmoid_betas_are_monotone_and_bounded() {
        let b = sigmoid_betas(1000, 1e-4, 0.02);
        assert!(b.windows(2).all(|w| w[1] > w[0]));
        let mid = 1e-4 + (0.02 - 1e-4) / (1.0 + (6.0f64 / 999.0).exp());
        assert!(close(b[499], mid, 1e-12));
        assert!(b[0] > 1e-4 && b[999] < 0.02);
    }

    #[test]
    fn posterior_matches_bayes_rule() {
        let s = NoiseSchedule::from_betas(linear_betas(100, 1e-4, 0.02));
        for t in [1usize, 50, 99] {
            // Product of the Gaussians q(x_t|x_{t−1}) and q(x_{t−1}|x_0): precision adds up.
            let (ab_prev, beta) = (s.alphas_cumprod_prev[t], s.betas[t]);
            let precision = (1.0 - beta) / beta + 1.0 / (1.0 - ab_prev);
            assert!(close(s.posterior_variance[t], 1.0 / precision, 1e-12));
            let coef_xt = (1.0 - beta).sqrt() / beta / precision;
            let coef_x0 = ab_prev.sqrt() / (1.0 - ab_prev) / precision;
            assert!(close(s.posterior_mean_coef_xt[t], coef_xt, 1e-10));
            assert!(close(s.posterior_mean_coef_x0[t], coef_x0, 1e-10));
        }
        assert_eq!(s.posterior_variance[0], 0.0);
        assert!(close(
            s.snr(10),
            s.alphas_cumprod[10] / (1.0 - s.alphas_cumprod[10]),
            1e-15
        ));
    }

    #[test]
    fn q_sample_has_the_right_moments() {
        tch::manual_seed(0);
        let config = RunConfig::preset("tiny").unwrap();
        let sched = NoiseSchedule::from_config(&config.diffusion);
        let dev = DeviceSchedule::new(&sched, Device::Cpu);
        let n = 200_000;
        let x0 = Tensor::full([n, 1, 1, 1], 0.5, (Kind::Float, Device::Cpu));
        let t = Tensor::full([n], 300, (Kind::Int64, Device::Cpu));
        let xt = dev.q_sample(
            &x0,
            &t,
            &Tensor::randn([n, 1, 1, 1], (Kind::Float, Device::Cpu)),
        );
        let ab = sched.alphas_cumprod[300];
        let mean = xt.mean(Kind::Double).double_value(&[]);
        let var = xt.var(true).double_value(&[]);
        assert!((mean - 0.5 * ab.sqrt()).abs() < 0.01, "mean {mean}");
        assert!((var - (1.0 - ab)).abs() < 0.01, "var {var}");
    }
}

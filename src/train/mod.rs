//! Training: one optimizer step ([`Trainer`]: forward/backward under the chosen precision,
//! gradient accumulation and clipping, fused AdamW, EMA) and the run around it ([`run`]: the
//! loop on one page, its periodic jobs in `jobs`, and what happens when things go wrong in
//! `policy`), with every random stream derived from (seed, step) so that resuming is exact.
mod jobs;
mod optimizer;
mod policy;
mod precision;
mod run;
mod step;

pub(crate) use optimizer::copy_from;
pub use policy::RunSummary;
pub use run::{run, RunOptions};
pub use step::{check_levers, load_for_sampling, sample_checkpoint, StepOutput, Trainer};

use crate::config::{LrSchedule, TrainConfig};

/// Learning rate of optimizer step `step` (0-based), by n = step + 1, the steps done with it:
/// linear warm-up lr·n/warmup up to n = warmup, then constant, or cosine-annealed from lr to
/// `min_lr`, which the run's last step (n = steps) reaches.
pub fn learning_rate(config: &TrainConfig, step: u64) -> f64 {
    let n = step + 1;
    if n <= config.warmup_steps {
        return config.lr * n as f64 / config.warmup_steps as f64;
    }
    match config.lr_schedule {
        LrSchedule::Constant => config.lr,
        LrSchedule::Cosine => {
            let span = config.steps.saturating_sub(config.warmup_steps).max(1) as f64;
            let progress = ((n - config.warmup_steps) as f64 / span).min(1.0);
            config.min_lr
                + (config.lr - config.min_lr)
                    * 0.5
                    * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

/// EMA decay for the update after `updates` earlier ones: min(decay, (1 + n)/(10 + n)) with
/// warm-up, else the constant decay.
pub fn ema_decay(config: &TrainConfig, updates: u64) -> f64 {
    if config.ema_warmup {
        config
            .ema_decay
            .min((1.0 + updates as f64) / (10.0 + updates as f64))
    } else {
        config.ema_decay
    }
}

/// A tiny network on 8×8 images for fast tests, on the CPU.
#[cfg(test)]
fn tiny(channels: i64) -> crate::config::RunConfig {
    let mut c = crate::config::RunConfig::preset("tiny").unwrap();
    c.model.channels = channels;
    c.model.image_size = crate::config::ImageSize::Square(8);
    c.model.channel_mult = vec![1, 2];
    c.train.device = "cpu".into();
    c
}

/// Tensors flattened into one vector, for comparisons in tests.
#[cfg(test)]
fn flat(tensors: &[tch::Tensor]) -> tch::Tensor {
    tch::Tensor::cat(
        &tensors.iter().map(|t| t.flatten(0, -1)).collect::<Vec<_>>(),
        0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RunConfig;

    #[test]
    fn learning_rate_follows_warmup_and_cosine() {
        let mut t = RunConfig::preset("tiny").unwrap().train;
        t.lr = 2e-4;
        t.warmup_steps = 100;
        t.steps = 1100;
        t.min_lr = 1e-5;
        let close = |a: f64, b: f64| (a - b).abs() < 1e-15;
        assert!(close(learning_rate(&t, 0), 2e-6));
        assert!(close(learning_rate(&t, 49), 1e-4));
        // The peak at the last warm-up step, then down from it.
        assert!(close(learning_rate(&t, 99), 2e-4));
        let first = 1e-5 + (2e-4 - 1e-5) * 0.5 * (1.0 + (std::f64::consts::PI / 1000.0).cos());
        assert!(close(learning_rate(&t, 100), first));
        // Halfway through the cosine part: the midpoint of lr and min_lr.
        assert!(close(learning_rate(&t, 599), (2e-4 + 1e-5) / 2.0));
        // The last step (1100 of 1100) trains at min_lr.
        assert!(close(learning_rate(&t, 1099), 1e-5));
        let q = 1e-5 + (2e-4 - 1e-5) * 0.5 * (1.0 + (std::f64::consts::PI * 0.25).cos());
        assert!(close(learning_rate(&t, 349), q));
        t.lr_schedule = LrSchedule::Constant;
        assert!(close(learning_rate(&t, 1000), 2e-4));
    }

    #[test]
    fn ema_decay_warms_up() {
        let mut t = RunConfig::preset("tiny").unwrap().train;
        t.ema_decay = 0.9999;
        assert_eq!(ema_decay(&t, 0), 0.1);
        assert_eq!(ema_decay(&t, 90), 91.0 / 100.0);
        assert_eq!(ema_decay(&t, 10_000_000), 0.9999);
        t.ema_warmup = false;
        assert_eq!(ema_decay(&t, 0), 0.9999);
    }
}

//! Samplers: DDPM ancestral sampling over all T steps and DDIM over any subsequence, both
//! deterministic for a given seed.
use std::sync::atomic::AtomicBool;

use tch::{Device, Kind, Tensor};

use crate::config::{DdpmVariance, Prediction, SampleConfig, SamplerKind};
use crate::model::UNet;
use crate::objective::to_eps_and_x0;
use crate::schedule::NoiseSchedule;
use crate::{check_stop, Interrupted};

/// A trained network with what sampling needs to interpret its output.
pub struct Denoiser<'a> {
    pub model: &'a UNet,
    pub schedule: &'a NoiseSchedule,
    pub prediction: Prediction,
}

/// A network loaded for sampling (from a checkpoint): it owns what a [`Denoiser`] borrows.
pub struct SamplingNetwork {
    pub vs: tch::nn::VarStore,
    pub model: UNet,
    pub schedule: NoiseSchedule,
    pub prediction: Prediction,
    /// The names of the classes a class-conditional model was trained on, by id.
    pub class_names: Vec<String>,
}

impl SamplingNetwork {
    pub fn denoiser(&self) -> Denoiser<'_> {
        Denoiser {
            model: &self.model,
            schedule: &self.schedule,
            prediction: self.prediction,
        }
    }
}

impl Denoiser<'_> {
    /// The network's output at x, timesteps ts and `classes`, guided with scale `guidance`:
    /// out(∅) + s·(out(class) − out(∅)), the conditional and unconditional passes batched into
    /// one forward. Every prediction target's ε̂ is an affine function of the output with x and
    /// t fixed, and the weights (1 − s, s) sum to 1, so guiding the output is guiding ε̂.
    fn guided_output(
        &self,
        x: &Tensor,
        ts: &Tensor,
        classes: Option<&Tensor>,
        guidance: f64,
    ) -> Tensor {
        let Some(classes) = classes else {
            return self.model.forward(x, ts, None, false);
        };
        let no_class = classes.full_like(self.model.null_class());
        match guidance {
            1.0 => self.model.forward(x, ts, Some(classes), false),
            0.0 => self.model.forward(x, ts, Some(&no_class), false),
            s => {
                let both = self.model.forward(
                    &Tensor::cat(&[x, x], 0),
                    &Tensor::cat(&[ts, ts], 0),
                    Some(&Tensor::cat(&[classes, &no_class], 0)),
                    false,
                );
                let [conditional, unconditional] =
                    [0, 1].map(|i| both.chunk(2, 0)[i].shallow_clone());
                &unconditional + (conditional - &unconditional) * s
            }
        }
    }

    /// (ε̂, x̂₀) at timestep t, x̂₀ clipped to [−1, 1] and ε̂ the noise that x_t implies with that
    /// x̂₀, so that a DDIM step at η = 1 is DDPM's posterior step also where clipping acts.
    fn predict(
        &self,
        x: &Tensor,
        t: usize,
        classes: Option<&Tensor>,
        guidance: f64,
    ) -> (Tensor, Tensor) {
        let ab = self.schedule.alphas_cumprod[t];
        let ts = Tensor::full([x.size()[0]], t as i64, (Kind::Int64, x.device()));
        let out = self.guided_output(x, &ts, classes, guidance);
        let (eps, x0) = to_eps_and_x0(self.prediction, &out, x, ab.sqrt(), (1.0 - ab).sqrt());
        let clipped = x0.clamp(-1.0, 1.0);
        // (x_t − √ᾱ x̂₀_clipped)/√(1−ᾱ), written as a correction that is exactly 0 where
        // nothing was clipped (dividing again would add rounding error at small t).
        let eps = eps + (&x0 - &clipped) * (ab.sqrt() / (1.0 - ab).sqrt());
        (eps, clipped)
    }
}

/// The timesteps DDIM visits, descending: `steps` evenly spaced values ending at 0.
pub fn ddim_timesteps(timesteps: usize, steps: usize) -> Vec<usize> {
    let mut ts: Vec<usize> = (0..steps).map(|i| i * timesteps / steps).collect();
    ts.dedup();
    ts.reverse();
    ts
}

/// One DDIM update from x_t to x_{t_prev} (t_prev = None: to x₀), η scaling the noise.
/// σ = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev); x_prev = √ᾱ_prev x̂₀ + √(1−ᾱ_prev−σ²) ε̂ + σ z.
pub fn ddim_step(
    schedule: &NoiseSchedule,
    eps: &Tensor,
    x0: &Tensor,
    t: usize,
    t_prev: Option<usize>,
    eta: f64,
) -> (Tensor, f64) {
    let ab = schedule.alphas_cumprod[t];
    let ab_prev = t_prev.map_or(1.0, |p| schedule.alphas_cumprod[p]);
    let sigma = eta * ((1.0 - ab_prev) / (1.0 - ab)).sqrt() * (1.0 - ab / ab_prev).sqrt();
    let dir = (1.0 - ab_prev - sigma * sigma).max(0.0).sqrt();
    (ab_prev.sqrt() * x0 + dir * eps, sigma)
}

/// The denoising steps `settings` take with a `timesteps`-step schedule.
pub fn step_count(settings: &SampleConfig, timesteps: usize) -> usize {
    match settings.sampler {
        SamplerKind::Ddim => settings.steps,
        SamplerKind::Ddpm => timesteps,
    }
}

/// How many of `total` images sampling has done after `steps_done` of the `steps` steps of
/// batch `batch_index` (batches of `batch`), counting a batch's steps as fractions of its images.
pub fn images_done(
    batch_index: usize,
    steps_done: usize,
    batch: usize,
    steps: usize,
    total: usize,
) -> usize {
    (batch_index * batch + batch * steps_done / steps.max(1)).min(total)
}

/// Images whose noise is drawn together: a fixed number, so that an image's noise does not
/// depend on the batch it is sampled in.
const NOISE_BLOCK: usize = 16;

/// Standard normal noise [images.len(), C, H, W] for draw `draw` (0: x_T, then one per step) of
/// the images `images` of a sampling run: image i's noise depends on the seed, i and the draw
/// alone, so that `--batch` (a matter of memory and speed) leaves the images as they are.
fn image_noise(
    seed: u64,
    draw: usize,
    images: std::ops::Range<usize>,
    [c, h, w]: [i64; 3],
    device: Device,
) -> Tensor {
    let blocks = images.start / NOISE_BLOCK..images.end.div_ceil(NOISE_BLOCK);
    let offset = images.start - blocks.start * NOISE_BLOCK;
    let drawn: Vec<Tensor> = blocks
        .map(|block| {
            tch::manual_seed(crate::rng::mix(seed, &[block as u64, draw as u64]) as i64);
            Tensor::randn([NOISE_BLOCK as i64, c, h, w], (Kind::Float, device))
        })
        .collect();
    Tensor::cat(&drawn, 0).narrow(0, offset as i64, images.len() as i64)
}

/// The class of each of `n` images asked for `classes` (class ids) in equal shares, each class's
/// images together: image i asks for `classes[i·m/n]` of the m classes.
pub fn class_mix(classes: &[i64], n: usize) -> Tensor {
    let m = classes.len().max(1);
    let ids: Vec<i64> = (0..n).map(|i| classes[i * m / n.max(1)]).collect();
    Tensor::from_slice(&ids)
}

/// Every one of `num_classes` classes in equal shares over n images (None: unconditional).
pub fn every_class(num_classes: usize, n: usize) -> Option<Tensor> {
    let ids: Vec<i64> = (0..num_classes as i64).collect();
    (num_classes > 0).then(|| class_mix(&ids, n))
}

/// The classes shown by a grid of about `images` images of a model of `num_classes`: a row per
/// class (the first 16), as many images in each as fit.
pub fn grid_classes(num_classes: usize, images: usize) -> Tensor {
    const ROWS: usize = 16;
    let rows = num_classes.min(ROWS);
    let per_row = (images / rows.max(1)).max(1);
    let ids: Vec<i64> = (0..rows as i64).collect();
    class_mix(&ids, rows * per_row)
}

/// Generates images [n, C, H, W] in [−1, 1], image i of class `classes[i]` (class-conditional
/// models; `settings.guidance` guides them). `on_step(batch, steps_done, x)` sees each batch's
/// x_T, then x after each denoising step (for trajectories and progress); the result is the
/// same for the same seed and settings, whatever the batch. Once `stop` is set, sampling ends
/// at the next step with [`Interrupted`].
#[allow(clippy::too_many_arguments)]
pub fn sample(
    denoiser: &Denoiser,
    settings: &SampleConfig,
    shape: [i64; 4],
    classes: Option<&Tensor>,
    seed: u64,
    device: Device,
    batch: usize,
    stop: Option<&AtomicBool>,
    mut on_step: impl FnMut(usize, usize, &Tensor),
) -> Result<Tensor, Interrupted> {
    let _guard = tch::no_grad_guard();
    let [n, c, h, w] = shape;
    let mut outputs = Vec::new();
    let mut done = 0;
    for chunk in 0.. {
        if done >= n {
            break;
        }
        let b = (n - done).min(batch as i64);
        let noise = |draw: usize| {
            image_noise(
                seed,
                draw,
                done as usize..(done + b) as usize,
                [c, h, w],
                device,
            )
        };
        let chunk_classes = classes.map(|c| c.narrow(0, done, b).to_device(device));
        let classes = chunk_classes.as_ref();
        let guidance = settings.guidance;
        let mut x = noise(0);
        let mut steps_done = 0;
        let mut report = |x: &Tensor| {
            on_step(chunk, steps_done, x);
            steps_done += 1;
            check_stop(stop)
        };
        report(&x)?;
        match settings.sampler {
            SamplerKind::Ddpm => {
                let s = denoiser.schedule;
                for (i, t) in (0..s.timesteps()).rev().enumerate() {
                    let (_, x0) = denoiser.predict(&x, t, classes, guidance);
                    let mean = s.posterior_mean_coef_x0[t] * &x0 + s.posterior_mean_coef_xt[t] * &x;
                    x = if t > 0 {
                        let var = match settings.ddpm_variance {
                            DdpmVariance::Beta => s.betas[t],
                            DdpmVariance::Posterior => s.posterior_variance[t],
                        };
                        mean + var.sqrt() * noise(i + 1)
                    } else {
                        mean
                    };
                    report(&x)?;
                }
            }
            SamplerKind::Ddim => {
                let ts = ddim_timesteps(denoiser.schedule.timesteps(), settings.steps);
                for (i, &t) in ts.iter().enumerate() {
                    let (eps, x0) = denoiser.predict(&x, t, classes, guidance);
                    let (next, sigma) = ddim_step(
                        denoiser.schedule,
                        &eps,
                        &x0,
                        t,
                        ts.get(i + 1).copied(),
                        settings.eta,
                    );
                    x = if sigma > 0.0 {
                        next + sigma * noise(i + 1)
                    } else {
                        next
                    };
                    report(&x)?;
                }
            }
        }
        outputs.push(x.clamp(-1.0, 1.0));
        done += b;
    }
    Ok(Tensor::cat(&outputs, 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RunConfig;
    use crate::schedule::linear_betas;
    use tch::nn;

    #[test]
    fn images_done_counts_steps_as_shares_of_their_batch() {
        // 300 images in batches of 64 (the last one 44), 10 steps each.
        assert_eq!(images_done(0, 0, 64, 10, 300), 0);
        assert_eq!(images_done(0, 5, 64, 10, 300), 32);
        assert_eq!(images_done(1, 10, 64, 10, 300), 128);
        assert_eq!(images_done(4, 10, 64, 10, 300), 300);
    }

    #[test]
    fn ddim_timesteps_are_evenly_spaced_and_end_at_zero() {
        assert_eq!(ddim_timesteps(1000, 4), vec![750, 500, 250, 0]);
        assert_eq!(ddim_timesteps(10, 10), (0..10).rev().collect::<Vec<_>>());
    }

    #[test]
    fn ddim_step_matches_the_paper_in_f64() {
        let s = NoiseSchedule::from_betas(linear_betas(1000, 1e-4, 0.02));
        let eps = Tensor::from_slice(&[0.3f64]);
        let x0 = Tensor::from_slice(&[-0.2f64]);
        let (t, p, eta) = (600usize, 400usize, 0.5);
        let (ab, abp) = (s.alphas_cumprod[t], s.alphas_cumprod[p]);
        let sigma = eta * ((1.0 - abp) / (1.0 - ab) * (1.0 - ab / abp)).sqrt();
        let expected = abp.sqrt() * -0.2 + (1.0 - abp - sigma * sigma).sqrt() * 0.3;
        let (x, got_sigma) = ddim_step(&s, &eps, &x0, t, Some(p), eta);
        assert!((x.double_value(&[0]) - expected).abs() < 1e-12);
        assert!((got_sigma - sigma).abs() < 1e-15);
        // η = 1 gives DDPM's posterior standard deviation between the two steps.
        let (_, s1) = ddim_step(&s, &eps, &x0, t, Some(t - 1), 1.0);
        assert!((s1 * s1 - s.posterior_variance[t]).abs() < 1e-12);
        // The last step lands on x̂₀.
        let (last, _) = ddim_step(&s, &eps, &x0, 5, None, 0.0);
        assert!((last.double_value(&[0]) + 0.2).abs() < 1e-15);
    }

    fn tiny_config() -> RunConfig {
        let mut config = RunConfig::preset("tiny").unwrap();
        config.model.channels = 16;
        config.diffusion.timesteps = 20;
        config
    }

    /// A new network of the tiny configuration, for sampling.
    fn tiny_network(config: &RunConfig) -> SamplingNetwork {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = UNet::new(&vs.root(), &config.model);
        SamplingNetwork {
            vs,
            model,
            schedule: NoiseSchedule::from_config(&config.diffusion),
            prediction: config.diffusion.prediction,
            class_names: Vec::new(),
        }
    }

    #[test]
    fn classes_are_mixed_in_equal_shares_and_grids_show_a_row_each() {
        let ids = |t: Tensor| Vec::<i64>::try_from(t).unwrap();
        assert_eq!(ids(class_mix(&[4, 7], 5)), [4, 4, 4, 7, 7]);
        assert_eq!(ids(class_mix(&[0, 1, 2], 6)), [0, 0, 1, 1, 2, 2]);
        // 10 classes in a 64-image grid: 10 rows of 6; 100 classes: the first 16, 4 each.
        let ten = ids(grid_classes(10, 64));
        assert_eq!(ten.len(), 60);
        assert!((0..10).all(|c| ten[c * 6..(c + 1) * 6].iter().all(|&x| x == c as i64)));
        let hundred = ids(grid_classes(100, 64));
        assert_eq!((hundred.len(), hundred[63]), (64, 15));
        // More rows than images: one image per row.
        assert_eq!(ids(grid_classes(16, 8)), (0..16).collect::<Vec<i64>>());
    }

    #[test]
    fn guidance_extrapolates_from_the_unconditional_to_the_conditional_noise() {
        let _rng = crate::rng::exclusive();
        let _guard = tch::no_grad_guard();
        for prediction in [Prediction::Epsilon, Prediction::V, Prediction::X0] {
            let mut config = tiny_config();
            // 32 GroupNorm groups of 2 channels: with 1 a group's norm removes the embedding.
            config.model.channels = 64;
            config.model.num_classes = crate::config::ClassCount::Count(3);
            config.diffusion.prediction = prediction;
            tch::manual_seed(3);
            let network = tiny_network(&config);
            // A new network outputs zeros (its last conv starts at zero): give it weights.
            for (_, mut v) in network.vs.variables() {
                v.copy_(&(v.randn_like() * 0.2));
            }
            let d = network.denoiser();
            let x = Tensor::randn([2, 1, 16, 16], (Kind::Float, Device::Cpu));
            let t = 12;
            let ab = d.schedule.alphas_cumprod[t];
            let ts = Tensor::full([2], t as i64, (Kind::Int64, Device::Cpu));
            let classes = Tensor::from_slice(&[0i64, 2]);
            let eps_of = |out: &Tensor| {
                to_eps_and_x0(prediction, out, &x, ab.sqrt(), (1.0 - ab).sqrt())
                    .0
                    .to_kind(Kind::Double)
            };
            // By hand: two separate forward passes, combined in ε space in f64.
            let eps_c = eps_of(&network.model.forward(&x, &ts, Some(&classes), false));
            let eps_u = eps_of(
                &network
                    .model
                    .forward(&x, &ts, Some(&classes.full_like(3)), false),
            );
            let expected = &eps_u + (&eps_c - &eps_u) * 3.0;
            let guided = eps_of(&d.guided_output(&x, &ts, Some(&classes), 3.0));
            let error = (&guided - &expected).abs().max().double_value(&[]);
            let scale = expected.abs().max().double_value(&[]);
            assert!(error < 1e-5 * scale, "{prediction:?}: {error} of {scale}");
            assert!((&eps_c - &eps_u).abs().max().double_value(&[]) > 1e-3 * scale);
            // s = 1: the conditional prediction; s = 0: the unconditional one.
            assert!(eps_of(&d.guided_output(&x, &ts, Some(&classes), 1.0))
                .allclose(&eps_c, 1e-6, 1e-6, false));
            assert!(eps_of(&d.guided_output(&x, &ts, Some(&classes), 0.0))
                .allclose(&eps_u, 1e-6, 1e-6, false));
        }
    }

    #[test]
    fn sampling_is_deterministic_for_a_seed() {
        let _rng = crate::rng::exclusive();
        let config = tiny_config();
        let network = tiny_network(&config);
        let d = network.denoiser();
        for (sampler, eta) in [
            (SamplerKind::Ddim, 0.0),
            (SamplerKind::Ddim, 1.0),
            (SamplerKind::Ddpm, 0.0),
        ] {
            let settings = SampleConfig {
                sampler,
                eta,
                steps: 5,
                ..config.sample.clone()
            };
            let run = |seed, n, batch| {
                sample(
                    &d,
                    &settings,
                    [n, 1, 28, 28],
                    None,
                    seed,
                    Device::Cpu,
                    batch,
                    None,
                    |_, _, _| {},
                )
                .unwrap()
            };
            let with_seed = |seed| run(seed, 3, 2);
            let (a, b, c) = (with_seed(7), with_seed(7), with_seed(8));
            assert_eq!(a.size(), vec![3, 1, 28, 28]);
            assert!(a.equal(&b), "{sampler:?} eta={eta} not deterministic");
            assert!(
                !a.equal(&c),
                "{sampler:?}: different seeds gave the same images"
            );
            // An image is the same whatever the batch it is sampled in, and whatever follows
            // it (up to the rounding of batched convolutions); 20 images cross a noise block.
            let whole = run(7, 20, 20);
            for (n, batch) in [(3, 1), (3, 3), (20, 7)] {
                let gap = (run(7, n, batch) - whole.narrow(0, 0, n))
                    .abs()
                    .max()
                    .double_value(&[]);
                assert!(
                    gap < 1e-4,
                    "{sampler:?} eta={eta}, {n} in batches of {batch}: {gap}"
                );
            }
            assert!(a.max().double_value(&[]) <= 1.0 && a.min().double_value(&[]) >= -1.0);
        }
    }

    #[test]
    fn ddim_at_eta_one_over_all_steps_is_ddpm_with_the_posterior_variance() {
        let _rng = crate::rng::exclusive();
        let config = tiny_config();
        let SamplingNetwork { vs, model, .. } = tiny_network(&config);
        // Random weights (a new network's output layer is zero): x̂₀ falls outside [−1, 1]
        // and is clipped at many steps, for every prediction.
        tch::no_grad(|| {
            for (_, mut t) in vs.variables() {
                t.copy_(&(t.randn_like() * 0.3));
            }
        });
        let schedule = NoiseSchedule::from_config(&config.diffusion);
        for prediction in [Prediction::Epsilon, Prediction::X0, Prediction::V] {
            let d = Denoiser {
                model: &model,
                schedule: &schedule,
                prediction,
            };
            let run = |sampler, steps| {
                let settings = SampleConfig {
                    sampler,
                    steps,
                    eta: 1.0,
                    ddpm_variance: DdpmVariance::Posterior,
                    ..config.sample.clone()
                };
                sample(
                    &d,
                    &settings,
                    [4, 1, 28, 28],
                    None,
                    3,
                    Device::Cpu,
                    4,
                    None,
                    |_, _, _| {},
                )
                .unwrap()
            };
            let ddpm = run(SamplerKind::Ddpm, 0);
            let ddim = run(SamplerKind::Ddim, schedule.timesteps());
            let gap = (ddpm - ddim).abs().max().double_value(&[]);
            assert!(gap < 1e-4, "{prediction:?}: {gap}");
        }
    }

    #[test]
    fn trajectory_reports_x_t_then_every_step_and_a_stop_ends_it() {
        let config = tiny_config();
        let network = tiny_network(&config);
        let d = network.denoiser();
        let settings = SampleConfig {
            sampler: SamplerKind::Ddim,
            steps: 4,
            ..config.sample.clone()
        };
        let mut seen = Vec::new();
        let _ = sample(
            &d,
            &settings,
            [2, 1, 28, 28],
            None,
            0,
            Device::Cpu,
            1,
            None,
            |batch, i, _| seen.push((batch, i)),
        );
        // Each batch: x_T, then after each of the 4 steps.
        let each: Vec<(usize, usize)> = (0..2).flat_map(|b| (0..5).map(move |i| (b, i))).collect();
        assert_eq!(seen, each);

        // A stop asked for during step 2 ends sampling before step 3.
        let (stop, mut seen) = (AtomicBool::new(false), Vec::new());
        let stopped = sample(
            &d,
            &settings,
            [1, 1, 28, 28],
            None,
            0,
            Device::Cpu,
            1,
            Some(&stop),
            |_, i, _| {
                seen.push(i);
                if i == 2 {
                    stop.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            },
        );
        assert!(stopped.is_err());
        assert_eq!(seen, [0, 1, 2]);
    }
}

//! The periodic jobs of the loop, each a small function: checkpoint, post-hoc EMA snapshot,
//! sample grid, FID.
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, Result};
use tch::Device;

use super::policy::{Signals, Stop};
use super::step::Trainer;
use crate::config::RunConfig;
use crate::data::{self, Dataset, Position};
use crate::monitor::Monitor;
use crate::run_dir::RunDir;

/// The jobs and what they need prepared before the first step.
pub struct Jobs {
    grid_seed: u64,
    fid_seed: u64,
    fid: Option<TrainingFid>,
}

impl Jobs {
    /// At step 0, writes what the model learns from next to what it makes; prepares FID (the
    /// Inception network and the real statistics), so that a missing network fails at once.
    pub fn prepare(
        trainer: &Trainer,
        run: &RunDir,
        dataset: &Dataset,
        position: Position,
        signals: &Signals,
    ) -> Result<Self, Stop> {
        let config = &trainer.config;
        let seed = config.train.seed;
        if trainer.step == 0 && run.writes() {
            run.write_data_grid(&data_grid(config, dataset, position, run.class_names())?)?;
        }
        let fid = match run.writes() {
            true => TrainingFid::prepare(config, dataset, trainer.device, signals.abandon())?,
            false => None,
        };
        Ok(Jobs {
            grid_seed: crate::rng::mix(seed, &[0x6121D]),
            fid_seed: crate::rng::mix(seed, &[0xF1D]),
            fid,
        })
    }

    /// Runs the jobs due after the step just done (checkpoints, snapshots and grids before `stop`, whose
    /// own are the run's end; FID at every multiple of `fid.every`). The checkpoint first: a grid or FID may fail (out of device memory, a
    /// full disk), and the run then stops with its state saved. Returns whether any ran (their
    /// time is not the step's).
    pub fn run_due(
        &self,
        trainer: &Trainer,
        run: &mut RunDir,
        monitor: &mut Monitor,
        position: Position,
        stop: u64,
        signals: &Signals,
    ) -> Result<bool, Stop> {
        let config = &trainer.config;
        let step = trainer.step;
        let due = |every: u64| every > 0 && step.is_multiple_of(every);
        let before_stop = |every: u64| due(every) && step < stop;
        let mut ran = false;
        if before_stop(config.checkpoint.every) {
            periodic_checkpoint(trainer, run, position)?;
            ran = true;
        }
        if before_stop(config.ema.snapshot_every) {
            if let Some(snapshot) = trainer.ema_snapshot() {
                run.write_ema_snapshot(step, &snapshot)?;
                ran = true;
            }
        }
        signals.check()?;
        if before_stop(config.sample.every) {
            signals.outcome(self.grid(trainer, run, signals.abandon()))?;
            ran = true;
        }
        if let Some(fid) = self.fid.as_ref().filter(|_| due(config.fid.every)) {
            signals.outcome(fid.measure(trainer, self.fid_seed, run, monitor, signals))?;
            ran = true;
        }
        Ok(ran)
    }

    /// The grid after the last step.
    pub fn final_grid(
        &self,
        trainer: &Trainer,
        run: &mut RunDir,
        signals: &Signals,
    ) -> Result<Option<PathBuf>, Stop> {
        if !run.writes() {
            return Ok(None);
        }
        signals.check()?;
        signals
            .outcome(self.grid(trainer, run, signals.abandon()))
            .map(Some)
    }

    /// Samples the run's fixed noise with the EMA and the raw weights and writes them side by
    /// side; abandoned, writing nothing, once `stop` is set.
    fn grid(
        &self,
        trainer: &Trainer,
        run: &mut RunDir,
        stop: Option<&AtomicBool>,
    ) -> Result<PathBuf> {
        crate::catch_panics(|| {
            let started = Instant::now();
            let s = &trainer.config.sample;
            let steps = crate::sampler::step_count(s, trainer.config.diffusion.timesteps);
            tracing::info!(
                "sampling {} ({}, {steps} steps) with EMA and raw weights at step {}…",
                crate::monitor::images(s.num),
                s.sampler,
                trainer.step
            );
            let classes = (trainer.num_classes() > 0)
                .then(|| crate::sampler::grid_classes(trainer.num_classes(), s.num));
            let n = classes.as_ref().map_or(s.num, |c| c.size()[0] as usize);
            let grid = |ema: bool| -> Result<image::RgbImage> {
                let images = trainer.sample(ema, n, classes.as_ref(), self.grid_seed, stop)?;
                crate::monitor::sample_grid(&images, classes.as_ref(), run.class_names())
            };
            let (ema, raw) = (grid(true)?, grid(false)?);
            let pair = crate::monitor::labelled_pair(&ema, &raw, trainer.step)?;
            let path = run.write_grid(trainer.step, &pair)?;
            tracing::info!(
                "wrote {} in {:.1} s",
                path.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(path)
        })
    }
}

/// What the model learns from, augmented as in training: the first `sample.num` images of the
/// seeded order, or for a class-conditional model a row of each class's first ones, as the
/// sample grids show classes.
fn data_grid(
    config: &RunConfig,
    dataset: &Dataset,
    position: Position,
    names: &[String],
) -> Result<image::RgbImage> {
    let plan = dataset.order(config.train.batch, 1)?;
    let mut order = data::Sampler::new(plan, config.train.seed, position);
    let (indices, classes) = match dataset.labelling() {
        Ok(labelled) if !names.is_empty() => {
            let wanted = crate::sampler::grid_classes(names.len(), config.sample.num);
            let wanted = Vec::<i64>::try_from(&wanted)?;
            let mut rows: Vec<Vec<i64>> = vec![Vec::new(); names.len()];
            for i in order.next_indices(dataset.len()) {
                let class = labelled.labels[i as usize];
                let room = wanted.iter().filter(|&&w| w == class).count();
                if rows[class as usize].len() < room {
                    rows[class as usize].push(i);
                }
            }
            let indices: Vec<i64> = rows.concat();
            let classes: Vec<i64> = indices
                .iter()
                .map(|&i| labelled.labels[i as usize])
                .collect();
            (indices, Some(tch::Tensor::from_slice(&classes)))
        }
        _ => (
            order.next_indices(config.sample.num.min(dataset.len())),
            None,
        ),
    };
    let real = data::to_model_space(&dataset.batch(&indices)?, Device::Cpu);
    let real = data::augment(&real, config.data.hflip, config.data.color_jitter);
    crate::monitor::sample_grid(&real, classes.as_ref(), names)
}

/// A checkpoint every `checkpoint.every` steps. Weights that overflowed are not saved: the
/// non-finite steps that follow lead to a rollback to an earlier checkpoint.
fn periodic_checkpoint(trainer: &Trainer, run: &mut RunDir, position: Position) -> Result<()> {
    match trainer.weights_are_finite() {
        true => run
            .save_checkpoint(&trainer.state_tensors(), trainer.step, position)
            .map(drop),
        false => {
            tracing::warn!(
                "the weights are not finite at step {}: no checkpoint written",
                trainer.step
            );
            Ok(())
        }
    }
}

/// FID during training: the Inception network and the real data's statistics.
struct TrainingFid {
    inception: crate::eval::Inception,
    real: crate::eval::Statistics,
}

impl TrainingFid {
    fn prepare(
        config: &RunConfig,
        dataset: &Dataset,
        device: Device,
        stop: Option<&AtomicBool>,
    ) -> Result<Option<Self>> {
        use crate::eval;
        if config.fid.every == 0 {
            return Ok(None);
        }
        let flag = (!config.fid.inception.is_empty()).then(|| PathBuf::from(&config.fid.inception));
        let path = eval::locate_inception(
            flag.as_deref().map(|p| (p, "fid.inception")),
            std::env::var_os(eval::INCEPTION_ENV).map(PathBuf::from),
            &eval::default_inception_path()?,
        )
        .context("fid.every is set")?;
        let inception = eval::Inception::load(&path, device)?;
        let real = eval::cached_statistics(
            &inception,
            dataset,
            config.fid.batch,
            &eval::statistics_cache_dir()?,
            stop,
        )?;
        Ok(Some(TrainingFid { inception, real }))
    }

    /// FID of `fid.num` EMA samples against the real data, recorded in the metrics.
    fn measure(
        &self,
        trainer: &Trainer,
        seed: u64,
        run: &mut RunDir,
        monitor: &Monitor,
        signals: &Signals,
    ) -> Result<()> {
        crate::catch_panics(|| {
            let started = Instant::now();
            let fid = &trainer.config.fid;
            let classes = crate::sampler::every_class(trainer.num_classes(), fid.num);
            let samples =
                trainer.sample(true, fid.num, classes.as_ref(), seed, signals.abandon())?;
            let images = crate::data::from_model_space(&samples);
            let statistics =
                self.inception
                    .statistics(&images, fid.batch, "fake", signals.abandon())?;
            let score = crate::eval::frechet_distance(&self.real, &statistics)?;
            let seconds = started.elapsed().as_secs_f64();
            run.append_metrics(&serde_json::json!({ "step": trainer.step, "fid": score, "fid_images": fid.num, "fid_seconds": seconds, "wall_seconds": monitor.seconds() }))?;
            tracing::info!(
                "FID@{} = {score:.2} at step {} ({seconds:.0} s)",
                crate::monitor::count_label(fid.num),
                trainer.step
            );
            Ok(())
        })
    }
}

//! The run: data loading, the step loop, metrics, sample grids, checkpoints, FID during
//! training, interruption and rollbacks after persistent non-finite gradients.
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use tch::Device;

use super::step::Trainer;
use crate::checkpoint::{self, Checkpoint};
use crate::config::RunConfig;
use crate::data::{self, Dataset, LoadOptions, Loader, LoaderOptions, Position};
use crate::distributed::{Launch, ProcessGroup};
use crate::monitor::{MetricsRecord, Monitor};
use crate::ops;

/// How a run is started.
pub struct RunOptions {
    pub config: RunConfig,
    pub run_dir: PathBuf,
    pub resume: Option<Checkpoint>,
    pub strict_data: bool,
    /// Run length in epochs over the loaded data, replacing `train.steps`.
    pub epochs: Option<u64>,
    /// Stop (with a checkpoint) after this step, keeping the LR schedule of the full run.
    pub stop_at: Option<u64>,
    /// Set (e.g. by a signal handler) to end the run after the current step, with a checkpoint.
    pub interrupt: Option<Arc<AtomicBool>>,
    /// This process's place in a multi-process run (None: the only process).
    pub launch: Option<Launch>,
}

/// What a finished (or interrupted) run leaves behind.
pub struct RunSummary {
    /// None on ranks other than 0, which write nothing.
    pub final_checkpoint: Option<PathBuf>,
    /// None when interrupted: sampling would delay the exit.
    pub final_grid: Option<PathBuf>,
    /// The step it ended at, and the one this process started from.
    pub steps: u64,
    pub first_step: u64,
    /// The run's length (`train.steps`): more than `steps` when it stopped early.
    pub total_steps: u64,
    /// Time this process spent, from the start of training.
    pub seconds: f64,
    pub interrupted: bool,
}

/// What a run writes at the top of its directory.
const RUN_FILES: [&str; 6] = [
    "config.toml",
    "metrics.jsonl",
    "report.html",
    "loss.png",
    "samples",
    "checkpoints",
];

/// A new run never takes over a directory that holds checkpoints, nor overwrites files of the
/// same names that are not a run's, nor writes into its own data folder or a folder of images
/// or subfolders (a mistyped --out: its grids would mix with them). Other files (a job's log,
/// say) may share the folder.
fn check_run_dir(dir: &Path, resume: Option<&Checkpoint>, data: Option<&Path>) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("--out {} is a file, not a run directory", dir.display());
    }
    // A resume in the checkpoint's own run directory continues it; into another folder, that
    // folder is checked as a new run's (its checkpoints, if any, are that resume's own).
    let in_place = resume.is_some_and(|c| {
        c.path
            .parent()
            .is_some_and(|folder| checkpoint::same_place(folder, &dir.join("checkpoints")))
    });
    if in_place || !dir.is_dir() {
        return Ok(());
    }
    if resume.is_none() && !checkpoint::list(&dir.join("checkpoints"))?.is_empty() {
        bail!("run directory {} already holds checkpoints: continue it with --resume {}, or choose another --out", dir.display(), dir.display());
    }
    if data.is_some_and(|data| checkpoint::same_place(dir, data)) {
        bail!("--out {} is the data folder: the run's grids and plots would become training data; choose another --out", dir.display());
    }
    // Every run takes its directory's lock file first: without one, these files are not a run's.
    if !dir.join(checkpoint::LOCK_FILE).exists() {
        let taken: Vec<&str> = RUN_FILES
            .into_iter()
            .filter(|name| dir.join(name).exists())
            .collect();
        if !taken.is_empty() {
            bail!(
                "--out {} already holds {} that a run would overwrite, and is not a ddpm run directory: choose a new or empty folder",
                dir.display(),
                taken.join(", ")
            );
        }
        let mut others: Vec<String> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.is_dir() || data::is_image_file(path))
            .map(|path| {
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                match path.is_dir() {
                    true => format!("{name}/"),
                    false => name.into_owned(),
                }
            })
            .collect();
        if !others.is_empty() {
            others.sort();
            let shown = others.len().min(3);
            bail!(
                "--out {} holds images or folders ({}{}) and is not a ddpm run directory: choose a new or empty folder (other files, such as a job's log, may share it)",
                dir.display(),
                others[..shown].join(", "),
                if others.len() > shown { ", …" } else { "" }
            );
        }
    }
    Ok(())
}

/// Creates the run directory, takes it for this process (the returned lock, held while the
/// file stays open) and records the configuration, once the run is sure to start.
fn prepare_run_dir(dir: &Path, config: &RunConfig) -> Result<std::fs::File> {
    // The lock file first: it is what marks the folder as a run directory to a restart.
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create run directory {}", dir.display()))?;
    let lock = checkpoint::lock_run_dir(dir)?;
    std::fs::create_dir_all(dir.join("samples"))
        .with_context(|| format!("cannot create run directory {}", dir.display()))?;
    checkpoint::write_atomic(&dir.join("config.toml"), config.to_toml().as_bytes())?;
    Ok(lock)
}

/// Runs (or continues) training to `config.train.steps`, writing everything into the run dir.
/// With a multi-process `launch`, this process trains its share of every batch; rank 0 writes.
pub fn run(options: RunOptions) -> Result<RunSummary> {
    let RunOptions {
        mut config,
        run_dir,
        resume,
        strict_data,
        epochs,
        stop_at,
        interrupt,
        launch,
    } = options;
    config.validate()?;
    config.check_run_resources()?;
    let mut device = crate::device::resolve(&config.train.device)?;
    if let Some(launch) = &launch {
        check_divides(&config, launch.world)?;
        if device.is_cuda() {
            // One visible GPU per process (CUDA_VISIBLE_DEVICES, as SLURM sets) is cuda:0.
            let index = if tch::Cuda::device_count() == 1 {
                0
            } else {
                launch.local_rank
            };
            device = crate::device::resolve(&format!("cuda:{index}"))?;
        }
    }
    let leader = launch.as_ref().is_none_or(|l| l.rank == 0);
    if leader {
        check_run_dir(&run_dir, resume.as_ref(), config.data_path().as_deref())?;
    }
    let dataset = Arc::new(data::load(
        config.data_path().as_deref(),
        &LoadOptions::of(&config, strict_data),
    )?);
    if let Some(epochs) = epochs {
        let images = epochs
            .checked_mul(dataset.len() as u64)
            .filter(|&n| n <= i64::MAX as u64)
            .with_context(|| {
                format!(
                    "--epochs {epochs} of {} images is more images than a run can count",
                    dataset.len()
                )
            })?;
        config.train.steps = images.div_ceil(config.train.batch as u64).max(1);
        let resumed_steps = resume
            .as_ref()
            .filter(|_| leader)
            .map(|c| c.sidecar.config.train.steps);
        if let Some(before) = resumed_steps.filter(|&s| s != config.train.steps) {
            crate::say!(
                "changed on resume: train.steps: {before} → {} ({epochs} epoch{} of {} images)",
                config.train.steps,
                if epochs == 1 { "" } else { "s" },
                dataset.len()
            );
        }
    }
    let mut trainer = Trainer::new(&config, device)?;
    let mut position = Position::default();
    if let Some(checkpoint) = resume.as_ref().filter(|_| leader) {
        trainer.load_state(checkpoint)?;
        position = checkpoint.sidecar.position;
    }
    if let Some(launch) = &launch {
        trainer.join(ProcessGroup::join(launch, device)?)?;
        trainer.check_agreement(dataset.len())?;
        position = trainer.sync_from_leader(position)?;
    }
    let stop = stop_at.unwrap_or(u64::MAX).min(config.train.steps);
    if trainer.step >= stop {
        if leader {
            crate::say!("{} is at step {} and this run stops at step {stop}: nothing to train (raise --steps or --epochs, and --stop-at if given, to continue)", run_dir.display(), trainer.step);
        }
        return Ok(RunSummary {
            final_checkpoint: None,
            final_grid: None,
            steps: trainer.step,
            first_step: trainer.step,
            total_steps: config.train.steps,
            seconds: 0.0,
            interrupted: false,
        });
    }
    if leader {
        for note in setting_notes(&config, device, dataset.len(), stop_at) {
            crate::say!("note: {note}");
        }
    }
    let _lock = match leader {
        true => Some(prepare_run_dir(&run_dir, &config)?),
        false => None,
    };
    // Once the run directory is this process's: a resume refused for a live trainer says only
    // that.
    if let Some(checkpoint) = resume.as_ref().filter(|_| leader) {
        crate::say!(
            "resumed from {} at step {}",
            checkpoint.path.display(),
            checkpoint.sidecar.step
        );
        let then = checkpoint.sidecar.position.images;
        if let Some(then) = then.filter(|&then| then != dataset.len()) {
            crate::say!(
                "note: the data has {} images now and had {then} at step {}: the run goes on in another data order than it would have had",
                dataset.len(),
                checkpoint.sidecar.step
            );
        }
    }
    if leader {
        crate::say!(
            "training {} on {} ({} images{}) on {}{} ({}): {} parameters, {} step{} of batch {}",
            config.preset,
            dataset.description,
            dataset.len(),
            match (dataset.is_cached(), dataset.skipped()) {
                (false, _) => ", decoded as read".to_string(),
                (true, 0) => String::new(),
                (true, unreadable) => format!(", {unreadable} of them unreadable"),
            },
            crate::device::name(device),
            launch
                .as_ref()
                .map_or(String::new(), |l| format!(" × {} processes", l.world)),
            speed_settings(&config, &trainer),
            crate::model::parameter_count(&trainer.vs),
            config.train.steps,
            if config.train.steps == 1 { "" } else { "s" },
            config.train.batch
        );
    }
    run_loop(
        &mut trainer,
        dataset,
        position,
        &run_dir,
        stop,
        interrupt.unwrap_or_default(),
    )
}

/// The precision and the levers in use, e.g. "bf16, CUDA graph, fused GroupNorm+SiLU".
fn speed_settings(config: &RunConfig, trainer: &Trainer) -> String {
    let mut settings = vec![config.train.precision.name()];
    if trainer.uses_cuda_graph() {
        settings.push("CUDA graph".into());
    }
    if trainer.uses_fused_norm_silu() {
        settings.push("fused GroupNorm+SiLU".into());
    }
    if config.train.channels_last {
        settings.push("channels-last".into());
    }
    settings.join(", ")
}

/// Settings that work, but not as a user may think they do.
fn setting_notes(
    config: &RunConfig,
    device: Device,
    images: usize,
    stop_at: Option<u64>,
) -> Vec<String> {
    use crate::config::{DataFormat, LrSchedule, Precision};
    let tc = &config.train;
    let mut notes = Vec::new();
    if !device.is_cuda() {
        match tc.precision {
            Precision::Fp16 => notes.push("fp16 on a CPU runs many times slower than f32 (no fp16 arithmetic there); use f32".to_string()),
            Precision::Bf16 | Precision::Bf16Pure => notes.push(format!("{} on a CPU without bf16 arithmetic runs slower than f32 (about 30% on the development CPU)", tc.precision.name())),
            Precision::Tf32 => notes.push("tf32 changes CUDA matrix products only: on this device it trains as f32".to_string()),
            Precision::F32 => {}
        }
        if tc.channels_last {
            notes.push(
                "train.channels_last is for GPUs: on a CPU it makes the step slower".to_string(),
            );
        }
    }
    let bundled = config.data.path.is_empty()
        && matches!(config.data.format, DataFormat::Auto | DataFormat::Bundled);
    if bundled && config.model.in_channels == 3 {
        notes.push("a 3-channel model trains on the bundled digits, which are grayscale: give --data for your own images".to_string());
    }
    if images < tc.batch {
        notes.push(format!("the batch ({}) is larger than the dataset ({images} images): every batch repeats images", tc.batch));
    }
    if tc.warmup_steps > tc.steps {
        let steps = |n: u64| format!("{n} step{}", if n == 1 { "" } else { "s" });
        notes.push(format!("the warm-up ({}) is longer than the run ({}): the learning rate never reaches train.lr", steps(tc.warmup_steps), steps(tc.steps)));
    }
    if tc.lr_schedule == LrSchedule::Constant && tc.min_lr > 0.0 {
        notes.push(
            "train.min_lr applies to the cosine schedule only; this one is constant".to_string(),
        );
    }
    if let Some(stop_at) = stop_at.filter(|&s| s > tc.steps) {
        notes.push(format!(
            "--stop-at {stop_at} is beyond the run's {} steps: it ends at step {}",
            tc.steps, tc.steps
        ));
    }
    notes
}

/// The global batch must split evenly into ranks and each rank's share into micro-batches.
fn check_divides(config: &RunConfig, world: usize) -> Result<()> {
    let t = &config.train;
    if !t.batch.is_multiple_of(world * t.grad_accum) {
        bail!(
            "train.batch = {} is the global batch: it must be a multiple of the {world} processes × train.grad_accum = {} ({})",
            t.batch,
            t.grad_accum,
            world * t.grad_accum
        );
    }
    Ok(())
}

fn run_loop(
    trainer: &mut Trainer,
    dataset: Arc<Dataset>,
    position: Position,
    run_dir: &Path,
    stop: u64,
    interrupt: Arc<AtomicBool>,
) -> Result<RunSummary> {
    let config = trainer.config.clone();
    let tc = &config.train;
    let first_step = trainer.step;
    let leader = trainer.group().is_none_or(|g| g.is_leader());
    let loader_options = LoaderOptions {
        batch: tc.batch,
        seed: tc.seed,
        workers: data::worker_count(config.data.workers),
        prefetch: config.data.prefetch,
        shard: trainer.shard(),
    };
    let mut loader = Loader::new(dataset.clone(), position, loader_options);
    let mut monitor = if leader {
        Monitor::new(run_dir, trainer.step, stop)?
    } else {
        Monitor::silent()
    };
    let checkpoints = run_dir.join("checkpoints");
    // The step whose state is on disk already (or the untrained start).
    let on_disk = |step| checkpoint::sidecar_path(&checkpoints, step).is_file();
    let saved_step = Cell::new(Some(trainer.step).filter(|&step| leader && on_disk(step)));
    // Writes a checkpoint whose weights are known to be finite.
    let write_checkpoint = |trainer: &Trainer, position: Position| -> Result<Option<PathBuf>> {
        if !leader {
            return Ok(None);
        }
        let path = checkpoint::save(
            &checkpoints,
            &trainer.state_tensors(),
            trainer.step,
            position,
            &config,
        )?;
        saved_step.set(Some(trainer.step));
        Ok(Some(path))
    };
    // Gradients are checked at every step, but an update can still overflow: a checkpoint must
    // hold usable weights, as resumes and rollbacks trust it.
    let save = |trainer: &Trainer, position: Position| -> Result<Option<PathBuf>> {
        if !trainer.weights_are_finite() {
            bail!(
                "the weights are not finite at step {}: not saved as a checkpoint (lower --lr)",
                trainer.step
            );
        }
        write_checkpoint(trainer, position)
    };
    // A failure that leaves the weights as they were after the last step (unreadable data, a
    // lost rank, no device memory left, an unwritable grid or metrics file) still leaves a
    // checkpoint of them, when they are new; the error says where the run can resume from.
    let save_and_fail =
        |trainer: &Trainer, position: Position, e: anyhow::Error| -> anyhow::Error {
            let step = trainer.step;
            if !leader || step == 0 {
                return e;
            }
            // The cause first, then what became of the run.
            let stopped = |outcome: String| anyhow!("{}; {outcome}", crate::error_text(&e));
            if saved_step.get() == Some(step) {
                return stopped(format!(
                    "training stopped at step {step}; its checkpoint {} is saved",
                    checkpoint::sidecar_path(&checkpoints, step).display()
                ));
            }
            match save(trainer, position) {
                Ok(path) => stopped(format!(
                    "training stopped at step {step}; checkpoint {} written",
                    path.unwrap_or_default().display()
                )),
                Err(save_error) => {
                    let newest = match saved_step.get() {
                        None => String::new(),
                        Some(saved) => format!(
                            "; resume from {}, the newest",
                            checkpoint::sidecar_path(&checkpoints, saved).display()
                        ),
                    };
                    stopped(format!(
                        "training stopped at step {step}, and its checkpoint could not be \
                         written either ({}){newest}",
                        crate::error_text(&save_error)
                    ))
                }
            }
        };
    // Stops with a checkpoint of the last finished step (written now, unless it already is);
    // before the first step there is nothing to save.
    let stop_interrupted = |trainer: &Trainer,
                            position: Position,
                            monitor: &mut Monitor|
     -> Result<RunSummary> {
        let step = trainer.step;
        let path = match saved_step.get() == Some(step) {
            true => Some(checkpoint::sidecar_path(&checkpoints, step)),
            false if step == 0 => None,
            false => save(trainer, position)?,
        };
        monitor.finish();
        if step == 0 && leader {
            crate::say!("interrupted before the first step: nothing was trained or saved; the same command starts the run again");
        }
        match &path {
            // Every step is done: only the final grid is skipped.
            Some(_) if step >= config.train.steps => crate::say!(
                "interrupted before the final grid: all {step} steps are done; `ddpm sample --checkpoint {}` makes samples",
                run_dir.display()
            ),
            Some(path) => crate::say!("interrupted after step {step}: checkpoint {} written; continue with `ddpm train --resume {}`", path.display(), run_dir.display()),
            None => {}
        }
        Ok(RunSummary {
            final_checkpoint: path,
            final_grid: None,
            steps: step,
            first_step,
            total_steps: trainer.config.train.steps,
            seconds: monitor.session_seconds(),
            interrupted: true,
        })
    };
    // A single process stops as soon as a signal comes, also during a grid or FID measurement
    // (ranks only stop together, after a logged step).
    let abandon_on_signal = trainer.group().is_none().then_some(&*interrupt);
    let interrupted_alone = || crate::check_stop(abandon_on_signal).is_err();
    if trainer.step == 0 && leader {
        // What the model learns from, next to what it makes.
        let first = data::Sampler::new(dataset.len(), tc.seed, position)
            .next_indices(config.sample.num.min(dataset.len()));
        let real = data::to_model_space(&dataset.batch(&first)?, Device::Cpu);
        crate::monitor::save_grid(
            &data::augment(&real, config.data.hflip, config.data.color_jitter),
            &run_dir.join("samples").join("data.png"),
        )?;
    }
    let training_fid = match leader {
        true => match TrainingFid::prepare(&config, &dataset, trainer.device, abandon_on_signal) {
            Err(e) if e.is::<crate::Interrupted>() => {
                return stop_interrupted(trainer, position, &mut monitor)
            }
            prepared => prepared?,
        },
        false => None,
    };
    let mut window = Window::new();
    let grid_seed = crate::rng::mix(tc.seed, &[0x6121D]);
    let fid_seed = crate::rng::mix(tc.seed, &[0xF1D]);
    let mut rollbacks = 0;
    while trainer.step < stop {
        let waiting = Instant::now();
        let before = loader.position();
        let images = loader
            .next_batch()
            .map_err(|e| save_and_fail(trainer, before, e))?;
        let x0 = data::to_model_space(&images, trainer.device);
        window.data_wait += waiting.elapsed().as_secs_f64();
        // Nothing is updated before the gradients are complete (and averaged over the ranks),
        // so a failure there (out of device memory, a lost rank) leaves the state of the step
        // before.
        let loss = crate::catch_panics(|| trainer.accumulate_gradients(&x0))
            .map_err(|e| save_and_fail(trainer, before, e))?;
        let out = trainer.apply_gradients(loss)?;
        window.images += tc.batch;
        let step = trainer.step;
        monitor.step_done(step);
        let logged = step.is_multiple_of(tc.log_every) || step == stop;
        let interrupted = match trainer.group() {
            // All ranks stop after the same step: they agree on logged steps, which keeps the
            // host-device round trip off the others.
            Some(group) if logged => group
                .any(interrupt.load(Ordering::SeqCst))
                .map_err(|e| save_and_fail(trainer, loader.position(), e))?,
            Some(_) => false,
            None => interrupt.load(Ordering::SeqCst),
        };
        if logged {
            let record = MetricsRecord {
                step,
                epoch: loader.position().epoch,
                loss: out.loss.double_value(&[]),
                loss_by_quarter: trainer.take_error_by_quarter(),
                lr: out.lr,
                grad_norm: out.grad_norm.double_value(&[]),
                loss_scale: trainer.loss_scale(),
                skipped_steps: trainer.skipped_steps(),
                images_per_second: window.images as f64 / window.started.elapsed().as_secs_f64(),
                data_wait_seconds: window.data_wait,
                device_memory_gib: peak_memory_gib(trainer.device)?,
                wall_seconds: monitor.seconds(),
            };
            let position = loader.position();
            monitor
                .record(&record)
                .map_err(|e| save_and_fail(trainer, position, e))?;
            window = Window::new();
        }
        // After the step's metrics line, which a resume from its checkpoint keeps.
        if interrupted {
            return stop_interrupted(trainer, loader.position(), &mut monitor);
        }
        if logged {
            // Every rank sees the same averaged gradients, so all roll back together.
            let bad = trainer.consecutive_skipped_steps();
            if tc.max_bad_steps > 0 && bad >= tc.max_bad_steps {
                rollbacks += 1;
                let mut position = loader.position();
                if leader {
                    position = roll_back(trainer, &checkpoints, bad, rollbacks, &monitor)?;
                    monitor.rewind(run_dir, trainer.step)?;
                    saved_step.set(Some(trainer.step));
                }
                position = trainer.sync_from_leader(position)?;
                loader = Loader::new(dataset.clone(), position, loader_options);
                continue;
            }
        }
        if !leader {
            continue;
        }
        // The checkpoint first: sampling a grid or measuring FID may fail (out of device
        // memory, a full disk), and then the run stops with its state saved if it still can be.
        let position = loader.position();
        if config.checkpoint.every > 0
            && step.is_multiple_of(config.checkpoint.every)
            && step < stop
        {
            // Weights that overflowed are not saved; the non-finite steps that follow lead to a
            // rollback to an earlier checkpoint.
            match trainer.weights_are_finite() {
                true => drop(write_checkpoint(trainer, position)?),
                false => monitor.note(&format!(
                    "warning: the weights are not finite at step {step}: no checkpoint written"
                )),
            }
            window = Window::new();
        }
        if interrupted_alone() {
            return stop_interrupted(trainer, position, &mut monitor);
        }
        // A signal abandons a grid or FID measurement under way: its step is saved already.
        if config.sample.every > 0 && step.is_multiple_of(config.sample.every) && step < stop {
            let grid = crate::catch_panics(|| {
                write_samples(trainer, run_dir, grid_seed, &monitor, abandon_on_signal)
            });
            if interrupted_alone() {
                return stop_interrupted(trainer, position, &mut monitor);
            }
            grid.map_err(|e| save_and_fail(trainer, position, e))?;
            window = Window::new();
        }
        if let Some(fid) = training_fid
            .as_ref()
            .filter(|_| step.is_multiple_of(config.fid.every))
        {
            let measured = crate::catch_panics(|| {
                fid.measure(trainer, fid_seed, &mut monitor, abandon_on_signal)
            });
            if interrupted_alone() {
                return stop_interrupted(trainer, position, &mut monitor);
            }
            measured.map_err(|e| save_and_fail(trainer, position, e))?;
            window = Window::new();
        }
    }
    let final_checkpoint = save(trainer, loader.position())?;
    if interrupted_alone() {
        return stop_interrupted(trainer, loader.position(), &mut monitor);
    }
    let final_grid = match leader {
        true => {
            let grid = crate::catch_panics(|| {
                write_samples(trainer, run_dir, grid_seed, &monitor, abandon_on_signal)
            });
            if interrupted_alone() {
                return stop_interrupted(trainer, loader.position(), &mut monitor);
            }
            Some(grid.map_err(|e| save_and_fail(trainer, loader.position(), e))?)
        }
        false => None,
    };
    monitor.finish();
    if dataset.skipped() > 0 {
        monitor.note(&format!(
            "warning: {} unreadable image file(s) were skipped",
            dataset.skipped()
        ));
    }
    if trainer.skipped_steps() > 0 {
        monitor.note(&format!(
            "warning: {} step(s) were skipped for non-finite gradients",
            trainer.skipped_steps()
        ));
    }
    Ok(RunSummary {
        final_checkpoint,
        final_grid,
        steps: trainer.step,
        first_step,
        total_steps: trainer.config.train.steps,
        seconds: monitor.session_seconds(),
        interrupted: false,
    })
}

const MAX_ROLLBACKS: u32 = 5;

/// After `bad` non-finite steps in a row: reload a checkpoint from before them, lower the learning
/// rate by `rollback_lr_factor`, and return the data position to continue from.
fn roll_back(
    trainer: &mut Trainer,
    checkpoints: &Path,
    bad: u64,
    rollbacks: u32,
    monitor: &Monitor,
) -> Result<Position> {
    let step = trainer.step;
    if rollbacks > MAX_ROLLBACKS {
        bail!("gradients are still non-finite after {MAX_ROLLBACKS} rollbacks (step {step}); lower --lr or check the data");
    }
    // Back to before the streak where a checkpoint is (its data are then taken again at the
    // lower rate); else to one written during it, which holds the same weights, as skipped
    // steps change nothing and non-finite weights are never saved.
    let last_good = step.saturating_sub(bad);
    let checkpoint = match Checkpoint::newest_up_to(checkpoints, last_good)? {
        Some(before) => before,
        None => match Checkpoint::newest_up_to(checkpoints, step)? {
            Some(during) => during,
            None => bail!("{bad} steps in a row had non-finite gradients (steps {} to {step}) and there is no checkpoint to roll back to; lower --lr or check the data", last_good + 1),
        },
    };
    // The checkpoints after it belong to the abandoned steps: a resume must not take them up.
    checkpoint::remove_after(checkpoints, checkpoint.sidecar.step)?;
    // The scale goes on falling with each rollback (the checkpoint holds the one of its step).
    let lr_scale = trainer.lr_scale * trainer.config.train.rollback_lr_factor;
    trainer.load_state(&checkpoint)?;
    trainer.lr_scale = lr_scale;
    monitor.note(&format!("warning: {bad} steps in a row had non-finite gradients at step {step}; rolled back to step {} ({}) with the learning rate scaled by {lr_scale}", trainer.step, checkpoint.path.display()));
    Ok(checkpoint.sidecar.position)
}

/// FID during training: the Inception network and the real data's statistics, prepared before
/// the first step so that a missing network fails the run at once.
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

    /// FID of `fid.num` EMA samples against the real data (until `stop` is set); recorded in
    /// the metrics.
    fn measure(
        &self,
        trainer: &Trainer,
        seed: u64,
        monitor: &mut Monitor,
        stop: Option<&AtomicBool>,
    ) -> Result<()> {
        let started = Instant::now();
        let fid = &trainer.config.fid;
        let images = crate::eval::to_u8_images(&trainer.sample(true, fid.num, seed, stop)?);
        let statistics = self
            .inception
            .statistics(&images, fid.batch, "fake", stop)?;
        let score = crate::eval::frechet_distance(&self.real, &statistics)?;
        monitor.record_fid(
            trainer.step,
            score,
            fid.num,
            started.elapsed().as_secs_f64(),
        )
    }
}

/// Throughput bookkeeping between two metrics records.
struct Window {
    started: Instant,
    images: usize,
    data_wait: f64,
}

impl Window {
    fn new() -> Self {
        Window {
            started: Instant::now(),
            images: 0,
            data_wait: 0.0,
        }
    }
}

/// Peak CUDA memory reserved since the last call, in GiB; None on other devices. Reserved, not
/// allocated: a CUDA graph's replays allocate nothing, so its pool shows only there.
fn peak_memory_gib(device: Device) -> Result<Option<f64>> {
    match device {
        Device::Cuda(index) => {
            let (_, reserved) = ops::cuda_peak_memory(index)?;
            ops::reset_cuda_peak_memory(index)?;
            Ok(Some(reserved as f64 / (1u64 << 30) as f64))
        }
        _ => Ok(None),
    }
}

/// Samples the run's fixed noise with the EMA and the raw weights and writes them side by side
/// as `samples/step-N.png` and `samples/latest.png`; refreshes the training animation
/// (`samples/training.gif`), the loss plot (`loss.png`) and `report.html`. Abandoned, writing
/// nothing, once `stop` is set.
fn write_samples(
    trainer: &Trainer,
    run_dir: &Path,
    seed: u64,
    monitor: &Monitor,
    stop: Option<&AtomicBool>,
) -> Result<PathBuf> {
    let started = Instant::now();
    let s = &trainer.config.sample;
    let steps = crate::sampler::step_count(s, trainer.config.diffusion.timesteps);
    monitor.note(&format!(
        "sampling {} ({}, {steps} steps) with EMA and raw weights at step {}…",
        crate::monitor::images(s.num),
        s.sampler,
        trainer.step
    ));
    let ema = crate::monitor::grid_image(&trainer.sample(true, s.num, seed, stop)?);
    let raw = crate::monitor::grid_image(&trainer.sample(false, s.num, seed, stop)?);
    let samples = run_dir.join("samples");
    let path = samples.join(format!("step-{:08}.png", trainer.step));
    crate::monitor::save_png(
        &crate::monitor::labelled_pair(&ema, &raw, trainer.step)?,
        &path,
    )?;
    std::fs::copy(&path, samples.join("latest.png"))
        .with_context(|| format!("cannot write {}", samples.join("latest.png").display()))?;
    crate::monitor::refresh_run_views(run_dir, &trainer.config)?;
    monitor.note(&format!(
        "wrote {} in {:.1} s",
        path.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Precision;
    use crate::train::{flat, learning_rate, tiny};
    use tch::{Kind, Tensor};

    /// Every tensor of a finished run's last checkpoint, by name.
    fn final_state(dir: &Path) -> std::collections::BTreeMap<String, Tensor> {
        Checkpoint::load(dir).unwrap().tensors
    }

    #[test]
    fn resumed_run_is_bit_identical_to_a_straight_run() {
        for precision in [Precision::F32, Precision::Bf16Pure] {
            resumed_run_is_bit_identical_with(precision);
        }
    }

    fn resumed_run_is_bit_identical_with(precision: Precision) {
        let _rng = crate::rng::exclusive();
        let mut c = tiny(8);
        c.train.precision = precision;
        c.train.steps = 6;
        c.train.batch = 4;
        c.train.warmup_steps = 2;
        c.model.dropout = 0.1;
        c.data.hflip = true;
        c.data.color_jitter = 0.05;
        c.sample.num = 2;
        c.sample.steps = 2;
        c.sample.every = 0;
        c.checkpoint.every = 3;
        c.checkpoint.keep = 5;
        c.data.format = crate::config::DataFormat::Bundled;
        let dir = tempfile::tempdir().unwrap();
        let options = |name: &str, resume: Option<Checkpoint>, stop_at: Option<u64>| RunOptions {
            config: c.clone(),
            run_dir: dir.path().join(name),
            resume,
            strict_data: true,
            epochs: None,
            stop_at,
            interrupt: None,
            launch: None,
        };
        run(options("straight", None, None)).unwrap();
        run(options("resumed", None, Some(4))).unwrap();
        let checkpoint = Checkpoint::load(&dir.path().join("resumed")).unwrap();
        assert_eq!(checkpoint.sidecar.step, 4);
        run(options("resumed", Some(checkpoint), None)).unwrap();
        let (a, b) = (
            final_state(&dir.path().join("straight")),
            final_state(&dir.path().join("resumed")),
        );
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (name, t) in &a {
            assert!(
                t.equal(&b[name]),
                "{precision:?}: {name} differs after resume"
            );
        }
        let sa = Checkpoint::load(&dir.path().join("straight"))
            .unwrap()
            .sidecar;
        let sb = Checkpoint::load(&dir.path().join("resumed"))
            .unwrap()
            .sidecar;
        assert_eq!((sa.step, sa.position), (sb.step, sb.position));
    }

    #[test]
    fn persistent_non_finite_steps_roll_back_with_a_lower_learning_rate() {
        let c = tiny(8);
        let dir = tempfile::tempdir().unwrap();
        let mut trainer = Trainer::new(&c, Device::Cpu).unwrap();
        let clean = Tensor::rand([4, 1, 8, 8], (Kind::Float, Device::Cpu)) * 2 - 1;
        trainer.step(&clean).unwrap();
        let position = Position {
            epoch: 0,
            index: 4,
            images: Some(4),
        };
        checkpoint::save(
            dir.path(),
            &trainer.state_tensors(),
            trainer.step,
            position,
            &c,
        )
        .unwrap();
        let saved = flat(&trainer.params).copy();
        let poisoned = Tensor::full([4, 1, 8, 8], f64::NAN, (Kind::Float, Device::Cpu));
        for _ in 0..3 {
            trainer.step(&poisoned).unwrap();
            if trainer.step == 2 {
                // A checkpoint inside the streak is passed over.
                let state = trainer.state_tensors();
                checkpoint::save(dir.path(), &state, 2, position, &c).unwrap();
            }
        }
        assert_eq!(trainer.consecutive_skipped_steps(), 3);
        assert_eq!(trainer.skipped_steps(), 3);
        let monitor = Monitor::new(dir.path(), 0, 10).unwrap();
        assert_eq!(
            roll_back(&mut trainer, dir.path(), 3, 1, &monitor).unwrap(),
            position
        );
        assert_eq!(trainer.step, 1);
        assert_eq!(trainer.lr_scale, 0.5);
        assert_eq!(trainer.consecutive_skipped_steps(), 0);
        // The checkpoint of the abandoned steps is gone: a resume cannot take it up.
        assert!(!checkpoint::sidecar_path(dir.path(), 2).exists());
        assert!(flat(&trainer.params).equal(&saved));
        let out = trainer.step(&clean).unwrap();
        assert!((out.lr - 0.5 * learning_rate(&c.train, 1)).abs() < 1e-15);
        // Each further rollback lowers the rate again; with no checkpoint from before the
        // streak (10 steps back), the newest one is taken.
        trainer.step(&poisoned).unwrap();
        roll_back(&mut trainer, dir.path(), 10, 2, &monitor).unwrap();
        assert_eq!((trainer.step, trainer.lr_scale), (1, 0.25));
        // Without a checkpoint from before the streak there is nothing to return to.
        let empty = tempfile::tempdir().unwrap();
        let err = format!(
            "{:#}",
            roll_back(&mut trainer, empty.path(), 10, 1, &monitor).unwrap_err()
        );
        assert!(
            err.contains("no checkpoint to roll back to; lower --lr or check the data")
                && !err.contains("no such"),
            "{err}"
        );
    }

    #[test]
    fn surprising_settings_get_a_note_and_usual_ones_none() {
        let mut c = tiny(8);
        assert!(setting_notes(&c, Device::Cpu, 5000, None).is_empty());
        c.train.precision = Precision::Tf32;
        c.train.warmup_steps = c.train.steps + 1;
        c.train.lr_schedule = crate::config::LrSchedule::Constant;
        c.train.min_lr = 1e-6;
        let notes = setting_notes(&c, Device::Cpu, 4, Some(c.train.steps + 1));
        for expected in [
            "tf32",
            "larger than the dataset",
            "warm-up",
            "min_lr",
            "--stop-at",
        ] {
            assert!(
                notes.iter().any(|n| n.contains(expected)),
                "{expected}: {notes:?}"
            );
        }
    }

    #[test]
    fn a_new_run_overwrites_no_other_files_and_not_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        check_run_dir(&out, None, None).unwrap();
        std::fs::create_dir(&out).unwrap();
        // A job's log may come first.
        std::fs::write(out.join("job.log"), "started").unwrap();
        check_run_dir(&out, None, None).unwrap();
        // Nor a folder of images (a dataset, say) or of subfolders.
        let images = dir.path().join("images");
        std::fs::create_dir_all(images.join("cats")).unwrap();
        std::fs::write(images.join("a.PNG"), "").unwrap();
        let e = format!("{:#}", check_run_dir(&images, None, None).unwrap_err());
        assert!(
            e.contains("(a.PNG, cats/)") && e.contains("not a ddpm run"),
            "{e}"
        );
        // A resume continues in its own run directory, and checks another one as a new run's.
        let trainer = Trainer::new(&tiny(8), Device::Cpu).unwrap();
        let own = dir.path().join("run");
        let state = trainer.state_tensors();
        checkpoint::save(
            &own.join("checkpoints"),
            &state,
            0,
            Position::default(),
            &trainer.config,
        )
        .unwrap();
        let resumed = Checkpoint::load(&own).unwrap();
        std::fs::create_dir(own.join("logs")).unwrap();
        check_run_dir(&own, Some(&resumed), None).unwrap();
        let e = format!(
            "{:#}",
            check_run_dir(&images, Some(&resumed), None).unwrap_err()
        );
        assert!(e.contains("(a.PNG, cats/)"), "{e}");
        std::fs::write(out.join("report.html"), "mine").unwrap();
        let e = format!("{:#}", check_run_dir(&out, None, None).unwrap_err());
        assert!(
            e.contains("report.html") && e.contains("not a ddpm run"),
            "{e}"
        );
        // An earlier start that wrote no checkpoint.
        std::fs::write(out.join(checkpoint::LOCK_FILE), "").unwrap();
        check_run_dir(&out, None, None).unwrap();
        // Not the data folder, however it is named.
        let e = format!(
            "{:#}",
            check_run_dir(&out, None, Some(&out.join("."))).unwrap_err()
        );
        assert!(e.contains("data folder"), "{e}");
    }

    #[test]
    fn an_interrupted_run_stops_after_one_step_with_a_checkpoint() {
        let mut c = tiny(8);
        c.train.steps = 50;
        c.data.format = crate::config::DataFormat::Bundled;
        let dir = tempfile::tempdir().unwrap();
        let flag = Arc::new(AtomicBool::new(true));
        let summary = run(RunOptions {
            config: c,
            run_dir: dir.path().to_path_buf(),
            resume: None,
            strict_data: true,
            epochs: None,
            stop_at: None,
            interrupt: Some(flag),
            launch: None,
        })
        .unwrap();
        assert!(summary.interrupted && summary.final_grid.is_none());
        assert_eq!(summary.steps, 1);
        assert_eq!(Checkpoint::load(dir.path()).unwrap().sidecar.step, 1);
    }

    #[test]
    fn fid_is_measured_during_training_when_the_network_is_present() {
        let Ok(inception) = crate::eval::default_inception_path() else {
            return;
        };
        if !inception.is_file() {
            crate::say!(
                "skipped: no Inception file at {} (tools/get_inception.sh)",
                inception.display()
            );
            return;
        }
        // 40 real digits in an IDX file, so the real statistics take seconds.
        let dir = tempfile::tempdir().unwrap();
        let digits = crate::data::load(
            None,
            &LoadOptions {
                format: crate::config::DataFormat::Bundled,
                channels: 1,
                size: crate::config::ImageSize::Square(28),
                strict: true,
                split: crate::config::Split::Train,
                cache: crate::config::DataCache::On,
                workers: 0,
            },
        )
        .unwrap();
        let mut idx: Vec<u8> = [0x0803u32, 40, 28, 28]
            .iter()
            .flat_map(|w| w.to_be_bytes())
            .collect();
        idx.extend(
            Vec::<u8>::try_from(digits.all().unwrap().narrow(0, 0, 40).flatten(0, -1)).unwrap(),
        );
        let data = dir.path().join("digits-idx3-ubyte");
        std::fs::write(&data, idx).unwrap();
        let mut c = RunConfig::preset("tiny").unwrap();
        c.model.channels = 16;
        c.train.device = "cpu".into();
        c.train.steps = 2;
        c.train.batch = 4;
        c.sample.every = 0;
        c.sample.num = 2;
        c.sample.steps = 2;
        c.data.path = data.display().to_string();
        c.fid = crate::config::FidConfig {
            every: 1,
            num: 8,
            batch: 8,
            inception: inception.display().to_string(),
        };
        let run_dir = dir.path().join("run");
        run(RunOptions {
            config: c,
            run_dir: run_dir.clone(),
            resume: None,
            strict_data: true,
            epochs: None,
            stop_at: None,
            interrupt: None,
            launch: None,
        })
        .unwrap();
        let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
        let fids: Vec<serde_json::Value> = metrics
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fid"].is_number())
            .collect();
        assert_eq!(fids.len(), 2, "{metrics}");
        assert!(fids
            .iter()
            .all(|v| v["fid"].as_f64().unwrap() > 0.0 && v["fid_images"] == 8));
        assert!(std::fs::read_to_string(run_dir.join("report.html"))
            .unwrap()
            .contains("<th>FID</th>"));
    }
}

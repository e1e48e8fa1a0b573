//! The run: setting it up, then the loop (one page) inside one failure boundary.
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::Device;

use super::jobs::Jobs;
use super::policy::{self, FailureBoundary, Rollbacks, RunSummary, Signals, Stop};
use super::step::Trainer;
use crate::checkpoint::Checkpoint;
use crate::config::{ClassCount, RunConfig};
use crate::data::{self, Dataset, LoadOptions, Loader, LoaderOptions, Position};
use crate::distributed::{Launch, ProcessGroup};
use crate::monitor::{MetricsRecord, Monitor};
use crate::run_dir::{self, History, RunDir};

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
    let device = training_device(&config, launch.as_ref())?;
    check_batch_fits(&config, device)?;
    let leader = launch.as_ref().is_none_or(|l| l.rank == 0);
    if leader {
        run_dir::check_new(&run_dir, resume.as_ref(), config.data_path().as_deref())?;
    }
    let (dataset, classes) = load_data(&mut config, strict_data, resume.as_ref())?;
    if let Some(epochs) = epochs {
        set_steps_from_epochs(
            &mut config,
            epochs,
            &dataset,
            resume.as_ref().filter(|_| leader),
        )?;
    }
    let (mut trainer, mut position) =
        start_trainer(&config, device, resume.as_ref(), launch.as_ref(), &dataset)?;
    let stop = stop_at.unwrap_or(u64::MAX).min(config.train.steps);
    if trainer.step >= stop {
        if leader {
            tracing::info!("{} is at step {} and this run stops at step {stop}: nothing to train (raise train.steps, and the step to stop at if one was given, to continue)", run_dir.display(), trainer.step);
        }
        return Ok(RunSummary::untrained(trainer.step, config.train.steps));
    }
    let (mut run, history) = match leader {
        true => {
            for note in setting_notes(&config, device, dataset.len(), stop_at) {
                tracing::info!("note: {note}");
            }
            let opened = RunDir::open(&run_dir, &config, &classes, trainer.step)?;
            announce(&trainer, &dataset, resume.as_ref(), launch.as_ref());
            opened
        }
        false => (
            RunDir::view(&run_dir, &config, &classes),
            History::default(),
        ),
    };
    let signals = Signals::new(interrupt.unwrap_or_default(), trainer.group().is_some());
    let mut monitor = Monitor::new(
        trainer.step,
        stop,
        history.seconds,
        &history.losses,
        !leader,
    );
    let boundary = FailureBoundary {
        first_step: trainer.step,
    };
    let outcome = train_until(
        stop,
        &mut trainer,
        &mut run,
        &mut monitor,
        &dataset,
        &mut position,
        &signals,
    );
    boundary.close(outcome, &trainer, &mut run, position, &monitor)
}

/// The loop: next batch → step → record → periodic jobs, until step `stop`; then the final
/// checkpoint and grid. `position` follows the data position of the trainer's state.
fn train_until(
    stop: u64,
    trainer: &mut Trainer,
    run: &mut RunDir,
    monitor: &mut Monitor,
    dataset: &Arc<Dataset>,
    position: &mut Position,
    signals: &Signals,
) -> Result<Option<PathBuf>, Stop> {
    let config = trainer.config.clone();
    let loader_options = LoaderOptions::of(&config, trainer.shard());
    let mut loader =
        Loader::new(dataset.clone(), *position, loader_options).map_err(Stop::failed)?;
    let jobs = Jobs::prepare(trainer, run, dataset, *position, signals)?;
    let mut rollbacks = Rollbacks::new();
    let mut window = Window::new();
    while trainer.step < stop {
        let waiting = Instant::now();
        let batch = loader.next_batch().map_err(Stop::failed)?;
        let x0 = data::to_model_space(&batch.images, trainer.device);
        window.data_wait += waiting.elapsed().as_secs_f64();
        // A failure before the update (out of device memory, a lost rank) leaves the state of
        // the step before, which the boundary saves; one during the update leaves none to save.
        let loss = crate::catch_panics(|| trainer.accumulate_gradients(&x0, batch.labels.as_ref()))
            .map_err(Stop::failed)?;
        let out = trainer.apply_gradients(loss).map_err(Stop::Abandoned)?;
        *position = loader.position();
        window.images += config.train.batch;
        monitor.step_done(trainer.step);
        let logged = trainer.step.is_multiple_of(config.train.log_every) || trainer.step == stop;
        if logged {
            let record = window.record(trainer, &out, position.epoch, monitor.seconds())?;
            run.append_metrics(&record).map_err(Stop::failed)?;
            monitor.show(&record);
            window = Window::new();
        }
        // After the step's metrics line, which a resume from its checkpoint keeps.
        if signals
            .stop_after_step(trainer, logged)
            .map_err(Stop::failed)?
        {
            return Err(Stop::Interrupted);
        }
        if logged && rollbacks.due(trainer) {
            *position = rollbacks.roll_back(trainer, run, monitor, *position)?;
            loader =
                Loader::new(dataset.clone(), *position, loader_options).map_err(Stop::failed)?;
            continue;
        }
        if run.writes() && jobs.run_due(trainer, run, monitor, *position, stop, signals)? {
            window = Window::new();
        }
    }
    policy::save(trainer, run, *position).map_err(Stop::Abandoned)?;
    let grid = jobs.final_grid(trainer, run, signals)?;
    if run.writes() {
        warn_of_skips(dataset, trainer);
    }
    Ok(grid)
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

    /// The metrics record of the step just done, closing this window.
    fn record(
        &self,
        trainer: &mut Trainer,
        out: &super::StepOutput,
        epoch: u64,
        wall_seconds: f64,
    ) -> Result<MetricsRecord> {
        Ok(MetricsRecord {
            step: trainer.step,
            epoch,
            loss: out.loss.double_value(&[]),
            loss_by_quarter: trainer.take_error_by_quarter(),
            lr: out.lr,
            grad_norm: out.grad_norm.double_value(&[]),
            loss_scale: trainer.loss_scale(),
            skipped_steps: trainer.skipped_steps(),
            images_per_second: self.images as f64 / self.started.elapsed().as_secs_f64(),
            data_wait_seconds: self.data_wait,
            // Reserved, not allocated: a CUDA graph's replays allocate nothing, so its pool shows
            // only there.
            device_memory_gib: peak_reserved_gib(trainer.device)?,
            wall_seconds,
        })
    }
}

/// Peak CUDA memory reserved since the last call, in GiB.
fn peak_reserved_gib(device: Device) -> Result<Option<f64>> {
    let peak = crate::device::peak_memory_gib(device)?;
    crate::device::reset_peak_memory(device)?;
    Ok(peak.map(|(_, reserved)| reserved))
}

fn warn_of_skips(dataset: &Dataset, trainer: &Trainer) {
    if dataset.skipped() > 0 {
        tracing::warn!(
            "{} unreadable image file(s) were skipped",
            dataset.skipped()
        );
    }
    if trainer.skipped_steps() > 0 {
        tracing::warn!(
            "{} step(s) were skipped for non-finite gradients",
            trainer.skipped_steps()
        );
    }
}

/// The training data, with the labels of the classes the model is conditioned on (whose names
/// it returns, and whose number it sets in `config` where it was `auto`).
fn load_data(
    config: &mut RunConfig,
    strict: bool,
    resume: Option<&Checkpoint>,
) -> Result<(Arc<Dataset>, Vec<String>)> {
    let mut dataset = data::load(
        config.data_path().as_deref(),
        &LoadOptions::of(config, strict),
    )?;
    let classes = dataset.condition_on(config.model.num_classes)?;
    config.model.num_classes = ClassCount::Count(classes.len());
    // Guidance was checked against `auto`, which may have come to none.
    config.validate()?;
    if let Some(resumed) = resume.filter(|r| !r.sidecar.classes.is_empty()) {
        if resumed.sidecar.classes != classes {
            tracing::warn!(
                "the data's classes ({}) are not the checkpoint's ({}): class ids keep their embedding rows",
                data::shown_names(&classes),
                data::shown_names(&resumed.sidecar.classes)
            );
        }
    }
    Ok((Arc::new(dataset), classes))
}

/// The trainer, at the resumed checkpoint's state (rank 0) and then rank 0's on every rank,
/// and the data position it continues from.
fn start_trainer(
    config: &RunConfig,
    device: Device,
    resume: Option<&Checkpoint>,
    launch: Option<&Launch>,
    dataset: &Dataset,
) -> Result<(Trainer, Position)> {
    let mut trainer = Trainer::new(config, device)?;
    let leader = launch.is_none_or(|l| l.rank == 0);
    let mut position = Position::default();
    if let Some(checkpoint) = resume.filter(|_| leader) {
        trainer.load_state(checkpoint)?;
        position = checkpoint.sidecar.position;
    }
    if let Some(launch) = launch {
        trainer.join(ProcessGroup::join(launch, device)?)?;
        trainer.check_agreement(dataset.len())?;
        position = trainer.sync_from_leader(position)?;
    }
    Ok((trainer, position))
}

/// Refuses, before any file is written, a batch that would not fit in memory: the batches read
/// ahead and, on a CPU, the activations of a micro-batch (on a GPU, libtorch's out-of-memory
/// error says it, and the run stops with its checkpoint).
fn check_batch_fits(config: &RunConfig, device: Device) -> Result<()> {
    let Some(available) = crate::device::available_host_memory() else {
        return Ok(());
    };
    let available = available / crate::device::local_processes();
    let (t, m) = (&config.train, &config.model);
    let image = (m.in_channels * m.image_size.height() * m.image_size.width()) as u64;
    let batches_held = (data::worker_count(config.data.workers) + config.data.prefetch + 2) as u64;
    let read_ahead = (t.batch as u64)
        .saturating_mul(image)
        .saturating_mul(batches_held);
    let per_image = crate::model::activation_bytes_per_image(m);
    let activations = match device.is_cuda() {
        true => 0,
        false => ((t.batch / t.grad_accum) as u64).saturating_mul(per_image),
    };
    let needed = read_ahead.saturating_add(activations);
    if needed > available {
        let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
        bail!(
            "train.batch = {} needs about {:.1} GiB of memory ({:.1} GiB for the batches read ahead{}), more than the {:.1} GiB available: lower train.batch, or split it into micro-batches with train.grad_accum",
            t.batch,
            gib(needed),
            gib(read_ahead),
            match activations {
                0 => String::new(),
                _ => format!(", {:.2} MiB of activations per image of a micro-batch", per_image as f64 / (1u64 << 20) as f64),
            },
            gib(available)
        );
    }
    Ok(())
}

/// The configured device; with several processes on CUDA, this rank's GPU.
fn training_device(config: &RunConfig, launch: Option<&Launch>) -> Result<Device> {
    let device = crate::device::resolve(&config.train.device)?;
    let Some(launch) = launch else {
        return Ok(device);
    };
    check_divides(config, launch.world)?;
    if !device.is_cuda() {
        return Ok(device);
    }
    // One visible GPU per process (CUDA_VISIBLE_DEVICES, as SLURM sets) is cuda:0.
    let index = match tch::Cuda::device_count() {
        1 => 0,
        _ => launch.local_rank,
    };
    crate::device::resolve(&format!("cuda:{index}"))
}

/// `--epochs`: the run's length in steps from the dataset's size (said when a resume changes it).
fn set_steps_from_epochs(
    config: &mut RunConfig,
    epochs: u64,
    dataset: &Dataset,
    resume: Option<&Checkpoint>,
) -> Result<()> {
    let images = epochs
        .checked_mul(dataset.len() as u64)
        .filter(|&n| n <= i64::MAX as u64)
        .with_context(|| {
            format!(
                "{epochs} epochs of {} images is more images than a run can count",
                dataset.len()
            )
        })?;
    config.train.steps = images.div_ceil(config.train.batch as u64).max(1);
    let before = resume.map(|c| c.sidecar.config.train.steps);
    if let Some(before) = before.filter(|&s| s != config.train.steps) {
        tracing::info!(
            "changed on resume: train.steps: {before} → {} ({epochs} epoch{} of {} images)",
            config.train.steps,
            if epochs == 1 { "" } else { "s" },
            dataset.len()
        );
    }
    Ok(())
}

/// Says what is trained, from where, on what (once the run directory is this process's: a
/// resume refused for a live trainer says only that).
fn announce(
    trainer: &Trainer,
    dataset: &Dataset,
    resume: Option<&Checkpoint>,
    launch: Option<&Launch>,
) {
    let config = &trainer.config;
    if let Some(checkpoint) = resume {
        let step = checkpoint.sidecar.step;
        tracing::info!("resumed from {} at step {step}", checkpoint.path.display());
        let then = checkpoint.sidecar.position.images;
        if let Some(then) = then.filter(|&then| then != dataset.len()) {
            tracing::info!(
                "note: the data has {} images now and had {then} at step {step}: the run goes on in another data order than it would have had",
                dataset.len()
            );
        }
    }
    tracing::info!(
        "training {} on {} ({} images{}) on {}{} ({}): {} parameters, {} step{} of batch {}",
        config.preset,
        dataset.description,
        dataset.len(),
        match (dataset.is_cached(), dataset.skipped()) {
            (false, _) => ", decoded as read".to_string(),
            (true, 0) => String::new(),
            (true, unreadable) => format!(", {unreadable} of them unreadable"),
        },
        crate::device::name(trainer.device),
        launch.map_or(String::new(), |l| format!(" × {} processes", l.world)),
        speed_settings(trainer),
        crate::model::parameter_count(&trainer.vs),
        config.train.steps,
        if config.train.steps == 1 { "" } else { "s" },
        config.train.batch
    );
}

/// The precision and the levers in use, e.g. "bf16, CUDA graph, fused GroupNorm+SiLU".
fn speed_settings(trainer: &Trainer) -> String {
    let config = &trainer.config;
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
        notes.push("a 3-channel model trains on the bundled digits, which are grayscale: set data.path to your own images".to_string());
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
            "the step to stop at ({stop_at}) is beyond the run's {} steps: it ends at step {}",
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

/// A run directory's newest checkpoint, for the tests below.
#[cfg(test)]
fn newest(dir: &std::path::Path) -> Checkpoint {
    run_dir::load_checkpoint(dir).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Precision;
    use crate::train::{flat, learning_rate, tiny};
    use tch::{Kind, Tensor};

    /// Every tensor of a finished run's last checkpoint, by name.
    fn final_state(dir: &std::path::Path) -> std::collections::BTreeMap<String, Tensor> {
        newest(dir).tensors
    }

    #[test]
    fn resumed_run_is_bit_identical_to_a_straight_run() {
        for precision in [Precision::F32, Precision::Bf16Pure] {
            resumed_run_is_bit_identical_with(precision, ClassCount::Count(0));
        }
        // Class-conditional: labels and the dropped classes continue as they would have.
        resumed_run_is_bit_identical_with(Precision::F32, ClassCount::Auto);
    }

    fn resumed_run_is_bit_identical_with(precision: Precision, classes: ClassCount) {
        let _rng = crate::rng::exclusive();
        let mut c = tiny(8);
        c.model.num_classes = classes;
        c.train.class_dropout = 0.3;
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
        let checkpoint = newest(&dir.path().join("resumed"));
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
        let sa = newest(&dir.path().join("straight")).sidecar;
        let sb = newest(&dir.path().join("resumed")).sidecar;
        assert_eq!((sa.step, sa.position), (sb.step, sb.position));
        // auto became the digits' ten classes, recorded with their names.
        let conditional = classes != ClassCount::Count(0);
        assert_eq!(a.contains_key("model.class_embedding.weight"), conditional);
        assert_eq!(
            sa.config.model.num_classes.resolved(),
            if conditional { 10 } else { 0 }
        );
        assert_eq!(sa.classes.len(), sa.config.model.num_classes.resolved());
    }

    #[test]
    fn persistent_non_finite_steps_roll_back_with_a_lower_learning_rate() {
        let c = tiny(8);
        let dir = tempfile::tempdir().unwrap();
        let (mut run, _) = RunDir::open(dir.path(), &c, &[], 0).unwrap();
        let mut monitor = Monitor::new(0, 10, 0.0, &[], true);
        let mut trainer = Trainer::new(&c, Device::Cpu).unwrap();
        let clean = Tensor::rand([4, 1, 8, 8], (Kind::Float, Device::Cpu)) * 2 - 1;
        trainer.step(&clean, None).unwrap();
        let position = Position {
            epoch: 0,
            index: 4,
            images: Some(4),
        };
        run.save_checkpoint(&trainer.state_tensors(), trainer.step, position)
            .unwrap();
        let saved = flat(&trainer.optimizer.params).copy();
        let poisoned = Tensor::full([4, 1, 8, 8], f64::NAN, (Kind::Float, Device::Cpu));
        for _ in 0..3 {
            trainer.step(&poisoned, None).unwrap();
            if trainer.step == 2 {
                // A checkpoint inside the streak is passed over.
                run.save_checkpoint(&trainer.state_tensors(), 2, position)
                    .unwrap();
            }
        }
        assert_eq!(trainer.consecutive_skipped_steps(), 3);
        assert_eq!(trainer.skipped_steps(), 3);
        let mut rollbacks = Rollbacks::new();
        let back = rollbacks.roll_back(&mut trainer, &mut run, &mut monitor, Position::default());
        assert_eq!(back.unwrap(), position);
        assert_eq!(trainer.step, 1);
        assert_eq!(trainer.lr_scale, 0.5);
        assert_eq!(trainer.consecutive_skipped_steps(), 0);
        // The checkpoint of the abandoned steps is gone: a resume cannot take it up.
        assert!(!run.checkpoint_path(2).exists());
        assert_eq!(run.saved_step(), Some(1));
        assert!(flat(&trainer.optimizer.params).equal(&saved));
        let out = trainer.step(&clean, None).unwrap();
        assert!((out.lr - 0.5 * learning_rate(&c.train, 1)).abs() < 1e-15);
        // Each further rollback lowers the rate again; with no checkpoint from before the
        // streak, the newest one is taken.
        trainer.step(&poisoned, None).unwrap();
        rollbacks
            .roll_back(&mut trainer, &mut run, &mut monitor, Position::default())
            .unwrap();
        assert_eq!((trainer.step, trainer.lr_scale), (1, 0.25));
        // Without a checkpoint from before the streak there is nothing to return to, and the
        // state is not saved on the way out.
        let empty = tempfile::tempdir().unwrap();
        let (mut bare, _) = RunDir::open(empty.path(), &c, &[], 0).unwrap();
        trainer.step(&poisoned, None).unwrap();
        let err = match rollbacks.roll_back(&mut trainer, &mut bare, &mut monitor, position) {
            Err(Stop::Abandoned(e)) => format!("{e:#}"),
            other => panic!("{:?}", other.map(|_| ())),
        };
        assert!(
            err.contains("no checkpoint to roll back to; lower train.lr or check the data")
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
            "step to stop at",
        ] {
            assert!(
                notes.iter().any(|n| n.contains(expected)),
                "{expected}: {notes:?}"
            );
        }
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
        assert_eq!(newest(dir.path()).sidecar.step, 1);
    }

    #[test]
    fn fid_is_measured_during_training_when_the_network_is_present() {
        let Some(inception) = crate::eval::inception_for_tests() else {
            return;
        };
        // 40 real digits in an IDX file, so the real statistics take seconds.
        let dir = tempfile::tempdir().unwrap();
        let digits = crate::data::load(
            None,
            &LoadOptions {
                strict: true,
                cache: crate::config::DataCache::On,
                ..LoadOptions::at(
                    crate::config::DataFormat::Bundled,
                    1,
                    crate::config::ImageSize::Square(28),
                )
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

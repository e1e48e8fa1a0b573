//! The subcommands, as library functions: `main.rs` parses the command line and calls these.
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use tch::nn::VarStore;
use tch::Device;

use crate::checkpoint::Checkpoint;
use crate::config::{
    ConfigError, Flag, FlagSet, KeyFlags, Lever, Overrides, RunConfig, SampleConfig,
};
use crate::model::{self, UNet};
use crate::sampler;
use crate::train::{self, RunOptions};

/// Builds a run's configuration: the TOML file's or the preset's when given (a new run, or
/// `--resume auto` in a job script whose file describes the run), else the resumed checkpoint's,
/// else the tiny preset's; then the command-line overrides; then validation (and, for a training
/// run, its resource limits).
pub fn resolve_config(
    preset: Option<&str>,
    config_file: Option<&Path>,
    resume: Option<&Checkpoint>,
    overrides: &Overrides,
) -> Result<RunConfig> {
    resolve_checked_config(preset, config_file, resume, overrides, RunConfig::validate)
}

fn resolve_training_config(args: &TrainArgs, resume: Option<&Checkpoint>) -> Result<RunConfig> {
    resolve_checked_config(
        args.preset.as_deref(),
        args.config_file.as_deref(),
        resume,
        &args.overrides,
        |c| {
            c.validate()?;
            c.check_run_resources()?;
            let device = crate::device::resolve(&c.train.device)
                .map_err(|e| ConfigError::refused(vec!["train.device"], e))?;
            // A lever set to auto is never refused: those set to true, and what they need.
            let mut keys = vec!["train.device"];
            if c.train.cuda_graph == Lever::On {
                keys.push("train.cuda_graph");
            }
            if c.train.fused_norm_silu == Lever::On {
                keys.extend([
                    "train.fused_norm_silu",
                    "train.channels_last",
                    "train.precision",
                ]);
            }
            crate::train::check_levers(c, device).map_err(|e| ConfigError::refused(keys, e))
        },
    )
}

fn resolve_checked_config(
    preset: Option<&str>,
    config_file: Option<&Path>,
    resume: Option<&Checkpoint>,
    overrides: &Overrides,
    check: impl Fn(&RunConfig) -> std::result::Result<(), ConfigError>,
) -> Result<RunConfig> {
    let (mut config, file_keys) = match (config_file, preset, resume) {
        (Some(file), _, _) => RunConfig::from_toml_file_and_keys(file, preset)?,
        (None, Some(name), _) => (RunConfig::preset(name)?, Vec::new()),
        (None, None, Some(checkpoint)) => (checkpoint.sidecar.config.clone(), Vec::new()),
        (None, None, None) => (RunConfig::preset("tiny")?, Vec::new()),
    };
    overrides.apply(&mut config);
    let Err(error) = check(&config) else {
        return Ok(config);
    };
    // Name the file when it gave one of the values the check refused (and no flag replaced it).
    let from_file = |key: &str| file_keys.iter().any(|k| k == key) && !overrides.sets(key);
    match config_file {
        Some(file) if error.keys().into_iter().any(from_file) => {
            Err(anyhow::Error::new(error).context(format!("in config file {}", file.display())))
        }
        _ => Err(error.into()),
    }
}

pub struct TrainArgs {
    pub preset: Option<String>,
    pub config_file: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub resume: Option<PathBuf>,
    pub strict_data: bool,
    pub stop_at: Option<u64>,
    pub overrides: Overrides,
}

/// Trains; returns true when a signal interrupted the run (after it wrote a checkpoint).
pub fn train(args: TrainArgs) -> Result<bool> {
    let explicit_resume = args
        .resume
        .as_deref()
        .is_some_and(|p| p != Path::new("auto"));
    if explicit_resume && (args.config_file.is_some() || args.preset.is_some()) {
        bail!("--resume continues a run with the configuration in its checkpoint; --config and --preset are for new runs (change a resumed run's settings with flags, e.g. --steps)");
    }
    let resume = resolve_resume(&args)?;
    let mut config = resolve_training_config(&args, resume.as_ref())?;
    config.make_data_path_absolute()?;
    let run_dir = match (&args.out, &resume) {
        (Some(out), _) => out.clone(),
        (None, Some(checkpoint)) => crate::run_dir::of_checkpoint(&checkpoint.path),
        (None, None) => default_run_dir(&config),
    };
    if let Some(checkpoint) = &resume {
        // Named as a file, a checkpoint may be older than others of its run; from a directory
        // (or `auto`) it is the newest valid one, and any later one is damaged.
        let named_file = args.resume.as_deref().is_some_and(Path::is_file);
        crate::run_dir::check_resume_target(checkpoint, &run_dir, named_file)?;
        for change in crate::run_dir::resume_changes(&checkpoint.sidecar.config, &config)? {
            // --epochs sets train.steps once the data is loaded; the run reports that change.
            if !(args.overrides.epochs.is_some() && change.starts_with("train.steps:")) {
                tracing::info!("changed on resume: {change}");
            }
        }
        // With --config or --preset (--resume auto), those give the settings, not the file.
        if args.config_file.is_none() && args.preset.is_none() {
            if let Some(note) =
                crate::run_dir::unread_config_note(&run_dir, &checkpoint.sidecar.config)
            {
                tracing::info!("note: {note}");
            }
        }
    }
    let launch = crate::distributed::Launch::from_env()?;
    let interrupt =
        install_signal_handlers(&run_dir, launch.as_ref().is_some_and(|l| l.world > 1))?;
    let summary = train::run(RunOptions {
        config,
        run_dir: run_dir.clone(),
        resume,
        strict_data: args.strict_data,
        epochs: args.overrides.epochs,
        stop_at: args.stop_at,
        interrupt: Some(interrupt),
        launch,
    })?;
    if let Some(checkpoint) = summary.final_checkpoint.filter(|_| !summary.interrupted) {
        let trained = summary.steps - summary.first_step;
        let plural = if trained == 1 { "" } else { "s" };
        let resumed = match summary.first_step {
            0 => String::new(),
            first => format!(" (from step {first}, to {})", summary.steps),
        };
        tracing::info!(
            "done: {trained} step{plural}{resumed} in {:.0} s",
            summary.seconds
        );
        tracing::info!("checkpoint: {}", checkpoint.display());
        if let Some(grid) = &summary.final_grid {
            tracing::info!("samples:    {}", grid.display());
        }
        if summary.steps < summary.total_steps {
            tracing::info!(
                "stopped at step {} of {} (--stop-at): `ddpm train --resume {}` continues",
                summary.steps,
                summary.total_steps,
                run_dir.display()
            );
        }
    }
    Ok(summary.interrupted)
}

fn default_run_dir(config: &RunConfig) -> PathBuf {
    PathBuf::from("runs").join(&config.preset)
}

/// `--resume PATH` loads that checkpoint; `--resume auto` the newest valid one of the run
/// directory, if it has any.
fn resolve_resume(args: &TrainArgs) -> Result<Option<Checkpoint>> {
    match args.resume.as_deref() {
        None => Ok(None),
        Some(path) if path == Path::new("auto") => {
            let dir = match &args.out {
                Some(out) => out.clone(),
                None => default_run_dir(&resolve_training_config(args, None)?),
            };
            let found = crate::run_dir::has_checkpoints(&dir)?;
            // Said once, by the process that writes the run (rank 0 of several).
            let leader = crate::distributed::Launch::from_env()?.is_none_or(|l| l.rank == 0);
            if !found && leader {
                tracing::info!(
                    "--resume auto: no checkpoint in {}, so a new run starts",
                    dir.display()
                );
            }
            found
                .then(|| crate::run_dir::load_checkpoint(&dir))
                .transpose()
        }
        Some(path) => crate::run_dir::load_checkpoint(path).map(Some),
    }
}

/// A flag that SIGINT and SIGTERM set, so that sampling or a FID measurement stops at its next
/// step and writes nothing (the error is [`crate::Interrupted`]); a second SIGINT quits at once.
fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = Arc::new(AtomicBool::new(false));
    // Registered first, so it sees the flag as the earlier signal left it.
    signal_hook::flag::register_conditional_shutdown(SIGINT, 130, Arc::clone(&flag))?;
    signal_hook::flag::register(SIGINT, Arc::clone(&flag))?;
    signal_hook::flag::register(SIGTERM, Arc::clone(&flag))?;
    Ok(flag)
}

/// The first SIGINT or SIGTERM sets the returned flag, asking the run to stop after its current
/// step with a checkpoint (`ranks`: after the next logged step, where they agree), and says so
/// at once (a step may take a while); a second SIGINT quits at once, saying what stays in
/// `run_dir`.
fn install_signal_handlers(run_dir: &Path, ranks: bool) -> Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = Arc::new(AtomicBool::new(false));
    // Written from the handlers, which may only call async-signal-safe functions: the lines
    // are made now, and the handlers only read them (and the flag) and call write(2).
    let line = |text: String| -> &'static [u8] {
        let prefix = crate::distributed::message_prefix();
        Box::leak(format!("{prefix}{text}\n").into_boxed_str()).as_bytes()
    };
    let stopping = match ranks {
        true => "all ranks stop after the next logged step (train.log_every), with a checkpoint; Ctrl-C again quits without one",
        false => "stopping after this step with a checkpoint (a grid or FID measurement under way is abandoned); Ctrl-C again quits without one",
    };
    let on_sigint = line(format!("interrupt: {stopping}"));
    let on_sigterm = line(format!("SIGTERM: {stopping}"));
    let quitting = "second interrupt: quitting now, without a checkpoint of the step under way";
    let quitting_with = line(format!(
        "{quitting}; those already in {} stay valid",
        run_dir.join("checkpoints").display()
    ));
    let quitting_before = line(format!(
        "{quitting}; no checkpoint was written yet, and the same command starts the run again"
    ));
    let write = |bytes: &[u8]| {
        // SAFETY: write(2) is async-signal-safe; the buffer lives as long as the program.
        unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
    };
    let first = Arc::clone(&flag);
    // SAFETY: the action only reads an atomic and calls write(2).
    unsafe {
        signal_hook::low_level::register(SIGINT, move || match first.load(Ordering::SeqCst) {
            false => write(on_sigint),
            true => match crate::run_dir::CHECKPOINT_ON_DISK.load(Ordering::SeqCst) {
                true => write(quitting_with),
                false => write(quitting_before),
            },
        })?
    };
    let first = Arc::clone(&flag);
    // SAFETY: as above.
    unsafe {
        signal_hook::low_level::register(SIGTERM, move || {
            if !first.load(Ordering::SeqCst) {
                write(on_sigterm)
            }
        })?
    };
    // Registered after the messages, these act on the flag as the messages found it.
    signal_hook::flag::register_conditional_shutdown(SIGINT, 130, Arc::clone(&flag))?;
    signal_hook::flag::register(SIGINT, Arc::clone(&flag))?;
    signal_hook::flag::register(SIGTERM, Arc::clone(&flag))?;
    Ok(flag)
}

pub struct SampleArgs {
    pub checkpoint: PathBuf,
    pub num: usize,
    pub seed: u64,
    pub batch: usize,
    pub ema: bool,
    pub device: String,
    /// A PNG grid, or a folder that receives one PNG per image.
    pub grid: Option<PathBuf>,
    pub folder: Option<PathBuf>,
    /// An animated GIF of the denoising trajectory (x_T … x_0) of the first batch.
    pub animation: Option<PathBuf>,
    /// Class names or ids (or `all`) of a class-conditional model; none: all.
    pub classes: Vec<String>,
    pub settings: SampleSettings,
}

/// Sampler flags that override the checkpoint's `[sample]` section.
#[derive(Default)]
pub struct SampleSettings {
    pub sampler: Option<crate::config::SamplerKind>,
    pub steps: Option<usize>,
    pub eta: Option<f64>,
    pub guidance: Option<f64>,
}

impl SampleSettings {
    /// The checkpoint's `[sample]` section with these flags, checked against its configuration
    /// (a note says which flags DDPM ignores).
    fn resolve(&self, config: &RunConfig) -> Result<SampleConfig> {
        let mut settings: SampleConfig = config.sample.clone();
        if let Some(s) = self.sampler {
            settings.sampler = s;
        }
        if let Some(s) = self.steps {
            settings.steps = s;
        }
        if let Some(e) = self.eta {
            settings.eta = e;
        }
        if let Some(s) = self.guidance {
            settings.guidance = s;
        }
        let mut checked = config.clone();
        checked.sample = settings.clone();
        checked
            .validate()
            .context("the sampling settings (--steps, --eta, --guidance) for this checkpoint")?;
        if settings.sampler == crate::config::SamplerKind::Ddpm {
            let ignored: Vec<&str> = [
                (self.eta.is_some(), "--eta"),
                (self.steps.is_some(), "--steps"),
            ]
            .into_iter()
            .filter_map(|(given, flag)| given.then_some(flag))
            .collect();
            if !ignored.is_empty() {
                tracing::info!(
                    "note: {} applies to DDIM; the DDPM sampler takes all {} steps",
                    ignored.join(" and "),
                    config.diffusion.timesteps
                );
            }
        }
        Ok(settings)
    }
}

pub fn sample(args: SampleArgs) -> Result<()> {
    if args.grid.is_none() && args.folder.is_none() && args.animation.is_none() {
        bail!("say where the samples go: --out grid.png, --out-dir FOLDER or --animate trajectory.gif");
    }
    let device = crate::device::resolve(&args.device)?;
    let checkpoint = open_checkpoint(&args.checkpoint)?;
    let config = &checkpoint.sidecar.config;
    let settings = args.settings.resolve(config)?;
    // Before sampling, which may take long: the destinations can be written.
    if let Some(grid) = &args.grid {
        check_output_file(grid, "png", "--out")?;
    }
    if let Some(path) = &args.animation {
        check_output_file(path, "gif", "--animate")?;
    }
    if let Some(folder) = &args.folder {
        check_output_folder(folder)?;
    }
    let network = train::load_for_sampling(&checkpoint, args.ema, device)?;
    let classes = requested_classes(&args.classes, &network.class_names, args.num)?;
    let m = &config.model;
    let started = std::time::Instant::now();
    let total_steps = sampler::step_count(&settings, config.diffusion.timesteps);
    let every = total_steps.div_ceil(60); // about 60 frames whatever the sampler
    let mut frames = Vec::new();
    let progress = crate::monitor::ImageProgress::new("sampling", args.num);
    let stop = stop_on_signals()?;
    tracing::info!(
        "sampling {} ({}, {total_steps} steps) with the {} weights of step {}…",
        crate::monitor::images(args.num),
        settings.sampler,
        if args.ema { "EMA" } else { "raw" },
        checkpoint.sidecar.step
    );
    let images = sampler::sample(
        &network.denoiser(),
        &settings,
        m.batch_shape(args.num),
        classes.as_ref(),
        args.seed,
        device,
        args.batch,
        Some(&stop),
        |batch, done, x| {
            progress.set(sampler::images_done(
                batch,
                done,
                args.batch,
                total_steps,
                args.num,
            ));
            let frame = done % every == 0 || done == total_steps;
            if args.animation.is_some() && batch == 0 && frame {
                frames.push(crate::monitor::grid_image(&x.clamp(-1.0, 1.0)));
            }
        },
    )?;
    drop(progress);
    tracing::info!(
        "sampled {} in {:.1} s ({}, {} weights, step {})",
        crate::monitor::images(args.num),
        started.elapsed().as_secs_f64(),
        settings.sampler,
        if args.ema { "EMA" } else { "raw" },
        checkpoint.sidecar.step
    );
    let names = &network.class_names;
    if let Some(grid) = &args.grid {
        let picture = crate::monitor::sample_grid(&images, classes.as_ref(), names)?;
        crate::monitor::save_png(&picture, grid)?;
        tracing::info!("grid: {}", grid.display());
    }
    if let Some(folder) = &args.folder {
        crate::monitor::save_individual(&images, folder, 0)?;
        if let Some(classes) = &classes {
            crate::monitor::save_class_list(classes, names, &folder.join("labels.csv"))?;
        }
        tracing::info!("images: {} …", folder.join("000000.png").display());
    }
    if let Some(path) = &args.animation {
        crate::monitor::save_animation(&frames, path, 80)?;
        tracing::info!("trajectory: {} ({} frames)", path.display(), frames.len());
    }
    Ok(())
}

/// The class of each of `n` images for `--class` values (names, ids, `all`; none: all) of a
/// model with the classes `names` (none: unconditional, which takes no `--class`).
fn requested_classes(values: &[String], names: &[String], n: usize) -> Result<Option<tch::Tensor>> {
    if names.is_empty() {
        if let Some(value) = values.first() {
            bail!(
                "--class {value}: this checkpoint's model is unconditional (model.num_classes = 0)"
            );
        }
        return Ok(None);
    }
    let values: Vec<&str> = values
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    if values.is_empty() || values.contains(&"all") {
        return Ok(sampler::every_class(names.len(), n));
    }
    let ids: Vec<i64> = values
        .iter()
        .map(|v| class_id(v, names))
        .collect::<Result<_>>()?;
    Ok(Some(sampler::class_mix(&ids, n)))
}

/// The id of a class given by name (exactly, else ignoring case) or by id.
fn class_id(value: &str, names: &[String]) -> Result<i64> {
    let by_name = names
        .iter()
        .position(|n| n == value)
        .or_else(|| names.iter().position(|n| n.eq_ignore_ascii_case(value)));
    if let Some(id) = by_name {
        return Ok(id as i64);
    }
    match value.parse::<usize>() {
        Ok(id) if id < names.len() => Ok(id as i64),
        Ok(id) => bail!(
            "--class {id}: the model has {} classes, ids 0 to {} ({})",
            names.len(),
            names.len() - 1,
            crate::data::shown_names(names)
        ),
        Err(_) => bail!(
            "--class {value:?}: no such class; the model's classes are {}",
            crate::data::shown_names(names)
        ),
    }
}

/// A file `ddpm sample` will write: new (it never overwrites an image, as `--out-dir` never
/// mixes sets), named with `extension` (the format written), in a folder that exists or can be
/// made, and that takes files.
fn check_output_file(path: &Path, extension: &str, flag: &str) -> Result<()> {
    if path.exists() {
        bail!(
            "{flag} {} already exists: ddpm sample never overwrites a file; choose another name, or remove it",
            path.display()
        );
    }
    if !path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case(extension))
    {
        bail!(
            "{flag} {}: the file is written as {}, so its name should end in .{extension}",
            path.display(),
            extension.to_uppercase()
        );
    }
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(folder).with_context(|| {
        format!(
            "{flag} {}: cannot create {}",
            path.display(),
            folder.display()
        )
    })?;
    check_writable(folder).with_context(|| format!("{flag} {}", path.display()))
}

/// The folder of `--out-dir`: made if missing, and holding no images yet, so that a FID over it
/// never mixes two sets of samples.
fn check_output_folder(folder: &Path) -> Result<()> {
    std::fs::create_dir_all(folder)
        .with_context(|| format!("--out-dir {}: cannot create this folder", folder.display()))?;
    // Every image `ddpm fid` would read there (any format, in subfolders too); none is an error.
    let images = crate::data::image_files(folder).map_or(0, |files| files.len());
    if images > 0 {
        bail!("--out-dir {} already holds {images} image(s) (in it or its subfolders): choose an empty folder (mixed sets would skew a FID), or remove them", folder.display());
    }
    check_writable(folder).with_context(|| format!("--out-dir {}", folder.display()))
}

/// Creates and removes a file in `folder`.
fn check_writable(folder: &Path) -> Result<()> {
    let probe = folder.join(format!(".ddpm-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("cannot write into {}", folder.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// The network of a preset, a config file or a checkpoint: its architecture and exact parameter
/// count.
pub fn model_summary(
    preset: Option<&str>,
    config_file: Option<&Path>,
    checkpoint: Option<&Path>,
) -> Result<String> {
    let checkpoint = checkpoint.map(open_checkpoint).transpose()?;
    let config = resolve_config(
        preset,
        config_file,
        checkpoint.as_ref(),
        &Overrides::default(),
    )?;
    let vs = VarStore::new(Device::Cpu);
    let _ = UNet::new(&vs.root(), &config.model);
    let source = checkpoint.map_or(String::new(), |c| {
        format!(
            "checkpoint: {} (step {})\n",
            c.path.display(),
            c.sidecar.step
        )
    });
    Ok(format!(
        "{source}preset: {}\n{}",
        config.preset,
        model::summary(&config.model, &vs)
    ))
}

/// What the sampling and Inception passes of `fid`, `watch` and `nearest` take.
#[derive(clap::Args)]
pub struct Scoring {
    /// Images per forward pass (sampling and Inception)
    #[arg(long, default_value_t = 50, value_parser = crate::config::positive_count::<usize>)]
    pub batch: usize,
    /// Sampling seed (checkpoints)
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// auto, cpu, cuda, cuda:N or mps
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// The Inception-v3 TorchScript file [default: $DDPM_INCEPTION, else
    /// ~/.cache/ddpm/inception/default_1.pt, where tools/get_inception.sh puts it]
    #[arg(long)]
    pub inception: Option<PathBuf>,
}

impl Scoring {
    /// The device, and the Inception network on it (checked before any work: a missing
    /// network should cost the user nothing).
    fn open(&self) -> Result<(Device, crate::eval::Inception)> {
        let device = crate::device::resolve(&self.device)?;
        Ok((device, load_inception(self.inception.as_deref(), device)?))
    }
}

#[derive(clap::Args)]
pub struct FidArgs {
    /// Real images: any dataset `train --data` takes (its training split), or `bundled`
    #[arg(long)]
    pub real: PathBuf,
    /// Generated images: a folder of images, or a checkpoint or run directory to sample from
    /// (with its sampler settings and EMA weights)
    #[arg(long)]
    pub fake: PathBuf,
    /// Images to sample from a checkpoint [default: 10000] or to take from a folder [default: all]
    #[arg(long, value_parser = crate::config::positive_count::<usize>)]
    pub num: Option<usize>,
    #[command(flatten)]
    pub scoring: Scoring,
    /// Class-conditional checkpoints: the guidance scale of the samples (an equal share of
    /// each class) [default: the checkpoint's sample.guidance]
    #[arg(long)]
    pub guidance: Option<f64>,
}

/// Scores generated images against real ones and prints `FID@N = score`.
pub fn fid(args: FidArgs) -> Result<String> {
    use crate::eval;
    if args.num.is_some_and(|n| n < 2) {
        bail!("--num must be at least 2: FID compares covariances");
    }
    if !args.fake.exists() {
        bail!(
            "--fake {} does not exist: give a folder of images, a checkpoint or a run directory",
            args.fake.display()
        );
    }
    let (device, inception) = args.scoring.open()?;
    // Every input is read and checked before the generated images are sampled, which can take
    // minutes: the real set is loaded at their size and channels (what a model was trained on).
    let fake = FakeImages::open(&args.fake, args.num, args.guidance)?;
    let (_, height, width) = fake.shape();
    let real = real_images(&args.real, fake.shape(), "--real")?;
    if real.len() < 2 {
        bail!(
            "--real {} holds {}: FID compares covariances, which takes at least 2 images",
            args.real.display(),
            crate::monitor::images(real.len())
        );
    }
    tracing::info!(
        "real: {} images, {}, at {height}×{width}",
        real.len(),
        real.description
    );
    let stop = stop_on_signals()?;
    let fake = fake.images(args.num, &args.scoring, device, &stop)?;
    let count = fake.size()[0];
    let real_statistics = eval::cached_statistics(
        &inception,
        &real,
        args.scoring.batch,
        &eval::statistics_cache_dir()?,
        Some(&stop),
    )?;
    let fake_statistics = inception.statistics(&fake, args.scoring.batch, "fake", Some(&stop))?;
    let score = eval::frechet_distance(&real_statistics, &fake_statistics)?;
    tracing::info!(
        "FID of {count} generated images against {} real ones: {score}",
        real.len()
    );
    if real.skipped() > 0 {
        tracing::info!("note: {} unreadable real image file(s) (named above) were counted as copies of others; remove them for an exact score", real.skipped());
    }
    if count < 2048 {
        // Fewer images than Inception features: the covariance is singular and the score
        // far above its large-N value.
        tracing::info!("note: with fewer than 2048 images FID is biased high; compare scores only at the same N (10k or 50k are usual)");
    }
    Ok(format!(
        "FID@{} = {score:.2}",
        crate::monitor::count_label(count as usize)
    ))
}

#[derive(clap::Args)]
pub struct WatchArgs {
    /// The run directory to follow (the --out of ddpm train)
    pub run: PathBuf,
    /// Real images [default: the run's own data]: any dataset `train --data` takes, or `bundled`
    #[arg(long)]
    pub real: Option<PathBuf>,
    /// Images sampled per checkpoint, and real images of precision/recall [default: the run's fid.num]
    #[arg(long, value_parser = crate::config::positive_count::<usize>)]
    pub num: Option<usize>,
    /// Measure only checkpoints whose step is a multiple of this [default: each one]
    #[arg(long, default_value_t = 0)]
    pub every: u64,
    /// Measure the checkpoints there are and end (a finished run), instead of following the run
    #[arg(long)]
    pub once: bool,
    #[command(flatten)]
    pub scoring: Scoring,
    /// Seconds between looks for new checkpoints
    #[arg(long, default_value_t = 10.0)]
    pub poll_seconds: f64,
}

/// Follows a run and measures its checkpoints (`watch::Watcher`); returns what it did in a line.
pub fn watch(args: WatchArgs) -> Result<String> {
    use crate::eval;
    let mut watcher = crate::watch::Watcher::open(&args.run, args.every)?;
    let config = RunConfig::from_toml_file(&args.run.join("config.toml"), None)?;
    let num = args.num.unwrap_or(config.fid.num);
    if num <= crate::watch::PRECISION_RECALL_K {
        bail!(
            "--num must be above {}: precision and recall look for that many neighbours",
            crate::watch::PRECISION_RECALL_K
        );
    }
    let (device, inception) = args.scoring.open()?;
    let real = match &args.real {
        Some(path) => real_images(path, model_shape(&config), "--real")?,
        None => run_data(&config)?,
    };
    if real.len() <= crate::watch::PRECISION_RECALL_K {
        bail!(
            "the real set holds {}: precision and recall need more than {}",
            crate::monitor::images(real.len()),
            crate::watch::PRECISION_RECALL_K
        );
    }
    let stop = stop_on_signals()?;
    let statistics = eval::cached_statistics(
        &inception,
        &real,
        args.scoring.batch,
        &eval::statistics_cache_dir()?,
        Some(&stop),
    )?;
    // The same real images for every checkpoint: a seeded choice of `num` of them.
    let mut order: Vec<i64> = (0..real.len() as i64).collect();
    rand::seq::SliceRandom::shuffle(
        &mut order[..],
        &mut <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(args.scoring.seed),
    );
    order.truncate(num);
    let subset = real.batch(&order)?;
    let features = inception.all_features(&subset, args.scoring.batch, "real", Some(&stop))?;
    let options = crate::watch::WatchOptions {
        every: args.every,
        once: args.once,
        num,
        batch: args.scoring.batch,
        seed: args.scoring.seed,
        device,
        poll: std::time::Duration::from_secs_f64(args.poll_seconds.max(0.1)),
    };
    let real = crate::watch::RealSet {
        statistics,
        features,
    };
    let summary = watcher.follow(
        &inception,
        &real,
        &options,
        |checkpoint| SampleSettings::default().resolve(&checkpoint.sidecar.config),
        &stop,
    )?;
    let mut line = format!(
        "measured {} checkpoint(s) of {}",
        summary.measured.len(),
        args.run.display()
    );
    if !summary.missed.is_empty() {
        let steps: Vec<String> = summary.missed.iter().map(|(s, _)| s.to_string()).collect();
        line.push_str(&format!(
            "; not measured (named above): steps {}",
            steps.join(", ")
        ));
    }
    Ok(line)
}

/// The Inception network of FID: `flag`'s file, else $DDPM_INCEPTION's, else the cache's;
/// checked before any work. Published FID numbers use full f32 convolutions, so TF32 is off.
fn load_inception(flag: Option<&Path>, device: Device) -> Result<crate::eval::Inception> {
    use crate::eval;
    let path = eval::locate_inception(
        flag.map(|p| (p, "--inception")),
        std::env::var_os(eval::INCEPTION_ENV).map(PathBuf::from),
        &eval::default_inception_path()?,
    )?;
    crate::ops::set_tf32(false)?;
    eval::Inception::load(&path, device)
}

/// Real images at the generated ones' (channels, height, width): any dataset `train --data`
/// takes (its training split), or `bundled`; `flag` names them in errors.
fn real_images(
    path: &Path,
    (channels, height, width): (i64, i64, i64),
    flag: &str,
) -> Result<crate::data::Dataset> {
    let path = (path != Path::new("bundled")).then_some(path);
    let options = crate::data::LoadOptions::at(
        crate::config::DataFormat::Auto,
        channels,
        crate::config::ImageSize::Rect([height, width]),
    );
    crate::data::load(path, &options).with_context(|| flag.to_string())
}

#[derive(clap::Args)]
pub struct ShardsArgs {
    /// The image folder: one subfolder of images per class, or images alone
    pub folder: PathBuf,
    /// The folder the shards go into (empty or new)
    #[arg(long)]
    pub out: PathBuf,
    /// Samples per shard
    #[arg(long, default_value_t = 5000, value_parser = crate::config::positive_count::<usize>)]
    pub per_shard: usize,
    /// Seed of the order the samples are written in: shuffled, so that every shard mixes
    /// the classes (shards are read one after the other)
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Writes an image folder as WebDataset shards (and classes.txt naming the class ids); returns
/// what `train --data` takes to read them.
pub fn shards(args: ShardsArgs) -> Result<String> {
    let existing = fs::read_dir(&args.out).map_or(0, |entries| {
        entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "tar"))
            .count()
    });
    if existing > 0 {
        bail!(
            "--out {} already holds {existing} .tar file(s), which would be read with the new shards: choose an empty folder",
            args.out.display()
        );
    }
    let (samples, names) = crate::data::shuffled_folder(&args.folder, args.seed)?;
    let written = crate::data::write_shards(&samples, &args.out, "train", args.per_shard)?;
    if !names.is_empty() {
        let list = args.out.join(crate::data::CLASS_NAMES);
        fs::write(&list, names.join("\n") + "\n")
            .with_context(|| format!("cannot write {}", list.display()))?;
    }
    let last = written.len() - 1;
    Ok(format!(
        "wrote {} images{} as {} shard(s): --data '{}'",
        samples.len(),
        match names.len() {
            0 => String::new(),
            n => format!(" of {n} classes"),
        },
        written.len(),
        args.out
            .join(format!("train-{{000000..{last:06}}}.tar"))
            .display()
    ))
}

#[derive(clap::Args)]
pub struct NearestArgs {
    /// Generated images: a folder of images, or a checkpoint or run directory to sample from
    /// (with its sampler settings and EMA weights)
    #[arg(long)]
    pub fake: PathBuf,
    /// The training images [default: the run's own data, when --fake is a checkpoint]: any
    /// dataset `train --data` takes, or `bundled`
    #[arg(long)]
    pub train: Option<PathBuf>,
    /// Real images the model never trained on (a test split, images held out), to set how near
    /// an image the model never saw comes to the training set
    #[arg(long)]
    pub held_out: PathBuf,
    /// Images to sample from a checkpoint [default: 1000] or to take from a folder [default: all]
    #[arg(long, value_parser = crate::config::positive_count::<usize>)]
    pub num: Option<usize>,
    #[command(flatten)]
    pub scoring: Scoring,
    /// The folder for nearest.png and nearest.json [default: RUN/nearest for a run directory,
    /// else ./nearest]
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Generated images shown (rows, nearest first) beside their nearest training images.
const SHOWN_PAIRS: usize = 16;

/// The memorisation check: each generated image's nearest training images, against how near
/// held-out images come; writes nearest.png and nearest.json and returns a summary line.
pub fn nearest(args: NearestArgs) -> Result<String> {
    use crate::nearest::{Memorisation, Vectors};
    if !args.fake.exists() {
        bail!(
            "--fake {} does not exist: give a folder of images, a checkpoint or a run directory",
            args.fake.display()
        );
    }
    let (device, inception) = args.scoring.open()?;
    let fake = FakeImages::open(&args.fake, args.num, None)?;
    let train = match (&args.train, fake.config()) {
        (Some(path), _) => real_images(path, fake.shape(), "--train")?,
        (None, Some(config)) => run_data(config)?,
        (None, None) => bail!(
            "--fake {} is a folder of images: name the training images with --train",
            args.fake.display()
        ),
    };
    let held_out = real_images(&args.held_out, fake.shape(), "--held-out")?;
    let out = match &args.out {
        Some(out) => out.clone(),
        None if args.fake.join("config.toml").is_file() => args.fake.join("nearest"),
        None => PathBuf::from("nearest"),
    };
    fs::create_dir_all(&out)
        .with_context(|| format!("--out {}: cannot create this folder", out.display()))?;
    check_writable(&out).with_context(|| format!("--out {}", out.display()))?;
    let stop = stop_on_signals()?;
    let generated = fake.images(args.num.or(Some(1000)), &args.scoring, device, &stop)?;
    let all = |set: &crate::data::Dataset| set.batch(&(0..set.len() as i64).collect::<Vec<_>>());
    let (train_images, held_out_images) = (all(&train)?, all(&held_out)?);
    let features = |images: &tch::Tensor, what: &str| {
        inception.all_features(images, args.scoring.batch, what, Some(&stop))
    };
    let pixels = |images: &tch::Tensor| images.flatten(1, -1).to_kind(tch::Kind::Float) / 255.0;
    let vectors = [&train_images, &generated, &held_out_images];
    let features = [
        features(vectors[0], "training")?,
        features(vectors[1], "generated")?,
        features(vectors[2], "held-out")?,
    ];
    let pixels = vectors.map(pixels);
    let [train_v, generated_v, held_v] = [0, 1, 2].map(|i| Vectors {
        features: &features[i],
        pixels: &pixels[i],
    });
    let m = Memorisation::measure(&train_v, &generated_v, &held_v)?;
    let json = out.join("nearest.json");
    fs::write(
        &json,
        serde_json::to_string_pretty(&m.summary(train.len()))?,
    )
    .with_context(|| format!("cannot write {}", json.display()))?;
    let grid = m.nearest_pairs(&generated, &train_images, SHOWN_PAIRS);
    crate::monitor::save_png(&grid, &out.join("nearest.png"))?;
    if out
        .parent()
        .is_some_and(|run| run.join("config.toml").is_file() && out.ends_with("nearest"))
    {
        crate::run_dir::refresh_report(out.parent().unwrap_or(&out))?;
    }
    let (in_features, in_pixels) = m.flagged_in_each_space();
    Ok(format!(
        "{} of {} generated images are nearer a training image than any of {} held-out images comes ({in_features} in Inception features, {in_pixels} in pixels); {} and {}",
        m.flagged().len(),
        m.generated.len(),
        m.held_out.len(),
        out.join("nearest.png").display(),
        json.display()
    ))
}

/// A run's own training images, as it read them.
fn run_data(config: &RunConfig) -> Result<crate::data::Dataset> {
    let options = crate::data::LoadOptions::of(config, false);
    crate::data::load(config.data_path().as_deref(), &options).context("the run's data")
}

/// (channels, height, width) of a model's images.
fn model_shape(config: &RunConfig) -> (i64, i64, i64) {
    let m = &config.model;
    (m.in_channels, m.image_size.height(), m.image_size.width())
}

/// The generated images of `ddpm fid`: read from a folder, or a checkpoint to sample from.
enum FakeImages {
    Folder(tch::Tensor),
    /// With its sampler settings (`--guidance` applied).
    Checkpoint(Box<(Checkpoint, SampleConfig)>),
}

impl FakeImages {
    /// Reads the folder (the first `num` images, or all), or loads the checkpoint (which is
    /// sampled later, with `guidance` if given).
    fn open(fake: &Path, num: Option<usize>, guidance: Option<f64>) -> Result<Self> {
        let is_checkpoint = fake.is_file()
            || fake.join("checkpoints").is_dir()
            || !crate::checkpoint::list(fake)?.is_empty();
        if is_checkpoint {
            let checkpoint = crate::run_dir::load_checkpoint(fake)?;
            let settings = SampleSettings {
                guidance,
                ..Default::default()
            }
            .resolve(&checkpoint.sidecar.config)?;
            return Ok(FakeImages::Checkpoint(Box::new((checkpoint, settings))));
        }
        if guidance.is_some() {
            bail!(
                "--guidance applies to samples of a checkpoint; --fake {} is a folder of images",
                fake.display()
            );
        }
        let images = crate::eval::load_image_folder(fake, num)?;
        if images.size()[0] < 2 {
            bail!(
                "--fake {} holds 1 image: FID compares covariances, which takes at least 2 images",
                fake.display()
            );
        }
        tracing::info!("fake: {} images from {}", images.size()[0], fake.display());
        Ok(FakeImages::Folder(images))
    }

    /// (channels, height, width) of the images.
    fn shape(&self) -> (i64, i64, i64) {
        match self {
            FakeImages::Folder(images) => {
                let size = images.size();
                (size[1], size[2], size[3])
            }
            FakeImages::Checkpoint(checkpoint) => model_shape(&checkpoint.0.sidecar.config),
        }
    }

    /// The images as u8 [N, C, H, W]; a checkpoint's are sampled with its own sampler settings
    /// and EMA weights.
    fn images(
        self,
        num: Option<usize>,
        scoring: &Scoring,
        device: Device,
        stop: &AtomicBool,
    ) -> Result<tch::Tensor> {
        let (checkpoint, settings) = match self {
            FakeImages::Folder(images) => return Ok(images),
            FakeImages::Checkpoint(checkpoint) => *checkpoint,
        };
        let num = (num.unwrap_or(10_000), scoring.batch);
        train::sample_checkpoint(
            &checkpoint,
            &settings,
            num,
            scoring.seed,
            device,
            Some(stop),
        )
    }

    /// The checkpoint's configuration (None for a folder of images).
    fn config(&self) -> Option<&RunConfig> {
        match self {
            FakeImages::Folder(_) => None,
            FakeImages::Checkpoint(checkpoint) => Some(&checkpoint.0.sidecar.config),
        }
    }
}

/// One of our checkpoints (file, checkpoint folder or run directory), or a diffusers pipeline
/// folder read as one.
fn open_checkpoint(path: &Path) -> Result<Checkpoint> {
    if crate::interop::is_diffusers_folder(path) {
        Ok(crate::interop::DiffusersModel::read(path)?.into_checkpoint())
    } else {
        crate::run_dir::load_checkpoint(path)
    }
}

pub struct ExportArgs {
    /// A checkpoint or run directory.
    pub checkpoint: PathBuf,
    /// The diffusers pipeline folder to write.
    pub out: PathBuf,
    /// EMA (true) or raw weights.
    pub ema: bool,
}

/// Writes a checkpoint's weights and noise schedule as a diffusers pipeline folder.
pub fn export(args: ExportArgs) -> Result<()> {
    let checkpoint = crate::run_dir::load_checkpoint(&args.checkpoint)?;
    crate::interop::export_diffusers(&checkpoint, args.ema, &args.out)?;
    tracing::info!(
        "exported the {} weights of {} (step {}) to {}",
        if args.ema { "EMA" } else { "raw" },
        checkpoint.path.display(),
        checkpoint.sidecar.step,
        args.out.display()
    );
    Ok(())
}

/// Starts a run directory from a diffusers pipeline folder: its configuration, and a step-0
/// checkpoint that holds the weights as both raw and EMA weights with fresh optimizer state
/// (made by a `Trainer`, so that it is exactly what `--resume` reads).
pub fn import(from: &Path, run_dir: &Path) -> Result<()> {
    let imported = crate::interop::DiffusersModel::read(from)?;
    let checkpoints = run_dir.join("checkpoints");
    if !crate::checkpoint::list(&checkpoints)?.is_empty() {
        bail!(
            "run directory {} already holds checkpoints: choose another --out",
            run_dir.display()
        );
    }
    let config = &imported.config;
    let mut trainer = train::Trainer::new(config, Device::Cpu)?;
    tch::no_grad(|| -> Result<()> {
        for (name, mut var) in trainer.vs.variables() {
            var.copy_(
                imported
                    .weights
                    .get(&name)
                    .with_context(|| format!("{} lacks parameter {name}", from.display()))?,
            );
        }
        Ok(())
    })?;
    trainer.ema_vs.copy(&trainer.vs)?;
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("cannot create run directory {}", run_dir.display()))?;
    crate::checkpoint::write_atomic(&run_dir.join("config.toml"), config.to_toml().as_bytes())?;
    let saved = crate::checkpoint::save(
        &checkpoints,
        &trainer.state_tensors(),
        0,
        Default::default(),
        config,
        &[],
    )?;
    tracing::info!(
        "imported {} as {} ({} parameters; training and sampling settings of {})",
        from.display(),
        saved.display(),
        model::parameter_count(&trainer.vs),
        imported.settings_source
    );
    tracing::info!(
        "sample:    ddpm sample --checkpoint {} --out grid.png",
        run_dir.display()
    );
    tracing::info!(
        "fine-tune: ddpm train --resume {} --data PATH --steps N",
        run_dir.display()
    );
    Ok(())
}

/// The configuration keys that `ddpm bench` takes as flags: the network, and what the step
/// runs with.
#[derive(Clone, Debug, Default)]
pub struct BenchKeys;

impl FlagSet for BenchKeys {
    fn flags() -> Vec<Flag> {
        let keys = [
            "model.channels",
            "model.channel_mult",
            "model.num_res_blocks",
            "model.attention_resolutions",
            "model.dropout",
            "model.image_size",
            "model.in_channels",
            "train.precision",
            "train.channels_last",
            "train.cuda_graph",
            "train.fused_norm_silu",
            "ema.snapshot_every",
            "train.activation_checkpointing",
            "model.head_channels",
            "model.scale_shift_norm",
            "model.resblock_updown",
        ];
        keys.into_iter()
            .map(|key| match key {
                "model.image_size" => Flag::of(key).named("size"),
                "train.channels_last"
                | "train.activation_checkpointing"
                | "model.scale_shift_norm"
                | "model.resblock_updown" => Flag::of(key).switch(),
                _ => Flag::of(key),
            })
            .collect()
    }
}

/// What `ddpm bench` measures and on which network; unset fields keep the preset's values.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// train (forward, loss, backward, clip, AdamW, EMA, LR), sample (DDIM) or data (decode, resize and augment a dataset)
    #[arg(value_parser = ["train", "sample", "data"])]
    pub what: String,
    /// The dataset for `bench data` [default: the bundled set]
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, default_value = "cifar10", value_parser = clap::builder::PossibleValuesParser::new(crate::config::PRESETS))]
    pub preset: String,
    #[command(flatten)]
    pub keys: KeyFlags<BenchKeys>,
    /// Images per step (training) or per forward pass (sampling)
    #[arg(long, value_parser = crate::config::positive_count::<usize>)]
    pub batch: Option<usize>,
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Untimed steps first
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Timed training steps
    #[arg(long, default_value_t = 30, value_parser = crate::config::positive_count::<usize>)]
    pub steps: usize,
    /// With `train`: instead of timing, find the largest batch whose step fits in memory by
    /// trying (doubling from --batch, then halving the gap)
    #[arg(long)]
    pub find_batch: bool,
    /// The largest batch --find-batch tries
    #[arg(long, default_value_t = 1 << 16, value_parser = crate::config::positive_count::<usize>)]
    pub max_batch: usize,
    /// The memory in GiB a batch must fit in for --find-batch [default: a GPU's own; on a CPU,
    /// what is resident plus what the system has available]
    #[arg(long, value_parser = crate::config::positive_finite)]
    pub memory_limit: Option<f64>,
    /// Images to sample
    #[arg(long, default_value_t = 1024, value_parser = crate::config::positive_count::<usize>)]
    pub num: usize,
    /// DDIM steps when sampling
    #[arg(long, default_value_t = 50, value_parser = crate::config::positive_count::<usize>)]
    pub sample_steps: usize,
    /// CPU threads for libtorch [default: libtorch's choice]
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub threads: Option<i32>,
    /// Data loading threads for `bench data` [default: one per core]
    #[arg(long)]
    pub workers: Option<usize>,
    /// Keep decoded images in memory for `bench data`: auto, on or off
    #[arg(long, value_enum)]
    pub data_cache: Option<crate::config::DataCache>,
    /// For `bench data`: hold each batch this long, as a device step would, and report how
    /// long the steps waited for data
    #[arg(long, default_value_t = 0.0, value_parser = crate::config::milliseconds)]
    pub step_ms: f64,
}

/// Runs a benchmark and returns its `RESULT` line.
pub fn bench(args: BenchArgs) -> Result<String> {
    let mut config = RunConfig::preset(&args.preset)?;
    args.keys.apply(&mut config);
    if let Some(v) = args.batch {
        config.train.batch = v;
    }
    config.train.device = args.device.clone();
    config.sample.steps = args.sample_steps;
    if args.what == "data" {
        // No network is built: only the images' shape is checked, at any size.
        config.model.channel_mult = vec![1];
        config.model.attention_resolutions.clear();
    }
    config
        .validate()
        .context("the benchmark's network and settings")?;
    if let Some(threads) = args.threads {
        tch::set_num_threads(threads);
    }
    let device = crate::device::resolve(&args.device)?;
    if args.what == "data" {
        let mut options = crate::data::LoadOptions::of(&config, false);
        if let Some(cache) = args.data_cache {
            options.cache = cache;
        }
        let workers = crate::data::worker_count(args.workers.unwrap_or(0));
        options.workers = workers;
        let loader = crate::data::LoaderOptions {
            batch: config.train.batch,
            seed: config.train.seed,
            workers,
            prefetch: config.data.prefetch,
            shard: crate::data::Shard::WHOLE,
        };
        let step_seconds = args.step_ms / 1000.0;
        let r = crate::bench::data(
            args.data.as_deref(),
            &options,
            loader,
            true,
            0.1,
            step_seconds,
        )?;
        let m = &config.model;
        let batches = r.images / config.train.batch;
        return Ok(format!("RESULT framework=ddpm bench=data size={} channels={} batch={} workers={workers} cache={} images={} load_s={:.2} img_per_s={:.0} step_ms={} wait_s={:.3} wait_ms_per_step_after_first={:.3} data=\"{}\"", m.image_size, m.in_channels, config.train.batch, format!("{:?}", options.cache).to_lowercase(), r.images, r.load_seconds, r.images_per_second, args.step_ms, r.wait_seconds, (r.wait_after_first_seconds * 1000.0 / (batches.max(2) - 1) as f64).max(0.0), r.description));
    }
    if args.what == "sample" {
        // Fewer images than a batch are one smaller batch: report what ran.
        config.train.batch = config.train.batch.min(args.num);
    }
    if args.find_batch {
        ensure!(args.what == "train", "--find-batch goes with `bench train`");
        let start = args.batch.unwrap_or(1);
        let search =
            crate::bench::find_batch(&config, device, start, args.max_batch, args.memory_limit)?;
        return Ok(crate::bench::batch_search_line(&config, device, &search));
    }
    let result = match args.what.as_str() {
        "train" => crate::bench::train_step(&config, device, args.warmup, args.steps)?,
        "sample" => crate::bench::sampling(
            &config,
            device,
            args.num,
            config.train.batch,
            args.sample_steps,
        )?,
        other => bail!("unknown benchmark {other:?}: expected train, sample or data"),
    };
    Ok(crate::bench::result_line(
        &args.what, &config, device, &result,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_value_names_the_config_file_only_when_the_file_gave_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.toml");
        std::fs::write(&file, "[train]\nbatch = 0\n[diffusion]\ntimesteps = 50\n").unwrap();
        let refused = |flags: &[&str]| {
            let overrides = Overrides::from_flags(flags).unwrap();
            let error = resolve_config(None, Some(&file), None, &overrides).unwrap_err();
            format!("{error:#}")
        };
        let named = |e: &str| e.contains("in config file") && e.contains("run.toml");
        let e = refused(&[]);
        assert!(named(&e) && e.contains("`train.batch`: 0"), "{e}");
        // A flag's value: the file is not named.
        let e = refused(&["--batch", "4", "--lr", "2"]);
        assert!(!named(&e) && e.contains("`train.lr`: 2"), "{e}");
        // A flag's value refused for a value the file gave: both are named.
        let e = refused(&["--batch", "4", "--sample-steps", "100"]);
        assert!(named(&e) && e.contains("diffusion.timesteps = 50"), "{e}");
        // The file's value replaced by a flag's.
        let e = refused(&["--batch", "4", "--timesteps", "1"]);
        assert!(!named(&e) && e.contains("`diffusion.timesteps`: 1"), "{e}");
    }
}

#[derive(clap::Args)]
pub struct EmaArgs {
    /// The run directory (the --out of ddpm train), trained with ema.snapshot_every above 0
    pub run: PathBuf,
    /// The EMA to make: its σ_rel, the width of the averaging window relative to the run's age
    /// (0.05 to 0.10 are typical); writes a checkpoint to sample from
    #[arg(long, required_unless_present = "sweep", conflicts_with = "sweep")]
    pub sigma_rel: Option<f64>,
    /// Score a range of σ_rel with FID (and the run's classic EMA beside them), plot it
    #[arg(long)]
    pub sweep: bool,
    /// The σ_rel values of --sweep (comma-separated; those the snapshots do not reach are
    /// passed over)
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.02,0.03,0.04,0.05,0.065,0.08,0.1,0.13,0.17,0.22"
    )]
    pub sigma_rels: Vec<f64>,
    /// The step to make it at [default: the newest snapshot's]
    #[arg(long)]
    pub step: Option<u64>,
    /// Real images of --sweep [default: the run's own data]: any dataset `train --data` takes,
    /// or `bundled`
    #[arg(long)]
    pub real: Option<PathBuf>,
    /// Images sampled for each σ_rel of --sweep [default: the run's fid.num]
    #[arg(long, value_parser = crate::config::positive_count::<usize>)]
    pub num: Option<usize>,
    #[command(flatten)]
    pub scoring: Scoring,
}

/// Post-hoc EMA: the EMA of any width made from a run's snapshots, written as a checkpoint
/// (`--sigma-rel`) or scored over a range (`--sweep`); returns what it did in a line.
pub fn ema(args: EmaArgs) -> Result<String> {
    use crate::posthoc_ema::{self, Snapshots};
    crate::run_dir::require_run(&args.run)?;
    let dir = args.run.join(posthoc_ema::SNAPSHOT_DIR);
    let all = Snapshots::read(&dir, u64::MAX)?;
    for damaged in &all.damaged {
        tracing::warn!("passing over a damaged snapshot: {damaged}");
    }
    let steps = all.steps();
    let Some(&newest) = steps.last() else {
        bail!(
            "{} has no post-hoc EMA snapshots (in {}): it was trained with ema.snapshot_every = 0 (--ema-snapshot-every); train with it above 0 to choose the EMA after training",
            args.run.display(),
            dir.display()
        );
    };
    let step = args.step.unwrap_or(newest);
    if !steps.contains(&step) {
        let listed: Vec<String> = steps.iter().map(u64::to_string).collect();
        bail!(
            "--step {step}: {} has no snapshot of that step (it has {})",
            args.run.display(),
            listed.join(", ")
        );
    }
    let snapshots = Snapshots::read(&dir, step)?;
    let checkpoints = args.run.join("checkpoints");
    let base = match Checkpoint::newest_up_to(&checkpoints, step)? {
        Some(base) => base,
        None => crate::run_dir::load_checkpoint(&args.run)?,
    };
    let out = args.run.join("posthoc-ema");
    let Some(sigma_rel) = args.sigma_rel else {
        return ema_sweep(&args, &snapshots, &base, step, &out);
    };
    let plan = snapshots.plan(sigma_rel, step)?;
    let weights = snapshots.combine(&plan)?;
    let made = posthoc_ema::as_checkpoint(&base, &weights, step);
    let tensors: Vec<(String, tch::Tensor)> = made
        .tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    let folder = out.join(format!("sigma_rel-{sigma_rel:.3}"));
    let sidecar = &base.sidecar;
    let path = crate::checkpoint::save(
        &folder,
        &tensors,
        step,
        sidecar.position,
        &sidecar.config,
        &sidecar.classes,
    )?;
    Ok(format!(
        "wrote {}: the EMA of σ_rel {sigma_rel} at step {step}, from {} snapshots (its averaging profile within {:.1}% of the exact one); sample it with ddpm sample --checkpoint {}",
        path.display(),
        snapshots.profiles.len(),
        100.0 * plan.profile_error,
        path.display()
    ))
}

/// `ddpm ema --sweep`: FID of each reachable σ_rel and of the classic EMA, into
/// `posthoc-ema/sweep.json` and `sweep.png`.
fn ema_sweep(
    args: &EmaArgs,
    snapshots: &crate::posthoc_ema::Snapshots,
    base: &Checkpoint,
    step: u64,
    out: &Path,
) -> Result<String> {
    use crate::posthoc_ema::{self, ClassicEma, Sweep, SweepPoint};
    let config = &base.sidecar.config;
    let num = args.num.unwrap_or(config.fid.num);
    if num < 2 {
        bail!("--num must be at least 2: FID compares covariances");
    }
    let (reachable, beyond): (Vec<f64>, Vec<f64>) = args
        .sigma_rels
        .iter()
        .partition(|&&s| snapshots.plan(s, step).is_ok());
    if reachable.is_empty() {
        let reach = snapshots
            .reach(step)
            .map_or("none".into(), |(lo, hi)| format!("{lo:.3} to {hi:.3}"));
        bail!("none of --sigma-rels is within what the snapshots reach at step {step} (σ_rel {reach})");
    }
    if !beyond.is_empty() {
        tracing::info!(
            "note: passing over σ_rel {beyond:?}, beyond what the snapshots reach at step {step}"
        );
    }
    let (device, inception) = args.scoring.open()?;
    let real = match &args.real {
        Some(path) => real_images(path, model_shape(config), "--real")?,
        None => run_data(config)?,
    };
    let stop = stop_on_signals()?;
    let real = crate::eval::cached_statistics(
        &inception,
        &real,
        args.scoring.batch,
        &crate::eval::statistics_cache_dir()?,
        Some(&stop),
    )?;
    let settings = SampleSettings::default().resolve(config)?;
    let score = |checkpoint: &Checkpoint| -> Result<f64> {
        let images = train::sample_checkpoint(
            checkpoint,
            &settings,
            (num, args.scoring.batch),
            args.scoring.seed,
            device,
            Some(&stop),
        )?;
        let fake = inception.statistics(&images, args.scoring.batch, "fake", Some(&stop))?;
        crate::eval::frechet_distance(&real, &fake)
    };
    let mut points = Vec::new();
    for sigma_rel in reachable {
        let plan = snapshots.plan(sigma_rel, step)?;
        let weights = snapshots.combine(&plan)?;
        let fid = score(&posthoc_ema::as_checkpoint(base, &weights, step))?;
        tracing::info!(
            "σ_rel {sigma_rel}: FID@{} = {fid:.2}",
            crate::monitor::count_label(num)
        );
        points.push(SweepPoint {
            sigma_rel,
            fid,
            profile_error: plan.profile_error,
        });
    }
    let classic = match base.sidecar.step == step {
        true => Some(ClassicEma {
            decay: config.train.ema_decay,
            fid: score(base)?,
        }),
        false => None,
    };
    let sweep = Sweep {
        step,
        images: num,
        points,
        classic,
    };
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let json = out.join("sweep.json");
    crate::checkpoint::write_atomic(&json, serde_json::to_string_pretty(&sweep)?.as_bytes())?;
    crate::monitor::save_sweep_plot(&sweep, &out.join("sweep.png"))?;
    crate::run_dir::refresh_report(&args.run)?;
    let best = sweep.best().expect("at least one point");
    let classic = sweep.classic.as_ref().map_or(
        format!("(no checkpoint of step {step} for the classic EMA)"),
        |c| format!("(the classic EMA, decay {}: {:.2})", c.decay, c.fid),
    );
    Ok(format!(
        "best σ_rel {}: FID@{} = {:.2} {classic}; {} and {}",
        best.sigma_rel,
        crate::monitor::count_label(num),
        best.fid,
        json.display(),
        out.join("sweep.png").display()
    ))
}

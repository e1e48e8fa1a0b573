//! The subcommands, as library functions: `main.rs` parses the command line and calls these.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tch::nn::VarStore;
use tch::Device;

use crate::checkpoint::Checkpoint;
use crate::config::{
    ConfigError, Flag, FlagSet, KeyFlags, Lever, Overrides, RunConfig, SampleConfig,
};
use crate::model::{self, UNet};
use crate::sampler::{self, Denoiser};
use crate::schedule::NoiseSchedule;
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
        (None, Some(checkpoint)) => run_dir_of(&checkpoint.path),
        (None, None) => default_run_dir(&config),
    };
    if let Some(checkpoint) = &resume {
        // Named as a file, a checkpoint may be older than others of its run; from a directory
        // (or `auto`) it is the newest valid one, and any later one is damaged.
        let named_file = args.resume.as_deref().is_some_and(Path::is_file);
        check_resume_target(checkpoint, &run_dir, named_file)?;
        for change in resume_changes(&checkpoint.sidecar.config, &config)? {
            // --epochs sets train.steps once the data is loaded; the run reports that change.
            if !(args.overrides.epochs.is_some() && change.starts_with("train.steps:")) {
                crate::say!("changed on resume: {change}");
            }
        }
        let own_file = run_dir.join("config.toml");
        // With --config or --preset (--resume auto), those give the settings, not the file.
        if args.config_file.is_none() && args.preset.is_none() {
            note_unread_run_config(&own_file, &checkpoint.sidecar.config);
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
        crate::say!(
            "done: {trained} step{plural}{resumed} in {:.0} s",
            summary.seconds
        );
        crate::say!("checkpoint: {}", checkpoint.display());
        if let Some(grid) = &summary.final_grid {
            crate::say!("samples:    {}", grid.display());
        }
        if summary.steps < summary.total_steps {
            crate::say!(
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

/// Refuses a resume that would overwrite checkpoints: into another run's directory, or from a
/// checkpoint file older than the newest of its own run.
fn check_resume_target(checkpoint: &Checkpoint, run_dir: &Path, named_file: bool) -> Result<()> {
    let step = checkpoint.sidecar.step;
    let own_dir = run_dir_of(&checkpoint.path);
    let same_run = crate::checkpoint::same_place(&own_dir, run_dir);
    let existing = crate::checkpoint::list(&run_dir.join("checkpoints"))?;
    if !same_run && !existing.is_empty() {
        bail!(
            "{} already holds the checkpoints of another run: continue from {} into a new --out folder, or resume that run itself",
            run_dir.display(),
            checkpoint.path.display()
        );
    }
    let later: Vec<u64> = existing
        .iter()
        .filter(|_| named_file)
        .filter_map(|p| crate::checkpoint::read_sidecar(p).ok())
        .map(|s| s.step)
        .filter(|&s| s > step)
        .collect();
    if !later.is_empty() {
        bail!(
            "{} holds checkpoints after step {step} (steps {later:?}) that resuming from {} would overwrite: resume from the newest (--resume {}), or continue from this one into a new --out folder",
            run_dir.display(),
            checkpoint.path.display(),
            run_dir.display()
        );
    }
    Ok(())
}

/// A resume takes its settings from the checkpoint and flags; the run's `config.toml` records
/// them and is rewritten. Edits made there would be lost without a word: say which.
fn note_unread_run_config(file: &Path, checkpoint_config: &RunConfig) {
    if !file.is_file() {
        return;
    }
    let edited = match RunConfig::from_toml_file(file, None) {
        Err(e) => {
            let cause = e.root_cause().to_string();
            format!(
                "cannot be read ({})",
                cause.lines().next().unwrap_or_default()
            )
        }
        Ok(recorded) => {
            let (Ok(recorded), Ok(saved)) = (
                toml::Value::try_from(&recorded),
                toml::Value::try_from(checkpoint_config),
            ) else {
                return;
            };
            let mut changes = Vec::new();
            differences("", &saved, &recorded, &mut changes);
            if changes.is_empty() {
                return;
            }
            let listed: Vec<String> = changes
                .iter()
                .map(|(key, saved, in_file)| {
                    format!("{key} = {in_file} there, {saved} in the checkpoint")
                })
                .collect();
            format!(
                "differs from the checkpoint's settings ({})",
                listed.join("; ")
            )
        }
    };
    crate::say!(
        "note: {} {edited}: a resume reads the checkpoint's settings and flags, not that file, which it rewrites (change settings with flags, e.g. --lr)",
        file.display()
    );
}

/// The settings a resume changes, as `key: old → new`; an error for those that change what
/// the network is or computes (model, noise schedule, prediction target), which the
/// checkpoint's weights would no longer fit.
fn resume_changes(before: &RunConfig, after: &RunConfig) -> Result<Vec<String>> {
    let (before, after) = (
        toml::Value::try_from(before)?,
        toml::Value::try_from(after)?,
    );
    let mut changes = Vec::new();
    differences("", &before, &after, &mut changes);
    let fixed = |key: &str| {
        key.starts_with("model.")
            || (key.starts_with("diffusion.")
                && !matches!(key, "diffusion.loss_weighting" | "diffusion.min_snr_gamma"))
    };
    let refused: Vec<_> = changes.iter().filter(|(key, _, _)| fixed(key)).collect();
    if !refused.is_empty() {
        // Every one at once, so that a user fixes them in one go.
        let list = |value: fn(&(String, String, String)) -> &String| {
            refused
                .iter()
                .map(|change| format!("{} = {}", change.0, value(change)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let keys: Vec<&str> = refused.iter().map(|change| change.0.as_str()).collect();
        bail!(
            "the checkpoint was trained with {}; it cannot be resumed with {} (a different {} needs a new run)",
            list(|change| &change.1),
            list(|change| &change.2),
            keys.join(" or ")
        );
    }
    Ok(changes
        .into_iter()
        .map(|(key, old, new)| format!("{key}: {old} → {new}"))
        .collect())
}

/// (key, old, new) for every leaf that differs between two TOML values, keys dotted.
fn differences(
    prefix: &str,
    a: &toml::Value,
    b: &toml::Value,
    out: &mut Vec<(String, String, String)>,
) {
    match (a, b) {
        (toml::Value::Table(ta), toml::Value::Table(tb)) => {
            let keys: std::collections::BTreeSet<&String> = ta.keys().chain(tb.keys()).collect();
            for key in keys {
                let name = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                match (ta.get(key), tb.get(key)) {
                    (Some(x), Some(y)) => differences(&name, x, y, out),
                    (x, y) => out.push((name, shown(x), shown(y))),
                }
            }
        }
        _ if a != b => out.push((prefix.to_string(), a.to_string(), b.to_string())),
        _ => {}
    }
}

fn shown(value: Option<&toml::Value>) -> String {
    value.map_or("(unset)".into(), toml::Value::to_string)
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
            let found = !crate::checkpoint::list(&dir.join("checkpoints"))?.is_empty();
            // Said once, by the process that writes the run (rank 0 of several).
            let leader = crate::distributed::Launch::from_env()?.is_none_or(|l| l.rank == 0);
            if !found && leader {
                crate::say!(
                    "--resume auto: no checkpoint in {}, so a new run starts",
                    dir.display()
                );
            }
            found.then(|| Checkpoint::load(&dir)).transpose()
        }
        Some(path) => Checkpoint::load(path).map(Some),
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
    let quitting = line(format!(
        "second interrupt: quitting now, without a checkpoint of the step under way; those already in {} stay valid",
        run_dir.join("checkpoints").display()
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
            true => write(quitting),
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

/// The run directory a checkpoint path belongs to.
fn run_dir_of(path: &Path) -> PathBuf {
    // `Path::parent` of a bare name is "", which names no folder: "." does.
    let parent = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        parent(path)
    };
    if dir.file_name().is_some_and(|n| n == "checkpoints") {
        parent(&dir)
    } else {
        dir
    }
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
    pub settings: SampleSettings,
}

/// Sampler flags that override the checkpoint's `[sample]` section.
#[derive(Default)]
pub struct SampleSettings {
    pub sampler: Option<crate::config::SamplerKind>,
    pub steps: Option<usize>,
    pub eta: Option<f64>,
}

pub fn sample(args: SampleArgs) -> Result<()> {
    if args.grid.is_none() && args.folder.is_none() && args.animation.is_none() {
        bail!("say where the samples go: --out grid.png, --out-dir FOLDER or --animate trajectory.gif");
    }
    let device = crate::device::resolve(&args.device)?;
    let checkpoint = open_checkpoint(&args.checkpoint)?;
    let config = &checkpoint.sidecar.config;
    let mut settings: SampleConfig = config.sample.clone();
    if let Some(s) = args.settings.sampler {
        settings.sampler = s;
    }
    if let Some(s) = args.settings.steps {
        settings.steps = s;
    }
    if let Some(e) = args.settings.eta {
        settings.eta = e;
    }
    let mut checked = config.clone();
    checked.sample = settings.clone();
    checked
        .validate()
        .context("the sampling settings (--steps, --eta) for this checkpoint")?;
    if settings.sampler == crate::config::SamplerKind::Ddpm {
        let ignored: Vec<&str> = [
            (args.settings.eta.is_some(), "--eta"),
            (args.settings.steps.is_some(), "--steps"),
        ]
        .into_iter()
        .filter_map(|(given, flag)| given.then_some(flag))
        .collect();
        if !ignored.is_empty() {
            crate::say!(
                "note: {} applies to DDIM; the DDPM sampler takes all {} steps",
                ignored.join(" and "),
                config.diffusion.timesteps
            );
        }
    }
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
    let (_vs, model) = train::load_for_sampling(&checkpoint, args.ema, device)?;
    let schedule = NoiseSchedule::from_config(&config.diffusion);
    let denoiser = Denoiser {
        model: &model,
        schedule: &schedule,
        prediction: config.diffusion.prediction,
    };
    let m = &config.model;
    let started = std::time::Instant::now();
    let total_steps = sampler::step_count(&settings, config.diffusion.timesteps);
    let every = total_steps.div_ceil(60); // about 60 frames whatever the sampler
    let mut frames = Vec::new();
    let mut progress = crate::monitor::ImageProgress::new("sampling", args.num);
    let stop = stop_on_signals()?;
    crate::say!(
        "sampling {} ({}, {total_steps} steps) with the {} weights of step {}…",
        crate::monitor::images(args.num),
        settings.sampler,
        if args.ema { "EMA" } else { "raw" },
        checkpoint.sidecar.step
    );
    let images = sampler::sample(
        &denoiser,
        &settings,
        m.batch_shape(args.num),
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
    crate::say!(
        "sampled {} in {:.1} s ({}, {} weights, step {})",
        crate::monitor::images(args.num),
        started.elapsed().as_secs_f64(),
        settings.sampler,
        if args.ema { "EMA" } else { "raw" },
        checkpoint.sidecar.step
    );
    if let Some(grid) = &args.grid {
        crate::monitor::save_grid(&images, grid)?;
        crate::say!("grid: {}", grid.display());
    }
    if let Some(folder) = &args.folder {
        crate::monitor::save_individual(&images, folder, 0)?;
        crate::say!("images: {} …", folder.join("000000.png").display());
    }
    if let Some(path) = &args.animation {
        crate::monitor::save_animation(&frames, path, 80)?;
        crate::say!("trajectory: {} ({} frames)", path.display(), frames.len());
    }
    Ok(())
}

/// A file `ddpm sample` will write: named with `extension` (the format written), in a folder
/// that exists or can be made, and that takes files.
fn check_output_file(path: &Path, extension: &str, flag: &str) -> Result<()> {
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

/// Scores generated images against real ones and prints `FID@N = score`.
pub fn fid(args: FidArgs) -> Result<()> {
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
    let device = crate::device::resolve(&args.device)?;
    // Before any sampling: a missing network should cost the user nothing.
    let inception_path = eval::locate_inception(
        args.inception.as_deref().map(|p| (p, "--inception")),
        std::env::var_os(eval::INCEPTION_ENV).map(PathBuf::from),
        &eval::default_inception_path()?,
    )?;
    // Published FID numbers use full f32 convolutions; libtorch would let cuDNN use TF32.
    crate::ops::set_tf32(false)?;
    let inception = eval::Inception::load(&inception_path, device)?;
    let stop = stop_on_signals()?;
    let fake = fid_fake_images(&args, device, &stop)?;
    let (count, channels, height, width) = fake.size4()?;
    // The real images are scored at the generated images' size and channels: what a model was
    // trained on.
    let real_path = (args.real != Path::new("bundled")).then_some(args.real.as_path());
    let options = crate::data::LoadOptions {
        format: crate::config::DataFormat::Auto,
        channels,
        size: crate::config::ImageSize::Rect([height, width]),
        strict: false,
        split: crate::config::Split::Train,
        cache: crate::config::DataCache::Auto,
        workers: 0,
    };
    let real = crate::data::load(real_path, &options)?;
    crate::say!(
        "real: {} images, {}, at {height}×{width}",
        real.len(),
        real.description
    );
    let real_statistics = eval::cached_statistics(
        &inception,
        &real,
        args.batch,
        &eval::statistics_cache_dir()?,
        Some(&stop),
    )?;
    let fake_statistics = inception.statistics(&fake, args.batch, "fake", Some(&stop))?;
    let score = eval::frechet_distance(&real_statistics, &fake_statistics)?;
    crate::say!(
        "FID of {count} generated images against {} real ones: {score}",
        real.len()
    );
    if real.skipped() > 0 {
        crate::say!("note: {} unreadable real image file(s) (named above) were counted as copies of others; remove them for an exact score", real.skipped());
    }
    if count < 2048 {
        // Fewer images than Inception features: the covariance is singular and the score
        // far above its large-N value.
        crate::say!("note: with fewer than 2048 images FID is biased high; compare scores only at the same N (10k or 50k are usual)");
    }
    println!("FID@{} = {score:.2}", eval::count_label(count as usize));
    Ok(())
}

/// The generated images as u8 [N, C, H, W]: sampled from a checkpoint with its own sampler
/// settings and EMA weights, or read from a folder.
fn fid_fake_images(args: &FidArgs, device: Device, stop: &AtomicBool) -> Result<tch::Tensor> {
    let is_checkpoint = args.fake.is_file()
        || args.fake.join("checkpoints").is_dir()
        || !crate::checkpoint::list(&args.fake)?.is_empty();
    if !is_checkpoint {
        let images = crate::eval::load_image_folder(&args.fake, args.num)?;
        crate::say!(
            "fake: {} images from {}",
            images.size()[0],
            args.fake.display()
        );
        return Ok(images);
    }
    let checkpoint = Checkpoint::load(&args.fake)?;
    let config = &checkpoint.sidecar.config;
    let (_vs, model) = train::load_for_sampling(&checkpoint, true, device)?;
    let schedule = NoiseSchedule::from_config(&config.diffusion);
    let denoiser = Denoiser {
        model: &model,
        schedule: &schedule,
        prediction: config.diffusion.prediction,
    };
    let (m, num) = (&config.model, args.num.unwrap_or(10_000));
    let started = std::time::Instant::now();
    let steps = sampler::step_count(&config.sample, config.diffusion.timesteps);
    let mut progress = crate::monitor::ImageProgress::new("fake: sampling", num);
    let images = sampler::sample(
        &denoiser,
        &config.sample,
        m.batch_shape(num),
        args.seed,
        device,
        args.batch,
        Some(stop),
        |batch, done, _| progress.set(sampler::images_done(batch, done, args.batch, steps, num)),
    )?;
    drop(progress);
    crate::say!(
        "fake: sampled {num} images in {:.1} s ({}, EMA weights, step {} of {})",
        started.elapsed().as_secs_f64(),
        config.sample.sampler,
        checkpoint.sidecar.step,
        checkpoint.path.display()
    );
    Ok(crate::eval::to_u8_images(&images))
}

/// One of our checkpoints (file, checkpoint folder or run directory), or a diffusers pipeline
/// folder read as one.
fn open_checkpoint(path: &Path) -> Result<Checkpoint> {
    if crate::interop::is_diffusers_folder(path) {
        Ok(crate::interop::DiffusersModel::read(path)?.into_checkpoint())
    } else {
        Checkpoint::load(path)
    }
}

pub struct ExportArgs {
    /// A checkpoint or run directory.
    pub checkpoint: PathBuf,
    pub format: crate::interop::ExportFormat,
    pub out: PathBuf,
    /// EMA (true) or raw weights.
    pub ema: bool,
}

/// Writes a checkpoint's weights and noise schedule in another library's format.
pub fn export(args: ExportArgs) -> Result<()> {
    let checkpoint = Checkpoint::load(&args.checkpoint)?;
    match args.format {
        crate::interop::ExportFormat::Diffusers => {
            crate::interop::export_diffusers(&checkpoint, args.ema, &args.out)?
        }
    }
    crate::say!(
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
    )?;
    crate::say!(
        "imported {} as {} ({} parameters; training and sampling settings of {})",
        from.display(),
        saved.display(),
        model::parameter_count(&trainer.vs),
        imported.settings_source
    );
    crate::say!(
        "sample:    ddpm sample --checkpoint {} --out grid.png",
        run_dir.display()
    );
    crate::say!(
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
        ];
        keys.into_iter()
            .map(|key| match key {
                "model.image_size" => Flag::of(key).named("size"),
                "train.channels_last" => Flag::of(key).switch(),
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

    #[test]
    fn a_resume_lists_the_changes_and_refuses_every_network_change_at_once() {
        let before = RunConfig::preset("tiny").unwrap();
        let mut after = before.clone();
        after.train.lr *= 2.0;
        after.diffusion.loss_weighting = crate::config::LossWeighting::Snr;
        let changes = resume_changes(&before, &after).unwrap();
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(
            changes.iter().any(|c| c.starts_with("train.lr: ")),
            "{changes:?}"
        );
        after.model.channels *= 2;
        after.model.num_res_blocks += 1;
        let e = resume_changes(&before, &after).unwrap_err().to_string();
        let m = &before.model;
        assert!(
            e.contains(&format!(
                "trained with model.channels = {}, model.num_res_blocks = {};",
                m.channels, m.num_res_blocks
            )) && e.contains(&format!(
                "resumed with model.channels = {}, model.num_res_blocks = {} (",
                m.channels * 2,
                m.num_res_blocks + 1
            )) && e.contains("a different model.channels or model.num_res_blocks needs a new run"),
            "{e}"
        );
    }
}

//! The subcommands, as library functions: `main.rs` parses the command line and calls these.
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use tch::nn::VarStore;
use tch::Device;

use crate::checkpoint::Checkpoint;
use crate::config::{Overrides, RunConfig, SampleConfig};
use crate::model::{self, UNet};
use crate::sampler::{self, Denoiser};
use crate::schedule::NoiseSchedule;
use crate::train::{self, RunOptions};

/// Builds a run's configuration: the resumed checkpoint's, else the TOML file's, else the
/// preset's; then the command-line overrides; then validation.
pub fn resolve_config(preset: Option<&str>, config_file: Option<&Path>, resume: Option<&Checkpoint>, overrides: &Overrides) -> Result<RunConfig> {
    let mut config = match (resume, config_file) {
        (Some(checkpoint), _) => checkpoint.sidecar.config.clone(),
        (None, Some(file)) => RunConfig::from_toml_file(file, preset)?,
        (None, None) => RunConfig::preset(preset.unwrap_or("tiny"))?,
    };
    overrides.apply(&mut config);
    config.validate()?;
    Ok(config)
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

pub fn train(args: TrainArgs) -> Result<()> {
    let resume = args.resume.as_deref().map(Checkpoint::load).transpose()?;
    let config = resolve_config(args.preset.as_deref(), args.config_file.as_deref(), resume.as_ref(), &args.overrides)?;
    let run_dir = match (&args.out, &args.resume) {
        (Some(out), _) => out.clone(),
        (None, Some(resumed)) => run_dir_of(resumed),
        (None, None) => PathBuf::from("runs").join(&config.preset),
    };
    let summary = train::run(RunOptions { config, run_dir: run_dir.clone(), resume, strict_data: args.strict_data, epochs: args.overrides.epochs, stop_at: args.stop_at })?;
    eprintln!("done: {} steps in {:.0} s", summary.steps, summary.seconds);
    eprintln!("checkpoint: {}", summary.final_checkpoint.display());
    eprintln!("samples:    {}", summary.final_grid.display());
    Ok(())
}

/// The run directory a checkpoint path belongs to.
fn run_dir_of(path: &Path) -> PathBuf {
    let dir = if path.is_dir() { path.to_path_buf() } else { path.parent().unwrap_or(Path::new(".")).to_path_buf() };
    if dir.file_name().is_some_and(|n| n == "checkpoints") {
        dir.parent().unwrap_or(Path::new(".")).to_path_buf()
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
    if args.grid.is_none() && args.folder.is_none() {
        bail!("say where the samples go: --out grid.png or --out-dir FOLDER");
    }
    let device = crate::device::resolve(&args.device)?;
    let checkpoint = Checkpoint::load(&args.checkpoint)?;
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
    let (_vs, model) = train::load_for_sampling(&checkpoint, args.ema, device)?;
    let schedule = NoiseSchedule::from_config(&config.diffusion);
    let denoiser = Denoiser { model: &model, schedule: &schedule, prediction: config.diffusion.prediction };
    let m = &config.model;
    let started = std::time::Instant::now();
    let images = sampler::sample(&denoiser, &settings, [args.num as i64, m.in_channels, m.image_size.height(), m.image_size.width()], args.seed, device, args.batch, |_, _| {});
    eprintln!("sampled {} images in {:.1} s ({:?}, {} weights, step {})", args.num, started.elapsed().as_secs_f64(), settings.sampler, if args.ema { "EMA" } else { "raw" }, checkpoint.sidecar.step);
    if let Some(grid) = &args.grid {
        crate::monitor::save_grid(&images, grid)?;
        eprintln!("grid: {}", grid.display());
    }
    if let Some(folder) = &args.folder {
        crate::monitor::save_individual(&images, folder, 0)?;
        eprintln!("images: {}/000000.png …", folder.display());
    }
    Ok(())
}

/// The architecture summary of a preset or config file, with the exact parameter count.
pub fn model_summary(preset: Option<&str>, config_file: Option<&Path>) -> Result<String> {
    let config = resolve_config(preset, config_file, None, &Overrides::default())?;
    let vs = VarStore::new(Device::Cpu);
    let _ = UNet::new(&vs.root(), &config.model);
    Ok(format!("preset: {}\n{}", config.preset, model::summary(&config.model, &vs)))
}

//! The `ddpm` command line. Parsing only: every subcommand is a library call.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ddpm::commands::{self, SampleArgs, SampleSettings, TrainArgs};
use ddpm::config::{Overrides, SamplerKind, PRESETS};

#[derive(Parser)]
#[command(name = "ddpm", version, about = "Train, sample and evaluate DDPM image diffusion models", long_about = "Train, sample and evaluate DDPM image diffusion models (Ho et al. 2020) on libtorch.\n\nRun `ddpm train` with no arguments to train the tiny preset on the bundled MNIST subset.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model; everything the run writes goes into one run directory (--out)
    Train {
        /// Preset: cifar10, mnist or tiny [default: tiny, or the config file's `preset`]
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(PRESETS))]
        preset: Option<String>,
        /// TOML configuration file (keys documented in the README); flags override it
        #[arg(long)]
        config: Option<PathBuf>,
        /// Run directory [default: runs/<preset>, or the resumed run's]
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue a run: its directory or one of its checkpoints
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Stop at the first unreadable image instead of skipping it
        #[arg(long)]
        strict_data: bool,
        /// Stop with a checkpoint after this step, keeping the schedule of the full run
        #[arg(long)]
        stop_at: Option<u64>,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Generate images from a checkpoint (EMA weights by default)
    Sample {
        /// A checkpoint (its .json or .safetensors) or a run directory (its newest checkpoint)
        #[arg(long)]
        checkpoint: PathBuf,
        /// Number of images
        #[arg(long, default_value_t = 64)]
        num: usize,
        /// Write a PNG grid here
        #[arg(long)]
        out: Option<PathBuf>,
        /// Write one PNG per image into this folder (what FID tools read)
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// ddpm (ancestral, all T steps) or ddim [default: the checkpoint's sample.sampler]
        #[arg(long, value_enum)]
        sampler: Option<SamplerKind>,
        /// DDIM steps [default: the checkpoint's sample.steps]
        #[arg(long)]
        steps: Option<usize>,
        /// DDIM η in [0, 1]: 0 is deterministic
        #[arg(long)]
        eta: Option<f64>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Images per forward pass
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// ema or raw
        #[arg(long, default_value = "ema", value_parser = ["ema", "raw"])]
        weights: String,
        /// auto, cpu, cuda, cuda:N or mps
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Print a model's architecture summary and exact parameter count
    Model {
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(PRESETS))]
        preset: Option<String>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Train { preset, config, out, resume, strict_data, stop_at, overrides } => commands::train(TrainArgs { preset, config_file: config, out, resume, strict_data, stop_at, overrides }),
        Command::Sample { checkpoint, num, out, out_dir, sampler, steps, eta, seed, batch, weights, device } => commands::sample(SampleArgs { checkpoint, num, seed, batch, ema: weights == "ema", device, grid: out, folder: out_dir, settings: SampleSettings { sampler, steps, eta } }),
        Command::Model { preset, config } => commands::model_summary(preset.as_deref(), config.as_deref()).map(|s| print!("{s}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

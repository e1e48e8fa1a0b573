//! The `ddpm` command line. Parsing only: every subcommand is a library call.
mod console;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ddpm::commands::{self, BenchArgs, SampleArgs, SampleSettings, TrainArgs};
use ddpm::config::{positive_count, unit_interval, Overrides, SamplerKind, PRESETS};
use ddpm::run_dir::{Refusal, Remedy};

#[derive(Parser)]
#[command(
    name = "ddpm",
    version,
    about = "Train, sample and evaluate DDPM image diffusion models",
    long_about = "Train, sample and evaluate DDPM image diffusion models (Ho et al. 2020) on libtorch.\n\nRun `ddpm train` with no arguments to train the tiny preset on the bundled MNIST subset."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once per process: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Train a model; everything the run writes goes into one run directory (--out)
    #[command(allow_negative_numbers = true)]
    Train {
        /// Preset: tiny, mnist, cifar10, imagenet64 or imagenet256 [default: tiny, or the config
        /// file's `preset`]
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(PRESETS))]
        preset: Option<String>,
        /// TOML configuration file (keys documented in docs/configuration.md); flags override it
        #[arg(long)]
        config: Option<PathBuf>,
        /// Run directory [default: runs/<preset>, or the resumed run's]
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue a run: its directory, one of its checkpoints, or `auto` (the --out directory's
        /// newest valid checkpoint if it has one, else a fresh start)
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
        /// A checkpoint (its .json or .safetensors), a run directory (its newest checkpoint) or a
        /// diffusers pipeline folder (with unet/config.json)
        #[arg(long)]
        checkpoint: PathBuf,
        /// Number of images
        #[arg(long, default_value_t = 64, value_parser = positive_count::<usize>)]
        num: usize,
        /// Write a PNG grid here
        #[arg(long)]
        out: Option<PathBuf>,
        /// Write one PNG per image into this folder (what FID tools read)
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// Write the denoising trajectory x_T → x_0 of the first batch as an animated GIF
        #[arg(long)]
        animate: Option<PathBuf>,
        /// ddpm (ancestral, all T steps) or ddim [default: the checkpoint's sample.sampler]
        #[arg(long, value_enum)]
        sampler: Option<SamplerKind>,
        /// DDIM steps, at most T [default: the checkpoint's sample.steps]
        #[arg(long, value_parser = positive_count::<usize>)]
        steps: Option<usize>,
        /// DDIM η in [0, 1]: 0 is deterministic
        #[arg(long, value_parser = unit_interval)]
        eta: Option<f64>,
        /// Class-conditional models: the class(es) to sample, by name or id, repeated or
        /// comma-separated, in equal shares; `all` (the default): every class
        #[arg(long = "class", value_name = "CLASS")]
        classes: Vec<String>,
        /// Classifier-free guidance scale s: ε̂ = ε̂(x, ∅) + s·(ε̂(x, class) − ε̂(x, ∅)), as
        /// diffusers' guidance_scale (1: no guidance, 0: unconditional) [default: the
        /// checkpoint's sample.guidance]
        #[arg(long)]
        guidance: Option<f64>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Images per forward pass
        #[arg(long, default_value_t = 256, value_parser = positive_count::<usize>)]
        batch: usize,
        /// ema or raw
        #[arg(long, default_value = "ema", value_parser = ["ema", "raw"])]
        weights: String,
        /// auto, cpu, cuda, cuda:N or mps
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Measure the training step or sampling (on synthetic data) or data loading (on a dataset); prints one `RESULT … img_per_s=…` line
    Bench(BenchArgs),
    /// Write a checkpoint as a Hugging Face diffusers pipeline folder (UNet2DModel + DDPMScheduler)
    Export {
        /// A checkpoint (its .json or .safetensors) or a run directory (its newest checkpoint)
        #[arg(long)]
        checkpoint: PathBuf,
        /// The format written: a diffusers DDPMPipeline folder, the one there is
        #[arg(long, default_value = "diffusers", value_parser = ["diffusers"])]
        format: String,
        /// The folder to write (unet/, scheduler/, model_index.json)
        #[arg(long)]
        out: PathBuf,
        /// ema or raw
        #[arg(long, default_value = "ema", value_parser = ["ema", "raw"])]
        weights: String,
    },
    /// Start a run directory from a diffusers pipeline folder (UNet2DModel + DDPMScheduler)
    Import {
        /// The diffusers folder: unet/config.json, unet/diffusion_pytorch_model.safetensors,
        /// scheduler/scheduler_config.json
        #[arg(long)]
        from: PathBuf,
        /// The run directory to create; sample from it or continue training it with --resume
        #[arg(long)]
        out: PathBuf,
    },
    /// Run a ddpm command as N data-parallel processes on this machine (like torchrun
    /// --nproc-per-node N --no-python ddpm …), e.g. `ddpm launch --nproc 4 -- train --preset cifar10`
    Launch {
        /// Processes (one per GPU)
        #[arg(long, value_parser = positive_count::<usize>)]
        nproc: usize,
        /// The rendezvous port [default: a free one]
        #[arg(long)]
        master_port: Option<u16>,
        /// Seconds a rank waits for the others before giving up [default: 1800; DDPM_DIST_TIMEOUT]
        #[arg(long, value_parser = ddpm::config::positive_count::<u64>)]
        timeout: Option<u64>,
        /// The ddpm command line each process runs, after `--` or directly (`ddpm launch
        /// --nproc 4 train …`)
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Print a model's architecture summary and exact parameter count
    Model {
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(PRESETS))]
        preset: Option<String>,
        #[arg(long)]
        config: Option<PathBuf>,
        /// A checkpoint (its .json or .safetensors), a run directory or a diffusers pipeline
        /// folder: the network it holds
        #[arg(long, conflicts_with_all = ["preset", "config"])]
        checkpoint: Option<PathBuf>,
    },
    /// Fréchet Inception Distance of generated images (a folder, or samples of a checkpoint)
    /// against real ones; prints `FID@N = score`
    Fid(commands::FidArgs),
    /// Follow a run from beside it: FID, precision and recall of each new checkpoint's samples
    /// into its eval.jsonl, without the trainer waiting
    Watch(commands::WatchArgs),
    /// The memorisation check: each generated image's nearest training images (Inception
    /// features, pixels), flagging those nearer than any held-out real image comes
    Nearest(commands::NearestArgs),
    /// Post-hoc EMA: make the EMA of any width σ_rel from a run's snapshots (a checkpoint to
    /// sample from), or score a range of widths with FID (--sweep)
    Ema(commands::EmaArgs),
    /// Write an image folder as WebDataset tar shards (the samples shuffled, with their class
    /// ids), the format `train --data` streams large sets from
    Shards(commands::ShardsArgs),
}

fn main() -> ExitCode {
    let command = Cli::parse().command;
    console::install();
    ddpm::device::tune_host_allocator();
    ddpm::install_panic_hook();
    // libtorch's errors (out of memory, say) arrive as panics: reported like any error.
    match ddpm::catch_panics(|| run(command)) {
        Ok(code) => code,
        // A signal stopped sampling or a FID measurement before anything was written.
        Err(e) if e.is::<ddpm::Interrupted>() => {
            console::line("interrupted: nothing was written");
            ExitCode::from(130)
        }
        Err(e) => {
            console::line(&format!("error: {}", shown(&e)));
            ExitCode::FAILURE
        }
    }
}

/// An error as the command line shows it: a run directory's remedies and the configuration
/// keys it names in terms of the flags.
fn shown(error: &anyhow::Error) -> String {
    let causes: Vec<String> = error
        .chain()
        .map(|cause| match cause.downcast_ref::<Refusal>() {
            Some(refusal) => refusal.words(remedy_in_flags),
            None => cause.to_string(),
        })
        .collect();
    ddpm::config::with_flags(&ddpm::without_libtorch_stack(&causes.join(": ")))
}

fn remedy_in_flags(remedy: &Remedy) -> String {
    match remedy {
        Remedy::ChooseAnotherFolder => "choose another --out".into(),
        Remedy::ChooseEmptyFolder => "choose a new or empty folder for --out".into(),
        Remedy::Resume(run) => format!("continue it with --resume {}", run.display()),
        Remedy::ResumeThatRun => "resume that run itself".into(),
        Remedy::ContinueIntoNewFolder(from) => {
            format!("continue from {} into a new --out folder", from.display())
        }
        Remedy::Restart { config, run } => format!(
            "start it again from step 0 with `ddpm train --config {} --out {}`",
            config.display(),
            run.display()
        ),
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    let result = match command {
        Command::Train {
            preset,
            config,
            out,
            resume,
            strict_data,
            stop_at,
            overrides,
        } => {
            match commands::train(TrainArgs {
                preset,
                config_file: config,
                out,
                resume,
                strict_data,
                stop_at,
                overrides,
            }) {
                Ok(true) => return Ok(ExitCode::from(130)),
                other => other.map(|_| ()),
            }
        }
        Command::Sample {
            checkpoint,
            num,
            out,
            out_dir,
            animate,
            sampler,
            steps,
            eta,
            classes,
            guidance,
            seed,
            batch,
            weights,
            device,
        } => commands::sample(SampleArgs {
            checkpoint,
            num,
            seed,
            batch,
            ema: weights == "ema",
            device,
            grid: out,
            folder: out_dir,
            animation: animate,
            classes,
            settings: SampleSettings {
                sampler,
                steps,
                eta,
                guidance,
            },
        }),
        Command::Bench(args) => commands::bench(args).map(|line| println!("{line}")),
        Command::Export {
            checkpoint,
            format: _,
            out,
            weights,
        } => commands::export(commands::ExportArgs {
            checkpoint,
            out,
            ema: weights == "ema",
        }),
        Command::Import { from, out } => commands::import(&from, &out),
        Command::Launch {
            nproc,
            master_port,
            timeout,
            args,
        } => {
            let grace = std::time::Duration::from_secs(30);
            match ddpm::distributed::launch_local(nproc, master_port, timeout, &args, grace) {
                Ok(0) => Ok(()),
                Ok(code) => return Ok(ExitCode::from(code.clamp(1, 255) as u8)),
                Err(e) => Err(e),
            }
        }
        Command::Model {
            preset,
            config,
            checkpoint,
        } => commands::model_summary(preset.as_deref(), config.as_deref(), checkpoint.as_deref())
            .map(|s| print!("{s}")),
        Command::Fid(args) => commands::fid(args).map(|line| println!("{line}")),
        Command::Watch(args) => commands::watch(args).map(|line| println!("{line}")),
        Command::Nearest(args) => commands::nearest(args).map(|line| println!("{line}")),
        Command::Ema(args) => commands::ema(args).map(|line| println!("{line}")),
        Command::Shards(args) => commands::shards(args).map(|line| println!("{line}")),
    };
    result.map(|()| ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn no_two_flags_of_a_command_share_an_id() {
        // Flattened argument groups may repeat a field name; clap only checks that in debug
        // builds, and a release build would mix the two flags' values.
        let cli = <super::Cli as clap::CommandFactory>::command();
        for command in cli.get_subcommands() {
            let mut ids: Vec<&str> = command
                .get_arguments()
                .map(|a| a.get_id().as_str())
                .collect();
            ids.sort();
            let repeated: Vec<_> = ids.windows(2).filter(|w| w[0] == w[1]).collect();
            assert!(repeated.is_empty(), "{}: {repeated:?}", command.get_name());
        }
    }
}

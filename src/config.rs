//! Run configuration: presets, the TOML file, command-line overrides, and validation that runs
//! before any work starts and names the offending key.
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// A type error in the merged configuration as `section.key = value: what was expected`: its
/// line numbers would point into the merged text, not the user's file.
fn name_the_key(error: &toml::de::Error, merged: &str) -> anyhow::Error {
    let Some(span) = error.span() else {
        return anyhow::anyhow!("{}", error.message());
    };
    let before = &merged[..span.start.min(merged.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = merged[line_start..].lines().next().unwrap_or("");
    let section = before
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix('[')?.strip_suffix(']'))
        .map_or(String::new(), |name| format!("{name}."));
    // Rust's type names, as a user writes numbers.
    let message = [
        ("usize", "a whole number ≥ 0"),
        ("u64", "a whole number ≥ 0"),
        ("u32", "a whole number ≥ 0"),
        ("i64", "a whole number"),
        ("f64", "a number"),
    ]
    .iter()
    .fold(error.message().to_string(), |m, (rust, plain)| {
        m.replace(&format!("expected {rust}"), &format!("expected {plain}"))
    });
    match line.split_once('=') {
        Some((key, value)) => {
            anyhow::anyhow!("{section}{} = {}: {message}", key.trim(), value.trim())
        }
        None => anyhow::anyhow!("{section}: {message}"),
    }
}

/// Height and width of the training images. Written `32` (square) or `[32, 64]` (height, width);
/// `[32, 32]` is the same size as `32`, and is written as `32`.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(untagged, expecting = "an image size: N (square) or [H, W]")]
pub enum ImageSize {
    Square(i64),
    Rect([i64; 2]),
}

impl PartialEq for ImageSize {
    fn eq(&self, other: &Self) -> bool {
        (self.height(), self.width()) == (other.height(), other.width())
    }
}

impl Eq for ImageSize {}

impl Serialize for ImageSize {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        match (self.height(), self.width()) {
            (h, w) if h == w => serializer.serialize_i64(h),
            (h, w) => [h, w].serialize(serializer),
        }
    }
}

impl ImageSize {
    pub fn height(self) -> i64 {
        match self {
            ImageSize::Square(s) => s,
            ImageSize::Rect([h, _]) => h,
        }
    }
    pub fn width(self) -> i64 {
        match self {
            ImageSize::Square(s) => s,
            ImageSize::Rect([_, w]) => w,
        }
    }
}

impl fmt::Display for ImageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.height(), self.width()) {
            (h, w) if h == w => write!(f, "{h}"),
            (h, w) => write!(f, "{h}x{w}"),
        }
    }
}

impl FromStr for ImageSize {
    type Err = String;
    /// `32` or `HxW`, e.g. `32x64`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parse = |v: &str| {
            v.trim()
                .parse::<i64>()
                .map_err(|_| format!("bad image size {s:?}: expected N or HxW"))
        };
        match s.split_once(['x', 'X']) {
            Some((h, w)) => Ok(ImageSize::Rect([parse(h)?, parse(w)?])),
            None => Ok(ImageSize::Square(parse(s)?)),
        }
    }
}

/// The UNet's shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Base channel count; level `i` has `channels * channel_mult[i]` channels.
    pub channels: i64,
    pub channel_mult: Vec<i64>,
    /// Residual blocks per level on the way down (the way up has one more).
    pub num_res_blocks: i64,
    /// Feature-map sizes (the shorter side) at which self-attention follows each residual block.
    pub attention_resolutions: Vec<i64>,
    pub dropout: f64,
    /// 1 (grayscale) or 3 (RGB).
    pub in_channels: i64,
    pub image_size: ImageSize,
    /// How the stride-2 downsampling convs pad.
    #[serde(default)]
    pub downsample_padding: DownsamplePadding,
}

impl ModelConfig {
    /// The shape [n, C, H, W] of n images for this model.
    pub fn batch_shape(&self, n: usize) -> [i64; 4] {
        [
            n as i64,
            self.in_channels,
            self.image_size.height(),
            self.image_size.width(),
        ]
    }
}

/// Padding of the stride-2 downsampling convs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DownsamplePadding {
    /// One pixel on every side (PyTorch ports of DDPM; diffusers' `downsample_padding = 1`).
    #[default]
    Symmetric,
    /// One pixel on the bottom and right only: TensorFlow's SAME padding, as in the original
    /// DDPM code and `google/ddpm-*` (diffusers' `downsample_padding = 0`).
    BottomRight,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    Linear,
    Cosine,
    Sigmoid,
}

/// What the network predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Prediction {
    /// The noise ε (Ho et al. 2020).
    Epsilon,
    /// The clean image x₀.
    X0,
    /// v = √ᾱ ε − √(1−ᾱ) x₀ (Salimans & Ho 2022).
    V,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LossWeighting {
    None,
    /// w = 1 / (1 − ᾱ_t)
    InvOneMinusAlphabar,
    /// w = SNR(t) = ᾱ_t / (1 − ᾱ_t)
    Snr,
    /// Min-SNR-γ (Hang et al. 2023), written for the prediction target.
    MinSnr,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffusionConfig {
    /// Number of diffusion steps T.
    pub timesteps: usize,
    pub schedule: ScheduleKind,
    /// β at t = 0 and t = T−1 for the linear and sigmoid schedules.
    pub beta_start: f64,
    pub beta_end: f64,
    /// The cosine schedule's offset s.
    pub cosine_s: f64,
    pub prediction: Prediction,
    pub loss_weighting: LossWeighting,
    pub min_snr_gamma: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LrSchedule {
    /// Linear warm-up, then cosine annealing to `min_lr` at the last step.
    Cosine,
    /// Linear warm-up, then constant.
    Constant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    F32,
    /// f32 storage with TF32 tensor-core matmuls and convolutions (CUDA only).
    Tf32,
    /// bf16 autocast.
    Bf16,
    /// f32 weights and optimizer; the network runs forward and backward in bf16 throughout
    /// (weights cast once per step, no per-op casts), gradients summed in f32.
    Bf16Pure,
    /// fp16 autocast with dynamic loss scaling.
    Fp16,
}

/// The name config files and the command line use for a setting's value, e.g. "bf16-pure".
pub fn value_name(value: &impl clap::ValueEnum) -> String {
    value
        .to_possible_value()
        .expect("every value has a name")
        .get_name()
        .to_string()
}

impl Precision {
    /// The name config files and the command line use, e.g. "bf16-pure".
    pub fn name(self) -> String {
        value_name(&self)
    }
}

/// A speed lever's setting. `auto` (the default) uses it where it can run; `true` insists, and
/// is refused where it cannot run; `false` leaves it off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Lever {
    #[default]
    Auto,
    #[value(name = "true")]
    On,
    #[value(name = "false")]
    Off,
}

impl From<bool> for Lever {
    fn from(on: bool) -> Self {
        if on {
            Lever::On
        } else {
            Lever::Off
        }
    }
}

impl Serialize for Lever {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Lever::Auto => serializer.serialize_str("auto"),
            Lever::On => serializer.serialize_bool(true),
            Lever::Off => serializer.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for Lever {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "lowercase")]
        enum Word {
            Auto,
        }
        #[derive(Deserialize)]
        #[serde(untagged, expecting = "true, false or \"auto\"")]
        enum Written {
            Bool(bool),
            Word(Word),
        }
        Ok(match Written::deserialize(deserializer)? {
            Written::Bool(true) => Lever::On,
            Written::Bool(false) => Lever::Off,
            Written::Word(Word::Auto) => Lever::Auto,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps in the run.
    pub steps: u64,
    /// Images per optimizer step (split into `grad_accum` micro-batches).
    pub batch: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub lr_schedule: LrSchedule,
    pub warmup_steps: u64,
    pub min_lr: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub weight_decay: f64,
    /// Maximum global gradient norm; 0 disables clipping.
    pub grad_clip: f64,
    pub ema_decay: f64,
    /// decay_n = min(decay, (1 + n) / (10 + n)) when on.
    pub ema_warmup: bool,
    pub ema_every: u64,
    pub precision: Precision,
    pub seed: u64,
    /// auto, cpu, cuda, cuda:N or mps.
    pub device: String,
    pub log_every: u64,
    /// After this many non-finite steps in a row, roll back to the last checkpoint; 0 never.
    pub max_bad_steps: u64,
    /// The learning rate is multiplied by this at each rollback.
    pub rollback_lr_factor: f64,
    /// Keep weights and activations in channels-last (NHWC) memory order: faster convolutions
    /// on some GPUs (tensor cores), slower on CPUs.
    #[serde(default)]
    pub channels_last: bool,
    /// Record the forward and backward pass as a CUDA graph after a few steps and replay it:
    /// one launch instead of thousands of small kernels (CUDA, one process).
    #[serde(default)]
    pub cuda_graph: Lever,
    /// Run each GroupNorm+SiLU pair as one fused kernel, forward and backward (CUDA; f32 and
    /// bf16 activations in NCHW order).
    #[serde(default)]
    pub fused_norm_silu: Lever,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// Detect from the path.
    Auto,
    /// The 5,000 MNIST digits compiled into the program.
    Bundled,
    Folder,
    /// data_batch_1.bin … data_batch_5.bin, test_batch.bin
    Cifar10,
    /// train.bin, test.bin (CIFAR-100 binary version)
    Cifar100,
    Idx,
}

/// Which part of a dataset with a fixed train/test split to use (CIFAR, MNIST's IDX files).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Split {
    Train,
    Test,
    All,
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&value_name(self))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Empty: the bundled MNIST subset.
    pub path: String,
    pub format: DataFormat,
    /// train, test or all (CIFAR binaries, a folder of MNIST IDX files).
    pub split: Split,
    pub hflip: bool,
    /// Strength of brightness/contrast/saturation jitter; 0 disables.
    pub color_jitter: f64,
    /// Threads that read and decode batches ahead of the training step; 0: one per core.
    #[serde(default)]
    pub workers: usize,
    /// Batches read ahead of the training step.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// Keep decoded images in memory: on, off (decode every epoch), or auto (when they fit).
    #[serde(default)]
    pub cache: DataCache,
}

fn default_prefetch() -> usize {
    4
}

/// Whether decoded images are kept in memory between epochs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DataCache {
    /// Cache when the decoded set takes at most half of the available memory.
    #[default]
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SamplerKind {
    /// Ancestral sampling over all T steps.
    Ddpm,
    /// Deterministic (η = 0) or stochastic DDIM over any number of steps.
    Ddim,
}

impl std::fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SamplerKind::Ddpm => "ddpm",
            SamplerKind::Ddim => "ddim",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DdpmVariance {
    /// σ² = β_t
    Beta,
    /// σ² = β̃_t, the posterior variance.
    Posterior,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleConfig {
    /// Write a sample grid every this many steps; 0: only at the end.
    pub every: u64,
    pub num: usize,
    pub sampler: SamplerKind,
    /// DDIM steps.
    pub steps: usize,
    pub eta: f64,
    pub ddpm_variance: DdpmVariance,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every this many steps; 0: only at the end.
    pub every: u64,
    /// Checkpoints kept (oldest removed first).
    pub keep: usize,
    /// Checkpoints at multiples of this step are never removed; 0: none.
    pub pin_every: u64,
}

/// FID measured during training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FidConfig {
    /// Measure every this many steps; 0: never.
    pub every: u64,
    /// Generated images per measurement (EMA weights, the run's sampler settings).
    pub num: usize,
    /// Images per Inception forward pass.
    pub batch: usize,
    /// The Inception file; empty: $DDPM_INCEPTION, else the cache (tools/get_inception.sh).
    pub inception: String,
}

impl Default for FidConfig {
    fn default() -> Self {
        FidConfig {
            every: 0,
            num: 10_000,
            batch: 50,
            inception: String::new(),
        }
    }
}

/// Everything a run needs, with every key documented in the README.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub preset: String,
    pub model: ModelConfig,
    pub diffusion: DiffusionConfig,
    pub train: TrainConfig,
    pub data: DataConfig,
    pub sample: SampleConfig,
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub fid: FidConfig,
}

pub const PRESETS: [&str; 3] = ["cifar10", "mnist", "tiny"];

impl RunConfig {
    /// The named preset's full configuration.
    pub fn preset(name: &str) -> Result<Self> {
        let base = Self::base();
        let config = match name {
            "cifar10" => RunConfig {
                preset: name.into(),
                model: ModelConfig {
                    channels: 128,
                    channel_mult: vec![1, 2, 2, 2],
                    num_res_blocks: 2,
                    attention_resolutions: vec![16],
                    dropout: 0.1,
                    in_channels: 3,
                    image_size: ImageSize::Square(32),
                    downsample_padding: DownsamplePadding::Symmetric,
                },
                diffusion: DiffusionConfig {
                    loss_weighting: LossWeighting::None,
                    ..base.diffusion
                },
                train: TrainConfig {
                    steps: 500_000,
                    batch: 128,
                    lr: 2e-4,
                    warmup_steps: 5000,
                    ema_decay: 0.9999,
                    ..base.train
                },
                data: DataConfig {
                    hflip: true,
                    ..base.data
                },
                sample: SampleConfig {
                    every: 10_000,
                    steps: 50,
                    eta: 0.0,
                    ..base.sample
                },
                checkpoint: CheckpointConfig {
                    every: 10_000,
                    ..base.checkpoint
                },
                ..base
            },
            "mnist" => RunConfig {
                preset: name.into(),
                model: ModelConfig {
                    channels: 64,
                    channel_mult: vec![1, 2, 2],
                    num_res_blocks: 2,
                    attention_resolutions: vec![14],
                    dropout: 0.1,
                    in_channels: 1,
                    image_size: ImageSize::Square(28),
                    downsample_padding: DownsamplePadding::Symmetric,
                },
                diffusion: DiffusionConfig {
                    loss_weighting: LossWeighting::None,
                    ..base.diffusion
                },
                train: TrainConfig {
                    steps: 50_000,
                    batch: 128,
                    lr: 2e-4,
                    warmup_steps: 1000,
                    ema_decay: 0.9999,
                    ..base.train
                },
                sample: SampleConfig {
                    every: 5000,
                    steps: 50,
                    eta: 0.0,
                    ..base.sample
                },
                checkpoint: CheckpointConfig {
                    every: 5000,
                    ..base.checkpoint
                },
                ..base
            },
            "tiny" => base,
            other => bail!(
                "unknown preset {other:?}: expected one of {}",
                PRESETS.join(", ")
            ),
        };
        Ok(config)
    }

    /// The `tiny` preset: a 1.06M-parameter UNet for digits at 16×16, tuned so that the bundled
    /// demo learns legible digits in minutes on a 2-core CPU: at 16×16 a step costs a third of
    /// one at 28×28, so the same minutes buy 2.5× the steps; a high learning rate; min-SNR-5 loss
    /// weighting (faster convergence); and stochastic DDIM (η = 1, 100 steps), which forgives an
    /// undertrained model more than deterministic DDIM. The other presets keep the DDPM recipe
    /// (unweighted ε loss) and inherit the rest from here.
    fn base() -> Self {
        RunConfig {
            preset: "tiny".into(),
            model: ModelConfig {
                channels: 32,
                channel_mult: vec![1, 2, 2],
                num_res_blocks: 1,
                attention_resolutions: vec![],
                dropout: 0.0,
                in_channels: 1,
                image_size: ImageSize::Square(16),
                downsample_padding: DownsamplePadding::Symmetric,
            },
            diffusion: DiffusionConfig {
                timesteps: 1000,
                schedule: ScheduleKind::Linear,
                beta_start: 1e-4,
                beta_end: 0.02,
                cosine_s: 0.008,
                prediction: Prediction::Epsilon,
                loss_weighting: LossWeighting::MinSnr,
                min_snr_gamma: 5.0,
            },
            train: TrainConfig {
                steps: 3000,
                batch: 64,
                grad_accum: 1,
                lr: 1e-3,
                lr_schedule: LrSchedule::Cosine,
                warmup_steps: 200,
                min_lr: 0.0,
                adam_beta1: 0.9,
                adam_beta2: 0.999,
                adam_eps: 1e-8,
                weight_decay: 0.01,
                grad_clip: 1.0,
                ema_decay: 0.999,
                ema_warmup: true,
                ema_every: 1,
                precision: Precision::F32,
                seed: 0,
                device: "auto".into(),
                log_every: 50,
                max_bad_steps: 10,
                rollback_lr_factor: 0.5,
                channels_last: false,
                cuda_graph: Lever::Auto,
                fused_norm_silu: Lever::Auto,
            },
            data: DataConfig {
                path: String::new(),
                format: DataFormat::Auto,
                split: Split::Train,
                hflip: false,
                color_jitter: 0.0,
                workers: 0,
                prefetch: default_prefetch(),
                cache: DataCache::Auto,
            },
            sample: SampleConfig {
                every: 1000,
                num: 64,
                sampler: SamplerKind::Ddim,
                steps: 100,
                eta: 1.0,
                ddpm_variance: DdpmVariance::Beta,
            },
            checkpoint: CheckpointConfig {
                every: 1000,
                keep: 3,
                pin_every: 0,
            },
            fid: FidConfig::default(),
        }
    }

    /// Reads a TOML file. The base is `preset` if given, else the file's `preset` key, else
    /// `tiny`; every other key in the file overrides the base. Unknown keys are errors.
    pub fn from_toml_file(path: &Path, preset: Option<&str>) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::from_toml_str(&text, preset)
            .with_context(|| format!("in config file {}", path.display()))
    }

    pub fn from_toml_str(text: &str, preset: Option<&str>) -> Result<Self> {
        let mut user: toml::Table = toml::from_str(text)?;
        let preset = match (preset, user.remove("preset")) {
            (Some(name), _) => name.to_string(),
            (None, Some(toml::Value::String(name))) => name,
            (None, Some(other)) => bail!("key `preset`: expected a string, got {other}"),
            (None, None) => "tiny".to_string(),
        };
        let mut merged = toml::Table::try_from(Self::preset(&preset)?)?;
        merge(&mut merged, user, "")?;
        // Parsing the merged text (not the value) locates type errors, which then name the key.
        let merged = toml::to_string(&merged)?;
        toml::from_str(&merged).map_err(|e| name_the_key(&e, &merged))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a RunConfig always serialises")
    }

    /// What a training run allocates, checked before it starts: each data worker is a thread,
    /// each prefetched batch a buffer, and a grid of more than 32 × 32 images would take long
    /// and show little (`ddpm sample` makes any number). Not part of `validate`, so that any
    /// checkpoint stays readable.
    pub fn check_run_resources(&self) -> Result<()> {
        let (data, s) = (&self.data, &self.sample);
        check(
            data.workers <= 256,
            "data.workers",
            data.workers,
            "≤ 256 (0: one per core)",
        )?;
        check(
            data.prefetch <= 64,
            "data.prefetch",
            data.prefetch,
            "in [1, 64]",
        )?;
        check(s.num <= 1024, "sample.num", s.num, "in [1, 1024]")
    }

    /// Checks every key against its allowed range; the error names key, value and what is allowed.
    pub fn validate(&self) -> Result<()> {
        // Flags take any u64; the config is written as TOML, whose integers are i64.
        let values = serde_json::to_value(self)?;
        if let Some((key, value)) = integer_beyond_toml("", &values) {
            check(false, &key, value, &format!("≤ {}", i64::MAX))?;
        }
        let m = &self.model;
        check(
            m.channels >= 4 && m.channels % 2 == 0,
            "model.channels",
            m.channels,
            "an even number ≥ 4 (the time embedding is half sines, half cosines, of at least two frequencies)",
        )?;
        check(
            !m.channel_mult.is_empty() && m.channel_mult.iter().all(|&c| c >= 1),
            "model.channel_mult",
            format!("{:?}", m.channel_mult),
            "a non-empty list of integers ≥ 1",
        )?;
        check(
            m.num_res_blocks >= 1,
            "model.num_res_blocks",
            m.num_res_blocks,
            "≥ 1",
        )?;
        check(
            (0.0..1.0).contains(&m.dropout),
            "model.dropout",
            m.dropout,
            "in [0, 1)",
        )?;
        check(
            m.in_channels == 1 || m.in_channels == 3,
            "model.in_channels",
            m.in_channels,
            "1 or 3",
        )?;
        let (h, w) = (m.image_size.height(), m.image_size.width());
        let factor = 1i64 << (m.channel_mult.len() - 1);
        check(
            h >= 1 && w >= 1 && h % factor == 0 && w % factor == 0,
            "model.image_size",
            m.image_size,
            &format!(
                "positive sides divisible by 2^(levels-1) = {factor} for {} levels",
                m.channel_mult.len()
            ),
        )?;
        let sizes: Vec<i64> = (0..m.channel_mult.len()).map(|l| h.min(w) >> l).collect();
        for r in &m.attention_resolutions {
            check(
                sizes.contains(r),
                "model.attention_resolutions",
                r,
                &format!("feature-map sizes of this model: {sizes:?}; --attn-res sets them"),
            )?;
        }
        let d = &self.diffusion;
        // The schedule tables hold a few f64 per step; 10⁵ covers every published T by far.
        check(
            (2..=100_000).contains(&d.timesteps),
            "diffusion.timesteps",
            d.timesteps,
            "in [2, 100000]",
        )?;
        check(
            d.beta_start > 0.0 && d.beta_start < 1.0,
            "diffusion.beta_start",
            d.beta_start,
            "in (0, 1)",
        )?;
        check(
            d.beta_end > 0.0 && d.beta_end < 1.0,
            "diffusion.beta_end",
            d.beta_end,
            "in (0, 1)",
        )?;
        check(
            d.beta_start <= d.beta_end,
            "diffusion.beta_start",
            d.beta_start,
            "≤ diffusion.beta_end",
        )?;
        check(d.cosine_s > 0.0, "diffusion.cosine_s", d.cosine_s, "> 0")?;
        check(
            d.min_snr_gamma > 0.0,
            "diffusion.min_snr_gamma",
            d.min_snr_gamma,
            "> 0",
        )?;
        let t = &self.train;
        check(t.steps >= 1, "train.steps", t.steps, "≥ 1")?;
        check(t.batch >= 1, "train.batch", t.batch, "≥ 1")?;
        check(
            t.grad_accum >= 1 && t.batch.is_multiple_of(t.grad_accum),
            "train.grad_accum",
            t.grad_accum,
            &format!("≥ 1 and a divisor of train.batch ({})", t.batch),
        )?;
        check(t.lr > 0.0 && t.lr < 1.0, "train.lr", t.lr, "in (0, 1)")?;
        check(
            t.min_lr >= 0.0 && t.min_lr <= t.lr,
            "train.min_lr",
            t.min_lr,
            "in [0, train.lr]",
        )?;
        check(
            (0.0..1.0).contains(&t.adam_beta1),
            "train.adam_beta1",
            t.adam_beta1,
            "in [0, 1)",
        )?;
        check(
            (0.0..1.0).contains(&t.adam_beta2),
            "train.adam_beta2",
            t.adam_beta2,
            "in [0, 1)",
        )?;
        // The optimizer computes in f32, where a smaller ε is 0 and 0/0 makes NaN weights.
        check(
            t.adam_eps >= f32::MIN_POSITIVE as f64,
            "train.adam_eps",
            t.adam_eps,
            "≥ 1.2e-38 (f32's smallest normal number)",
        )?;
        check(
            t.weight_decay >= 0.0,
            "train.weight_decay",
            t.weight_decay,
            "≥ 0",
        )?;
        check(
            t.grad_clip >= 0.0,
            "train.grad_clip",
            t.grad_clip,
            "≥ 0 (0 disables)",
        )?;
        check(
            t.ema_decay > 0.0 && t.ema_decay < 1.0,
            "train.ema_decay",
            t.ema_decay,
            "in (0, 1)",
        )?;
        check(t.ema_every >= 1, "train.ema_every", t.ema_every, "≥ 1")?;
        check(t.log_every >= 1, "train.log_every", t.log_every, "≥ 1")?;
        crate::device::parse(&t.device)
            .with_context(|| format!("train.device = {:?}", t.device))?;
        let data = &self.data;
        check(
            (0.0..=0.5).contains(&data.color_jitter),
            "data.color_jitter",
            data.color_jitter,
            "in [0, 0.5]",
        )?;
        check(data.prefetch >= 1, "data.prefetch", data.prefetch, "≥ 1")?;
        let s = &self.sample;
        check(s.num >= 1, "sample.num", s.num, "≥ 1")?;
        check(
            s.steps >= 1 && s.steps <= d.timesteps,
            "sample.steps",
            s.steps,
            &format!("in [1, diffusion.timesteps = {}]", d.timesteps),
        )?;
        check(
            (0.0..=1.0).contains(&s.eta),
            "sample.eta",
            s.eta,
            "in [0, 1]",
        )?;
        check(
            self.checkpoint.keep >= 1,
            "checkpoint.keep",
            self.checkpoint.keep,
            "≥ 1",
        )?;
        check(self.fid.num >= 2, "fid.num", self.fid.num, "≥ 2")?;
        check(self.fid.batch >= 1, "fid.batch", self.fid.batch, "≥ 1")?;
        check(
            t.rollback_lr_factor > 0.0 && t.rollback_lr_factor <= 1.0,
            "train.rollback_lr_factor",
            t.rollback_lr_factor,
            "in (0, 1]",
        )?;
        Ok(())
    }

    /// Where the data comes from, as given.
    pub fn data_path(&self) -> Option<PathBuf> {
        (!self.data.path.is_empty()).then(|| PathBuf::from(&self.data.path))
    }

    /// Makes a relative data path absolute (from the working directory), so that the run's
    /// configuration and checkpoints name the same data wherever the run is resumed from.
    pub fn make_data_path_absolute(&mut self) -> Result<()> {
        if let Some(path) = self.data_path().filter(|p| p.is_relative()) {
            let absolute = std::path::absolute(&path)
                .with_context(|| format!("cannot make data path {} absolute", path.display()))?;
            self.data.path = absolute.to_string_lossy().into_owned();
        }
        Ok(())
    }
}

/// A command-line count that must be at least 1.
pub fn positive_count<T: std::str::FromStr + PartialOrd + From<u8>>(
    text: &str,
) -> std::result::Result<T, String> {
    match text.parse::<T>() {
        Ok(n) if n >= T::from(1) => Ok(n),
        _ => Err(format!("expected an integer ≥ 1, got {text:?}")),
    }
}

/// A command-line duration in milliseconds: finite, from 0 to 10 minutes.
pub fn milliseconds(text: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (0.0..=600_000.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "expected milliseconds from 0 to 600000, got {text:?}"
        )),
    }
}

/// A command-line number in [0, 1].
pub fn unit_interval(text: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("expected a number in [0, 1], got {text:?}")),
    }
}

/// A comma-separated list of integers on the command line, e.g. `1,2,2,2`; empty: none.
#[derive(Clone, Debug, PartialEq)]
pub struct IntList(pub Vec<i64>);

impl FromStr for IntList {
    type Err = String;
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        text.split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| format!("{v:?} is not an integer (expected e.g. 1,2,2,2)"))
            })
            .collect::<std::result::Result<_, _>>()
            .map(IntList)
    }
}

/// Flags that shape the network, named as the PyTorch baseline script names them (`train` and
/// `bench` take them alike).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct NetworkArgs {
    /// Base channels [model.channels]
    #[arg(long = "ch")]
    pub base_channels: Option<i64>,
    /// Channel multiplier per level, e.g. 1,2,2,2 [model.channel_mult]
    #[arg(long = "ch-mult")]
    pub channel_mult: Option<IntList>,
    /// Residual blocks per level [model.num_res_blocks]
    #[arg(long)]
    pub num_res_blocks: Option<i64>,
    /// Feature-map sizes with self-attention, e.g. 16 or 16,8 ("": none)
    /// [model.attention_resolutions]
    #[arg(long = "attn-res")]
    pub attention_resolutions: Option<IntList>,
    /// [model.dropout]
    #[arg(long)]
    pub dropout: Option<f64>,
}

impl NetworkArgs {
    pub fn apply(&self, m: &mut ModelConfig) {
        if let Some(v) = self.base_channels {
            m.channels = v;
        }
        if let Some(IntList(v)) = &self.channel_mult {
            m.channel_mult = v.clone();
        }
        if let Some(v) = self.num_res_blocks {
            m.num_res_blocks = v;
        }
        if let Some(IntList(v)) = &self.attention_resolutions {
            m.attention_resolutions = v.clone();
        }
        if let Some(v) = self.dropout {
            m.dropout = v;
        }
    }
}

/// Command-line overrides of configuration keys; each flag sets the key named in its help.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Overrides {
    /// Images: a folder, a CIFAR-10/100 binaries folder or an IDX file [data.path; default: the bundled MNIST subset]
    #[arg(long)]
    pub data: Option<String>,
    /// Force the data format instead of detecting it [data.format]
    #[arg(long, value_enum)]
    pub data_format: Option<DataFormat>,
    /// train, test or all, for CIFAR binaries and a folder of MNIST IDX files [data.split]
    #[arg(long, value_enum)]
    pub split: Option<Split>,
    /// Image channels, 1 or 3 [model.in_channels]
    #[arg(long)]
    pub channels: Option<i64>,
    /// Training size, N or HxW [model.image_size]
    #[arg(long)]
    pub image_size: Option<ImageSize>,
    #[command(flatten)]
    pub network: NetworkArgs,
    /// Optimizer steps [train.steps]
    #[arg(long)]
    pub steps: Option<u64>,
    /// Run length in epochs over the data instead of --steps (in total, from step 0, also when
    /// resuming)
    #[arg(long, conflicts_with = "steps", value_parser = positive_count::<u64>)]
    pub epochs: Option<u64>,
    /// Images per optimizer step [train.batch]
    #[arg(long)]
    pub batch: Option<usize>,
    /// Micro-batches per optimizer step [train.grad_accum]
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Peak learning rate [train.lr]
    #[arg(long)]
    pub lr: Option<f64>,
    /// [train.lr_schedule]
    #[arg(long, value_enum)]
    pub lr_schedule: Option<LrSchedule>,
    /// [train.warmup_steps]
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// [train.min_lr]
    #[arg(long)]
    pub min_lr: Option<f64>,
    /// [train.adam_beta1]
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    /// [train.adam_beta2]
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    /// [train.adam_eps]
    #[arg(long)]
    pub adam_eps: Option<f64>,
    /// [train.weight_decay]
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// [train.ema_decay]
    #[arg(long)]
    pub ema_decay: Option<f64>,
    /// EMA decay warm-up, true or false [train.ema_warmup]
    #[arg(long)]
    pub ema_warmup: Option<bool>,
    /// [train.ema_every]
    #[arg(long)]
    pub ema_every: Option<u64>,
    /// [train.grad_clip]; 0 disables
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// [train.precision]
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// Channels-last memory order, true or false [train.channels_last]
    #[arg(long)]
    pub channels_last: Option<bool>,
    /// Replay the forward and backward pass as a CUDA graph; alone: true [train.cuda_graph]
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "true")]
    pub cuda_graph: Option<Lever>,
    /// One fused kernel per GroupNorm+SiLU; alone: true [train.fused_norm_silu]
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "true")]
    pub fused_norm_silu: Option<Lever>,
    /// [train.seed]
    #[arg(long)]
    pub seed: Option<u64>,
    /// auto, cpu, cuda, cuda:N or mps [train.device]
    #[arg(long)]
    pub device: Option<String>,
    /// [train.log_every]
    #[arg(long)]
    pub log_every: Option<u64>,
    /// [diffusion.timesteps]
    #[arg(long)]
    pub timesteps: Option<usize>,
    /// [diffusion.schedule]
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleKind>,
    /// [diffusion.prediction]
    #[arg(long, value_enum)]
    pub prediction: Option<Prediction>,
    /// [diffusion.loss_weighting]
    #[arg(long, value_enum)]
    pub loss_weighting: Option<LossWeighting>,
    /// [diffusion.min_snr_gamma]
    #[arg(long)]
    pub min_snr_gamma: Option<f64>,
    /// Random horizontal flips, true or false [data.hflip]
    #[arg(long)]
    pub hflip: Option<bool>,
    /// Colour jitter strength, 0 disables [data.color_jitter]
    #[arg(long)]
    pub color_jitter: Option<f64>,
    /// Data loading threads, 0: one per core [data.workers]
    #[arg(long)]
    pub workers: Option<usize>,
    /// Batches read ahead [data.prefetch]
    #[arg(long)]
    pub prefetch: Option<usize>,
    /// Keep decoded images in memory: auto, on or off [data.cache]
    #[arg(long, value_enum)]
    pub data_cache: Option<DataCache>,
    /// Sample grid interval in steps [sample.every]
    #[arg(long)]
    pub sample_every: Option<u64>,
    /// Images per sample grid [sample.num]
    #[arg(long)]
    pub sample_num: Option<usize>,
    /// Sampler of the grids [sample.sampler]
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerKind>,
    /// DDIM steps of the grids [sample.steps]
    #[arg(long)]
    pub sample_steps: Option<usize>,
    /// DDIM η of the grids: 0 deterministic, 1 as stochastic as DDPM [sample.eta]
    #[arg(long)]
    pub eta: Option<f64>,
    /// Checkpoint interval in steps [checkpoint.every]
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Checkpoints kept [checkpoint.keep]
    #[arg(long)]
    pub keep: Option<usize>,
    /// Never remove checkpoints at multiples of this step [checkpoint.pin_every]
    #[arg(long)]
    pub pin_every: Option<u64>,
    /// Roll back after this many non-finite steps in a row; 0 never [train.max_bad_steps]
    #[arg(long)]
    pub max_bad_steps: Option<u64>,
    /// Measure FID every this many steps; 0 never [fid.every]
    #[arg(long)]
    pub fid_every: Option<u64>,
    /// Generated images per FID measurement [fid.num]
    #[arg(long)]
    pub fid_num: Option<usize>,
}

impl Overrides {
    /// Applies the flags that were given (--epochs is resolved once the data is loaded).
    pub fn apply(&self, c: &mut RunConfig) {
        fn set<T: Clone>(slot: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *slot = v.clone();
            }
        }
        set(&mut c.data.path, &self.data);
        set(&mut c.data.format, &self.data_format);
        set(&mut c.data.split, &self.split);
        set(&mut c.model.in_channels, &self.channels);
        set(&mut c.model.image_size, &self.image_size);
        self.network.apply(&mut c.model);
        set(&mut c.train.steps, &self.steps);
        set(&mut c.train.batch, &self.batch);
        set(&mut c.train.grad_accum, &self.grad_accum);
        set(&mut c.train.channels_last, &self.channels_last);
        set(&mut c.train.cuda_graph, &self.cuda_graph);
        set(&mut c.train.fused_norm_silu, &self.fused_norm_silu);
        set(&mut c.train.lr, &self.lr);
        set(&mut c.train.lr_schedule, &self.lr_schedule);
        set(&mut c.train.warmup_steps, &self.warmup_steps);
        set(&mut c.train.min_lr, &self.min_lr);
        set(&mut c.train.adam_beta1, &self.adam_beta1);
        set(&mut c.train.adam_beta2, &self.adam_beta2);
        set(&mut c.train.adam_eps, &self.adam_eps);
        set(&mut c.train.weight_decay, &self.weight_decay);
        set(&mut c.train.ema_decay, &self.ema_decay);
        set(&mut c.train.ema_warmup, &self.ema_warmup);
        set(&mut c.train.ema_every, &self.ema_every);
        set(&mut c.train.grad_clip, &self.grad_clip);
        set(&mut c.train.precision, &self.precision);
        set(&mut c.train.seed, &self.seed);
        set(&mut c.train.device, &self.device);
        set(&mut c.train.log_every, &self.log_every);
        set(&mut c.diffusion.timesteps, &self.timesteps);
        set(&mut c.diffusion.schedule, &self.schedule);
        set(&mut c.diffusion.prediction, &self.prediction);
        set(&mut c.diffusion.loss_weighting, &self.loss_weighting);
        set(&mut c.diffusion.min_snr_gamma, &self.min_snr_gamma);
        set(&mut c.data.hflip, &self.hflip);
        set(&mut c.data.color_jitter, &self.color_jitter);
        set(&mut c.data.workers, &self.workers);
        set(&mut c.data.prefetch, &self.prefetch);
        set(&mut c.data.cache, &self.data_cache);
        set(&mut c.sample.every, &self.sample_every);
        set(&mut c.sample.num, &self.sample_num);
        set(&mut c.sample.sampler, &self.sampler);
        set(&mut c.sample.steps, &self.sample_steps);
        set(&mut c.sample.eta, &self.eta);
        set(&mut c.checkpoint.every, &self.checkpoint_every);
        set(&mut c.checkpoint.keep, &self.keep);
        set(&mut c.checkpoint.pin_every, &self.pin_every);
        set(&mut c.train.max_bad_steps, &self.max_bad_steps);
        set(&mut c.fid.every, &self.fid_every);
        set(&mut c.fid.num, &self.fid_num);
    }
}

fn check(ok: bool, key: &str, value: impl fmt::Display, allowed: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        bail!("invalid value for `{key}`: {value} (allowed: {allowed})")
    }
}

/// The first key (dotted) whose integer is too large for TOML, with its value.
fn integer_beyond_toml(prefix: &str, value: &serde_json::Value) -> Option<(String, u64)> {
    match value {
        serde_json::Value::Object(map) => map.iter().find_map(|(key, value)| {
            let key = match prefix {
                "" => key.clone(),
                _ => format!("{prefix}.{key}"),
            };
            integer_beyond_toml(&key, value)
        }),
        serde_json::Value::Array(items) => items
            .iter()
            .find_map(|item| integer_beyond_toml(prefix, item)),
        serde_json::Value::Number(n) => n
            .as_u64()
            .filter(|&v| v > i64::MAX as u64)
            .map(|v| (prefix.to_string(), v)),
        _ => None,
    }
}

/// Deep-merges `user` into `base`, refusing keys that `base` does not have.
fn merge(base: &mut toml::Table, user: toml::Table, prefix: &str) -> Result<()> {
    for (key, value) in user {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(u)) => merge(b, u, &path)?,
            (Some(toml::Value::Table(_)), other) => {
                bail!("key `{path}` is a section; got the value {other}")
            }
            (Some(slot), value) => *slot = value,
            (None, _) => {
                let known: Vec<&String> = base.keys().collect();
                let known: Vec<&str> = known.iter().map(|k| k.as_str()).collect();
                bail!(
                    "unknown key `{path}` (known keys here: {})",
                    known.join(", ")
                )
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_data_path_is_made_absolute_from_the_working_directory() {
        let mut c = RunConfig::preset("tiny").unwrap();
        c.make_data_path_absolute().unwrap();
        assert_eq!(c.data.path, "", "the bundled set stays the bundled set");
        c.data.path = "images/cats".into();
        c.make_data_path_absolute().unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(PathBuf::from(&c.data.path), cwd.join("images/cats"));
        let before = c.data.path.clone();
        c.make_data_path_absolute().unwrap();
        assert_eq!(c.data.path, before);
    }

    /// Each preset as it was written before the keys were declared in one place.
    #[test]
    fn presets_keep_their_values() {
        for (name, written) in [
            ("tiny", include_str!("../tests/fixtures/presets/tiny.toml")),
            ("mnist", include_str!("../tests/fixtures/presets/mnist.toml")),
            ("cifar10", include_str!("../tests/fixtures/presets/cifar10.toml")),
        ] {
            assert_eq!(RunConfig::preset(name).unwrap().to_toml(), written, "{name}");
        }
    }

    #[test]
    fn presets_are_valid() {
        for name in PRESETS {
            RunConfig::preset(name).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn toml_overrides_preset_and_round_trips() {
        let c =
            RunConfig::from_toml_str("preset = \"cifar10\"\n[train]\nlr = 1e-4\n", None).unwrap();
        assert_eq!(c.model.channels, 128);
        assert_eq!(c.train.lr, 1e-4);
        let again = RunConfig::from_toml_str(&c.to_toml(), None).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = RunConfig::from_toml_str("[train]\nlearning_rate = 1e-4\n", None).unwrap_err();
        assert!(
            format!("{err:#}").contains("train.learning_rate"),
            "{err:#}"
        );
        let err = RunConfig::from_toml_str("[trian]\nlr = 1e-4\n", None).unwrap_err();
        assert!(format!("{err:#}").contains("trian"), "{err:#}");
    }

    #[test]
    fn wrong_type_is_named_by_its_key_not_a_line_of_the_merged_text() {
        for (text, named, expected) in [
            (
                "[train]\nbatch = \"big\"\n",
                "train.batch = \"big\"",
                "expected a whole number ≥ 0",
            ),
            (
                "[train]\nlr = \"fast\"\n",
                "train.lr = \"fast\"",
                "expected a number",
            ),
            (
                "[model]\nimage_size = [16]\n",
                "model.image_size = [16]",
                "N (square) or [H, W]",
            ),
        ] {
            let err = format!("{:#}", RunConfig::from_toml_str(text, None).unwrap_err());
            assert!(err.contains(named) && err.contains(expected), "{err}");
            assert!(!err.contains("line"), "{err}");
        }
    }

    #[test]
    fn network_and_grid_flags_set_their_keys() {
        assert_eq!("1, 2,4".parse::<IntList>().unwrap().0, [1, 2, 4]);
        assert!("".parse::<IntList>().unwrap().0.is_empty());
        assert!("1,x".parse::<IntList>().unwrap_err().contains("\"x\""));
        let flags = Overrides {
            network: NetworkArgs {
                base_channels: Some(48),
                channel_mult: Some(IntList(vec![1, 3])),
                num_res_blocks: Some(3),
                attention_resolutions: Some(IntList(vec![])),
                dropout: Some(0.2),
            },
            sample_num: Some(9),
            sampler: Some(SamplerKind::Ddpm),
            sample_steps: Some(7),
            eta: Some(0.5),
            ..Default::default()
        };
        let mut c = RunConfig::preset("mnist").unwrap();
        flags.apply(&mut c);
        let m = &c.model;
        assert_eq!(
            (m.channels, &m.channel_mult[..], m.num_res_blocks, m.dropout),
            (48, &[1, 3][..], 3, 0.2)
        );
        assert!(m.attention_resolutions.is_empty());
        let s = &c.sample;
        assert_eq!(
            (s.num, s.sampler, s.steps, s.eta),
            (9, SamplerKind::Ddpm, 7, 0.5)
        );
        c.validate().unwrap();
    }

    /// One change to a configuration.
    type Change = Box<dyn Fn(&mut RunConfig)>;

    #[test]
    fn bad_values_name_key_value_and_range() {
        let cases: Vec<(&str, Change)> = vec![
            ("train.ema_decay", Box::new(|c| c.train.ema_decay = 1.0)),
            ("train.adam_eps", Box::new(|c| c.train.adam_eps = 1e-50)),
            (
                "diffusion.timesteps",
                Box::new(|c| c.diffusion.timesteps = 1),
            ),
            (
                "diffusion.timesteps",
                Box::new(|c| c.diffusion.timesteps = 10_000_000_000),
            ),
            ("train.batch", Box::new(|c| c.train.batch = 0)),
            ("model.channels", Box::new(|c| c.model.channels = 7)),
            // One frequency: its exponent divides by zero and the network outputs NaN.
            ("model.channels", Box::new(|c| c.model.channels = 2)),
            (
                "model.image_size",
                Box::new(|c| c.model.image_size = ImageSize::Square(30)),
            ),
            (
                "model.attention_resolutions",
                Box::new(|c| c.model.attention_resolutions = vec![5]),
            ),
            ("train.device", Box::new(|c| c.train.device = "tpu".into())),
            ("train.grad_accum", Box::new(|c| c.train.grad_accum = 3)),
        ];
        for (key, mutate) in cases {
            let mut c = RunConfig::preset("tiny").unwrap();
            mutate(&mut c);
            let err = format!("{:#}", c.validate().unwrap_err());
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn runs_refuse_what_they_cannot_allocate_but_checkpoints_stay_valid() {
        let cases: Vec<(&str, Change)> = vec![
            ("data.workers", Box::new(|c| c.data.workers = 100_000)),
            ("data.prefetch", Box::new(|c| c.data.prefetch = 1000)),
            ("sample.num", Box::new(|c| c.sample.num = 100_000_000_000)),
        ];
        for (key, mutate) in cases {
            let mut c = RunConfig::preset("tiny").unwrap();
            c.check_run_resources().unwrap();
            mutate(&mut c);
            c.validate().unwrap();
            let err = format!("{:#}", c.check_run_resources().unwrap_err());
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn integers_beyond_toml_are_refused_by_key() {
        let mut c = RunConfig::preset("tiny").unwrap();
        c.train.seed = i64::MAX as u64;
        c.validate().unwrap();
        assert!(RunConfig::from_toml_str(&c.to_toml(), None).is_ok());
        c.train.seed += 1;
        let e = format!("{:#}", c.validate().unwrap_err());
        assert!(
            e.contains("train.seed") && e.contains("9223372036854775808"),
            "{e}"
        );
    }

    #[test]
    fn levers_read_true_false_or_auto_and_write_back_the_same() {
        let read = |value: &str| {
            let text = format!("[train]\ncuda_graph = {value}\n");
            RunConfig::from_toml_str(&text, None).map(|c| c.train.cuda_graph)
        };
        assert_eq!(read("true").unwrap(), Lever::On);
        assert_eq!(read("false").unwrap(), Lever::Off);
        assert_eq!(read("\"auto\"").unwrap(), Lever::Auto);
        let error = format!("{:#}", read("\"yes\"").unwrap_err());
        assert!(
            error.contains("train.cuda_graph") && error.contains("true, false or \"auto\""),
            "{error}"
        );
        assert_eq!(
            RunConfig::preset("cifar10").unwrap().train.cuda_graph,
            Lever::Auto
        );
        for lever in [Lever::On, Lever::Off, Lever::Auto] {
            let mut c = RunConfig::preset("tiny").unwrap();
            c.train.fused_norm_silu = lever;
            let back = RunConfig::from_toml_str(&c.to_toml(), None).unwrap();
            assert_eq!(back.train.fused_norm_silu, lever);
        }
    }

    #[test]
    fn image_size_parses() {
        assert_eq!("32".parse::<ImageSize>().unwrap(), ImageSize::Square(32));
        assert_eq!(
            "32x64".parse::<ImageSize>().unwrap(),
            ImageSize::Rect([32, 64])
        );
        assert!("big".parse::<ImageSize>().is_err());
        // A square written as HxW is the same size, written back the short way.
        let square = "32x32".parse::<ImageSize>().unwrap();
        assert_eq!(square, ImageSize::Square(32));
        assert_ne!(square, ImageSize::Rect([32, 64]));
        let written = |size: ImageSize| toml::Value::try_from(size).unwrap().to_string();
        assert_eq!(written(square), "32");
        assert_eq!(written(ImageSize::Rect([32, 64])), "[32, 64]");
        assert_eq!(square.to_string(), "32");
    }
}

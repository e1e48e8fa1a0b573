//! Run configuration: presets, the TOML file, command-line overrides, and validation that runs
//! before any work starts and names the offending key.
//!
//! Each key is declared once, in a `section!` below: its name, flag, value in each preset, what
//! it allows and its help. The section's struct, the presets, the flags of `ddpm train`,
//! validation, `--help` and the reference in docs/configuration.md are made from that (see
//! `keys.rs`). Adding a key is one declaration plus its use.
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[macro_use]
mod keys;
mod flags;

pub use flags::{Flag, FlagSet, FlagValues, KeyFlags, Overrides};
pub use keys::{key, keys, reference, with_flags, ConfigError, Key};

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

/// Padding of the stride-2 downsampling convs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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
    /// WebDataset tar shards: a pattern with brace ranges, a .tar file, a folder of them, or a
    /// list file.
    Shards,
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

/// The classes a model is conditioned on: a number (0: none), or `auto`, the data's (resolved
/// to a number when the data is read; checkpoints hold the number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ClassCount {
    Count(usize),
    Auto,
}

impl Default for ClassCount {
    fn default() -> Self {
        ClassCount::Count(0)
    }
}

impl ClassCount {
    /// The number of classes of a resolved count (auto: none yet).
    pub fn resolved(self) -> usize {
        match self {
            ClassCount::Count(n) => n,
            ClassCount::Auto => 0,
        }
    }
}

impl fmt::Display for ClassCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClassCount::Count(n) => write!(f, "{n}"),
            ClassCount::Auto => f.write_str("auto"),
        }
    }
}

impl FromStr for ClassCount {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "auto" => Ok(ClassCount::Auto),
            n => n
                .parse()
                .map(ClassCount::Count)
                .map_err(|_| format!("bad class count {s:?}: expected a whole number ≥ 0 or auto")),
        }
    }
}

impl Serialize for ClassCount {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        match self {
            ClassCount::Count(n) => serializer.serialize_u64(*n as u64),
            ClassCount::Auto => serializer.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for ClassCount {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "lowercase")]
        enum Word {
            Auto,
        }
        #[derive(Deserialize)]
        #[serde(untagged, expecting = "a whole number ≥ 0 or \"auto\"")]
        enum Written {
            Count(usize),
            Word(Word),
        }
        Ok(match Written::deserialize(deserializer)? {
            Written::Count(n) => ClassCount::Count(n),
            Written::Word(Word::Auto) => ClassCount::Auto,
        })
    }
}

/// Which of CIFAR-100's two labels is the class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CifarLabel {
    /// The 100 classes.
    #[default]
    Fine,
    /// The 20 superclasses.
    Coarse,
}

/// Where the training square is cut from an image resized on its shorter side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CropMode {
    #[default]
    Center,
    /// Resized to cover by a random factor of 1 to 1.25, cut at a random place, anew at every
    /// epoch.
    Random,
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

section! {
    /// The UNet's shape.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ModelConfig in model {
        channels: i64 {
            flag: "ch",
            help: "Base channels; level i has channels × channel_mult[i]",
            tiny: 32, mnist: 64, cifar10: 128, imagenet64: 192, imagenet256: 256,
            allowed: "an even number ≥ 4 (the time embedding is half sines, half cosines, of at least two frequencies)"
                if |c| *c >= 4 && c % 2 == 0,
        }
        channel_mult: Vec<i64> {
            flag: "ch-mult",
            help: "Channel multiplier per level, e.g. 1,2,2,2",
            tiny: vec![1, 2, 2], cifar10: vec![1, 2, 2, 2], imagenet64: vec![1, 2, 3, 4],
            imagenet256: vec![1, 1, 2, 2, 4, 4],
            allowed: "a non-empty list of integers ≥ 1"
                if |m| !m.is_empty() && m.iter().all(|&c| c >= 1),
        }
        num_res_blocks: i64 {
            flag: "num-res-blocks",
            help: "Residual blocks per level on the way down (the way up has one more)",
            tiny: 1, mnist: 2, cifar10: 2, imagenet64: 3, imagenet256: 2,
            allowed: "≥ 1" if |n| *n >= 1,
        }
        attention_resolutions: Vec<i64> {
            flag: "attn-res",
            help: "Feature-map sizes (the shorter side) at which self-attention follows each residual block, e.g. 16 or 16,8 (\"\": none)",
            tiny: vec![], mnist: vec![14], cifar10: vec![16], imagenet64: vec![32, 16, 8],
            allowed: "feature-map sizes of the model: the shorter image side, halved at each level",
        }
        dropout: f64 {
            flag: "dropout",
            help: "Dropout in the residual blocks",
            tiny: 0.0, mnist: 0.1, cifar10: 0.1, imagenet256: 0.0,
            allowed: "in [0, 1)" if |p| (0.0..1.0).contains(p),
        }
        in_channels: i64 {
            flag: "channels",
            help: "Image channels: 1 (grayscale) or 3 (RGB)",
            tiny: 1, cifar10: 3,
            allowed: "1 or 3" if |c| *c == 1 || *c == 3,
        }
        image_size: ImageSize {
            flag: "image-size",
            help: "Training image size: N (square) or [H, W] (flag: N or HxW)",
            tiny: ImageSize::Square(16), mnist: ImageSize::Square(28), cifar10: ImageSize::Square(32),
            imagenet64: ImageSize::Square(64), imagenet256: ImageSize::Square(256),
            allowed: "positive sides divisible by 2^(levels-1)"
                if |s| s.height() >= 1 && s.width() >= 1,
        }
        #[serde(default)]
        downsample_padding: DownsamplePadding {
            help: "How the stride-2 downsampling convs pad: symmetric (one pixel on every side, as PyTorch ports) or bottom-right (TensorFlow's SAME, as the original DDPM code and google/ddpm-*)",
            tiny: DownsamplePadding::Symmetric,
        }
        // An embedding row per class (and one for \"no class\"): 100k rows is ImageNet-21k with room.
        #[serde(default)]
        num_classes: ClassCount {
            flag: "num-classes",
            help: "Classes the model is conditioned on (a class embedding added to the time embedding, plus a \"no class\" row for classifier-free guidance): 0 unconditional, N, or auto (the data's classes: IDX label files, CIFAR labels, one subfolder per class; none: unconditional)",
            tiny: ClassCount::Count(0), imagenet64: ClassCount::Count(1000),
            limit: "auto or ≤ 100000" if |c| *c == ClassCount::Auto || *c <= ClassCount::Count(100_000),
        }
        #[serde(default)]
        head_channels: i64 {
            flag: "head-channels",
            help: "Channels per attention head: the attention over C channels has C / head_channels heads; 0: one head",
            tiny: 0, imagenet64: 64,
            allowed: "0 or a divisor of the width of every level with attention and of the middle block",
        }
        #[serde(default)]
        scale_shift_norm: bool {
            flag: "scale-shift-norm",
            help: "The time (and class) embedding scales and shifts each residual block's second GroupNorm (AdaGN, Dhariwal & Nichol 2021) instead of being added before it",
            tiny: false, imagenet64: true,
        }
        #[serde(default)]
        resblock_updown: bool {
            flag: "resblock-updown",
            help: "Down- and upsample with a residual block that average-pools or repeats its input (BigGAN-style) instead of a strided or a nearest ×2 conv",
            tiny: false, imagenet64: true,
        }
    }
}

section! {
    /// The noise schedule and the training objective.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct DiffusionConfig in diffusion {
        // The schedule tables hold a few f64 per step; 10⁵ covers every published T by far.
        timesteps: usize {
            flag: "timesteps",
            help: "Number of diffusion steps T",
            tiny: 1000, imagenet64: 4000, imagenet256: 1000,
            allowed: "in [2, 100000]" if |t| (2..=100_000).contains(t),
        }
        schedule: ScheduleKind {
            flag: "schedule",
            help: "Noise schedule: linear (β from beta_start to beta_end), cosine (Nichol & Dhariwal, s = cosine_s, β ≤ 0.999) or sigmoid (β = start + (end−start)·σ(x), x ∈ [−6, 6])",
            tiny: ScheduleKind::Linear, imagenet64: ScheduleKind::Cosine,
            imagenet256: ScheduleKind::Linear,
        }
        beta_start: f64 {
            help: "β at t = 0 (linear and sigmoid schedules)",
            tiny: 1e-4,
            allowed: "in (0, 1)" if |b| *b > 0.0 && *b < 1.0,
        }
        beta_end: f64 {
            help: "β at t = T−1 (linear and sigmoid schedules)",
            tiny: 0.02,
            allowed: "in (0, 1)" if |b| *b > 0.0 && *b < 1.0,
        }
        cosine_s: f64 {
            help: "The cosine schedule's offset s",
            tiny: 0.008,
            allowed: "> 0" if |s| *s > 0.0,
        }
        prediction: Prediction {
            flag: "prediction",
            help: "What the network predicts: epsilon (the noise, Ho et al. 2020), x0 (the clean image) or v (√ᾱ ε − √(1−ᾱ) x₀, Salimans & Ho 2022)",
            tiny: Prediction::Epsilon,
        }
        loss_weighting: LossWeighting {
            flag: "loss-weighting",
            help: "Loss weight per t: none, inv-one-minus-alphabar (1 / (1 − ᾱ_t)), snr (ᾱ_t / (1 − ᾱ_t)) or min-snr (min-SNR-γ, Hang et al. 2023)",
            tiny: LossWeighting::MinSnr, mnist: LossWeighting::None, cifar10: LossWeighting::None,
        }
        min_snr_gamma: f64 {
            flag: "min-snr-gamma",
            help: "γ of min-SNR-γ",
            tiny: 5.0,
            allowed: "> 0" if |g| *g > 0.0,
        }
    }
}

section! {
    /// The optimization.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct TrainConfig in train {
        steps: u64 {
            flag: "steps",
            help: "Optimizer steps in the run (--epochs sets them from the data's size instead)",
            tiny: 3000, mnist: 50_000, cifar10: 500_000, imagenet64: 540_000, imagenet256: 1_980_000,
            allowed: "≥ 1" if |s| *s >= 1,
        }
        batch: usize {
            flag: "batch",
            help: "Images per optimizer step (split into grad_accum micro-batches)",
            tiny: 64, mnist: 128, cifar10: 128, imagenet64: 2048, imagenet256: 256,
            allowed: "≥ 1" if |b| *b >= 1,
        }
        grad_accum: usize {
            flag: "grad-accum",
            help: "Micro-batches per optimizer step (batch / grad_accum images each)",
            tiny: 1,
            allowed: "≥ 1 and a divisor of train.batch" if |g| *g >= 1,
        }
        lr: f64 {
            flag: "lr",
            help: "Peak learning rate (AdamW)",
            tiny: 1e-3, mnist: 2e-4, cifar10: 2e-4, imagenet64: 3e-4, imagenet256: 1e-4,
            allowed: "in (0, 1)" if |lr| *lr > 0.0 && *lr < 1.0,
        }
        lr_schedule: LrSchedule {
            flag: "lr-schedule",
            help: "After the linear warm-up: cosine (annealed to min_lr at the last step) or constant",
            tiny: LrSchedule::Cosine,
        }
        warmup_steps: u64 {
            flag: "warmup-steps",
            help: "Steps of linear learning-rate warm-up",
            tiny: 200, mnist: 1000, cifar10: 5000,
        }
        min_lr: f64 {
            flag: "min-lr",
            help: "Learning rate at the last step of the cosine schedule",
            tiny: 0.0,
            allowed: "in [0, train.lr]" if |lr| *lr >= 0.0,
        }
        adam_beta1: f64 {
            flag: "adam-beta1",
            help: "AdamW β₁",
            tiny: 0.9,
            allowed: "in [0, 1)" if |b| (0.0..1.0).contains(b),
        }
        adam_beta2: f64 {
            flag: "adam-beta2",
            help: "AdamW β₂",
            tiny: 0.999,
            allowed: "in [0, 1)" if |b| (0.0..1.0).contains(b),
        }
        // The optimizer computes in f32, where a smaller ε is 0 and 0/0 makes NaN weights.
        adam_eps: f64 {
            flag: "adam-eps",
            help: "AdamW ε",
            tiny: 1e-8,
            allowed: "≥ 1.2e-38 (f32's smallest normal number)"
                if |e| *e >= f32::MIN_POSITIVE as f64,
        }
        weight_decay: f64 {
            flag: "weight-decay",
            help: "AdamW weight decay",
            tiny: 0.01,
            allowed: "≥ 0" if |w| *w >= 0.0,
        }
        grad_clip: f64 {
            flag: "grad-clip",
            help: "Maximum global gradient norm; 0 disables clipping",
            tiny: 1.0,
            allowed: "≥ 0 (0 disables)" if |g| *g >= 0.0,
        }
        #[serde(default = "default_class_dropout")]
        class_dropout: f64 {
            flag: "class-dropout",
            help: "Probability that a training image's class is replaced by \"no class\", so that the model also learns the unconditional prediction guidance needs (class-conditional models)",
            tiny: default_class_dropout(),
            allowed: "in [0, 1)" if |p| (0.0..1.0).contains(p),
        }
        ema_decay: f64 {
            flag: "ema-decay",
            help: "Decay of the EMA of the weights (samples use the EMA weights)",
            tiny: 0.999, mnist: 0.9999, cifar10: 0.9999,
            allowed: "in (0, 1)" if |d| *d > 0.0 && *d < 1.0,
        }
        ema_warmup: bool {
            flag: "ema-warmup",
            help: "EMA decay warm-up: decay_n = min(decay, (1 + n) / (10 + n))",
            tiny: true,
        }
        ema_every: u64 {
            flag: "ema-every",
            help: "EMA update interval in steps",
            tiny: 1,
            allowed: "≥ 1" if |e| *e >= 1,
        }
        precision: Precision {
            flag: "precision",
            help: "Arithmetic: f32, tf32 (TF32 tensor-core matmuls and convolutions, CUDA), bf16 (autocast), bf16-pure (the network in bf16 forward and backward; f32 weights, optimizer and gradient sums) or fp16 (autocast with dynamic loss scaling)",
            tiny: Precision::F32,
        }
        seed: u64 {
            flag: "seed",
            help: "Drives data order, augmentation, t, noise, dropout and sampling",
            tiny: 0,
        }
        device: String {
            flag: "device",
            help: "Where to train: auto (CUDA when present), cpu, cuda, cuda:N or mps",
            tiny: "auto".into(),
            allowed: "auto, cpu, cuda, cuda:N or mps" if |d| crate::device::parse(d).is_ok(),
        }
        log_every: u64 {
            flag: "log-every",
            help: "Metrics interval in steps",
            tiny: 50,
            allowed: "≥ 1" if |l| *l >= 1,
        }
        max_bad_steps: u64 {
            flag: "max-bad-steps",
            help: "After this many non-finite steps in a row (checked at each log interval), roll back to the newest checkpoint from before them; 0: never",
            tiny: 10,
        }
        rollback_lr_factor: f64 {
            help: "The learning rate is multiplied by this at each rollback",
            tiny: 0.5,
            allowed: "in (0, 1]" if |f| *f > 0.0 && *f <= 1.0,
        }
        #[serde(default)]
        channels_last: bool {
            flag: "channels-last",
            help: "Keep weights and activations in channels-last (NHWC) memory order: faster convolutions on some GPUs (tensor cores), slower on CPUs",
            tiny: false,
        }
        #[serde(default)]
        cuda_graph: Lever {
            flag: "cuda-graph",
            help: "Record the forward and backward pass as a CUDA graph after a few steps and replay it: one launch instead of thousands of small kernels (CUDA, one process); auto: where it can run; the flag alone: true",
            tiny: Lever::Auto,
        }
        #[serde(default)]
        fused_norm_silu: Lever {
            flag: "fused-norm-silu",
            help: "Run each GroupNorm+SiLU pair as one fused kernel, forward and backward (CUDA; f32 and bf16 activations in NCHW order); auto: where they run; the flag alone: true",
            tiny: Lever::Auto,
        }
        #[serde(default)]
        activation_checkpointing: bool {
            flag: "activation-checkpointing",
            help: "Keep only each residual and attention block's input for backward and recompute the rest there: less activation memory for one more forward pass per step, with the same gradients (bit for bit on a CPU)",
            tiny: false,
        }
    }
}

section! {
    /// The training images and how they are read.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct DataConfig in data {
        path: String {
            flag: "data",
            help: "Images: a folder, a CIFAR-10/100 binaries folder, an IDX file, or WebDataset tar shards ('shards/train-{000000..000146}.tar', a .tar, a folder of them or a .txt list); empty: the bundled MNIST subset; a relative path is taken from the working directory",
            tiny: String::new(),
        }
        format: DataFormat {
            flag: "data-format",
            help: "The data's format; auto: detected from the path",
            tiny: DataFormat::Auto,
        }
        split: Split {
            flag: "split",
            help: "Which part of a dataset with a fixed train/test split to use (CIFAR binaries, a folder of MNIST IDX files)",
            tiny: Split::Train,
        }
        hflip: bool {
            flag: "hflip",
            help: "Random horizontal flips (off for digits and text)",
            tiny: false, cifar10: true,
        }
        color_jitter: f64 {
            flag: "color-jitter",
            help: "Strength of brightness/contrast/saturation jitter; 0 disables",
            tiny: 0.0,
            allowed: "in [0, 0.5]" if |j| (0.0..=0.5).contains(j),
        }
        // Each worker is a thread.
        #[serde(default)]
        workers: usize {
            flag: "workers",
            help: "Threads that read and decode batches ahead of the training step; 0: one per core",
            tiny: 0,
            limit: "≤ 256 (0: one per core)" if |w| *w <= 256,
        }
        // Each prefetched batch is a buffer.
        #[serde(default = "default_prefetch")]
        prefetch: usize {
            flag: "prefetch",
            help: "Batches read ahead of the training step",
            tiny: default_prefetch(),
            allowed: "≥ 1" if |p| *p >= 1,
            limit: "in [1, 64]" if |p| *p <= 64,
        }
        #[serde(default)]
        cifar100_labels: CifarLabel {
            flag: "cifar100-labels",
            help: "The class of a CIFAR-100 image: fine (100 classes) or coarse (20 superclasses)",
            tiny: CifarLabel::Fine,
        }
        #[serde(default)]
        cache: DataCache {
            flag: "data-cache",
            help: "Keep decoded images in memory: auto (when they take at most half of the available memory), on, or off (decode every epoch); shards are always read as they are used",
            tiny: DataCache::Auto,
        }
        #[serde(default)]
        crop: CropMode {
            flag: "crop",
            help: "Where the training square is cut from an image file or shard sample resized on its shorter side: center, or random (scale jitter of up to 1.25 and a random place, anew at every epoch)",
            tiny: CropMode::Center,
        }
        // Each place in the buffer holds a sample's index, not its pixels.
        #[serde(default = "default_shuffle_buffer")]
        shuffle_buffer: usize {
            flag: "shuffle-buffer",
            help: "Samples in each process's shuffle buffer when reading tar shards (shards are shuffled whole, then their samples through this buffer)",
            tiny: default_shuffle_buffer(),
            allowed: "≥ 1" if |b| *b >= 1,
        }
    }
}

section! {
    /// The sample grids written during training.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct SampleConfig in sample {
        every: u64 {
            flag: "sample-every",
            help: "Write a sample grid every this many steps; 0: only at the end",
            tiny: 1000, mnist: 5000, cifar10: 10_000,
        }
        // A grid of more than 32 × 32 images would take long and show little (`ddpm sample`
        // makes any number).
        num: usize {
            flag: "sample-num",
            help: "Images per sample grid",
            tiny: 64,
            allowed: "≥ 1" if |n| *n >= 1,
            limit: "in [1, 1024]" if |n| *n <= 1024,
        }
        sampler: SamplerKind {
            flag: "sampler",
            help: "Sampler of the grids: ddim, or ddpm (ancestral, all T steps)",
            tiny: SamplerKind::Ddim,
        }
        steps: usize {
            flag: "sample-steps",
            help: "DDIM steps of the grids",
            tiny: 100, mnist: 50, cifar10: 50,
            allowed: "in [1, diffusion.timesteps]" if |s| *s >= 1,
        }
        eta: f64 {
            flag: "eta",
            help: "DDIM η of the grids: 0 deterministic, 1 as stochastic as DDPM",
            tiny: 1.0, mnist: 0.0, cifar10: 0.0,
            allowed: "in [0, 1]" if |e| (0.0..=1.0).contains(e),
        }
        ddpm_variance: DdpmVariance {
            help: "The DDPM sampler's variance: beta (σ² = β_t) or posterior (σ² = β̃_t)",
            tiny: DdpmVariance::Beta,
        }
        #[serde(default = "no_guidance")]
        guidance: f64 {
            flag: "guidance",
            help: "Classifier-free guidance scale s of class-conditional models: ε̂ = ε̂(x, ∅) + s·(ε̂(x, class) − ε̂(x, ∅)), as diffusers' guidance_scale; 1: the conditional model as trained, 0: unconditional, > 1: guided",
            tiny: no_guidance(),
            allowed: "in [0, 100]" if |s| (0.0..=100.0).contains(s),
        }
    }
}

section! {
    /// When checkpoints are written and kept.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct CheckpointConfig in checkpoint {
        every: u64 {
            flag: "checkpoint-every",
            help: "Save a checkpoint every this many steps; 0: only at the end",
            tiny: 1000, mnist: 5000, cifar10: 10_000,
        }
        keep: usize {
            flag: "keep",
            help: "Checkpoints kept, the oldest removed first (pinned ones come on top)",
            tiny: 3,
            allowed: "≥ 1" if |k| *k >= 1,
        }
        pin_every: u64 {
            flag: "pin-every",
            help: "Checkpoints at multiples of this step are never removed (nor any step-N.json with a step-N.keep file beside it); 0: none",
            tiny: 0,
        }
    }
}

section! {
    /// FID measured during training.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct FidConfig in fid {
        every: u64 {
            flag: "fid-every",
            help: "Measure FID every this many steps; 0: never (needs the Inception file: tools/get_inception.sh)",
            tiny: 0,
        }
        num: usize {
            flag: "fid-num",
            help: "Generated images per measurement (EMA weights, the run's sampler settings); the score is reported as FID@N",
            tiny: 10_000,
            allowed: "≥ 2" if |n| *n >= 2,
        }
        batch: usize {
            help: "Images per Inception forward pass",
            tiny: 50,
            allowed: "≥ 1" if |b| *b >= 1,
        }
        inception: String {
            help: "The Inception file; empty: $DDPM_INCEPTION, else the cache (tools/get_inception.sh)",
            tiny: String::new(),
        }
    }
}

section! {
    /// Post-hoc EMA (Karras et al. 2024): power-function EMA profiles tracked during training
    /// and their snapshots, from which `ddpm ema` makes the EMA of any length afterwards.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct PosthocEmaConfig in ema {
        sigma_rels: Vec<f64> {
            help: "Relative widths σ_rel of the power-function EMA profiles tracked during training (width of the averaging window over the run's age)",
            tiny: vec![0.05, 0.10],
            allowed: "a non-empty list of numbers in (0, 0.2887] (1/√12, the plain average of the run)"
                if |s| !s.is_empty() && s.iter().all(|&x| x > 0.0 && x <= crate::posthoc_ema::MAX_SIGMA_REL),
        }
        snapshot_every: u64 {
            flag: "ema-snapshot-every",
            help: "Store the profiles (as float16) every this many steps and at the run's end, for `ddpm ema`; 0: track no profiles",
            tiny: 250, mnist: 2500, cifar10: 25_000,
        }
    }
}

impl Default for PosthocEmaConfig {
    /// What a configuration without an `[ema]` section (written before it existed) tracks:
    /// nothing, as that run did.
    fn default() -> Self {
        PosthocEmaConfig {
            snapshot_every: 0,
            ..PosthocEmaConfig::preset(Preset::Tiny)
        }
    }
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

impl Default for FidConfig {
    /// What a configuration without a `[fid]` section measures: the presets' (none).
    fn default() -> Self {
        FidConfig::preset(Preset::Tiny)
    }
}

fn default_shuffle_buffer() -> usize {
    10_000
}

fn default_prefetch() -> usize {
    4
}

fn default_class_dropout() -> f64 {
    0.1
}

fn no_guidance() -> f64 {
    1.0
}

/// Everything a run needs; docs/configuration.md lists every key.
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
    #[serde(default)]
    pub ema: PosthocEmaConfig,
}

pub const PRESETS: [&str; 5] = ["cifar10", "imagenet256", "imagenet64", "mnist", "tiny"];

/// A named configuration to start from. `tiny` is the base, a 1.06M-parameter UNet for digits
/// at 16×16, tuned so that the bundled demo learns legible digits in minutes on a 2-core CPU: at
/// 16×16 a step costs a third of one at 28×28, so the same minutes buy 2.5× the steps; a high
/// learning rate; min-SNR-5 loss weighting (faster convergence); and stochastic DDIM (η = 1, 100
/// steps), which forgives an undertrained model more than deterministic DDIM. The other presets
/// keep the DDPM recipe (unweighted ε loss) and inherit the rest from tiny. `imagenet64` and
/// `imagenet256` are the class-conditional ImageNet networks of Dhariwal & Nichol 2021 (ADM:
/// 64-channel attention heads at 32, 16 and 8, scale-shift norms, residual up- and
/// downsampling) with their schedules and optimiser settings; they inherit the rest from
/// cifar10, and imagenet256 from imagenet64.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    Tiny,
    Mnist,
    Cifar10,
    Imagenet64,
    Imagenet256,
}

impl Preset {
    pub const ALL: [Preset; 5] = [
        Preset::Tiny,
        Preset::Mnist,
        Preset::Cifar10,
        Preset::Imagenet64,
        Preset::Imagenet256,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Mnist => "mnist",
            Preset::Cifar10 => "cifar10",
            Preset::Imagenet64 => "imagenet64",
            Preset::Imagenet256 => "imagenet256",
        }
    }

    pub fn named(name: &str) -> Result<Self> {
        match Preset::ALL.into_iter().find(|p| p.name() == name) {
            Some(preset) => Ok(preset),
            None => bail!(
                "unknown preset {name:?}: expected one of {}",
                PRESETS.join(", ")
            ),
        }
    }
}

/// A check that reads more than one key, run once every key has passed its own: `key` is the
/// key it names, `reads` the others whose values it reads.
struct CrossCheck {
    key: &'static str,
    reads: &'static [&'static str],
    /// The value named and what is allowed, when the values do not go together.
    refuses: fn(&RunConfig) -> Option<(String, String)>,
}

/// The feature-map sizes (the shorter side) at each level of the model.
fn feature_map_sizes(m: &ModelConfig) -> Vec<i64> {
    let side = m.image_size.height().min(m.image_size.width());
    (0..m.channel_mult.len())
        .map(|level| side.checked_shr(level as u32).unwrap_or(0))
        .collect()
}

/// The channel widths the model attends over: each level with attention, and the middle.
pub fn attention_widths(m: &ModelConfig) -> Vec<i64> {
    let sizes = feature_map_sizes(m);
    let mut widths: Vec<i64> = (m.channel_mult.iter().zip(&sizes))
        .filter(|(_, size)| m.attention_resolutions.contains(size))
        .map(|(mult, _)| m.channels * mult)
        .collect();
    widths.extend(m.channel_mult.last().map(|mult| m.channels * mult));
    widths.dedup();
    widths
}

const CROSS_CHECKS: &[CrossCheck] = &[
    // Each level but the last halves the feature maps.
    CrossCheck {
        key: "model.image_size",
        reads: &["model.channel_mult"],
        refuses: |c| {
            let (m, levels) = (&c.model, c.model.channel_mult.len());
            let factor = 1i64.checked_shl(levels as u32 - 1).filter(|&f| f > 0);
            let divides = |side: i64| factor.is_some_and(|f| side % f == 0);
            (!(divides(m.image_size.height()) && divides(m.image_size.width()))).then(|| {
                let factor = factor.map_or("beyond i64".into(), |f| f.to_string());
                let allowed = format!(
                    "positive sides divisible by 2^(levels-1) = {factor} for {levels} levels"
                );
                (m.image_size.to_string(), allowed)
            })
        },
    },
    CrossCheck {
        key: "model.attention_resolutions",
        reads: &["model.image_size", "model.channel_mult"],
        refuses: |c| {
            let sizes = feature_map_sizes(&c.model);
            let r = c
                .model
                .attention_resolutions
                .iter()
                .find(|r| !sizes.contains(r))?;
            let allowed =
                format!("feature-map sizes of this model: {sizes:?}; --attn-res sets them");
            Some((r.to_string(), allowed))
        },
    },
    // Each attention splits its channels into whole heads.
    CrossCheck {
        key: "model.head_channels",
        reads: &[
            "model.channels",
            "model.channel_mult",
            "model.attention_resolutions",
        ],
        refuses: |c| {
            let m = &c.model;
            let widths = attention_widths(m);
            let fits = |h: i64| h == 0 || (h > 0 && widths.iter().all(|w| w % h == 0));
            (!fits(m.head_channels)).then(|| {
                let allowed =
                    format!("0 (one head) or a divisor of every attention's width {widths:?}");
                (m.head_channels.to_string(), allowed)
            })
        },
    },
    // A recomputed block replays the random state, which a CUDA graph being recorded forbids.
    CrossCheck {
        key: "train.cuda_graph",
        reads: &["train.activation_checkpointing"],
        refuses: |c| {
            (c.train.cuda_graph == Lever::On && c.train.activation_checkpointing).then(|| {
                (
                    "true".into(),
                    "auto or false with train.activation_checkpointing (backward recomputes blocks outside a graph)".into(),
                )
            })
        },
    },
    // Guidance mixes the class-conditional and unconditional predictions.
    CrossCheck {
        key: "sample.guidance",
        reads: &["model.num_classes"],
        refuses: |c| {
            (c.sample.guidance != 1.0 && c.model.num_classes == ClassCount::Count(0)).then(|| {
                (
                    c.sample.guidance.to_string(),
                    "1 for an unconditional model (model.num_classes = 0): guidance needs a class-conditional one".into(),
                )
            })
        },
    },
    CrossCheck {
        key: "diffusion.beta_start",
        reads: &["diffusion.beta_end"],
        refuses: |c| {
            let d = &c.diffusion;
            (d.beta_start > d.beta_end)
                .then(|| (d.beta_start.to_string(), "≤ diffusion.beta_end".into()))
        },
    },
    CrossCheck {
        key: "train.grad_accum",
        reads: &["train.batch"],
        refuses: |c| {
            let t = &c.train;
            (!t.batch.is_multiple_of(t.grad_accum)).then(|| {
                let allowed = format!("≥ 1 and a divisor of train.batch ({})", t.batch);
                (t.grad_accum.to_string(), allowed)
            })
        },
    },
    CrossCheck {
        key: "train.min_lr",
        reads: &["train.lr"],
        refuses: |c| {
            let t = &c.train;
            (t.min_lr > t.lr).then(|| (t.min_lr.to_string(), "in [0, train.lr]".into()))
        },
    },
    CrossCheck {
        key: "sample.steps",
        reads: &["diffusion.timesteps"],
        refuses: |c| {
            let (steps, timesteps) = (c.sample.steps, c.diffusion.timesteps);
            (steps > timesteps).then(|| {
                let allowed = format!("in [1, diffusion.timesteps = {timesteps}]");
                (steps.to_string(), allowed)
            })
        },
    },
];

impl RunConfig {
    /// The named preset's full configuration.
    pub fn preset(name: &str) -> Result<Self> {
        Preset::named(name).map(Self::of)
    }

    /// A preset's full configuration, made from the keys' declarations.
    pub fn of(preset: Preset) -> Self {
        RunConfig {
            preset: preset.name().into(),
            model: ModelConfig::preset(preset),
            diffusion: DiffusionConfig::preset(preset),
            train: TrainConfig::preset(preset),
            data: DataConfig::preset(preset),
            sample: SampleConfig::preset(preset),
            checkpoint: CheckpointConfig::preset(preset),
            fid: FidConfig::preset(preset),
            ema: PosthocEmaConfig::preset(preset),
        }
    }

    /// Reads a TOML file. The base is `preset` if given, else the file's `preset` key, else
    /// `tiny`; every other key in the file overrides the base. Unknown keys are errors.
    pub fn from_toml_file(path: &Path, preset: Option<&str>) -> Result<Self> {
        Self::from_toml_file_and_keys(path, preset).map(|(config, _)| config)
    }

    /// `from_toml_file`, and the keys (dotted) that the file sets.
    pub fn from_toml_file_and_keys(
        path: &Path,
        preset: Option<&str>,
    ) -> Result<(Self, Vec<String>)> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::read_toml(&text, preset).with_context(|| format!("in config file {}", path.display()))
    }

    pub fn from_toml_str(text: &str, preset: Option<&str>) -> Result<Self> {
        Self::read_toml(text, preset).map(|(config, _)| config)
    }

    fn read_toml(text: &str, preset: Option<&str>) -> Result<(Self, Vec<String>)> {
        let mut user: toml::Table = toml::from_str(text)?;
        let preset = match (preset, user.remove("preset")) {
            (Some(name), _) => name.to_string(),
            (None, Some(toml::Value::String(name))) => name,
            (None, Some(other)) => bail!("key `preset`: expected a string, got {other}"),
            (None, None) => "tiny".to_string(),
        };
        let mut merged = toml::Table::try_from(Self::preset(&preset)?)?;
        let mut keys = Vec::new();
        merge(&mut merged, user, "", &mut keys)?;
        // Parsing the merged text (not the value) locates type errors, which then name the key.
        let merged = toml::to_string(&merged)?;
        let config = toml::from_str(&merged).map_err(|e| name_the_key(&e, &merged))?;
        Ok((config, keys))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a RunConfig always serialises")
    }

    /// What a training run allocates or shows, each key's `limit`, checked before it starts. Not
    /// part of `validate`, so that any checkpoint stays readable.
    pub fn check_run_resources(&self) -> std::result::Result<(), ConfigError> {
        keys().try_for_each(|key| key.slot.check_limit(key.name, self))
    }

    /// Checks every key against what it allows, then the values that must go together; the
    /// error names key, value and what is allowed.
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        keys().try_for_each(|key| key.slot.check(key.name, self))?;
        for check in CROSS_CHECKS {
            if let Some((value, allowed)) = (check.refuses)(self) {
                return Err(ConfigError::Invalid {
                    key: check.key,
                    value,
                    allowed,
                    reads: check.reads,
                });
            }
        }
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

/// A command-line number above 0 (and finite).
pub fn positive_finite(text: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("expected a number above 0, got {text:?}")),
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

/// Deep-merges `user` into `base`, refusing keys that `base` does not have; adds the keys it
/// sets (dotted) to `set`.
fn merge(
    base: &mut toml::Table,
    user: toml::Table,
    prefix: &str,
    set: &mut Vec<String>,
) -> Result<()> {
    for (key, value) in user {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(u)) => merge(b, u, &path, set)?,
            (Some(toml::Value::Table(_)), other) => {
                bail!("key `{path}` is a section; got the value {other}")
            }
            (Some(slot), value) => {
                *slot = value;
                set.push(path);
            }
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
    fn the_command_line_sees_the_flag_of_each_key_a_message_names() {
        assert_eq!(
            with_flags("lower train.lr or check the data"),
            "lower train.lr (--lr) or check the data"
        );
        // After backticks; once per key; not inside a longer name or a stated value.
        assert_eq!(
            with_flags("invalid value for `train.ema_decay`: 1.5; train.ema_decay again"),
            "invalid value for `train.ema_decay` (--ema-decay): 1.5; train.ema_decay again"
        );
        assert_eq!(
            with_flags("train.lr_schedule and train.lr = 0.1"),
            "train.lr_schedule (--lr-schedule) and train.lr = 0.1"
        );
        // A key without a flag, and a text that names the flag already, are left alone.
        assert_eq!(with_flags("fid.batch is 50"), "fid.batch is 50");
        assert_eq!(with_flags("train.lr (--lr) twice"), "train.lr (--lr) twice");
    }

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
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/presets");
        for preset in Preset::ALL {
            let path = fixtures.join(format!("{}.toml", preset.name()));
            let generated = RunConfig::of(preset).to_toml();
            if std::env::var("DDPM_BLESS").is_ok_and(|v| v == "1") {
                std::fs::write(&path, &generated).unwrap();
            }
            let written = std::fs::read_to_string(&path).unwrap_or_default();
            assert_eq!(
                generated,
                written,
                "{} (a deliberate change: `DDPM_BLESS=1 cargo test --release --lib config::tests::presets_keep`)",
                path.display()
            );
        }
        assert!(RunConfig::preset("huge").is_err());
    }

    #[test]
    fn presets_are_valid() {
        for name in PRESETS {
            RunConfig::preset(name).unwrap().validate().unwrap();
        }
    }

    /// The table and the structs come from the same declarations; this checks that `keys()`
    /// lists every section, once.
    #[test]
    fn every_key_of_the_file_is_declared_once() {
        fn leaves(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
            for (key, value) in table {
                let path = format!("{prefix}{key}");
                match value {
                    toml::Value::Table(t) => leaves(&format!("{path}."), t, out),
                    _ => out.push(path),
                }
            }
        }
        let mut written = Vec::new();
        let config = toml::Table::try_from(RunConfig::of(Preset::Cifar10)).unwrap();
        leaves("", &config, &mut written);
        written.retain(|k| k != "preset");
        let mut declared: Vec<String> = keys().map(|k| k.name.to_string()).collect();
        written.sort();
        declared.sort();
        assert_eq!(declared, written);
        let mut flags: Vec<&str> = keys().filter_map(|k| k.flag).collect();
        flags.sort();
        let count = flags.len();
        flags.dedup();
        assert_eq!(flags.len(), count, "a flag is declared twice");
    }

    #[test]
    fn cross_checks_name_declared_keys() {
        for check in CROSS_CHECKS {
            for name in std::iter::once(&check.key).chain(check.reads) {
                assert!(key(name).is_some(), "{name}");
            }
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
    fn a_file_says_which_keys_it_sets() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.toml");
        std::fs::write(
            &file,
            "preset = \"mnist\"\n[train]\nlr = 1e-4\n[fid]\nevery = 5\n",
        )
        .unwrap();
        let (c, mut keys) = RunConfig::from_toml_file_and_keys(&file, None).unwrap();
        assert_eq!((c.train.lr, c.fid.every, c.model.channels), (1e-4, 5, 64));
        keys.sort();
        assert_eq!(keys, ["fid.every", "train.lr"]);
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
        let flags = Overrides::from_flags(&[
            "--ch",
            "48",
            "--ch-mult",
            "1,3",
            "--num-res-blocks",
            "3",
            "--attn-res",
            "",
            "--dropout",
            "0.2",
            "--sample-num",
            "9",
            "--sampler",
            "ddpm",
            "--sample-steps",
            "7",
            "--eta",
            "0.5",
        ])
        .unwrap();
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
        assert!(flags.sets("model.channels") && !flags.sets("model.in_channels"));
    }

    #[test]
    fn flags_keep_their_value_syntax() {
        let parse = |flags: &[&str]| {
            let mut c = RunConfig::of(Preset::Tiny);
            Overrides::from_flags(flags).map(|o| {
                o.apply(&mut c);
                (o, c)
            })
        };
        let (_, c) = parse(&[
            "--lr",
            "2e-4",
            "--image-size",
            "32x64",
            "--cuda-graph",
            "--fused-norm-silu",
            "false",
            "--precision",
            "bf16-pure",
            "--hflip",
            "true",
            "--data",
            "images",
            "--seed",
            "18446744073709551615",
        ])
        .unwrap();
        assert_eq!(c.train.lr, 2e-4);
        assert_eq!(c.model.image_size, ImageSize::Rect([32, 64]));
        assert_eq!(
            (c.train.cuda_graph, c.train.fused_norm_silu),
            (Lever::On, Lever::Off)
        );
        assert_eq!(c.train.precision, Precision::Bf16Pure);
        assert!(c.data.hflip);
        assert_eq!(c.data.path, "images");
        assert_eq!(c.train.seed, u64::MAX);
        let (o, c) = parse(&["--epochs", "3"]).unwrap();
        assert_eq!((o.epochs, c.train.steps), (Some(3), 3000));
        for refused in [
            &["--epochs", "3", "--steps", "10"][..],
            &["--epochs", "0"],
            &["--hflip"],
            &["--precision", "f16"],
            &["--ch-mult", "1,x"],
            &["--image-size", "big"],
            &["--steps", "-1"],
        ] {
            assert!(parse(refused).is_err(), "{refused:?}");
        }
    }

    #[test]
    fn help_names_the_key_what_is_allowed_and_the_presets_values() {
        let mut command = <Overrides as clap::Args>::augment_args(clap::Command::new("train"));
        let help = command.render_long_help().to_string();
        assert!(
            help.contains("Peak learning rate (AdamW) [train.lr]")
                && help.contains(
                    "Allowed: in (0, 1). Default: 0.001 (tiny), 0.0002 (mnist), 0.0002 (cifar10), 0.0003 (imagenet64), 0.0001 (imagenet256)."
                ),
            "{help}"
        );
        assert!(
            help.contains("--epochs <EPOCHS>") && help.contains("- bf16-pure:"),
            "{help}"
        );
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
    fn errors_name_key_value_and_range_and_carry_the_keys_read() {
        let mut c = RunConfig::of(Preset::Tiny);
        c.train.lr = 1.5;
        let e = c.validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid value for `train.lr`: 1.5 (allowed: in (0, 1))"
        );
        assert_eq!(e.keys(), ["train.lr"]);
        let mut c = RunConfig::of(Preset::Tiny);
        c.sample.steps = 2000;
        let e = c.validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid value for `sample.steps`: 2000 (allowed: in [1, diffusion.timesteps = 1000])"
        );
        assert_eq!(e.keys(), ["sample.steps", "diffusion.timesteps"]);
        c = RunConfig::of(Preset::Tiny);
        c.train.grad_accum = 3;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "invalid value for `train.grad_accum`: 3 (allowed: ≥ 1 and a divisor of train.batch (64))"
        );
        c = RunConfig::of(Preset::Tiny);
        c.model.image_size = ImageSize::Square(30);
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "invalid value for `model.image_size`: 30 (allowed: positive sides divisible by 2^(levels-1) = 4 for 3 levels)"
        );
        c = RunConfig::of(Preset::Tiny);
        c.train.device = "tpu".into();
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "invalid value for `train.device`: \"tpu\" (allowed: auto, cpu, cuda, cuda:N or mps)"
        );
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
    fn a_cuda_graph_is_refused_with_activation_checkpointing() {
        let mut c = RunConfig::preset("tiny").unwrap();
        c.train.activation_checkpointing = true;
        c.train.cuda_graph = Lever::Auto;
        c.validate().unwrap();
        c.train.cuda_graph = Lever::On;
        let error = format!("{:#}", c.validate().unwrap_err());
        assert!(
            error.contains("train.cuda_graph") && error.contains("train.activation_checkpointing"),
            "{error}"
        );
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

    /// docs/configuration.md holds the reference between these markers.
    const BEGIN: &str = "<!-- keys:begin -->\n";
    const END: &str = "<!-- keys:end -->";

    #[test]
    fn the_reference_in_the_docs_is_the_declarations() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
        let text = std::fs::read_to_string(&path).unwrap();
        let (before, rest) = text
            .split_once(BEGIN)
            .expect("docs/configuration.md: no begin marker");
        let (written, after) = rest
            .split_once(END)
            .expect("docs/configuration.md: no end marker");
        let generated = reference();
        if written == generated {
            return;
        }
        if std::env::var("DDPM_BLESS").is_ok_and(|v| v == "1") {
            std::fs::write(&path, format!("{before}{BEGIN}{generated}{END}{after}")).unwrap();
            return;
        }
        panic!(
            "docs/configuration.md's key reference differs from the declarations in src/config/mod.rs; \
             regenerate it with `DDPM_BLESS=1 cargo test --release --lib config::tests::the_reference`"
        );
    }
}

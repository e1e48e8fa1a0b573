//! Interop with Hugging Face diffusers: our UNet and noise schedule ↔ a `DDPMPipeline` folder
//! (`unet/config.json`, `unet/diffusion_pytorch_model.safetensors`,
//! `scheduler/scheduler_config.json`, `model_index.json`).
//!
//! diffusers' `UNet2DModel` with `flip_sin_to_cos = false`, `freq_shift = 1` (our [sin, cos]
//! embedding with frequencies 10000^(−i/(half−1))), one attention head, 32-group GroupNorms with
//! ε = 1e-6 computes exactly our UNet, with `downsample_padding` 1 ↔ `model.downsample_padding =
//! "symmetric"` and 0 (TensorFlow's SAME, as in `google/ddpm-*`) ↔ "bottom-right". The parameters differ in
//! name only, with three twists: diffusers numbers its up blocks in the order they run (deepest
//! first) where we number levels from the top; its attention projections are Linear [C, C]
//! where ours are 1×1 convs [C, C, 1, 1]; and its first level is as wide as its input conv, so
//! our `channel_mult` must start with 1. Anything either side cannot express is refused with
//! the key that differs.
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, Checkpoint, Sidecar};
use crate::config::{
    ClassCount, DdpmVariance, DownsamplePadding, ImageSize, ModelConfig, Prediction, RunConfig,
    ScheduleKind, PRESETS,
};
use crate::model::UNet;

/// The diffusers release whose file layout and defaults this module was checked against.
const DIFFUSERS_VERSION: &str = "0.42.1";
const UNET_CONFIG: &str = "unet/config.json";
const UNET_WEIGHTS: &str = "unet/diffusion_pytorch_model.safetensors";
const SCHEDULER_CONFIG: &str = "scheduler/scheduler_config.json";
const PIPELINE_INDEX: &str = "model_index.json";
/// The exported run's full configuration (diffusers ignores it): training and sampling
/// settings that the diffusers files do not carry come back from it on import.
const RUN_SETTINGS: &str = "ddpm.toml";
/// Our GroupNorms: 32 groups wherever the channels divide by 32, ε = 1e-6.
const NORM_GROUPS: i64 = 32;
const NORM_EPS: f64 = 1e-6;
/// diffusers' `squaredcos_cap_v2` is the cosine schedule with this fixed offset s.
const SQUAREDCOS_S: f64 = 0.008;

/// Whether `path` is a diffusers pipeline folder rather than one of our checkpoints.
pub fn is_diffusers_folder(path: &Path) -> bool {
    path.join(UNET_CONFIG).is_file()
}

/// `unet/config.json`: the arguments of diffusers' `UNet2DModel`. Missing keys take diffusers'
/// defaults (see `Default`), exactly as diffusers reads the file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(default)]
struct UNet2DConfig {
    #[serde(rename = "_class_name")]
    class_name: String,
    #[serde(rename = "_diffusers_version")]
    diffusers_version: String,
    sample_size: Option<ImageSize>,
    in_channels: i64,
    out_channels: i64,
    center_input_sample: bool,
    time_embedding_type: String,
    time_embedding_dim: Option<i64>,
    freq_shift: i64,
    flip_sin_to_cos: bool,
    down_block_types: Vec<String>,
    mid_block_type: Option<String>,
    up_block_types: Vec<String>,
    block_out_channels: Vec<i64>,
    layers_per_block: i64,
    mid_block_scale_factor: f64,
    downsample_padding: i64,
    downsample_type: String,
    upsample_type: String,
    dropout: f64,
    act_fn: String,
    attention_head_dim: Option<i64>,
    norm_num_groups: Option<i64>,
    attn_norm_num_groups: Option<i64>,
    norm_eps: f64,
    resnet_time_scale_shift: String,
    add_attention: bool,
    class_embed_type: Option<String>,
    num_class_embeds: Option<i64>,
    num_train_timesteps: Option<i64>,
    /// Keys not listed above: diffusers' own metadata (`_name_or_path`, …) or unknown ones.
    #[serde(flatten, skip_serializing)]
    other: BTreeMap<String, Value>,
}

impl Default for UNet2DConfig {
    /// `UNet2DModel.__init__`'s defaults in diffusers 0.42.
    fn default() -> Self {
        let strings = |names: &[&str]| names.iter().map(|s| s.to_string()).collect();
        UNet2DConfig {
            class_name: String::new(),
            diffusers_version: String::new(),
            sample_size: None,
            in_channels: 3,
            out_channels: 3,
            center_input_sample: false,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            freq_shift: 0,
            flip_sin_to_cos: true,
            down_block_types: strings(&[
                "DownBlock2D",
                "AttnDownBlock2D",
                "AttnDownBlock2D",
                "AttnDownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2D".into()),
            up_block_types: strings(&[
                "AttnUpBlock2D",
                "AttnUpBlock2D",
                "AttnUpBlock2D",
                "UpBlock2D",
            ]),
            block_out_channels: vec![224, 448, 672, 896],
            layers_per_block: 2,
            mid_block_scale_factor: 1.0,
            downsample_padding: 1,
            downsample_type: "conv".into(),
            upsample_type: "conv".into(),
            dropout: 0.0,
            act_fn: "silu".into(),
            attention_head_dim: Some(8),
            norm_num_groups: Some(32),
            attn_norm_num_groups: None,
            norm_eps: 1e-5,
            resnet_time_scale_shift: "default".into(),
            add_attention: true,
            class_embed_type: None,
            num_class_embeds: None,
            num_train_timesteps: None,
            other: BTreeMap::new(),
        }
    }
}

/// Fails unless `found == wanted`, naming the key, both values as JSON, and why.
fn require<T: PartialEq + Serialize>(key: &str, found: &T, wanted: &T, why: &str) -> Result<()> {
    if found != wanted {
        let show = |v: &T| serde_json::to_string(v).unwrap_or_default();
        bail!(
            "`{key}` is {}, but ddpm's UNet needs {} ({why})",
            show(found),
            show(wanted)
        );
    }
    Ok(())
}

/// Our GroupNorms have 32 groups only where the channels divide by 32, diffusers' have
/// `norm_num_groups` everywhere: the two agree when every level width divides by 32.
fn check_norm_widths(widths: &[i64]) -> Result<()> {
    ensure!(
        widths.iter().all(|w| w % NORM_GROUPS == 0),
        "level widths {widths:?} must all be multiples of {NORM_GROUPS}, the GroupNorm group count"
    );
    Ok(())
}

/// Whether each level (0 = full resolution) has self-attention after its residual blocks.
fn attention_levels(model: &ModelConfig) -> Vec<bool> {
    let min_side = model.image_size.height().min(model.image_size.width());
    (0..model.channel_mult.len())
        .map(|level| model.attention_resolutions.contains(&(min_side >> level)))
        .collect()
}

/// The diffusers block types of one direction: plain, plain with residual resampling, and
/// attending (which resamples as `downsample_type`/`upsample_type` says).
struct BlockTypes {
    key: &'static str,
    plain: &'static str,
    resnet_resampling: &'static str,
    attending: &'static str,
    resample_key: &'static str,
}

const DOWN_BLOCKS: BlockTypes = BlockTypes {
    key: "down_block_types",
    plain: "DownBlock2D",
    resnet_resampling: "ResnetDownsampleBlock2D",
    attending: "AttnDownBlock2D",
    resample_key: "downsample_type",
};

const UP_BLOCKS: BlockTypes = BlockTypes {
    key: "up_block_types",
    plain: "UpBlock2D",
    resnet_resampling: "ResnetUpsampleBlock2D",
    attending: "AttnUpBlock2D",
    resample_key: "upsample_type",
};

impl BlockTypes {
    /// The type of a level that attends or not, resampling with a residual block or not.
    fn name(&self, attends: bool, resnet: bool) -> String {
        match (attends, resnet) {
            (true, _) => self.attending,
            (false, true) => self.resnet_resampling,
            (false, false) => self.plain,
        }
        .to_string()
    }

    /// Whether block `index` of type `found` attends, and whether it resamples with a residual
    /// block (`resample_type` is the config's value for attending blocks).
    fn read(&self, index: usize, found: &str, resample_type: &str) -> Result<(bool, bool)> {
        let resnet = || {
            match resample_type {
            "conv" => Ok(false),
            "resnet" => Ok(true),
            other => bail!("`{}` is {other:?}, but ddpm's UNet resamples with a conv or a residual block (\"conv\" or \"resnet\")", self.resample_key),
        }
        };
        match found {
            t if t == self.plain => Ok((false, false)),
            t if t == self.resnet_resampling => Ok((false, true)),
            t if t == self.attending => Ok((true, resnet()?)),
            other => bail!(
                "`{}`[{index}] is {other:?}, but ddpm's UNet has only {}, {} and {} blocks",
                self.key,
                self.plain,
                self.resnet_resampling,
                self.attending
            ),
        }
    }
}

impl UNet2DConfig {
    /// One down and one up block per level width. A mismatch names both keys, and says where
    /// `block_out_channels` came from: a file without it gets diffusers' default of 4 widths.
    fn check_block_counts(&self) -> Result<()> {
        let levels = self.block_out_channels.len();
        let defaulted = self.block_out_channels == UNet2DConfig::default().block_out_channels;
        let origin = match defaulted {
            true => ", diffusers' default, which applies when the file gives none",
            false => "",
        };
        for (key, blocks) in [
            ("down_block_types", self.down_block_types.len()),
            ("up_block_types", self.up_block_types.len()),
        ] {
            ensure!(
                blocks == levels,
                "`{key}` has {blocks} blocks but `block_out_channels` has {levels} widths ({:?}{origin}): ddpm's UNet needs one block per width",
                self.block_out_channels
            );
        }
        Ok(())
    }

    /// The diffusers description of our UNet, or why diffusers cannot express it.
    fn from_model_config(model: &ModelConfig) -> Result<Self> {
        ensure!(model.channel_mult[0] == 1, "model.channel_mult = {:?} cannot be exported: diffusers' first level is as wide as its input conv, so channel_mult must start with 1", model.channel_mult);
        let block_out_channels: Vec<i64> = model
            .channel_mult
            .iter()
            .map(|m| model.channels * m)
            .collect();
        check_norm_widths(&block_out_channels).context("model.channels × model.channel_mult cannot be exported: diffusers uses one GroupNorm group count for every width")?;
        let attends = attention_levels(model);
        let updown = model.resblock_updown;
        let resample_type = if updown { "resnet" } else { "conv" };
        Ok(UNet2DConfig {
            class_name: "UNet2DModel".into(),
            diffusers_version: DIFFUSERS_VERSION.into(),
            sample_size: Some(model.image_size),
            in_channels: model.in_channels,
            out_channels: model.in_channels,
            freq_shift: 1,
            flip_sin_to_cos: false,
            down_block_types: attends
                .iter()
                .map(|&a| DOWN_BLOCKS.name(a, updown))
                .collect(),
            up_block_types: attends
                .iter()
                .rev()
                .map(|&a| UP_BLOCKS.name(a, updown))
                .collect(),
            downsample_type: resample_type.into(),
            upsample_type: resample_type.into(),
            resnet_time_scale_shift: match model.scale_shift_norm {
                true => "scale_shift",
                false => "default",
            }
            .into(),
            block_out_channels,
            layers_per_block: model.num_res_blocks,
            dropout: model.dropout,
            downsample_padding: match model.downsample_padding {
                DownsamplePadding::Symmetric => 1,
                DownsamplePadding::BottomRight => 0,
            },
            attention_head_dim: (model.head_channels > 0).then_some(model.head_channels),
            // Else diffusers leaves the middle attention of a scale-shift network without norm.
            attn_norm_num_groups: model.scale_shift_norm.then_some(NORM_GROUPS),
            norm_eps: NORM_EPS,
            num_class_embeds: match model.num_classes.resolved() {
                0 => None,
                classes => Some(classes as i64 + 1),
            },
            ..Default::default()
        })
    }

    /// The classes of a class embedding table of `num_class_embeds` rows: its last row is ddpm's
    /// "no class", the unconditional input of classifier-free guidance.
    fn class_count(&self) -> Result<usize> {
        match self.num_class_embeds {
            None => Ok(0),
            Some(rows) if rows >= 2 => Ok(rows as usize - 1),
            Some(rows) => bail!("`num_class_embeds` is {rows}, but ddpm's class embedding has a row per class and one for \"no class\" (at least 2)"),
        }
    }

    /// Our UNet's configuration, or the first key whose value our UNet cannot express.
    fn to_model_config(&self) -> Result<ModelConfig> {
        self.check_layers()?;
        let image_size = self
            .sample_size
            .context("`sample_size` is null, but ddpm's UNet needs the image size")?;
        let widths = &self.block_out_channels;
        let channels = *widths.first().context("`block_out_channels` is empty")?;
        self.check_block_counts()?;
        ensure!(widths.iter().all(|w| *w > 0 && w % channels == 0), "`block_out_channels` is {widths:?}, but ddpm's level widths are channels × channel_mult: every entry must be a multiple of the first");
        check_norm_widths(widths).context("`block_out_channels`")?;
        let levels = widths.len();
        require(
            "time_embedding_dim",
            &self.time_embedding_dim.unwrap_or(4 * channels),
            &(4 * channels),
            "a time embedding 4 × block_out_channels[0] wide",
        )?;
        let mut attention_resolutions = Vec::new();
        let min_side = image_size.height().min(image_size.width());
        // Which levels resample with a residual block; the last level does not resample.
        let mut resnet_resampling = Vec::new();
        for (level, &width) in widths.iter().enumerate() {
            let up = levels - 1 - level;
            let (down_attends, down_resnet) =
                DOWN_BLOCKS.read(level, &self.down_block_types[level], &self.downsample_type)?;
            let (up_attends, up_resnet) =
                UP_BLOCKS.read(up, &self.up_block_types[up], &self.upsample_type)?;
            ensure!(down_attends == up_attends, "`up_block_types`[{up}] is {:?} but `down_block_types`[{level}] is {:?}: ddpm's UNet attends at the same levels on the way down and up", self.up_block_types[up], self.down_block_types[level]);
            if down_attends {
                self.check_heads(width)?;
                attention_resolutions.push(min_side >> level);
            }
            if level + 1 < levels {
                resnet_resampling.push((
                    DOWN_BLOCKS.key,
                    level,
                    &self.down_block_types[level],
                    down_resnet,
                ));
            }
            if up + 1 < levels {
                resnet_resampling.push((UP_BLOCKS.key, up, &self.up_block_types[up], up_resnet));
            }
        }
        self.check_heads(widths[levels - 1])?; // the middle block's attention
        let resblock_updown = resnet_resampling.first().is_some_and(|r| r.3);
        if let (Some(first), Some(other)) = (
            resnet_resampling.first(),
            resnet_resampling.iter().find(|r| r.3 != resblock_updown),
        ) {
            let how = |resnet: bool| if resnet { "a residual block" } else { "a conv" };
            bail!("`{}`[{}] is {:?} and resamples with {}, but `{}`[{}] is {:?} and resamples with {} (downsample_type {:?}, upsample_type {:?}): ddpm's UNet resamples every level the same way", other.0, other.1, other.2, how(other.3), first.0, first.1, first.2, how(first.3), self.downsample_type, self.upsample_type);
        }
        Ok(ModelConfig {
            channels,
            channel_mult: widths.iter().map(|w| w / channels).collect(),
            num_res_blocks: self.layers_per_block,
            attention_resolutions,
            dropout: self.dropout,
            in_channels: self.in_channels,
            image_size,
            num_classes: ClassCount::Count(self.class_count()?),
            head_channels: self.attention_head_dim.unwrap_or(0),
            scale_shift_norm: match self.resnet_time_scale_shift.as_str() {
                "default" => false,
                "scale_shift" => true,
                other => bail!("`resnet_time_scale_shift` is {other:?}, but ddpm's time embedding is added (\"default\") or scales and shifts the norm (\"scale_shift\")"),
            },
            resblock_updown,
            downsample_padding: match self.downsample_padding {
                1 => DownsamplePadding::Symmetric,
                0 => DownsamplePadding::BottomRight,
                other => bail!("`downsample_padding` is {other}, but ddpm's downsampling pads one pixel on every side (1) or on the bottom and right (0)"),
            },
        })
    }

    /// The keys that choose how each layer computes, against the one choice our UNet makes.
    fn check_layers(&self) -> Result<()> {
        require(
            "_class_name",
            &self.class_name.as_str(),
            &"UNet2DModel",
            "the pipeline's UNet class",
        )?;
        if let Some(key) = self.other.keys().find(|k| !k.starts_with('_')) {
            bail!("unknown key `{key}` (ddpm knows the UNet2DModel keys of diffusers {DIFFUSERS_VERSION})");
        }
        require(
            "time_embedding_type",
            &self.time_embedding_type.as_str(),
            &"positional",
            "a sinusoidal time embedding",
        )?;
        require(
            "flip_sin_to_cos",
            &self.flip_sin_to_cos,
            &false,
            "the embedding is [sin, cos]",
        )?;
        require(
            "freq_shift",
            &self.freq_shift,
            &1,
            "frequencies 10000^(−i/(half−1))",
        )?;
        require(
            "center_input_sample",
            &self.center_input_sample,
            &false,
            "inputs are used as given",
        )?;
        require("act_fn", &self.act_fn.as_str(), &"silu", "SiLU activations")?;
        require(
            "norm_num_groups",
            &self.norm_num_groups,
            &Some(NORM_GROUPS),
            "its GroupNorms have 32 groups",
        )?;
        match self.attn_norm_num_groups {
            Some(groups) => require(
                "attn_norm_num_groups",
                &groups,
                &NORM_GROUPS,
                "its GroupNorms have 32 groups",
            )?,
            // diffusers' middle attention then has no GroupNorm.
            None if self.resnet_time_scale_shift != "default" => bail!("`attn_norm_num_groups` is null, which with `resnet_time_scale_shift` {:?} leaves the middle block's attention without a GroupNorm; ddpm's attention has one (32)", self.resnet_time_scale_shift),
            None => {}
        }
        require(
            "norm_eps",
            &self.norm_eps,
            &NORM_EPS,
            "the ε of its GroupNorms",
        )?;
        require(
            "mid_block_type",
            &self.mid_block_type.as_deref(),
            &Some("UNetMidBlock2D"),
            "a residual–attention–residual middle",
        )?;
        require(
            "mid_block_scale_factor",
            &self.mid_block_scale_factor,
            &1.0,
            "unscaled residual sums",
        )?;
        require(
            "add_attention",
            &self.add_attention,
            &true,
            "attention in the middle block",
        )?;
        require(
            "class_embed_type",
            &self.class_embed_type,
            &None,
            "a class embedding table (num_class_embeds) or none",
        )?;
        ensure!(
            [1, 3].contains(&self.in_channels),
            "`in_channels` is {}, but ddpm's UNet works on 1- or 3-channel images",
            self.in_channels
        );
        require(
            "out_channels",
            &self.out_channels,
            &self.in_channels,
            "it predicts an image-shaped ε, x₀ or v, the same as in_channels",
        )?;
        ensure!(
            self.layers_per_block >= 1,
            "`layers_per_block` is {}, expected at least 1",
            self.layers_per_block
        );
        Ok(())
    }

    /// diffusers splits `width` channels into width / attention_head_dim heads (null: one),
    /// dropping the remainder; ddpm's heads cover every channel.
    fn check_heads(&self, width: i64) -> Result<()> {
        match self.attention_head_dim {
            Some(dim) if dim <= 0 || width % dim != 0 => bail!("`attention_head_dim` is {dim}, which does not divide the attention's {width} channels into whole heads; ddpm's heads cover every channel"),
            _ => Ok(()),
        }
    }
}

/// `scheduler/scheduler_config.json`. Only the keys that define the forward process, the
/// prediction target and DDPM's variance carry meaning for us; other sampling options
/// (`timestep_spacing`, `thresholding`, …) are diffusers' own and pass unread.
#[derive(Debug, Serialize, Deserialize)]
#[serde(default)]
struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    class_name: String,
    #[serde(rename = "_diffusers_version")]
    diffusers_version: String,
    num_train_timesteps: usize,
    beta_start: f64,
    beta_end: f64,
    beta_schedule: String,
    trained_betas: Option<Vec<f64>>,
    rescale_betas_zero_snr: bool,
    prediction_type: String,
    variance_type: String,
    /// Our samplers clip x̂₀ to [−1, 1]: written so, never read.
    clip_sample: bool,
    clip_sample_range: f64,
}

impl Default for SchedulerConfig {
    /// `DDPMScheduler.__init__`'s defaults in diffusers 0.42.
    fn default() -> Self {
        SchedulerConfig {
            class_name: String::new(),
            diffusers_version: String::new(),
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            rescale_betas_zero_snr: false,
            prediction_type: "epsilon".into(),
            variance_type: "fixed_small".into(),
            clip_sample: true,
            clip_sample_range: 1.0,
        }
    }
}

impl SchedulerConfig {
    /// A DDPMScheduler with our schedule, or why diffusers cannot express it.
    fn from_run_config(config: &RunConfig) -> Result<Self> {
        let d = &config.diffusion;
        let beta_schedule = match d.schedule {
            ScheduleKind::Linear => "linear",
            ScheduleKind::Sigmoid => "sigmoid",
            ScheduleKind::Cosine => {
                ensure!(d.cosine_s == SQUAREDCOS_S, "diffusion.cosine_s = {} cannot be exported: diffusers' cosine schedule (squaredcos_cap_v2) fixes s = {SQUAREDCOS_S}", d.cosine_s);
                "squaredcos_cap_v2"
            }
        };
        let prediction_type = match d.prediction {
            Prediction::Epsilon => "epsilon",
            Prediction::X0 => "sample",
            Prediction::V => "v_prediction",
        };
        let variance_type = match config.sample.ddpm_variance {
            DdpmVariance::Beta => "fixed_large",
            DdpmVariance::Posterior => "fixed_small",
        };
        Ok(SchedulerConfig {
            class_name: "DDPMScheduler".into(),
            diffusers_version: DIFFUSERS_VERSION.into(),
            num_train_timesteps: d.timesteps,
            beta_start: d.beta_start,
            beta_end: d.beta_end,
            beta_schedule: beta_schedule.into(),
            prediction_type: prediction_type.into(),
            variance_type: variance_type.into(),
            ..Default::default()
        })
    }

    /// Sets our diffusion schedule, prediction and DDPM variance from this scheduler.
    fn apply_to(&self, config: &mut RunConfig) -> Result<()> {
        ensure!(
            ["DDPMScheduler", "DDIMScheduler"].contains(&self.class_name.as_str()),
            "`_class_name` is {:?}, but ddpm reads DDPMScheduler and DDIMScheduler configurations",
            self.class_name
        );
        ensure!(
            self.trained_betas.is_none(),
            "`trained_betas` is set, but ddpm's schedules are linear, cosine or sigmoid"
        );
        require(
            "rescale_betas_zero_snr",
            &self.rescale_betas_zero_snr,
            &false,
            "its schedules are used as defined",
        )?;
        let d = &mut config.diffusion;
        d.timesteps = self.num_train_timesteps;
        d.beta_start = self.beta_start;
        d.beta_end = self.beta_end;
        d.schedule = match self.beta_schedule.as_str() {
            "linear" => ScheduleKind::Linear,
            "sigmoid" => ScheduleKind::Sigmoid,
            "squaredcos_cap_v2" => {
                d.cosine_s = SQUAREDCOS_S;
                ScheduleKind::Cosine
            }
            other => bail!("`beta_schedule` is {other:?}, but ddpm has linear, squaredcos_cap_v2 (cosine) and sigmoid"),
        };
        d.prediction = match self.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "sample" => Prediction::X0,
            "v_prediction" => Prediction::V,
            other => bail!("`prediction_type` is {other:?}, but ddpm predicts epsilon, sample (x₀) or v_prediction"),
        };
        config.sample.ddpm_variance = match self.variance_type.as_str() {
            "fixed_small" | "fixed_small_log" => DdpmVariance::Posterior,
            "fixed_large" | "fixed_large_log" => DdpmVariance::Beta,
            other => bail!("`variance_type` is {other:?}, but ddpm's DDPM sampler has the fixed variances fixed_small (posterior) and fixed_large (β)"),
        };
        Ok(())
    }
}

/// Where one of our parameters lives in a diffusers `UNet2DModel`.
#[derive(Debug, PartialEq)]
struct DiffusersTensor {
    name: String,
    /// An attention projection: Linear [C, C] there, 1×1 conv [C, C, 1, 1] here.
    linear: bool,
}

impl DiffusersTensor {
    /// Its shape in diffusers, given ours.
    fn shape(&self, ours: &[i64]) -> Vec<i64> {
        if self.linear {
            ours[..2].to_vec()
        } else {
            ours.to_vec()
        }
    }
}

fn resnet_layer(layer: &str) -> Option<&'static str> {
    Some(match layer {
        "norm1" => "norm1",
        "conv1" => "conv1",
        "temb_proj" => "time_emb_proj",
        "norm2" => "norm2",
        "conv2" => "conv2",
        "nin_shortcut" => "conv_shortcut",
        _ => return None,
    })
}

/// The diffusers layer of an attention block, and whether it is a Linear.
fn attention_layer(layer: &str) -> Option<(&'static str, bool)> {
    Some(match layer {
        "norm" => ("group_norm", false),
        "q" => ("to_q", true),
        "k" => ("to_k", true),
        "v" => ("to_v", true),
        "proj_out" => ("to_out.0", true),
        _ => return None,
    })
}

/// The diffusers counterpart of our parameter `ours` in a UNet with `levels` levels.
fn diffusers_tensor(ours: &str, levels: usize) -> Result<DiffusersTensor> {
    let unknown = || anyhow::anyhow!("parameter {ours} has no diffusers counterpart");
    let (module, param) = ours.rsplit_once('.').ok_or_else(unknown)?;
    let parts: Vec<&str> = module.split('.').collect();
    // diffusers' up blocks run deepest first: our level l is its up block levels − 1 − l.
    let up_block = |level: &str| {
        level
            .parse::<usize>()
            .ok()
            .and_then(|l| (levels - 1).checked_sub(l))
            .ok_or_else(unknown)
    };
    let resnet = |prefix: String, layer: &str| {
        resnet_layer(layer)
            .map(|l| (format!("{prefix}.{l}"), false))
            .ok_or_else(unknown)
    };
    let attention = |prefix: String, layer: &str| {
        attention_layer(layer)
            .map(|(l, linear)| (format!("{prefix}.{l}"), linear))
            .ok_or_else(unknown)
    };
    let plain = |name: String| Ok((name, false));
    let (module, linear) = match parts.as_slice() {
        ["temb", "dense", "0"] => plain("time_embedding.linear_1".into()),
        ["temb", "dense", "1"] => plain("time_embedding.linear_2".into()),
        ["conv_in"] => plain("conv_in".into()),
        ["class_embedding"] => plain("class_embedding".into()),
        ["norm_out"] => plain("conv_norm_out".into()),
        ["conv_out"] => plain("conv_out".into()),
        ["down", level, "block", i, layer] => {
            resnet(format!("down_blocks.{level}.resnets.{i}"), layer)
        }
        ["down", level, "attn", i, layer] => {
            attention(format!("down_blocks.{level}.attentions.{i}"), layer)
        }
        ["down", level, "downsample", "conv"] => {
            plain(format!("down_blocks.{level}.downsamplers.0.conv"))
        }
        ["down", level, "downsample", layer] => {
            resnet(format!("down_blocks.{level}.downsamplers.0"), layer)
        }
        ["mid", "block_1", layer] => resnet("mid_block.resnets.0".into(), layer),
        ["mid", "attn_1", layer] => attention("mid_block.attentions.0".into(), layer),
        ["mid", "block_2", layer] => resnet("mid_block.resnets.1".into(), layer),
        ["up", level, "block", i, layer] => {
            resnet(format!("up_blocks.{}.resnets.{i}", up_block(level)?), layer)
        }
        ["up", level, "attn", i, layer] => attention(
            format!("up_blocks.{}.attentions.{i}", up_block(level)?),
            layer,
        ),
        ["up", level, "upsample", "conv"] => {
            plain(format!("up_blocks.{}.upsamplers.0.conv", up_block(level)?))
        }
        ["up", level, "upsample", layer] => resnet(
            format!("up_blocks.{}.upsamplers.0", up_block(level)?),
            layer,
        ),
        _ => Err(unknown()),
    }?;
    Ok(DiffusersTensor {
        name: format!("{module}.{param}"),
        linear: linear && param == "weight",
    })
}

/// One parameter of our UNet: its name, its shape, and where diffusers keeps it.
struct Parameter {
    name: String,
    shape: Vec<i64>,
    diffusers: DiffusersTensor,
}

/// Every parameter of the UNet that `model` describes, in name order.
fn parameters(model: &ModelConfig) -> Result<Vec<Parameter>> {
    let vs = VarStore::new(Device::Cpu);
    let _ = UNet::new(&vs.root(), model);
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    let levels = model.channel_mult.len();
    variables
        .into_iter()
        .map(|(name, t)| {
            Ok(Parameter {
                diffusers: diffusers_tensor(&name, levels)?,
                shape: t.size(),
                name,
            })
        })
        .collect()
}

/// Fails with the tensors one side lacks and the other has left over, if any.
fn check_complete(origin: &str, missing: &[String], unexpected: &[String]) -> Result<()> {
    let list = |names: &[String]| {
        const SHOWN: usize = 20;
        let more = names.len().saturating_sub(SHOWN);
        let shown = names[..names.len().min(SHOWN)].join(", ");
        if more > 0 {
            format!("{shown} and {more} more")
        } else {
            shown
        }
    };
    match (missing.is_empty(), unexpected.is_empty()) {
        (true, true) => Ok(()),
        (false, true) => bail!(
            "{origin} lacks {} tensor(s): {}",
            missing.len(),
            list(missing)
        ),
        (true, false) => bail!(
            "{origin} has {} tensor(s) ddpm's UNet does not: {}",
            unexpected.len(),
            list(unexpected)
        ),
        (false, false) => bail!(
            "{origin} lacks {} tensor(s): {}; and has {} that ddpm's UNet does not: {}",
            missing.len(),
            list(missing),
            unexpected.len(),
            list(unexpected)
        ),
    }
}

/// Writes a checkpoint's weights (EMA or raw) and schedule as a diffusers DDPMPipeline folder
/// in `out`. Nothing is written when diffusers cannot express the model or schedule.
pub fn export_diffusers(checkpoint: &Checkpoint, ema: bool, out: &Path) -> Result<()> {
    let config = &checkpoint.sidecar.config;
    let origin = checkpoint.path.display();
    let unet = UNet2DConfig::from_model_config(&config.model)
        .with_context(|| format!("{origin}: diffusers cannot express this UNet"))?;
    let scheduler = SchedulerConfig::from_run_config(config)
        .with_context(|| format!("{origin}: diffusers cannot express this schedule"))?;
    let tensors = diffusers_weights(checkpoint, if ema { "ema." } else { "model." })?;
    let holds_files = fs::read_dir(out).is_ok_and(|mut d| d.next().is_some());
    if holds_files && !out.join(PIPELINE_INDEX).is_file() {
        bail!(
            "{} is a folder with other files in it: export into a new folder (an earlier export may be replaced)",
            out.display()
        );
    }
    if holds_files {
        tracing::info!("replacing the earlier export in {}", out.display());
    }
    for sub in ["unet", "scheduler"] {
        fs::create_dir_all(out.join(sub))
            .with_context(|| format!("cannot create {}", out.join(sub).display()))?;
    }
    checkpoint::write_atomic(
        &out.join(UNET_WEIGHTS),
        &checkpoint::to_safetensors(&tensors)?,
    )?;
    write_json(&out.join(UNET_CONFIG), &unet)?;
    write_json(&out.join(SCHEDULER_CONFIG), &scheduler)?;
    checkpoint::write_atomic(&out.join(RUN_SETTINGS), config.to_toml().as_bytes())?;
    let index = json!({"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION, "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]});
    write_json(&out.join(PIPELINE_INDEX), &index)
}

/// The checkpoint's weights under `prefix` (`ema.` or `model.`), named and shaped as diffusers'.
fn diffusers_weights(checkpoint: &Checkpoint, prefix: &str) -> Result<Vec<(String, Tensor)>> {
    let origin = checkpoint.path.display();
    let parameters = parameters(&checkpoint.sidecar.config.model)?;
    let mut tensors = Vec::with_capacity(parameters.len());
    let mut missing = Vec::new();
    for p in &parameters {
        let name = format!("{prefix}{}", p.name);
        match checkpoint.tensors.get(&name) {
            None => missing.push(name),
            Some(t) => {
                ensure!(
                    t.size() == p.shape,
                    "{origin}: tensor {name} has shape {:?}, but its configuration makes it {:?}",
                    t.size(),
                    p.shape
                );
                tensors.push((
                    p.diffusers.name.clone(),
                    t.reshape(p.diffusers.shape(&p.shape)),
                ));
            }
        }
    }
    let ours: BTreeSet<String> = parameters
        .iter()
        .map(|p| format!("{prefix}{}", p.name))
        .collect();
    let unexpected: Vec<String> = checkpoint
        .tensors
        .keys()
        .filter(|k| k.starts_with(prefix) && !ours.contains(*k))
        .cloned()
        .collect();
    check_complete(&origin.to_string(), &missing, &unexpected)?;
    Ok(tensors)
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)? + "\n";
    checkpoint::write_atomic(path, text.as_bytes())
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid diffusers configuration", path.display()))
}

/// A diffusers pipeline folder, read into our configuration and parameter names.
pub struct DiffusersModel {
    /// The folder it was read from.
    pub source: PathBuf,
    /// Our configuration: the UNet and schedule from the folder; training and sampling settings
    /// from the exported run's `ddpm.toml`, else from the preset of the same architecture (else
    /// `mnist` for grayscale, `cifar10` for colour).
    pub config: RunConfig,
    /// Where the training and sampling settings came from, in words.
    pub settings_source: String,
    /// Our parameter names → f32 CPU tensors, exactly the values in the file.
    pub weights: BTreeMap<String, Tensor>,
    weights_sha256: String,
}

impl DiffusersModel {
    /// Reads `dir` (holding `unet/config.json`, `unet/diffusion_pytorch_model.safetensors` and
    /// `scheduler/scheduler_config.json`), refusing what our UNet cannot compute exactly.
    pub fn read(dir: &Path) -> Result<Self> {
        let unet_path = dir.join(UNET_CONFIG);
        ensure!(
            unet_path.is_file(),
            "{} is not a diffusers pipeline folder: it has no {UNET_CONFIG}",
            dir.display()
        );
        let unet: UNet2DConfig = read_json(&unet_path)?;
        let model = unet.to_model_config().with_context(|| {
            format!(
                "{} describes a UNet that ddpm cannot compute",
                unet_path.display()
            )
        })?;
        let scheduler_path = dir.join(SCHEDULER_CONFIG);
        let scheduler: SchedulerConfig = read_json(&scheduler_path)?;
        let settings_path = dir.join(RUN_SETTINGS);
        let (mut config, settings_source) = match settings_path.is_file() {
            true => {
                let mut exported = RunConfig::from_toml_file(&settings_path, None)?;
                // Paths and devices of the machine it was exported on are not this one's.
                let here = RunConfig::preset(&exported.preset)?;
                exported.data.path = here.data.path;
                exported.train.device = here.train.device;
                exported.fid.inception = here.fid.inception;
                (
                    exported,
                    format!("the exported run's {}", settings_path.display()),
                )
            }
            false => {
                let base = base_config(&model);
                let source = format!("the {} preset", base.preset);
                (base, source)
            }
        };
        config.model = model;
        scheduler.apply_to(&mut config).with_context(|| {
            format!(
                "{} describes a schedule that ddpm does not have",
                scheduler_path.display()
            )
        })?;
        config.sample.steps = config.sample.steps.min(config.diffusion.timesteps);
        config
            .validate()
            .with_context(|| format!("the configuration read from {}", dir.display()))?;
        let (weights, weights_sha256) = read_weights(&dir.join(UNET_WEIGHTS), &config.model)?;
        Ok(DiffusersModel {
            source: dir.to_path_buf(),
            config,
            settings_source,
            weights,
            weights_sha256,
        })
    }

    /// A checkpoint in memory for sampling: the weights serve as both raw and EMA weights.
    pub fn into_checkpoint(self) -> Checkpoint {
        let weights_path = self.source.join(UNET_WEIGHTS);
        let written_at = fs::metadata(&weights_path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let sidecar = Sidecar {
            format_version: checkpoint::FORMAT_VERSION,
            step: 0,
            position: Default::default(),
            config: self.config,
            ddpm_version: env!("CARGO_PKG_VERSION").into(),
            torch_version: crate::ops::torch_version(),
            written_at,
            tensors_file: UNET_WEIGHTS.into(),
            tensors_sha256: self.weights_sha256,
            classes: Vec::new(),
            sidecar_sha256: None,
        };
        let mut tensors = BTreeMap::new();
        for (name, t) in self.weights {
            tensors.insert(format!("model.{name}"), t.shallow_clone());
            tensors.insert(format!("ema.{name}"), t);
        }
        Checkpoint {
            path: self.source,
            sidecar,
            tensors,
        }
    }
}

/// The preset whose UNet has `model`'s architecture (dropout aside), else the one for its
/// kind of images: `mnist` for grayscale, `cifar10` (the DDPM paper's) for colour.
fn base_config(model: &ModelConfig) -> RunConfig {
    let same_architecture = |p: &RunConfig| {
        ModelConfig {
            dropout: model.dropout,
            ..p.model.clone()
        } == *model
    };
    PRESETS
        .iter()
        .map(|name| RunConfig::preset(name).expect("presets exist"))
        .find(same_architecture)
        .unwrap_or_else(|| {
            let name = if model.in_channels == 1 {
                "mnist"
            } else {
                "cifar10"
            };
            RunConfig::preset(name).expect("presets exist")
        })
}

/// Reads diffusers' weights file into our names and shapes (as f32), and its SHA-256.
fn read_weights(path: &Path, model: &ModelConfig) -> Result<(BTreeMap<String, Tensor>, String)> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {} (diffusers' safetensors weights; a folder with only a .bin file must first be re-saved with save_pretrained(..., safe_serialization=True))", path.display()))?;
    let theirs = checkpoint::from_safetensors(&bytes, path)?;
    let weights = in_our_names(theirs, model, &path.display().to_string())?;
    Ok((weights, checkpoint::sha256_hex(&bytes)))
}

/// A diffusers UNet's tensors (all of them, nothing else) under our names and shapes, as f32;
/// `origin` names where they came from in errors.
pub(crate) fn in_our_names(
    mut theirs: BTreeMap<String, Tensor>,
    model: &ModelConfig,
    origin: &str,
) -> Result<BTreeMap<String, Tensor>> {
    let mut weights = BTreeMap::new();
    let mut missing = Vec::new();
    for p in parameters(model)? {
        let Some(t) = theirs.remove(&p.diffusers.name) else {
            missing.push(p.diffusers.name);
            continue;
        };
        let expected = p.diffusers.shape(&p.shape);
        ensure!(
            t.size() == expected,
            "{origin}: tensor {} has shape {:?}, but unet/config.json makes it {expected:?}",
            p.diffusers.name,
            t.size()
        );
        ensure!(
            t.is_floating_point(),
            "{origin}: tensor {} is {:?}, expected floating point",
            p.diffusers.name,
            t.kind()
        );
        weights.insert(p.name, t.to_kind(Kind::Float).reshape(&p.shape));
    }
    let unexpected: Vec<String> = theirs.into_keys().collect();
    check_complete(origin, &missing, &unexpected)?;
    Ok(weights)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Position;
    use crate::schedule::NoiseSchedule;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusers")
    }

    fn fixture_tensors(name: &str) -> BTreeMap<String, Tensor> {
        let path = fixtures().join(name);
        checkpoint::from_safetensors(&fs::read(&path).unwrap(), &path).unwrap()
    }

    fn fixture_unet_json() -> serde_json::Map<String, Value> {
        serde_json::from_str(
            &fs::read_to_string(fixtures().join("tiny-pipeline").join(UNET_CONFIG)).unwrap(),
        )
        .unwrap()
    }

    fn read_unet(json: serde_json::Map<String, Value>) -> Result<ModelConfig> {
        serde_json::from_value::<UNet2DConfig>(Value::Object(json))?.to_model_config()
    }

    #[test]
    fn forward_matches_diffusers_on_the_fixture() {
        // Building a UNet draws from libtorch's process-wide generator: stay out of the way of
        // tests that compare random streams.
        let _rng = crate::rng::exclusive();
        let _guard = tch::no_grad_guard();
        let checkpoint = DiffusersModel::read(&fixtures().join("tiny-pipeline"))
            .unwrap()
            .into_checkpoint();
        let network = crate::train::load_for_sampling(&checkpoint, true, Device::Cpu).unwrap();
        let io = fixture_tensors("parity.safetensors");
        let ours = network
            .model
            .forward(&io["sample"], &io["timestep"], None, false);
        let theirs = &io["output"];
        let relative =
            (&ours - theirs).abs().max().double_value(&[]) / theirs.abs().max().double_value(&[]);
        eprintln!("max |ours − diffusers| / max |diffusers| = {relative:.3e}");
        assert!(relative < 1e-4, "relative difference {relative:e}");
    }

    /// Our network, loaded from a class-conditional diffusers fixture, on the fixture's
    /// inputs: the checkpoint, our output, diffusers', and their largest difference relative
    /// to diffusers' largest value.
    fn class_fixture_forward(
        pipeline: &str,
        io: &BTreeMap<String, Tensor>,
    ) -> (Checkpoint, Tensor, f64) {
        let checkpoint = DiffusersModel::read(&fixtures().join(pipeline))
            .unwrap()
            .into_checkpoint();
        let network = crate::train::load_for_sampling(&checkpoint, true, Device::Cpu).unwrap();
        let ours = network.model.forward(
            &io["sample"],
            &io["timestep"],
            Some(&io["class_labels"]),
            false,
        );
        let theirs = &io["output"];
        let relative =
            (&ours - theirs).abs().max().double_value(&[]) / theirs.abs().max().double_value(&[]);
        (checkpoint, ours, relative)
    }

    #[test]
    fn class_conditional_forward_matches_diffusers_on_the_fixture() {
        let _rng = crate::rng::exclusive();
        let _guard = tch::no_grad_guard();
        let io = fixture_tensors("class-parity.safetensors");
        let (checkpoint, ours, relative) = class_fixture_forward("tiny-class-pipeline", &io);
        // diffusers' 4 rows are 3 classes and ddpm's "no class", the last.
        assert_eq!(
            checkpoint.sidecar.config.model.num_classes,
            ClassCount::Count(3)
        );
        let network = crate::train::load_for_sampling(&checkpoint, true, Device::Cpu).unwrap();
        assert_eq!(network.model.null_class(), 3);
        assert_eq!(network.class_names, ["0", "1", "2"]);
        let theirs = &io["output"];
        assert!(relative < 1e-5, "relative difference {relative:e}");
        // The classes change the output: a network that ignored them would not match.
        let unconditional = network
            .model
            .forward(&io["sample"], &io["timestep"], None, false);
        assert!((&unconditional - theirs).abs().max().double_value(&[]) > 1e-3);
        // No class given is the "no class" row, the fixture's third input.
        assert!(unconditional
            .narrow(0, 2, 1)
            .allclose(&ours.narrow(0, 2, 1), 1e-6, 1e-6, false));
    }

    /// Several heads, attention at two resolutions, scale-shift norms and residual resampling,
    /// against diffusers' UNet2DModel with the same options.
    #[test]
    fn adm_options_forward_matches_diffusers_on_the_fixture() {
        let _rng = crate::rng::exclusive();
        let _guard = tch::no_grad_guard();
        let io = fixture_tensors("adm-parity.safetensors");
        let (checkpoint, ours, relative) = class_fixture_forward("tiny-adm-pipeline", &io);
        let model = &checkpoint.sidecar.config.model;
        assert_eq!(model.attention_resolutions, [16, 4]);
        assert_eq!(model.head_channels, 16);
        assert!(model.scale_shift_norm && model.resblock_updown);
        eprintln!("max |ours − diffusers| / max |diffusers| = {relative:.3e}");
        assert!(relative < 1e-5, "relative difference {relative:e}");
        // One head over the same weights computes something else: the heads are tested.
        let mut one_head = checkpoint;
        one_head.sidecar.config.model.head_channels = 0;
        let network = crate::train::load_for_sampling(&one_head, true, Device::Cpu).unwrap();
        let other = network.model.forward(
            &io["sample"],
            &io["timestep"],
            Some(&io["class_labels"]),
            false,
        );
        assert!((&other - &ours).abs().max().double_value(&[]) > 1e-3);
    }

    /// The imagenet presets are ADM's published networks: the UNet2DModel arguments
    /// equivalent to them give diffusers' parameter count, and ours is the same.
    #[test]
    fn imagenet_presets_are_the_adm_networks_diffusers_counts() {
        let presets: Value =
            serde_json::from_str(&fs::read_to_string(fixtures().join("adm_presets.json")).unwrap())
                .unwrap();
        for name in ["imagenet64", "imagenet256"] {
            let model = RunConfig::preset(name).unwrap().model;
            let ours =
                serde_json::to_value(UNet2DConfig::from_model_config(&model).unwrap()).unwrap();
            for (key, theirs) in presets[name]["arguments"].as_object().unwrap() {
                assert_eq!(&ours[key], theirs, "{name}: {key}");
            }
            let counted: i64 = parameters(&model)
                .unwrap()
                .iter()
                .map(|p| p.shape.iter().product::<i64>())
                .sum();
            assert_eq!(
                counted,
                presets[name]["parameters"].as_i64().unwrap(),
                "{name}"
            );
        }
    }

    #[test]
    fn a_class_table_without_room_for_no_class_is_refused() {
        let mut json = fixture_unet_json();
        json.insert("num_class_embeds".into(), json!(1));
        let e = format!("{:#}", read_unet(json).unwrap_err());
        assert!(
            e.contains("num_class_embeds") && e.contains("no class"),
            "{e}"
        );
    }

    #[test]
    fn a_config_without_block_out_channels_is_told_where_its_widths_came_from() {
        let mut json = fixture_unet_json();
        json.remove("block_out_channels");
        let e = read_unet(json).unwrap_err().to_string();
        assert!(
            e.contains("`block_out_channels` has 4 widths")
                && e.contains("diffusers' default, which applies when the file gives none"),
            "{e}"
        );
    }

    #[test]
    fn the_fixture_reads_into_our_configuration() {
        let _rng = crate::rng::exclusive();
        let model = DiffusersModel::read(&fixtures().join("tiny-pipeline")).unwrap();
        let (m, d) = (&model.config.model, &model.config.diffusion);
        assert_eq!(
            (
                m.channels,
                m.channel_mult.clone(),
                m.num_res_blocks,
                m.attention_resolutions.clone()
            ),
            (32, vec![1, 1], 1, vec![8])
        );
        assert_eq!(
            (m.in_channels, m.image_size, m.dropout),
            (3, ImageSize::Square(16), 0.0)
        );
        assert_eq!(
            (d.timesteps, d.schedule, d.cosine_s, d.prediction),
            (1000, ScheduleKind::Cosine, SQUAREDCOS_S, Prediction::V)
        );
        assert_eq!(model.config.sample.ddpm_variance, DdpmVariance::Posterior);
        assert!(model.weights.values().all(|t| t.kind() == Kind::Float));
    }

    #[test]
    fn our_schedules_are_diffusers_betas() {
        let betas = fixture_tensors("parity.safetensors");
        let mut config = RunConfig::preset("cifar10").unwrap();
        for (kind, name) in [
            (ScheduleKind::Linear, "linear"),
            (ScheduleKind::Cosine, "squaredcos_cap_v2"),
            (ScheduleKind::Sigmoid, "sigmoid"),
        ] {
            config.diffusion.schedule = kind;
            let ours = Tensor::from_slice(&NoiseSchedule::from_config(&config.diffusion).betas);
            let theirs = betas[&format!("betas.{name}")].to_kind(Kind::Double);
            let relative = ((&ours - &theirs) / &theirs).abs().max().double_value(&[]);
            assert!(relative < 1e-5, "{name}: relative difference {relative:e}");
            // And the exported scheduler names the schedule diffusers computes these betas for.
            assert_eq!(
                SchedulerConfig::from_run_config(&config)
                    .unwrap()
                    .beta_schedule,
                name
            );
        }
    }

    #[test]
    fn cifar10_names_and_shapes_are_diffusers() {
        let _rng = crate::rng::exclusive();
        let text = fs::read_to_string(fixtures().join("cifar10_tensor_shapes.json")).unwrap();
        let theirs: BTreeMap<String, Vec<i64>> = serde_json::from_str(&text).unwrap();
        let ours: BTreeMap<String, Vec<i64>> =
            parameters(&RunConfig::preset("cifar10").unwrap().model)
                .unwrap()
                .into_iter()
                .map(|p| (p.diffusers.name.clone(), p.diffusers.shape(&p.shape)))
                .collect();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn preset_configurations_round_trip_through_diffusers() {
        for name in PRESETS {
            let model = RunConfig::preset(name).unwrap().model;
            assert_eq!(
                UNet2DConfig::from_model_config(&model)
                    .unwrap()
                    .to_model_config()
                    .unwrap(),
                model,
                "{name}"
            );
        }
        let cifar10 =
            UNet2DConfig::from_model_config(&RunConfig::preset("cifar10").unwrap().model).unwrap();
        assert_eq!(
            cifar10.down_block_types,
            [
                "DownBlock2D",
                "AttnDownBlock2D",
                "DownBlock2D",
                "DownBlock2D"
            ]
        );
        assert_eq!(
            cifar10.up_block_types,
            ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
        );
        assert_eq!(cifar10.block_out_channels, [128, 256, 256, 256]);
    }

    /// A checkpoint of a small random model whose raw and EMA weights differ.
    fn random_checkpoint(dir: &Path, config: &RunConfig) -> Checkpoint {
        let vs = VarStore::new(Device::Cpu);
        let _ = UNet::new(&vs.root(), &config.model);
        let mut tensors = Vec::new();
        for (name, t) in vs.variables() {
            // Random, not initial: zero-initialised layers would hide a swapped name.
            tensors.push((format!("ema.{name}"), t.randn_like()));
            tensors.push((format!("model.{name}"), t.randn_like()));
        }
        let path = checkpoint::save(dir, &tensors, 7, Position::default(), config, &[]).unwrap();
        Checkpoint::load(&path).unwrap()
    }

    /// Exports the raw or EMA weights to `out` and imports them back, checking that the
    /// network and every weight came back as they were.
    fn export_and_import(checkpoint: &Checkpoint, ema: bool, out: &Path) -> DiffusersModel {
        export_diffusers(checkpoint, ema, out).unwrap();
        let back = DiffusersModel::read(out).unwrap();
        assert_eq!(back.config.model, checkpoint.sidecar.config.model);
        assert_eq!(back.weights.len() * 2, checkpoint.tensors.len());
        let prefix = if ema { "ema." } else { "model." };
        for (name, t) in &back.weights {
            assert!(
                t.equal(&checkpoint.tensors[&format!("{prefix}{name}")]),
                "{name}"
            );
        }
        back
    }

    #[test]
    fn the_options_for_large_images_go_to_diffusers_and_come_back() {
        let _rng = crate::rng::exclusive();
        let dir = tempfile::tempdir().unwrap();
        let mut config = RunConfig::preset("tiny").unwrap();
        config.model.channel_mult = vec![1, 2, 2];
        config.model.attention_resolutions = vec![16, 4];
        config.model.head_channels = 16;
        config.model.scale_shift_norm = true;
        config.model.resblock_updown = true;
        config.model.num_classes = ClassCount::Count(2);
        let checkpoint = random_checkpoint(&dir.path().join("run"), &config);
        export_and_import(&checkpoint, true, &dir.path().join("export"));
        let unet: UNet2DConfig = read_json(&dir.path().join("export").join(UNET_CONFIG)).unwrap();
        assert_eq!(unet.attention_head_dim, Some(16));
        assert_eq!(unet.resnet_time_scale_shift, "scale_shift");
        assert_eq!(
            unet.down_block_types,
            [
                "AttnDownBlock2D",
                "ResnetDownsampleBlock2D",
                "AttnDownBlock2D"
            ]
        );
        assert_eq!(
            (unet.downsample_type.as_str(), unet.upsample_type.as_str()),
            ("resnet", "resnet")
        );
    }

    #[test]
    fn export_then_import_is_bitwise_exact() {
        let _rng = crate::rng::exclusive();
        let dir = tempfile::tempdir().unwrap();
        let mut config = RunConfig::preset("tiny").unwrap();
        config.model = ModelConfig {
            channels: 32,
            channel_mult: vec![1, 2],
            num_res_blocks: 1,
            attention_resolutions: vec![8],
            dropout: 0.0,
            in_channels: 3,
            image_size: ImageSize::Rect([16, 24]),
            downsample_padding: DownsamplePadding::BottomRight,
            // The class embedding goes out and comes back too.
            num_classes: ClassCount::Count(3),
            head_channels: 0,
            scale_shift_norm: false,
            resblock_updown: false,
        };
        config.diffusion.schedule = ScheduleKind::Sigmoid;
        config.diffusion.prediction = Prediction::X0;
        let checkpoint = random_checkpoint(&dir.path().join("run"), &config);
        for (ema, prefix) in [(true, "ema."), (false, "model.")] {
            let out = dir.path().join(format!("export-{prefix}"));
            let back = export_and_import(&checkpoint, ema, &out);
            // Training and sampling settings come back from the exported run's settings.
            assert_eq!(back.config, config);
            assert!(back.settings_source.contains("ddpm.toml"));
            // The scheduler carries the forward process and the prediction, not loss weighting.
            let carried = |d: &crate::config::DiffusionConfig| {
                (
                    d.timesteps,
                    d.schedule,
                    d.beta_start,
                    d.beta_end,
                    d.prediction,
                )
            };
            assert_eq!(carried(&back.config.diffusion), carried(&config.diffusion));
            // Exporting what was imported writes the same bytes again.
            let again = dir.path().join(format!("again-{prefix}"));
            export_diffusers(&back.into_checkpoint(), true, &again).unwrap();
            for file in [UNET_WEIGHTS, UNET_CONFIG, SCHEDULER_CONFIG, RUN_SETTINGS] {
                assert_eq!(
                    fs::read(out.join(file)).unwrap(),
                    fs::read(again.join(file)).unwrap(),
                    "{file}"
                );
            }
        }
        // An earlier export is replaced; a folder of other files is not written into.
        let out = dir.path().join("export-ema.");
        export_diffusers(&checkpoint, false, &out).unwrap();
        let other = dir.path().join("notes");
        fs::create_dir(&other).unwrap();
        fs::write(other.join("notes.txt"), "mine").unwrap();
        let e = export_diffusers(&checkpoint, true, &other).unwrap_err();
        assert!(format!("{e:#}").contains("other files"), "{e:#}");
        assert_eq!(fs::read_dir(&other).unwrap().count(), 1);
    }

    #[test]
    fn unet_configs_ddpm_cannot_compute_are_refused_by_key() {
        read_unet(fixture_unet_json()).unwrap();
        let cases = [
            ("attention_head_dim", json!(12)),
            ("resnet_time_scale_shift", json!("spatial")),
            ("downsample_type", json!("fir")),
            ("upsample_type", json!("fir")),
            (
                "down_block_types",
                json!(["ResnetDownsampleBlock2D", "AttnDownBlock2D"]),
            ),
            ("norm_eps", json!(1e-5)),
            ("norm_num_groups", json!(16)),
            ("downsample_padding", json!(2)),
            ("flip_sin_to_cos", json!(true)),
            ("freq_shift", json!(0)),
            ("act_fn", json!("gelu")),
            ("center_input_sample", json!(true)),
            ("class_embed_type", json!("timestep")),
            ("out_channels", json!(6)),
            ("mid_block_scale_factor", json!(1.4)),
            ("time_embedding_type", json!("fourier")),
            ("time_embedding_dim", json!(64)),
            (
                "down_block_types",
                json!(["DownBlock2D", "CrossAttnDownBlock2D"]),
            ),
            ("up_block_types", json!(["UpBlock2D", "UpBlock2D"])),
            ("block_out_channels", json!([32, 48])),
            ("block_out_channels", json!([48, 96])),
            ("sample_size", json!(null)),
            ("some_new_option", json!(1)),
        ];
        for (key, value) in cases {
            let mut config = fixture_unet_json();
            config.insert(key.into(), value.clone());
            let err = format!("{:#}", read_unet(config).unwrap_err());
            assert!(err.contains(key), "{key} = {value}: {err}");
        }
        // A missing key takes diffusers' default, here attention heads of 8 channels.
        let mut config = fixture_unet_json();
        config.remove("attention_head_dim");
        assert_eq!(read_unet(config).unwrap().head_channels, 8);
    }

    #[test]
    fn schedulers_ddpm_does_not_have_are_refused_by_key() {
        let read = |patch: Value| {
            let mut value = json!({"_class_name": "DDPMScheduler"});
            value
                .as_object_mut()
                .unwrap()
                .extend(patch.as_object().unwrap().clone());
            serde_json::from_value::<SchedulerConfig>(value)
                .unwrap()
                .apply_to(&mut RunConfig::preset("tiny").unwrap())
        };
        read(json!({})).unwrap();
        for patch in [
            json!({"beta_schedule": "scaled_linear"}),
            json!({"trained_betas": [0.1, 0.2]}),
            json!({"prediction_type": "flow"}),
            json!({"variance_type": "learned_range"}),
            json!({"rescale_betas_zero_snr": true}),
            json!({"_class_name": "EulerDiscreteScheduler"}),
        ] {
            let key = patch.as_object().unwrap().keys().next().unwrap().clone();
            let err = format!("{:#}", read(patch.clone()).unwrap_err());
            assert!(err.contains(&key), "{patch}: {err}");
        }
    }

    #[test]
    fn what_diffusers_cannot_express_is_not_exported() {
        let _rng = crate::rng::exclusive();
        let dir = tempfile::tempdir().unwrap();
        type Mutation = fn(&mut RunConfig);
        let cases: [(&str, Mutation); 3] = [
            ("model.channel_mult", |c| {
                c.model.channel_mult = vec![2, 2, 2]
            }),
            ("model.channels", |c| c.model.channels = 16),
            ("diffusion.cosine_s", |c| {
                c.diffusion.schedule = ScheduleKind::Cosine;
                c.diffusion.cosine_s = 0.01;
            }),
        ];
        for (key, mutate) in cases {
            let mut config = RunConfig::preset("tiny").unwrap();
            mutate(&mut config);
            let checkpoint = random_checkpoint(&dir.path().join(key), &config);
            let out = dir.path().join(format!("out-{key}"));
            let err = format!(
                "{:#}",
                export_diffusers(&checkpoint, true, &out).unwrap_err()
            );
            assert!(err.contains(key), "{key}: {err}");
            assert!(!out.exists(), "{key}: nothing is written");
        }
    }

    #[test]
    fn missing_and_unexpected_tensors_are_listed() {
        let _rng = crate::rng::exclusive();
        let dir = tempfile::tempdir().unwrap();
        let fixture = fixtures().join("tiny-pipeline");
        for file in [UNET_CONFIG, SCHEDULER_CONFIG] {
            fs::create_dir_all(dir.path().join(file).parent().unwrap()).unwrap();
            fs::copy(fixture.join(file), dir.path().join(file)).unwrap();
        }
        let mut tensors = fixture_tensors("tiny-pipeline/unet/diffusion_pytorch_model.safetensors");
        let moved = tensors
            .remove("mid_block.attentions.0.to_q.weight")
            .unwrap();
        tensors.insert("mid_block.attentions.0.query.weight".into(), moved);
        let tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
        fs::write(
            dir.path().join(UNET_WEIGHTS),
            checkpoint::to_safetensors(&tensors).unwrap(),
        )
        .unwrap();
        let err = format!("{:#}", DiffusersModel::read(dir.path()).err().unwrap());
        assert!(
            err.contains("lacks 1 tensor(s): mid_block.attentions.0.to_q.weight")
                && err.contains("mid_block.attentions.0.query.weight"),
            "{err}"
        );
    }

    #[test]
    fn up_blocks_count_from_the_deepest_level() {
        assert_eq!(
            diffusers_tensor("up.3.block.2.nin_shortcut.weight", 4).unwrap(),
            DiffusersTensor {
                name: "up_blocks.0.resnets.2.conv_shortcut.weight".into(),
                linear: false
            }
        );
        assert_eq!(
            diffusers_tensor("up.1.upsample.conv.bias", 4).unwrap(),
            DiffusersTensor {
                name: "up_blocks.2.upsamplers.0.conv.bias".into(),
                linear: false
            }
        );
        assert_eq!(
            diffusers_tensor("mid.attn_1.proj_out.weight", 4).unwrap(),
            DiffusersTensor {
                name: "mid_block.attentions.0.to_out.0.weight".into(),
                linear: true
            }
        );
        assert!(!diffusers_tensor("down.1.attn.0.q.bias", 4).unwrap().linear);
        assert!(diffusers_tensor("up.4.block.0.conv1.weight", 4).is_err());
    }
}

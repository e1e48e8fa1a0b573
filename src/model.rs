//! The DDPM UNet (Ho et al. 2020): sinusoidal time embedding → MLP, residual blocks with
//! GroupNorm/SiLU/dropout and a time projection, self-attention at chosen resolutions,
//! strided-conv downsampling, nearest ×2 + conv upsampling and skip concatenation. Options
//! from Dhariwal & Nichol 2021 (ADM) make the network for large images: several attention
//! heads, the embedding as a scale and shift of the second GroupNorm, and residual blocks that
//! resample.
//!
//! Parameter names follow the reference implementation's layout (`down.0.block.1.conv1.weight`,
//! `mid.attn_1.q.bias`, …) and are stable across versions: checkpoints depend on them.
use std::fmt::Write as _;
use std::sync::Arc;

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::config::{DownsamplePadding, ModelConfig};

const GROUP_NORM_EPS: f64 = 1e-6;

/// GroupNorm with 32 groups, or the largest divisor of 32 that divides `channels` (so that
/// narrow models, e.g. 16 base channels with 48-channel skip concatenations, work too).
fn group_norm(vs: nn::Path, channels: i64) -> nn::GroupNorm {
    let groups = (0..=5)
        .rev()
        .map(|p| 1i64 << p)
        .find(|g| channels % g == 0)
        .unwrap_or(1);
    let config = nn::GroupNormConfig {
        eps: GROUP_NORM_EPS,
        ..Default::default()
    };
    nn::group_norm(vs, groups, channels, config)
}

fn conv(vs: nn::Path, cin: i64, cout: i64, kernel: i64, stride: i64) -> nn::Conv2D {
    nn::conv2d(vs, cin, cout, kernel, conv_config(kernel, stride))
}

fn conv_config(kernel: i64, stride: i64) -> nn::ConvConfig {
    nn::ConvConfig {
        stride,
        padding: kernel / 2,
        ..Default::default()
    }
}

/// A convolution whose weights and bias start at zero, as the last layer of each residual
/// branch and of the network are in Ho et al.'s UNet: every block starts as the identity and the
/// output at 0, which keeps the first steps of training stable.
fn zero_conv(vs: nn::Path, cin: i64, cout: i64, kernel: i64) -> nn::Conv2D {
    let config = nn::ConvConfig {
        ws_init: nn::Init::Const(0.0),
        bs_init: nn::Init::Const(0.0),
        ..conv_config(kernel, 1)
    };
    nn::conv2d(vs, cin, cout, kernel, config)
}

/// SiLU(GroupNorm(x)): with `fused`, one kernel each way where it applies (a contiguous f32 or
/// bf16 CUDA tensor), else libtorch's two ops.
fn norm_silu(norm: &nn::GroupNorm, x: &Tensor, fused: bool) -> Tensor {
    let applies = fused
        && x.device().is_cuda()
        && x.is_contiguous()
        && matches!(x.kind(), Kind::Float | Kind::BFloat16);
    match (&norm.ws, &norm.bs) {
        (Some(weight), Some(bias)) if applies => {
            crate::ops::group_norm_silu(x, weight, bias, norm.num_groups, GROUP_NORM_EPS)
                .unwrap_or_else(|e| panic!("fused GroupNorm+SiLU: {e:#}"))
        }
        _ => norm.forward(x).silu(),
    }
}

/// Sinusoidal embedding of (possibly fractional) timesteps: [sin(t·f_i), cos(t·f_i)],
/// f_i = 10000^(−i/(half−1)).
pub fn timestep_embedding(t: &Tensor, dim: i64) -> Tensor {
    let half = dim / 2;
    let scale = (10000f64).ln() / (half - 1) as f64;
    let freqs = (Tensor::arange(half, (Kind::Float, t.device())) * -scale).exp();
    let args = t.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    Tensor::cat(&[args.sin(), args.cos()], 1)
}

/// What a residual block does to the feature-map size (BigGAN-style resampling blocks).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Resize {
    Keep,
    /// 2×2 average pooling.
    Halve,
    /// Nearest-neighbour ×2.
    Double,
}

impl Resize {
    fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Resize::Keep => x.shallow_clone(),
            Resize::Halve => x.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>),
            Resize::Double => {
                let (_, _, height, width) = x.size4().expect("NCHW input");
                x.upsample_nearest2d([height * 2, width * 2], None, None)
            }
        }
    }
}

/// How a residual block is built, beyond its widths.
#[derive(Clone, Copy, Debug)]
struct ResBlockKind {
    temb_ch: i64,
    dropout: f64,
    /// The embedding scales and shifts the second GroupNorm's output (AdaGN).
    scale_shift: bool,
    resize: Resize,
}

#[derive(Debug)]
struct ResBlock {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    temb_proj: nn::Linear,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    nin_shortcut: Option<nn::Conv2D>,
    kind: ResBlockKind,
}

impl ResBlock {
    fn new(vs: nn::Path, cin: i64, cout: i64, kind: ResBlockKind) -> Self {
        // A scale and a shift per channel, or one added value.
        let temb_out = if kind.scale_shift { 2 * cout } else { cout };
        ResBlock {
            norm1: group_norm(&vs / "norm1", cin),
            conv1: conv(&vs / "conv1", cin, cout, 3, 1),
            temb_proj: nn::linear(
                &vs / "temb_proj",
                kind.temb_ch,
                temb_out,
                Default::default(),
            ),
            norm2: group_norm(&vs / "norm2", cout),
            conv2: zero_conv(&vs / "conv2", cout, cout, 3),
            nin_shortcut: (cin != cout).then(|| conv(&vs / "nin_shortcut", cin, cout, 1, 1)),
            kind,
        }
    }

    /// `temb_act` is SiLU(time embedding), shared by every block. The skip connection reads
    /// `x_skip`, the branch `x`: the same tensor, given twice when the block is recomputed.
    fn forward(
        &self,
        x_skip: &Tensor,
        x: &Tensor,
        temb_act: &Tensor,
        train: bool,
        fused: bool,
    ) -> Tensor {
        let resize = self.kind.resize;
        let h = resize.apply(&norm_silu(&self.norm1, x, fused));
        let x = resize.apply(x_skip);
        let h = self.conv1.forward(&h);
        let emb = self.temb_proj.forward(temb_act).unsqueeze(-1).unsqueeze(-1);
        let h = if self.kind.scale_shift {
            let [scale, shift] = emb.chunk(2, 1).try_into().expect("two halves");
            (self.norm2.forward(&h) * (scale + 1.0) + shift).silu()
        } else {
            norm_silu(&self.norm2, &(h + emb), fused)
        };
        let h = self.conv2.forward(&h.dropout(self.kind.dropout, train));
        match &self.nin_shortcut {
            Some(shortcut) => shortcut.forward(&x) + h,
            None => x + h,
        }
    }

    fn parameters(&self) -> Vec<Tensor> {
        let mut params = [&self.norm1, &self.norm2]
            .into_iter()
            .flat_map(norm_parameters)
            .collect::<Vec<_>>();
        params.extend(conv_parameters(&self.conv1));
        params.extend(conv_parameters(&self.conv2));
        params.extend(self.nin_shortcut.iter().flat_map(conv_parameters));
        params.push(self.temb_proj.ws.shallow_clone());
        params.extend(self.temb_proj.bs.iter().map(Tensor::shallow_clone));
        params
    }
}

fn norm_parameters(norm: &nn::GroupNorm) -> Vec<Tensor> {
    norm.ws
        .iter()
        .chain(&norm.bs)
        .map(Tensor::shallow_clone)
        .collect()
}

fn conv_parameters(conv: &nn::Conv2D) -> Vec<Tensor> {
    std::iter::once(&conv.ws)
        .chain(&conv.bs)
        .map(Tensor::shallow_clone)
        .collect()
}

#[derive(Debug)]
struct AttnBlock {
    norm: nn::GroupNorm,
    q: nn::Conv2D,
    k: nn::Conv2D,
    v: nn::Conv2D,
    proj_out: nn::Conv2D,
    heads: i64,
}

impl AttnBlock {
    /// `head_channels`: channels per head; 0: one head over all `ch`.
    fn new(vs: nn::Path, ch: i64, head_channels: i64) -> Self {
        AttnBlock {
            norm: group_norm(&vs / "norm", ch),
            q: conv(&vs / "q", ch, ch, 1, 1),
            k: conv(&vs / "k", ch, ch, 1, 1),
            v: conv(&vs / "v", ch, ch, 1, 1),
            proj_out: zero_conv(&vs / "proj_out", ch, ch, 1),
            heads: if head_channels > 0 {
                ch / head_channels
            } else {
                1
            },
        }
    }

    fn parameters(&self) -> Vec<Tensor> {
        let mut params = norm_parameters(&self.norm);
        for conv in [&self.q, &self.k, &self.v, &self.proj_out] {
            params.extend(conv_parameters(conv));
        }
        params
    }

    /// Self-attention over all positions, each head over its own consecutive channels, through
    /// libtorch's fused SDPA kernels (scaled by 1/√(channels per head)). The residual reads
    /// `x_skip`, the attention `x`: the same tensor, given twice when the block is recomputed.
    fn forward(&self, x_skip: &Tensor, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("NCHW input");
        let hn = self.norm.forward(x);
        let heads = self.heads;
        // [B, heads, HW, C / heads]
        let tokens = |t: Tensor| t.view([b, heads, c / heads, h * w]).transpose(2, 3);
        let (q, k, v) = (
            tokens(self.q.forward(&hn)),
            tokens(self.k.forward(&hn)),
            tokens(self.v.forward(&hn)),
        );
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        let out = out.transpose(2, 3).reshape([b, c, h, w]);
        x_skip + self.proj_out.forward(&out)
    }
}

/// How a level changes the feature-map size at its end.
#[derive(Debug)]
enum Resample {
    /// A stride-2 conv (down path) or nearest ×2 and a conv (up path).
    Conv(nn::Conv2D),
    /// A residual block that halves or doubles (`model.resblock_updown`).
    Block(Arc<ResBlock>),
}

/// Blocks are shared (`Arc`) so that a recomputed block's autograd node can hold on to them.
#[derive(Debug)]
struct Level {
    blocks: Vec<Arc<ResBlock>>,
    attns: Vec<Arc<AttnBlock>>,
    /// None at the lowest resolution.
    resample: Option<Resample>,
}

/// Builds the levels of the down and up paths of one configuration.
struct LevelBuilder<'a> {
    config: &'a ModelConfig,
    /// The residual blocks' kind (that keep the size).
    block: ResBlockKind,
}

impl LevelBuilder<'_> {
    fn attends(&self, level: usize) -> bool {
        let size = self.config.image_size;
        let min_side = size.height().min(size.width());
        self.config
            .attention_resolutions
            .contains(&(min_side >> level))
    }

    /// Block `i` of a level: a residual block from `cin` to the level's width, and its
    /// attention where the level attends.
    fn block(
        &self,
        p: &nn::Path,
        level: usize,
        i: i64,
        cin: i64,
    ) -> (Arc<ResBlock>, Option<Arc<AttnBlock>>) {
        let width = self.config.channels * self.config.channel_mult[level];
        let block = Arc::new(ResBlock::new(p / "block" / i, cin, width, self.block));
        let heads = self.config.head_channels;
        let attn = self
            .attends(level)
            .then(|| Arc::new(AttnBlock::new(p / "attn" / i, width, heads)));
        (block, attn)
    }

    fn resampler(&self, vs: nn::Path, ch: i64, resize: Resize) -> Resample {
        let kind = ResBlockKind {
            resize,
            ..self.block
        };
        Resample::Block(Arc::new(ResBlock::new(vs, ch, ch, kind)))
    }

    /// A level of the down path from `block_in` channels (updated); pushes the channels of
    /// the skip connections it makes.
    fn down_level(
        &self,
        p: nn::Path,
        level: usize,
        block_in: &mut i64,
        skips: &mut Vec<i64>,
    ) -> Level {
        let config = self.config;
        let (mut blocks, mut attns) = (Vec::new(), Vec::new());
        for i in 0..config.num_res_blocks {
            let (block, attn) = self.block(&p, level, i, *block_in);
            *block_in = config.channels * config.channel_mult[level];
            blocks.push(block);
            attns.extend(attn);
            skips.push(*block_in);
        }
        let ch = *block_in;
        let resample = (level + 1 < config.channel_mult.len()).then(|| {
            skips.push(ch);
            if config.resblock_updown {
                return self.resampler(&p / "downsample", ch, Resize::Halve);
            }
            let padding = match config.downsample_padding {
                DownsamplePadding::Symmetric => 1,
                DownsamplePadding::BottomRight => 0, // padded in `forward`
            };
            let stride_2 = nn::ConvConfig {
                stride: 2,
                padding,
                ..Default::default()
            };
            Resample::Conv(nn::conv2d(&p / "downsample" / "conv", ch, ch, 3, stride_2))
        });
        Level {
            blocks,
            attns,
            resample,
        }
    }

    /// A level of the up path from `block_in` channels (updated), each block also taking the
    /// newest skip connection left in `skips`.
    fn up_level(
        &self,
        p: nn::Path,
        level: usize,
        block_in: &mut i64,
        skips: &mut Vec<i64>,
    ) -> Level {
        let config = self.config;
        let (mut blocks, mut attns) = (Vec::new(), Vec::new());
        for i in 0..=config.num_res_blocks {
            let skip = skips.pop().expect("one skip per up block");
            let (block, attn) = self.block(&p, level, i, *block_in + skip);
            *block_in = config.channels * config.channel_mult[level];
            blocks.push(block);
            attns.extend(attn);
        }
        let ch = *block_in;
        let resample = (level > 0).then(|| match config.resblock_updown {
            true => self.resampler(&p / "upsample", ch, Resize::Double),
            false => Resample::Conv(conv(&p / "upsample" / "conv", ch, ch, 3, 1)),
        });
        Level {
            blocks,
            attns,
            resample,
        }
    }
}

/// The UNet ε_θ(x_t, t) (or x₀/v, depending on the objective).
#[derive(Debug)]
pub struct UNet {
    config: ModelConfig,
    temb_dense: [nn::Linear; 2],
    /// One row per class and a last one for "no class" (class-conditional models).
    class_embedding: Option<nn::Embedding>,
    conv_in: nn::Conv2D,
    down: Vec<Level>,
    mid: (Arc<ResBlock>, Arc<AttnBlock>, Arc<ResBlock>),
    up: Vec<Level>,
    norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
    /// GroupNorm+SiLU through the fused CUDA kernels.
    fused_norm_silu: bool,
    /// Training recomputes each block's activations in backward instead of keeping them.
    activation_checkpointing: bool,
}

impl UNet {
    pub fn new(vs: &nn::Path, config: &ModelConfig) -> Self {
        let ch = config.channels;
        let temb_ch = ch * 4;
        let builder = LevelBuilder {
            config,
            block: ResBlockKind {
                temb_ch,
                dropout: config.dropout,
                scale_shift: config.scale_shift_norm,
                resize: Resize::Keep,
            },
        };

        let temb = vs / "temb" / "dense";
        let temb_dense = [
            nn::linear(&temb / 0, ch, temb_ch, Default::default()),
            nn::linear(&temb / 1, temb_ch, temb_ch, Default::default()),
        ];
        let classes = config.num_classes.resolved() as i64;
        let class_embedding = (classes > 0).then(|| {
            // Rows of N(0, 1), as torch.nn.Embedding starts (and diffusers' class embedding).
            let init = nn::EmbeddingConfig {
                ws_init: nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
                ..Default::default()
            };
            nn::embedding(vs / "class_embedding", classes + 1, temb_ch, init)
        });
        let conv_in = conv(vs / "conv_in", config.in_channels, ch, 3, 1);

        // Channel counts of the skip connections, in the order the down path produces them.
        let mut skips = vec![ch];
        let mut block_in = ch;
        let down = (0..config.channel_mult.len())
            .map(|level| builder.down_level(vs / "down" / level, level, &mut block_in, &mut skips))
            .collect();

        let (m, block, heads) = (vs / "mid", builder.block, config.head_channels);
        let mid = (
            Arc::new(ResBlock::new(&m / "block_1", block_in, block_in, block)),
            Arc::new(AttnBlock::new(&m / "attn_1", block_in, heads)),
            Arc::new(ResBlock::new(&m / "block_2", block_in, block_in, block)),
        );

        let up = (0..config.channel_mult.len())
            .rev()
            .map(|level| builder.up_level(vs / "up" / level, level, &mut block_in, &mut skips))
            .collect();

        let norm_out = group_norm(vs / "norm_out", block_in);
        let conv_out = zero_conv(vs / "conv_out", block_in, config.in_channels, 3);
        UNet {
            config: config.clone(),
            temb_dense,
            class_embedding,
            conv_in,
            down,
            mid,
            up,
            norm_out,
            conv_out,
            fused_norm_silu: false,
            activation_checkpointing: false,
        }
    }

    /// Recompute each residual and attention block's activations in backward instead of
    /// keeping them (training only): less memory, one more forward pass per step.
    pub fn set_activation_checkpointing(&mut self, on: bool) {
        self.activation_checkpointing = on;
    }

    /// A residual block, recomputed in backward where checkpointing applies.
    fn res_block(
        &self,
        block: &Arc<ResBlock>,
        x: &Tensor,
        temb_act: &Tensor,
        train: bool,
    ) -> Tensor {
        let fused = self.fused_norm_silu;
        if !(train && self.activation_checkpointing) {
            return block.forward(x, x, temb_act, train, fused);
        }
        let held = Arc::clone(block);
        let random = block.kind.dropout > 0.0;
        let args = [
            x.shallow_clone(),
            x.shallow_clone(),
            temb_act.shallow_clone(),
        ];
        crate::recompute::recomputed(
            &args,
            &block.parameters(),
            random,
            Box::new(move |a| held.forward(&a[0], &a[1], &a[2], true, fused)),
        )
    }

    /// An attention block, recomputed in backward where checkpointing applies.
    fn attn_block(&self, block: &Arc<AttnBlock>, x: &Tensor, train: bool) -> Tensor {
        if !(train && self.activation_checkpointing) {
            return block.forward(x, x);
        }
        let held = Arc::clone(block);
        let args = [x.shallow_clone(), x.shallow_clone()];
        crate::recompute::recomputed(
            &args,
            &block.parameters(),
            false,
            Box::new(move |a| held.forward(&a[0], &a[1])),
        )
    }

    /// Runs each GroupNorm+SiLU pair as one fused CUDA kernel (where the input is a contiguous
    /// f32 or bf16 CUDA tensor) instead of libtorch's two.
    pub fn set_fused_norm_silu(&mut self, fused: bool) {
        self.fused_norm_silu = fused;
    }

    pub fn fused_norm_silu(&self) -> bool {
        self.fused_norm_silu
    }

    /// The id of "no class", the embedding row that guidance's unconditional pass uses.
    pub fn null_class(&self) -> i64 {
        self.config.num_classes.resolved() as i64
    }

    /// x: [B, C, H, W] in model space, t: [B] timesteps (integer or float), classes: [B] class
    /// ids of a class-conditional model (None, or the id `null_class()`: no class). An
    /// unconditional model takes no classes.
    pub fn forward(&self, x: &Tensor, t: &Tensor, classes: Option<&Tensor>, train: bool) -> Tensor {
        let fused = self.fused_norm_silu;
        let temb = timestep_embedding(t, self.config.channels).to_kind(x.kind());
        let mut temb = self.temb_dense[1].forward(&self.temb_dense[0].forward(&temb).silu());
        if let Some(embedding) = &self.class_embedding {
            let classes = match classes {
                Some(classes) => classes.to_device(x.device()),
                None => Tensor::full([x.size()[0]], self.null_class(), (Kind::Int64, x.device())),
            };
            let kind = temb.kind();
            temb += embedding.forward(&classes).to_kind(kind);
        }
        let temb_act = temb.silu();

        let mut hs = vec![self.conv_in.forward(x)];
        for level in &self.down {
            for (i, block) in level.blocks.iter().enumerate() {
                let mut h = self.res_block(block, hs.last().unwrap(), &temb_act, train);
                if let Some(attn) = level.attns.get(i) {
                    h = self.attn_block(attn, &h, train);
                }
                hs.push(h);
            }
            if let Some(downsample) = &level.resample {
                let x = hs.last().unwrap();
                let h = match (downsample, self.config.downsample_padding) {
                    (Resample::Block(block), _) => self.res_block(block, x, &temb_act, train),
                    (Resample::Conv(conv), DownsamplePadding::Symmetric) => conv.forward(x),
                    (Resample::Conv(conv), DownsamplePadding::BottomRight) => {
                        conv.forward(&x.constant_pad_nd([0, 1, 0, 1]))
                    }
                };
                hs.push(h);
            }
        }

        let (block_1, attn, block_2) = &self.mid;
        let h = self.res_block(block_1, hs.last().unwrap(), &temb_act, train);
        let h = self.attn_block(attn, &h, train);
        let mut h = self.res_block(block_2, &h, &temb_act, train);

        for level in &self.up {
            for (i, block) in level.blocks.iter().enumerate() {
                let skip = hs.pop().expect("one skip per up block");
                h = self.res_block(block, &Tensor::cat(&[h, skip], 1), &temb_act, train);
                if let Some(attn) = level.attns.get(i) {
                    h = self.attn_block(attn, &h, train);
                }
            }
            h = match &level.resample {
                Some(Resample::Block(block)) => self.res_block(block, &h, &temb_act, train),
                Some(Resample::Conv(conv)) => conv.forward(&Resize::Double.apply(&h)),
                None => h,
            };
        }
        self.conv_out.forward(&norm_silu(&self.norm_out, &h, fused))
    }
}

/// An estimate of the memory that training keeps per image between forward and backward, in
/// bytes of f32: about a dozen activations of each residual block's width and size (norms,
/// activations, convolutions, dropout, the skip), and each attention's weights. It errs low
/// (PyTorch's step reserves more), so that it refuses only what cannot fit.
pub fn activation_bytes_per_image(config: &ModelConfig) -> u64 {
    const SAVED_PER_RES_BLOCK: u64 = 12;
    let (h, w) = (
        config.image_size.height() as u64,
        config.image_size.width() as u64,
    );
    let blocks_per_level = 2 * config.num_res_blocks as u64 + 1; // down, and one more up
    let floats: u64 = config
        .channel_mult
        .iter()
        .enumerate()
        .map(|(level, &mult)| {
            let pixels = (h >> level).max(1) * (w >> level).max(1);
            let width = (config.channels * mult) as u64;
            let attends = config
                .attention_resolutions
                .contains(&((h.min(w) >> level) as i64));
            let attention = if attends { 2 * pixels * pixels } else { 0 };
            blocks_per_level * (SAVED_PER_RES_BLOCK * width * pixels + attention)
        })
        .sum();
    4 * floats
}

/// Number of scalar parameters in a var store.
pub fn parameter_count(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum()
}

/// A human-readable summary: the configuration, the tensors per module and the exact total.
pub fn summary(config: &ModelConfig, vs: &nn::VarStore) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "UNet  channels={} channel_mult={:?} num_res_blocks={} attention_resolutions={:?} head_channels={} scale_shift_norm={} resblock_updown={} dropout={} in_channels={} image_size={} num_classes={}", config.channels, config.channel_mult, config.num_res_blocks, config.attention_resolutions, config.head_channels, config.scale_shift_norm, config.resblock_updown, config.dropout, config.in_channels, config.image_size, config.num_classes);
    let mut groups: std::collections::BTreeMap<String, i64> = Default::default();
    for (name, tensor) in vs.variables() {
        let parts: Vec<&str> = name.split('.').collect();
        let depth = match parts[0] {
            "down" | "up" => 2,
            "mid" | "temb" => 2,
            _ => 1,
        };
        *groups
            .entry(parts[..depth.min(parts.len() - 1)].join("."))
            .or_default() += tensor.numel() as i64;
    }
    for (group, count) in &groups {
        let _ = writeln!(out, "  {group:<24} {count:>12}");
    }
    let _ = writeln!(out, "parameters: {}", parameter_count(vs));
    if config.num_classes == crate::config::ClassCount::Auto {
        let _ = writeln!(out, "num_classes = auto: the class embedding, (classes + 1) × {} parameters, comes once the data is read", config.channels * 4);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DownsamplePadding, ImageSize, RunConfig};
    use tch::Device;

    fn count(config: &ModelConfig) -> i64 {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = UNet::new(&vs.root(), config);
        parameter_count(&vs)
    }

    #[test]
    fn a_class_conditional_model_adds_one_embedding_row_per_class_and_one_for_no_class() {
        let mut config = RunConfig::preset("cifar10").unwrap().model;
        let unconditional = count(&config);
        config.num_classes = crate::config::ClassCount::Count(10);
        // 11 rows as wide as the time embedding (4 × 128 channels).
        assert_eq!(count(&config), unconditional + 11 * 512);
    }

    #[test]
    fn cifar10_preset_has_the_published_parameter_count() {
        assert_eq!(
            count(&RunConfig::preset("cifar10").unwrap().model),
            35_746_307
        );
    }

    #[test]
    fn every_preset_has_a_stable_parameter_count() {
        // Pinned so that an accidental architecture change is caught.
        assert_eq!(
            count(&RunConfig::preset("mnist").unwrap().model),
            MNIST_PARAMS
        );
        assert_eq!(
            count(&RunConfig::preset("tiny").unwrap().model),
            TINY_PARAMS
        );
    }
    const MNIST_PARAMS: i64 = 6_469_889;

    /// The gradients of every parameter, and the next random draw, after one training step's
    /// forward and backward pass of `config`'s network (dropout on), with or without
    /// activation checkpointing.
    fn step_gradients(
        config: &ModelConfig,
        checkpointing: bool,
    ) -> (Vec<(String, Tensor)>, Tensor) {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut net = UNet::new(&vs.root(), config);
        net.set_activation_checkpointing(checkpointing);
        // Non-zero last layers, so that every gradient is non-zero.
        let mut variables: Vec<_> = vs.variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        tch::no_grad(|| {
            for (_, p) in &mut variables {
                let _ = p.g_add_(&(Tensor::randn_like(p) * 0.05));
            }
        });
        let side = config.image_size.height();
        let x = Tensor::randn(
            [3, config.in_channels, side, side],
            (Kind::Float, Device::Cpu),
        );
        let t = Tensor::from_slice(&[3i64, 500, 999]);
        let classes = Tensor::from_slice(&[0i64, 1, 2]);
        let y = net.forward(&x, &t, Some(&classes), true);
        let weights = Tensor::randn_like(&y);
        (y * weights).sum(Kind::Float).backward();
        let next_draw = Tensor::randn([4], (Kind::Float, Device::Cpu));
        let mut grads: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(name, p)| (name, p.grad()))
            .collect();
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        (grads, next_draw)
    }

    #[test]
    fn activation_checkpointing_gives_bit_identical_gradients() {
        let _rng = crate::rng::exclusive();
        let mut config = RunConfig::preset("tiny").unwrap().model;
        config.in_channels = 3;
        config.channel_mult = vec![1, 2, 2];
        config.attention_resolutions = vec![16, 4];
        config.head_channels = 16;
        config.dropout = 0.3;
        config.num_classes = crate::config::ClassCount::Count(2);
        for (scale_shift, updown) in [(false, false), (true, true)] {
            config.scale_shift_norm = scale_shift;
            config.resblock_updown = updown;
            let (plain, plain_draw) = step_gradients(&config, false);
            let (recomputed, recomputed_draw) = step_gradients(&config, true);
            assert_eq!(plain.len(), recomputed.len());
            for ((name, a), (_, b)) in plain.iter().zip(&recomputed) {
                assert!(a.defined() && b.defined(), "{name}: no gradient");
                assert!(
                    a.abs().max().double_value(&[]) > 0.0,
                    "{name}: zero gradient"
                );
                assert!(
                    a.equal(b),
                    "{name}: {:e}",
                    (a - b).abs().max().double_value(&[])
                );
            }
            // The recomputation replays dropout's draws and leaves the stream where it was.
            assert!(plain_draw.equal(&recomputed_draw));
        }
    }

    #[test]
    fn scale_shift_norms_double_each_time_projection() {
        let mut config = RunConfig::preset("tiny").unwrap().model;
        let plain = count(&config);
        config.scale_shift_norm = true;
        // tiny's residual blocks put out 32, 64, 64 (down), 64, 64 (middle) and 64, 64, 64,
        // 64, 32, 32 channels (up, two per level): each projection from the 128-wide
        // embedding gains as many rows again, with their biases.
        let outputs: i64 = [32, 64, 64, 64, 64, 64, 64, 64, 64, 32, 32].iter().sum();
        assert_eq!(count(&config) - plain, outputs * (128 + 1));
    }

    #[test]
    fn residual_resampling_replaces_each_resampling_conv_with_a_block() {
        let mut config = RunConfig::preset("tiny").unwrap().model;
        let plain = count(&config);
        config.resblock_updown = true;
        // Two downsampling convs (32 and 64 channels) and two upsampling ones (64, 64) become
        // blocks of two 3×3 convs, two GroupNorms and an embedding projection.
        let conv = |c: i64| 9 * c * c + c;
        let block = |c: i64| 2 * conv(c) + 2 * (2 * c) + (128 * c + c);
        let convs: i64 = [32, 64, 64, 64].map(conv).iter().sum();
        let blocks: i64 = [32, 64, 64, 64].map(block).iter().sum();
        assert_eq!(count(&config) - plain, blocks - convs);
    }
    const TINY_PARAMS: i64 = 1_062_497;

    #[test]
    fn output_shape_matches_input_for_sizes_and_channels() {
        let _guard = tch::no_grad_guard();
        let mut config = RunConfig::preset("tiny").unwrap().model;
        config.channels = 16;
        config.attention_resolutions = vec![];
        for (size, mult, channels) in [
            (ImageSize::Square(28), vec![1, 2, 2], 1),
            (ImageSize::Square(32), vec![1, 2, 2, 2], 3),
            (ImageSize::Square(64), vec![1, 2, 2, 2], 3),
            (ImageSize::Square(128), vec![1, 1, 2, 2, 2], 3),
            (ImageSize::Square(256), vec![1, 1, 2, 2, 2, 2], 1),
            (ImageSize::Rect([32, 64]), vec![1, 2, 2], 3),
        ] {
            // Every other network also has the options for large images.
            let adm = channels == 3;
            config.head_channels = if adm { 8 } else { 0 };
            config.scale_shift_norm = adm;
            config.resblock_updown = adm;
            config.image_size = size;
            config.channel_mult = mult;
            config.in_channels = channels;
            config.attention_resolutions = vec![size.height().min(size.width()) >> 2];
            let vs = nn::VarStore::new(Device::Cpu);
            let net = UNet::new(&vs.root(), &config);
            let x = Tensor::randn(
                [2, channels, size.height(), size.width()],
                (Kind::Float, Device::Cpu),
            );
            let y = net.forward(&x, &Tensor::from_slice(&[0i64, 999]), None, false);
            assert_eq!(y.size(), x.size(), "size {size}");
        }
    }

    #[test]
    fn a_new_network_starts_with_identity_blocks_and_zero_output() {
        let _guard = tch::no_grad_guard();
        let config = RunConfig::preset("mnist").unwrap().model;
        let vs = nn::VarStore::new(Device::Cpu);
        let net = UNet::new(&vs.root(), &config);
        let last_of_branch = |name: &str| {
            name.contains("conv2.") || name.contains("proj_out.") || name.starts_with("conv_out.")
        };
        let mut zeroed = 0;
        for (name, t) in vs.variables() {
            let is_zero = t.abs().max().double_value(&[]) == 0.0;
            if last_of_branch(&name) {
                assert!(is_zero, "{name} starts nonzero");
                zeroed += 1;
            } else if name.ends_with("weight") && t.dim() == 4 {
                assert!(!is_zero, "{name} starts at zero");
            }
        }
        // Weight and bias of: 2 blocks per level down, 3 up (3 levels), 2 mid; attention at
        // 14×14 on level 1 (2 down, 3 up) and mid; conv_out.
        assert_eq!(zeroed, 2 * ((2 * 3 + 3 * 3 + 2) + (2 + 3 + 1) + 1));
        let x = Tensor::randn([2, 1, 28, 28], (Kind::Float, Device::Cpu));
        let y = net.forward(&x, &Tensor::from_slice(&[3i64, 700]), None, false);
        assert_eq!(y.abs().max().double_value(&[]), 0.0);
    }

    #[test]
    fn bottom_right_downsampling_pads_like_tensorflow_same() {
        let _guard = tch::no_grad_guard();
        let vs = nn::VarStore::new(Device::Cpu);
        let mut conv = nn::conv2d(
            vs.root(),
            1,
            1,
            3,
            nn::ConvConfig {
                stride: 2,
                padding: 0,
                bias: false,
                ..Default::default()
            },
        );
        tch::no_grad(|| {
            conv.ws
                .copy_(&Tensor::ones([1, 1, 3, 3], (Kind::Float, Device::Cpu)))
        });
        let x = Tensor::arange(16, (Kind::Float, Device::Cpu)).view([1, 1, 4, 4]);
        let y = conv.forward(&x.constant_pad_nd([0, 1, 0, 1]));
        // Output (0,0) sums rows 0..3 × cols 0..3; (1,1) sums rows 2..4 × cols 2..4 with zeros beyond.
        assert_eq!(y.size(), vec![1, 1, 2, 2]);
        assert_eq!(
            y.double_value(&[0, 0, 0, 0]),
            (0..3)
                .flat_map(|r| (0..3).map(move |c| (4 * r + c) as f64))
                .sum::<f64>()
        );
        assert_eq!(
            y.double_value(&[0, 0, 1, 1]),
            [10.0, 11.0, 14.0, 15.0].iter().sum::<f64>()
        );
        let mut config = RunConfig::preset("tiny").unwrap().model;
        config.downsample_padding = DownsamplePadding::BottomRight;
        let vs = nn::VarStore::new(Device::Cpu);
        let net = UNet::new(&vs.root(), &config);
        let x = Tensor::randn([1, 1, 28, 28], (Kind::Float, Device::Cpu));
        assert_eq!(
            net.forward(&x, &Tensor::from_slice(&[5i64]), None, false)
                .size(),
            x.size()
        );
    }

    #[test]
    fn timestep_embedding_matches_formula() {
        let e = timestep_embedding(&Tensor::from_slice(&[3i64]), 8);
        let half = 4;
        for i in 0..half {
            let f = (-(10000f64).ln() * i as f64 / (half - 1) as f64).exp();
            assert!((e.double_value(&[0, i]) - (3.0 * f).sin()).abs() < 1e-6);
            assert!((e.double_value(&[0, i + half]) - (3.0 * f).cos()).abs() < 1e-6);
        }
    }
}

#!/usr/bin/env python3
"""The training step of ADM's class-conditional UNet (Dhariwal & Nichol 2021) in PyTorch: the
baseline `ddpm bench train --preset imagenet64|imagenet256` is compared against. The network is
ddpm's own with the same options (attention heads, scale-shift norms, residual resampling, a
class embedding with a null class for guidance), so the parameter counts agree: 295,900,035
(imagenet64) and 553,832,195 (imagenet256). Prints a PARAMS line and one RESULT line in the
form of the project's other baselines, with CUDA's peak memory.

  python3 tools/torch_adm_bench.py --preset imagenet64 --batch 32 --precision bf16
  python3 tools/torch_adm_bench.py --preset imagenet256 --batch 8 --precision bf16 --checkpointing
  python3 tools/torch_adm_bench.py --preset imagenet64 --device cpu --ch 32 --head-channels 32 \\
      --batch 2 --warmup 1 --steps 1
"""

import argparse
import contextlib
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

PRESETS = {
    "imagenet64": dict(size=64, ch=192, ch_mult=(1, 2, 3, 4), num_res_blocks=3,
                       attn_res=(32, 16, 8), head_channels=64, dropout=0.1),
    "imagenet256": dict(size=256, ch=256, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                        attn_res=(32, 16, 8), head_channels=64, dropout=0.0),
}


def norm(c):
    return nn.GroupNorm(min(32, c), c, eps=1e-6)


def timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; the embedding added (or scaling and shifting the second norm);
    GroupNorm, SiLU, dropout, conv; `resize` halves (average pool) or doubles (nearest) both
    paths after the first norm, as BigGAN's resampling blocks do."""

    def __init__(self, cin, cout, temb, dropout, scale_shift, resize=None):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb, 2 * cout if scale_shift else cout)
        self.norm2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.dropout, self.scale_shift, self.resize = dropout, scale_shift, resize

    def resized(self, x):
        if self.resize == "half":
            return F.avg_pool2d(x, 2)
        if self.resize == "double":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x, temb_act):
        h = self.conv1(self.resized(F.silu(self.norm1(x))))
        x = self.resized(x)
        emb = self.temb_proj(temb_act)[:, :, None, None]
        if self.scale_shift:
            scale, shift = emb.chunk(2, dim=1)
            h = F.silu(self.norm2(h) * (1 + scale) + shift)
        else:
            h = F.silu(self.norm2(h + emb))
        h = self.conv2(F.dropout(h, self.dropout, self.training))
        return (self.shortcut(x) if self.shortcut is not None else x) + h


class Attention(nn.Module):
    def __init__(self, c, head_channels):
        super().__init__()
        self.norm = norm(c)
        self.qkv = nn.ModuleList([nn.Conv2d(c, c, 1) for _ in range(3)])
        self.proj_out = nn.Conv2d(c, c, 1)
        self.heads = c // head_channels if head_channels else 1

    def forward(self, x, _temb_act=None):
        b, c, hh, ww = x.shape
        n = self.norm(x)
        q, k, v = (m(n).reshape(b, self.heads, c // self.heads, hh * ww).transpose(2, 3)
                   for m in self.qkv)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(h.transpose(2, 3).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x, _temb_act=None):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, _temb_act=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    def __init__(self, a):
        super().__init__()
        ch, temb = a.ch, 4 * a.ch
        block = lambda cin, cout, resize=None: ResBlock(  # noqa: E731
            cin, cout, temb, a.dropout, a.scale_shift_norm, resize)
        self.ch, self.checkpointing = ch, a.checkpointing
        self.temb = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.class_embedding = nn.Embedding(a.num_classes + 1, temb) if a.num_classes else None
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        # Each entry: (modules applied in order, whether its output is kept for the skip).
        self.down, skips, res, c = nn.ModuleList(), [ch], a.size, ch
        for level, mult in enumerate(a.ch_mult):
            for _ in range(a.num_res_blocks):
                layers = [block(c, ch * mult)]
                c = ch * mult
                if res in a.attn_res:
                    layers.append(Attention(c, a.head_channels))
                self.down.append(nn.ModuleList(layers))
                skips.append(c)
            if level != len(a.ch_mult) - 1:
                resample = block(c, c, "half") if a.resblock_updown else Downsample(c)
                self.down.append(nn.ModuleList([resample]))
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList([block(c, c), Attention(c, a.head_channels), block(c, c)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(a.ch_mult))):
            for i in range(a.num_res_blocks + 1):
                layers = [block(c + skips.pop(), ch * mult)]
                c = ch * mult
                if res in a.attn_res:
                    layers.append(Attention(c, a.head_channels))
                if level != 0 and i == a.num_res_blocks:
                    layers.append(block(c, c, "double") if a.resblock_updown else Upsample(c))
                    res *= 2
                self.up.append(nn.ModuleList(layers))
        self.norm_out, self.conv_out = norm(c), nn.Conv2d(c, 3, 3, padding=1)

    def run(self, layers, h, temb_act):
        def apply(h, temb_act):
            for layer in layers:
                h = layer(h, temb_act)
            return h
        if self.checkpointing and self.training:
            return checkpoint(apply, h, temb_act, use_reentrant=False)
        return apply(h, temb_act)

    def forward(self, x, t, y):
        emb = self.temb(timestep_embedding(t, self.ch))
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(y)
        temb_act = F.silu(emb)
        hs = [self.conv_in(x)]
        for layers in self.down:
            hs.append(self.run(layers, hs[-1], temb_act))
        h = self.run(self.mid, hs[-1], temb_act)
        for layers in self.up:
            h = self.run(layers, torch.cat([h, hs.pop()], dim=1), temb_act)
        return self.conv_out(F.silu(self.norm_out(h)))


def parse_list(s):
    return tuple(int(x) for x in s.split(",") if x.strip())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="imagenet64")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int)
    p.add_argument("--ch", type=int)
    p.add_argument("--ch-mult", type=parse_list)
    p.add_argument("--num-res-blocks", type=int)
    p.add_argument("--attn-res", type=parse_list)
    p.add_argument("--head-channels", type=int)
    p.add_argument("--dropout", type=float)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--no-scale-shift-norm", dest="scale_shift_norm", action="store_false")
    p.add_argument("--no-resblock-updown", dest="resblock_updown", action="store_false")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    p.add_argument("--precision", default="bf16", choices=["f32", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--params-only", action="store_true", help="print the PARAMS line and stop")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    for key, value in PRESETS[a.preset].items():
        if getattr(a, key) is None:
            setattr(a, key, value)

    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    torch.backends.cudnn.benchmark = True
    model = UNet(a)
    n_params = sum(q.numel() for q in model.parameters())
    print(f"PARAMS framework=torch preset={a.preset} params={n_params}", flush=True)
    if a.params_only:
        return
    model = model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = torch.compile(model) if a.compile else model
    T = 1000
    alphas_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
    sqrt_ab, sqrt_1mab = alphas_bar.sqrt().float().to(dev), (1 - alphas_bar).sqrt().float().to(dev)
    B, S = a.batch, a.size
    x0 = torch.rand(B, 3, S, S, device=dev) * 2 - 1
    autocast = (torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
                if a.precision == "bf16" else contextlib.nullcontext())

    def step():
        t = torch.randint(0, T, (B,), device=dev)
        # One label in ten is the null class, as guidance training drops them.
        y = torch.randint(0, a.num_classes, (B,), device=dev)
        y = torch.where(torch.rand(B, device=dev) < 0.1, torch.full_like(y, a.num_classes), y)
        noise = torch.randn_like(x0)
        x_t = sqrt_ab[t].view(B, 1, 1, 1) * x0 + sqrt_1mab[t].view(B, 1, 1, 1) * noise
        with autocast:
            loss = F.mse_loss(fwd(x_t, t, y).float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.detach()

    for _ in range(a.warmup):
        step().item()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    final = loss.item()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    mem = ""
    if cuda:
        gib = float(1 << 30)
        mem = (f" mem_peak_alloc_gib={torch.cuda.max_memory_allocated() / gib:.2f}"
               f" mem_peak_reserved_gib={torch.cuda.max_memory_reserved() / gib:.2f}")
    print(f"RESULT framework=torch bench=train preset={a.preset} device={a.device} "
          f"precision={a.precision} batch={B} size={S} ch={a.ch} params={n_params / 1e6:.1f}M "
          f"img_per_s={B * a.steps / elapsed:.1f} ms_per_step={elapsed * 1000 / a.steps:.2f} "
          f"final_loss={final:.5f} activation_checkpointing={int(a.checkpointing)} "
          f"compile={int(a.compile)}{mem}", flush=True)
    if not math.isfinite(final):
        sys.exit(1)


if __name__ == "__main__":
    main()

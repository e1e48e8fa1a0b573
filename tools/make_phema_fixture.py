#!/usr/bin/env python3
"""Makes tests/fixtures/phema/edm2-coefficients.json: post-hoc EMA coefficients computed by the
published solver of Karras et al. 2024 (`solve_posthoc_coefficients` in training/phema.py of
github.com/NVlabs/edm2), for the test that ddpm's solver gives the same ones.

The solver is imported from a checkout of that repository (it is not on PyPI):
    git clone https://github.com/NVlabs/edm2 /tmp/edm2
    py=$(bash tools/python_env.sh) && $py tools/make_phema_fixture.py --edm2 /tmp/edm2

Each case: snapshots at `in_steps`, each holding the profiles `in_sigma_rels` (ddpm's layout:
every snapshot holds every tracked profile), and the profiles `out_sigma_rels` wanted at
`out_step`; `coefficients[i][j]` weighs input i (steps outer, profiles inner) for output j.
"""
import argparse
import importlib.util
import json
import pathlib

import numpy as np

CASES = [
    # The tiny preset's layout: 3,000 steps, a snapshot every 250, profiles 0.05 and 0.10.
    dict(in_steps=list(range(250, 3001, 250)), in_sigma_rels=[0.05, 0.10], out_step=3000, out_sigma_rels=[0.03, 0.05, 0.08, 0.12, 0.2]),
    # Few snapshots, a reconstruction at an earlier step than the last.
    dict(in_steps=[10, 20, 30, 40, 50, 60], in_sigma_rels=[0.05, 0.10], out_step=50, out_sigma_rels=[0.04, 0.07, 0.1]),
    # Three profiles, uneven steps.
    dict(in_steps=[1000, 3000, 7000, 12000, 20000], in_sigma_rels=[0.03, 0.06, 0.12], out_step=20000, out_sigma_rels=[0.025, 0.09, 0.15]),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edm2", type=pathlib.Path, required=True, help="a checkout of github.com/NVlabs/edm2")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/phema/edm2-coefficients.json")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("phema", args.edm2 / "training/phema.py")
    phema = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(phema)
    cases = []
    for case in CASES:
        in_ofs = np.array([s for s in case["in_steps"] for _ in case["in_sigma_rels"]], dtype=np.float64)
        in_std = np.array([r for _ in case["in_steps"] for r in case["in_sigma_rels"]], dtype=np.float64)
        out_std = np.array(case["out_sigma_rels"], dtype=np.float64)
        coefficients = phema.solve_posthoc_coefficients(in_ofs, in_std, case["out_step"], out_std)
        exponents = [float(phema.std_to_exp(s)) for s in case["in_sigma_rels"] + case["out_sigma_rels"]]
        cases.append(dict(case, exponents=exponents, coefficients=coefficients.tolist()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(source="NVlabs/edm2 training/phema.py solve_posthoc_coefficients", cases=cases), indent=1) + "\n")
    print(f"wrote {args.out}: {len(cases)} cases")


if __name__ == "__main__":
    main()

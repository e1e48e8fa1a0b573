#!/usr/bin/env python3
"""Turns the RESULT lines of tools/gpu-check.sh (summary.txt) into the Markdown tables of docs/results.md:
training and sampling, each row with img/s, ms per step, peak memory and the ratio to PyTorch's
eager f32+TF32 step (training) or PyTorch's DDIM loop (sampling), and, for training, to PyTorch
bf16 + torch.compile. Usage: python3 tools/gpu_table.py summary.txt"""
import sys


def parse(line):
    fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
    fields.setdefault("bench", "train")
    return fields


def flag(fields, key):
    return fields.get(key, "0") == "1"


def label(r):
    who = "PyTorch" if r["framework"] == "torch" else "ddpm"
    precision = {"f32": "f32", "tf32": "f32+TF32", "bf16": "bf16 autocast"}.get(r["precision"], r["precision"])
    if flag(r, "tf32") and precision == "f32":
        precision = "f32+TF32"
    names = {"compile": "torch.compile", "channels_last": "channels-last",
             "cuda_graph": "CUDA graph", "fused_norm_silu": "fused norm"}
    extras = [text for key, text in names.items() if flag(r, key)]
    if not (flag(r, "compile") or flag(r, "cuda_graph")):
        precision += ", eager"
    return " ".join([who, precision] + (["+ " + ", ".join(extras)] if extras else []))


def baseline(rows, **want):
    for r in rows:
        if r["framework"] == "torch" and all(r.get(k, "0") == v for k, v in want.items()):
            return float(r["img_per_s"])
    return None


def table(rows, references):
    # Both peaks: a CUDA graph's replays allocate nothing, so its memory shows as reserved only.
    head = ["configuration", "img/s", "ms/step", "peak alloc. GiB", "peak reserved GiB"]
    head += [name for name, _ in references]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        speed = float(r["img_per_s"])
        ratios = [f"{speed / ref:.2f}" if ref else "–" for _, ref in references]
        memory = [r.get(key, "–") for key in ("mem_peak_alloc_gib", "mem_peak_reserved_gib")]
        lines.append("| " + " | ".join([label(r), f"{speed:.0f}", r["ms_per_step"]] + memory + ratios) + " |")
    return "\n".join(lines)


def main():
    rows = [parse(l) for l in open(sys.argv[1]) if l.startswith("RESULT ")]
    train = [r for r in rows if r["bench"] == "train"]
    sample = [r for r in rows if r["bench"] == "sample"]
    eager = baseline(train, precision="f32", tf32="1", compile="0", channels_last="0")
    compiled = baseline(train, precision="bf16", compile="1")
    print(table(train, [("vs PyTorch f32+TF32", eager), ("vs PyTorch bf16 + compile", compiled)]))
    if sample:
        print()
        print(table(sample, [("vs PyTorch", baseline(sample, bench="sample"))]))


if __name__ == "__main__":
    main()

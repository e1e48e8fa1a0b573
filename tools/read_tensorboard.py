#!/usr/bin/env python3
"""Prints what TensorBoard's own reader finds in a run directory, as JSON:
{"scalars": {tag: [[step, value], ...]}, "images": {tag: [[step, width, height], ...]}}.

The tests compare it with the run's metrics.jsonl and sample grids. Usage:
    py=$(bash tools/python_env.sh) && $py tools/read_tensorboard.py runs/demo
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main():
    # size_guidance 0: keep every event (the reader samples by default).
    events = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    print(json.dumps({
        "scalars": {t: [[e.step, e.value] for e in events.Scalars(t)] for t in tags["scalars"]},
        "images": {t: [[e.step, e.width, e.height] for e in events.Images(t)] for t in tags["images"]},
    }))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Kill test: `kill -9` the trainer at random moments of a short CPU run, resuming each time.

Checks that every restart resumes (from the newest valid checkpoint), that no checkpoint on disk
is corrupt, that no more than one checkpoint interval of steps is ever lost, and that the run
killed N times ends bit-identical to the same run done straight.

    cargo build --release && python3 tools/kill_test.py [--kills 20] [--seed 1]
"""
import argparse
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

CONFIG = """
[model]
channels = 16
[train]
steps = 400
batch = 16
log_every = 1
device = "cpu"
[sample]
every = 0
num = 4
steps = 2
[checkpoint]
every = 10
keep = 3
"""
INTERVAL = 10


def checkpoints(run):
    folder = os.path.join(run, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.startswith("step-") and f.endswith(".json"))


def verify_checkpoints(run):
    """Every sidecar on disk must parse and match its weights' SHA-256; returns the steps."""
    steps = []
    for name in checkpoints(run):
        sidecar = os.path.join(run, "checkpoints", name)
        with open(sidecar) as f:
            meta = json.load(f)
        with open(os.path.join(run, "checkpoints", meta["tensors_file"]), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != meta["tensors_sha256"]:
            raise SystemExit(f"corrupt checkpoint {sidecar}")
        steps.append(meta["step"])
    return steps


def last_logged_step(run):
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    step = 0
    with open(path) as f:
        for line in f:
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError):
                pass  # a line cut short by the kill
    return step


def final_digest(run):
    name = checkpoints(run)[-1]
    with open(os.path.join(run, "checkpoints", name)) as f:
        meta = json.load(f)
    return meta["step"], meta["tensors_sha256"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "ddpm"))
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    rng = random.Random(a.seed)
    work = tempfile.mkdtemp(prefix="ddpm-kill-")
    config = os.path.join(work, "kill.toml")
    with open(config, "w") as f:
        f.write(CONFIG)
    run = os.path.join(work, "killed")
    train = [a.binary, "train", "--config", config, "--out", run, "--resume", "auto"]

    kills = resumes = 0
    max_lost = 0
    while kills < a.kills:
        before = last_logged_step(run)
        had_checkpoint = bool(checkpoints(run))
        proc = subprocess.Popen(train, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # Kill after a random number of logged steps plus a random fraction of the next one, so
        # that kills land anywhere (mid-step, mid-checkpoint) whatever the machine's speed.
        err, steps_seen, target = "", 0, rng.randint(1, 3 * INTERVAL)
        for line in proc.stderr:
            err += line
            steps_seen += line.startswith("step ")
            if steps_seen >= target:
                break
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is not None:
            break  # the run finished before this kill
        os.kill(proc.pid, signal.SIGKILL)
        err += proc.communicate()[1]
        kills += 1
        resumed = re.search(r"at step (\d+)", err)
        if had_checkpoint:
            if not resumed:
                raise SystemExit(f"restart {kills} did not resume:\n{err}")
            resumes += 1
            lost = before - int(resumed.group(1))
            max_lost = max(max_lost, lost)
            if lost > INTERVAL:
                raise SystemExit(f"restart {kills} lost {lost} steps (> one interval of {INTERVAL})")
        steps = verify_checkpoints(run)
        print(f"kill {kills:2d}: logged step {last_logged_step(run):4d}, checkpoints {steps}", flush=True)

    done = subprocess.run(train, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"final resume failed:\n{done.stderr}")
    resumes += 1 if "resumed from" in done.stderr else 0
    verify_checkpoints(run)

    straight = os.path.join(work, "straight")
    subprocess.run([a.binary, "train", "--config", config, "--out", straight], check=True, capture_output=True)
    killed_step, killed_digest = final_digest(run)
    straight_step, straight_digest = final_digest(straight)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        final_loss = [json.loads(l) for l in f if l.strip()][-1]["loss"]
    identical = killed_digest == straight_digest and killed_step == straight_step
    print(f"RESULT kills={kills} resumes={resumes} max_steps_lost={max_lost} checkpoint_interval={INTERVAL} "
          f"final_step={killed_step} final_loss={final_loss:.5f} identical_to_straight_run={identical}")
    if not identical:
        raise SystemExit("the killed-and-resumed run differs from the straight run")


if __name__ == "__main__":
    sys.exit(main())

"""Fault script: SIGKILL a tiny training run at random moments, rerun the same command each time, check bit-identity.

    python -m tests.faults                 # 20 kills (a few minutes on 2 cores)
    python -m tests.faults --kills 50 --seed 3 --keep /tmp/faults

Half of the kills come from outside after a random delay (anywhere: during the imports, before the first
checkpoint, mid-step, mid-evaluation, inside a write), half from the run itself at a random checkpoint write after a
random 1-40 ms delay (``--config.debug.sigkill_at_save`` / ``sigkill_save_delay_ms``), which lands inside that write
or just after it. After each kill the same command runs again; whenever a run finishes, every checkpoint of every
stream (all leaves and metadata) and the metrics must equal an uninterrupted run's. Not part of ``pytest`` (it takes
minutes); ``tests/test_checkpoint_faults.py`` covers every save boundary in-process. Exit status 1 on a mismatch.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from robust_flat.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = [sys.executable, "-m", "experiments.cifar10_at", "--config=experiments/configs/pgd_at.py:tiny",
           "--no-progress", "--config.train.epochs=3"]


def all_checkpoints(run_dir: str) -> dict:
    """Every checkpoint of every stream: ``{(stream, step): (leaves, meta)}``, the arrays as orbax restores them."""
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"))
    out = {}
    try:
        for which in ("latest", "snapshots", "best"):
            for step in ckpt.all_steps(which):
                state, meta = ckpt.restore(which, step)
                out[(which, step)] = ([np.asarray(x) for x in jax.tree.leaves(state)], meta)
    finally:
        ckpt.close()
    return out


def metrics(run_dir: str) -> list:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k not in ("time_s", "images_per_s")} for r in rows]


def differences(run_dir: str, ref_dir: str) -> list[str]:
    """What differs between two run directories' checkpoints and metrics (empty: bit-identical)."""
    got, want = all_checkpoints(run_dir), all_checkpoints(ref_dir)
    out = []
    if sorted(got) != sorted(want):
        out.append(f"checkpoints {sorted(got)} != {sorted(want)}")
    for key in sorted(set(got) & set(want)):
        (a, meta_a), (b, meta_b) = got[key], want[key]
        if len(a) != len(b) or not all(np.array_equal(x, y) for x, y in zip(a, b)):
            out.append(f"{key}: arrays differ")
        if meta_a != meta_b:
            out.append(f"{key}: metadata differs")
    if metrics(run_dir) != metrics(ref_dir):
        out.append("metrics.jsonl differs")
    return out


def _state_at_kill(run_dir: str) -> str:
    ck = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ck):
        return "nothing written"
    tmp = [f"{w}/{n}" for w in ("latest", "snapshots", "best") if os.path.isdir(os.path.join(ck, w))
           for n in os.listdir(os.path.join(ck, w)) if "tmp" in n]
    if tmp:
        return "inside a write (" + ", ".join(tmp) + " left)"
    latest = os.path.join(ck, "latest")
    steps = sorted(int(n) for n in os.listdir(latest) if n.isdigit()) if os.path.isdir(latest) else []
    return f"rolling checkpoints {steps}" if steps else "before the first rolling checkpoint"


def _run(run_dir: str, extra=(), kill_after: float | None = None) -> int:
    proc = subprocess.Popen(COMMAND + [f"--run-dir={run_dir}", *extra], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    if proc.returncode not in (0, -signal.SIGKILL):
        sys.stdout.write(out.decode()[-3000:])
        raise SystemExit(f"run failed with status {proc.returncode}")
    return proc.returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one, removed)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    work = args.keep or tempfile.mkdtemp(prefix="faults-")
    os.makedirs(work, exist_ok=True)
    ref = os.path.join(work, "reference")
    shutil.rmtree(ref, ignore_errors=True)
    t0 = time.time()
    _run(ref)
    t_ref = time.time() - t0
    print(f"reference run: {t_ref:.1f} s")
    kills, chains, failures = 0, 0, 0
    run_dir = None
    while kills < args.kills or run_dir is not None:
        if run_dir is None:
            chains += 1
            run_dir = os.path.join(work, f"chain{chains}")
            shutil.rmtree(run_dir, ignore_errors=True)
        if kills >= args.kills:  # finish the chain
            status, how = _run(run_dir), "finish"
        elif rng.random() < 0.5:
            delay = rng.uniform(0, 0.7 * t_ref)  # a resumed run is shorter than the whole run
            status, how = _run(run_dir, kill_after=delay), f"SIGKILL after {delay:.1f} s"
        else:
            k, ms = rng.randrange(8), rng.uniform(1, 40)
            status = _run(run_dir, [f"--config.debug.sigkill_at_save={k}",
                                    f"--config.debug.sigkill_save_delay_ms={ms:.1f}"])
            how = f"SIGKILL {ms:.0f} ms into checkpoint write #{k}"
        if status == -signal.SIGKILL:
            kills += 1
            print(f"kill {kills:2d} ({os.path.basename(run_dir)}): {how}: {_state_at_kill(run_dir)}", flush=True)
            continue
        diff = differences(run_dir, ref)
        failures += bool(diff)
        print(f"{os.path.basename(run_dir)} finished ({how}): "
              + ("bit-identical to the uninterrupted run" if not diff else "MISMATCH: " + "; ".join(diff)),
              flush=True)
        run_dir = None
    print(f"{kills} kills in {chains} chains: {'all bit-identical' if not failures else f'{failures} mismatches'} "
          f"({time.time() - t0:.0f} s)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

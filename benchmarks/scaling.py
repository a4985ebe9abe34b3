"""Data-parallel scaling of the real trainer: images/s on 1 device vs N devices, same global batch.

``python -m benchmarks.scaling [--devices 1,2] [--config experiments/configs/pgd_at.py:smoke] [--epochs 2]
[--out benchmarks/results/scaling.json] [-- extra --config.* overrides]``

Each device count runs ``python -m experiments.cifar10_at`` in a fresh process (on CPU the devices are forced with
``--xla_force_host_platform_device_count=N``; on a GPU machine it uses the first N GPUs through
``CUDA_VISIBLE_DEVICES``) on synthetic data, and reads the trainer's own ``images_per_s`` of the last epoch from
``metrics.jsonl`` (the first epoch includes compilation). Efficiency = (images/s on N devices) / (N x images/s on
1 device). On a CPU the forced host devices share the same cores that one device already uses through its thread
pool, so efficiency well below 1 is expected there; the row exists to show the sharded path runs and what it costs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

from robust_flat.io import atomic_write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(n: int, config: str, epochs: int, extra: list[str], backend: str) -> dict:
    env = dict(os.environ)
    if backend == "cpu":
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
        env["JAX_PLATFORMS"] = "cpu"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, f"run{n}")
        cmd = [sys.executable, "-m", "experiments.cifar10_at", f"--config={config}", f"--run-dir={run_dir}",
               "--no-progress", f"--config.train.epochs={epochs}", "--config.checkpoint.every_steps=100000",
               "--config.eval.early_stopping=False", "--config.eval.n_examples=0", *extra]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{n} device(s): training failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}"
                             f"\n{proc.stderr[-2000:]}")
        records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    last = records[-1]
    return {"devices": n, "images_per_s": last["images_per_s"], "epoch_time_s": last["time_s"],
            "per_epoch_images_per_s": [r["images_per_s"] for r in records]}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="1,2")
    ap.add_argument("--config", default="experiments/configs/pgd_at.py:smoke")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--backend", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--out", default="benchmarks/results/scaling.json")
    args = ap.parse_args(argv)
    rows = []
    for n in [int(v) for v in args.devices.split(",")]:
        print(f"{n} device(s) ...", flush=True)
        rows.append(run_once(n, args.config, args.epochs, extra, args.backend))
        base = rows[0]["images_per_s"] * rows[-1]["devices"] / rows[0]["devices"]
        rows[-1]["efficiency"] = round(rows[-1]["images_per_s"] / base, 3)
        print(f"  {rows[-1]['images_per_s']:.1f} images/s, efficiency {rows[-1]['efficiency']:.2f}", flush=True)
    result = {"meta": {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "config": args.config, "epochs": args.epochs, "extra": extra, "backend": args.backend,
                       "cpu_count": os.cpu_count(), "load_avg_end": os.getloadavg()}, "rows": rows}
    atomic_write_json(args.out, result, indent=1)  # creates the directory
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

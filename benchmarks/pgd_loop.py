"""PGD unrolled vs rolled on the backend at hand: first-call (compile + run) and run time, same results.

``python -m benchmarks.pgd_loop [--model small_cnn|resnet18] [--batch 128] [--steps 7,20] [--repeats 3]
[--out FILE.json]``

Eval-mode BN, L-inf 8/255, signed step 0.007, random inputs in [0, 1], one restart. ``unroll=True`` (the default
everywhere) traces every iteration into one program; ``unroll=False`` loops with ``lax.fori_loop``. The modes are
timed round-robin; the adversarial examples must agree (checked). On the 2-core CPU VM, small CNN, PGD-20 on 128
images: rolled 18.6 s vs unrolled 3.6 s (benchmarks/README.md), which is why PGD unrolls. On a GPU this script has
not run yet; ``benchmarks/gpu_suite.sh`` runs it.
"""
from __future__ import annotations

import argparse
import statistics

import jax
import numpy as np

from benchmarks.apgd_loop import random_setup, time_modes
from robust_flat.attacks.pgd import PGDConfig, pgd
from robust_flat.io import atomic_write_json


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small_cnn", choices=("small_cnn", "resnet18"))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", default="7,20", help="comma list of PGD step counts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    try:
        steps = [int(s) for s in args.steps.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--steps: comma list of integers, got {args.steps!r}")
    f, x, y, key = random_setup(args.model, args.batch)
    configs = {f"pgd{s}_{'unrolled' if u else 'rolled'}": PGDConfig(steps=s, unroll=u) for s in steps
               for u in (True, False)}
    outs, first, times = time_modes(pgd, configs, args.repeats, f, x, y, key)
    result = {"model": args.model, "batch": args.batch, "backend": jax.default_backend(),
              "device": jax.devices()[0].device_kind, "jax": jax.__version__, "modes": {}}
    for name in configs:
        steps_name, mode = name.rsplit("_", 1)
        twin = f"{steps_name}_{'rolled' if mode == 'unrolled' else 'unrolled'}"
        same = float(np.mean(np.abs(outs[name] - outs[twin]) < 1e-6))
        result["modes"][name] = {"first_call_s": first[name], "median_s": statistics.median(times[name]),
                                 "times_s": times[name], "share_equal_to_other_mode": same}
        print(f"{name:>16}: first call (compile + run) {first[name]:6.1f} s, run median "
              f"{statistics.median(times[name]):8.4f} s ({args.repeats} runs), equal to the other mode: {same:.3f}",
              flush=True)
    if args.out:
        atomic_write_json(args.out, result, indent=1)
    return result


if __name__ == "__main__":
    main()

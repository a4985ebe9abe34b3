"""How to loop APGD's iterations on the backend at hand: first-call (compile) time and run time per loop mode.

``python -m benchmarks.apgd_loop [--model small_cnn|resnet18] [--batch 64] [--n-iter 20]
[--modes scan:1,scan:20,host:1,host:5] [--repeats 2] [--out FILE.json]``
Small CNN (default) or ResNet-18, APGD-CE, L-inf 8/255, random inputs. ``scan:U`` = one program, ``lax.scan``
with unroll U; ``host:K`` = Python loop over compiled chunks of K unrolled iterations. Modes are timed round-robin
(interleaved) to spread the machine's noise; results must be identical across modes (checked).
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from robust_flat.attacks.apgd import APGDConfig, apgd
from robust_flat.io import atomic_write_json
from robust_flat.models import bind, create_model, init_model, make_logits_fn


def random_setup(model_name: str, batch: int):
    """``(f, x, y, key)``: the model at its init weights bound to a logits function, a random batch, a key."""
    model = create_model(model_name)
    params, state = init_model(model, jax.random.key(0))
    f = bind(make_logits_fn(model), params, state)
    x = jax.random.uniform(jax.random.key(1), (batch, 32, 32, 3))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    return f, x, y, jax.random.key(3)


def time_modes(attack, configs: dict, repeats: int, *args):
    """``attack(*args, config)`` per named config: first call (compile + run) and ``repeats`` round-robin runs.
    Returns ``(outputs as numpy, first-call seconds, run seconds lists)``, each keyed by name."""
    first, times, outs = {}, {name: [] for name in configs}, {}
    for name, cfg in configs.items():
        t = time.perf_counter()
        outs[name] = np.asarray(attack(*args, cfg))
        first[name] = time.perf_counter() - t
    for _ in range(repeats):
        for name, cfg in configs.items():
            t = time.perf_counter()
            jax.block_until_ready(attack(*args, cfg))
            times[name].append(time.perf_counter() - t)
    return outs, first, times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n-iter", type=int, default=20)
    ap.add_argument("--modes", default="scan:1,scan:20,host:1,host:5")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="small_cnn", choices=("small_cnn", "resnet18"))
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args()
    f, x, y, key = random_setup(args.model, args.batch)
    configs = {}
    for mode in args.modes.split(","):
        loop, k = mode.split(":")
        configs[mode] = APGDConfig(n_iter=args.n_iter, unroll=int(k), loop=loop)
    outs, first, times = time_modes(apgd, configs, args.repeats, f, x, y, key)
    ref = next(iter(outs.values()))
    result = {"model": args.model, "batch": args.batch, "n_iter": args.n_iter, "backend": jax.default_backend(),
              "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "modes": {m: {"first_call_s": first[m], "median_s": float(np.median(times[m])), "times_s": times[m],
                            "same_result": bool(np.allclose(outs[m], ref, atol=1e-6))} for m in configs}}
    if args.out:
        atomic_write_json(args.out, result, indent=1)
    for mode in configs:
        print(f"{mode:>8}: first call (compile + run) {first[mode]:6.1f} s, run median {np.median(times[mode]):6.2f} s "
              f"(min {min(times[mode]):.2f}, {len(times[mode])} runs), same result: "
              f"{np.allclose(outs[mode], ref, atol=1e-6)}", flush=True)


if __name__ == "__main__":
    main()

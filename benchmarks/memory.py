"""Device memory of the compiled JAX paths, from XLA's buffer assignment (no GPU needed).

``python -m benchmarks.memory [--models resnet18,small_cnn] [--batch-size 128] [--samples 10]
[--rows train_step,flatness_avg_vmap,...] [--out benchmarks/results/memory.json]``

Each row lowers and compiles one jitted function on abstract inputs (``jax.ShapeDtypeStruct``: nothing is allocated
or run) and reports ``compiled.memory_analysis()``: arguments + outputs + temporaries - aliased (donated) bytes. That
is the peak live device memory XLA plans for one call of the function. It is measured with the backend at hand
(XLA:CPU here); GPU buffer assignment differs in detail (fusion, cuDNN workspaces) but not in order of magnitude, so
the figures answer "does K = 10 fit a 16 GB GPU" by a margin, not to the last MB. Rows:

* ``train_step``: one PGD-7 adversarial-training step (state donated), as the trainer runs it;
* ``flatness_avg_<strategy>``: the per-batch unit of average-case flatness (PGD-20 under a random weight
  perturbation), for K = ``--samples`` weight samples at once (``vmap``), 2 at once (``chunked``) or 1 (``loop``);
* ``flatness_worst_loop``: one restart of the joint weight + input attack (worst case), one batch;
* ``hvp``: one Hessian-vector product w.r.t. all kernels.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from robust_flat import flatness as F
from robust_flat import hessian, models, xla
from robust_flat.io import atomic_write_json
from robust_flat.training import pgd_at
from robust_flat.training.optim import make_optimizer
from robust_flat.training.state import create_train_state

MODEL_OPTS = {"resnet18": {}, "small_cnn": {"norm": "rebn"}}


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), tree)


def memory_of(jitted, *args, **kwargs) -> dict:
    t = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    seconds = time.perf_counter() - t
    m = compiled.memory_analysis()
    parts = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    total = parts["argument"] + parts["output"] + parts["temp"] - parts["alias"]
    return {"total_gb": total / 2 ** 30, **{f"{k}_gb": v / 2 ** 30 for k, v in parts.items()},
            "compile_s": round(seconds, 1)}


ROWS = ("train_step", "flatness_avg_vmap", "flatness_avg_chunked", "flatness_avg_loop", "flatness_worst_loop", "hvp")


def rows_for(name: str, batch_size: int, samples: int, chunk: int, rows=ROWS) -> dict:
    model = models.create_model(name, **MODEL_OPTS[name])
    params, model_state = jax.eval_shape(lambda k: models.init_model(model, k), jax.random.PRNGKey(0))
    logits_fn, apply_fn = models.make_logits_fn(model), models.make_apply_fn(model)
    x = jax.ShapeDtypeStruct((batch_size, 32, 32, 3), jnp.float32)
    y = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)  # raw PRNGKey, as the trainer passes
    out = {"params": int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))}

    if "train_step" in rows:
        from experiments.configs import pgd_at as pgd_at_config
        config = pgd_at_config.get_config("paper")
        tx = make_optimizer(config.optimizer, 390, config.train.epochs)
        state = jax.eval_shape(lambda p, s: create_train_state(p, s, tx, jax.random.PRNGKey(1)), params, model_state)
        step = pgd_at.make_step(config, apply_fn, tx)
        batch = {"image": jax.ShapeDtypeStruct((batch_size, 32, 32, 3), jnp.uint8), "label": y}
        out["train_step"] = memory_of(xla.jit(step, donate_argnums=(0,)), state, batch, key)
        print(f"  {name} train_step: {out['train_step']['total_gb']:.2f} GB", flush=True)

    cfg = F.AverageCaseConfig(samples=samples, batch_size=batch_size)
    static, xi = F._static_config(cfg)
    for strategy, k in (("vmap", samples), ("chunked", chunk), ("loop", 1)):
        if f"flatness_avg_{strategy}" not in rows:
            continue
        # the attack program on the perturbed weights (the sampler is a separate, much smaller program)
        units = jax.ShapeDtypeStruct((k,), jnp.int32)
        vectorize = strategy != "loop"
        weights, keys = jax.eval_shape(lambda *a: F._avg_unit_weights(static, vectorize, *a, 0), xi, params, key,
                                       units)
        if strategy == "loop":
            out["flatness_avg_loop"] = memory_of(F._robust_losses_jit, logits_fn, static.attack, weights, model_state,
                                                 keys, x, y)
        else:
            out[f"flatness_avg_{strategy}"] = memory_of(F._avg_unit_losses_jit, logits_fn, static.attack, weights,
                                                        model_state, keys, x, y)
        out[f"flatness_avg_{strategy}"]["weight_samples_per_call"] = k
        # the sampler program runs before it; only its output (the weights above) outlives it
        out[f"flatness_avg_{strategy}"]["sampler_total_gb"] = memory_of(
            F._avg_unit_weights_jit, static, vectorize, xi, params, key, units, 0)["total_gb"]
        print(f"  {name} flatness_avg_{strategy} (K={k} per call): "
              f"{out[f'flatness_avg_{strategy}']['total_gb']:.2f} GB", flush=True)
    if "flatness_worst_loop" in rows:
        wcfg = F.WorstCaseConfig(batch_size=batch_size)
        static, xi = F._static_config(wcfg)
        units = jax.ShapeDtypeStruct((1,), jnp.int32)
        out["flatness_worst_loop"] = memory_of(F._worst_units_jit, logits_fn, static, False, xi, params,
                                               model_state, key, units, 0, x, y, mask)
        print(f"  {name} flatness_worst_loop: {out['flatness_worst_loop']['total_gb']:.2f} GB", flush=True)

    if "hvp" in rows:
        selected, rest = jax.eval_shape(lambda p: hessian.split_params(p), params)
        v = jax.ShapeDtypeStruct((int(sum(np.prod(a.shape) for a in jax.tree.leaves(selected))),), jnp.float32)
        out["hvp"] = memory_of(hessian._hvp_jit, logits_fn, selected, rest, model_state, x, y, mask, v)
        print(f"  {name} hvp: {out['hvp']['total_gb']:.2f} GB", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,small_cnn")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--samples", type=int, default=10, help="K weight samples (vmap row)")
    ap.add_argument("--chunk-size", type=int, default=2)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--out", default="benchmarks/results/memory.json")
    args = ap.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    if any(r not in ROWS for r in rows):
        raise SystemExit(f"unknown rows {[r for r in rows if r not in ROWS]}; choose from {', '.join(ROWS)}")
    result = {"meta": {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "backend": jax.default_backend(), "device": str(jax.devices()[0]),
                       "platform": platform.platform(), "jax": jax.__version__, "batch_size": args.batch_size,
                       "samples": args.samples, "chunk_size": args.chunk_size,
                       "method": "compiled.memory_analysis(): argument + output + temp - alias"},
              "models": {}}
    for name in args.models.split(","):
        print(f"{name} ...", flush=True)
        result["models"][name] = rows_for(name, args.batch_size, args.samples, args.chunk_size, rows)
    atomic_write_json(args.out, result, indent=1)  # creates the directory
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

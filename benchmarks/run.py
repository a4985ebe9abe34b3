"""Benchmark suite: robust-flat's JAX paths against equivalent PyTorch references on the same work.

``python -m benchmarks.run [--rows pgd_step,train_step,apgd_ce,flatness_avg,hvp] [--models small_cnn,resnet18]
[--repeats 5 | --repeats small_cnn=5,resnet18=2] [--batch-size 128] [--out benchmarks/results/latest.json]
[--no-torch] [--torch-threads N] [--skip resnet18:apgd_ce,...] [--switch-off small_cnn:pgd_step,...]
[--torch-device auto|cpu|cuda] [--min-time S] [--bf16]``

On a GPU (JAX's default backend) PyTorch runs on CUDA too (``--torch-device auto``) with cuDNN autotuning and TF32
as XLA's default precision, each timing sample averages back-to-back calls filling ``--min-time`` (0.5 s), % peak
is against a JAX matmul on the device, and per-row device memory peaks are recorded. ``--bf16`` adds a bfloat16
variant of the JAX AT step.

Rows (batch B of random images in [0, 1], float32, see benchmarks/README.md):

* ``pgd_step``: one L-inf PGD iteration (forward + backward w.r.t. the input, eval-mode BN, best-iterate tracking,
  sign step, projection);
* ``train_step``: one PGD-7 adversarial-training step (uint8 batch -> crop/flip -> PGD-7 in eval mode -> train-mode
  forward/backward -> SGD lr 0.05, momentum 0.9, Nesterov, weight decay 5e-4); JAX: ``training.pgd_at.train_step``
  in one jit with the state donated, as the trainer runs it;
* ``apgd_ce``: APGD-CE, 100 iterations, 1 restart (JAX: ``attacks.apgd``; PyTorch: pyautoattack's ``APGDAttack``).
  Labels are the model's clean predictions, so every point is attacked by both (pyautoattack skips misclassified
  points, ours iterates on fixed shapes);
* ``flatness_avg``: average-case flatness on one batch: K = 10 layer-wise relative perturbations on the sphere
  (xi = 0.5) x PGD-20 + the perturbed loss (JAX: ``flatness.average_case`` without the reference loss; PyTorch: a loop
  written here with the same algorithm);
* ``hvp``: one Hessian-vector product of the clean CE w.r.t. all kernels (>= 2-dim tensors), eval mode (JAX:
  ``hessian.HessianOperator.matvec``, forward-over-reverse; PyTorch: double backprop with ``create_graph``).

Variants of a row are timed interleaved in one process (JAX, PyTorch, [JAX with the XLA:CPU switch off], JAX,
PyTorch, ...) after untimed warm-up calls (``--light-warmup``: APGD and flatness warm up on 10 iterations / 1 weight
sample, which compile the same programs; for ResNet-18 on a CPU). Every row records the XLA compiles of its warm-up
and of its timed calls (``xla_compiles_timed``: 0 when nothing recompiles). PyTorch uses channels_last, frozen
parameters and eval mode during attacks, ``no_grad`` for forward-only parts. Timing assertions never belong in
tests; this script only reports.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys

import numpy as np

from benchmarks.harness import cpu_model, device_matmul_gflops, matmul_gflops, run_row, table
from benchmarks.rows import MODELS, ROW_BUILDERS, ROWS, WORK_F, Setup
from robust_flat.io import atomic_write_json

DEFAULT_SKIP = "resnet18:apgd_ce,resnet18:flatness_avg"
DEFAULT_SWITCH_OFF = "small_cnn:pgd_step,small_cnn:train_step,resnet18:pgd_step"


def _pairs(spec: str) -> set:
    return {tuple(p.split(":", 1)) if ":" in p else ("*", p) for p in spec.split(",") if p and p != "none"}


def _matches(pairs: set, model: str, row: str) -> bool:
    return (model, row) in pairs or ("*", row) in pairs


def parse_repeats(spec: str, models) -> dict:
    if "=" not in spec:
        return {m: int(spec) for m in models}
    out = {m: 1 for m in models}
    for part in spec.split(","):
        k, v = part.split("=")
        out[k.strip()] = int(v)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", default="5", help="N, or per model: small_cnn=5,resnet18=2")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per variant before timing (>= 1)")
    ap.add_argument("--light-warmup", action="store_true",
                    help="warm up the APGD and flatness rows with a cheaper call that compiles the same programs "
                         "(10 APGD iterations, 1 weight sample) instead of a full call; the compile time is then "
                         "read from XLA's compile events. For ResNet-18 on a CPU, where one call takes 10-25 min")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/latest.json")
    ap.add_argument("--no-torch", action="store_true", help="JAX variants only")
    ap.add_argument("--append", action="store_true",
                    help="merge into an existing --out file: its rows for other (model, row) pairs are kept, its "
                         "run metadata goes to meta['previous_runs']")
    ap.add_argument("--skip", default=DEFAULT_SKIP, help="model:row pairs (or rows) not to run; 'none' for none")
    ap.add_argument("--switch-off", default=DEFAULT_SWITCH_OFF,
                    help="model:row pairs (or rows) that also run with the XLA:CPU conv switch off; 'none' for none")
    ap.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--torch-device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where the PyTorch references run; auto: CUDA when JAX runs on a GPU")
    ap.add_argument("--bf16", action="store_true",
                    help="train_step also runs JAX with bfloat16 compute and float32 params (variant jax_bf16; "
                         "bf16_over_fp32 = its median / the float32 median)")
    ap.add_argument("--min-time", type=float, default=-1.0,
                    help="seconds per timing sample: shorter calls are repeated back to back and averaged "
                         "(-1: 0 on a CPU, 0.5 on an accelerator)")
    ap.add_argument("--matmul-size", type=int, default=4096)
    ap.add_argument("--matmul-repeats", type=int, default=5)
    ap.add_argument("--report", metavar="JSON", help="print the Markdown table of a saved result and exit")
    args = ap.parse_args(argv)
    if args.report:
        with open(args.report) as fh:
            print(table(json.load(fh), markdown=True))
        return None

    rows = [r for r in args.rows.split(",") if r]
    models = [m for m in args.models.split(",") if m]
    bad = [r for r in rows if r not in ROWS] + [m for m in models if m not in MODELS]
    if bad:
        raise SystemExit(f"unknown rows/models {bad}; rows: {', '.join(ROWS)}; models: {', '.join(MODELS)}")
    if args.warmup < 1 or args.batch_size < 1:
        raise SystemExit("--warmup and --batch-size must be >= 1")
    repeats = parse_repeats(args.repeats, models)
    skip, switch_off = _pairs(args.skip), _pairs(args.switch_off)
    with_torch = not args.no_torch

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    import jax
    import jaxlib
    import flax
    from robust_flat import xla
    backend = jax.default_backend()
    min_time = args.min_time if args.min_time >= 0 else (0.0 if backend == "cpu" else 0.5)
    if backend != "cpu":  # the switch only sets XLA:CPU options: off and on compile the same program
        switch_off = set()
    meta = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__, "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "flax": flax.__version__, "jax_backend": jax.default_backend(),
            "fast_cpu_conv": xla.fast_cpu_conv_enabled(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "load_avg_start": os.getloadavg(), "batch_size": args.batch_size, "warmup": args.warmup,
            "light_warmup": args.light_warmup, "min_time_s": min_time,
            "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
            "repeats": repeats, "work_F_per_image": WORK_F, "argv": sys.argv[1:] if argv is None else list(argv)}
    if with_torch:
        import torch
        if args.torch_threads > 0:
            torch.set_num_threads(args.torch_threads)
        meta["torch"], meta["torch_threads"] = torch.__version__, torch.get_num_threads()
        from benchmarks.torch_reference import torch_device
        meta["torch_device"] = tdev = torch_device(args.torch_device, backend)
        if tdev == "cuda":  # best settings: cuDNN picks its fastest algorithms; TF32 as XLA's default precision
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            meta["torch_cuda"] = {"device": torch.cuda.get_device_name(0), "cudnn_benchmark": True,
                                  "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "matmul_allow_tf32": True}
        torch.manual_seed(0)
    else:
        tdev = "cpu"

    def peak_gflops():
        if backend == "cpu":
            return matmul_gflops(args.matmul_size, args.matmul_repeats)
        return device_matmul_gflops(max(args.matmul_size, 8192), args.matmul_repeats)
    log(f"matmul peak ({backend}) ...")
    mm_start = peak_gflops()
    peak = mm_start["median_gflops"]
    meta["matmul_peak"] = {"start": mm_start, "used_for_pct_peak_gflops": peak}
    log(f"  {peak:.1f} GFLOP/s")

    result = {"meta": meta, "rows": []}
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    kept = []
    if args.append and os.path.exists(args.out):
        with open(args.out) as fh:
            old = json.load(fh)
        new_pairs = {(m, r) for m in models for r in rows if not _matches(skip, m, r)}
        kept = [r for r in old.get("rows", []) if (r["model"], r["row"]) not in new_pairs]
        previous = old.get("meta", {})
        for r in kept:  # rows of a run that did not record its date / peak per row
            r.setdefault("run_date_utc", previous.get("date_utc"))
            r.setdefault("matmul_peak_gflops", previous.get("matmul_peak", {}).get("used_for_pct_peak_gflops"))
        meta["previous_runs"] = previous.pop("previous_runs", []) + [previous]
        for name, info in previous.get("models", {}).items():
            meta.setdefault("models", {})[name] = info
    result["rows"] = list(kept)

    def save():  # atomic: an interrupted run leaves the previous file, never half of one
        atomic_write_json(args.out, result, indent=1)

    with xla.CompileCounter() as compiles:
        for name in models:
            todo = [r for r in rows if not _matches(skip, name, r)]
            if not todo:
                continue
            log(f"setup {name} (batch {args.batch_size}) ...")
            s = Setup(name, args.batch_size, with_torch, tdev, bf16=args.bf16)
            meta.setdefault("models", {})[name] = {"forward_gmac_per_image": s.macs / 1e9,
                                                   "twin_max_logit_diff": s.twin_check}
            for row in todo:
                log(f"row {name} {row} ...")
                if with_torch and tdev != "cpu":
                    import torch
                    torch.cuda.reset_peak_memory_stats()
                variants = ROW_BUILDERS[row](s, with_torch, _matches(switch_off, name, row))
                res = run_row(s, row, variants, WORK_F[row], repeats[name], args.warmup, peak, log,
                              light_warmup=args.light_warmup, compiles=compiles, min_time=min_time)
                res["run_date_utc"], res["matmul_peak_gflops"] = meta["date_utc"], peak
                result["rows"].append(res)
                save()
            del s
            gc.collect()
    meta["skipped"] = sorted(f"{m}:{r}" for m in models for r in rows if _matches(skip, m, r))
    mm_end = peak_gflops()
    meta["matmul_peak"]["end"] = mm_end
    meta["load_avg_end"] = os.getloadavg()
    save()
    print(f"# {meta['date_utc']}  {meta['cpu_model']}, {meta['cpu_count']} cores, load avg (1/5/15 min) start "
          f"{'/'.join(f'{l:.1f}' for l in meta['load_avg_start'])}, end "
          f"{'/'.join(f'{l:.1f}' for l in meta['load_avg_end'])}")
    print(f"# {mm_start.get('what', f'numpy {args.matmul_size}^2 float32 matmul')}: {peak:.1f} GFLOP/s at start, "
          f"{mm_end['median_gflops']:.1f} at end (% peak uses the start value); batch {args.batch_size}; JAX on "
          f"{meta['device_kind']}, PyTorch on {tdev}")
    print(table(result))
    print(f"# wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
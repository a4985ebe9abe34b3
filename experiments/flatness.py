"""Flatness of a trained model: ``python -m experiments.flatness --run-dir RUN --snapshot N|best|last --measure M``.

Measures (paper defaults; see :mod:`robust_flat.flatness`):

* ``avg``          average-case flatness of the robust loss: xi 0.5, 10 samples, PGD-20 inside, reference PGD-20 x 10
* ``worst``        worst-case flatness of the robust loss: joint weight+input attack, xi 0.003, weight lr 0.001,
                   20 iterations, 10 restarts (max over restarts of the dataset-mean loss)
* ``clean_avg``, ``clean_worst``   the same for the clean cross-entropy

  Each sample/restart is one weight perturbation for the whole evaluation set (``--nu-per dataset``, the default;
  the worst-case one is updated after every batch), as in the released code; ``--nu-per batch`` draws or attacks a
  new one for every batch (docs/paper-vs-code.md#nu-per).
* ``hessian``, ``landscape``       dispatched to ``robust_flat.hessian.run_cli`` / ``robust_flat.landscape.run_cli``;
  options this script does not know (``--k 4``, ``--directions random``) are passed to them as attributes. They
  show progress and resume the same way (Lanczos run / Hutchinson and SLQ probes; landscape curves / surface rows).

Data: ``--subset`` (default ``test_first1000``, the paper's; ``test_last500`` for the Hessian, ``test_last100`` for
the landscape), the first ``--n-examples`` of it (default 1000 for the flatness measures).

Output: ``RUN/flatness/<name>.json`` (summary) and ``<name>.npz`` (per-example losses), ``<name>`` =
``{measure}_xi{xi}_{snapshot}`` unless ``--name``. Interrupted runs resume: each finished sample/restart and the
reference loss are written atomically (:mod:`robust_flat.io`) under ``RUN/flatness/.partial/<name>-<hash>/``
(:mod:`robust_flat.partial`; the hash covers every setting that changes the numbers); a rerun skips them. Keys
derive from ``--seed``, so a resumed run gives the same numbers as an uninterrupted one. A finished result is not
recomputed unless ``--fresh``.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import sys
from typing import Callable, Optional

import numpy as np

from robust_flat.io import atomic_save_npz, atomic_write_json
from robust_flat.partial import PartialResults, finished_result, fingerprint

FLATNESS_MEASURES = ("avg", "worst", "clean_avg", "clean_worst")
DISPATCHED = ("hessian", "landscape")
DEFAULT_SUBSET = {"hessian": "test_last500", "landscape": "test_last100"}


def _eps(text: str) -> float:
    from robust_flat.evaluation import parse_eps

    try:
        return parse_eps(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from experiments.cli import OneLineParser

    p = OneLineParser(prog="python -m experiments.flatness", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="training run directory (config.json, checkpoints/)")
    p.add_argument("--snapshot", default="last", help="epoch number, 'best' or 'last' (default)")
    p.add_argument("--measure", required=True, choices=FLATNESS_MEASURES + DISPATCHED)
    p.add_argument("--xi", type=float, default=None, help="neighbourhood radius (default 0.5 avg, 0.003 worst)")
    p.add_argument("--samples", type=int, default=None,
                   help="random samples (avg) or restarts (worst); default 10")
    p.add_argument("--n-examples", type=int, default=None, help="first N examples of the subset (default 1000 for "
                   "the flatness measures, all of the subset otherwise)")
    p.add_argument("--subset", default=None, help="evaluation subset (default test_first1000)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--use-ema", action="store_true", help="evaluate the weight-averaged parameters")
    p.add_argument("--eps", type=_eps, default=8 / 255, help="L-inf radius of the input attacks (8/255 or 0.0314)")
    p.add_argument("--pgd-steps", type=int, default=20, help="PGD iterations (inner max and reference)")
    p.add_argument("--reference-restarts", type=int, default=10)
    p.add_argument("--attack-iters", type=int, default=20, help="joint weight(+input) attack iterations (worst)")
    p.add_argument("--weight-lr", type=float, default=0.001, help="worst-case weight lr (paper 0.001; code 0.01)")
    p.add_argument("--nu-per", choices=("dataset", "batch"), default="dataset",
                   help="dataset (default): one weight perturbation nu per sample/restart for the whole evaluation "
                        "set, the worst-case nu updated after every batch (--attack-iters passes), as the released "
                        "code that produced the paper's numbers; batch: a new nu for every batch, the worst-case "
                        "attack running --attack-iters steps per batch, which at 20 steps has not converged and "
                        "understates the worst case (docs/paper-vs-code.md#nu-per)")
    p.add_argument("--distribution", choices=("ball", "sphere", "uniform_norm"), default="ball",
                   help="average-case nu: in the ball (paper, default) or on the sphere (code)")
    p.add_argument("--granularity", choices=("layer", "filter", "global"), default="layer")
    p.add_argument("--strategy", choices=("loop", "chunked", "vmap"), default=None,
                   help="how the samples are evaluated (default: loop, measured fastest for ResNet-18 on "
                        "CPU and GPU; vmap is faster for small models on a GPU)")
    p.add_argument("--chunk-size", type=int, default=2)
    p.add_argument("--name", default=None, help="output file name (without .json)")
    p.add_argument("--fresh", action="store_true", help="ignore finished and partial results")
    p.add_argument("--no-progress", action="store_true")
    return p


def _extra_args(extra: list[str], ns: argparse.Namespace) -> argparse.Namespace:
    """``--some-opt value`` / ``--flag`` pairs -> attributes ``some_opt`` (for the hessian/landscape modules)."""
    i = 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--"):
            raise SystemExit(f"unexpected argument {tok!r}")
        name, _, value = tok[2:].partition("=")
        if not value:
            if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                value, i = extra[i + 1], i + 1
            else:
                value = True
        setattr(ns, name.replace("-", "_"), value)
        i += 1
    return ns


def make_config(args, clip_weights: Optional[float] = None):
    """The flatness configuration for ``args.measure`` (paper defaults, overridden by the CLI options)."""
    from robust_flat.attacks.pgd import PGDConfig
    from robust_flat.flatness import AverageCaseConfig, WorstCaseConfig
    from robust_flat.weights import Neighbourhood, WeightAttackConfig

    robust = not args.measure.startswith("clean_")
    worst = args.measure.endswith("worst")
    xi = args.xi if args.xi is not None else (0.003 if worst else 0.5)
    samples = args.samples if args.samples is not None else 10
    nb = Neighbourhood(xi=xi, granularity=args.granularity, box=clip_weights or None)
    inner = PGDConfig(eps=args.eps, step_size=0.007, steps=args.pgd_steps) if robust else None
    reference = (PGDConfig(eps=args.eps, step_size=0.007, steps=args.pgd_steps, restarts=args.reference_restarts)
                 if robust else None)
    common = dict(reference_attack=reference, nu_per=args.nu_per, batch_size=args.batch_size,
                  strategy=args.strategy, chunk_size=args.chunk_size)
    if worst:
        attack = WeightAttackConfig(neighbourhood=nb, lr=args.weight_lr, steps=args.attack_iters,
                                    input_attack=inner)
        return WorstCaseConfig(attack=attack, restarts=samples, **common)
    return AverageCaseConfig(neighbourhood=nb, samples=samples, distribution=args.distribution, attack=inner,
                             **common)


# ------------------------------------------------------------------------------------------------ persistence
def save_unit(partial: PartialResults, k: int, losses: np.ndarray) -> None:
    partial.save_array(f"unit_{k:04d}", losses)


def load_units(partial: PartialResults, n_units: int, n_examples: int) -> dict[int, np.ndarray]:
    done = {}
    for k in range(n_units):
        arr = partial.load_array(f"unit_{k:04d}", (n_examples,))
        if arr is not None:
            done[k] = arr
    return done


def _load_data(load_eval_set, loaded, subset, data_dir, n):
    x, y = load_eval_set(loaded.config, subset, data_dir)
    if n is not None:
        if n > len(x):
            raise SystemExit(f"--n-examples {n} but subset {subset} has only {len(x)} examples")
        x, y = x[:n], y[:n]
    return np.asarray(x, np.float32), np.asarray(y, np.int32)


def _dispatch(measure, args, loaded, x, y, out_dir):
    try:
        module = importlib.import_module(f"robust_flat.{measure}")
    except ModuleNotFoundError as e:
        if e.name != f"robust_flat.{measure}":
            raise
        raise SystemExit(f"--measure {measure} needs robust_flat/{measure}.py, which is not installed") from None
    if not hasattr(module, "run_cli"):
        raise SystemExit(f"robust_flat.{measure} has no run_cli(args, loaded_run, x, y, out_dir) function")
    return module.run_cli(args, loaded, x, y, out_dir)


def main(argv: Optional[list[str]] = None, *, load_run: Optional[Callable] = None,
         load_eval_set: Optional[Callable] = None) -> dict:
    """Run the CLI; returns the result dict. ``load_run``/``load_eval_set`` default to
    :func:`robust_flat.runs.load_run` / :func:`robust_flat.data.load_eval_set` (injectable for tests)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.measure in FLATNESS_MEASURES:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args = _extra_args(extra, args)
    if args.snapshot not in ("best", "last") and not args.snapshot.isdigit():
        parser.error(f"--snapshot must be an epoch number, 'best' or 'last', got {args.snapshot!r}")
    if args.n_examples is not None and args.n_examples < 1:
        parser.error(f"--n-examples must be >= 1, got {args.n_examples}")
    if args.measure in FLATNESS_MEASURES:  # every setting checked before the (slow) loading of the run
        if args.xi is not None and not args.xi >= 0:
            parser.error(f"--xi must be >= 0 (a relative radius, e.g. 0.5 or 0.003), got {args.xi}")
        if args.samples is not None and args.samples < 1:
            parser.error(f"--samples must be >= 1, got {args.samples}")
        if min(args.batch_size, args.chunk_size) < 1 or args.pgd_steps < 0:
            parser.error("--batch-size and --chunk-size must be >= 1, --pgd-steps >= 0")
        try:
            make_config(args)
        except ValueError as e:
            parser.error(str(e))
    if load_run is None:
        from robust_flat.runs import load_run
    if load_eval_set is None:
        from robust_flat.data import load_eval_set

    snapshot = args.snapshot if args.snapshot in ("best", "last") else int(args.snapshot)
    from experiments.cli import load_checked

    loaded = load_checked(load_run, args.run_dir, snapshot)
    out_dir = os.path.join(args.run_dir, "flatness")
    subset = args.subset or DEFAULT_SUBSET.get(args.measure, "test_first1000")
    if args.measure in DISPATCHED:
        x, y = _load_data(load_eval_set, loaded, subset, args.data_dir, args.n_examples)
        return _dispatch(args.measure, args, loaded, x, y, out_dir)

    import jax

    from robust_flat.flatness import average_case, config_to_dict, total_work, worst_case
    from robust_flat.models import make_logits_fn

    params = loaded.params
    if args.use_ema:
        if loaded.ema_params is None:
            raise SystemExit("--use-ema: this run has no weight-averaged parameters")
        params = loaded.ema_params
    clip = None
    try:
        clip = loaded.config.train.get("clip_weights")
    except (AttributeError, KeyError):
        pass
    config = make_config(args, clip)
    n = args.n_examples if args.n_examples is not None else 1000
    x, y = _load_data(load_eval_set, loaded, subset, args.data_dir, n)

    xi = config.neighbourhood.xi if hasattr(config, "neighbourhood") else config.attack.neighbourhood.xi
    from robust_flat.runs import snapshot_tag

    name = args.name or f"{args.measure}_xi{xi:g}_{snapshot_tag(args.snapshot, loaded.epoch)}"
    cfg_dict = config_to_dict(config)
    cfg_dict.pop("strategy", None)  # evaluation strategy does not change the numbers
    cfg_dict.pop("chunk_size", None)
    payload = {"config": cfg_dict, "measure": args.measure, "seed": args.seed, "subset": subset, "n": len(x),
               "epoch": loaded.epoch, "step": loaded.step, "snapshot": str(args.snapshot), "ema": args.use_ema,
               "labels": hashlib.sha256(y.tobytes()).hexdigest()[:12]}
    fp = fingerprint(payload)
    json_path = os.path.join(out_dir, f"{name}.json")

    previous = None if args.fresh else finished_result(json_path, fp)
    if previous is not None:
        print(f"{json_path} is up to date (flatness {previous['flatness']:.4f}); use --fresh to recompute")
        return previous
    partial = PartialResults(out_dir, name, fp, fresh=args.fresh)

    done = load_units(partial, config.units, len(x))
    reference = partial.load_array("reference", (len(x),))
    nb = total_work(config, len(x), include_reference=reference is None)
    per_unit = total_work(config, len(x), include_reference=False) // config.units
    total = nb - per_unit * len(done)
    if done or reference is not None:
        print(f"resuming: {len(done)}/{config.units} samples and {'the' if reference is not None else 'no'} "
              f"reference loss already done ({partial.path})")

    from tqdm import tqdm
    bar = tqdm(total=total, desc=f"{args.measure} xi={xi:g}", unit="batch", disable=args.no_progress)

    fn = worst_case if args.measure.endswith("worst") else average_case
    logits_fn = make_logits_fn(loaded.model)  # eval-mode BN
    try:
        result = fn(logits_fn, params, loaded.model_state, x, y, jax.random.PRNGKey(args.seed), config,
                    done=done, on_unit=lambda k, losses: save_unit(partial, k, losses),
                    reference=reference, on_reference=lambda r: partial.save_array("reference", r),
                    progress=bar.update)
    finally:
        bar.close()

    out = result.to_dict()
    out.update({"fingerprint": fp, "run_dir": os.path.abspath(args.run_dir), "snapshot": str(args.snapshot),
                "epoch": loaded.epoch, "step": loaded.step, "seed": args.seed, "subset": subset,
                "use_ema": args.use_ema, "resumed_units": sorted(done)})
    atomic_save_npz(os.path.join(out_dir, f"{name}.npz"), per_example=result.per_example,
                    reference_per_example=result.reference_per_example)
    atomic_write_json(json_path, out, indent=2)
    partial.remove()
    print(f"{args.measure}: flatness {result.flatness:.4f} = {'mean' if fn is average_case else 'max'} perturbed "
          f"{result.perturbed_mean if fn is average_case else result.perturbed_max:.4f} - reference "
          f"{result.reference:.4f} (std over samples {result.perturbed_std:.4f}) -> {json_path}")
    return out


if __name__ == "__main__":
    from experiments.cli import output_dirs, run_cli

    try:
        run_cli(main, sys.argv[1:], writes=output_dirs(sys.argv[1:], "flatness"),
                kept="finished samples are kept under RUN/flatness/.partial/",
                elsewhere="copy the run directory to a writable disk and measure it there")
    except KeyboardInterrupt:
        print("\ninterrupted: finished units are kept under RUN/flatness/.partial/; run the same command again to "
              "resume", file=sys.stderr)
        sys.exit(130)

"""Flatness of a trained model: ``python -m experiments.flatness --run-dir RUN --snapshot N|best|last --measure M``.

Measures (paper defaults; see :mod:`robust_flat.flatness`):

* ``avg``          average-case flatness of the robust loss: xi 0.5, 10 samples, PGD-20 inside, reference PGD-20 x 10
* ``worst``        worst-case flatness of the robust loss: joint weight+input attack, xi 0.003, weight lr 0.001,
                   20 iterations, 10 restarts (max over restarts of the dataset-mean loss)
* ``clean_avg``, ``clean_worst``   the same for the clean cross-entropy

  Each sample/restart is one weight perturbation for the whole evaluation set (``--nu-per dataset``, the default;
  the worst-case one is updated after every batch), as in the released code; ``--nu-per batch`` draws or attacks a
  new one for every batch (docs/paper-vs-code.md#nu-per).
* ``hessian``        extreme eigenvalues, trace and spectral density of the Hessian (:mod:`experiments.hessian`)
* ``landscape``      loss curves and surfaces along weight directions (:mod:`experiments.landscape`)

  They show progress and resume the same way (Lanczos run / Hutchinson and SLQ probes; curves / surface rows).
  Every option belongs to some measures (``--help`` lists them by measure, with their defaults): one given with
  another measure, or a misspelt one, is refused (one line, exit status 2).

Data: ``--subset`` (default ``test_first1000``, the paper's; ``test_last500`` for the Hessian, ``test_last100`` for
the landscape), the first ``--n-examples`` of it (default 1000 for the flatness measures, 128 for the landscape,
all of it for the Hessian).

Output of the flatness measures (the Hessian's and the landscape's: see their modules): ``RUN/flatness/<name>.json``
(summary) and ``<name>.npz`` (per-example losses), ``<name>`` = ``{measure}_xi{xi}_{snapshot}`` unless ``--name``.
Interrupted runs resume: each finished sample/restart and the
reference loss are written atomically (:mod:`robust_flat.io`) under ``RUN/flatness/.partial/<name>-<hash>/``
(:mod:`robust_flat.partial`; the hash covers every setting that changes the numbers); a rerun skips them. Keys
derive from ``--seed``, so a resumed run gives the same numbers as an uninterrupted one. A finished result is not
recomputed unless ``--fresh``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
from typing import Callable, Optional

import numpy as np

from experiments import hessian, landscape
from experiments.cli import (OneLineParser, add_step_rule, at_least, checked, eval_examples, load_snapshot,
                             run_measure_cli)
from robust_flat.io import atomic_save_npz, atomic_write_json
from robust_flat.partial import PartialResults, finished_result, fingerprint
from robust_flat.runs import WEIGHTS, check_snapshot

FLATNESS_MEASURES = ("avg", "worst", "clean_avg", "clean_worst")
MEASURES = FLATNESS_MEASURES + ("hessian", "landscape")
ROBUST = ("avg", "worst", "hessian", "landscape")  # the measures that attack inputs (--eps, --pgd-steps)
DEFAULT_SUBSET = {"hessian": "test_last500", "landscape": "test_last100"}
INSTEAD = {("--samples", "landscape"): "--num-directions", ("--granularity", "landscape"): "--normalization"}
_UNSET = object()


def _eps(text: str) -> float:
    from robust_flat.evaluation import parse_eps

    try:
        return parse_eps(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, unless it names the default itself or has none."""

    def _get_help_string(self, action):
        text = action.help or ""
        none = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if none or action.required or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class MeasureParser(OneLineParser):
    """Options that belong to some measures: one given with another ``--measure`` is a one-line error (exit 2), as
    is a misspelt one (no abbreviations: ``--lanczos-iter`` is not ``--lanczos-iters``)."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, formatter_class=_HelpFormatter, **kwargs)
        self.applies = {}  # dest -> (flag, the measures it applies to)

    def measure_group(self, title: str, measures: tuple) -> Callable:
        """``option(*flags, applies=measures, **kwargs)``: ``add_argument`` in the help section ``title``; an option
        that applies to other measures than the section's names them at the end of its help."""
        group = self.add_argument_group(title)

        def option(*flags, applies=measures, **kwargs):
            if tuple(applies) != tuple(measures):
                kwargs["help"] = f"{kwargs.get('help', '')} [{', '.join(applies)}]".strip()
            action = group.add_argument(*flags, **kwargs)
            self.applies[action.dest] = (flags[0], tuple(applies))
            return action

        return option

    def parse_known_args(self, args=None, namespace=None):
        if namespace is not None:
            return super().parse_known_args(args, namespace)
        ns, extra = super().parse_known_args(args, argparse.Namespace(**dict.fromkeys(self.applies, _UNSET)))
        for dest, (flag, measures) in self.applies.items():
            if getattr(ns, dest) is _UNSET:  # not given: its default
                setattr(ns, dest, self.get_default(dest))
            elif ns.measure not in measures:
                instead = INSTEAD.get((flag, ns.measure))
                self.error(f"{flag} is not an option of --measure {ns.measure}; "
                           + (f"use {instead}" if instead else f"it belongs to --measure {', '.join(measures)}"))
        return ns, extra


def build_parser() -> MeasureParser:
    p = MeasureParser(prog="python -m experiments.flatness", description=__doc__)
    common = p.measure_group("options of every measure (or of those in [...])", MEASURES)
    common("--run-dir", required=True, help="training run directory (config.json, checkpoints/)")
    common("--snapshot", default="last", help="epoch number, 'best', 'best_ema' (the averaged weights' "
           "early-stopping epoch) or 'last'")
    common("--measure", required=True, choices=MEASURES)
    common("--n-examples", type=int, default=None, help="the first N examples of the subset (default: 1000 for "
           "the flatness measures, 128 for landscape, all of the subset for hessian)")
    common("--subset", default=None, help="evaluation subset (default: test_first1000; test_last500 for hessian, "
           "test_last100 for landscape)")
    common("--data-dir", default=None, help="the dataset's folder (default: the run's config)")
    common("--seed", type=int, default=0, help="every random key derives from it")
    common("--weights", default="params", choices=WEIGHTS, help="the trained weights (default) or their average "
           "(ema) with its own batch-norm statistics")
    common("--name", default=None, help="output file name without .json (default: from the measure and the "
           "snapshot, e.g. avg_xi0.5_last-ep30, hessian_last-ep30, landscape_best-ep12)")
    common("--fresh", action="store_true", help="ignore finished and partial results")
    common("--no-progress", action="store_true", help="no progress bar")
    common("--eps", applies=ROBUST, type=_eps, default=8 / 255,
           help="L-inf radius of the input attacks, 8/255 or 0.0314 (default: 8/255)")
    common("--pgd-steps", applies=ROBUST, type=int, default=20,
           help="PGD iterations (inner max and reference; the robust-loss Hessian; every landscape point)")
    add_step_rule(common, applies=ROBUST)
    common("--batch-size", applies=FLATNESS_MEASURES + ("hessian",), type=int, default=128)
    common("--lanczos-iters", applies=("hessian", "landscape"), type=int, default=None,
           help=f"Lanczos iterations (default: {hessian.LANCZOS_ITERS} for hessian; {landscape.LANCZOS_ITERS} for "
                "landscape's Hessian direction)")

    flat = p.measure_group("options of --measure avg, worst, clean_avg, clean_worst (or of those in [...])",
                           FLATNESS_MEASURES)
    flat("--xi", type=float, default=None, help="neighbourhood radius, relative per layer (default: 0.5 for the "
         "average case, 0.003 for the worst case)")
    flat("--samples", type=int, default=10, help="random samples (average case) or restarts (worst case)")
    flat("--reference-restarts", applies=("avg", "worst"), type=int, default=10,
         help="restarts of the reference PGD")
    flat("--attack-iters", applies=("worst", "clean_worst"), type=int, default=20,
         help="joint weight(+input) attack iterations")
    flat("--weight-lr", applies=("worst", "clean_worst"), type=float, default=0.001,
         help="weight learning rate of the worst case (paper 0.001; code 0.01)")
    flat("--nu-per", choices=("dataset", "batch"), default="dataset",
         help="dataset: one weight perturbation nu per sample/restart for the whole evaluation set, the "
              "worst-case nu updated after every batch (--attack-iters passes), as the released code that "
              "produced the paper's numbers; batch: a new nu for every batch, the worst-case attack running "
              "--attack-iters steps per batch, which at 20 steps has not converged and understates the worst "
              "case (docs/paper-vs-code.md#nu-per)")
    flat("--distribution", applies=("avg", "clean_avg"), choices=("ball", "sphere", "uniform_norm"),
         default="ball", help="average-case nu: in the ball (paper) or on the sphere (code)")
    flat("--granularity", choices=("layer", "filter", "global"), default="layer")
    flat("--strategy", choices=("loop", "chunked", "vmap"), default=None,
         help="how the samples are evaluated (default: loop, measured fastest for ResNet-18 on CPU and GPU; "
              "vmap is faster for small models on a GPU)")
    flat("--chunk-size", type=int, default=2)

    hessian.add_options(p.measure_group("options of --measure hessian", ("hessian",)))
    landscape.add_options(p.measure_group("options of --measure landscape", ("landscape",)))
    return p


def make_config(args, clip_weights: Optional[float] = None):
    """The flatness configuration for ``args.measure`` (paper defaults, overridden by the CLI options)."""
    from robust_flat.attacks.pgd import PGDConfig, step_size_for
    from robust_flat.flatness import AverageCaseConfig, WorstCaseConfig
    from robust_flat.weights import Neighbourhood, WeightAttackConfig

    robust = not args.measure.startswith("clean_")
    worst = args.measure.endswith("worst")
    xi = args.xi if args.xi is not None else (0.003 if worst else 0.5)
    samples = args.samples if args.samples is not None else 10
    nb = Neighbourhood(xi=xi, granularity=args.granularity, box=clip_weights or None)
    step = step_size_for(args.eps, args.pgd_step_rule)
    inner = PGDConfig(eps=args.eps, step_size=step, steps=args.pgd_steps) if robust else None
    reference = (PGDConfig(eps=args.eps, step_size=step, steps=args.pgd_steps, restarts=args.reference_restarts)
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


def _depends_on(args, loaded, params, x, y) -> dict:
    """What a Hessian or landscape result depends on besides its own settings (in its fingerprint): digests of the
    weights and the data, the snapshot, ``--weights``."""
    from robust_flat.partial import array_digest

    return {"params": array_digest(params, loaded.model_state), "data": array_digest(x, y), "epoch": loaded.epoch,
            "step": loaded.step, "snapshot": str(args.snapshot), "use_ema": args.weights == "ema"}


RUNS = {"hessian": hessian.run, "landscape": landscape.run}
CONFIGS = {"hessian": hessian.config, "landscape": landscape.config}


def main(argv: Optional[list[str]] = None, *, load_run: Optional[Callable] = None,
         load_eval_set: Optional[Callable] = None) -> dict:
    """Run the CLI; returns the result dict. ``load_run``/``load_eval_set`` default to
    :func:`robust_flat.runs.load_run` / :func:`robust_flat.data.load_eval_set` (injectable for tests)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    snapshot = checked(parser, check_snapshot, args.snapshot)
    at_least(parser, args, 1, "n_examples")
    if args.measure in FLATNESS_MEASURES:  # every setting checked before the (slow) loading of the run
        at_least(parser, args, 0, "xi", hint=" (a relative radius, e.g. 0.5 or 0.003)")
        at_least(parser, args, 1, "samples")
        if min(args.batch_size, args.chunk_size) < 1 or args.pgd_steps < 0:
            parser.error("--batch-size and --chunk-size must be >= 1, --pgd-steps >= 0")
    checked(parser, CONFIGS.get(args.measure, make_config), args)
    # the measures see the chosen weights and their batch-norm statistics as the run's
    loaded = load_snapshot(load_run, args.run_dir, snapshot, args.weights)
    out_dir = os.path.join(args.run_dir, "flatness")
    subset = args.subset or DEFAULT_SUBSET.get(args.measure, "test_first1000")
    params = loaded.params
    if args.measure in RUNS:
        x, y = eval_examples(load_eval_set, loaded.config, subset, args.data_dir, args.n_examples)
        if args.measure == "landscape" and args.n_examples is None:  # the paper's one batch
            x, y = x[:landscape.N_EXAMPLES], y[:landscape.N_EXAMPLES]
        return RUNS[args.measure](args, loaded, params, x, y, out_dir, _depends_on(args, loaded, params, x, y))

    import jax

    from robust_flat.flatness import average_case, config_to_dict, total_work, worst_case
    from robust_flat.models import make_logits_fn

    clip = None
    try:
        clip = loaded.config.train.get("clip_weights")
    except (AttributeError, KeyError):
        pass
    config = make_config(args, clip)
    n = args.n_examples if args.n_examples is not None else 1000
    x, y = eval_examples(load_eval_set, loaded.config, subset, args.data_dir, n)

    xi = config.neighbourhood.xi if hasattr(config, "neighbourhood") else config.attack.neighbourhood.xi
    from robust_flat.runs import snapshot_tag

    name = args.name or f"{args.measure}_xi{xi:g}_{snapshot_tag(args.snapshot, loaded.epoch)}"
    cfg_dict = config_to_dict(config)
    cfg_dict.pop("strategy", None)  # evaluation strategy does not change the numbers
    cfg_dict.pop("chunk_size", None)
    payload = {"config": cfg_dict, "measure": args.measure, "seed": args.seed, "subset": subset, "n": len(x),
               "epoch": loaded.epoch, "step": loaded.step, "snapshot": str(args.snapshot), "ema": args.weights == "ema",
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
                "use_ema": args.weights == "ema", "resumed_units": sorted(done)})
    atomic_save_npz(os.path.join(out_dir, f"{name}.npz"), per_example=result.per_example,
                    reference_per_example=result.reference_per_example)
    atomic_write_json(json_path, out, indent=2)
    partial.remove()
    print(f"{args.measure}: flatness {result.flatness:.4f} = {'mean' if fn is average_case else 'max'} perturbed "
          f"{result.perturbed_mean if fn is average_case else result.perturbed_max:.4f} - reference "
          f"{result.reference:.4f} (std over samples {result.perturbed_std:.4f}) -> {json_path}")
    return out


if __name__ == "__main__":
    run_measure_cli(main, "flatness", "interrupted: finished units are kept under RUN/flatness/.partial/; run the same "
                    "command again to resume", kept="finished samples are kept under RUN/flatness/.partial/",
                    elsewhere="copy the run directory to a writable disk and measure it there")

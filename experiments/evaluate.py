"""Robust accuracy of a trained model: ``python -m experiments.evaluate --run-dir RUN --attack autoattack``.

    python -m experiments.evaluate --run-dir RUN [--snapshot N|best|last|best_ema] --attack autoattack|pgd|...
        [--version standard|standard_nosquare|fast|custom [--attacks apgd-ce,apgd-t]] [--eps 8/255] [--norm linf]
        [--n-examples 1000] [--subset test_first1000] [--batch-size 128] [--seed 0] [--data-dir D]
        [--weights params|ema]

Attacks: ``autoattack`` (versions: ``standard`` = APGD-CE, APGD-T, FAB-T, Square as in the original;
``standard_nosquare`` = FAB-T, APGD-CE, APGD-T, what the released code of Stutz et al. ran for the paper's RErr;
``fast`` = APGD-CE + APGD-T, not AA-standard; ``custom`` with ``--attacks``), one AutoAttack component alone
(``apgd-ce``, ``apgd-dlr``, ``apgd-t``, ``fab``, ``fab-t``, ``square``), or ``pgd`` (the paper's PGD-20 with 10
restarts, step 0.007 at eps 8/255, scaled with eps). ``--eps`` takes fractions (``8/255``).

Output in ``RUN/evaluations/``: ``<name>.json`` (summary: clean and robust accuracy, robust accuracy after each
attack, RErr, which attack broke how many points, attack configs, eps, seed, number of examples, library versions)
and ``<name>.examples.json`` (per example: clean correct, broken by which attack, final perturbation norm, and
which attacks ran on it), rewritten atomically after every batch. An interrupted evaluation started again with the
same arguments resumes from there (``--fresh`` starts over). ``<name>`` defaults to
``{attack}[-{version}]_{norm}_eps{eps}_{subset}_n{N}_{snapshot}[_ema]``.

``--weights ema``: the averaged weights of a run trained with ``--config.ema.enabled=True``, with their own batch-norm
statistics (:func:`robust_flat.runs.weights`); ``--snapshot best_ema``: the epoch their own early stopping chose.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from typing import Callable, Optional

from experiments.cli import (OneLineParser, add_step_rule, at_least, checked, eval_examples, load_snapshot,
                             run_measure_cli)


# ------------------------------------------------------------------------------------------------ the CLI
def build_parser() -> argparse.ArgumentParser:
    from robust_flat.attacks.autoattack import VERSIONS
    from robust_flat.evaluation import ATTACKS
    from robust_flat.runs import WEIGHTS

    p = OneLineParser(prog="python -m experiments.evaluate", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="training run directory (config.json, checkpoints/)")
    p.add_argument("--snapshot", default="last", help="epoch number, 'best', 'best_ema' (the averaged weights' "
                   "early-stopping epoch) or 'last' (default)")
    p.add_argument("--attack", default="autoattack", choices=ATTACKS)
    p.add_argument("--version", default="standard", choices=tuple(VERSIONS) + ("custom",),
                   help="AutoAttack version (only with --attack autoattack)")
    p.add_argument("--attacks", default=None, help="comma-separated attacks for --version custom")
    p.add_argument("--eps", default="8/255", help="perturbation radius, e.g. 8/255 or 0.0314")
    p.add_argument("--norm", default="linf", choices=("linf", "l2"))
    p.add_argument("--n-examples", type=int, default=1000, help="first N examples of the subset")
    p.add_argument("--subset", default="test_first1000")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--shape-buckets", type=int, default=6,
                   help="batch shapes per attack: batch-size x 1, 3/4, 1/2, 3/8, ... (fewer: less compiling, more padding)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-iter", type=int, default=100, help="APGD/FAB iterations (100 = AutoAttack's)")
    p.add_argument("--pgd-steps", type=int, default=20)
    p.add_argument("--pgd-restarts", type=int, default=10)
    add_step_rule(p.add_argument)
    p.add_argument("--n-target-classes", type=int, default=None,
                   help="target classes of APGD-T and FAB-T (default min(9, classes - 1): 9 for CIFAR-10; at most "
                        "classes - 1)")
    p.add_argument("--weights", default="params", choices=WEIGHTS,
                   help="the trained weights (default) or their average (ema) with its own batch-norm statistics")
    p.add_argument("--name", default=None, help="output file name (without .json)")
    p.add_argument("--fresh", action="store_true", help="discard a saved partial or finished evaluation")
    p.add_argument("--no-progress", action="store_true")
    return p


def _log(progress: bool) -> Callable[[str], None]:
    if progress:
        from tqdm import tqdm
        return tqdm.write  # keeps the progress bars intact
    return print


def main(argv: Optional[list[str]] = None, *, load_run: Optional[Callable] = None,
         load_eval_set: Optional[Callable] = None) -> dict:
    """Run the CLI; returns the summary dict. ``load_run``/``load_eval_set`` default to
    :func:`robust_flat.runs.load_run` / :func:`robust_flat.data.load_eval_set` (injectable for tests)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from robust_flat import evaluation as ev
    from robust_flat.io import atomic_write_json
    from robust_flat.partial import fingerprint

    eps = checked(parser, ev.parse_eps, args.eps)
    if args.attack != "autoattack" and (args.version != "standard" or args.attacks):
        parser.error("--version/--attacks apply only to --attack autoattack")
    if args.attacks and args.version != "custom":
        parser.error("--attacks needs --version custom")
    at_least(parser, args, 1, "n_examples", "batch_size", "shape_buckets")
    at_least(parser, args, 1, "n_target_classes", hint=" (default: min(9, classes - 1))")
    at_least(parser, args, 1, "n_iter", "pgd_steps", "pgd_restarts")
    from robust_flat.runs import check_snapshot

    snapshot = checked(parser, check_snapshot, args.snapshot)

    def make_components(n_classes=None):
        return ev.make_components(args.attack, eps, args.norm, args.version,
                                  args.attacks.split(",") if args.attacks else None, n_iter=args.n_iter,
                                  pgd_steps=args.pgd_steps, pgd_restarts=args.pgd_restarts,
                                  pgd_step_rule=args.pgd_step_rule,
                                  n_target_classes=args.n_target_classes, n_classes=n_classes)

    try:
        comps = make_components()
    except (ValueError, ImportError) as e:
        parser.error(str(e))
    if args.n_target_classes is not None and not any(getattr(c.config, "targeted", False) for c in comps):
        parser.error(f"--n-target-classes applies to apgd-t and fab-t only; this evaluation runs "
                     f"{', '.join(c.name for c in comps)}")

    import jax

    from robust_flat.runs import snapshot_tag
    from robust_flat.models import bind, make_logits_fn

    loaded = load_snapshot(load_run, args.run_dir, snapshot, args.weights)
    ema = args.weights == "ema"
    x, y = eval_examples(load_eval_set, loaded.config, args.subset, args.data_dir, args.n_examples)
    logits_fn = bind(make_logits_fn(loaded.model), loaded.params, loaded.model_state)
    from robust_flat.attacks.autoattack import num_classes

    # the target classes follow the model's class count; too many asked for: refused here, before any attack runs
    comps = make_components(num_classes(logits_fn, x))

    label = args.attack + (f"-{args.version}" if args.attack == "autoattack" else "")
    if args.attack == "autoattack" and args.version == "custom":
        label += "-" + "+".join(c.name for c in comps)
    name = args.name or (f"{label}_{args.norm}_eps{ev.eps_tag(args.eps)}_{args.subset}_n{len(x)}_"
                         f"{snapshot_tag(args.snapshot, loaded.epoch)}{'_ema' if ema else ''}")
    out_dir = os.path.join(args.run_dir, "evaluations")
    json_path = os.path.join(out_dir, f"{name}.json")
    state_path = os.path.join(out_dir, f"{name}.examples.json")
    settings = dict(eps=eps, norm=args.norm, seed=args.seed, subset=args.subset, n=len(x),
                    batch_size=args.batch_size, shape_buckets=args.shape_buckets, epoch=loaded.epoch,
                    step=loaded.step, ema=ema, labels=hashlib.sha256(y.tobytes()).hexdigest()[:12])
    fp = fingerprint(ev.config_payload(comps, **settings))

    if args.fresh:
        for path in (json_path, state_path):
            if os.path.exists(path):
                os.unlink(path)
    elif os.path.isfile(json_path):
        with open(json_path) as f:
            previous = json.load(f)
        if previous.get("fingerprint") == fp and previous.get("finished"):
            print(f"{json_path} is up to date (robust accuracy {previous['robust_accuracy']:.2%}); "
                  "use --fresh to recompute")
            return previous
    if os.path.isfile(state_path):
        print(f"resuming from {state_path}")

    start = time.time()
    try:
        state = ev.evaluate(logits_fn, x, y, jax.random.key(args.seed), comps, norm=args.norm,
                            batch_size=args.batch_size, shape_buckets=args.shape_buckets, state_path=state_path,
                            fp=fp,
                            progress=not args.no_progress, log=_log(not args.no_progress))
    except ValueError as e:
        raise SystemExit(f"{e} (use --fresh)")
    result = ev.summary(state, comps, name=name, attack=args.attack,
                        version=args.version if args.attack == "autoattack" else None,
                        aa_standard=args.attack == "autoattack" and args.version == "standard",
                        eps=eps, eps_text=str(args.eps), norm=args.norm, seed=args.seed, subset=args.subset,
                        batch_size=args.batch_size, shape_buckets=args.shape_buckets,
                        run_dir=os.path.abspath(args.run_dir),
                        snapshot=str(args.snapshot), epoch=loaded.epoch, step=loaded.step,
                        weights=args.weights, fingerprint=fp,
                        examples_file=os.path.basename(state_path), time_s=round(time.time() - start, 1))
    atomic_write_json(json_path, result)
    after = ", ".join(f"{k} {v:.2%}" for k, v in result["accuracy_after"].items())
    print(f"{name}: {after}; robust accuracy {result['robust_accuracy']:.2%} on {len(x)} examples -> {json_path}")
    return result


if __name__ == "__main__":
    run_measure_cli(main, "evaluations", "interrupted: finished batches are kept in RUN/evaluations/*.examples.json; "
                    "run the same command again to resume",
                    kept="finished batches are kept in RUN/evaluations/*.examples.json",
                    elsewhere="copy the run directory to a writable disk and evaluate it there")

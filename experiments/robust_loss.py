"""Clean and robust loss and error of a snapshot (the paper's RLoss/RErr under PGD):
``python -m experiments.robust_loss --run-dir RUN --snapshot N|best|last``.

    python -m experiments.robust_loss --run-dir RUN [--snapshot last] [--subset test_first1000] [--n-examples 1000]
        [--pgd-steps 20] [--restarts 10] [--eps 8/255] [--pgd-step-rule scaled] [--batch-size 256] [--seed 0]
        [--data-dir D] [--weights params|ema]

RLoss is the cross-entropy at the PGD adversarial example (with restarts, the worst restart per example); RErr counts
an example as wrong when the clean or the adversarial input is misclassified. The paper uses PGD-20 with 10 restarts
(step 0.007 at eps 8/255, scaled with eps: ``--pgd-step-rule``) on the first 1000 test images (``test_first1000``)
and the first 1000 training images (``train_first1000``, for the robust generalization gap). Batch norm runs in eval
mode.

Output: ``RUN/evaluations/rloss_pgd{steps}x{restarts}_{subset}_n{N}_{snapshot}.json`` (or ``--name``) with
``clean_loss``, ``clean_error``, ``robust_loss``, ``robust_error``, the attack and the snapshot's epoch. A finished
result with the same settings is not recomputed (``--fresh`` recomputes).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import time
from typing import Callable, Optional

from experiments.cli import (OneLineParser, add_step_rule, at_least, checked, eval_examples, load_snapshot,
                             run_measure_cli)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m experiments.robust_loss", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="training run directory (config.json, checkpoints/)")
    p.add_argument("--snapshot", default="last", help="epoch number, 'best' or 'last' (default)")
    p.add_argument("--subset", default="test_first1000", help="test_first1000 (default) or train_first1000, ...")
    p.add_argument("--n-examples", type=int, default=1000, help="first N examples of the subset")
    p.add_argument("--pgd-steps", type=int, default=20)
    p.add_argument("--restarts", type=int, default=10, help="PGD restarts, worst per example (paper: 10)")
    p.add_argument("--eps", default="8/255", help="L-inf radius, e.g. 8/255 or 0.0314")
    add_step_rule(p.add_argument)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--weights", default="params", choices=("params", "ema"),
                   help="the trained weights (default) or their average (ema) with its own batch-norm statistics")
    p.add_argument("--name", default=None, help="output file name (without .json)")
    p.add_argument("--fresh", action="store_true", help="recompute a finished result")
    return p


def output_name(args, epoch: int) -> str:
    if args.name:
        return args.name
    from robust_flat.runs import snapshot_tag

    return (f"rloss_pgd{args.pgd_steps}x{args.restarts}_{args.subset}_n{args.n_examples}_"
            f"{snapshot_tag(args.snapshot, epoch)}{'_ema' if args.weights == 'ema' else ''}")


def main(argv: Optional[list[str]] = None, *, load_run: Optional[Callable] = None,
         load_eval_set: Optional[Callable] = None) -> dict:
    """Run the CLI; returns the result dict. ``load_run``/``load_eval_set`` default to
    :func:`robust_flat.runs.load_run` / :func:`robust_flat.data.load_eval_set` (injectable for tests)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from robust_flat.attacks.pgd import PGDConfig, step_size_for
    from robust_flat.evaluation import parse_eps
    from robust_flat.io import atomic_write_json
    from robust_flat.partial import finished_result, fingerprint

    eps = checked(parser, parse_eps, args.eps)
    at_least(parser, args, 1, "n_examples", "pgd_steps", "restarts", "batch_size")
    from robust_flat.runs import check_snapshot

    snapshot = checked(parser, check_snapshot, args.snapshot)
    attack = PGDConfig(eps=eps, step_size=step_size_for(eps, args.pgd_step_rule), steps=args.pgd_steps,
                       restarts=args.restarts)

    loaded = load_snapshot(load_run, args.run_dir, snapshot, args.weights)
    x, y = eval_examples(load_eval_set, loaded.config, args.subset, args.data_dir, args.n_examples)

    payload = {"attack": [eps, attack.step_size, attack.steps, attack.restarts], "seed": args.seed,
               "subset": args.subset, "n": len(x), "epoch": loaded.epoch, "step": loaded.step,
               "ema": args.weights == "ema", "labels": hashlib.sha256(y.tobytes()).hexdigest()[:12]}
    fp = fingerprint(payload)
    path = os.path.join(args.run_dir, "evaluations", output_name(args, loaded.epoch) + ".json")
    previous = None if args.fresh else finished_result(path, fp)
    if previous is not None:
        print(f"{path} is up to date (robust loss {previous['robust_loss']:.4f}); use --fresh to recompute")
        return previous

    import jax

    from robust_flat.models import make_logits_fn
    from robust_flat.training.monitor import evaluate

    t0 = time.time()
    res = evaluate(make_logits_fn(loaded.model), loaded.params, loaded.model_state, x, y, jax.random.PRNGKey(args.seed),
                   attack, args.batch_size)
    out = {"kind": "robust_loss", "subset": args.subset, "n": len(x), "epoch": loaded.epoch, "step": loaded.step,
           "snapshot": args.snapshot, "use_ema": args.weights == "ema", "seed": args.seed,
           "clean_loss": res["loss"], "clean_error": res["error"], "robust_loss": res["robust_loss"],
           "robust_error": res["robust_error"],
           "attack": {"name": "pgd", "steps": attack.steps, "restarts": attack.restarts, "eps": eps,
                      "step_size": attack.step_size},
           "run_dir": os.path.abspath(args.run_dir), "fingerprint": fp, "finished": True,
           "time_s": round(time.time() - t0, 1)}
    atomic_write_json(path, out, indent=2)
    print(f"epoch {loaded.epoch} {args.subset} (n={len(x)}): clean loss {out['clean_loss']:.4f} error "
          f"{out['clean_error']:.4f}; PGD-{attack.steps}x{attack.restarts} robust loss {out['robust_loss']:.4f} "
          f"error {out['robust_error']:.4f} [{out['time_s']:.0f} s] -> {path}")
    return out


if __name__ == "__main__":
    run_measure_cli(main, "evaluations", "interrupted; run the same command again")

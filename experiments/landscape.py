"""``python -m experiments.flatness --measure landscape``: 1D curves (and a 2D surface) of a snapshot's robust and
clean loss along random, adversarial and Hessian directions (:mod:`robust_flat.landscape`; the defaults are the
paper's: docs/paper-vs-code.md#landscape), on the first ``--n-examples`` (default 128) of the code's last 100 test
images.

Writes ``RUN/flatness/NAME.json`` and ``NAME.png`` and, with ``--surface KIND,KIND``, ``NAME_surface.json``,
``NAME_surface.npz`` and ``NAME_surface.png``; ``NAME`` = ``--name`` or ``landscape_{snapshot}``.

Progress: one bar over all points (each a PGD attack plus two loss evaluations). Resumption: each finished curve
(one direction) and each finished row of the surface is saved atomically under
``RUN/flatness/.partial/NAME-<fingerprint>/`` and ``NAME_surface-<fingerprint>/``
(:class:`robust_flat.partial.PartialResults`; the fingerprints cover every setting that changes the numbers, the
weights and the data; the 1D one does not depend on the surface settings and vice versa) and skipped by a rerun,
which gives the same numbers. A finished result with the same fingerprints is read back unless ``--fresh``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

KINDS = ("random", "adversarial", "hessian")  # robust_flat.landscape.KINDS
NORMALIZATIONS = ("layer", "filter", "layer_max", "none")  # robust_flat.landscape.NORMALIZATIONS
N_EXAMPLES = 128  # the paper's one batch, when --n-examples is not given
LANCZOS_ITERS = 40  # --lanczos-iters when not given: Lanczos steps for the Hessian direction


def kinds(text: str) -> tuple:
    """``"random,adversarial"`` -> ``("random", "adversarial")`` (an argparse type)."""
    out = tuple(k.strip() for k in text.split(","))
    for kind in out:
        if kind not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown direction kind {kind!r}; choose from {', '.join(KINDS)}")
    return out


def two_kinds(text: str) -> tuple:
    out = kinds(text)
    if len(out) != 2:
        raise argparse.ArgumentTypeError(f"two direction kinds like random,random are needed, got {text!r}")
    return out


def add_options(option) -> None:
    """This measure's own options; ``option(*flags, **kwargs)`` is ``add_argument`` of its group in
    :func:`experiments.flatness.build_parser` (which also holds the options it shares with other measures)."""
    option("--directions", type=kinds, default=("random", "adversarial"), metavar="KINDS",
           help="comma-separated direction kinds: random, adversarial, hessian (default: random,adversarial)")
    option("--num-directions", type=int, default=10,
           help="directions per kind (mean over random, max over adversarial; hessian has one)")
    option("--steps", type=int, default=51, help="points along each curve, s in [-span, span]")
    option("--span", type=float, default=1.0, help="curves and the surface go from -span to span")
    option("--normalization", choices=NORMALIZATIONS, default="layer",
           help="direction length per layer relative to ||w_l|| (paper), per filter (Li et al.), relative to "
                "max|w_l| (layer_max: the code's) or none")
    option("--random-scale", type=float, default=0.5, help="length of the random directions")
    option("--adversarial-scale", type=float, default=0.025, help="length of the adversarial directions")
    option("--hessian-scale", type=float, default=0.5, help="length of the Hessian direction")
    option("--surface", type=two_kinds, default=None, metavar="KIND,KIND",
           help="also a 2D surface along two directions, e.g. random,random or random,adversarial (default: none)")
    option("--surface-steps", type=int, default=21, help="points along each axis of the surface")
    option("--adversarial-xi", type=float, default=0.005, help="radius of the attack finding adversarial directions")
    option("--adversarial-lr", type=float, default=0.01, help="its learning rate")
    option("--adversarial-steps", type=int, default=7, help="its steps")
    option("--direction-pgd-steps", type=int, default=10, help="PGD steps of its adversarial examples")


def config(args):
    """The :class:`robust_flat.landscape.LandscapeConfig` of the command line; a bad setting is a ``ValueError``."""
    from robust_flat.attacks.pgd import PGDConfig, step_size_for
    from robust_flat.landscape import LandscapeConfig

    if min(args.pgd_steps, args.direction_pgd_steps, args.adversarial_steps) < 0:
        raise ValueError("--pgd-steps, --direction-pgd-steps and --adversarial-steps must be >= 0")
    step = step_size_for(args.eps, args.pgd_step_rule)
    return LandscapeConfig(
        steps=args.steps, span=args.span, surface_steps=args.surface_steps, num_directions=args.num_directions,
        normalization=args.normalization, random_scale=args.random_scale, adversarial_scale=args.adversarial_scale,
        hessian_scale=args.hessian_scale, pgd=PGDConfig(eps=args.eps, steps=args.pgd_steps, step_size=step),
        direction_pgd=PGDConfig(eps=args.eps, steps=args.direction_pgd_steps, step_size=step),
        adversarial_xi=args.adversarial_xi, adversarial_lr=args.adversarial_lr,
        adversarial_steps=args.adversarial_steps,
        hessian_iters=LANCZOS_ITERS if args.lanczos_iters is None else args.lanczos_iters)


def _arrays(values: dict) -> dict:
    import numpy as np

    return {k: np.asarray(v, np.float64) for k, v in values.items()}


def run(args, loaded_run, params, x, y, out_dir: str, depends_on: dict) -> dict:
    """Measure, write and return the 1D result. ``params``: the run's weights (or their average, ``--weights ema``);
    ``x, y``: the examples (the first ``N_EXAMPLES`` are used unless ``--n-examples``); ``depends_on``: what the
    result depends on besides these settings (digests of the weights and the data, the snapshot: part of the
    fingerprints)."""
    import jax
    import numpy as np

    from robust_flat import landscape as L
    from robust_flat.io import atomic_save_npz, atomic_write_json
    from robust_flat.models import make_logits_fn
    from robust_flat.partial import PartialResults, finished_result, fingerprint
    from robust_flat.runs import snapshot_tag
    from tqdm import tqdm

    cfg = config(args)
    if args.n_examples is None:
        x, y = x[:N_EXAMPLES], y[:N_EXAMPLES]
    name = args.name or f"landscape_{snapshot_tag(args.snapshot, loaded_run.epoch)}"
    directions, names = list(args.directions), list(args.surface) if args.surface else None
    settings = {"measure": "landscape", "config": dataclasses.asdict(cfg), "seed": args.seed, **depends_on}
    cfg_1d = {k: v for k, v in settings["config"].items() if k != "surface_steps"}
    fp_1d = fingerprint({**settings, "config": cfg_1d, "directions": directions})
    fp_2d = fingerprint({**settings, "config": {k: v for k, v in settings["config"].items()
                                                if k not in ("steps", "num_directions")}, "surface": names})
    path = os.path.join(out_dir, f"{name}.json")
    surf_path = os.path.join(out_dir, f"{name}_surface.json")
    if not args.fresh:
        previous = finished_result(path, fp_1d)
        if previous is not None and (names is None or finished_result(surf_path, fp_2d) is not None):
            print(f"{path} is up to date; use --fresh to recompute")
            return previous
    part_1d = PartialResults(out_dir, name, fp_1d, fresh=args.fresh)
    part_2d = PartialResults(out_dir, f"{name}_surface", fp_2d, fresh=args.fresh) if names else None

    points = L.num_points(cfg, directions)
    done = {u: v for u, v in part_1d.load_all().items() if u in points}
    rows = {}
    if part_2d is not None:
        for i in range(cfg.surface_steps):
            row = part_2d.load(f"row_{i:03d}")
            if row is not None and all(row[m].shape == (cfg.surface_steps,) for m in L.METRICS):
                rows[i] = row
    todo = sum(p for u, p in points.items() if u != "surface_row" and u not in done)
    if part_2d is not None:
        todo += points["surface_row"] * (cfg.surface_steps - len(rows))
    if done or rows:
        print(f"landscape: resuming, {len(done)} curves/points and {len(rows)} surface rows already done "
              f"({part_1d.path})")
    logits_fn = make_logits_fn(loaded_run.model, train=False)
    state = loaded_run.model_state
    key_1d, key_2d = jax.random.split(jax.random.PRNGKey(args.seed))
    bar = tqdm(total=todo, desc="landscape", unit="point", dynamic_ncols=True, disable=args.no_progress)
    try:
        t0 = time.perf_counter()
        result = L.landscape_1d(logits_fn, params, state, x, y, key_1d, cfg, directions, done=done,
                                on_unit=lambda unit, v: part_1d.save(unit, **_arrays(v)), progress=bar.update)
        result.update(config=dataclasses.asdict(cfg), seed=args.seed, epoch=loaded_run.epoch,
                      use_ema=args.weights == "ema", seconds=time.perf_counter() - t0, fingerprint=fp_1d,
                      resumed_units=sorted(done))
        if names is not None:
            k_pgd, k1, k2 = jax.random.split(key_2d, 3)
            lazy = [lambda kind=kind, k=k: L.Directions(kind, logits_fn, params, state, x, y, k, cfg, 1)[0]
                    for kind, k in zip(names, (k1, k2))]
            t0 = time.perf_counter()
            surf = L.loss_surface(logits_fn, params, state, x, y, lazy[0], lazy[1], k_pgd, cfg, done_rows=rows,
                                  progress=bar.update,
                                  on_row=lambda i, row: part_2d.save(f"row_{i:03d}", **_arrays(row)))
    finally:
        bar.close()
    if names is not None:
        surf.update(label_a=f"a ({names[0]})", label_b=f"b ({names[1]})", seconds=time.perf_counter() - t0,
                    fingerprint=fp_2d, resumed_rows=sorted(rows))
        atomic_save_npz(os.path.join(out_dir, f"{name}_surface.npz"),
                        **{k: np.asarray(v) for k, v in surf.items() if k in ("a", "b") + L.METRICS})
        L.plot_surface(surf, os.path.join(out_dir, f"{name}_surface.png"),
                       title=f"robust loss, epoch {result['epoch']}")
        atomic_write_json(surf_path, surf)
        result["surface"] = {"file": f"{name}_surface.json", "directions": names, "fingerprint": fp_2d}
    L.plot_1d(result, os.path.join(out_dir, f"{name}.png"), title=f"epoch {result['epoch']}")
    atomic_write_json(path, result, indent=1, default=str)
    part_1d.remove()
    if part_2d is not None:
        part_2d.remove()
    at_end = {k: r["aggregate"]["robust_loss"][-1] for k, r in result["kinds"].items()}
    print(f"landscape ({len(x)} examples): unperturbed RLoss {result['unperturbed']['robust_loss']:.4f}, at s=+"
          f"{cfg.span:g}: " + ", ".join(f"{k} {v:.4f}" for k, v in at_end.items()) + f" -> {path}")
    return result

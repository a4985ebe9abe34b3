"""Resumable robustness evaluation of a dataset: clean accuracy, then a cascade of attacks, per-example records.

:func:`evaluate` runs :func:`robust_flat.attacks.autoattack.run_cascade` (AutoAttack, a single APGD/FAB/Square
attack, or PGD) on ``x``/``y`` and saves the per-example state after every batch to a JSON file (written atomically:
temporary file + ``os.replace``): clean correctness, which attack broke each point (``"clean"`` for points
misclassified without attack, ``null`` for robust points), the norm of each final perturbation, and which attacks have
already run on which points. Started again with the same file, it skips everything finished; the batch keys derive
from the dataset index, so the numbers equal those of an uninterrupted run. :func:`summary` turns a finished state
into the JSON summary that ``python -m experiments.evaluate`` writes next to the run's checkpoints.
"""
from __future__ import annotations

import json
import os
import platform
import time
from typing import Callable, Optional, Sequence

import numpy as np

from robust_flat.attacks.autoattack import (ATTACK_NAMES, CLEAN, AutoAttackConfig, CascadeState, Component,
                                            check_classes, component, components, describe, run_cascade)
from robust_flat.attacks.pgd import PGDConfig, pgd, step_size_for
from robust_flat.io import atomic_write_json

ATTACKS = ("autoattack", "pgd") + ATTACK_NAMES


def parse_eps(text, name: str = "eps") -> float:
    """``"8/255"`` -> 0.0313..., ``"0.03"`` -> 0.03; raises ``ValueError`` unless the value is > 0. The one parser of
    every radius and step size given on a command line (``experiments.evaluate``/``flatness``/``robust_loss --eps``,
    the training overrides ``--config.attack.eps``/``step_size``); ``name`` is what its error messages call it."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        s = str(text).strip()
        try:
            if "/" in s:
                num, den = s.split("/")
                value = float(num) / float(den)
            else:
                value = float(s)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"cannot parse {name} {text!r}; write e.g. 8/255 or 0.0314") from None
    if not value > 0 or not np.isfinite(value):
        raise ValueError(f"{name} must be > 0, got {text!r}")
    return value


def eps_tag(text) -> str:
    """File-name friendly eps: ``"8/255"`` -> ``"8-255"``, ``0.0314`` -> ``"0.0314"``."""
    return str(text).strip().replace("/", "-")


def make_components(attack: str, eps: float, norm: str = "linf", version: str = "standard",
                    attacks: Optional[Sequence[str]] = None, n_iter: int = 100, pgd_steps: int = 20,
                    pgd_restarts: int = 10, pgd_step_rule: str = "scaled",
                    n_target_classes: Optional[int] = None, n_classes: Optional[int] = None) -> list[Component]:
    """The cascade for ``attack``: ``"autoattack"`` (``version``/``attacks`` as in :class:`AutoAttackConfig`), one
    AutoAttack component by name (standard settings), or ``"pgd"`` (the paper's evaluation PGD: ``pgd_steps``
    signed steps of 0.007 at eps 8/255, following eps by ``pgd_step_rule``
    (:func:`robust_flat.attacks.pgd.step_size_for`), ``pgd_restarts`` restarts, worst case per example).

    ``n_classes``: the model's class count; it sets APGD-T/FAB-T's target classes (``n_target_classes``, default
    ``min(9, n_classes - 1)``) and every attack is checked against it (``ValueError`` for more targets than
    ``n_classes - 1``; :func:`robust_flat.attacks.autoattack.check_classes`)."""
    if attack == "autoattack":
        return components(AutoAttackConfig(eps=eps, norm=norm, version=version,
                                           attacks=tuple(attacks) if attacks else None, n_iter=n_iter,
                                           n_target_classes=n_target_classes), n_classes)
    if attack in ATTACK_NAMES:
        comps = [component(attack, AutoAttackConfig(eps=eps, norm=norm, n_iter=n_iter,
                                                    n_target_classes=n_target_classes), n_classes)]
        if n_classes is not None:
            check_classes(comps, n_classes)
        return comps
    if attack == "pgd":
        return [Component("pgd", pgd, PGDConfig(eps=eps, norm=norm, steps=pgd_steps, restarts=pgd_restarts,
                                                step_size=step_size_for(eps, pgd_step_rule)))]
    raise ValueError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")


# ------------------------------------------------------------------------------------------------ persistence
def load_state(path: str, fp: str) -> Optional[CascadeState]:
    """The saved state at ``path`` if it exists; ``ValueError`` if it belongs to a different evaluation."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    if saved.get("fingerprint") != fp:
        raise ValueError(f"{path} holds a different evaluation (other attack, data, seed, weights or batch size); "
                         "delete it, pass a different name, or start fresh")
    return CascadeState.from_dict(saved["state"])


def save_state(path: str, state: CascadeState, fp: str) -> None:
    atomic_write_json(path, {"fingerprint": fp, "state": state.to_dict()})


# ------------------------------------------------------------------------------------------------ evaluation
class _Progress:
    """One tqdm bar per stage; the postfix shows clean accuracy and robust accuracy after each attack so far."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.stage = enabled, None, None

    def __call__(self, state: CascadeState, stage: str, done: int, total: int):
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, initial=done, desc=stage, unit="ex", dynamic_ncols=True)
        else:
            self.bar.update(done - self.bar.n)
        acc = state.accuracy()
        robust_now = float(state.robust.mean()) if state.clean_done.all() else None
        postfix = {k: f"{v:.2%}" for k, v in acc.items()}
        if robust_now is not None and stage != CLEAN:
            postfix["robust"] = f"{robust_now:.2%}"
        self.bar.set_postfix(postfix, refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def evaluate(logits_fn, x, y, key, comps: Sequence[Component], *, norm: str, batch_size: int = 128,
             shape_buckets: int = 6, state_path: Optional[str] = None, fp: str = "", progress: bool = True,
             log: Optional[Callable[[str], None]] = None) -> CascadeState:
    """Run (or resume) the cascade ``comps`` on ``x``/``y``, saving the per-example state to ``state_path`` (JSON)
    after every batch. Returns the finished :class:`CascadeState` (without adversarial images)."""
    state = load_state(state_path, fp) if state_path else None
    if state is None:
        state = CascadeState.new(len(x), [c.name for c in comps])
    bar = _Progress(progress)

    def on_batch(st, stage, done, total):
        if state_path:
            save_state(state_path, st, fp)
        bar(st, stage, done, total)

    try:
        return run_cascade(logits_fn, x, y, key, comps, norm=norm, batch_size=batch_size,
                           shape_buckets=shape_buckets, state=state, on_batch=on_batch, log=log or (lambda s: None))
    finally:
        bar.close()


def library_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("robust-flat", "jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def summary(state: CascadeState, comps: Sequence[Component], **info) -> dict:
    """JSON-friendly summary of a finished evaluation: accuracies, per-attack counts, perturbation sizes, settings.

    ``robust_error`` is the paper's RErr: the fraction of points misclassified clean or under attack.
    """
    import jax

    acc = state.accuracy()
    names = state.broken_by_names()
    broken = state.broken_by >= 0
    counts = {c.name: int(sum(1 for b in names if b == c.name)) for c in comps}
    pert = state.perturbation_norm[broken]
    out = dict(info)
    out.update({
        "n_examples": state.n,
        "clean_accuracy": acc.get(CLEAN),
        "robust_accuracy": float(state.robust.mean()),
        "robust_error": 1.0 - float(state.robust.mean()),
        "accuracy_after": acc,
        "broken_by_counts": {CLEAN: int((~state.clean_correct).sum()), **counts},
        "perturbation_norm_of_broken": {"max": float(pert.max()) if len(pert) else 0.0,
                                        "mean": float(pert.mean()) if len(pert) else 0.0},
        "attacks": describe(comps),
        "versions": library_versions(),
        "backend": jax.default_backend(),
        "finished": state.done,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    return out


SPEED_ONLY = ("unroll", "loop")  # config fields that change speed, not results


def config_payload(comps: Sequence[Component], **settings) -> dict:
    """What the numbers depend on (for :func:`robust_flat.partial.fingerprint`)."""
    attacks = [{"name": d["name"], "config": {k: v for k, v in d["config"].items() if k not in SPEED_ONLY}}
               for d in describe(comps)]
    return {"attacks": attacks, **settings}


__all__ = ["ATTACKS", "parse_eps", "eps_tag", "make_components", "evaluate", "summary", "load_state", "save_state",
           "config_payload", "library_versions"]

"""AutoAttack (Croce & Hein, ICML 2020): a cascade of attacks with per-example worst-case semantics.

Semantics of ``fra31/auto-attack:autoattack/autoattack.py::run_standard_evaluation``: the robust flags start as clean
correctness; each attack in turn runs only on the points still robust; a point whose adversarial example is
misclassified (checked by a fresh forward pass) is flagged non-robust and keeps that example; the robust accuracy
is the fraction robust to every attack. The clean accuracy, and the robust accuracy after each attack, are logged as
in the original. Per example we record which attack broke it (``"clean"`` for points misclassified without attack)
and the norm of its final perturbation (0 for points not broken).

Versions (:data:`VERSIONS`):

* ``"standard"``: APGD-CE (100 iterations, 1 restart), APGD-T (9 targets, 100 iterations, 1 restart), FAB-T
  (9 targets, 100 iterations, 1 restart) and Square (5000 queries, ``p_init = 0.8``, 1 restart, no rescaling of
  the p schedule); the original's ``version='standard'`` for L-inf and L2. Square samples its windows per example
  (``SquareConfig`` default; the PyTorch code shares one window per query across the batch).
* ``"standard_nosquare"``: FAB-T, APGD-CE, APGD-T in this order, the same settings. This is what the released code
  of Stutz et al. (ICCV 2021) runs for the paper's RErr (its vendored ``set_version('standard')`` has Square
  commented out), on batches of 128 of the first 1000 test images. Note: their vendored APGD is the older
  ``autopgd_pt.py``; ours follows the current ``autopgd_base.py``.
* ``"fast"``: APGD-CE and APGD-T with the standard settings (drops FAB-T and Square, which rarely change the result
  for adversarially trained models but cost most of the time). Not AA-standard: label such numbers accordingly.
* ``"custom"``: any sequence of :data:`ATTACK_NAMES` in ``attacks`` (standard settings per attack).

Target classes (APGD-T, FAB-T): ``n_target_classes`` follows the model's class count C: by default
``min(9, C - 1)`` (the standard's 9 for CIFAR-10; 9 for CIFAR-100 as in the original; 3 for a 4-class model). An
explicit number above C - 1 is refused, as is APGD-T on fewer than 4 classes (its targeted DLR loss needs the 4
largest logits), by :func:`check_classes` before the cascade runs anything (the original fails in APGD-T, after
APGD-CE has run).

Fixed shapes: the cascade gathers the still-robust points of the whole set, cuts them into batches of
``batch_size`` and pads the last batch with copies of its first point (their results are discarded) up to the
smallest of ``shape_buckets`` fixed sizes (``batch_size`` x 1, 3/4, 1/2, 3/8, 1/4, ...; ``attacks.common.bucket_sizes``)
that holds it. Every component attack therefore
compiles at most ``shape_buckets`` times, whatever the numbers of robust points, and a small remainder does not pay
for a full batch (with ``shape_buckets=1`` everything runs at ``batch_size``: one compile, more padding). The
alternative, masking inside full fixed batches, also avoids recompiles but spends the full batch's compute on every
batch and never compacts the robust points (late attacks in a cascade see few robust points: for a model at 50%
robust accuracy APGD-T, FAB-T and Square, the expensive ones, would pay twice).

Randomness: the key for each batch is derived from the attack's name and the dataset index of the batch's first
point, so a resumed evaluation (:mod:`robust_flat.evaluation`) reproduces the uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import zlib
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from robust_flat import xla
from robust_flat.attacks.apgd import APGDConfig, apgd
from robust_flat.attacks.common import bucket_size, check_data, check_threat_model
from robust_flat.batching import pad_rows

logger = logging.getLogger("robust_flat.autoattack")

ATTACK_NAMES = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "standard_nosquare": ("fab-t", "apgd-ce", "apgd-t"),
    "fast": ("apgd-ce", "apgd-t"),
}
CLEAN = "clean"
STANDARD_TARGET_CLASSES = 9  # the original's n_target_classes for APGD-T and FAB-T (capped at C - 1 here)


@dataclasses.dataclass(frozen=True)
class AutoAttackConfig:
    """AutoAttack settings. ``attacks`` only with ``version="custom"`` (as in the original, which refuses a list of
    attacks for the fixed versions). The per-attack settings default to the original's standard version."""

    eps: float = 8 / 255
    norm: str = "linf"
    version: str = "standard"
    attacks: Optional[tuple[str, ...]] = None
    n_iter: int = 100
    apgd_restarts: int = 1
    fab_restarts: int = 1
    n_target_classes: Optional[int] = None
    square_queries: int = 5000
    square_p_init: float = 0.8
    apgd_unroll: int = 5

    def __post_init__(self):
        check_threat_model("AutoAttack", self.eps, self.norm)
        if self.n_target_classes is not None and not (isinstance(self.n_target_classes, (int, np.integer))
                                                       and self.n_target_classes >= 1):
            raise ValueError(f"n_target_classes must be an integer >= 1 (or None: min(9, classes - 1)), got "
                             f"{self.n_target_classes!r}")
        if self.version == "custom":
            if not self.attacks:
                raise ValueError("version='custom' needs a non-empty list of attacks")
            if not isinstance(self.attacks, tuple):
                object.__setattr__(self, "attacks", tuple(self.attacks))
            unknown = [a for a in self.attacks if a not in ATTACK_NAMES]
            if unknown:
                raise ValueError(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACK_NAMES)}")
            if len(set(self.attacks)) != len(self.attacks):
                raise ValueError(f"attacks must not repeat, got {self.attacks}")
        elif self.version in VERSIONS:
            if self.attacks is not None:
                raise ValueError(f"attacks are fixed by version={self.version!r}; use version='custom' to choose")
        else:
            raise ValueError(f"unknown AutoAttack version {self.version!r}; choose one of "
                             f"{', '.join(VERSIONS)}, custom")

    @property
    def attack_names(self) -> tuple[str, ...]:
        return self.attacks if self.version == "custom" else VERSIONS[self.version]


@dataclasses.dataclass(frozen=True)
class Component:
    """One attack of a cascade: ``fn(logits_fn, x, y, key, config) -> x_adv``, jitted, ``config`` hashable."""

    name: str
    fn: Callable
    config: Any


def _build(cls, **wanted):
    """``cls(**wanted)`` restricted to the fields ``cls`` has (FAB/Square configs are owned by another module)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in wanted.items() if k in names})


def target_classes(requested: Optional[int], n_classes: Optional[int] = None) -> int:
    """APGD-T/FAB-T's number of target classes for a model with ``n_classes`` classes: ``requested``, or by default
    ``min(9, n_classes - 1)`` (9 when the class count is not known yet). ``ValueError`` if ``requested`` exceeds
    ``n_classes - 1``."""
    if requested is None:
        return STANDARD_TARGET_CLASSES if n_classes is None else max(1, min(STANDARD_TARGET_CLASSES, n_classes - 1))
    if n_classes is not None and requested > n_classes - 1:
        raise ValueError(f"{requested} target classes asked for, but the model has {n_classes} classes, so at most "
                         f"{n_classes - 1} (the classes other than the true one); ask for {n_classes - 1} or fewer "
                         "(--n-target-classes), or leave it unset for min(9, classes - 1)")
    return int(requested)


def component(name: str, config: AutoAttackConfig, n_classes: Optional[int] = None) -> Component:
    """The named attack with the settings of ``config``, for a model with ``n_classes`` classes (sets the number of
    target classes of APGD-T and FAB-T, :func:`target_classes`). FAB and Square are imported here, on first use."""
    common = dict(eps=config.eps, norm=config.norm)
    # untargeted attacks ignore the field; they keep the standard value (unchanged result fingerprints)
    n_targets = (target_classes(config.n_target_classes, n_classes) if name in ("apgd-t", "fab-t")
                 else STANDARD_TARGET_CLASSES)
    if name in ("apgd-ce", "apgd-dlr", "apgd-t"):
        # shape_buckets=1: the cascade already gathers the robust points of each stage into bucket sizes
        cfg = APGDConfig(n_iter=config.n_iter, unroll=config.apgd_unroll, shape_buckets=1, **common,
                         n_restarts=1 if name == "apgd-t" else config.apgd_restarts,
                         loss="ce" if name == "apgd-ce" else "dlr", targeted=name == "apgd-t",
                         n_target_classes=n_targets)
        return Component(name, apgd, cfg)
    if name in ("fab", "fab-t"):
        from robust_flat.attacks.fab import FABConfig, fab
        cfg = _build(FABConfig, n_iter=config.n_iter, n_restarts=1 if name == "fab-t" else config.fab_restarts,
                     targeted=name == "fab-t", n_target_classes=n_targets, **common)
        return Component(name, fab, cfg)
    if name == "square":
        from robust_flat.attacks.square import SquareConfig, square
        # AutoAttack constructs Square with resc_schedule=False (p schedule on the raw query count)
        cfg = _build(SquareConfig, n_queries=config.square_queries, p_init=config.square_p_init, n_restarts=1,
                     rescale_schedule=False, **common)
        return Component(name, square, cfg)
    raise ValueError(f"unknown attack {name!r}; choose from {', '.join(ATTACK_NAMES)}")


def components(config: AutoAttackConfig, n_classes: Optional[int] = None) -> list[Component]:
    """The cascade of ``config`` for a model with ``n_classes`` classes (:func:`num_classes`)."""
    comps = [component(name, config, n_classes) for name in config.attack_names]
    if n_classes is not None:
        check_classes(comps, n_classes)
    return comps


def num_classes(logits_fn, x) -> int:
    """The number of classes of ``logits_fn`` on inputs shaped like ``x`` (traced for shapes only: nothing runs)."""
    out = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct((1,) + tuple(np.shape(x)[1:]), jnp.float32))
    if len(out.shape) != 2:
        raise ValueError(f"logits_fn must return [N, classes] logits, got shape {out.shape}")
    return int(out.shape[-1])


def check_classes(comps: Sequence[Component], n_classes: int) -> None:
    """``ValueError`` unless every attack of ``comps`` can run on a model with ``n_classes`` classes: at most
    ``n_classes - 1`` target classes (APGD-T, FAB-T), at least 3 classes for the DLR loss and 4 for the targeted DLR
    loss (APGD-DLR, APGD-T), at least 2 for any attack. Called before the cascade runs anything."""
    if n_classes < 2:
        raise ValueError(f"the model has {n_classes} class(es); attacks need at least 2")
    for c in comps:
        cfg = c.config
        if not dataclasses.is_dataclass(cfg):
            continue
        targeted = bool(getattr(cfg, "targeted", False))
        if targeted and getattr(cfg, "n_target_classes", 1) > n_classes - 1:
            raise ValueError(f"{c.name}: {cfg.n_target_classes} target classes asked for, but the model has "
                             f"{n_classes} classes, so at most {n_classes - 1}; ask for {n_classes - 1} or fewer "
                             "(--n-target-classes), or leave it unset for min(9, classes - 1)")
        if isinstance(cfg, APGDConfig) and cfg.loss == "dlr" and n_classes < (4 if targeted else 3):
            raise ValueError(f"{c.name}: the {'targeted ' if targeted else ''}DLR loss needs at least "
                             f"{4 if targeted else 3} classes, the model has {n_classes}; leave {c.name} out "
                             f"(--version custom --attacks ...)")


def describe(comps: Sequence[Component]) -> list[dict]:
    """JSON-friendly description of a cascade (attack names and their full configs)."""
    out = []
    for c in comps:
        cfg = dataclasses.asdict(c.config) if dataclasses.is_dataclass(c.config) else repr(c.config)
        out.append({"name": c.name, "config": {k: (v if isinstance(v, (int, float, str, bool, type(None)))
                                                   else repr(v)) for k, v in cfg.items()}})
    return out


# --------------------------------------------------------------------------------------------- the cascade
def _predict_impl(logits_fn, x):
    return jnp.argmax(logits_fn(x), axis=-1)


_predict_traced = xla.jit(_predict_impl)
_predict_static = xla.jit(_predict_impl, static_argnames=("logits_fn",))


def predict(logits_fn, x) -> np.ndarray:
    """Predicted labels (jitted; ``logits_fn`` traced when it is a ``Partial``)."""
    if isinstance(logits_fn, jax.tree_util.Partial):
        return np.asarray(_predict_traced(logits_fn, x))
    return np.asarray(_predict_static(logits_fn, x))


def perturbation_norm(delta: np.ndarray, norm: str) -> np.ndarray:
    delta = np.asarray(delta, np.float64)
    if not len(delta):
        return np.zeros(0)
    flat = delta.reshape(len(delta), -1)
    if norm == "linf":
        return np.abs(flat).max(axis=1)
    return np.sqrt((flat ** 2).sum(axis=1))


@dataclasses.dataclass
class CascadeState:
    """Per-example results of a cascade; everything needed to resume one.

    ``broken_by[i]``: ``-1`` robust (or not yet evaluated), ``-2`` misclassified clean, ``k`` broken by attack ``k``.
    ``attempted[k, i]``: attack ``k`` has run on example ``i`` (a robust point not yet attempted is pending).
    ``x_adv`` is kept only for in-memory use (``None`` when loaded from disk).
    """

    attacks: tuple[str, ...]
    clean_done: np.ndarray
    clean_correct: np.ndarray
    broken_by: np.ndarray
    attempted: np.ndarray
    perturbation_norm: np.ndarray
    x_adv: Optional[np.ndarray] = None

    @classmethod
    def new(cls, n: int, attacks: Sequence[str], x: Optional[np.ndarray] = None) -> "CascadeState":
        return cls(tuple(attacks), np.zeros(n, bool), np.zeros(n, bool), np.full(n, -1, np.int16),
                   np.zeros((len(attacks), n), bool), np.zeros(n, np.float32),
                   None if x is None else np.array(x, np.float32, copy=True))

    @property
    def n(self) -> int:
        return len(self.clean_done)

    @property
    def robust(self) -> np.ndarray:
        return self.clean_done & self.clean_correct & (self.broken_by == -1)

    @property
    def done(self) -> bool:
        return bool(self.clean_done.all()) and not any(self.pending(k).any() for k in range(len(self.attacks)))

    def pending(self, k: int) -> np.ndarray:
        return self.robust & ~self.attempted[k]

    def accuracy(self) -> dict[str, float]:
        """``{"clean": ..., <attack>: robust accuracy after it, ...}`` for the attacks finished so far."""
        if not self.clean_done.all():
            return {}
        acc = {CLEAN: float(self.clean_correct.mean())}
        for k, name in enumerate(self.attacks):
            if self.pending(k).any():
                break
            acc[name] = float((self.clean_correct & ((self.broken_by == -1) | (self.broken_by > k))).mean())
        return acc

    def broken_by_names(self) -> list[Optional[str]]:
        names = {-1: None, -2: CLEAN, **{k: a for k, a in enumerate(self.attacks)}}
        return [names[int(b)] for b in self.broken_by]

    def to_dict(self) -> dict:
        return {"attacks": list(self.attacks), "clean_done": self.clean_done.tolist(),
                "clean_correct": self.clean_correct.tolist(), "broken_by": self.broken_by_names(),
                "attempted": {a: self.attempted[k].tolist() for k, a in enumerate(self.attacks)},
                "perturbation_norm": [float(v) for v in self.perturbation_norm]}

    @classmethod
    def from_dict(cls, d: dict) -> "CascadeState":
        attacks = tuple(d["attacks"])
        codes = {None: -1, CLEAN: -2, **{a: k for k, a in enumerate(attacks)}}
        return cls(attacks, np.asarray(d["clean_done"], bool), np.asarray(d["clean_correct"], bool),
                   np.asarray([codes[b] for b in d["broken_by"]], np.int16),
                   np.asarray([d["attempted"][a] for a in attacks], bool).reshape(len(attacks), -1),
                   np.asarray(d["perturbation_norm"], np.float32))


def _batch_key(key, name: str, first_index: int):
    return jax.random.fold_in(jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF), first_index)


def run_cascade(logits_fn, x, y, key, comps: Sequence[Component], *, norm: str, batch_size: int = 128,
                shape_buckets: int = 6, state: Optional[CascadeState] = None, on_batch: Optional[Callable] = None,
                log: Optional[Callable[[str], None]] = None) -> CascadeState:
    """Run (or resume) a cascade of attacks on ``x``/``y``; returns the per-example :class:`CascadeState`.

    Batches hold up to ``batch_size`` points, padded to one of ``shape_buckets`` sizes (see module docstring).

    ``norm`` is the norm the perturbation sizes are recorded in. ``on_batch(state, stage, n_done, n_total)`` is
    called when a stage starts and after every batch (``stage`` = ``"clean"`` or the attack name), e.g. to save the
    state. ``log`` gets the
    original's summary lines (default: this module's logger at INFO level).
    """
    log = log or logger.info
    x, y = check_data(x, y, None, "autoattack", allow_empty=True)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(dataclasses.is_dataclass(c.config) for c in comps):  # before anything runs: a failure here costs nothing
        check_classes(comps, num_classes(logits_fn, x))
    names = tuple(c.name for c in comps)
    if state is None:
        state = CascadeState.new(len(x), names, x)
    elif state.attacks != names or state.n != len(x):
        raise ValueError(f"the saved state is for attacks {state.attacks} on {state.n} examples, not {names} on "
                         f"{len(x)}; use a fresh state (or file) for a different evaluation")
    bs = min(batch_size, len(x))
    start = time.time()

    todo = np.flatnonzero(~state.clean_done)
    if on_batch and len(todo):
        on_batch(state, CLEAN, int(state.clean_done.sum()), state.n)  # stage start
    for b in range(0, len(todo), bs):
        idx = todo[b:b + bs]
        pred = predict(logits_fn, jnp.asarray(pad_rows(x[idx], bs)))[:len(idx)]
        correct = pred == y[idx]
        state.clean_correct[idx] = correct
        state.broken_by[idx[~correct]] = -2
        state.clean_done[idx] = True
        if on_batch:
            on_batch(state, CLEAN, int(state.clean_done.sum()), state.n)
    log(f"initial accuracy: {state.clean_correct.mean():.2%}")

    for k, comp in enumerate(comps):
        todo = np.flatnonzero(state.pending(k))
        if not len(todo):
            continue
        n_total = int(state.attempted[k].sum()) + len(todo)
        if on_batch:
            on_batch(state, comp.name, int(state.attempted[k].sum()), n_total)  # stage start
        for b in range(0, len(todo), bs):
            idx = todo[b:b + bs]
            size = bucket_size(len(idx), bs, shape_buckets)
            xb = jnp.asarray(pad_rows(x[idx], size))
            yb = jnp.asarray(pad_rows(y[idx], size))
            adv = np.asarray(comp.fn(logits_fn, xb, yb, _batch_key(key, comp.name, int(idx[0])), comp.config))
            pred = predict(logits_fn, jnp.asarray(adv))[:len(idx)]
            adv = adv[:len(idx)]
            fooled = pred != y[idx]
            hit = idx[fooled]
            state.broken_by[hit] = k
            state.perturbation_norm[hit] = perturbation_norm(adv[fooled] - x[hit], norm)
            if state.x_adv is not None:
                state.x_adv[hit] = adv[fooled]
            state.attempted[k, idx] = True
            if on_batch:
                on_batch(state, comp.name, int(state.attempted[k].sum()), n_total)
        log(f"robust accuracy after {comp.name.upper()}: {state.robust.mean():.2%} "
            f"(total time {time.time() - start:.1f} s)")
    if state.x_adv is not None:
        worst = float(state.perturbation_norm.max()) if state.n else 0.0
        log(f"max {norm} perturbation: {worst:.5f}, robust accuracy: {state.robust.mean():.2%}")
    return state


def autoattack(logits_fn, x, y, key, config: AutoAttackConfig = AutoAttackConfig(), *, batch_size: int = 128,
               shape_buckets: int = 6, log: Optional[Callable[[str], None]] = None) -> CascadeState:
    """Run AutoAttack on ``x`` (NHWC in [0, 1]) and ``y``; returns the :class:`CascadeState` with ``x_adv``.

    ``state.robust`` are the final per-example flags, ``state.accuracy()`` the clean and per-attack robust
    accuracies, ``state.broken_by_names()`` which attack broke each point, ``state.perturbation_norm`` the norm of
    each final perturbation. Same ``key`` -> same result.
    """
    return run_cascade(logits_fn, x, y, key, components(config, num_classes(logits_fn, x)), norm=config.norm,
                       batch_size=batch_size, shape_buckets=shape_buckets, log=log)

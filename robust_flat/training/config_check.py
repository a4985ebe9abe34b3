"""Up-front validation of a training config: every problem at once, before anything is written or compiled.

:func:`check_config` returns one line per problem (an empty list: the config is fine) and raises nothing itself:
``python -m experiments.cifar10_at`` prints them and exits with status 2 before it creates the run directory. It
checks every field the trainer and the methods read: positive integers where a count must be positive
(``train.epochs``, ``train.batch_size``, ``checkpoint.every_steps``, ...), non-negative ones where 0 means "none"
(``eval.n_examples``, ``data.train_examples``, ...), radii and step sizes (``attack.eps``, ``attack.step_size`` > 0;
``awp.xi``, weight decay >= 0), fractions in [0, 1], and the names of every enumerated choice (method, model,
activation, normalization, compute dtype, dataset, attack norm and initialization, optimizer, schedule, TRADES's
best iterate) against the lists the library itself uses, so a typo is refused instead of silently meaning something
else.

:func:`unknown_field` is the check behind ``--config.<field>=...`` overrides: a field the config does not have, with
the closest existing one as a suggestion. :data:`FRACTION_FIELDS` are the fields whose command-line values may be
fractions (``8/255``), parsed by :func:`robust_flat.evaluation.parse_eps` like every other radius.
"""
from __future__ import annotations

import difflib
import math
import numbers
import os
from typing import Any, Callable, Optional

# Fields whose command-line overrides may be written as fractions (8/255, 2/255): the input radius and step size.
FRACTION_FIELDS = ("attack.eps", "attack.step_size")

# Choices that the library spells out in code rather than in a table (kept in step with the modules named).
OPTIMIZERS = ("sgd", "adam")                                       # training/optim.py make_optimizer
SCHEDULES = ("multistep", "constant", "cyclic")                    # training/optim.py make_schedule
MODEL_NORMS = ("rebn", "bn", "none")                               # models/layers.py make_norm
ATTACK_NORMS = ("linf", "l2")                                      # attacks/pgd.py PGDConfig
ATTACK_INITS = ("uniform_norm", "uniform", "small_normal", "zero")  # attacks/common.py init_delta
BEST_ITERATES = ("batch", "last", "example")                       # attacks/pgd.py PGDConfig (TRADES)
PIXEL_SCALES = (255.0, 1.0)                                        # data.py validate
# the methods whose training loss is the cross-entropy, where train.label_smoothing applies (training/update.py)
LABEL_SMOOTHING_METHODS = ("pgd_at", "clean")
# the config block each method reads besides the shared ones
METHOD_BLOCKS = {"trades": "trades", "mart": "mart", "awp": "awp", "entropy_sgd": "esgd", "sam": "sam", "ssl": "ssl"}

_MISSING = object()


def _get(config, path: str):
    cur = config
    for part in path.split("."):
        try:
            if part not in cur:
                return _MISSING
            cur = cur[part]
        except TypeError:  # not a block
            return _MISSING
    return cur


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _choices() -> dict:
    """The enumerated fields and their allowed values, from the library's own tables."""
    from robust_flat.attacks.pgd import STEP_RULES
    from robust_flat.data import NUM_CLASSES
    from robust_flat.models import MODELS
    from robust_flat.models.layers import ACTIVATIONS, COMPUTE_DTYPES
    from robust_flat.training import METHODS

    return {"method": tuple(METHODS), "model.name": tuple(MODELS), "model.activation": tuple(ACTIVATIONS),
            "model.norm": MODEL_NORMS, "model.dtype": tuple(COMPUTE_DTYPES), "data.dataset": tuple(NUM_CLASSES),
            "attack.norm": ATTACK_NORMS, "attack.init": ATTACK_INITS, "attack.step_rule": STEP_RULES,
            "optimizer.name": OPTIMIZERS,
            "optimizer.schedule": SCHEDULES, "trades.best_iterate": BEST_ITERATES}


def check_config(config) -> list[str]:
    """Every problem of a training ``config`` (a ``ConfigDict`` or nested dict), one line each naming the field,
    the rule and the value; ``[]`` when it is fine. Raises nothing."""
    problems: list[str] = []

    def rule(path: str, ok: Callable[[Any], bool], what: str, optional: bool = False, hint: str = ""):
        """``path`` must satisfy ``ok`` (described by ``what``); ``optional``: a missing field is fine."""
        v = _get(config, path)
        if v is _MISSING:
            if not optional:
                problems.append(f"{path} is missing from the config; start from a config in experiments/configs/")
            return
        try:
            good = bool(ok(v))
        except Exception:  # a comparison with a value of the wrong type
            good = False
        if not good:
            problems.append(f"{path} must be {what}, got {v!r}{hint}")

    def integer(lo: int):
        return lambda v: _is_int(v) and v >= lo

    def real(lo: float, hi: Optional[float] = None, lo_open: bool = False, hi_open: bool = False):
        def ok(v):
            if not _is_real(v):
                return False
            v = float(v)
            return ((v > lo) if lo_open else (v >= lo)) and (hi is None or ((v < hi) if hi_open else (v <= hi)))
        return ok

    def boolean(v):
        return isinstance(v, bool)

    try:
        choices = _choices()
    except Exception as e:  # the library tables could not be imported: check the rest
        problems.append(f"cannot check the enumerated fields ({type(e).__name__}: {e})")
        choices = {}
    for path, options in choices.items():
        if path.startswith("trades.") and (_get(config, "method") != "trades" or _get(config, "trades") is _MISSING):
            continue
        v = _get(config, path)
        if v is _MISSING:
            problems.append(f"{path} is missing from the config; start from a config in experiments/configs/")
        elif v not in options:
            close = difflib.get_close_matches(str(v), [str(o) for o in options], n=1)
            problems.append(f"{path} must be one of {', '.join(map(str, options))}, got {v!r}"
                            + (f" (did you mean {close[0]}?)" if close else ""))

    rule("seed", integer(0), "an integer >= 0")
    # model
    rule("model.num_classes", integer(2), "an integer >= 2")
    rule("model.dropout", real(0.0, 1.0, hi_open=True), "a number in [0, 1)")
    rule("model.width", lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1 (or None: the model's "
         "default)", optional=True)
    from robust_flat.models.layers import WHITENINGS  # (absent from runs written before it: CIFAR-10's constants)
    rule("model.whitening", lambda v: v in WHITENINGS, f"one of {', '.join(WHITENINGS)} (the input whitening "
         "constants)", optional=True)
    # data
    rule("data.data_dir", lambda v: isinstance(v, str), "a path (a string; empty: tensorflow-datasets)")
    rule("data.pixel_scale", lambda v: _is_real(v) and float(v) in PIXEL_SCALES, "255.0 (uint8-range images) or 1.0 "
         "(float images in [0, 1])")
    rule("data.train_examples", integer(0), "an integer >= 0 (0: all)")
    rule("data.augment", boolean, "true or false")
    rule("data.autoaugment", boolean, "true or false")
    rule("data.cutout", integer(0), "an integer >= 0 (the side of the Cutout square; 0: none; paper: 16)")
    rule("data.extra_path", lambda v: isinstance(v, str), "a path to an .npz file (a string; empty: no extra data)")
    rule("data.extra_fraction", real(0.0, 1.0, lo_open=True, hi_open=True), "a share in (0, 1) (paper: 0.5)")
    extra = _get(config, "data.extra_path")
    if isinstance(extra, str) and extra and not os.path.isfile(extra):
        problems.append(f"data.extra_path {extra!r} does not exist (an .npz file with arrays 'images' and 'labels')")
    rule("data.label_noise", real(0.0, 1.0, hi_open=True), "a share in [0, 1) (0: no label noise; paper: 0.1 ... 0.5)")
    if _get(config, "data.dataset") == "synthetic":
        rule("data.synthetic_train", integer(1), "an integer >= 1")
        rule("data.synthetic_test", integer(1), "an integer >= 1")
        rule("data.synthetic_image_size", lambda v: _is_int(v) and v >= 8 and v % 8 == 0,
             "a multiple of 8 (the side of the generated images, e.g. 32)", optional=True)
    # training
    rule("train.epochs", integer(1), "an integer >= 1")
    rule("train.batch_size", integer(1), "an integer >= 1")
    rule("train.clip_weights", real(0.0), "a number >= 0 (0: no weight clipping)")
    rule("train.batches_per_step", integer(1), "an integer >= 1", optional=True)
    rule("train.label_smoothing", real(0.0, 1.0, hi_open=True), "a number in [0, 1) (0: off; paper: 0.1, 0.2, 0.3)")
    smoothing = _get(config, "train.label_smoothing")
    if _is_real(smoothing) and smoothing > 0 and _get(config, "method") not in LABEL_SMOOTHING_METHODS:
        problems.append(f"train.label_smoothing is implemented for the methods trained on the cross-entropy "
                        f"({', '.join(LABEL_SMOOTHING_METHODS)}), not for {_get(config, 'method')}; set it to 0")
    # optimizer
    rule("optimizer.lr", real(0.0, lo_open=True), "a number > 0")
    rule("optimizer.momentum", real(0.0, 1.0, hi_open=True), "a number in [0, 1)")
    rule("optimizer.nesterov", boolean, "true or false")
    rule("optimizer.weight_decay", real(0.0), "a number >= 0")
    rule("optimizer.gamma", real(0.0, lo_open=True), "a number > 0")
    rule("optimizer.cycle_epochs", real(0.0, lo_open=True), "a number > 0")
    rule("optimizer.milestones",
         lambda v: (isinstance(v, (tuple, list)) and all(_is_real(m) and 0 < float(m) <= 1 for m in v)
                    and list(v) == sorted(v)),
         "increasing fractions of training in (0, 1], e.g. (0.4, 0.6, 0.8)")
    # attack (training, per-epoch curves and early stopping; also read by clean training's evaluation)
    rule("attack.eps", real(0.0, lo_open=True), "a number > 0 (e.g. 8/255)")
    rule("attack.step_size", real(0.0, lo_open=True), "a number > 0 (e.g. 2/255)")
    rule("attack.steps", integer(0), "an integer >= 0")
    rule("attack.restarts", integer(1), "an integer >= 1")
    rule("attack.fraction", real(0.0, 1.0), "a number in [0, 1]", optional=True)
    rule("attack.unroll", boolean, "true or false")
    rule("attack.tau", integer(-1), "an integer >= 0 (PGD-tau; paper: 0, 1, 2, 3) or -1 (plain PGD)")
    if _is_int(_get(config, "attack.tau")) and _get(config, "attack.tau") >= 0 and _get(config, "method") == "trades":
        problems.append("attack.tau (PGD-tau) stops at misclassification, but TRADES attacks the KL divergence "
                        "without labels; set it to -1")
    # weight averaging, checkpoints, evaluation
    rule("ema.enabled", boolean, "true or false")
    rule("ema.decay", real(0.0, 1.0, hi_open=True), "a number in [0, 1)")
    rule("ema.bn_batches", integer(0), "an integer >= 0 (0: one pass over the training data)", optional=True)
    rule("checkpoint.every_steps", integer(1), "an integer >= 1")
    rule("checkpoint.snapshot_every", integer(1), "an integer >= 1 (epochs)")
    rule("checkpoint.keep_latest", integer(1), "an integer >= 1")
    rule("eval.n_examples", integer(0), "an integer >= 0 (0: no per-epoch curves)")
    rule("eval.batch_size", integer(1), "an integer >= 1")
    rule("eval.early_stopping", boolean, "true or false")
    rule("eval.es_steps", integer(0), "an integer >= 0")
    rule("eval.es_restarts", integer(1), "an integer >= 1")
    rule("debug.sigkill_at_step", lambda v: _is_int(v), "an integer (-1: off)", optional=True)

    # the method's own block
    method = _get(config, "method")
    block = METHOD_BLOCKS.get(method) if isinstance(method, str) else None
    if block is not None and _get(config, block) is _MISSING:
        problems.append(f"method {method} needs the config block {block!r}; use "
                        f"--config=experiments/configs/{method}.py")
    elif method in ("trades", "mart"):
        rule(f"{method}.beta", real(0.0), "a number >= 0")
    elif method == "awp":
        rule("awp.xi", real(0.0), "a number >= 0 (0: no weight perturbation)")
        rule("awp.steps", integer(1), "an integer >= 1")
        rule("awp.lr", real(0.0), "a number >= 0 (0: xi)")
        rule("awp.grad_clip", real(0.0), "a number >= 0 (0: off)")
        rule("awp.include_bias", boolean, "true or false")
        rule("awp.loss_threshold", real(0.0), "a number >= 0 (0: perturb every batch)")
    elif method == "sam":
        rule("sam.rho", lambda v: v is None or real(0.0)(v), "a number >= 0 (or None: 0.05, 0.5 with sam.adaptive)")
        rule("sam.adaptive", boolean, "true or false")
        rule("sam.eta", real(0.0), "a number >= 0")
    elif method == "ssl":
        rule("ssl.lam", real(0.0), "a number >= 0 (paper: 0.5 to 8)")
        rule("model.rotation_head", integer(1), "an integer >= 1 (the rotation head's hidden width, e.g. 256)")
    elif method == "entropy_sgd":
        rule("esgd.L", integer(1), "an integer >= 1")
        rule("esgd.gamma0", real(0.0), "a number >= 0")
        rule("esgd.gamma1", real(0.0), "a number >= 0")
        rule("esgd.langevin_lr", real(0.0, lo_open=True), "a number > 0")
        rule("esgd.beta1", real(0.0, 1.0, hi_open=True), "a number in [0, 1)")
        rule("esgd.noise", real(0.0), "a number >= 0")
        L, per_step = _get(config, "esgd.L"), _get(config, "train.batches_per_step")
        if _is_int(L) and L >= 1 and _is_int(per_step) and per_step != L + 1:
            problems.append(f"train.batches_per_step must be esgd.L + 1 = {L + 1} (each step consumes L + 1 "
                            f"mini-batches), got {per_step}; set --config.train.batches_per_step={L + 1} or leave "
                            "it to follow esgd.L")
    return problems


def config_fields(config, prefix: str = "") -> list[str]:
    """Every field of ``config`` as a dotted path, blocks included (``train``, ``train.epochs``, ...)."""
    out = []
    try:
        items = list(config.items())
    except AttributeError:
        return out
    for k, v in items:
        path = f"{prefix}{k}"
        out.append(path)
        if hasattr(v, "items"):
            out += config_fields(v, path + ".")
    return out


def unknown_field(config, path: str) -> Optional[str]:
    """``None`` if ``config`` has the field ``path`` (dotted), else the problem line: ``unknown config field
    train.epochz (did you mean train.epochs?)``."""
    if _get(config, path) is not _MISSING:
        return None
    fields = config_fields(config)
    close = difflib.get_close_matches(path, fields, n=1, cutoff=0.6)
    if close:
        return f"unknown config field {path} (did you mean {close[0]}?)"
    top = path.split(".")[0]
    if top in METHOD_BLOCKS.values():
        method = next(m for m, b in METHOD_BLOCKS.items() if b == top)
        return (f"unknown config field {path}: {top}.* belongs to the {method} config "
                f"(--config=experiments/configs/{method}.py)")
    blocks = sorted(f for f in fields if "." not in f and hasattr(_get(config, f), "items"))
    return f"unknown config field {path}; this config's blocks are {', '.join(blocks)}"


__all__ = ["check_config", "unknown_field", "config_fields", "FRACTION_FIELDS"]

"""What a run is: its config, the model and train state a config builds, and loading a trained run or a snapshot.

A run directory (written by :func:`robust_flat.training.trainer.train`, layout in :mod:`robust_flat.checkpoint`)
is identified by its ``config.json``; :func:`load_run` restores a model from it for evaluation,
:func:`snapshot_tag` is how every result file names the snapshot it measured, and :func:`weights` /
:func:`select_weights` pick the raw or the weight-averaged model (with its own batch-norm statistics) of a train
state or a loaded run: the one place every entry point's ``--weights params|ema`` goes through.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any, Optional

import jax

from robust_flat import models
from robust_flat.checkpoint import Checkpointer, CheckpointError
from robust_flat.models.layers import whitening_options
from robust_flat.training.optim import make_optimizer
from robust_flat.training.state import LegacyTrainState, TrainState, create_train_state

DEFAULT_INPUT_SHAPE = (32, 32, 3)  # checkpoints written before the input shape was stored with them
WEIGHTS = ("params", "ema")  # the raw weights, or their average (config.ema) with its own batch-norm statistics
SNAPSHOTS = ("last", "best", "best_ema")  # named snapshots besides epoch numbers (see load_run)


@dataclasses.dataclass
class LoadedRun:
    model: Any
    params: Any
    model_state: Any
    ema_params: Optional[Any]
    config: Any
    epoch: int
    step: int
    run_dir: str
    snapshot: str
    ema_model_state: Optional[Any] = None  # batch-norm statistics of ema_params
    ema_bn_step: Optional[int] = None      # the step at which they were recalibrated (== step: they fit ema_params)


def weights(run, which: str = "params"):
    """``(params, model_state)`` of a :class:`~robust_flat.training.state.TrainState` or a :class:`LoadedRun`:
    ``"params"`` the trained weights and their batch-norm statistics, ``"ema"`` the averaged weights and the
    statistics recalibrated for them (:mod:`robust_flat.training.averaging`). A ``ValueError`` says why the average
    cannot be used (no weight averaging in this run; a checkpoint written mid-epoch, whose statistics are those of
    an earlier average)."""
    if which not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {which!r}")
    if which == "params":
        return run.params, run.model_state
    ema_params, ema_state = getattr(run, "ema_params", None), getattr(run, "ema_model_state", None)
    if ema_params is None or ema_state is None:
        raise ValueError("--weights ema: this run has no weight-averaged parameters (train with "
                         "--config.ema.enabled=True)")
    bn_step, step = getattr(run, "ema_bn_step", None), getattr(run, "step", None)
    if isinstance(run, LoadedRun) and bn_step != step:
        raise ValueError(f"--weights ema: this checkpoint (step {step}) was written mid-epoch; the batch-norm "
                         f"statistics of the average are those of step {bn_step}: pick an epoch's --snapshot")
    return ema_params, ema_state


def select_weights(run, which: str = "params"):
    """A shallow copy of the loaded ``run`` whose ``params``/``model_state`` are :func:`weights` ``(run, which)``
    (what an entry point hands on to a measure); ``run`` itself for ``"params"``."""
    if which == "params":
        return run
    params, model_state = weights(run, which)
    out = copy.copy(run)
    out.params, out.model_state = params, model_state
    return out


def model_from_config(config):
    """The model of a run's config. ``model.whitening`` names the input whitening constants
    (:func:`robust_flat.models.layers.whitening_options`); a config without it, written before that option existed,
    gets CIFAR-10's, which every model whitened with then whatever its dataset. Whitening options in the model config
    itself (an imported model's ``whiten``/``whiten_mean``/``whiten_std``) take precedence."""
    m = config.model
    options = {k: v for k, v in m.to_dict().items() if k not in ("name", "num_classes", "whitening")}
    options = {**whitening_options(m.get("whitening", "cifar10")), **options}
    return models.create_model(m.name, num_classes=m.num_classes, **options)


def build(config, input_shape, steps_per_epoch: int):
    """Model, optimizer and the initial train state of a config (images of ``input_shape``, H x W x C)."""
    model = model_from_config(config)
    root = jax.random.PRNGKey(config.seed)
    params, model_state = models.init_model(model, jax.random.fold_in(root, 0), (1,) + tuple(input_shape))
    tx = make_optimizer(config.optimizer, steps_per_epoch, config.train.epochs)
    state = create_train_state(params, model_state, tx, jax.random.fold_in(root, 1), ema=config.ema.enabled)
    return model, tx, state


def read_config(run_dir: str):
    import ml_collections

    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{run_dir} is not a run directory (no config.json); pass the --run-dir of a "
                              "training run")
    try:
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except (json.JSONDecodeError, OSError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); the run directory is damaged")


def snapshot_tag(snapshot, epoch: int) -> str:
    """How result files name a snapshot: ``last-ep30`` / ``best-ep12`` / ``best_ema-ep15`` (the epoch the name
    resolved to), ``ep10``."""
    return f"{snapshot}-ep{epoch}" if str(snapshot) in SNAPSHOTS else f"ep{snapshot}"


def check_snapshot(text: str):
    """A ``--snapshot`` argument: an epoch number (int) or one of :data:`SNAPSHOTS`; a ``ValueError`` otherwise."""
    if text in SNAPSHOTS:
        return text
    if not str(text).isdigit():
        raise ValueError(f"--snapshot must be an epoch number or one of {', '.join(SNAPSHOTS)}, got {text!r}")
    return int(text)


def restore_state(ckpt, which: str, step: int, abstract_state):
    """Restore into ``abstract_state``; a checkpoint of the layout before ``TrainState.ema_model_state`` (written by
    earlier versions, without weight averaging) restores into :class:`LegacyTrainState` and is converted."""
    try:
        return ckpt.restore(which, step, target=abstract_state)
    except CheckpointError:
        if abstract_state.ema_params is not None:
            raise
        legacy = LegacyTrainState(**{f.name: getattr(abstract_state, f.name)
                                     for f in dataclasses.fields(LegacyTrainState)})
        try:
            old, meta = ckpt.restore(which, step, target=legacy)
        except CheckpointError:
            pass
        else:
            return TrainState(**{f.name: getattr(old, f.name) for f in dataclasses.fields(LegacyTrainState)}), meta
        raise


def load_run(run_dir: str, snapshot="last") -> LoadedRun:
    """Load a trained model from a run directory.

    ``snapshot``: ``"last"`` (the newest rolling checkpoint), ``"best"`` (early-stopping choice of the raw
    weights), ``"best_ema"`` (the snapshot of the epoch the averaged weights' own early stopping chose; use it with
    ``select_weights(run, "ema")``), or an epoch number (a kept snapshot, every 5 epochs by default). The arrays are
    checked against the checksum stored with them; a damaged checkpoint is a :class:`CheckpointError`.
    """
    config = read_config(run_dir)
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"))
    try:
        if snapshot in ("last", "latest", None):
            which, step = "latest", ckpt.latest_step("latest")
        elif snapshot == "best":
            which, step = "best", ckpt.latest_step("best")
        elif snapshot == "best_ema":
            latest = ckpt.latest_step("latest")
            step = None if latest is None else ckpt.read_meta("latest", latest).get("best_ema_epoch")
            if step is None:
                raise CheckpointError(f"{run_dir} has no early-stopping choice of averaged weights (needs "
                                      "config.ema.enabled and eval.early_stopping, and one snapshot epoch trained)")
            which, step = "snapshots", int(step)
        else:
            which, step = "snapshots", int(snapshot)
            if step not in ckpt.all_steps("snapshots"):
                raise CheckpointError(f"{run_dir} has no snapshot for epoch {step}; available: "
                                      f"{ckpt.all_steps('snapshots')}")
        if step is None:
            raise CheckpointError(f"{run_dir} has no {which} checkpoint yet; train it first (or pick another "
                                  "--snapshot)")
        # The restore target comes from the config and the stored input shape (shapes only, nothing is computed),
        # which also lets a checkpoint written on several devices load on one.
        shape = ckpt.read_meta(which, step).get("input_shape") or DEFAULT_INPUT_SHAPE
        abstract_state = jax.eval_shape(lambda: build(config, shape, 1)[2])
        try:
            state, meta = restore_state(ckpt, which, step, abstract_state)
        except CheckpointError as e:
            advice = ("; rerun the training command: it resumes from the previous intact rolling checkpoint and "
                      "writes this one again" if which == "latest" else
                      "; this snapshot cannot be used (retrain, or pick another --snapshot)")
            raise CheckpointError(str(e) + advice) from e
    finally:
        ckpt.close()
    return LoadedRun(model=model_from_config(config), params=state.params, model_state=state.model_state,
                     ema_params=state.ema_params, config=config, epoch=int(meta.get("epoch", 0)),
                     step=int(meta.get("step", 0)), run_dir=run_dir, snapshot=str(snapshot),
                     ema_model_state=state.ema_model_state, ema_bn_step=meta.get("ema_bn_step"))

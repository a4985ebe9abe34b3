"""What a run is: its config, the model and train state a config builds, and loading a trained run or a snapshot.

A run directory (written by :func:`robust_flat.training.trainer.train`, layout in :mod:`robust_flat.checkpoint`)
is identified by its ``config.json``; :func:`load_run` restores a model from it for evaluation, and
:func:`snapshot_tag` is how every result file names the snapshot it measured.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax

from robust_flat import models
from robust_flat.checkpoint import Checkpointer, CheckpointError
from robust_flat.training.optim import make_optimizer
from robust_flat.training.state import create_train_state

DEFAULT_INPUT_SHAPE = (32, 32, 3)  # checkpoints written before the input shape was stored with them


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


def model_from_config(config):
    m = config.model
    return models.create_model(m.name, num_classes=m.num_classes,
                               **{k: v for k, v in m.to_dict().items() if k not in ("name", "num_classes")})


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
    """How result files name a snapshot: ``last-ep30`` / ``best-ep12`` (the epoch the name resolved to), ``ep10``."""
    return f"{snapshot}-ep{epoch}" if str(snapshot) in ("best", "last") else f"ep{snapshot}"


def load_run(run_dir: str, snapshot="last") -> LoadedRun:
    """Load a trained model from a run directory.

    ``snapshot``: ``"last"`` (the newest rolling checkpoint), ``"best"`` (early-stopping choice), or an epoch
    number (a kept snapshot, every 5 epochs by default). The arrays are checked against the checksum stored with
    them; a damaged checkpoint is a :class:`CheckpointError`.
    """
    config = read_config(run_dir)
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"))
    try:
        if snapshot in ("last", "latest", None):
            which, step = "latest", ckpt.latest_step("latest")
        elif snapshot == "best":
            which, step = "best", ckpt.latest_step("best")
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
            state, meta = ckpt.restore(which, step, target=abstract_state)
        except CheckpointError as e:
            advice = ("; rerun the training command: it resumes from the previous intact rolling checkpoint and "
                      "writes this one again" if which == "latest" else
                      "; this snapshot cannot be used (retrain, or pick another --snapshot)")
            raise CheckpointError(str(e) + advice) from e
    finally:
        ckpt.close()
    return LoadedRun(model=model_from_config(config), params=state.params, model_state=state.model_state,
                     ema_params=state.ema_params, config=config, epoch=int(meta.get("epoch", 0)),
                     step=int(meta.get("step", 0)), run_dir=run_dir, snapshot=str(snapshot))

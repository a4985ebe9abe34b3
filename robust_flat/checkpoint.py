"""Checkpoints of the train state through orbax-checkpoint, in one small module.

Layout of a run directory::

    RUN/config.json            resolved config (the run's identity; a rerun must match it)
    RUN/metrics.jsonl          one line per epoch
    RUN/checkpoints/latest/    rolling checkpoints every N steps (the resume point), last 2 kept
    RUN/checkpoints/snapshots/ one per ``snapshot_every`` epochs, all kept, step = epoch (for later analysis)
    RUN/checkpoints/best/      the best epoch by robust test error on the last 500 test images (early stopping)

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a killed job or a full disk
never leaves a half-written checkpoint that looks valid; older checkpoints are untouched. Only this module talks to
orbax (the V0 ``CheckpointManager`` API), so a switch to orbax V1 touches one file.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not match the run. The message says what to do."""


def _manager(path: str, max_to_keep: Optional[int]) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(path), options=options, item_names=("state", "meta"))


def _abstract_leaf(x):
    """Restore target of one leaf: arrays keep their sharding; shape-only leaves (``jax.eval_shape``) go to the
    first local device, so a checkpoint written on N devices loads on one."""
    if isinstance(x, jax.ShapeDtypeStruct):
        sharding = x.sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return ocp.utils.to_shape_dtype_struct(x)


class Checkpointer:
    """The three checkpoint streams of a run (latest / snapshots / best)."""

    def __init__(self, directory: str, keep_latest: int = 2):
        self.directory = directory
        self.latest = _manager(os.path.join(directory, "latest"), keep_latest)
        self.snapshots = _manager(os.path.join(directory, "snapshots"), None)
        self.best = _manager(os.path.join(directory, "best"), 1)

    def save(self, which: str, step: int, state: Any, meta: dict) -> None:
        mngr = getattr(self, which)
        try:
            mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                          meta=ocp.args.JsonSave(meta)), force=True)
            mngr.wait_until_finished()
        except OSError as e:
            raise CheckpointError(f"could not write the {which} checkpoint at step {step} under {self.directory} "
                                  f"({e}); free disk space and rerun the same command, earlier checkpoints are "
                                  "intact") from e

    def latest_step(self, which: str = "latest") -> Optional[int]:
        return getattr(self, which).latest_step()

    def restore(self, which: str, step: Optional[int] = None, target: Any = None):
        """Restore ``(state, meta)``; with ``target`` (a state of the right structure) the arrays are restored into
        that structure, else as nested dicts."""
        mngr = getattr(self, which)
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no {which} checkpoint under {self.directory}")
        abstract = None if target is None else jax.tree.map(_abstract_leaf, target)
        try:
            out = mngr.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                   meta=ocp.args.JsonRestore()))
        except Exception as e:
            path = os.path.join(self.directory, which, str(step))
            raise CheckpointError(f"checkpoint {path} is corrupt or does not match this config "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); delete that folder to fall "
                                  "back to the previous one, or use a new --run-dir") from e
        return out.state, out.meta

    def all_steps(self, which: str) -> list[int]:
        return list(getattr(self, which).all_steps())

    def close(self) -> None:
        for m in (self.latest, self.snapshots, self.best):
            m.close()


# -------------------------------------------------------------------------------------------- loading runs
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
    number (a kept snapshot, every 5 epochs by default).
    """
    from robust_flat.training.trainer import build, model_from_config

    config = read_config(run_dir)
    # The restore target comes from the config (shapes only, nothing is computed), which also lets a checkpoint
    # written on several devices load on one.
    shape = (32, 32, 3)
    abstract_state = jax.eval_shape(lambda: build(config, shape, 1)[2])
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"))
    try:
        if snapshot in ("last", "latest", None):
            which, step = "latest", None
        elif snapshot == "best":
            which, step = "best", None
        else:
            which, step = "snapshots", int(snapshot)
            if step not in ckpt.all_steps("snapshots"):
                raise CheckpointError(f"{run_dir} has no snapshot for epoch {step}; available: "
                                      f"{ckpt.all_steps('snapshots')}")
        state, meta = ckpt.restore(which, step, target=abstract_state)
    finally:
        ckpt.close()
    return LoadedRun(model=model_from_config(config), params=state.params, model_state=state.model_state, ema_params=state.ema_params,
                     config=config, epoch=int(meta.get("epoch", 0)), step=int(meta.get("step", 0)),
                     run_dir=run_dir, snapshot=str(snapshot))

"""Checkpoints of the train state through orbax-checkpoint, in one small module.

Layout of a run directory::

    RUN/config.json            resolved config (the run's identity; a rerun must match it)
    RUN/metrics.jsonl          one line per epoch
    RUN/checkpoints/latest/    rolling checkpoints every N steps (the resume point), last 2 kept
    RUN/checkpoints/snapshots/ one per ``snapshot_every`` epochs, all kept, step = epoch (for later analysis)
    RUN/checkpoints/best/      the best epoch by robust test error on the last 500 test images (early stopping)

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a killed job or a full disk
never leaves a half-written checkpoint that looks valid; older checkpoints are untouched. Saving is idempotent: a step
that already exists (left by an attempt that was interrupted after writing it) is written again, so a rerun after an
interruption at any point resumes. Every checkpoint stores a SHA-256 checksum of its arrays, verified on restore, so a
damaged file (a flipped bit) is found instead of loading different weights; :meth:`Checkpointer.restore_intact` then
falls back to the newest intact checkpoint. Only this module talks to orbax (the V0 ``CheckpointManager`` API), so a
switch to orbax V1 touches one file. Storage only: it imports nothing from training (loading a run is
:mod:`robust_flat.runs`).
"""
from __future__ import annotations

import errno
import hashlib
import os
from typing import Any, Callable, Optional

import jax
import numpy as np
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


def _host_array(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # multi-host: replicated, every copy is equal
        x = x.addressable_data(0)
    return np.asarray(x)


def tree_checksum(tree: Any) -> str:
    """SHA-256 of a pytree's arrays (dtype, shape and bytes of every leaf, in flattening order)."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        a = np.ascontiguousarray(_host_array(leaf))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _no_space(e: BaseException) -> bool:
    while e is not None:
        if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class Checkpointer:
    """The three checkpoint streams of a run (latest / snapshots / best)."""

    def __init__(self, directory: str, keep_latest: int = 2):
        self.directory = directory
        self.latest = _manager(os.path.join(directory, "latest"), keep_latest)
        self.snapshots = _manager(os.path.join(directory, "snapshots"), None)
        self.best = _manager(os.path.join(directory, "best"), 1)

    def save(self, which: str, step: int, state: Any, meta: dict) -> None:
        """Write ``state`` (with ``meta`` and the checksum of ``state``) as step ``step`` of stream ``which``.
        A step that exists already is replaced: it was written by an interrupted earlier attempt at the same step
        (training is deterministic, so it holds the same values, unless it was damaged)."""
        mngr = getattr(self, which)
        step = int(step)
        meta = {**meta, "checksum": tree_checksum(state)}
        try:
            if step in mngr.all_steps():
                mngr.delete(step)
            mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)
            mngr.wait_until_finished()
        except Exception as e:
            where = f"the {which} checkpoint at step {step} under {self.directory}"
            if _no_space(e):
                raise CheckpointError(f"no space left on the device while writing {where}; free disk space and "
                                      "rerun the same command, the checkpoints written before are intact") from e
            raise CheckpointError(f"could not write {where} ({type(e).__name__}: "
                                  f"{(str(e).splitlines() or [''])[0][:200]}); rerun the same command once fixed, "
                                  "the checkpoints written before are intact") from e

    def latest_step(self, which: str = "latest") -> Optional[int]:
        return getattr(self, which).latest_step()

    def restore(self, which: str, step: Optional[int] = None, target: Any = None):
        """Restore ``(state, meta)``; with ``target`` (a state of the right structure) the arrays are restored into
        that structure and checked against the checksum stored with them, else returned as nested dicts."""
        mngr = getattr(self, which)
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no {which} checkpoint under {self.directory}")
        abstract = None if target is None else jax.tree.map(_abstract_leaf, target)
        path = os.path.join(self.directory, which, str(step))
        try:
            out = mngr.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                   meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(f"checkpoint {path} is corrupt or was written for a different model config "
                                  f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})") from e
        meta = dict(out.meta)
        stored = meta.pop("checksum", None)
        if target is not None and stored is not None and tree_checksum(out.state) != stored:
            raise CheckpointError(f"checkpoint {path} is corrupt: its arrays differ from the checksum stored when it "
                                  "was written")
        return out.state, meta

    def restore_intact(self, which: str, target: Any, restore: Optional[Callable] = None):
        """Restore the newest checkpoint of ``which`` that reads back intact. Returns ``(state, meta, step,
        damaged)`` with ``damaged`` the ``(step, reason)`` of newer checkpoints that failed, newest first; raises
        :class:`CheckpointError` when none is intact. ``restore(which, step, target)`` replaces :meth:`restore`
        (e.g. one that also reads older layouts of the state)."""
        damaged = []
        for step in sorted(self.all_steps(which), reverse=True):
            try:
                state, meta = (restore or self.restore)(which, step, target)
            except CheckpointError as e:
                damaged.append((step, str(e)))
                continue
            return state, meta, step, damaged
        if not damaged:
            raise CheckpointError(f"no {which} checkpoint under {self.directory}")
        raise CheckpointError(f"none of the {len(damaged)} {which} checkpoints under {self.directory} can be "
                              f"restored; the newest: {damaged[0][1]}")

    def read_meta(self, which: str, step: int) -> dict:
        """The metadata stored with a checkpoint, without reading its arrays."""
        try:
            out = getattr(self, which).restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:
            path = os.path.join(self.directory, which, str(step))
            raise CheckpointError(f"checkpoint {path} is corrupt ({type(e).__name__}: "
                                  f"{(str(e).splitlines() or [''])[0][:200]})") from e
        return dict(out.meta)

    def all_steps(self, which: str) -> list[int]:
        return list(getattr(self, which).all_steps())

    def close(self) -> None:
        for m in (self.latest, self.snapshots, self.best):
            m.close()

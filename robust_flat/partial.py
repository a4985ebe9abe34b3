"""Finished pieces ("units") of an interruptible computation, saved so that a rerun skips them.

A computation identified by ``name`` and a :func:`fingerprint` of every setting that changes its numbers keeps its
units under ``OUT/.partial/<name>-<fingerprint>/``, one file per unit (``<unit>.npy`` for one array, ``<unit>.npz``
for several), each written atomically (:mod:`robust_flat.io`). A changed setting gives a new fingerprint, hence a
fresh directory; the driver deletes the directory once the final result is written. Used by
``experiments/flatness.py`` (flatness samples/restarts) and the Hessian and landscape CLIs.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zipfile
from typing import Optional

import numpy as np

from robust_flat.io import atomic_save_npy, atomic_save_npz

PARTIAL = ".partial"
_UNIT = re.compile(r"^[A-Za-z0-9_.-]+$")


def fingerprint(payload: dict) -> str:
    """12 hex digits of the SHA-256 of ``payload`` as sorted-key JSON (non-JSON values via ``str``)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def array_digest(*trees) -> str:
    """12 hex digits of the SHA-256 of the dtypes, shapes and bytes of every array leaf of ``trees`` (data, weights);
    leaves in ``jax.tree`` order."""
    import jax

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(trees):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:12]


def finished_result(json_path: str, fp: str) -> Optional[dict]:
    """The JSON result at ``json_path`` if it exists and carries ``"fingerprint": fp``, else None."""
    if not os.path.isfile(json_path):
        return None
    try:
        with open(json_path) as f:
            previous = json.load(f)
    except (OSError, ValueError):
        return None
    return previous if isinstance(previous, dict) and previous.get("fingerprint") == fp else None


class PartialResults:
    """The unit files of one computation: ``OUT/.partial/<name>-<fp>/``; ``fresh=True`` deletes earlier units."""

    def __init__(self, out_dir: str, name: str, fp: str, *, fresh: bool = False):
        self.path = os.path.join(out_dir, PARTIAL, f"{name}-{fp}")
        if fresh:
            self.clear()
        os.makedirs(self.path, exist_ok=True)

    def _file(self, unit: str, ext: str) -> str:
        if not _UNIT.match(unit):
            raise ValueError(f"unit names are letters, digits, '_', '-', '.'; got {unit!r}")
        return os.path.join(self.path, unit + ext)

    def save_array(self, unit: str, array) -> None:
        atomic_save_npy(self._file(unit, ".npy"), array)

    def load_array(self, unit: str, shape: Optional[tuple] = None) -> Optional[np.ndarray]:
        """The saved array, or None if missing, unreadable or not of ``shape``."""
        path = self._file(unit, ".npy")
        if not os.path.isfile(path):
            return None
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        return arr if shape is None or arr.shape == tuple(shape) else None

    def save(self, unit: str, **arrays) -> None:
        atomic_save_npz(self._file(unit, ".npz"), **arrays)

    def load(self, unit: str) -> Optional[dict]:
        """``{name: array}`` of a unit saved by :meth:`save`, or None if missing or unreadable."""
        path = self._file(unit, ".npz")
        if not os.path.isfile(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            return None

    def load_all(self) -> dict:
        """Every readable ``.npz`` unit: ``{unit: {name: array}}``."""
        out = {}
        for f in sorted(os.listdir(self.path)):
            if f.endswith(".npz") and not f.startswith("."):
                unit = self.load(f[:-4])
                if unit is not None:
                    out[f[:-4]] = unit
        return out

    def clear(self) -> None:
        """Delete every unit (the directory stays)."""
        if os.path.isdir(self.path):
            for f in os.listdir(self.path):
                p = os.path.join(self.path, f)
                shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)

    def remove(self) -> None:
        """Delete the directory (after the final result is written), and ``.partial`` if it is then empty."""
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(self.path))
        except OSError:
            pass


__all__ = ["PARTIAL", "fingerprint", "array_digest", "finished_result", "PartialResults"]

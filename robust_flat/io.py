"""Atomic file writes: a reader (or a rerun after a crash, Ctrl-C or a full disk) sees the old file or the new one,
never a truncated mix.

Every writer serializes first, then writes a temporary file in the target's directory (``.tmp-*``), flushes and
fsyncs it, gives it ordinary permissions (``0o666 & ~umask``; ``tempfile.mkstemp`` would leave ``0600``) and renames
it over the target with ``os.replace`` (atomic on POSIX within one file system); the directory is fsynced afterwards
so the rename survives a power loss. On any failure the temporary file is removed and the previous file is left as
it was. ``OSError`` (disk full, directory not writable, ...) is re-raised as :class:`AtomicWriteError`, an
``OSError`` with the same ``errno`` whose message names the file and the step that failed.

``atomic_write_bytes``, ``atomic_write_text``, ``atomic_write_json``, ``atomic_save_npy``, ``atomic_save_npz`` and
``atomic_save_figure`` (a matplotlib figure; the format follows the file extension).
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any, Callable

import numpy as np

TMP_PREFIX = ".tmp-"


class AtomicWriteError(OSError):
    """Writing ``filename`` failed (``errno`` as in the underlying ``OSError``); the previous file is unchanged."""

    def __str__(self):
        return f"[Errno {self.errno}] {self.strerror}" if self.errno is not None else str(self.strerror)


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the rename itself already happened
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Run ``write(binary_file)`` on a temporary file next to ``path`` and rename it to ``path``."""
    path = os.fspath(path)
    d = os.path.dirname(path) or "."
    step = "creating the directory"
    tmp = None
    try:
        os.makedirs(d, exist_ok=True)
        step = "creating a temporary file in the directory"
        fd, tmp = tempfile.mkstemp(dir=d, prefix=TMP_PREFIX, suffix="-" + os.path.basename(path))
        with os.fdopen(fd, "wb") as f:
            step = "setting permissions"
            os.chmod(tmp, 0o666 & ~_current_umask())
            step = "writing"
            write(f)
            f.flush()
            step = "fsync"
            os.fsync(f.fileno())
        step = "renaming the temporary file"
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise AtomicWriteError(e.errno, f"cannot write {path}: {step} failed ({e.strerror or e}); "
                                        "the previous file, if any, is unchanged", path) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(d)


def atomic_write_bytes(path: str, data: bytes) -> None:
    data = bytes(data)
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str, obj, **dumps_kwargs) -> None:
    """``json.dumps(obj, **dumps_kwargs)`` plus a newline. Serialization errors (``TypeError``/``ValueError``) are
    raised before any file is touched."""
    atomic_write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")


def atomic_save_npy(path: str, array) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_npz(path: str, compressed: bool = False, **arrays) -> None:
    """``np.savez`` (or ``np.savez_compressed``) of ``arrays`` to ``path`` (which should end in ``.npz``)."""
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_figure(path: str, fig, **savefig_kwargs) -> None:
    """``fig.savefig`` to ``path``; the format is the extension of ``path`` unless ``format=`` is given."""
    fmt = savefig_kwargs.pop("format", None) or os.path.splitext(os.fspath(path))[1].lstrip(".") or "png"
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, **savefig_kwargs)
    atomic_write_bytes(path, buf.getvalue())


__all__ = ["AtomicWriteError", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_save_npy",
           "atomic_save_npz", "atomic_save_figure"]

"""Fixed-shape batches: the last (or a gathered) batch is padded with copies of its first example, so every batch of
a loop has one shape and the jitted function it feeds compiles once.

The padded rows must not count: :class:`Batch` carries ``mask`` (1 for real examples, 0 for padding) and
``n_valid`` (the real examples are the first ``n_valid`` rows); callers weight per-example losses by ``mask`` or
keep the first ``n_valid`` results. A padded row's value never reaches a real row's result as long as the function is
per-example (eval-mode BatchNorm; train-mode BN would mix the copies into the batch statistics) and every sum over
the batch weights it by ``mask``.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np


def pad_rows(a: np.ndarray, size: int) -> np.ndarray:
    """``a`` (``[m, ...]``, ``0 < m <= size``) with ``size - m`` copies of ``a[0]`` appended (``a`` itself when
    ``m == size``)."""
    if len(a) == size:
        return a
    return np.concatenate([a, np.repeat(a[:1], size - len(a), axis=0)])


@dataclasses.dataclass(frozen=True)
class Batch:
    """``x [size, ...]`` (as given, float32 for float inputs), ``y [size]`` int32, ``mask [size]`` float32 (1: real
    example, 0: padding), ``n_valid``: the number of real examples (the first rows)."""

    x: jax.Array
    y: jax.Array
    mask: jax.Array
    n_valid: int


def padded_batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, shrink: bool = True) -> Iterator[Batch]:
    """``(x, y)`` in order, in batches on the device, the last one padded by :func:`pad_rows`.

    Batches hold ``min(batch_size, len(x))`` examples (``shrink=True``, the default: a set smaller than a batch is
    not padded) or always ``batch_size`` (``shrink=False``: one shape whatever the set's size; a random draw over
    the batch, e.g. PGD's start, then does not depend on the set's size)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size = min(batch_size, len(x)) if shrink else batch_size
    for start in range(0, len(x), size):
        xb, yb = x[start:start + size], y[start:start + size]
        n_valid = len(xb)
        yield Batch(jnp.asarray(pad_rows(xb, size)), jnp.asarray(pad_rows(yb, size), jnp.int32),
                    jnp.asarray(np.arange(size) < n_valid, jnp.float32), n_valid)

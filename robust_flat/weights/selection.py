"""Which parameter leaves are "layers" of the weight neighbourhood B_xi(w).

The paper perturbs every conv/linear weight and every conv/linear bias, each as its own layer, and leaves batch
normalization, the frozen input whitening and auxiliary heads alone (as the released code's ``no_normalization``
selection). Flax names those leaves ``.../kernel`` and ``.../bias``; every normalization module of
:mod:`robust_flat.models` has ``norm`` in its name (Flax's own ``BatchNorm_0``/``LayerNorm_0`` too), so the default
filter is a path pattern:

* a leaf is selected iff its path matches one of ``include`` and none of ``exclude`` (``re.search``, case-insensitive
  unless ``case_sensitive``), and it is a floating-point array;
* paths are the pytree keys joined by ``/``, e.g. ``stage2_block0/shortcut_conv/kernel``.

On the paper's ResNet-18 this keeps exactly its 26 tensors. User-supplied regexes work on any Flax (or other pytree)
model; e.g. ``LayerSelection(exclude=("norm", "whiten", "aux", r"(^|/)bias$"))`` is the code's
``no_normalization_no_bias`` variant (AT-AWP).

The selection depends only on the tree structure (paths), so it is resolved at trace time: it costs nothing inside
jitted code and never becomes a traced value.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_INCLUDE = (r"(^|/)(kernel|bias)$",)
DEFAULT_EXCLUDE = ("norm", "whiten", "aux")


@dataclasses.dataclass(frozen=True)
class LayerSelection:
    """Path-pattern filter over a parameter pytree (defaults: the paper's layers)."""

    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    case_sensitive: bool = False

    def __post_init__(self):
        # Accept lists or a single string; store tuples so the config stays hashable (a static jit argument).
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            value = tuple(value)
            for pattern in value:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"LayerSelection.{name}: invalid regex {pattern!r}: {e}") from None
            object.__setattr__(self, name, value)
        if not self.include:
            raise ValueError("LayerSelection.include is empty: no leaf could ever be selected")

    def matches(self, path: str) -> bool:
        """Whether a ``/``-joined path is a layer (dtype not checked)."""
        return _matches(path, self.include, self.exclude, self.case_sensitive)


@functools.lru_cache(maxsize=4096)
def _matches(path: str, include: tuple, exclude: tuple, case_sensitive: bool) -> bool:
    flags = 0 if case_sensitive else re.IGNORECASE
    if not any(re.search(p, path, flags) for p in include):
        return False
    return not any(re.search(p, path, flags) for p in exclude)


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_string(path: Sequence[Any]) -> str:
    """``('stage1_block0', 'conv1', 'kernel')`` key path -> ``'stage1_block0/conv1/kernel'``."""
    return "/".join(_key_name(k) for k in path)


def _is_float(leaf) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def leaf_paths(params) -> list[str]:
    """The ``/``-joined paths of all leaves, in ``jax.tree.leaves`` order."""
    return [path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def selection_mask(params, selection: LayerSelection = LayerSelection()):
    """A pytree of Python bools with the structure of ``params``: True for the leaves that are layers."""
    return jax.tree_util.tree_map_with_path(
        lambda p, leaf: bool(_is_float(leaf) and selection.matches(path_string(p))), params)


def selected_paths(params, selection: LayerSelection = LayerSelection()) -> list[str]:
    """Paths of the selected leaves, in leaf order."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [path_string(p) for p, leaf in flat if _is_float(leaf) and selection.matches(path_string(p))]


def num_selected(params, selection: LayerSelection = LayerSelection()) -> int:
    return len(selected_paths(params, selection))


def describe(params, selection: LayerSelection = LayerSelection()) -> list[tuple[str, tuple, bool]]:
    """``(path, shape, selected)`` for every leaf: a readable check of what a selection picks."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [(path_string(p), tuple(np.shape(leaf)), bool(_is_float(leaf) and selection.matches(path_string(p))))
            for p, leaf in flat]


def check_selects_something(params, selection: LayerSelection) -> None:
    if not num_selected(params, selection):
        raise ValueError(f"the layer selection {selection} matches no parameter leaf; leaf paths are e.g. "
                         f"{leaf_paths(params)[:5]}")

"""One switch for XLA:CPU compiler options, applied per jitted function (never through global XLA_FLAGS).

jaxlib 0.10's XLA:CPU sends every convolution to YNNPACK, whose weight-gradient convolutions are ~4-10x slower than
XLA's own Eigen path (CPU performance notes). :func:`jit` adds
``xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE`` (keeps YNNPACK's reductions, moves convolutions
back to Eigen) when the default backend is CPU. Numerically identical within float tolerance.

Switch: ``ROBUST_FLAT_FAST_CPU_CONV=0`` in the environment, or :func:`set_fast_cpu_conv(False)` before the first
call of a jitted function, turns it off. The option is looked up when a function is first called, so importing
robust_flat neither initializes a backend nor touches the user's flags.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional

import jax

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
_fast_cpu_conv: Optional[bool] = None


def set_fast_cpu_conv(enabled: bool) -> None:
    global _fast_cpu_conv
    _fast_cpu_conv = bool(enabled)


def fast_cpu_conv_enabled() -> bool:
    if _fast_cpu_conv is not None:
        return _fast_cpu_conv
    return os.environ.get("ROBUST_FLAT_FAST_CPU_CONV", "1") not in ("0", "false", "False", "")


def compiler_options() -> Optional[dict]:
    if jax.default_backend() == "cpu" and fast_cpu_conv_enabled():
        return dict(CPU_OPTIONS)
    return None


def jit(fn: Callable, **jit_kwargs) -> Callable:
    """``jax.jit`` with :func:`compiler_options`, resolved lazily at the first call (then cached)."""
    compiled = {}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        key = fast_cpu_conv_enabled()
        if key not in compiled:
            compiled[key] = jax.jit(fn, compiler_options=compiler_options(), **jit_kwargs)
        return compiled[key](*args, **kwargs)

    wrapper.lower = lambda *a, **k: jax.jit(fn, compiler_options=compiler_options(), **jit_kwargs).lower(*a, **k)
    wrapper.raw = fn
    return wrapper

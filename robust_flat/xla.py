"""One switch for XLA:CPU compiler options, applied per jitted function (never through global XLA_FLAGS).

jaxlib 0.10's XLA:CPU sends every convolution to YNNPACK, whose weight-gradient convolutions are ~4-10x slower than
XLA's own Eigen path (measured; ``benchmarks/README.md``). :func:`jit` adds
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


# JAX's monitoring event for one XLA backend compile (``jax._src.dispatch.BACKEND_COMPILE_EVENT``; the literal is
# the fallback if the private name moves).
try:
    from jax._src.dispatch import BACKEND_COMPILE_EVENT
except ImportError:  # pragma: no cover
    BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts XLA backend compiles (``count``) and their duration (``seconds``) while entered:
    ``with CompileCounter() as c: f(x)``; ``c.count`` then says whether ``f`` compiled, ``c.names`` which functions
    compiled (``"jit(f)"``). ``on_compile()`` is called at each compile. The tests use it to prove that new batches,
    weights and epochs compile nothing; the benchmark suite to report compile time and zero compiles in timed calls."""

    def __init__(self, on_compile: Optional[Callable[[], None]] = None):
        self.count, self.seconds, self.on_compile = 0, 0.0, on_compile
        self.names: list[str] = []  # ``jit(<function name>)`` of each compile, in order

    def __call__(self, event, duration_secs, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            self.count, self.seconds = self.count + 1, self.seconds + duration_secs
            self.names.append(str(kwargs.get("fun_name", "?")))
            if self.on_compile is not None:
                self.on_compile()

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)

    def snapshot(self) -> tuple[int, float]:
        return self.count, self.seconds


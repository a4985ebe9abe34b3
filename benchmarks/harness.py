"""The benchmarks' timing harness: the machine (CPU model, matmul peak, memory), :class:`Variant` (one
implementation of a row), compile timing, :func:`run_row` (interleaved timing of a row's variants) and the results
table. Which work is timed lives in :mod:`benchmarks.rows`; the command line in :mod:`benchmarks.run`."""
from __future__ import annotations

import dataclasses
import gc
import math
import os
import platform
import re
import resource
import subprocess
import time
from typing import Any, Callable, Optional

import numpy as np

# ------------------------------------------------------------------------------------------------ machine
def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if m:
            return m.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def matmul_gflops(n: int, repeats: int) -> dict:
    """numpy float32 n x n matmul GFLOP/s: one warm-up, then ``repeats`` timed calls."""
    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), np.float32), rng.random((n, n), np.float32)
    a @ b
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        rates.append(2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return {"n": n, "median_gflops": float(np.median(rates)), "min_gflops": float(min(rates)),
            "max_gflops": float(max(rates)), "samples": [float(r) for r in rates]}


def device_matmul_gflops(n: int, repeats: int, inner: int = 10) -> dict:
    """JAX float32 n x n matmul GFLOP/s on the default (accelerator) device, default precision (XLA may use TF32
    on a GPU, as it does for the convolutions timed here): one warm-up, then ``repeats`` samples of ``inner`` calls."""
    import jax
    import jax.numpy as jnp
    ka, kb = jax.random.split(jax.random.key(0))
    a, b = jax.random.uniform(ka, (n, n), jnp.float32), jax.random.uniform(kb, (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            c = dot(a, b)
        c.block_until_ready()
        rates.append(2 * n ** 3 * inner / (time.perf_counter() - t) / 1e9)
    return {"n": n, "median_gflops": float(np.median(rates)), "min_gflops": float(min(rates)),
            "max_gflops": float(max(rates)), "samples": [float(r) for r in rates],
            "what": f"jax.jit(jnp.dot) float32 on {jax.devices()[0].device_kind}, default precision"}


def device_memory(torch_device: str) -> dict:
    """Accelerator memory: JAX's allocator peak over the process so far (it cannot be reset) and PyTorch's peak
    since the last ``torch.cuda.reset_peak_memory_stats()`` (reset at the start of each row)."""
    import jax
    out = {}
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        out["jax_peak_gb_process_so_far"] = stats["peak_bytes_in_use"] / 2 ** 30
    if torch_device != "cpu":
        import torch
        out["torch_peak_gb_row"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def forward_macs(logits_fn, params, model_state) -> int:
    """Conv + dense multiply-accumulates of one forward pass for one 32x32x3 image (analytic, from the jaxpr)."""
    import jax

    def subjaxprs(eqn):
        for v in eqn.params.values():
            for item in (v if isinstance(v, (list, tuple)) else [v]):
                if hasattr(item, "jaxpr") and hasattr(item, "consts"):
                    yield item.jaxpr
                elif hasattr(item, "eqns"):
                    yield item

    def count(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                out, rhs = eqn.outvars[0].aval.shape, eqn.invars[1].aval.shape
                total += int(np.prod(out)) * int(np.prod(rhs)) // rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            elif eqn.primitive.name == "dot_general":
                (contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[i] for i in contract]))
            for sub in subjaxprs(eqn):
                total += count(sub)
        return total

    jaxpr = jax.make_jaxpr(logits_fn)(params, model_state, np.zeros((1, 32, 32, 3), np.float32))
    return count(jaxpr.jaxpr)


def ynn_convolutions(hlo_text: str) -> dict:
    """How many convolutions of a compiled XLA:CPU program run inside YNNPACK fusions (the switch's target)."""
    bodies, current = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header and not line.startswith(" "):
            current = header.group(1)
            bodies[current] = []
        elif line.startswith("}"):
            current = None
        elif current is not None:
            bodies[current].append(line)
    ynn_called = set()
    for lines in bodies.values():
        for line in lines:
            if "ynn_fusion" in line and "calls=" in line:
                ynn_called.update(re.findall(r"calls=%?([\w.\-]+)", line))
    total = sum(sum("convolution(" in l for l in lines) for lines in bodies.values())
    in_ynn = sum(sum("convolution(" in l for l in bodies.get(name, [])) for name in ynn_called)
    return {"convolutions": int(total), "in_ynnpack": int(in_ynn)}


# ------------------------------------------------------------------------------------------------ variants
@dataclasses.dataclass
class Variant:
    """One implementation of a row. ``call()`` runs it once and returns when the result is ready."""

    name: str
    call: Callable[[], Any]
    lower_s: Optional[float] = None
    compile_s: Optional[float] = None
    compile_method: str = ""
    first_call_s: Optional[float] = None
    times: list = dataclasses.field(default_factory=list)
    info: dict = dataclasses.field(default_factory=dict)
    # A cheaper call that compiles everything ``call`` needs (same shapes, fewer iterations or samples); used as the
    # warm-up with ``--light-warmup``, for rows that take tens of minutes per call on a CPU.
    warm: Optional[Callable[[], Any]] = None


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _block(out):
    import jax
    return jax.block_until_ready(out)


def _compile(jitted, *args):
    """``(compiled, lower_s, compile_s, ynn)`` via ``jitted.lower(*args).compile()``."""
    t = time.perf_counter()
    lowered = jitted.lower(*args)
    lower_s = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    try:
        ynn = ynn_convolutions(compiled.as_text())
    except Exception as e:  # noqa: BLE001 -- diagnostics only
        ynn = {"error": repr(e)}
    return compiled, lower_s, compile_s, ynn


class fast_conv:
    """Context: the XLA:CPU switch (``robust_flat.xla``) forced on/off for jits created inside; restored after."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        from robust_flat import xla
        self.prev = xla.fast_cpu_conv_enabled()
        xla.set_fast_cpu_conv(self.enabled)

    def __exit__(self, *exc):
        from robust_flat import xla
        xla.set_fast_cpu_conv(self.prev)


# ------------------------------------------------------------------------------------------------ timing
def run_row(s, row: str, variants: list, work_f: int, repeats: int, warmup: int, peak: float, log,
            light_warmup: bool, compiles, min_time: float = 0.0) -> dict:
    """Time the ``variants`` of ``row`` (built by :mod:`benchmarks.rows` on the setup ``s``: its ``name``,
    ``batch_size``, ``macs`` and ``tdev``) interleaved, after untimed warm-up calls; ``work_f`` is the row's work per
    image in forward passes. ``compiles``: an entered :class:`robust_flat.xla.CompileCounter`. ``min_time`` > 0: each
    timing sample runs the call back to back ``inner`` times (enough for ``min_time`` seconds, from one untimed
    calibration call) and records the mean, so that millisecond calls on an accelerator are not timed one dispatch
    at a time."""
    load_before = os.getloadavg()[0]
    light = {v.name: light_warmup and v.warm is not None for v in variants}
    warm_compiles, timed_compiles = {}, {v.name: 0 for v in variants}
    for v in variants:  # untimed warm-up (the first JAX call includes compilation where not done above)
        c0 = compiles.snapshot()
        for i in range(warmup):
            t = _timed(v.warm if light[v.name] else v.call)
            if i == 0:
                v.first_call_s = t
            gc.collect()
        c1 = compiles.snapshot()
        warm_compiles[v.name] = (c1[0] - c0[0], c1[1] - c0[1])
        if light[v.name]:
            log(f"  {s.name} {row} {v.name} light warm-up: {v.first_call_s:.3f} s")
    inner = {v.name: 1 for v in variants}
    if min_time > 0:
        for v in variants:
            if not light[v.name]:  # a light warm-up stands for a call too long to repeat (and to calibrate with)
                inner[v.name] = max(1, min(1000, math.ceil(min_time / max(_timed(v.call), 1e-6))))

    def sample(v):
        t = time.perf_counter()
        for _ in range(inner[v.name]):
            v.call()
        return (time.perf_counter() - t) / inner[v.name]

    for r in range(repeats):
        for v in variants:
            time.sleep(0.2)  # let the other framework's worker threads go idle
            c0 = compiles.snapshot()[0]
            v.times.append(sample(v))
            timed_compiles[v.name] += compiles.snapshot()[0] - c0
            log(f"  {s.name} {row} {v.name} repeat {r + 1}/{repeats}: {v.times[-1]:.4f} s"
                + (f" (mean of {inner[v.name]})" if inner[v.name] > 1 else ""))
        gc.collect()
    work_gflop = work_f * 2 * s.macs * s.batch_size / 1e9
    out_variants = {}
    for v in variants:
        med = float(np.median(v.times))
        compile_s = v.compile_s if v.compile_s is None or v.lower_s is None else v.lower_s + v.compile_s
        method = v.compile_method
        if light[v.name] and v.name != "torch":  # the warm-up did less work: time XLA's compiles instead
            compile_s, method = warm_compiles[v.name][1], "XLA compile events in the light warm-up"
        elif method == "first call - median" and v.first_call_s is not None:
            compile_s = max(v.first_call_s - med, 0.0)
        out_variants[v.name] = {
            "n": len(v.times), "times_s": [float(t) for t in v.times], "median_s": med,
            "min_s": float(min(v.times)), "max_s": float(max(v.times)),
            "images_per_s": s.batch_size / med, "gflops": work_gflop / med,
            "pct_peak": 100.0 * work_gflop / med / peak,
            "first_call_s": v.first_call_s, "light_warmup": light[v.name], "lower_s": v.lower_s,
            "compile_s": compile_s if v.name != "torch" else None,
            "compile_method": method if v.name != "torch" else None,
            "xla_compiles_warmup": warm_compiles[v.name][0], "xla_compile_s_warmup": warm_compiles[v.name][1],
            "xla_compiles_timed": timed_compiles[v.name], "calls_per_sample": inner[v.name], **v.info}
    result = {"model": s.name, "row": row, "batch_size": s.batch_size, "work_F_per_image": work_f,
              "gflop_per_call": work_gflop, "variants": out_variants, "load_avg_1min_before": load_before,
              "load_avg_1min_after": os.getloadavg()[0], "process_peak_rss_mb": peak_rss_mb(),
              "device_memory": device_memory(s.tdev)}
    if "torch" in out_variants:
        result["jax_over_torch"] = out_variants["jax"]["median_s"] / out_variants["torch"]["median_s"]
    if "jax_switch_off" in out_variants:
        result["switch_off_over_on"] = out_variants["jax_switch_off"]["median_s"] / out_variants["jax"]["median_s"]
    if "jax_bf16" in out_variants:
        result["bf16_over_fp32"] = out_variants["jax_bf16"]["median_s"] / out_variants["jax"]["median_s"]
    return result


def _sec(t: float) -> str:
    """Seconds with 3 decimals, or 3 significant digits below 0.1 s (millisecond calls on an accelerator)."""
    return f"{t:.3f}" if t >= 0.1 else f"{t:.3g}"


COLUMNS = ("model", "row", "variant", "n", "median s", "min s", "max s", "img/s", "GFLOP/s", "% peak", "compile s",
           "JAX/torch", "load (1 min)", "peak RSS MB")


def table(result: dict, markdown: bool = False) -> str:
    """The results, one line per variant: aligned text (what the run prints) or Markdown (what benchmarks/README.md
    shows, ``--report``). In Markdown the JAX/PyTorch ratio is bold and a compile time measured as (first call -
    median) instead of ``lower()+compile()`` is marked ``*``."""
    rows = []
    for row in result["rows"]:
        for name, v in row["variants"].items():
            ratio = ""
            if name == "jax" and "jax_over_torch" in row:
                ratio = f"**{row['jax_over_torch']:.2f}**" if markdown else f"{row['jax_over_torch']:.2f}"
            elif name == "jax_switch_off":
                ratio = f"off/on {row['switch_off_over_on']:.2f}"
            elif name == "jax_bf16":
                ratio = f"bf16/fp32 {row['bf16_over_fp32']:.2f}"
            comp = "" if v.get("compile_s") is None else f"{v['compile_s']:.1f}"
            if comp and markdown and v.get("compile_method") != "lower()+compile()":
                comp += "*"
            load = f"{row['load_avg_1min_before']:.1f}-{row['load_avg_1min_after']:.1f}"
            rows.append((row["model"], row["row"], name, str(v["n"]), _sec(v["median_s"]), _sec(v["min_s"]),
                         _sec(v["max_s"]), f"{v['images_per_s']:.1f}", f"{v['gflops']:.1f}",
                         f"{v['pct_peak']:.0f}%", comp, ratio, load, f"{row['process_peak_rss_mb']:.0f}"))
    if markdown:
        return "\n".join(["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
                         + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(COLUMNS)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    head = fmt(COLUMNS)
    return "\n".join([head, "-" * len(head)] + [fmt(r) for r in rows])

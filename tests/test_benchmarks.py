"""Smoke test of the benchmark driver (no timing assertions: timings are reported, never tested)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_writes_valid_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks.run", "--rows", "pgd_step,apgd_ce", "--models", "small_cnn",
           "--repeats", "1", "--batch-size", "8", "--no-torch", "--matmul-size", "256", "--matmul-repeats", "1",
           "--light-warmup", "--switch-off", "small_cnn:pgd_step", "--min-time", "0.5", "--out", str(out)]
    # the benchmark times and counts its own compiles: no programs from the test session's compilation cache, and
    # XLA's default optimization level (the session compiles unoptimized, tests/conftest.py)
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_backend_optimization_level"))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "small_cnn" in proc.stdout and "pgd_step" in proc.stdout
    meta = result["meta"]
    assert meta["batch_size"] == 8 and meta["matmul_peak"]["start"]["n"] == 256
    # analytic MACs of the small CNN (conv 32-32-pool-64-64-pool, dense 4096-128-10)
    assert meta["models"]["small_cnn"]["forward_gmac_per_image"] == pytest.approx(0.025003264)
    row, apgd_row = result["rows"]
    assert (row["model"], row["row"], row["batch_size"]) == ("small_cnn", "pgd_step", 8)
    assert set(row["variants"]) == {"jax", "jax_switch_off"}  # the default switch-off variant; no torch
    for v in row["variants"].values():
        assert v["n"] == 1 and len(v["times_s"]) == 1 and v["median_s"] > 0
        assert v["min_s"] <= v["median_s"] <= v["max_s"]
        assert v["compile_s"] > 0 and v["compile_method"] == "lower()+compile()"
        assert np.isclose(v["images_per_s"], 8 / v["median_s"])
        assert np.isclose(v["gflops"], row["gflop_per_call"] / v["median_s"])
    assert np.isclose(row["gflop_per_call"], 2 * 2 * 0.025003264 * 8)
    # --min-time: a PGD step on 8 images takes milliseconds, so each sample averages several back-to-back calls;
    # rows warmed up lightly (APGD here) are long calls: timed one at a time
    assert meta["min_time_s"] == 0.5
    assert all(v["calls_per_sample"] > 1 for v in row["variants"].values())
    assert all(v["calls_per_sample"] == 1 for v in apgd_row["variants"].values())
    # the switch really changes the compiled program: with it off every convolution runs in YNNPACK
    on, off = row["variants"]["jax"]["ynn"], row["variants"]["jax_switch_off"]["ynn"]
    assert off["convolutions"] > 0 and off["in_ynnpack"] == off["convolutions"]
    assert on["in_ynnpack"] < on["convolutions"]
    assert "jax_over_torch" not in row and row["switch_off_over_on"] > 0
    # no timed call compiles anything; the light APGD warm-up (10 iterations) compiled every program the timed
    # 100-iteration call runs, and its compile time comes from XLA's compile events
    for v in list(row["variants"].values()) + list(apgd_row["variants"].values()):
        assert v["xla_compiles_timed"] == 0
    (v,) = apgd_row["variants"].values()
    assert apgd_row["row"] == "apgd_ce" and v["light_warmup"] and v["xla_compiles_warmup"] > 0
    assert v["compile_s"] == v["xla_compile_s_warmup"] > 0


def test_ynn_convolution_count():
    from benchmarks.harness import ynn_convolutions

    hlo = "\n".join([
        "%fused_computation (p: f32[1]) -> f32[1] {",
        "  %convolution.1 = f32[1] convolution(%a, %b)",
        "}",
        "%fused_computation.1 (p: f32[1]) -> f32[1] {",
        "  %convolution.2 = f32[1] convolution(%a, %b)",
        "}",
        "ENTRY %main (p: f32[1]) -> f32[1] {",
        '  %ynn_fusion = f32[1] fusion(%x), kind=kCustom, calls=%fused_computation, backend_config={"kind":"__ynn_fusion"}',
        "  %conv_fusion = f32[1] fusion(%x), kind=kLoop, calls=%fused_computation.1",
        "  %convolution.3 = f32[1] convolution(%a, %b)",
        "}",
    ])
    assert ynn_convolutions(hlo) == {"convolutions": 3, "in_ynnpack": 1}


def test_memory_analysis_counts_arguments_outputs_and_donated_buffers():
    import jax
    import jax.numpy as jnp

    from benchmarks.memory import memory_of

    x = jax.ShapeDtypeStruct((512, 512), jnp.float32)  # 1 MiB, nothing allocated
    mib = 1 / 1024
    plain = memory_of(jax.jit(lambda a: a * 2.0 + 1.0), x)
    assert plain["argument_gb"] == pytest.approx(mib) and plain["output_gb"] == pytest.approx(mib)
    assert plain["total_gb"] >= 2 * mib
    donated = memory_of(jax.jit(lambda a: a * 2.0 + 1.0, donate_argnums=0), x)
    assert donated["alias_gb"] == pytest.approx(mib)
    assert donated["total_gb"] == pytest.approx(plain["total_gb"] - mib)

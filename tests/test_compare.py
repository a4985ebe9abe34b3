"""experiments.compare: flatness vs robust generalization over run directories (no model, no JAX: fast)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from experiments import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, name, method, epochs, flat, rerr, rloss, xi=0.5):
    d = tmp_path / name
    (d / "flatness").mkdir(parents=True)
    (d / "evaluations").mkdir()
    (d / "config.json").write_text(json.dumps({"method": method}))
    with open(d / "metrics.jsonl", "w") as f:
        for e, rl in zip(epochs, rloss):
            f.write(json.dumps({"epoch": e, "test_robust_loss": rl, "train_robust_loss": rl - 0.5,
                                "test_robust_error": 0.9}) + "\n")
    for e, fl, re in zip(epochs, flat, rerr):
        # the shapes experiments.flatness and experiments.evaluate write (the fields compare reads)
        (d / "flatness" / f"avg_xi{xi:g}_ep{e}.json").write_text(json.dumps(
            {"measure": "average", "loss": "robust", "flatness": fl, "epoch": e,
             "config": {"neighbourhood": {"xi": xi}}}))
        (d / "evaluations" / f"aa_ep{e}.json").write_text(json.dumps(
            {"attack": "autoattack", "version": "standard", "robust_error": re, "epoch": e, "finished": True}))
        (d / "evaluations" / f"aa_ep{e}.examples.json").write_text("[]")
    return str(d)


def test_table_correlations_and_plot(tmp_path):
    a = _run(tmp_path, "at", "pgd_at", [5, 10, 15], [0.2, 0.5, 0.9], [0.55, 0.58, 0.63], [1.5, 2.0, 3.0])
    b = _run(tmp_path, "awp", "awp", [5, 10], [0.1, 0.15], [0.52, 0.53], [1.3, 1.4])
    out = tmp_path / "out"
    corr = compare.main([a, b, "--out", str(out)])
    assert corr["x"] == "avg_xi0.5" and corr["y"] == "rerr_autoattack-standard"  # AutoAttack preferred over PGD
    xs, ys = [0.2, 0.5, 0.9, 0.1, 0.15], [0.55, 0.58, 0.63, 0.52, 0.53]
    assert corr["n"] == 5
    np.testing.assert_allclose(corr["pearson"]["r"], stats.pearsonr(xs, ys)[0], rtol=1e-12)
    assert corr["spearman"]["r"] == pytest.approx(1.0) and corr["kendall"]["r"] == pytest.approx(1.0)
    table = json.loads((out / "table.json").read_text())
    assert [(r["run"], r["method"], r["epoch"]) for r in table] == [
        ("at", "pgd_at", 5), ("at", "pgd_at", 10), ("at", "pgd_at", 15), ("awp", "awp", 5), ("awp", "awp", 10)]
    assert table[2]["rloss_gap"] == pytest.approx(0.5) and table[2]["test_robust_loss"] == 3.0
    header = (out / "table.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["run", "method", "epoch"] and "avg_xi0.5" in header
    png = (out / "scatter_avg_xi0.5_vs_rerr_autoattack-standard.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    corr = compare.main([a, b, "--y", "rloss", "--out", str(out)])
    assert corr["y"] == "test_robust_loss"
    np.testing.assert_allclose(corr["spearman"]["r"], stats.spearmanr(xs, [1.5, 2.0, 3.0, 1.3, 1.4])[0])


def test_ambiguous_or_missing_columns_and_bad_dirs_are_clear_errors(tmp_path):
    a = _run(tmp_path, "a", "pgd_at", [1, 2, 3], [0.1, 0.2, 0.3], [0.5, 0.6, 0.7], [1, 2, 3])
    b = _run(tmp_path, "b", "pgd_at", [1, 2, 3], [0.1, 0.2, 0.3], [0.5, 0.6, 0.7], [1, 2, 3], xi=0.25)
    with pytest.raises(compare.CompareError, match="several radii"):
        compare.main([a, b, "--out", str(tmp_path / "o")])
    assert compare.main([a, b, "--x", "avg_xi0.25", "--out", str(tmp_path / "o")])["n"] == 3
    with pytest.raises(compare.CompareError, match="no column 'worst'"):
        compare.main([a, "--x", "worst", "--out", str(tmp_path / "o")])
    proc = subprocess.run([sys.executable, "-m", "experiments.compare", str(tmp_path / "nope")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a training run directory" in proc.stderr

"""experiments.correlate and robust_flat.stats: tidy table, ES selection, coefficients with bootstrap intervals and
permutation p-values against scipy, the H7 two-segment fit, figures, bad input (no model, no JAX: seconds)."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from typing import Optional, Sequence

import numpy as np
import pytest
from scipy import stats as sps

from experiments import correlate, figures
from robust_flat import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"
FAST = 999  # resamples in the tests (the CLI default is 9999)


# ------------------------------------------------------------------------------------------------ fixtures
def overfitting_curve(epochs: int, minimum_at: int, low: float = 1.5, high: float = 2.5) -> list[float]:
    """Test RLoss per epoch 1..epochs: falls to ``low`` at ``minimum_at``, then rises linearly to ``high``."""
    out = []
    for e in range(1, epochs + 1):
        if e <= minimum_at:
            out.append(low + 1.0 * (minimum_at - e) / max(minimum_at, 1))
        else:
            out.append(low + (high - low) * (e - minimum_at) / max(epochs - minimum_at, 1))
    return out


def make_run(root, label: str, *, method: str = "pgd_at", epochs: int = 10, milestones=(0.4, 0.6, 0.8),
             snapshot_every: int = 2, test_rl: Optional[Sequence[float]] = None,
             train_rl: Optional[Sequence[float]] = None, es: Optional[dict] = None, rloss: Optional[dict] = None,
             avg: Optional[dict] = None, worst: Optional[dict] = None, worst_nu_per: str = "dataset",
             aa: Optional[dict] = None, landscape: Sequence[int] = (), partial_line: bool = False) -> str:
    """A run directory in the formats the entry points write. ``test_rl``/``train_rl``: the training log's robust
    losses for epochs 1..epochs; ``es``: {epoch: es_robust_error}; ``rloss``: {epoch: (test_rloss, test_rerr,
    train_rloss, train_rerr)} (experiments.robust_loss); ``avg``/``worst``: {epoch: flatness}; ``aa``:
    {epoch: AutoAttack RErr}; ``landscape``: epochs with a 1D landscape."""
    d = os.path.join(str(root), label)
    os.makedirs(os.path.join(d, "evaluations"), exist_ok=True)
    os.makedirs(os.path.join(d, "flatness"), exist_ok=True)
    config = {"method": method, "seed": 0, "model": {"name": "small_cnn", "width": 16, "norm": "rebn"},
              "data": {"dataset": "cifar10", "train_examples": 10000}, "train": {"epochs": epochs, "batch_size": 128},
              "optimizer": {"lr": 0.05, "weight_decay": 5e-4, "schedule": "multistep", "milestones": list(milestones)},
              "attack": {"eps": 8 / 255, "steps": 7}, "checkpoint": {"snapshot_every": snapshot_every}}
    if method == "trades":
        config["trades"] = {"beta": 6.0}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    test_rl = list(test_rl) if test_rl is not None else overfitting_curve(epochs, 4)
    train_rl = list(train_rl) if train_rl is not None else [2.5 - 0.1 * e for e in range(1, epochs + 1)]
    es = es if es is not None else {e: 0.6 + 0.01 * abs(e - 4) for e in range(snapshot_every, epochs + 1,
                                                                                   snapshot_every)}
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for e in range(1, epochs + 1):
            rec = {"epoch": e, "step": 10 * e, "train_loss": 1.0, "train_error": 0.3, "train_robust_loss":
                   train_rl[e - 1], "train_robust_error": 0.5, "test_loss": 1.1, "test_error": 0.35,
                   "test_robust_loss": test_rl[e - 1], "test_robust_error": 0.6, "batch_loss": 1.0,
                   "batch_error": 0.3, "grad_norm": 1.0, "time_s": 1.0}
            if e in es:
                rec["es_robust_error"] = es[e]
            f.write(json.dumps(rec) + "\n")
        if partial_line:
            f.write('{"epoch": ')  # the trainer is appending this line right now
    for e, (te, tr, ttr, trr) in (rloss or {}).items():
        for split, loss, err in (("test", te, tr), ("train", ttr, trr)):
            with open(os.path.join(d, "evaluations", f"rloss_{split}_ep{e}.json"), "w") as f:
                json.dump({"kind": "robust_loss", "subset": f"{split}_first1000", "n": 1000, "epoch": e,
                           "snapshot": str(e), "clean_loss": loss / 2, "clean_error": err / 2, "robust_loss": loss,
                           "robust_error": err, "attack": {"name": "pgd", "steps": 20, "restarts": 1,
                                                           "eps": 0.0313725, "step_size": 0.007},
                           "finished": True}, f)
    for e, v in (aa or {}).items():
        name = f"autoattack-standard_linf_eps8-255_test_first1000_n1000_ep{e}"
        with open(os.path.join(d, "evaluations", f"{name}.json"), "w") as f:
            json.dump({"attack": "autoattack", "version": "standard", "robust_error": v, "robust_accuracy": 1 - v,
                       "clean_accuracy": 0.8, "n_examples": 1000, "epoch": e, "snapshot": str(e),
                       "subset": "test_first1000", "finished": True}, f)
        with open(os.path.join(d, "evaluations", f"{name}.examples.json"), "w") as f:
            f.write("[]")
    for e, v in (avg or {}).items():
        with open(os.path.join(d, "flatness", f"avg_xi0.5_ep{e}.json"), "w") as f:
            json.dump({"measure": "average", "loss": "robust", "flatness": v, "reference": 1.0, "perturbed_std": 0.1,
                       "perturbed": [v + 1.0], "n_examples": 1000, "epoch": e, "snapshot": str(e),
                       "subset": "test_first1000",
                       "config": {"neighbourhood": {"xi": 0.5, "granularity": "layer"}, "samples": 10,
                                  "distribution": "ball", "attack": {"steps": 20},
                                  "reference_attack": {"steps": 20, "restarts": 10, "eps": 0.0313725,
                                                       "step_size": 0.007}, "nu_per": "batch"}}, f)
    for e, v in (worst or {}).items():
        with open(os.path.join(d, "flatness", f"worst_xi0.003_ep{e}.json"), "w") as f:
            json.dump({"measure": "worst", "loss": "robust", "flatness": v, "reference": 1.0, "perturbed_std": 0.1,
                       "perturbed": [v + 1.0], "n_examples": 1000, "epoch": e, "snapshot": str(e),
                       "subset": "test_first1000",
                       "config": {"attack": {"neighbourhood": {"xi": 0.003, "granularity": "layer"}, "lr": 0.001,
                                             "steps": 20, "input_attack": {"steps": 20}}, "restarts": 10,
                                  "reference_attack": {"steps": 20, "restarts": 10}, "nu_per": worst_nu_per}}, f)
    for e in landscape:
        s = [-1.0, -0.5, 0.0, 0.5, 1.0]
        kinds = {k: {"aggregate": {m: [1.0 + a * x * x for x in s] for m in ("robust_loss", "clean_loss")},
                     "aggregation": "max" if k == "adversarial" else "mean", "curves": [], "scale": 0.5}
                 for k, a in (("random", 0.5), ("adversarial", 2.0))}
        with open(os.path.join(d, "flatness", f"landscape_ep{e}.json"), "w") as f:
            json.dump({"s": s, "num_examples": 100, "unperturbed": {"robust_loss": 1.0}, "kinds": kinds, "epoch": e,
                       "config": {"steps": 5}}, f)
    return d


def write_grid(root, runs: Sequence[tuple[str, str, str]], settings: Optional[dict] = None) -> None:
    with open(os.path.join(str(root), "grid.json"), "w") as f:
        json.dump({"name": "test", "runs": [{"label": label, "method": method, "group": group}
                                            for label, method, group in runs],
                   "settings": settings or {"scale": "tiny"}}, f)


def grid(tmp_path, n_runs: int = 4):
    """``n_runs`` runs with overfitting of different strength: flatter runs overfit less (ES at epoch 4)."""
    root = tmp_path / "grid"
    runs = []
    for i in range(n_runs):
        method, group = [("pgd_at", "AT"), ("trades", "TRADES"), ("awp", "AWP"), ("mart", "MART")][i % 4]
        label = f"r{i}"
        high = 1.8 + 0.4 * i
        flat_last, flat_es = 0.4 + 0.3 * i + 0.01 * i * i, 0.3 + 0.1 * i
        make_run(root, label, method=method, test_rl=overfitting_curve(10, 4, 1.5, high),
                 rloss={4: (1.6 + 0.05 * i, 0.55 + 0.01 * i, 1.3, 0.45),
                        10: (high + 0.1, 0.6 + 0.02 * i + 0.001 * i * i, 0.9 - 0.05 * i, 0.35)},
                 avg={4: flat_es, 10: flat_last}, worst={4: 2 * flat_es + 0.05 * (i % 2), 10: 3 * flat_last},
                 aa={4: 0.56 + 0.01 * i, 10: 0.6 + 0.02 * i}, landscape=(4, 10) if i == 0 else ())
        runs.append((label, method, group))
    write_grid(root, runs)
    return root


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.correlate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


# ------------------------------------------------------------------------------------------------ table
def test_table_rows_columns_es_and_sources(tmp_path):
    root = tmp_path / "g"
    # ES: smallest es_robust_error, the first one on ties (epochs 4 and 6 tie)
    make_run(root, "a", es={2: 0.7, 4: 0.6, 6: 0.6, 8: 0.65, 10: 0.66}, rloss={4: (1.6, 0.55, 1.3, 0.45)},
             avg={4: 0.3, 10: 0.8}, worst={10: 2.0}, aa={10: 0.61}, partial_line=True)
    make_run(root, "b", method="trades", es={}, avg={10: 0.5})  # no ES information
    runs, table, grid_json, missing = correlate.load([str(root)])
    assert grid_json is None and missing == []
    a, b = runs
    assert (a.es_epoch, a.last_epoch, a.first_decay_epoch) == (4, 10, 4)
    assert b.es_epoch is None and "not known" in b.es_source
    # rows: the snapshot epochs (every 2nd epoch and the last) of each run
    assert [(r["label"], r["epoch"]) for r in table] == [("a", e) for e in (2, 4, 6, 8, 10)] + [
        ("b", e) for e in (2, 4, 6, 8, 10)]
    rows = {(r["label"], r["epoch"]): r for r in table}
    r4, r10 = rows[("a", 4)], rows[("a", 10)]
    assert r4["is_es"] and not r4["is_last"] and r10["is_last"] and not r10["is_es"]
    assert not any(r["is_es"] for r in table if r["label"] == "b")
    assert r4["test_rloss"] == 1.6 and r4["train_rloss"] == 1.3 and r4["gap"] == pytest.approx(0.3)
    assert r4["test_clean_loss"] == pytest.approx(0.8) and r4["test_rerr"] == 0.55
    assert r4["rloss"] == 1.6 and r4["rloss_source"] == "test_rloss"  # robust_loss preferred over the log
    assert r10["rloss_source"] == "test_robust_loss" and r10["rloss"] == r10["test_robust_loss"]
    assert r10["rerr"] == 0.61 and r10["rerr_source"] == "rerr_autoattack-standard"  # AutoAttack preferred
    assert r4["rerr_source"] == "test_rerr"
    assert r10["gap_log"] == pytest.approx(r10["test_robust_loss"] - r10["train_robust_loss"])
    assert r10["worst_xi0.003"] == 2.0 and r10["worst_xi0.003_nu_per"] == "dataset"
    assert r4["avg_xi0.5"] == 0.3 and r4["avg_xi0.5_nu_per"] == "batch"
    assert r4["es_robust_error"] == 0.6

    out = tmp_path / "out"
    correlate.main([str(root), "--out", str(out), "--resamples", "99"])
    with open(out / "table.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert list(csv_rows[0])[:6] == ["label", "method", "group", "epoch", "is_last", "is_es"]
    assert len(csv_rows) == 10 and float(csv_rows[1]["test_rloss"]) == 1.6 and csv_rows[1]["is_es"] == "True"
    saved = json.loads((out / "table.json").read_text())
    assert [(r["label"], r["epoch"], r["is_es"]) for r in saved][:2] == [("a", 2, False), ("a", 4, True)]


def test_grid_json_labels_groups_and_missing_runs(tmp_path):
    root = tmp_path / "g"
    make_run(root, "at", avg={10: 0.5})
    make_run(root, "stray", avg={10: 0.5})  # not in grid.json: not part of the grid
    write_grid(root, [("at", "pgd_at", "AT"), ("never_ran", "trades", "TRADES")])
    runs, table, grid_json, missing = correlate.load([str(root)])
    assert [r.label for r in runs] == ["at"] and runs[0].group == "AT" and missing == ["never_ran"]
    assert grid_json["name"] == "test" and {r["group"] for r in table} == {"AT"}
    # a run directory given alone takes its group from the grid.json next to it
    runs, *_ = correlate.load([str(root / "at")])
    assert runs[0].group == "AT"


# ------------------------------------------------------------------------------------------------ statistics
def test_vectorized_coefficients_equal_scipy():
    rng = np.random.default_rng(0)
    for n in (3, 7, 20):
        x = rng.normal(size=n)
        y = 0.5 * x + rng.normal(size=n)
        y[1] = y[0]  # a tie
        for name in stats.COEFFICIENTS:
            assert stats.VECTORIZED[name](x, y) == pytest.approx(stats.SCIPY[name](x, y).statistic, abs=1e-12)
    batch = rng.normal(size=(5, 9))
    assert np.allclose(stats.kendall(batch, batch[::-1], axis=-1),
                       [sps.kendalltau(a, b).statistic for a, b in zip(batch, batch[::-1])])


def test_correlation_matches_scipy_bootstrap_and_permutation_test():
    rng = np.random.default_rng(3)
    x = rng.normal(size=11)
    y = x + 0.8 * rng.normal(size=11)
    res = stats.correlation(x, y, n_resamples=FAST, seed=7)
    assert res["n"] == 11
    for name in stats.COEFFICIENTS:
        c = res[name]
        fn = stats.SCIPY[name]
        assert c["estimate"] == pytest.approx(fn(x, y).statistic, abs=1e-12)
        assert c["p_scipy"] == pytest.approx(fn(x, y).pvalue, rel=1e-9)
        lo, hi = c["ci"]
        assert lo <= c["estimate"] <= hi and c["ci_method"] == "percentile"
        ref = sps.bootstrap((x, y), lambda a, b: fn(a, b).statistic, paired=True, vectorized=False,
                            n_resamples=FAST, method="percentile", rng=np.random.default_rng(7),
                            batch=stats.resample_batch(11, FAST))
        assert (lo, hi) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high), abs=1e-9)
        perm = sps.permutation_test((x,), lambda a: fn(a, y).statistic, permutation_type="pairings",
                                    vectorized=False, n_resamples=FAST, rng=np.random.default_rng(7),
                                    batch=stats.resample_batch(11, FAST))
        assert c["p_permutation"] == pytest.approx(perm.pvalue, abs=1e-12) and not c["permutation_exact"]
    # another seed gives other resamples (the seed is used)
    other = stats.correlation(x, y, n_resamples=FAST, seed=8)
    assert other["pearson"]["ci"] != res["pearson"]["ci"]
    # few points: an exact permutation test over all 5! pairings
    small = stats.correlation([1, 2, 3, 4, 5], [1, 3, 2, 5, 4], n_resamples=FAST)
    assert small["spearman"]["permutation_exact"] and small["spearman"]["permutations"] == 120
    exact = sps.permutation_test(([1, 2, 3, 4, 5],), lambda a: sps.spearmanr(a, [1, 3, 2, 5, 4]).statistic,
                                 permutation_type="pairings")
    assert small["spearman"]["p_permutation"] == pytest.approx(exact.pvalue)


def test_too_few_or_constant_points_give_a_note_not_a_crash():
    assert stats.correlation([1.0, 2.0], [3.0, 4.0]) == {"n": 2, "note": "2 points: at least 3 are needed for "
                                                                         "a correlation"}
    res = stats.correlation([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0])
    assert res["n"] == 4 and "constant" in res["note"] and "pearson" not in res
    res = stats.correlation([1.0, float("nan"), 2.0, 3.0], [1.0, 2.0, 2.5, 3.5], n_resamples=FAST)
    assert res["n"] == 3  # the pair with a NaN is dropped
    assert "note" in stats.linear_fit([1.0, 2.0], [1.0, 2.0])


def test_two_segment_fit_slopes():
    x_lo = np.linspace(0.5, 2.2, 8)
    x_hi = np.linspace(2.4, 4.5, 9)
    y_lo = 0.3 * x_lo + 0.01 * np.sin(7 * x_lo)  # steep below ln 10
    y_hi = 0.66 + 0.02 * (x_hi - math.log(10)) + 0.005 * np.cos(5 * x_hi)  # flat above
    fit = stats.two_segment_fit(np.r_[x_lo, x_hi], np.r_[y_lo, y_hi])
    assert fit["threshold"] == pytest.approx(math.log(10))
    assert fit["below"]["n"] == 8 and fit["above"]["n"] == 9
    ref_lo, ref_hi = sps.linregress(x_lo, y_lo), sps.linregress(x_hi, y_hi)
    assert fit["below"]["slope"] == pytest.approx(ref_lo.slope) and fit["above"]["slope"] == pytest.approx(ref_hi.slope)
    assert fit["below"]["slope_stderr"] == pytest.approx(ref_lo.stderr)
    assert fit["below"]["slope"] == pytest.approx(0.3, abs=0.02) and fit["above"]["slope"] == pytest.approx(0.02,
                                                                                                            abs=0.01)
    assert fit["slope_difference"] == pytest.approx(ref_lo.slope - ref_hi.slope)
    one_side = stats.two_segment_fit([1.0, 1.5, 2.0, 2.2], [0.1, 0.2, 0.3, 0.35])
    assert one_side["above"]["n"] == 0 and "note" in one_side["above"] and "slope_difference" not in one_side


# ------------------------------------------------------------------------------------------------ analyses
def test_correlations_over_models_runs_gap_and_overfitting(tmp_path):
    root = grid(tmp_path, 5)
    runs, table, _, _ = correlate.load([str(root)])
    corr = correlate.correlations(runs, table, n_resamples=FAST, seed=1)
    assert corr["flatness_columns"] == {"avg": "avg_xi0.5", "worst": "worst_xi0.003",
                                        "all": ["avg_xi0.5", "worst_xi0.003"]}
    res = correlate.find(corr["all_models"], x="avg_xi0.5", target="rloss")
    # one point per model: the last (epoch 10) and ES (epoch 4) snapshot of each run, RLoss of robust_loss files
    assert res["n"] == 10 and res["y"] == "test_rloss" and "robust_loss" in res["y_source"]
    assert sorted((p["label"], p["epoch"], p["kind"]) for p in res["points"])[:2] == [("r0", 4, "es"),
                                                                                      ("r0", 10, "last")]
    xs = [r.value(e, "avg_xi0.5") for r in runs for e in (10, 4)]
    ys = [r.value(e, "test_rloss") for r in runs for e in (10, 4)]
    assert res["pearson"]["estimate"] == pytest.approx(sps.pearsonr(xs, ys).statistic, abs=1e-12)
    assert res["kendall"]["estimate"] == pytest.approx(sps.kendalltau(xs, ys).statistic, abs=1e-12)
    rerr = correlate.find(corr["all_models"], x="avg_xi0.5", target="rerr")
    assert rerr["y"] == "rerr_autoattack-standard"  # AutoAttack where present
    gap = correlate.find(corr["gap"], x="worst_xi0.003")
    gaps = [r.value(e, "test_rloss") - r.value(e, "train_rloss") for r in runs for e in (10, 4)]
    wx = [r.value(e, "worst_xi0.003") for r in runs for e in (10, 4)]
    assert gap["y"] == "gap" and gap["spearman"]["estimate"] == pytest.approx(sps.spearmanr(wx, gaps).statistic)
    over = correlate.find(corr["overfitting"], x="avg_xi0.5")
    assert over["n"] == 5 and over["y"] == "test_rloss (last - ES)"
    assert over["points"][0]["y"] == pytest.approx(runs[0].value(10, "test_rloss") - runs[0].value(4, "test_rloss"))
    per_run = [r for r in corr["per_run"] if r["x"] == "avg_xi0.5"]
    assert len(per_run) == 5 and all(r["n"] == 2 and "note" in r for r in per_run)  # 2 epochs with flatness
    h7 = corr["h7"]
    assert h7["x"] == "test_rloss" and h7["y"] == "test_rerr" and h7["n"] == 10


def test_mixed_sources_use_one_source_per_correlation(tmp_path):
    root = tmp_path / "g"
    for i in range(4):
        # robust_loss results only for two of the four runs: the training log covers every model
        make_run(root, f"r{i}", test_rl=overfitting_curve(10, 4, 1.5, 2 + 0.3 * i),
                 rloss={4: (1.6, 0.5, 1.2, 0.4), 10: (2.1 + 0.3 * i, 0.6, 1.0, 0.3)} if i < 2 else None,
                 avg={4: 0.3, 10: 0.5 + 0.2 * i})
    runs, table, _, _ = correlate.load([str(root)])
    corr = correlate.correlations(runs, table, n_resamples=FAST)
    res = correlate.find(corr["all_models"], x="avg_xi0.5", target="rloss")
    assert res["y"] == "test_robust_loss" and res["n"] == 8 and res["n_without_y"] == 0
    assert "metrics.jsonl" in res["y_source"]


# ------------------------------------------------------------------------------------------------ outputs
def test_cli_writes_correlations_markdown_and_valid_figures(tmp_path, capsys):
    root = grid(tmp_path, 4)
    out = tmp_path / "out"
    correlate.main([str(root), "--out", str(out), "--resamples", "199", "--seed", "3"])
    printed = capsys.readouterr().out
    assert "all_models: avg_xi0.5 vs test_rloss" in printed and "H7" in printed
    corr = json.loads((out / "correlations.json").read_text())
    assert corr["settings"]["n_resamples"] == 199 and corr["settings"]["seed"] == 3
    assert corr["settings"]["ci_method"] == "percentile"
    for name in figures.FILES.values():
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000, name
    md = (out / "table.md").read_text()
    assert md.startswith("| run | method | group |") and "| r0 | pgd_at | AT | 10 / 4 | 60.0 | 56.0 |" in md
    assert "nu_per = dataset" in md
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def test_palette_is_fixed_per_method_and_distinct():
    colours = figures.palette([("AT", "pgd_at"), ("TRADES-6", "trades"), ("TRADES-1", "trades"), ("X", "new")])
    assert colours["AT"] == figures.METHOD_COLOURS["pgd_at"] and colours["TRADES-6"] == figures.METHOD_COLOURS[
        "trades"]
    assert len(set(colours.values())) == 4


def test_no_flatness_yet_is_not_an_error(tmp_path):
    root = tmp_path / "g"
    make_run(root, "a")
    make_run(root, "b")
    out = tmp_path / "out"
    analysis = correlate.main([str(root), "--out", str(out), "--resamples", "99"])
    assert analysis.correlations["all_models"] == [] and "scatter" not in analysis.figures
    assert (out / "curves.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("case", ["missing", "not_a_run", "bad_json", "no_results", "bad_metrics"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case, run_module):
    target = tmp_path / "x"
    if case == "not_a_run":
        target.mkdir()
        (target / "notes.txt").write_text("hello")
    elif case == "bad_json":
        make_run(tmp_path / "g", "a", avg={10: 0.5})
        (tmp_path / "g" / "a" / "flatness" / "avg_xi0.5_ep10.json").write_text("{not json")
        target = tmp_path / "g"
    elif case == "no_results":
        os.makedirs(target / "run")
        (target / "run" / "config.json").write_text(json.dumps({"method": "pgd_at"}))
    elif case == "bad_metrics":
        make_run(tmp_path / "g", "a")
        with open(tmp_path / "g" / "a" / "metrics.jsonl", "a") as f:
            f.write("garbage\n" + json.dumps({"epoch": 11}) + "\n")
        target = tmp_path / "g"
    args = (str(target), "--out", str(tmp_path / "out"))
    # one case as a process; the others run the same __main__ code in this process (no interpreter start-up)
    proc = run_cli(*args) if case == "missing" else run_module("experiments.correlate", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    assert {"missing": "does not exist", "not_a_run": "neither a run directory", "bad_json": "unreadable",
            "no_results": "no results", "bad_metrics": "line 11 is not JSON"}[case] in lines[0]


def test_curves_loss_axis_leaves_the_first_epochs_above_it():
    """The robust-loss axis of the curves spans the values from epoch max(3, last / 10) on, so the first epochs'
    large losses do not flatten the part where overfitting shows; without such outliers it is matplotlib's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments import figures

    fig, ax = plt.subplots()
    pts = [(1, 10.0), (2, 8.0), (3, 2.0), (10, 2.5), (40, 2.2)]
    ax.plot(*zip(*pts))
    figures._loss_range(ax, pts)
    lo, hi = ax.get_ylim()
    assert 2.1 < lo < 2.2 and 2.5 < hi < 2.6  # epochs 10 and 40 (start max(3, 40 / 10) = 4), 10% padding
    assert any("epochs < 4 above the axis" in t.get_text() for t in ax.texts)
    fig2, ax2 = plt.subplots()
    calm = [(1, 2.0), (2, 2.1), (40, 2.2)]
    ax2.plot(*zip(*calm))
    before = ax2.get_ylim()
    figures._loss_range(ax2, calm)
    assert ax2.get_ylim() == before and not ax2.texts
    plt.close("all")

"""Relate flatness to robust generalization across runs and epochs (the paper's central plot).

    python -m experiments.compare runs/at runs/trades6 runs/awp001 [--x avg] [--y rerr] [--out results/compare]

Reads what the other entry points wrote into each run directory, without loading any model:

* ``RUN/metrics.jsonl`` (training): per epoch ``test_robust_loss`` / ``test_robust_error`` (PGD on the fixed test
  subset), ``train_robust_loss``, and their gap ``rloss_gap`` = test - train RLoss (robust overfitting);
* ``RUN/flatness/*.json`` (``experiments.flatness``): one column per measure and radius, ``avg_xi0.5``,
  ``worst_xi0.003``, ``clean_avg_xi0.5``, ... ;
* ``RUN/evaluations/*.json`` (``experiments.evaluate``): ``rerr_<attack>`` (RErr: clean or adversarial error),
  e.g. ``rerr_autoattack-standard``, ``rerr_pgd``.

Rows are (run, epoch). Output in ``--out`` (default ``compare/``): ``table.csv`` and ``table.json`` (all rows and
columns), ``scatter_<x>_vs_<y>.png`` (one colour per run, epochs of a run joined in order, the last epoch marked),
and ``correlation.json`` with Pearson, Spearman and Kendall coefficients over the plotted points (scipy.stats).
A Markdown table and the correlations are printed.

``--x`` picks the flatness column (``avg``/``worst``/``clean_avg``/``clean_worst`` match any radius if only one
was measured; or give the full column name); ``--y`` is ``rerr`` (AutoAttack RErr where measured, else the
training log's PGD robust error on its test subset: the column used is named in the output), ``rloss``
(``test_robust_loss``), ``gap`` (``rloss_gap``), or any column name.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys

from robust_flat.io import atomic_save_figure, atomic_write_json, atomic_write_text


class CompareError(Exception):
    pass


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CompareError(f"{path} is unreadable ({e}); remove it or rerun what wrote it") from None


def _flatness_column(d: dict, path: str) -> str:
    cfg = d.get("config") or {}
    nb = cfg.get("neighbourhood") or (cfg.get("attack") or {}).get("neighbourhood") or {}
    xi = nb.get("xi")
    measure = {"average": "avg", "worst": "worst"}.get(d.get("measure"), d.get("measure"))
    if xi is None or measure is None:
        raise CompareError(f"{path} is not a flatness result of experiments.flatness (no measure or xi)")
    prefix = "clean_" if d.get("loss") == "clean" else ""
    return f"{prefix}{measure}_xi{xi:g}"


def _attack_column(d: dict) -> str:
    name = d.get("attack") or "attack"
    if d.get("version"):
        name += f"-{d['version']}"
    return f"rerr_{name}"


def collect(run_dir: str) -> dict[int, dict]:
    """``{epoch: {column: value}}`` for one run directory."""
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        raise CompareError(f"{run_dir} is not a training run directory (no config.json); pass directories written "
                           "by python -m experiments.cifar10_at")
    rows: dict[int, dict] = {}
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(metrics):
        with open(metrics) as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise CompareError(f"{metrics}: line {i + 1} is not JSON") from None
                if not isinstance(rec, dict) or rec.get("epoch") is None:
                    raise CompareError(f"{metrics}: line {i + 1} has no epoch; is this a training run's metrics?")
                row = rows.setdefault(int(rec["epoch"]), {})
                for k in ("test_robust_loss", "test_robust_error", "train_robust_loss", "test_error"):
                    if k in rec:
                        row[k] = rec[k]
                if "test_robust_loss" in rec and "train_robust_loss" in rec:
                    row["rloss_gap"] = rec["test_robust_loss"] - rec["train_robust_loss"]
    for path in sorted(glob.glob(os.path.join(run_dir, "flatness", "*.json"))):
        d = _read_json(path)
        if "flatness" not in d or d.get("epoch") is None:
            continue
        rows.setdefault(int(d["epoch"]), {})[_flatness_column(d, path)] = d["flatness"]
    for path in sorted(glob.glob(os.path.join(run_dir, "evaluations", "*.json"))):
        if path.endswith(".examples.json"):
            continue
        d = _read_json(path)
        if "robust_error" not in d or d.get("epoch") is None or not d.get("finished", True):
            continue
        rows.setdefault(int(d["epoch"]), {})[_attack_column(d)] = d["robust_error"]
    return rows


def build_table(run_dirs, labels=None) -> list[dict]:
    labels = labels or [os.path.basename(os.path.normpath(r)) for r in run_dirs]
    if len(labels) != len(run_dirs):
        raise CompareError(f"{len(labels)} labels for {len(run_dirs)} runs")
    table = []
    for label, run_dir in zip(labels, run_dirs):
        rows = collect(run_dir)  # checks that run_dir is a run directory
        method = _read_json(os.path.join(run_dir, "config.json")).get("method")
        for epoch, row in sorted(rows.items()):
            table.append({"run": label, "method": method, "epoch": epoch, **row})
    return table


def resolve_column(table, name: str, kind: str) -> str:
    columns = sorted({k for row in table for k in row})
    if name in columns:
        return name
    if kind == "x":
        matches = [c for c in columns if c.startswith(f"{name}_xi")]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise CompareError(f"--x {name} matches several radii {matches}; give one of them")
    else:
        if name == "rloss":
            return "test_robust_loss"
        if name == "gap":
            return "rloss_gap"
        if name == "rerr":
            aa = [c for c in columns if c.startswith("rerr_autoattack")]
            if len(aa) == 1:
                return aa[0]
            if len(aa) > 1:
                raise CompareError(f"--y rerr matches several AutoAttack versions {aa}; give one of them")
            if "test_robust_error" in columns:
                return "test_robust_error"
    raise CompareError(f"no column {name!r} in these runs; columns: {', '.join(columns)}")


def correlations(xs, ys) -> dict:
    from scipy import stats

    if len(xs) < 3:
        return {"n": len(xs), "note": "fewer than 3 points: no correlation"}
    out = {"n": len(xs)}
    for name, fn in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr), ("kendall", stats.kendalltau)):
        r = fn(xs, ys)
        out[name] = {"r": float(r[0]), "p": float(r[1])}
    return out


def scatter(table, x: str, y: str, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.5))
    for i, run in enumerate(dict.fromkeys(r["run"] for r in table)):
        pts = [(r[x], r[y], r["epoch"]) for r in table if r["run"] == run and x in r and y in r]
        if not pts:
            continue
        colour = f"C{i % 10}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colour, alpha=0.6, ms=4, label=run)
        ax.plot(pts[-1][0], pts[-1][1], "*", color=colour, ms=12)
        ax.annotate(f"{pts[-1][2]}", (pts[-1][0], pts[-1][1]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7, color=colour)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{y} vs {x}\none point per epoch; star: last epoch (labelled)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(path, fig, dpi=150)
    plt.close(fig)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="training run directories")
    p.add_argument("--labels", default=None, help="comma-separated names for the runs (default: directory names)")
    p.add_argument("--x", default="avg", help="flatness column (avg, worst, clean_avg, clean_worst or a full name)")
    p.add_argument("--y", default="rerr", help="rerr | rloss | gap | a column name")
    p.add_argument("--out", default="compare", help="output directory")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    table = build_table(args.runs, labels)
    if not table:
        raise CompareError("these runs have no metrics, flatness or evaluation results yet")
    x, y = resolve_column(table, args.x, "x"), resolve_column(table, args.y, "y")
    pts = [(r[x], r[y]) for r in table if x in r and y in r
           and all(isinstance(v, (int, float)) and math.isfinite(v) for v in (r[x], r[y]))]
    if not pts:
        raise CompareError(f"no (run, epoch) has both {x} and {y}: run experiments.flatness / experiments.evaluate "
                           "on the same snapshots")
    os.makedirs(args.out, exist_ok=True)
    columns = ["run", "method", "epoch"] + sorted({k for r in table for k in r} - {"run", "method", "epoch"})
    csv = "\n".join([",".join(columns)] + [",".join(_fmt(r.get(c)) for c in columns) for r in table]) + "\n"
    atomic_write_text(os.path.join(args.out, "table.csv"), csv)
    atomic_write_json(os.path.join(args.out, "table.json"), table, indent=2)
    corr = {"x": x, "y": y, **correlations([a for a, _ in pts], [b for _, b in pts])}
    atomic_write_json(os.path.join(args.out, "correlation.json"), corr, indent=2)
    plot = os.path.join(args.out, f"scatter_{x}_vs_{y}.png")
    scatter(table, x, y, plot)

    shown = ["run", "method", "epoch", x, y]
    print("| " + " | ".join(shown) + " |\n|" + "---|" * len(shown))
    for r in table:
        if x in r and y in r:
            print("| " + " | ".join(_fmt(r.get(c)) for c in shown) + " |")
    if "pearson" in corr:
        print(f"\n{len(pts)} points: Pearson r = {corr['pearson']['r']:.3f} (p {corr['pearson']['p']:.3g}), "
              f"Spearman rho = {corr['spearman']['r']:.3f} (p {corr['spearman']['p']:.3g}), "
              f"Kendall tau = {corr['kendall']['r']:.3f}")
    else:
        print(f"\n{corr['note']}")
    print(f"-> {args.out}/table.csv, table.json, correlation.json, {os.path.basename(plot)}")
    return corr


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

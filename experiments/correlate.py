"""Relate flatness to robust generalization over trained runs: tidy table, correlations with intervals, figures.

    python -m experiments.correlate ROOT_OR_RUN_DIR... [--out DIR] [--resamples 9999] [--seed 0]
        [--confidence 0.95] [--ci-method percentile|BCa]

Arguments: grid roots (``ROOT/grid.json`` lists the runs as ``ROOT/<label>/``; without it every subdirectory with a
``config.json`` is a run) or run directories. Only files are read, never a model:

* ``RUN/config.json`` (method, schedule: the first learning-rate decay) and ``RUN/metrics.jsonl`` (per-epoch train
  and test robust loss/error with the training attack on a fixed subset; ``es_robust_error`` at snapshot epochs:
  the early-stopped (ES) model is the snapshot with the smallest one, the first on ties);
* ``RUN/evaluations/rloss_*.json`` (``experiments.robust_loss``): the paper's RLoss/RErr (PGD-20) per snapshot,
  columns ``test_rloss``, ``test_rerr``, ``test_clean_loss``, ``test_clean_error``, ``train_rloss``, ... and the
  robust generalization gap ``gap`` = ``test_rloss - train_rloss``;
* ``RUN/evaluations/*.json`` (``experiments.evaluate``): ``rerr_autoattack-standard``, ``rerr_pgd``, ...;
* ``RUN/flatness/*.json`` (``experiments.flatness``): ``avg_xi0.5``, ``worst_xi0.003``, ``clean_avg_xi0.5``, ...,
  each with ``<column>_nu_per`` (``dataset``: one weight perturbation for the whole evaluation set, updated after
  every batch, as the released code; ``batch``: one per batch); ``landscape*.json``: 1D loss landscapes.

Rows are (run, snapshot epoch) with flags ``is_last`` and ``is_es`` and the preferred ``rloss``/``rerr`` (with
``rloss_source``/``rerr_source``: robust_loss files over the training log; AutoAttack over PGD for RErr). Every
correlation uses one source for all its points: the most preferred one that covers all points, else the one that
covers the most (the points it lacks are dropped and counted).

Correlations (Pearson, Spearman, Kendall; paired bootstrap CI and permutation p-value, :mod:`robust_flat.stats`):
(a) ``all_models``: one point per model (each run's last and ES snapshot), flatness vs test RLoss and RErr;
(a') ``robust_models``: the same over the runs that gained some robustness, when some did not (``at_chance``: RErr at
the last epoch at least 1 - 1/C, what a constant prediction gets; such a run has no robust generalization to relate,
and its extreme loss and flatness alone can make a correlation); (b) ``per_run``: each run over its snapshot epochs (claim H3); (c) ``gap``: flatness vs test - train RLoss over all
models; (d) ``overfitting``: last-epoch flatness vs last - ES test RLoss, one point per run; and ``h7``: RErr against
RLoss, separate lines below and above ln 10.

Output in ``--out`` (default ``correlate/``), each file written atomically: ``table.csv``, ``table.json``,
``correlations.json``, ``table.md`` and the figures ``scatter_rloss_vs_flatness.png``, ``curves.png``,
``es_vs_last.png``, ``landscapes.png`` (each where its data exists). Bad input: one line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import io
import json
import math
import os
import re
import sys
from typing import Any, Callable, Optional, Sequence

from robust_flat import stats
from robust_flat.io import atomic_write_json, atomic_write_text

LOG = "metrics.jsonl"
LOG_COLUMNS = ("train_loss", "train_error", "train_robust_loss", "train_robust_error", "test_loss", "test_error",
               "test_robust_loss", "test_robust_error", "es_robust_error")
AA_VERSIONS = ("standard", "standard_nosquare", "fast")  # preference for the RErr of a model
PAPER_XI = {"avg": 0.5, "worst": 0.003}
FLATNESS_COLUMN = re.compile(r"^(clean_)?(avg|worst)_xi[0-9.e+-]+(\[(batch|dataset)\])?$")


class CorrelateError(Exception):
    """Bad input: reported as one line on stderr with exit status 2."""


# ------------------------------------------------------------------------------------------------ reading
def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorrelateError(f"{path} is unreadable ({e}); remove it or rerun what wrote it") from None


def _number(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _read_log(path: str) -> dict[int, dict]:
    """``metrics.jsonl`` as ``{epoch: record}`` (a later record of an epoch replaces an earlier one; a last line
    without its newline is a record still being written and is skipped)."""
    records: dict[int, dict] = {}
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CorrelateError(f"{path} is unreadable ({e})") from None
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # no trailing newline: the trainer is appending this line right now
                continue
            raise CorrelateError(f"{path}: line {i + 1} is not JSON") from None
        if not isinstance(rec, dict) or _number(rec.get("epoch")) is None:
            raise CorrelateError(f"{path}: line {i + 1} has no epoch; is this a training run's metrics.jsonl?")
        records[int(rec["epoch"])] = rec
    return dict(sorted(records.items()))


def _flatness_column(d: dict, path: str) -> tuple[str, dict]:
    """Column name and settings of one ``experiments.flatness`` result."""
    cfg = d.get("config") or {}
    measure = {"average": "avg", "worst": "worst"}.get(d.get("measure"), d.get("measure"))
    if measure == "avg":
        nb = cfg.get("neighbourhood") or {}
        inner = (cfg.get("attack") or {}) if isinstance(cfg.get("attack"), dict) else {}
        setting = {"samples": cfg.get("samples"), "distribution": cfg.get("distribution"),
                   "inner_pgd_steps": inner.get("steps")}
    elif measure == "worst":
        att = cfg.get("attack") or {}
        nb = att.get("neighbourhood") or {}
        setting = {"restarts": cfg.get("restarts"), "weight_lr": att.get("lr"), "iterations": att.get("steps")}
    else:
        raise CorrelateError(f"{path} is not a flatness result of experiments.flatness (measure {measure!r})")
    xi = _number(nb.get("xi"))
    if xi is None:
        raise CorrelateError(f"{path} is not a flatness result of experiments.flatness (no xi)")
    ref = cfg.get("reference_attack") or {}
    setting.update(xi=xi, granularity=nb.get("granularity"), nu_per=cfg.get("nu_per"),
                   reference_pgd=f"{ref.get('steps')}x{ref.get('restarts')}" if ref else None,
                   eps=ref.get("eps"), step_size=ref.get("step_size"),  # of every input attack of the measure
                   n_examples=d.get("n_examples"), subset=d.get("subset"))
    prefix = "clean_" if d.get("loss") == "clean" else ""
    return f"{prefix}{measure}_xi{xi:g}", setting


@dataclasses.dataclass
class Run:
    """What one run directory holds (files only)."""

    label: str
    path: str
    method: str
    group: str
    config: dict
    log: dict[int, dict]                     # metrics.jsonl: epoch -> record
    rows: dict[int, dict]                    # snapshot epoch -> columns
    last_epoch: Optional[int]
    es_epoch: Optional[int]
    es_source: str
    landscapes: list[dict]                   # {"epoch", "file", "s", "kinds"}
    settings: dict[str, list[dict]]          # column -> distinct settings of the files behind it
    skipped: list[str]                       # result files not used, with the reason

    @property
    def epochs(self) -> int:
        return int(((self.config.get("train") or {}).get("epochs")) or 0)

    @property
    def complete(self) -> bool:
        return self.last_epoch is not None and self.epochs > 0 and self.last_epoch >= self.epochs

    @property
    def first_decay_epoch(self) -> Optional[int]:
        """Epoch of the first learning-rate decay of a multistep schedule (milestones are fractions of training;
        values above 1 are read as epochs); ``None`` for other schedules."""
        opt = self.config.get("optimizer") or {}
        milestones = opt.get("milestones") or ()
        if opt.get("schedule", "multistep") != "multistep" or not milestones or not self.epochs:
            return None
        first = min(float(m) for m in milestones)
        return int(round(first * self.epochs)) if first <= 1 else int(first)

    def value(self, epoch: Optional[int], column: str) -> Optional[float]:
        if epoch is None:
            return None
        return _number(self.rows.get(epoch, {}).get(column))


def _add_setting(settings: dict[str, list[dict]], column: str, setting: dict) -> None:
    if setting not in settings.setdefault(column, []):
        settings[column].append(setting)


def _read_evaluations(run_dir: str, rows: dict[int, dict], settings: dict, skipped: list[str],
                      snapshots: dict[str, set]) -> None:
    for path in sorted(glob.glob(os.path.join(run_dir, "evaluations", "*.json"))):
        if path.endswith(".examples.json"):
            continue
        d = _read_json(path)
        name = os.path.basename(path)
        if not isinstance(d, dict) or _number(d.get("epoch")) is None:
            skipped.append(f"{name}: no epoch")
            continue
        if not d.get("finished", True):
            skipped.append(f"{name}: not finished")
            continue
        epoch = int(d["epoch"])
        snapshots.setdefault(str(d.get("snapshot")), set()).add(epoch)
        row = rows.setdefault(epoch, {})
        if d.get("kind") == "robust_loss" or (name.startswith("rloss_") and "robust_loss" in d):
            split = "train" if str(d.get("subset", "test")).startswith("train") else "test"
            n = d.get("n") or 0
            if (row.get(f"{split}_rloss_n") or 0) > n:
                skipped.append(f"{name}: a result on more examples exists for epoch {epoch}")
                continue
            for key, col in (("robust_loss", "rloss"), ("robust_error", "rerr"), ("clean_loss", "clean_loss"),
                             ("clean_error", "clean_error")):
                if _number(d.get(key)) is not None:
                    row[f"{split}_{col}"] = float(d[key])
            row[f"{split}_rloss_n"] = n
            att = d.get("attack") or {}
            _add_setting(settings, f"{split}_rloss", {
                "subset": d.get("subset"), "n": n, "attack": att.get("name", "pgd"), "steps": att.get("steps"),
                "restarts": att.get("restarts"), "eps": att.get("eps"), "step_size": att.get("step_size")})
        elif _number(d.get("robust_error")) is not None and isinstance(d.get("attack"), str):
            col = "rerr_" + d["attack"] + (f"-{d['version']}" if d.get("version") else "")
            row[col] = float(d["robust_error"])
            if _number(d.get("clean_accuracy")) is not None:
                row[col.replace("rerr_", "clean_error_", 1)] = 1.0 - float(d["clean_accuracy"])
            _add_setting(settings, col, {"subset": d.get("subset"), "n": d.get("n_examples"),
                                         "eps": d.get("eps_text", d.get("eps")), "norm": d.get("norm")})
        else:
            skipped.append(f"{name}: neither a robust_loss nor an experiments.evaluate result")


def _read_flatness(run_dir: str, rows: dict[int, dict], settings: dict, skipped: list[str],
                   snapshots: dict[str, set]) -> list[dict]:
    landscapes = []
    for path in sorted(glob.glob(os.path.join(run_dir, "flatness", "*.json"))):
        d = _read_json(path)
        name = os.path.basename(path)
        if not isinstance(d, dict):
            skipped.append(f"{name}: not a JSON object")
            continue
        if "kinds" in d and "s" in d:  # experiments/landscape.py (flatness --measure landscape)
            if _number(d.get("epoch")) is not None:
                landscapes.append({"epoch": int(d["epoch"]), "file": name, "s": d["s"], "kinds": d["kinds"],
                                   "num_examples": d.get("num_examples"), "config": d.get("config") or {}})
            continue
        if "flatness" not in d:
            continue  # Hessian spectra, landscape surfaces: not used here
        if _number(d.get("epoch")) is None or _number(d.get("flatness")) is None:
            skipped.append(f"{name}: no epoch or flatness value")
            continue
        epoch = int(d["epoch"])
        snapshots.setdefault(str(d.get("snapshot")), set()).add(epoch)
        col, setting = _flatness_column(d, path)
        row = rows.setdefault(epoch, {})
        nu_per = setting.get("nu_per")
        if col in row and row.get(f"{col}_nu_per") != nu_per:
            col = f"{col}[{nu_per}]"  # the other variant of the same measure at the same epoch
        row[col] = float(d["flatness"])
        row[f"{col}_nu_per"] = nu_per
        if _number(d.get("perturbed_std")) is not None:
            row[f"{col}_std"] = float(d["perturbed_std"])
        if _number(d.get("reference")) is not None:
            row[f"{col}_reference"] = float(d["reference"])
        _add_setting(settings, col, setting)
    return sorted(landscapes, key=lambda r: r["epoch"])


def load_run(run_dir: str, label: Optional[str] = None, entry: Optional[dict] = None) -> Run:
    """Read one run directory (``entry``: its ``grid.json`` record, for the method group)."""
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        raise CorrelateError(f"{run_dir} is not a training run directory (no config.json); pass run directories "
                             "written by python -m experiments.cifar10_at or their grid root")
    config = _read_json(os.path.join(run_dir, "config.json"))
    if not isinstance(config, dict):
        raise CorrelateError(f"{run_dir}/config.json is not a training config (not a JSON object)")
    entry = entry or {}
    label = label or os.path.basename(os.path.normpath(run_dir))
    method = str(config.get("method") or entry.get("method") or "unknown")
    group = str(entry.get("group") or method)
    log_path = os.path.join(run_dir, LOG)
    log = _read_log(log_path) if os.path.isfile(log_path) else {}
    rows: dict[int, dict] = {}
    settings: dict[str, list[dict]] = {}
    skipped: list[str] = []
    snapshots: dict[str, set] = {}
    _read_evaluations(run_dir, rows, settings, skipped, snapshots)
    landscapes = _read_flatness(run_dir, rows, settings, skipped, snapshots)

    last = max(log) if log else (max(snapshots["last"]) if snapshots.get("last") else (max(rows) if rows else None))
    snapshot_every = int(((config.get("checkpoint") or {}).get("snapshot_every")) or 0)
    es_scores = [(e, _number(r.get("es_robust_error"))) for e, r in log.items()]
    es_scores = [(e, v) for e, v in es_scores if v is not None]
    if es_scores:
        i = stats.first_argmin([v for _, v in es_scores])
        es_epoch, es_source = es_scores[i][0], "smallest es_robust_error in metrics.jsonl"
    elif snapshots.get("best"):
        es_epoch, es_source = min(snapshots["best"]), "the 'best' snapshot of the result files"
    else:
        es_epoch, es_source = None, "not known (no es_robust_error in metrics.jsonl, no 'best' snapshot results)"
    for e, rec in log.items():  # snapshot epochs of the training log
        if "es_robust_error" in rec or (snapshot_every and e % snapshot_every == 0) or e == last:
            rows.setdefault(e, {})
    for e, row in rows.items():
        rec = log.get(e, {})
        for k in LOG_COLUMNS:
            if _number(rec.get(k)) is not None:
                row[k] = float(rec[k])
        derive(row)
    return Run(label=label, path=run_dir, method=method, group=group, config=config, log=log,
               rows=dict(sorted(rows.items())), last_epoch=last, es_epoch=es_epoch, es_source=es_source,
               landscapes=landscapes, settings=settings, skipped=skipped)


def find_runs(paths: Sequence[str]) -> tuple[list[tuple[str, str, dict]], Optional[dict], list[str]]:
    """``([(label, run_dir, grid entry)], grid.json of the (first) root or None, labels in grid.json without a
    directory)`` for run directories and grid roots."""
    found: list[tuple[str, str, dict]] = []
    grid, missing = None, []
    for path in paths:
        if not os.path.isdir(path):
            raise CorrelateError(f"{path} does not exist or is not a directory")
        if os.path.isfile(os.path.join(path, "config.json")):
            parent_grid = os.path.join(os.path.dirname(os.path.abspath(path)), "grid.json")
            label = os.path.basename(os.path.normpath(path))
            entry = {}
            if os.path.isfile(parent_grid):
                g = _read_json(parent_grid)
                entry = next((r for r in (g.get("runs") or []) if isinstance(r, dict) and r.get("label") == label),
                             {}) if isinstance(g, dict) else {}
            found.append((label, path, entry))
            continue
        grid_path = os.path.join(path, "grid.json")
        if os.path.isfile(grid_path):
            g = _read_json(grid_path)
            if not isinstance(g, dict) or not isinstance(g.get("runs"), list):
                raise CorrelateError(f"{grid_path} has no 'runs' list")
            grid = grid if grid is not None else g
            for r in g["runs"]:
                if not isinstance(r, dict) or not r.get("label"):
                    raise CorrelateError(f"{grid_path}: a run without a label: {r!r}")
                run_dir = os.path.join(path, str(r["label"]))
                if os.path.isfile(os.path.join(run_dir, "config.json")):
                    found.append((str(r["label"]), run_dir, r))
                else:
                    missing.append(str(r["label"]))
            continue
        subdirs = sorted(d for d in glob.glob(os.path.join(path, "*")) if os.path.isfile(os.path.join(d,
                                                                                                     "config.json")))
        if not subdirs:
            raise CorrelateError(f"{path} is neither a run directory (no config.json) nor a grid root (no grid.json "
                                 "and no subdirectory with a config.json)")
        found.extend((os.path.basename(d), d, {}) for d in subdirs)
    labels = [f[0] for f in found]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise CorrelateError(f"two runs are named {', '.join(dup)}; pass each run once")
    if not found:
        raise CorrelateError(f"no run directories in {', '.join(paths)} (the runs of grid.json do not exist yet)")
    return found, grid, missing


# ------------------------------------------------------------------------------------------------ table
def flatness_columns(table: Sequence[dict]) -> list[str]:
    return sorted({k for r in table for k in r if FLATNESS_COLUMN.match(k)})


def primary_column(table: Sequence[dict], measure: str) -> Optional[str]:
    """The robust-loss flatness column of ``measure`` ("avg"/"worst") used in the figures: the paper's radius if
    measured, else the radius measured on most rows (the first in name order on ties)."""
    cols = [c for c in flatness_columns(table) if c.startswith(f"{measure}_xi") and "[" not in c]
    if not cols:
        return None
    paper = f"{measure}_xi{PAPER_XI[measure]:g}"
    if paper in cols:
        return paper
    return sorted(cols, key=lambda c: (-sum(c in r for r in table), c))[0]


def _aa_columns(columns: set) -> list[str]:
    aa = [f"rerr_autoattack-{v}" for v in AA_VERSIONS if f"rerr_autoattack-{v}" in columns]
    return aa + sorted(c for c in columns if c.startswith("rerr_autoattack") and c not in aa)


def rerr_candidates(columns: set) -> list[str]:
    """RErr columns by preference: AutoAttack (standard, standard_nosquare, fast, others), experiments.evaluate's
    PGD (``rerr_pgd``), experiments.robust_loss's PGD-20 (``test_rerr``), the training log's ``test_robust_error``."""
    rest = sorted(c for c in columns if c.startswith("rerr_") and not c.startswith("rerr_autoattack")
                  and c != "rerr_pgd")
    return _aa_columns(columns) + [c for c in ("rerr_pgd",) if c in columns] + rest + ["test_rerr",
                                                                                        "test_robust_error"]


RLOSS_CANDIDATES = ("test_rloss", "test_robust_loss")
GAP_CANDIDATES = ("gap", "gap_log")


def describe(column: str) -> str:
    """Where the numbers of a column come from, in words."""
    fixed = {
        "test_rloss": "test RLoss, PGD of experiments.robust_loss (evaluations/rloss_*.json)",
        "train_rloss": "train RLoss, PGD of experiments.robust_loss (evaluations/rloss_*.json)",
        "test_rerr": "test RErr, PGD of experiments.robust_loss (evaluations/rloss_*.json)",
        "test_robust_loss": "test RLoss of the training log (metrics.jsonl: the training attack on the per-epoch "
                            "test subset)",
        "test_robust_error": "test RErr of the training log (metrics.jsonl: the training attack on the per-epoch "
                             "test subset)",
        "gap": "test - train RLoss, experiments.robust_loss",
        "gap_log": "test - train RLoss of the training log (metrics.jsonl)",
        "rerr_pgd": "RErr, PGD-20 with restarts of experiments.evaluate",
    }
    if column in fixed:
        return fixed[column]
    if column.endswith(" (last - ES)"):
        return describe(column[:-len(" (last - ES)")]) + ": last minus early-stopped epoch"
    if column.startswith("rerr_autoattack-"):
        return f"RErr, AutoAttack {column[len('rerr_autoattack-'):]} (experiments.evaluate)"
    if column.startswith("rerr_"):
        return f"RErr, {column[5:]} (experiments.evaluate)"
    return column


def derive(row: dict) -> None:
    """Add the gaps (``gap`` of the robust_loss files, ``gap_log`` of the training log) and the preferred ``rloss``
    and ``rerr`` with their source columns to one row."""
    if "test_rloss" in row and "train_rloss" in row:
        row["gap"] = row["test_rloss"] - row["train_rloss"]
    if "test_robust_loss" in row and "train_robust_loss" in row:
        row["gap_log"] = row["test_robust_loss"] - row["train_robust_loss"]
    for name, candidates in (("rloss", RLOSS_CANDIDATES), ("rerr", rerr_candidates(set(row)))):
        col = next((c for c in candidates if _number(row.get(c)) is not None), None)
        if col is not None:
            row[name], row[f"{name}_source"] = row[col], col


def build_table(runs: Sequence[Run]) -> list[dict]:
    """One row per (run, snapshot epoch): identifiers and flags, then the run's columns (:func:`derive`)."""
    table = []
    for run in runs:
        for epoch, cols in run.rows.items():
            row: dict[str, Any] = {"label": run.label, "method": run.method, "group": run.group, "epoch": epoch,
                                   "is_last": epoch == run.last_epoch, "is_es": epoch == run.es_epoch}
            row.update(cols)
            table.append(row)
    return table


HEAD = ("label", "method", "group", "epoch", "is_last", "is_es", "rloss", "rloss_source", "rerr", "rerr_source",
        "test_rloss", "test_rerr", "test_clean_loss", "test_clean_error", "train_rloss", "train_rerr",
        "train_clean_loss", "train_clean_error", "gap", "gap_log")


def table_columns(table: Sequence[dict]) -> list[str]:
    present = {k for r in table for k in r}
    flat = flatness_columns(table)
    flat_extra = sorted(k for k in present if any(k.startswith(f + "_") for f in flat) and k not in flat)
    head = [c for c in HEAD if c in present or c in HEAD[:6]]
    rest = sorted(present - set(head) - set(flat) - set(flat_extra))
    return head + flat + flat_extra + rest


def table_csv(table: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = table_columns(table)
    w.writerow(cols)
    for r in table:
        w.writerow(["" if r.get(c) is None else (f"{r[c]:.10g}" if isinstance(r.get(c), float) else r[c])
                    for c in cols])
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ analyses
@dataclasses.dataclass
class Point:
    run: Run
    epoch: int
    kind: str  # "last", "es", "last=es", "epoch" or "run"


def model_points(runs: Sequence[Run]) -> list[Point]:
    """The paper's "all models": each run's last and early-stopped snapshot (one point when they coincide)."""
    pts = []
    for run in runs:
        if run.last_epoch is not None:
            pts.append(Point(run, run.last_epoch, "last=es" if run.es_epoch == run.last_epoch else "last"))
        if run.es_epoch is not None and run.es_epoch != run.last_epoch:
            pts.append(Point(run, run.es_epoch, "es"))
    return pts


def at_chance(runs: Sequence[Run], columns: set) -> list[tuple[Run, float, str]]:
    """The runs whose robust test error at the last epoch is at least 1 - 1/C (C classes; a constant prediction's
    robust error): ``(run, RErr, column)``, RErr from the most preferred source the run has."""
    out = []
    for run in runs:
        classes = int((run.config.get("model") or {}).get("num_classes") or 10)
        for col in rerr_candidates(columns):
            v = run.value(run.last_epoch, col)
            if v is not None:
                if v >= 1 - 1 / classes:
                    out.append((run, v, col))
                break
    return out


def _choose(points: Sequence[Point], candidates: Sequence[tuple[str, Callable[[Point], Any]]]):
    """The candidate source for the points: the most preferred one with a value for every point, else the one with
    the most values (preference breaks ties). Returns ``(name, values)`` or ``(None, [])``."""
    best = None
    for name, fn in candidates:
        values = [fn(p) for p in points]
        have = sum(v is not None for v in values)
        if have == len(points) and have:
            return name, values
        if have and (best is None or have > best[2]):
            best = (name, values, have)
    return (best[0], best[1]) if best else (None, [])


def _correlate(points: Sequence[Point], x: str, y_candidates: Sequence[tuple[str, Callable]], scope: dict,
               options: dict) -> dict:
    with_x = [p for p in points if p.run.value(p.epoch, x) is not None]
    y, ys = _choose(with_x, y_candidates)
    kept = [(p, v) for p, v in zip(with_x, ys) if v is not None]
    out = {**scope, "x": x, "y": y, "y_source": describe(y) if y else None, "n_without_x": len(points) - len(with_x),
           "n_without_y": len(with_x) - len(kept),
           "points": [{"label": p.run.label, "group": p.run.group, "epoch": p.epoch, "kind": p.kind,
                       "x": p.run.value(p.epoch, x), "y": v} for p, v in kept]}
    out.update(stats.correlation([pt["x"] for pt in out["points"]], [pt["y"] for pt in out["points"]], **options))
    if y is None:
        out["note"] = f"no y values for the {len(with_x)} points with {x}"
    return out


def _column(col: str) -> tuple[str, Callable[[Point], Optional[float]]]:
    return col, lambda p: p.run.value(p.epoch, col)


def _overfitting(col: str) -> tuple[str, Callable[[Point], Optional[float]]]:
    def fn(p: Point) -> Optional[float]:
        last, es = p.run.value(p.run.last_epoch, col), p.run.value(p.run.es_epoch, col)
        return None if last is None or es is None else last - es
    return f"{col} (last - ES)", fn


def h7_fit(runs: Sequence[Run]) -> dict:
    """RErr against RLoss on all snapshot rows, both from one source: the PGD of experiments.robust_loss where at
    least 3 rows have it (the rows without are left out), else the training log; separate least-squares lines
    below and above ln 10."""
    points = [Point(r, e, "epoch") for r in runs for e in r.rows]
    cols: tuple[Optional[str], Optional[str]] = (None, None)
    kept: list = []
    for a, b in (("test_rloss", "test_rerr"), ("test_robust_loss", "test_robust_error")):
        pairs = [(p, (p.run.value(p.epoch, a), p.run.value(p.epoch, b))) for p in points]
        pairs = [(p, v) for p, v in pairs if None not in v]
        if len(pairs) >= 3 or (pairs and not kept):
            cols, kept = (a, b), pairs
            if len(pairs) >= 3:
                break
    out = {"x": cols[0], "y": cols[1], "source": describe(cols[0]) if cols[0] else None,
           "points": [{"label": p.run.label, "group": p.run.group, "epoch": p.epoch, "x": v[0], "y": v[1]}
                      for p, v in kept]}
    out.update(stats.two_segment_fit([pt["x"] for pt in out["points"]], [pt["y"] for pt in out["points"]]))
    return out


def correlations(runs: Sequence[Run], table: Sequence[dict], *, n_resamples: int = stats.DEFAULT_RESAMPLES,
                 seed: int = 0, confidence_level: float = 0.95, ci_method: str = "percentile") -> dict:
    """Every correlation of the module docstring plus the H7 fit, as one JSON-ready dict."""
    options = dict(n_resamples=n_resamples, seed=seed, confidence_level=confidence_level, ci_method=ci_method)
    columns = {k for r in table for k in r}
    robust_flat = [c for c in flatness_columns(table) if not c.startswith("clean_")]
    pts = model_points(runs)
    rloss = [_column(c) for c in RLOSS_CANDIDATES]
    out: dict[str, Any] = {
        "settings": {**options, "coefficients": list(stats.COEFFICIENTS),
                     "bootstrap": f"paired resampling of the points, {ci_method} interval (scipy.stats.bootstrap)",
                     "permutation": "two-sided, x shuffled against y: scipy.stats.permutation_test with "
                                    "permutation_type='pairings', exact when n! <= resamples"},
        "flatness_columns": {"avg": primary_column(table, "avg"), "worst": primary_column(table, "worst"),
                             "all": robust_flat},
        "all_models": [], "robust_models": [], "per_run": [], "gap": [], "overfitting": []}
    chance = at_chance(runs, columns)
    out["at_chance"] = [{"label": r.label, "rerr": v, "source": col} for r, v, col in chance]
    robust_pts = [p for p in pts if p.run not in [r for r, _, _ in chance]]
    for x in robust_flat:
        for what, cands in (("rloss", rloss), ("rerr", [_column(c) for c in rerr_candidates(columns)])):
            out["all_models"].append(_correlate(pts, x, cands, {"scope": "all_models", "target": what}, options))
            if chance:
                out["robust_models"].append(_correlate(robust_pts, x, cands,
                                                       {"scope": "robust_models", "target": what}, options))
        out["gap"].append(_correlate(pts, x, [_column(c) for c in GAP_CANDIDATES], {"scope": "gap", "target": "gap"},
                                     options))
        run_pts = [Point(r, r.last_epoch, "run") for r in runs if r.last_epoch is not None]
        out["overfitting"].append(_correlate(run_pts, x, [_overfitting(c) for c in RLOSS_CANDIDATES],
                                             {"scope": "overfitting", "target": "last - ES test RLoss"}, options))
        for run in runs:
            epochs = [Point(run, e, "epoch") for e in run.rows]
            out["per_run"].append(_correlate(epochs, x, rloss, {"scope": "per_run", "label": run.label,
                                                                "group": run.group, "target": "rloss"}, options))
    out["h7"] = h7_fit(runs)
    return out


def find(results: Sequence[dict], **match) -> Optional[dict]:
    """The first analysis in ``results`` whose fields equal ``match``."""
    return next((r for r in results if all(r.get(k) == v for k, v in match.items())), None)


# ------------------------------------------------------------------------------------------------ markdown table
def fmt(v: Any, digits: int = 3, percent: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{100 * v:.1f}" if percent else f"{v:.{digits}f}"
    return str(v)


def main_table(runs: Sequence[Run], table: Sequence[dict]) -> str:
    """Markdown table in the style of the paper's main table: per run, RErr and test RLoss of the last and the
    early-stopped model, and average- and worst-case flatness."""
    columns = {k for r in table for k in r}
    aa = _aa_columns(columns)
    rerr_col = aa[0] if aa else None
    avg, worst = primary_column(table, "avg"), primary_column(table, "worst")
    head = ["run", "method", "group", "epochs (last / ES)",
            f"RErr % {'AA ' + rerr_col.split('-', 1)[1] if rerr_col else '(no AutoAttack)'} last", "ES",
            "test RLoss last", "ES", f"{avg or 'avg'} last", "ES", f"{worst or 'worst'} last", "ES"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    log_marked = False
    for run in runs:
        def rl(epoch):
            nonlocal log_marked
            v = run.value(epoch, "test_rloss")
            if v is None and run.value(epoch, "test_robust_loss") is not None:
                log_marked = True
                return fmt(run.value(epoch, "test_robust_loss")) + "†"
            return fmt(v)
        cells = [run.label, run.method, run.group, f"{fmt(run.last_epoch)} / {fmt(run.es_epoch)}"]
        cells += [fmt(run.value(run.last_epoch, rerr_col), percent=True) if rerr_col else "–",
                  fmt(run.value(run.es_epoch, rerr_col), percent=True) if rerr_col else "–",
                  rl(run.last_epoch), rl(run.es_epoch)]
        for col in (avg, worst):
            cells += [fmt(run.value(run.last_epoch, col)) if col else "–",
                      fmt(run.value(run.es_epoch, col)) if col else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "RLoss: " + describe("test_rloss") + "."]
    if log_marked:
        notes.append("† no robust_loss result for this snapshot: " + describe("test_robust_loss") + ".")
    if worst:
        variants = sorted({str(r.get(f"{worst}_nu_per")) for r in table if worst in r})
        notes.append(f"{worst}: nu_per = {', '.join(variants)} (dataset: one weight perturbation for the whole "
                     "evaluation set, updated after every batch, as the released code; batch: one per batch).")
    notes.append("– : not measured.")
    return "\n".join(lines + notes) + "\n"


# ------------------------------------------------------------------------------------------------ driver
@dataclasses.dataclass
class Analysis:
    runs: list[Run]
    table: list[dict]
    correlations: dict
    grid: Optional[dict]
    missing: list[str]
    colours: dict[str, str]
    figures: dict[str, str]          # figure name -> file name in out
    out: str


def load(paths: Sequence[str]) -> tuple[list[Run], list[dict], Optional[dict], list[str]]:
    """``(runs, table, grid.json or None, labels of grid.json without a directory)``; raises
    :class:`CorrelateError` when there are no results at all."""
    found, grid, missing = find_runs(paths)
    runs = [load_run(d, label, entry) for label, d, entry in found]
    table = build_table(runs)
    if not any(len(r) > 6 for r in table):
        raise CorrelateError(f"no results in {', '.join(paths)} yet: no metrics.jsonl records and no evaluation or "
                             "flatness results")
    return runs, table, grid, missing


def analyse(paths: Sequence[str], out: str, *, n_resamples: int = stats.DEFAULT_RESAMPLES, seed: int = 0,
            confidence_level: float = 0.95, ci_method: str = "percentile", figures: bool = True) -> Analysis:
    """Read the runs, compute every correlation and write the table, ``correlations.json``, ``table.md`` and (with
    ``figures``) the figures into ``out``."""
    from experiments import figures as plots

    runs, table, grid, missing = load(paths)
    corr = correlations(runs, table, n_resamples=n_resamples, seed=seed, confidence_level=confidence_level,
                        ci_method=ci_method)
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, "table.csv"), table_csv(table))
    atomic_write_json(os.path.join(out, "table.json"), [{c: r.get(c) for c in table_columns(table) if c in r}
                                                        for r in table], indent=1)
    atomic_write_json(os.path.join(out, "correlations.json"), corr, indent=1)
    atomic_write_text(os.path.join(out, "table.md"), main_table(runs, table))
    analysis = Analysis(runs=runs, table=table, correlations=corr, grid=grid, missing=missing,
                        colours=plots.palette([(r.group, r.method) for r in runs]), figures={}, out=out)
    if figures:
        analysis.figures = plots.write_all(analysis, out)
    return analysis


def _coefficients_line(res: dict) -> str:
    if "pearson" not in res:
        return f"n={res['n']}: {res.get('note', 'no correlation')}"
    parts = []
    for name, sym in (("pearson", "r"), ("spearman", "rho"), ("kendall", "tau")):
        c = res[name]
        lo, hi = c["ci"]
        parts.append(f"{name} {sym}={c['estimate']:.3f} [{fmt(lo)}, {fmt(hi)}] p_perm={c['p_permutation']:.3g}")
    return f"n={res['n']}: " + "; ".join(parts)


def summary(analysis: Analysis) -> list[str]:
    corr = analysis.correlations
    lines = [f"{len(analysis.runs)} runs, {len(analysis.table)} (run, snapshot) rows; ES epochs: "
             + ", ".join(f"{r.label} {fmt(r.es_epoch)}/{fmt(r.last_epoch)}" for r in analysis.runs)]
    if analysis.missing:
        lines.append(f"runs of grid.json without a directory: {', '.join(analysis.missing)}")
    if corr.get("at_chance"):
        lines.append("at chance (RErr >= 1 - 1/C at the last epoch; left out of robust_models): "
                     + ", ".join(f"{c['label']} ({c['rerr']:.1%})" for c in corr["at_chance"]))
    for res in corr["all_models"] + corr.get("robust_models", []) + corr["gap"] + corr["overfitting"]:
        lines.append(f"{res['scope']}: {res['x']} vs {res['y'] or res['target']}: {_coefficients_line(res)}")
    h7 = corr["h7"]
    segs = []
    for side in ("below", "above"):
        s = h7[side]
        segs.append(f"{side} ln10: n={s['n']} " + (f"slope {s['slope']:.3f} ± {s['slope_stderr']:.3f}"
                                                    if "slope" in s else s.get("note", "")))
    lines.append(f"H7 RErr vs RLoss ({h7['x']}): " + "; ".join(segs))
    if not corr["flatness_columns"]["all"]:
        lines.append("no flatness results: run python -m experiments.flatness on the snapshots")
    lines.append(f"-> {analysis.out}: table.csv, table.json, correlations.json, table.md"
                 + "".join(f", {f}" for f in analysis.figures.values()))
    return lines


def build_parser(prog: str = "python -m experiments.correlate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="grid roots or run directories")
    p.add_argument("--out", default="correlate", help="output directory (default: correlate/)")
    add_statistics_options(p)
    return p


def add_statistics_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resamples", type=int, default=stats.DEFAULT_RESAMPLES,
                   help="bootstrap and permutation resamples (default 9999)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling (default 0)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--ci-method", choices=stats.CI_METHODS, default="percentile",
                   help="bootstrap interval (default percentile)")


def analyse_args(paths: Sequence[str], args: argparse.Namespace) -> Analysis:
    """:func:`analyse` of ``paths`` into ``args.out`` with the options of :func:`add_statistics_options` (checked:
    ``--resamples`` >= 1, ``--confidence`` in (0, 1), else :class:`CorrelateError`)."""
    if args.resamples < 1 or not 0 < args.confidence < 1:
        raise CorrelateError("--resamples must be >= 1 and --confidence in (0, 1)")
    return analyse(paths, args.out, n_resamples=args.resamples, seed=args.seed, confidence_level=args.confidence,
                   ci_method=args.ci_method)


def run_main(main: Callable[[Sequence[str]], Any]) -> None:
    """``python -m`` of this module and of ``experiments.report``: ``main`` on the command line; a
    :class:`CorrelateError` (bad input) is one line ``error: ...`` on stderr and exit status 2."""
    try:
        main(sys.argv[1:])
    except CorrelateError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv: Optional[Sequence[str]] = None) -> Analysis:
    args = build_parser().parse_args(argv)
    analysis = analyse_args(args.paths, args)
    print("\n".join(summary(analysis)))
    return analysis


if __name__ == "__main__":
    run_main(main)

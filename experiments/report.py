"""The reproduction report of a grid: ``python -m experiments.report ROOT [--out docs/reproduction]``.

Runs the analysis of :mod:`experiments.correlate` on ``ROOT`` (a grid root with ``grid.json``, or any directory of
run directories; several may be given) and writes ``REPORT.md`` into ``--out`` with the figures, ``table.csv``,
``table.json`` and ``correlations.json`` next to it (relative links; every file written atomically). The report
states the scale and the settings (grid, runs' configs, evaluation and flatness settings, library versions), the
main table, the figures, every coefficient with its interval, and for each of the paper's claims H1, H2, H3, H6,
H7 and H11 a verdict -- "shows", "partly", "does not show" or "not measured" -- decided by the numeric rule the
report states next to it (``RULES``), with the numbers behind it. A weak or absent effect is a finding and is
reported as such. Paths outside the repository are never written into the report. Bad input: one line on stderr,
exit status 2.

The small result files the analysis read (config.json, metrics.jsonl, the evaluation and flatness summaries) are
copied to ``OUT/results/`` (``--no-archive``: not), so ``python -m experiments.report OUT/results --out OUT``
regenerates the report on a machine that does not have the runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
from typing import Any, Optional, Sequence

from experiments import correlate
from experiments.correlate import Analysis, Run, find, fmt
from robust_flat import stats
from robust_flat.io import atomic_write_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERDICTS = ("shows", "partly", "does not show", "not measured")
H1_TOLERANCE = 0.02  # nats: smallest rise of test RLoss counted as robust overfitting
PAPER = {"H1": "AT: final test RLoss 3.91 vs 1.53 at the early-stopped epoch; RErr (AutoAttack) 62.8% vs 54.6%",
         "H6": "Pearson 0.85 / Spearman 0.87 for average-case flatness; Pearson 0.54 for worst-case flatness"}
TITLES = {
    "H1": "Robust overfitting: after the first learning-rate decay, test RLoss rises while train RLoss keeps falling",
    "H2": "Flatness worsens during robust overfitting",
    "H3": "Across the epochs of a run, test RLoss and flatness move together",
    "H6": "Across all models, test RLoss is positively correlated with average-case flatness",
    "H7": "RErr against RLoss has a kink at ln 10: steeper below than above",
    "H11": "Early stopping improves robustness and flatness where it helps",
}
RULES = {
    "H1": (f"Per adversarially trained run (method other than `clean`), over the epochs from the first learning-rate "
           f"decay on: m = the epoch of minimal test RLoss. The run *shows* robust overfitting when test RLoss at the "
           f"last epoch exceeds its minimum by more than {H1_TOLERANCE} and train RLoss at the last epoch is below "
           f"its value at m; *partly* when test RLoss rises but train RLoss does not fall; *does not show* when the "
           f"rise is at most {H1_TOLERANCE}. Series: the robust_loss results where they cover at least 3 epochs "
           f"from the decay on, else the training log (shown beside them where they are used, not counted). "
           f"Verdict: *shows* if every measured run shows, *does not show* if none shows or partly shows, else "
           f"*partly*; *not measured* without a run with 2 epochs after the decay."),
    "H2": ("Per adversarially trained run whose early-stopped (ES) epoch comes before its last epoch (the ES "
           "criterion saw robust error rise), and per flatness measure (average- and worst-case): flatness at the "
           "last epoch vs at the ES epoch (without ES information: the snapshot of minimal test RLoss). *shows* if "
           "flatness is larger (worse) at the last epoch for every such (run, measure), *partly* for some, *does not "
           "show* for none, *not measured* without such a pair."),
    "H3": ("Per run and flatness measure with at least 3 snapshot epochs that have both flatness and test RLoss: "
           "Spearman's rho across the epochs. *shows* if rho > 0 for every (run, measure), *partly* for some, *does "
           "not show* for none, *not measured* without such a run."),
    "H6": ("Over all models (each run's last and early-stopped snapshot) that gained some robustness (runs whose robust "
           "test error at the last epoch is at least 1 - 1/C, what a constant prediction gets, are left out and "
           "listed), test RLoss against average-case flatness: "
           "*shows* if Pearson's r > 0 with the lower end of its bootstrap interval > 0 and Spearman's rho > 0; "
           "*partly* if r > 0 or rho > 0 otherwise; *does not show* if both are <= 0; *not measured* with fewer than "
           "3 models. The worst-case coefficients are reported next to it."),
    "H7": ("Least-squares lines of test RErr against test RLoss (all snapshot rows) for RLoss < ln 10 and RLoss >= "
           "ln 10 (ln 10 = 2.303). *shows* if the slope below exceeds the slope above by more than twice the "
           "standard error of the difference, *partly* if it exceeds it by less, *does not show* if it does not "
           "exceed it, *not measured* if a side has fewer than 3 points."),
    "H11": ("Per run whose ES epoch comes before its last epoch and where early stopping helps (RErr at ES < RErr at "
            "the last epoch, AutoAttack where both are measured, else PGD), and per flatness measure: is the ES "
            "model flatter? *shows* if it is for every such (run, measure), *partly* for some, *does not show* for "
            "none, *not measured* without such a pair."),
}


@dataclasses.dataclass
class Verdict:
    claim: str
    verdict: str
    summary: str                 # one line: the numbers behind the verdict
    details: list[str]           # Markdown lines (a table or bullets)

    def __post_init__(self):
        assert self.verdict in VERDICTS, self.verdict


def _count_verdict(hits: int, total: int) -> str:
    if total == 0:
        return "not measured"
    return "shows" if hits == total else ("partly" if hits else "does not show")


def _at_like(run: Run) -> bool:
    return run.method != "clean"


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(str(c) for c in r) + " |" for r in rows]


# ------------------------------------------------------------------------------------------------ H1
def overfitting_series(run: Run, source: Optional[str] = None) -> tuple[str, list[int], list[float], list[float]]:
    """``(source, epochs, test RLoss, train RLoss)`` from the first learning-rate decay on (the whole run without a
    decay): the robust_loss results if they cover at least 3 such epochs, else the training log (``source``:
    ``correlate.LOG`` for the training log whatever the results cover)."""
    start = run.first_decay_epoch or 0
    epochs = [e for e in run.rows if e >= start and run.value(e, "test_rloss") is not None
              and run.value(e, "train_rloss") is not None]
    if len(epochs) >= 3 and source != correlate.LOG:
        return ("robust_loss", epochs, [run.value(e, "test_rloss") for e in epochs],
                [run.value(e, "train_rloss") for e in epochs])
    epochs = [e for e, r in run.log.items() if e >= start and correlate._number(r.get("test_robust_loss")) is not None
              and correlate._number(r.get("train_robust_loss")) is not None]
    return (correlate.LOG, epochs, [float(run.log[e]["test_robust_loss"]) for e in epochs],
            [float(run.log[e]["train_robust_loss"]) for e in epochs])


def _overfits(epochs: list[int], test: list[float], train: list[float]) -> dict:
    if len(epochs) < 2:
        return {"verdict": "not measured", "note": f"{len(epochs)} epoch(s) from the first decay on"}
    m = stats.first_argmin(test)
    rise, fall = test[-1] - test[m], train[m] - train[-1]
    return {"min_epoch": epochs[m], "min": test[m], "last_epoch": epochs[-1], "last": test[-1], "rise": rise,
            "train_at_min": train[m], "train_last": train[-1],
            "verdict": "does not show" if rise <= H1_TOLERANCE else ("shows" if fall > 0 else "partly")}


def h1_run(run: Run) -> dict:
    """The H1 numbers and verdict of one run; where they come from the robust_loss results, ``log`` holds the same
    from the per-epoch training log (denser in epochs, fewer images and the training attack)."""
    source, epochs, test, train = overfitting_series(run)
    out: dict[str, Any] = {"label": run.label, "source": source, "decay": run.first_decay_epoch,
                           **_overfits(epochs, test, train)}
    if source != correlate.LOG:
        out["log"] = _overfits(*overfitting_series(run, correlate.LOG)[1:])
    return out


def h1(analysis: Analysis) -> Verdict:
    runs = [r for r in analysis.runs if _at_like(r)]
    res = [h1_run(r) for r in runs]
    measured = [r for r in res if r["verdict"] != "not measured"]
    shows = sum(r["verdict"] == "shows" for r in measured)
    some = sum(r["verdict"] in ("shows", "partly") for r in measured)
    verdict = ("not measured" if not measured else "shows" if shows == len(measured)
               else "does not show" if some == 0 else "partly")
    def row(label, decay, source, r):
        return [label, fmt(decay), source, fmt(r.get("min_epoch")), fmt(r.get("min")), fmt(r.get("last_epoch")),
                fmt(r.get("last")), fmt(r.get("rise")), fmt(r.get("train_at_min")), fmt(r.get("train_last")),
                r["verdict"] + (f" ({r['note']})" if r.get("note") else "")]

    head = ["run", "first decay", "source", "min epoch", "min test RLoss", "last epoch", "last test RLoss", "rise",
            "train RLoss at min", "train RLoss last", "run verdict"]
    details = _table(head, [row(r["label"], r["decay"], r["source"], r) for r in res])
    summary = f"{shows} of {len(measured)} measured adversarially trained runs show robust overfitting"
    if len(measured) < len(runs):
        summary += f" ({len(runs) - len(measured)} not measured)"
    logs = [r for r in res if "log" in r and r["log"]["verdict"] != "not measured"]
    if logs:  # the same rule on the training log, for the runs whose verdict used the robust_loss results
        log_shows = sum(r["log"]["verdict"] == "shows" for r in logs)
        details += ["", f"The same rule on the training log's per-epoch curves ({correlate.LOG}: every epoch, on the "
                    "trainer's evaluation images with its attack; not part of the verdict), for the runs above whose "
                    f"series are the robust_loss results: {log_shows} of {len(logs)} show robust overfitting.",
                    ""] + _table(head, [row(r["label"], r["decay"], correlate.LOG, r["log"]) for r in logs])
        summary += f" ({log_shows} of {len(logs)} in the per-epoch training log)"
    return Verdict("H1", verdict, summary, details)


# ------------------------------------------------------------------------------------------------ H2, H11
def _flat_columns(analysis: Analysis) -> list[tuple[str, str]]:
    fc = analysis.correlations["flatness_columns"]
    return [(name, fc[name]) for name in ("avg", "worst") if fc[name]]


def _reference_epoch(run: Run, column: str) -> tuple[Optional[int], str]:
    if run.es_epoch is not None:
        return run.es_epoch, "ES"
    epochs = [e for e in run.rows if run.value(e, column) is not None and e != run.last_epoch
              and run.value(e, "rloss") is not None]
    i = stats.first_argmin([run.value(e, "rloss") for e in epochs])
    return (epochs[i], "min RLoss") if i is not None else (None, "")


def h2(analysis: Analysis) -> Verdict:
    rows, hits, total = [], 0, 0
    for run in analysis.runs:
        if not _at_like(run) or run.last_epoch is None:
            continue
        for name, col in _flat_columns(analysis):
            ref, kind = _reference_epoch(run, col)
            if ref is None or ref == run.last_epoch:
                continue
            f_ref, f_last = run.value(ref, col), run.value(run.last_epoch, col)
            if f_ref is None or f_last is None:
                rows.append([run.label, col, f"{kind} {ref}", fmt(f_ref), fmt(f_last), "–", "not measured"])
                continue
            total += 1
            hits += f_last > f_ref
            rows.append([run.label, col, f"{kind} {ref}", fmt(f_ref), fmt(f_last), fmt(f_last - f_ref),
                         "worse at last" if f_last > f_ref else "not worse"])
    summary = (f"flatness is worse at the last epoch in {hits} of {total} (run, measure) pairs with an earlier "
               "ES epoch" if total else "no run has flatness at both an earlier ES epoch and its last epoch")
    details = _table(["run", "measure", "reference epoch", "flatness at reference", "flatness last", "change",
                      "result"], rows) if rows else []
    return Verdict("H2", _count_verdict(hits, total), summary, details)


def _rerr_pair(run: Run, columns: set) -> tuple[Optional[str], Optional[float], Optional[float]]:
    for col in correlate.rerr_candidates(columns):
        es, last = run.value(run.es_epoch, col), run.value(run.last_epoch, col)
        if es is not None and last is not None:
            return col, es, last
    return None, None, None


def h11(analysis: Analysis) -> Verdict:
    columns = {k for r in analysis.table for k in r}
    rows, hits, total, helped, not_helped = [], 0, 0, 0, []
    for run in analysis.runs:
        if run.es_epoch is None or run.last_epoch is None or run.es_epoch == run.last_epoch:
            continue
        col, es, last = _rerr_pair(run, columns)
        if col is None:
            continue
        if not es < last:
            not_helped.append(f"{run.label} (RErr {fmt(es, percent=True)}% at ES vs {fmt(last, percent=True)}% last)")
            continue
        helped += 1
        for name, fcol in _flat_columns(analysis):
            f_es, f_last = run.value(run.es_epoch, fcol), run.value(run.last_epoch, fcol)
            if f_es is None or f_last is None:
                continue
            total += 1
            hits += f_es < f_last
            rows.append([run.label, col, fmt(es, percent=True), fmt(last, percent=True), fcol, fmt(f_es),
                         fmt(f_last), "flatter at ES" if f_es < f_last else "not flatter at ES"])
    summary = (f"where early stopping lowers RErr ({helped} runs), the ES model is flatter in {hits} of {total} "
               "(run, measure) pairs" if total else "no run where early stopping lowers RErr has flatness at both "
               "epochs")
    details = _table(["run", "RErr source", "RErr % ES", "RErr % last", "measure", "flatness ES", "flatness last",
                      "result"], rows) if rows else []
    if not_helped:
        details.append("")
        details.append("Early stopping did not lower RErr for: " + ", ".join(not_helped) + ".")
    return Verdict("H11", _count_verdict(hits, total), summary, details)


# ------------------------------------------------------------------------------------------------ H3, H6, H7
def _ci(c: dict) -> str:
    lo, hi = c["ci"]
    return f"[{fmt(lo, 2)}, {fmt(hi, 2)}]"


def _coef(res: Optional[dict], name: str) -> str:
    if not res or name not in res:
        return "–"
    c = res[name]
    return f"{c['estimate']:.2f} {_ci(c)}, p {c['p_permutation']:.2g}"


def h3(analysis: Analysis) -> Verdict:
    rows, hits, total = [], 0, 0
    cols = dict((col, name) for name, col in _flat_columns(analysis))
    for res in analysis.correlations["per_run"]:
        if res["x"] not in cols:
            continue
        if "spearman" not in res:
            rows.append([res["label"], res["x"], res["n"], "–", res.get("note", "")])
            continue
        total += 1
        rho = res["spearman"]["estimate"]
        hits += rho > 0
        rows.append([res["label"], res["x"], res["n"], _coef(res, "spearman"), "rho > 0" if rho > 0 else "rho <= 0"])
    summary = (f"Spearman's rho > 0 in {hits} of {total} (run, measure) pairs with at least 3 epochs"
               if total else "no run has flatness and test RLoss at 3 or more snapshot epochs")
    details = _table(["run", "measure", "epochs", "Spearman rho [95% CI], permutation p", "result"], rows) \
        if rows else []
    return Verdict("H3", _count_verdict(hits, total), summary, details)


def h6(analysis: Analysis) -> Verdict:
    corr = analysis.correlations
    fc = corr["flatness_columns"]
    chance = corr.get("at_chance") or []
    # the verdict is taken over the models that gained some robustness: a run at chance has no robust
    # generalization to relate, and its extreme loss and flatness alone can make a correlation
    scope = "robust_models" if chance else "all_models"
    avg = find(corr[scope], x=fc["avg"], target="rloss") if fc["avg"] else None
    worst = find(corr[scope], x=fc["worst"], target="rloss") if fc["worst"] else None
    rows = []
    for group, title in (("all_models", "all"), ("robust_models", "above chance")):
        for col in (fc["avg"], fc["worst"]):
            res = find(corr.get(group, []), x=col, target="rloss") if col else None
            if res:
                rows.append([title, res["x"], res["y"] or "–", res["n"], _coef(res, "pearson"),
                             _coef(res, "spearman"), _coef(res, "kendall")])
    details = _table(["models", "flatness", "test RLoss", "n", "Pearson r [95% CI], p", "Spearman rho",
                      "Kendall tau"], rows) if rows else []
    if chance:
        details += ["", "At chance (robust test error at the last epoch at least 1 - 1/C, what a constant prediction "
                    "gets), left out of the verdict: " + ", ".join(f"{c['label']} ({c['rerr']:.1%})"
                                                                  for c in chance) + "."]
    if not avg or "pearson" not in avg:
        n = avg["n"] if avg else 0
        return Verdict("H6", "not measured", f"{n} models with average-case flatness and test RLoss"
                       + (f" ({avg['note']})" if avg and avg.get("note") else ""), details)
    r, rho = avg["pearson"]["estimate"], avg["spearman"]["estimate"]
    lo = avg["pearson"]["ci"][0]
    if r > 0 and lo is not None and lo > 0 and rho > 0:
        verdict = "shows"
    elif r > 0 or rho > 0:
        verdict = "partly"
    else:
        verdict = "does not show"
    summary = (f"Pearson r = {r:.2f} {_ci(avg['pearson'])}, Spearman rho = {rho:.2f} {_ci(avg['spearman'])} over "
               f"{avg['n']} models" + (" above chance" if chance else ""))
    if worst and "pearson" in worst:
        summary += (f"; worst-case Pearson r = {worst['pearson']['estimate']:.2f} {_ci(worst['pearson'])}, "
                    f"Spearman rho = {worst['spearman']['estimate']:.2f} {_ci(worst['spearman'])}")
    if chance:
        full = find(corr["all_models"], x=fc["avg"], target="rloss")
        if full and "pearson" in full:
            summary += (f" (with the {len(chance)} run(s) at chance, {', '.join(c['label'] for c in chance)}: "
                        f"{full['n']} models, Pearson r = {full['pearson']['estimate']:.2f} {_ci(full['pearson'])}, "
                        f"Spearman rho = {full['spearman']['estimate']:.2f})")
    return Verdict("H6", verdict, summary, details)


def h7(analysis: Analysis) -> Verdict:
    fit = analysis.correlations["h7"]
    rows = []
    for side, label in (("below", "RLoss < ln 10"), ("above", "RLoss >= ln 10")):
        s = fit[side]
        rows.append([label, s["n"], fmt(s.get("slope")), fmt(s.get("slope_stderr")), fmt(s.get("intercept")),
                     s.get("note", "")])
    details = _table(["segment", "points", "slope", "standard error", "intercept", "note"], rows)
    details += ["", f"RLoss: {fit['source'] or '–'}; RErr from the same evaluation ({fit['y'] or '–'})."]
    if "slope_difference" not in fit:
        sides = ", ".join(f"{fit[s]['n']} {'below' if s == 'below' else 'at or above'}" for s in ("below", "above"))
        return Verdict("H7", "not measured", f"a side of ln 10 has fewer than 3 points ({sides})", details)
    d, se = fit["slope_difference"], fit["slope_difference_stderr"]
    verdict = "shows" if d > 2 * se else ("partly" if d > 0 else "does not show")
    summary = (f"slope below ln 10 {fit['below']['slope']:.3f} ± {fit['below']['slope_stderr']:.3f}, above "
               f"{fit['above']['slope']:.3f} ± {fit['above']['slope_stderr']:.3f} (difference {d:.3f} ± {se:.3f})")
    return Verdict("H7", verdict, summary, details)


def verdicts(analysis: Analysis) -> list[Verdict]:
    return [h1(analysis), h2(analysis), h3(analysis), h6(analysis), h7(analysis), h11(analysis)]


# ------------------------------------------------------------------------------------------------ settings
def safe_path(path: str) -> str:
    """``path`` relative to the repository if it lies inside it, else only its name, marked as outside."""
    full = os.path.abspath(path)
    if full == REPO or full.startswith(REPO + os.sep):
        return os.path.relpath(full, REPO)
    return f"<{os.path.basename(os.path.normpath(full)) or 'root'}> (outside the repository)"


def _sanitize(value: Any) -> Any:
    """Absolute paths in a free-form dict replaced by :func:`safe_path`."""
    if isinstance(value, dict):
        return {k: _sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sanitize(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value) and len(value) > 1:
        return safe_path(value)
    return value


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "scipy", "matplotlib"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _get(d: dict, dotted: str) -> Any:
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _run_row(run: Run) -> list[str]:
    c = run.config
    model = "/".join(str(v) for v in (_get(c, "model.name"), _get(c, "model.width") or "default width",
                                      _get(c, "model.norm")) if v is not None)
    data = f"{_get(c, 'data.dataset')}, {_get(c, 'data.train_examples') or 'all'} train"
    ms = _get(c, "optimizer.milestones") or []
    sched = (f"{_get(c, 'optimizer.schedule') or 'multistep'} at "
             + ", ".join(str(int(round(m * run.epochs)) if m <= 1 else m) for m in ms) if ms
             else str(_get(c, "optimizer.schedule")))
    eps = _get(c, "attack.eps")
    attack = f"PGD-{_get(c, 'attack.steps')}, eps {eps * 255:.3g}/255" if isinstance(eps, (int, float)) else "–"
    block = c.get(run.method) if isinstance(c.get(run.method), dict) else {}
    epochs = f"{fmt(run.last_epoch)} / {run.epochs or '–'}" + ("" if run.complete else " (incomplete)")
    return [run.label, run.method, run.group, model, data, epochs, str(_get(c, "train.batch_size")),
            f"{_get(c, 'optimizer.lr')} / {_get(c, 'optimizer.weight_decay')}", sched, attack,
            ", ".join(f"{k} {v}" for k, v in block.items()) or "–", str(_get(c, "checkpoint.snapshot_every")),
            fmt(run.es_epoch) + ("" if run.es_epoch is not None else " (unknown)")]


def _setting_text(setting: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in setting.items() if v is not None)


def settings_section(analysis: Analysis, roots: Sequence[str]) -> list[str]:
    g = analysis.grid or {}
    lines = ["## Scale and settings", ""]
    description = f" -- {g['description']}" if g.get("description") else ""
    lines.append(f"Grid: **{g.get('name', 'no grid.json')}**{description}; root: "
                 f"{', '.join(safe_path(r) for r in roots)}; {len(analysis.runs)} runs, {len(analysis.table)} "
                 "(run, snapshot) rows.")
    for key in ("settings", "measures"):
        if g.get(key):
            lines += ["", f"Grid {key} (from grid.json):", "", "```json",
                      json.dumps(_sanitize(g[key]), indent=1, sort_keys=True, default=str), "```"]
    if analysis.missing:
        lines += ["", f"Runs of grid.json without a run directory (not trained yet): {', '.join(analysis.missing)}."]
    lines += ["", "Runs (from each run's config.json):", ""]
    lines += _table(["run", "method", "group", "model", "data", "epochs done / planned", "batch", "lr / wd",
                     "schedule (decay epochs)", "training attack", "method settings", "snapshot every", "ES epoch"],
                    [_run_row(r) for r in analysis.runs])
    merged: dict[str, list[dict]] = {}
    for run in analysis.runs:
        for col, settings in run.settings.items():
            for s in settings:
                if s not in merged.setdefault(col, []):
                    merged[col].append(s)
    if merged:
        lines += ["", "Evaluation and flatness settings (from the result files; n = evaluation examples):", ""]
        for col in sorted(merged):
            lines.append(f"- `{col}`: " + "; ".join(_setting_text(s) for s in merged[col]))
        worst = [c for c in merged if c.startswith("worst_xi")]
        if worst:
            lines += ["", "nu_per of worst-case flatness: `dataset` = one weight perturbation for the whole "
                      "evaluation set, updated after every batch (as the released code); `batch` = one per batch. "
                      "The variant of each number is the `nu_per` above and the `<column>_nu_per` column of "
                      "table.csv."]
    skipped = [f"{r.label}: {s}" for r in analysis.runs for s in r.skipped]
    if skipped:
        lines += ["", f"Result files not used ({len(skipped)}): " + "; ".join(skipped[:20])
                  + (" ..." if len(skipped) > 20 else "")]
    es_sources = sorted({r.es_source for r in analysis.runs})
    lines += ["", "Early-stopped (ES) model: " + "; ".join(es_sources) + "."]
    lines += ["", "Library versions of the environment that wrote this report: "
              + ", ".join(f"{k} {v}" for k, v in library_versions().items()) + "."]
    return lines


# ------------------------------------------------------------------------------------------------ rendering
FIGURE_TEXT = {
    "scatter": "Test RLoss (top) and RErr (bottom) against average- and worst-case flatness, one point per model "
               "(last: filled, early-stopped: hollow), least-squares line, coefficients with 95% intervals.",
    "curves": "Per run: train and test robust loss over epochs, flatness of the snapshots on the right axis, the "
              "first learning-rate decay and the ES epoch (H1, H2).",
    "es_vs_last": "Early-stopped (hollow) vs last (filled) model per run: test RLoss, RErr and flatness (H11).",
    "landscapes": "1D robust-loss landscapes along random (mean) and adversarial (max) directions.",
}


def coefficients_section(analysis: Analysis) -> list[str]:
    corr = analysis.correlations
    s = corr["settings"]
    lines = ["## Correlations", "",
             f"Pearson, Spearman and Kendall (tau-b) coefficients; {int(s['confidence_level'] * 100)}% confidence "
             f"intervals from {s['n_resamples']} paired bootstrap resamples ({s['ci_method']} method, "
             f"scipy.stats.bootstrap, seed {s['seed']}); p = permutation p-value ({s['permutation']}; "
             f"{s['n_resamples']} resamples, seed {s['seed']}). Each correlation takes all its y values from one "
             "source (named in the table).", ""]
    rows = []
    for group, title in (("all_models", "all models"), ("robust_models", "models above chance"),
                         ("gap", "all models, gap"), ("overfitting", "per run, last - ES")):
        for res in corr.get(group, []):
            y = f"{res['y']}" if res["y"] else res["target"]
            rows.append([title, res["x"], y, res["n"], _coef(res, "pearson"), _coef(res, "spearman"),
                         _coef(res, "kendall"), res.get("note", "")])
    if rows:
        lines += _table(["points", "x (flatness)", "y", "n", "Pearson r [CI], p", "Spearman rho [CI], p",
                         "Kendall tau [CI], p", "note"], rows)
        sources = sorted({(r["y"], r["y_source"]) for g in ("all_models", "gap", "overfitting") for r in corr[g]
                          if r["y"]})
        lines += [""] + [f"- `{y}`: {src}" for y, src in sources]
        if corr.get("at_chance"):
            lines.append("- models above chance: without the runs whose robust test error at the last epoch is at "
                         "least 1 - 1/C, what a constant prediction gets: "
                         + ", ".join(f"{c['label']} ({c['rerr']:.1%}, {c['source']})" for c in corr["at_chance"]))
    else:
        lines.append("No flatness results yet: no correlation (run `python -m experiments.flatness` on the "
                     "snapshots).")
    return lines


def render(analysis: Analysis, roots: Sequence[str], results: Sequence[Verdict]) -> str:
    lines = ["# Reproduction report: flatness and adversarially robust generalization", "",
             "> Generated by `python -m experiments.report` from the run directories' result files; do not edit "
             "by hand -- rerun the command to update it.", "",
             f"Command: `python -m experiments.report {' '.join(safe_path(r) for r in roots)} --out "
             f"{safe_path(analysis.out)}`. Reproduces the analysis of Stutz, Hein & Schiele, \"Relating "
             "Adversarially Robust Generalization to Flat Minima\" (ICCV 2021) on the runs below.", "",
             "## Verdicts", ""]
    lines += _table(["claim", "verdict", "evidence"],
                    [[f"{v.claim}: {TITLES[v.claim]}", f"**{v.verdict}**", v.summary] for v in results])
    lines += [""] + settings_section(analysis, roots)
    lines += ["", "## Main table", "", correlate.main_table(analysis.runs, analysis.table).rstrip()]
    lines += [""] + coefficients_section(analysis)
    lines += ["", "## Figures", ""]
    if analysis.figures:
        for name, file in analysis.figures.items():
            lines += [f"![{name}]({file})", "", FIGURE_TEXT.get(name, ""), ""]
    else:
        lines.append("No figure: no data to plot yet.")
    lines += ["## Claims", ""]
    for v in results:
        summary = v.summary[:1].upper() + v.summary[1:]
        lines += [f"### {v.claim}: {TITLES[v.claim]}", "", f"**Verdict: {v.verdict}.** {summary}.", "",
                  f"Rule: {RULES[v.claim]}", ""]
        if v.claim in PAPER:
            lines += [f"Paper: {PAPER[v.claim]}.", ""]
        if v.details:
            lines += v.details + [""]
    return "\n".join(lines).rstrip() + "\n"


ARCHIVED = ("config.json", "metrics.jsonl", "evaluations/*.json", "flatness/*.json")


def _copy_result(src: str, dst: str, label: str) -> None:
    """Copy one result file atomically; paths of the machine that made it (a result's absolute ``run_dir``, a config's
    ``data.data_dir``) become the run's label and ``<data-dir>``."""
    import json
    import shutil

    if src.endswith(".json"):
        try:
            with open(src) as f:
                d = json.load(f)
        except (OSError, ValueError):
            d = None
        data = d.get("data") if isinstance(d, dict) else None
        if isinstance(d, dict) and ("run_dir" in d or isinstance(data, dict) and data.get("data_dir")):
            if "run_dir" in d:
                d["run_dir"] = label
            if isinstance(d.get("data"), dict) and d["data"].get("data_dir"):
                d["data"]["data_dir"] = "<data-dir>"  # where the data was on that machine
            atomic_write_text(dst, json.dumps(d, indent=2, sort_keys=src.endswith("config.json")) + "\n")
            return
    shutil.copyfile(src, dst + ".tmp")
    os.replace(dst + ".tmp", dst)


def archive_results(roots: Sequence[str], out_dir: str) -> int:
    """Copy the small result files the analysis reads (config.json, metrics.jsonl, the evaluation and flatness JSON
    summaries; no checkpoints, per-example files or logs) into ``out_dir/results/<label>/`` and the grid's
    ``grid.json`` into ``out_dir/results/``, so the report can be regenerated from the committed copy on a machine
    without the runs (``python -m experiments.report OUT/results --out OUT``). Files an earlier archive left there that
    this one does not hold (another grid's runs, snapshots not measured here) are removed, so the archive is exactly
    what this report read. Returns the number of files copied."""
    import glob
    import shutil

    dest_root = os.path.join(out_dir, "results")
    count = 0
    written: Optional[set] = set()
    for root in roots:
        root = os.path.normpath(root)
        if os.path.abspath(root) == os.path.abspath(dest_root):
            written = None  # regenerating from the archive itself: it stays as it is
            continue
        runs = [root] if os.path.isfile(os.path.join(root, "config.json")) else sorted(
            d for d in glob.glob(os.path.join(root, "*")) if os.path.isfile(os.path.join(d, "config.json")))
        if os.path.isfile(os.path.join(root, "grid.json")):
            os.makedirs(dest_root, exist_ok=True)
            shutil.copyfile(os.path.join(root, "grid.json"), os.path.join(dest_root, "grid.json"))
            if written is not None:
                written.add(os.path.abspath(os.path.join(dest_root, "grid.json")))
            count += 1
        for run in runs:
            for pattern in ARCHIVED:
                for src in glob.glob(os.path.join(run, pattern)):
                    if src.endswith(".examples.json"):
                        continue
                    dst = os.path.join(dest_root, os.path.basename(run), os.path.relpath(src, run))
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    _copy_result(src, dst, os.path.basename(run))
                    if written is not None:
                        written.add(os.path.abspath(dst))
                    count += 1
    for here, _, files in os.walk(dest_root, topdown=False) if written is not None else ():
        for name in files:
            if os.path.abspath(os.path.join(here, name)) not in written:
                os.remove(os.path.join(here, name))
        if here != dest_root and not os.listdir(here):
            os.rmdir(here)
    return count


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("roots", nargs="+", help="grid root (or run directories)")
    p.add_argument("--out", default=os.path.join("docs", "reproduction"), help="output directory")
    p.add_argument("--no-archive", action="store_true",
                   help="do not copy the runs' small result files into OUT/results/ (default: copy them, so the "
                        "report can be regenerated where the runs are not)")
    correlate.add_statistics_options(p)
    args = p.parse_args(argv)
    analysis = correlate.analyse_args(args.roots, args)
    results = verdicts(analysis)
    if not args.no_archive:
        n = archive_results(args.roots, args.out)
        print(f"copied {n} result files to {os.path.join(args.out, 'results')}")
    path = os.path.join(args.out, "REPORT.md")
    atomic_write_text(path, render(analysis, args.roots, results))
    for v in results:
        print(f"{v.claim}: {v.verdict} -- {v.summary}")
    print(f"-> {path}")
    return {v.claim: v.verdict for v in results}


if __name__ == "__main__":
    correlate.run_main(main)

"""The figures of ``experiments.correlate`` and ``experiments.report`` (matplotlib, Agg backend, PNG written
atomically with :func:`robust_flat.io.atomic_save_figure`).

One colour per method group, the same in every figure: :func:`palette` gives each known training method a fixed
colour (``METHOD_COLOURS``) and every other group the next unused colour of ``EXTRA_COLOURS``. Markers: the last
model filled, the early-stopped (ES) model hollow.

* ``scatter_rloss_vs_flatness.png`` -- test RLoss (top) and RErr (bottom) against average- and worst-case
  flatness, one point per model, least-squares line, coefficients with their intervals in the legend;
* ``curves.png`` -- per run, train and test robust loss over epochs, flatness of the snapshots on a second axis,
  the first learning-rate decay and the ES epoch marked (claims H1, H2);
* ``es_vs_last.png`` -- ES vs last model per run: test RLoss, RErr and flatness (claim H11);
* ``landscapes.png`` -- 1D robust-loss landscapes (random / adversarial directions) where they were computed.
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Sequence

from robust_flat import stats
from robust_flat.io import atomic_save_figure

if TYPE_CHECKING:  # pragma: no cover
    from experiments.correlate import Analysis, Run

METHOD_COLOURS = {"pgd_at": "#1f77b4", "trades": "#ff7f0e", "mart": "#2ca02c", "awp": "#d62728",
                  "entropy_sgd": "#9467bd", "clean": "#7f7f7f"}
EXTRA_COLOURS = ("#8c564b", "#e377c2", "#17becf", "#bcbd22", "#393b79", "#ad494a", "#637939", "#8c6d31",
                 "#7b4173", "#3182bd", "#e6550d", "#31a354")
DPI = 150
FILES = {"scatter": "scatter_rloss_vs_flatness.png", "curves": "curves.png", "es_vs_last": "es_vs_last.png",
         "landscapes": "landscapes.png"}


def palette(groups: Sequence[tuple[str, str]]) -> dict[str, str]:
    """``{group: colour}`` for ``(group, method)`` pairs in order: a group takes its method's fixed colour unless an
    earlier group took it, else the next unused extra colour."""
    out: dict[str, str] = {}
    extra = iter(c for c in EXTRA_COLOURS * 4)
    for group, method in groups:
        if group in out:
            continue
        colour = METHOD_COLOURS.get(group) or METHOD_COLOURS.get(method)
        if colour is None or colour in out.values():
            colour = next(c for c in extra if c not in out.values())
        out[group] = colour
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8})
    return plt


def _save(plt, fig, path: str, rect=None) -> None:
    """Lay out ``fig`` (``rect``: the part of the figure the axes fill, leaving room for a figure legend), write it
    to ``path`` atomically and close it."""
    try:
        fig.tight_layout(rect=rect)
        atomic_save_figure(path, fig, dpi=DPI)
    finally:
        plt.close(fig)


def _coef_text(res: dict) -> str:
    if "pearson" not in res:
        return f"n={res.get('n', 0)}: {res.get('note', 'no correlation')}"
    lines = [f"n={res['n']}"]
    for name, sym in (("pearson", "Pearson r"), ("spearman", "Spearman ρ")):
        c = res[name]
        lo, hi = c["ci"]
        ci = f"[{lo:.2f}, {hi:.2f}]" if lo is not None else "[–]"
        lines.append(f"{sym} = {c['estimate']:.2f} {ci}, p = {c['p_permutation']:.2g}")
    return "\n".join(lines)


def _group_handles(plt, colours: dict[str, str], groups: Sequence[str]) -> list:
    from matplotlib.lines import Line2D

    return [Line2D([], [], marker="o", ls="", color=colours[g], label=g) for g in dict.fromkeys(groups)]


def scatter(analysis: "Analysis", path: str) -> bool:
    """Test RLoss and RErr against the avg/worst flatness columns, one point per model; False if no panel has
    points."""
    from experiments.correlate import find

    corr = analysis.correlations
    xs = [c for c in (corr["flatness_columns"]["avg"], corr["flatness_columns"]["worst"]) if c]
    panels = [(target, x, find(corr["all_models"], x=x, target=target)) for target in ("rloss", "rerr") for x in xs]
    if not any(res and res["points"] for _, _, res in panels):
        return False
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(2, len(xs), figsize=(5.2 * len(xs), 8.0), squeeze=False)
    for ax, (target, x, res) in zip(axes.ravel(), panels):
        pts = res["points"] if res else []
        for p in pts:
            colour = analysis.colours[p["group"]]
            hollow = p["kind"] == "es"
            ax.plot(p["x"], p["y"], "o", ms=7, mec=colour, mfc="none" if hollow else colour, mew=1.5)
        fit = stats.linear_fit([p["x"] for p in pts], [p["y"] for p in pts])
        handles = []
        if "slope" in fit:
            lo, hi = min(p["x"] for p in pts), max(p["x"] for p in pts)
            ax.plot([lo, hi], [fit["intercept"] + fit["slope"] * lo, fit["intercept"] + fit["slope"] * hi], "k-",
                    lw=1, alpha=0.7)
            handles.append(Line2D([], [], color="k", lw=1, label=_coef_text(res)))
        else:
            handles.append(Line2D([], [], ls="", label=_coef_text(res or {"n": 0})))
        handles += [Line2D([], [], marker="o", ls="", color="0.3", label="last model"),
                    Line2D([], [], marker="o", ls="", mec="0.3", mfc="none", label="early-stopped")]
        ax.legend(handles=handles, loc="best", framealpha=0.85)
        ax.set_xlabel(f"{x} (flatness of the robust loss)")
        ylabel = ("test RLoss" if target == "rloss" else "test RErr") + (f"\n{res['y']}" if res and res["y"] else "")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    groups = [r.group for r in analysis.runs]
    fig.legend(handles=_group_handles(plt, analysis.colours, groups), loc="upper center",
               ncol=min(len(set(groups)), 6), bbox_to_anchor=(0.5, 1.0))
    fig.suptitle("one point per model (last: filled, early-stopped: hollow)", y=0.955, fontsize=9)
    _save(plt, fig, path, rect=(0, 0, 1, 0.94))
    return True


def _series(run: "Run", column: str) -> tuple[list[int], list[float]]:
    pts = [(e, run.value(e, column)) for e in run.rows]
    pts = [(e, v) for e, v in pts if v is not None]
    return [e for e, _ in pts], [v for _, v in pts]


def _attack(run: "Run", column: str) -> str:
    """"PGD-20" for the robust_loss results behind ``column`` (their attack and steps)."""
    setting = (run.settings.get(column) or [{}])[0]
    if setting.get("steps") is None:
        return "robust_loss"
    return f"{str(setting.get('attack') or 'pgd').upper()}-{setting['steps']}"


def curves(analysis: "Analysis", path: str) -> bool:
    """Per run: train/test robust loss of the training log over epochs (lines), robust_loss results (squares),
    flatness of the snapshots on the right axis (diamonds: avg, triangles: worst)."""
    runs = [r for r in analysis.runs if r.log or any("test_rloss" in row for row in r.rows.values())]
    if not runs:
        return False
    plt = _pyplot()
    cols = min(3, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.6 * rows), squeeze=False)
    avg, worst = analysis.correlations["flatness_columns"]["avg"], analysis.correlations["flatness_columns"]["worst"]
    legend: dict = {}
    for ax, run in zip(axes.ravel(), runs):
        colour = analysis.colours[run.group]
        epochs = list(run.log)
        points: list[tuple[float, float]] = []  # every (epoch, robust loss) drawn, for the axis range
        for key, ls, name in (("test_robust_loss", "-", "test RLoss (log)"),
                              ("train_robust_loss", "--", "train RLoss (log)")):
            ys = [run.log[e].get(key) for e in epochs]
            if any(isinstance(v, (int, float)) for v in ys):
                ax.plot(epochs, [v if isinstance(v, (int, float)) else float("nan") for v in ys], ls, color=colour,
                        lw=1.5, label=name)
                points += [(e, v) for e, v in zip(epochs, ys) if isinstance(v, (int, float)) and math.isfinite(v)]
        for key, mfc, name in (("test_rloss", colour, f"test RLoss ({_attack(run, 'test_rloss')})"),
                               ("train_rloss", "none", f"train RLoss ({_attack(run, 'train_rloss')})")):
            e, v = _series(run, key)
            if e:
                ax.plot(e, v, "s", ms=5, mec=colour, mfc=mfc, label=name)
                points += [(a, b) for a, b in zip(e, v) if math.isfinite(b)]
        _loss_range(ax, points)
        if run.first_decay_epoch:
            ax.axvline(run.first_decay_epoch, color="0.5", ls=":", lw=1, label="first LR decay")
        if run.es_epoch is not None:
            ax.axvline(run.es_epoch, color="k", ls="-.", lw=0.8, label=f"ES (epoch {run.es_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("robust loss")
        ax.set_title(f"{run.label} ({run.method})")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        flat = [(c, m, n) for c, m, n in ((avg, "D", "avg flatness"), (worst, "v", "worst flatness")) if c]
        if any(_series(run, c)[0] for c, _, _ in flat):
            ax2 = ax.twinx()
            for c, marker, name in flat:
                e, v = _series(run, c)
                if e:
                    ax2.plot(e, v, marker + "-", color="0.2", lw=0.8, ms=5, label=f"{name} ({c})")
            ax2.set_ylabel("flatness", color="0.2")
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        for h, lab in zip(handles, labels):
            legend.setdefault(_generic(lab), h)
    for ax in axes.ravel()[len(runs):]:
        ax.set_visible(False)
    fig.legend(list(legend.values()), list(legend), loc="upper center", ncol=min(len(legend), 5), fontsize=8,
               bbox_to_anchor=(0.5, 1.0))
    _save(plt, fig, path, rect=(0, 0, 1, 1 - 0.5 / (3.6 * rows)))
    return True


def _loss_range(ax, points: list[tuple[float, float]]) -> None:
    """The robust-loss axis spans the values from the first tenth of the epochs on (at least from epoch 3): the loss
    of the first epochs, several times larger, would flatten the curves where overfitting shows; what it leaves
    above the axis is said in a note."""
    if not points:
        return
    start = max(3.0, 0.1 * max(e for e, _ in points))
    later = [v for e, v in points if e >= start]
    if not later or max(v for _, v in points) <= max(later):
        return
    lo, hi = min(later), max(later)
    pad = 0.1 * (hi - lo) or 0.1
    ax.set_ylim(lo - pad, hi + pad)
    ax.text(0.01, 0.98, f"epochs < {start:g} above the axis", transform=ax.transAxes, fontsize=7, va="top",
            color="0.4")


def _generic(label: str) -> str:
    """Legend label without the run-specific epoch (one shared legend for all panels)."""
    return "ES epoch" if label.startswith("ES (epoch") else label


def es_vs_last(analysis: "Analysis", path: str) -> bool:
    """Per run, the early-stopped (hollow) and the last (filled) model joined by a line, one panel per quantity."""
    from experiments.correlate import rerr_candidates

    runs = [r for r in analysis.runs if r.es_epoch is not None and r.last_epoch is not None]
    if not runs:
        return False
    columns = {k for row in analysis.table for k in row}
    fc = analysis.correlations["flatness_columns"]
    quantities: list[tuple[str, list[str]]] = [("test RLoss", ["test_rloss", "test_robust_loss"]),
                                               ("test RErr", rerr_candidates(columns))]
    quantities += [(f"{name}-case flatness ({fc[name]})", [fc[name]]) for name in ("avg", "worst") if fc[name]]
    panels = []
    for title, cands in quantities:  # one source per panel: the first one with both values for some run
        col = next((c for c in cands if any(r.value(r.es_epoch, c) is not None and r.value(r.last_epoch, c)
                                            is not None for r in runs)), None)
        if col:
            panels.append((title, col))
    if not panels:
        return False
    plt = _pyplot()
    ncols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(3.6, 0.5 * len(runs) + 2.2) * ncols, 3.6 * nrows),
                             squeeze=False)
    for ax, (title, col) in zip(axes.ravel(), panels):
        for i, run in enumerate(runs):
            es, last = run.value(run.es_epoch, col), run.value(run.last_epoch, col)
            if es is None or last is None:
                continue
            colour = analysis.colours[run.group]
            ax.plot([i, i], [es, last], "-", color=colour, lw=1.2)
            ax.plot(i, es, "o", ms=7, mec=colour, mfc="none", mew=1.5)
            ax.plot(i, last, "o", ms=7, color=colour)
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels([r.label for r in runs], rotation=45, ha="right")
        ax.set_title(title if col in title else f"{title} ({col})")
        ax.grid(alpha=0.3, axis="y")
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], marker="o", ls="", color="0.3", label="last"),
               Line2D([], [], marker="o", ls="", mec="0.3", mfc="none", label="early-stopped")]
    handles += _group_handles(plt, analysis.colours, [r.group for r in runs])
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), bbox_to_anchor=(0.5, 1.0))
    _save(plt, fig, path, rect=(0, 0, 1, 1 - 0.45 / (3.6 * nrows)))
    return True


def landscapes(analysis: "Analysis", path: str) -> bool:
    """Aggregate robust loss along each direction kind (one panel per kind), one line per (run, snapshot):
    solid for the last model, dashed for the early-stopped one, dotted otherwise."""
    items = [(run, ls) for run in analysis.runs for ls in run.landscapes]
    kinds = list(dict.fromkeys(k for _, ls in items for k in ls["kinds"]))
    if not kinds:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.0 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for run, ls in items:
            k = ls["kinds"].get(kind)
            if not k:
                continue
            style = "-" if ls["epoch"] == run.last_epoch else ("--" if ls["epoch"] == run.es_epoch else ":")
            tag = "last" if ls["epoch"] == run.last_epoch else ("ES" if ls["epoch"] == run.es_epoch else "")
            ax.plot(ls["s"], k["aggregate"]["robust_loss"], style, color=analysis.colours[run.group], lw=1.5,
                    label=f"{run.label} ep {ls['epoch']}" + (f" ({tag})" if tag else ""))
        agg = next((ls["kinds"][kind].get("aggregation") for _, ls in items if kind in ls["kinds"]), "")
        ax.set_title(f"{kind} directions ({agg} over directions)")
        ax.set_xlabel("step s along the normalized direction")
        ax.set_ylabel("robust loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(plt, fig, path)
    return True


def write_all(analysis: "Analysis", out: str) -> dict[str, str]:
    """Every figure that has data; returns ``{name: file name}`` of those written."""
    written = {}
    for name, fn in (("scatter", scatter), ("curves", curves), ("es_vs_last", es_vs_last),
                     ("landscapes", landscapes)):
        if fn(analysis, os.path.join(out, FILES[name])):
            written[name] = FILES[name]
    return written


__all__ = ["METHOD_COLOURS", "EXTRA_COLOURS", "FILES", "palette", "scatter", "curves", "es_vs_last", "landscapes",
           "write_all"]

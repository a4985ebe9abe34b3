"""Training curves of a run: ``RUN/curves.png`` from ``RUN/metrics.jsonl`` (the trainer rewrites it every epoch).

Two panels over epochs, loss and error: the per-epoch evaluation's clean (dashed) and PGD robust (solid) values on
the fixed training (blue) and test (orange) subsets, the training batches as trained (grey, dotted: adversarial for
AT), the averaged weights' robust values (green) when the run averages its weights, and the early-stopping robust
error (red dots; the best epoch is marked). The figure is drawn with the Agg
canvas directly (no pyplot, no global state), so it is cheap (well under a second) and safe inside a training run.

    from robust_flat.curves import write_curves
    write_curves("runs/at")          # -> runs/at/curves.png
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

FILENAME = "curves.png"

# (metric suffix, label, colour, line style); loss keys are "<set>_loss" / "<set>_robust_loss", errors alike
_SERIES = (("train", "train clean", "C0", "--"), ("train_robust", "train robust (PGD)", "C0", "-"),
           ("test", "test clean", "C1", "--"), ("test_robust", "test robust (PGD)", "C1", "-"),
           ("batch", "training batches", "0.5", ":"),
           # weight averaging (ema.enabled): the averaged model with its own batch-norm statistics
           ("ema_train_robust", "averaged: train robust", "C2", "-."), ("ema_test_robust", "averaged: test robust",
                                                                          "C2", "-"))


def read_metrics(path: str) -> list:
    """The records of a ``metrics.jsonl``, one per epoch (a later line for an epoch wins; torn lines are skipped)."""
    by_epoch = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line of a killed job
            if isinstance(rec, dict) and isinstance(rec.get("epoch"), (int, float)):
                by_epoch[int(rec["epoch"])] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_curves(records: list, title: Optional[str] = None):
    """A matplotlib ``Figure`` (Agg canvas) of the loss and error curves of ``records`` (see :func:`read_metrics`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in records]
    marker = "o" if len(records) < 30 else None
    for ax, what in zip(axes, ("loss", "error")):
        positive = []
        for prefix, label, colour, style in _SERIES:
            key = f"{prefix}_{what}"
            pts = [(e, r[key]) for e, r in zip(epochs, records) if _finite(r.get(key))]
            if pts:
                ax.plot(*zip(*pts), style, color=colour, label=label, marker=marker, markersize=3)
                positive += [v for _, v in pts]
        if what == "error":
            pts = [(e, r["es_robust_error"]) for e, r in zip(epochs, records) if _finite(r.get("es_robust_error"))]
            if pts:
                ax.plot(*zip(*pts), "o", color="C3", markersize=4, label="early stopping (robust)")
                best = min(pts, key=lambda p: p[1])  # the first minimum, as the trainer's best checkpoint
                ax.axvline(best[0], color="C3", lw=0.8, alpha=0.5)
                ax.annotate(f"best epoch {best[0]}", (best[0], best[1]), textcoords="offset points", xytext=(4, 6),
                            fontsize=7, color="C3")
            ax.set_ylim(-0.02, 1.02)
        elif positive and min(positive) > 0 and max(positive) / min(positive) > 50:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    handles, labels = axes[1].get_legend_handles_labels()
    if handles:
        axes[1].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), handlelength=3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _title(run_dir: str) -> str:
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            c = json.load(f)
        d = c.get("data", {})
        data = "synthetic data (NOT CIFAR-10)" if d.get("dataset") == "synthetic" else d.get("dataset", "?")
        return (f"{os.path.basename(os.path.abspath(run_dir))}: {c.get('method')} {c.get('model', {}).get('name')} "
                f"on {data}, {c.get('train', {}).get('epochs')} epochs")
    except (OSError, ValueError, AttributeError):
        return os.path.basename(os.path.abspath(run_dir))


def write_curves(run_dir: str, records: Optional[list] = None, path: Optional[str] = None) -> str:
    """Draw the curves of ``run_dir`` (``records`` default: its ``metrics.jsonl``) and write them atomically to
    ``path`` (default ``RUN/curves.png``); returns the path."""
    from robust_flat.io import atomic_save_figure

    if records is None:
        records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    path = path or os.path.join(run_dir, FILENAME)
    atomic_save_figure(path, plot_curves(records, _title(run_dir)))
    return path

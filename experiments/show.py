"""A summary table of one training run or several side by side. ``python -m experiments.show RUN [RUN...]``.

    python -m experiments.show runs/at                       # one run: its main config fields
    python -m experiments.show runs/at runs/trades6 runs/awp001   # several: the config fields that differ

Reads only the files a run directory holds (no model is loaded, nothing is written):

* ``config.json``: the main fields of one run, or the fields that differ between the runs;
* ``metrics.jsonl``: epochs done / total, the best epoch by early stopping (lowest ``es_robust_error``, the first
  one on ties, as the trainer's ``checkpoints/best``) and that error, and the last epoch's loss and error: the
  training batches as trained (adversarial for AT) and the clean and PGD robust values on the training and test
  subsets of the per-epoch evaluation;
* ``evaluations/*.json`` (``experiments.evaluate``, ``experiments.robust_loss``; not ``*.examples.json``): the
  robust error of each attack (AutoAttack, ...), and clean/robust loss and error of ``kind: robust_loss`` files;
* ``flatness/*.json`` (``experiments.flatness``): each measure's flatness with its xi and epoch.

A path that is not a run directory (no readable ``config.json``) is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys

# fields shown for a single run (those that exist in its config)
MAIN_FIELDS = ("method", "model.name", "model.norm", "model.activation", "data.dataset", "data.train_examples",
               "data.synthetic_train", "train.epochs", "train.batch_size", "optimizer.name", "optimizer.lr",
               "optimizer.weight_decay", "attack.eps", "attack.steps", "trades.beta", "mart.beta", "awp.xi",
               "esgd.L", "seed")
# fields whose differences between runs say nothing about what was trained
IGNORED = ("data.data_dir", "debug.sigkill_at_step")


class NotARun(Exception):
    """A path given to ``show`` is not a training run directory; the message says why."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _number(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return ",".join(_fmt(x) for x in v)
    return str(v)


def _fmt_config(v) -> str:
    """A config value: floats with 4 significant digits (lr 0.05, eps 0.03137, beta 6)."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ",".join(_fmt_config(x) for x in v)
    return _fmt(v)


def _pair(a, b) -> str:
    return "-" if a is None and b is None else f"{_fmt(_number(a))} / {_fmt(_number(b))}"


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _find_xi(d):
    """The flatness neighbourhood's xi: ``neighbourhood.xi`` anywhere in a result's config."""
    if isinstance(d, dict):
        nb = d.get("neighbourhood")
        if isinstance(nb, dict) and _number(nb.get("xi")) is not None:
            return _number(nb["xi"])
        for v in d.values():
            xi = _find_xi(v)
            if xi is not None:
                return xi
    return None


def load_run(path: str) -> dict:
    """What :func:`summarize` shows of one run directory; raises :class:`NotARun`."""
    if not os.path.isdir(path):
        raise NotARun(f"{path}: no such directory")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise NotARun(f"{path} is not a training run directory (no config.json; make one with "
                      "python -m experiments.cifar10_at --run-dir DIR)")
    config = _read_json(cfg_path)
    if not isinstance(config, dict):
        raise NotARun(f"{cfg_path} is not a readable JSON config; is {path} a training run directory?")
    from robust_flat.curves import read_metrics

    metrics_path = os.path.join(path, "metrics.jsonl")
    try:
        metrics = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    except OSError as e:
        raise NotARun(f"{metrics_path} is unreadable ({e})")

    evaluations = {}  # row label -> value
    for p in sorted(glob.glob(os.path.join(path, "evaluations", "*.json"))):
        if p.endswith(".examples.json"):
            continue
        name, d = os.path.basename(p)[:-len(".json")], _read_json(p)
        if not isinstance(d, dict):
            evaluations[name] = "(unreadable)"
            continue
        note = "" if d.get("finished", True) else " (unfinished)"
        if d.get("kind") == "robust_loss":
            evaluations[f"{name}: clean loss / error"] = _pair(d.get("clean_loss"), d.get("clean_error")) + note
            evaluations[f"{name}: robust loss / error"] = _pair(d.get("robust_loss"), d.get("robust_error")) + note
        elif _number(d.get("robust_error")) is not None:
            evaluations[f"{name}: robust error"] = _fmt(_number(d["robust_error"])) + note
        else:
            evaluations[name] = "(no robust error)"

    flatness = {}
    for p in sorted(glob.glob(os.path.join(path, "flatness", "*.json"))):
        d = _read_json(p)
        if not isinstance(d, dict) or _number(d.get("flatness")) is None:
            continue  # Hessian spectra, landscapes, unfinished files
        xi = _find_xi(d.get("config"))
        label = (f"{d.get('measure', '?')}{' (clean loss)' if d.get('loss') == 'clean' else ''}"
                 f" xi={_fmt(xi) if xi is None else f'{xi:g}'} epoch {_fmt(d.get('epoch'))}")
        flatness[label] = _fmt(_number(d["flatness"]))
    return {"path": path, "config": _flatten(config), "metrics": metrics, "evaluations": evaluations,
            "flatness": flatness, "curves": os.path.isfile(os.path.join(path, "curves.png"))}


def _progress_rows(run: dict) -> list:
    m, c = run["metrics"], run["config"]
    done = m[-1]["epoch"] if m else 0
    es = [(r["epoch"], _number(r.get("es_robust_error"))) for r in m if _number(r.get("es_robust_error")) is not None]
    best = min(es, key=lambda p: p[1]) if es else None  # the first minimum, as the trainer's best checkpoint
    last = m[-1] if m else {}
    return [
        ("epochs done / total", f"{done} / {_fmt(c.get('train.epochs'))}"),
        ("best epoch (early stopping)", _fmt(best[0]) if best else "-"),
        ("  its ES robust error", _fmt(best[1]) if best else "-"),
        ("last epoch", _fmt(last.get("epoch"))),
        ("  training batches loss / error", _pair(last.get("batch_loss"), last.get("batch_error")) if m else "-"),
        ("  train clean loss / error", _pair(last.get("train_loss"), last.get("train_error")) if m else "-"),
        ("  train robust loss / error", _pair(last.get("train_robust_loss"), last.get("train_robust_error"))
         if m else "-"),
        ("  test clean loss / error", _pair(last.get("test_loss"), last.get("test_error")) if m else "-"),
        ("  test robust loss / error", _pair(last.get("test_robust_loss"), last.get("test_robust_error"))
         if m else "-"),
        ("curves.png", "yes" if run["curves"] else "-"),
    ]


def _names(paths: list) -> list:
    names = [os.path.basename(os.path.normpath(p)) or p for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


def summarize(paths: list) -> str:
    """The table for the run directories ``paths`` (raises :class:`NotARun` for the first one that is not)."""
    runs = [load_run(p) for p in paths]
    sections = []
    configs = [r["config"] for r in runs]
    if len(runs) == 1:
        c = configs[0]
        fields = [k for k in MAIN_FIELDS if k in c and not (k == "data.synthetic_train"
                                                            and c.get("data.dataset") != "synthetic")]
        sections.append(("config", [(k, [_fmt_config(c.get(k))]) for k in fields]))
    else:
        keys = sorted({k for c in configs for k in c if k not in IGNORED})
        diff = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
        rows = [(k, [_fmt_config(c.get(k)) if k in c else "-" for c in configs]) for k in diff]
        sections.append(("config (fields that differ)", rows or [("(identical configs)", [""] * len(runs))]))
    per_run = [_progress_rows(r) for r in runs]
    sections.append(("training (metrics.jsonl)", [(label, [rows[i][1] for rows in per_run])
                                                  for i, (label, _) in enumerate(per_run[0])]))
    for title, key in (("evaluations (evaluations/*.json)", "evaluations"), ("flatness (flatness/*.json)",
                                                                             "flatness")):
        labels = sorted({k for r in runs for k in r[key]})
        if labels:
            sections.append((title, [(k, [r[key].get(k, "-") for r in runs]) for k in labels]))

    header = [""] + _names(paths)
    table = [header]
    for title, rows in sections:
        table.append([title] + [""] * len(runs))
        table += [["  " + label] + values for label, values in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for row in table:
        is_title = row is not header and all(v == "" for v in row[1:]) and not row[0].startswith("  ")
        if is_title:
            lines.append(row[0])
        else:
            lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.show", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="training run directories (experiments.cifar10_at)")
    args = p.parse_args(argv)
    try:
        print(summarize(args.runs))
    except NotARun as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

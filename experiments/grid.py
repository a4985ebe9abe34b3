"""Run an experiment grid: train every run, then measure its snapshots. ``python -m experiments.grid GRID``.

    python -m experiments.grid experiments/grids/cpu.py --data-dir DIR            # run what is missing, in order
    python -m experiments.grid experiments/grids/cpu.py --data-dir DIR --dry-run  # list units, state, time estimate
    python -m experiments.grid experiments/grids/cpu.py --data-dir DIR --workers 2
    python -m experiments.grid experiments/grids/paper.py --data-dir /shared/cifar10 --launcher slurm \\
        --partition gpu --gpus 1 --time-min 720

A grid file (``experiments/grids/*.py``, an ml_collections config like the training configs) lists runs (a method
config, a preset, overrides, a seed, a label, and ``weights="ema"`` where every measure should take the run's averaged
weights) and the measures to take at which snapshots. The grid splits into
units, each one command of an existing entry point writing the files that entry point always writes:

* ``train``: ``experiments.cifar10_at`` into ``ROOT/<label>`` (snapshots every ``checkpoint.snapshot_every`` epochs);
* per snapshot epoch: ``rloss`` (``experiments.robust_loss``: clean and PGD robust loss/error on the first test and
  training images), ``avg`` / ``worst`` (``experiments.flatness``), on the last and the early-stopped model
  ``autoattack`` (``experiments.evaluate``), and ``landscape`` on chosen runs.

Rerunning the same command runs only what is missing: a unit is *done* when its result file exists, *partial* when
it left resumable work behind (checkpoints, ``.partial/`` units, an ``.examples.json``; its command resumes it), else
*to do*. An interruption loses at most the unit in flight. A failed unit is reported with its log
(``ROOT/<label>/grid_logs/<unit>.log``) and the grid goes on with the others (the units of a run whose training
failed are skipped); the exit status is 1 when something failed. ``ROOT/grid.json`` records the grid for
``experiments.report``.

Launchers: ``local`` (default; one unit after the other, or ``--workers N`` at once) and ``slurm`` (submitit: the
training units as one job array, each run's measurements as a job array that starts when its training succeeded).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "experiments", "configs")
MEASURES = ("rloss", "autoattack", "avg", "worst", "landscape")
STATES = ("done", "stale", "partial", "to do")


class GridError(Exception):
    """A grid that cannot run (unknown method, measure or override, duplicate label, ...). The message says why."""


# ------------------------------------------------------------------------------------------------ loading
@dataclasses.dataclass(frozen=True)
class Run:
    label: str
    config: str                   # method config file name in experiments/configs (without .py)
    preset: str
    overrides: tuple              # ((dotted key, value), ...)
    seed: int
    group: str                    # the method or setting, for colours and tables
    epochs: int
    snapshot_every: int
    method: str
    train_examples: int           # images per epoch (for the time estimate)
    weights: str = "params"       # which weights every measure of the run uses: params, or ema (the average)


@dataclasses.dataclass
class Unit:
    name: str                     # e.g. "at/train", "at/rloss_test_ep10"
    run: str                      # run label
    kind: str                     # train | rloss | autoattack | avg | worst | landscape
    command: list                 # argv
    outputs: list                 # result files: all exist = done
    partial: list                 # paths whose existence means resumable work
    log: str
    cost: float                   # estimated seconds
    after: Optional[str] = None   # name of the unit this one needs
    state: str = "to do"
    same_as: Optional[dict] = None  # snapshot "best": {epoch: unit measuring that epoch's model}, see es_epoch
    stage: int = 0                # --order snapshot: 0 the final model, 1 the early-stopped one, 2 + epoch the others


def _load_module(path: str):
    spec = importlib.util.spec_from_file_location(f"grid_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise GridError(f"{path} is not a Python grid file")
    module = importlib.util.module_from_spec(spec)
    if REPO not in sys.path:  # grid and method config files import experiments.configs
        sys.path.insert(0, REPO)
    spec.loader.exec_module(module)
    return module


def load_grid(path: str):
    """The grid config of ``path`` (``get_config()`` of an ml_collections file)."""
    if not os.path.isfile(path):
        raise GridError(f"no grid file {path}; see experiments/grids/")
    try:
        module = _load_module(path)
    except GridError:
        raise
    except Exception as e:  # a grid file is user code: any error in it is one line
        raise GridError(f"{path} does not load: {type(e).__name__}: {e}") from None
    if not hasattr(module, "get_config"):
        raise GridError(f"{path} has no get_config()")
    try:
        return module.get_config()
    except Exception as e:
        raise GridError(f"{path}: get_config() failed: {type(e).__name__}: {e}") from None


def flatten_overrides(overrides, prefix: str = "") -> dict:
    """``{"optimizer": {"lr": 0.1}, "data.augment": False}`` -> ``{"optimizer.lr": 0.1, "data.augment": False}``."""
    out = {}
    for k, v in dict(overrides or {}).items():
        key = f"{prefix}{k}"
        if hasattr(v, "items"):
            out.update(flatten_overrides(v, key + "."))
        else:
            out[key] = v
    return out


def method_config(name: str, preset: str):
    path = os.path.join(CONFIG_DIR, f"{name}.py")
    if not os.path.isfile(path):
        known = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f not in ("__init__.py",
                                                                                                   "common.py"))
        raise GridError(f"unknown method config {name!r}; choose one of {', '.join(known)}")
    module = _load_module(path)
    try:
        return module.get_config(preset)
    except ValueError as e:
        raise GridError(f"method {name}: {e}") from None


def _set_override(config, key: str, value, label: str) -> None:
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        try:
            child = node[part]
        except (KeyError, AttributeError, TypeError):
            raise GridError(f"run {label!r}: override {key!r} does not exist in its config") from None
        if i == len(parts) - 1:
            try:
                node[part] = type(child)(value) if isinstance(child, (tuple, list)) else value
            except (TypeError, ValueError) as e:
                raise GridError(f"run {label!r}: override {key}={value!r}: {e}") from None
        else:
            node = child


def build_runs(grid) -> list[Run]:
    """Check every run of the grid (method, overrides, labels) and resolve its config; nothing runs."""
    runs, seen = [], set()
    common = flatten_overrides(grid.get("overrides", {}))
    for spec in grid.get("runs", None) or ():
        spec = dict(spec)
        unknown = set(spec) - {"label", "config", "preset", "overrides", "seed", "group", "weights"}
        if unknown:
            raise GridError(f"run {spec.get('label')!r}: unknown fields {sorted(unknown)}; a run has label, config, "
                            "preset, overrides, seed, group, weights")
        label = spec.get("label")
        if not label or not isinstance(label, str) or "/" in label or label.startswith("."):
            raise GridError(f"every run needs a label usable as a directory name, got {label!r}")
        if label in seen:
            raise GridError(f"duplicate run label {label!r}")
        seen.add(label)
        if "config" not in spec:
            raise GridError(f"run {label!r} names no method config")
        preset = spec.get("preset", grid.get("preset", ""))
        config = method_config(spec["config"], preset)
        seed = int(spec.get("seed", 0))
        overrides = {**common, **flatten_overrides(spec.get("overrides", {}))}
        with config.unlocked():
            for k, v in overrides.items():
                _set_override(config, k, v, label)
            config.seed = seed
        weights = spec.get("weights", "params")
        if weights not in ("params", "ema"):
            raise GridError(f"run {label!r}: weights must be params or ema, got {weights!r}")
        if weights == "ema" and not config.ema.enabled:
            raise GridError(f"run {label!r}: weights ema needs a run that averages its weights (ema.enabled)")
        runs.append(Run(label=label, config=spec["config"], preset=preset,
                        overrides=tuple(sorted(overrides.items())), seed=seed,
                        group=spec.get("group", config.method), epochs=int(config.train.epochs),
                        snapshot_every=int(config.checkpoint.snapshot_every), method=config.method,
                        train_examples=int(config.data.train_examples or 50000), weights=weights))
    if not runs:
        raise GridError("the grid lists no runs")
    return runs


def _cli_value(v) -> str:
    if isinstance(v, (tuple, list)):
        return "(" + ",".join(_cli_value(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    return repr(v) if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------------------------------ planning
def snapshot_epochs(run: Run) -> list[int]:
    """The kept snapshot epochs of a run after epoch 0 (every ``snapshot_every`` epochs and the last)."""
    eps = [e for e in range(run.snapshot_every, run.epochs + 1, run.snapshot_every)]
    if run.epochs not in eps:
        eps.append(run.epochs)
    return eps


def _select_snapshots(spec, run: Run) -> list:
    which = spec.get("snapshots", "all")
    if which == "all":
        return snapshot_epochs(run)
    if isinstance(which, str):
        which = [w.strip() for w in which.split(",")]
    out = []
    for w in which:
        if w in ("last", "best"):
            out.append(w)
        else:
            try:
                e = int(w)
            except (TypeError, ValueError):
                raise GridError(f"snapshots: {w!r} is not 'all', 'last', 'best' or an epoch") from None
            if e not in snapshot_epochs(run):
                raise GridError(f"run {run.label!r} keeps no snapshot at epoch {e}; it keeps "
                                f"{snapshot_epochs(run)}")
            out.append(e)
    return out


def _snap_arg(s) -> str:
    return str(s)


def _snap_name(s, run: Run) -> str:
    return f"ep{s}" if isinstance(s, int) else s


MEASURE_FIELDS = {
    "rloss": {"snapshots", "subsets", "n_examples", "pgd_steps", "restarts", "runs", "eps", "pgd_step_rule"},
    "autoattack": {"snapshots", "version", "n_examples", "n_iter", "runs", "eps"},
    "avg": {"snapshots", "xi", "samples", "n_examples", "pgd_steps", "reference_restarts", "nu_per", "runs", "eps",
            "pgd_step_rule"},
    "worst": {"snapshots", "xi", "restarts", "n_examples", "pgd_steps", "reference_restarts", "attack_iters",
              "nu_per", "runs", "eps", "pgd_step_rule"},
    "landscape": {"snapshots", "n_examples", "runs", "directions", "num_directions", "steps", "eps", "pgd_step_rule"},
}
# The measures whose commands always name their PGD step rule (``pgd_step_rule``, default scaled): experiments.flatness
# stepped 0.007 at every eps before the rule was shared, so naming it marks the results made that way stale.
NAMES_STEP_RULE = ("avg", "worst", "landscape")


def check_measures(grid, runs: Sequence[Run]) -> dict:
    measures = {k: dict(v) for k, v in dict(grid.get("measures", {}) or {}).items()}
    if grid.get("eps") is not None:  # grid-wide evaluation radius (a measure's own eps wins)
        for spec in measures.values():
            spec.setdefault("eps", float(grid.eps))
    labels = {r.label for r in runs}
    for name, spec in measures.items():
        if name not in MEASURES:
            raise GridError(f"unknown measure {name!r}; choose from {', '.join(MEASURES)}")
        spec = dict(spec)
        unknown = set(spec) - MEASURE_FIELDS[name]
        if unknown:
            raise GridError(f"measure {name}: unknown fields {sorted(unknown)}; it takes "
                            f"{', '.join(sorted(MEASURE_FIELDS[name]))}")
        from robust_flat.attacks.pgd import STEP_RULES

        if spec.get("pgd_step_rule", "scaled") not in STEP_RULES:
            raise GridError(f"measure {name}: pgd_step_rule {spec['pgd_step_rule']!r}; choose one of "
                            f"{', '.join(STEP_RULES)}")
        for lab in spec.get("runs", ()) or ():
            if lab not in labels:
                raise GridError(f"measure {name} names run {lab!r}, which the grid does not list")
        measures[name] = spec
    return measures


def plan(grid, root: str, data_dir: Optional[str], python: str = sys.executable) -> tuple[list[Run], list[Unit]]:
    """Every unit of the grid in run order (training first, then its measurements), with its state."""
    runs = build_runs(grid)
    measures = check_measures(grid, runs)
    cost = dict(grid.get("cost", {}) or {})
    grad_s = float(cost.get("seconds_per_image_grad", 1e-3))
    data = ["--data-dir", data_dir] if data_dir else []
    units: list[Unit] = []
    for run in runs:
        rdir = os.path.join(root, run.label)
        logs = os.path.join(rdir, "grid_logs")
        cfg = os.path.join("experiments", "configs", f"{run.config}.py") + (f":{run.preset}" if run.preset else "")
        cmd = [python, "-m", "experiments.cifar10_at", f"--config={cfg}", "--run-dir", rdir, *data, "--no-progress",
               f"--config.seed={run.seed}"] + [f"--config.{k}={_cli_value(v)}" for k, v in run.overrides]
        train_cost = grad_s * run.train_examples * run.epochs * 9 * float(cost.get("train_factor", 1.0))
        train = Unit(f"{run.label}/train", run.label, "train", cmd, [os.path.join(rdir, "DONE")],
                     [os.path.join(rdir, "checkpoints")], os.path.join(logs, "train.log"), train_cost)
        units.append(train)
        base = ["--run-dir", rdir, *data, *(["--weights", "ema"] if run.weights == "ema" else [])]
        keyed = []  # snapshot by snapshot (epochs in order, then last and best), measures in MEASURES order
        for name, spec in measures.items():
            if spec.get("runs") and run.label not in spec["runs"]:
                continue
            for snap in _select_snapshots(spec, run):
                order = snap if isinstance(snap, int) else run.epochs + 1 + ("last", "best").index(snap)
                stage = 0 if snap in ("last", run.epochs) else 1 if snap == "best" else 2 + snap
                for u in _measure_units(name, spec, run, snap, rdir, logs, base, python, grad_s, train.name):
                    u.stage = stage
                    keyed.append(((order, MEASURES.index(name)), u))
        ordered = [u for _, u in sorted(keyed, key=lambda t: t[0])]
        names = {u.name for u in ordered}
        for u in ordered:
            if u.name.endswith("_best"):  # the early-stopped model is one of the snapshots: reuse its result
                cands = {e: u.name[:-5] + f"_ep{e}" for e in snapshot_epochs(run)}
                cands[run.epochs] = cands[run.epochs] if cands[run.epochs] in names else u.name[:-5] + "_last"
                u.same_as = {e: n for e, n in cands.items() if n in names}
        units.extend(ordered)
    for u in units:
        u.state = unit_state(u)
        if u.state == "stale":
            u.command = [*u.command, "--fresh"]
    return runs, units


def _measure_units(name, spec, run, snap, rdir, logs, base, python, grad_s, after) -> list[Unit]:
    tag = _snap_name(snap, run)
    n = int(spec.get("n_examples", 1000))
    if spec.get("eps") is not None:  # the input radius of every attack of the measure (default: each CLI's 8/255)
        base = [*base, "--eps", repr(float(spec["eps"]))]
    if spec.get("pgd_step_rule") or name in NAMES_STEP_RULE:
        base = [*base, "--pgd-step-rule", spec.get("pgd_step_rule", "scaled")]
    out = []
    if name == "rloss":
        steps, restarts = int(spec.get("pgd_steps", 20)), int(spec.get("restarts", 10))
        for subset in spec.get("subsets", ("test_first1000", "train_first1000")):
            res = os.path.join(rdir, "evaluations", f"grid_rloss_{subset}_{tag}.json")
            cmd = [python, "-m", "experiments.robust_loss", *base, "--snapshot", _snap_arg(snap), "--subset", subset,
                   "--n-examples", str(n), "--pgd-steps", str(steps), "--restarts", str(restarts), "--name",
                   os.path.basename(res)[:-5]]
            out.append(Unit(f"{run.label}/rloss_{subset}_{tag}", run.label, "rloss", cmd, [res], [],
                            os.path.join(logs, f"rloss_{subset}_{tag}.log"), grad_s * n * (steps + 1) * restarts,
                            after))
    elif name == "autoattack":
        version = spec.get("version", "standard")
        res = os.path.join(rdir, "evaluations", f"grid_autoattack_{tag}.json")
        cmd = [python, "-m", "experiments.evaluate", *base, "--snapshot", _snap_arg(snap), "--attack", "autoattack",
               "--version", version, "--n-examples", str(n), "--n-iter", str(int(spec.get("n_iter", 100))),
               "--no-progress", "--name", os.path.basename(res)[:-5]]
        iters = int(spec.get("n_iter", 100)) * (4 if version == "fast" else 6)
        out.append(Unit(f"{run.label}/autoattack_{tag}", run.label, "autoattack", cmd, [res],
                        [res[:-5] + ".examples.json"], os.path.join(logs, f"autoattack_{tag}.log"),
                        grad_s * n * iters * 0.5, after))
    elif name in ("avg", "worst"):
        xi = spec.get("xi", 0.5 if name == "avg" else 0.003)
        k = int(spec.get("samples" if name == "avg" else "restarts", 10))
        steps, ref = int(spec.get("pgd_steps", 20)), int(spec.get("reference_restarts", 10))
        res_name = f"grid_{name}_xi{xi:g}_{tag}"
        res = os.path.join(rdir, "flatness", res_name + ".json")
        cmd = [python, "-m", "experiments.flatness", *base, "--snapshot", _snap_arg(snap), "--measure", name,
               "--xi", str(xi), "--samples", str(k), "--n-examples", str(n), "--pgd-steps", str(steps),
               "--reference-restarts", str(ref), "--no-progress", "--name", res_name]
        if name == "worst":
            cmd += ["--attack-iters", str(int(spec.get("attack_iters", 20)))]
        if spec.get("nu_per"):
            cmd += ["--nu-per", spec["nu_per"]]
        per = (steps + 1) if name == "avg" else int(spec.get("attack_iters", 20)) * 1.5
        out.append(Unit(f"{run.label}/{name}_{tag}", run.label, name, cmd, [res],
                        [os.path.join(rdir, "flatness", ".partial")], os.path.join(logs, f"{name}_{tag}.log"),
                        grad_s * n * (k * per + ref * (steps + 1)), after))
    elif name == "landscape":
        res_name = f"grid_landscape_{tag}"
        res = os.path.join(rdir, "flatness", res_name + ".json")
        cmd = [python, "-m", "experiments.flatness", *base, "--snapshot", _snap_arg(snap), "--measure", "landscape",
               "--n-examples", str(n), "--no-progress", "--name", res_name]
        if spec.get("directions"):
            cmd += ["--directions", spec["directions"]]
        k, steps = int(spec.get("num_directions", 10)), int(spec.get("steps", 51))
        cmd += ["--num-directions", str(k), "--steps", str(steps)]
        kinds = len(str(spec.get("directions", "random,adversarial")).split(","))
        out.append(Unit(f"{run.label}/landscape_{tag}", run.label, "landscape", cmd, [res],
                        [os.path.join(rdir, "flatness", ".partial")], os.path.join(logs, f"landscape_{tag}.log"),
                        grad_s * n * 21 * k * steps * kinds, after))
    return out


def es_epoch(run_dir: str) -> Optional[int]:
    """The early-stopped epoch of a finished run as the trainer chose it: the first snapshot epoch with the lowest
    ``es_robust_error`` in ``metrics.jsonl`` (None when the run has none)."""
    best = None
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                err = rec.get("es_robust_error")
                if err is not None and (best is None or err < best[0]):
                    best = (err, int(rec["epoch"]))
    except OSError:
        return None
    return None if best is None else best[1]


def reuse_same_model(unit: Unit, by_name: dict) -> Optional[str]:
    """A unit whose model another unit of the grid measured already, the same weights with the same settings: the
    early-stopped model at a snapshot epoch that was measured (or, under ``--order snapshot``, where the early-stopped
    model goes first, a snapshot epoch that is the early-stopped one). Copies that result instead of recomputing it
    and returns the other unit's name, or None."""
    if unit.same_as:
        epoch = es_epoch(os.path.dirname(os.path.dirname(unit.outputs[0])))
        other = by_name.get(unit.same_as.get(epoch)) if epoch is not None else None
        snapshot = "best"
    else:
        other = snapshot = None
        for best in by_name.values():
            if best.same_as and unit.name in best.same_as.values():
                epoch = es_epoch(os.path.dirname(os.path.dirname(best.outputs[0])))
                if epoch is not None and best.same_as.get(epoch) == unit.name:
                    other, snapshot = best, unit.command[unit.command.index("--snapshot") + 1]
                break
    if other is None or unit_state(other) != "done":  # not measured yet, or stale (made with other settings)
        return None
    from robust_flat.io import atomic_write_json

    with open(other.outputs[0]) as f:
        result = json.load(f)
    if result.get("same_as"):  # a copy itself: its source is the measurement
        return None
    result.update(snapshot=snapshot, same_as=os.path.basename(other.outputs[0]))
    atomic_write_json(unit.outputs[0], result, indent=2)
    record_settings(unit.command, unit.log)
    return other.name


def settings_key(command: Sequence[str]) -> list:
    """What identifies a unit's result: its command without the interpreter, the data location and ``--fresh``."""
    out, skip = [], False
    for a in list(command)[1:]:
        if skip:
            skip = False
            continue
        if a == "--data-dir":
            skip = True
            continue
        if a != "--fresh":
            out.append(a)
    return out


def _settings_path(log: str) -> str:
    return os.path.splitext(log)[0] + ".settings.json"


def record_settings(command: Sequence[str], log: str) -> None:
    """Written next to a unit's log when it succeeds: the settings its result was made with (see unit_state)."""
    from robust_flat.io import atomic_write_json

    atomic_write_json(_settings_path(log), settings_key(command))


def unit_state(unit: Unit) -> str:
    """``done``; ``stale`` (a measurement's result exists but was made with other settings than the grid now asks
    for: it is recomputed, with ``--fresh``); ``partial`` (resumable work left behind); or ``to do``."""
    if all(os.path.exists(p) for p in unit.outputs):
        if unit.kind != "train":  # training: the trainer itself refuses a run directory with another config
            try:
                with open(_settings_path(unit.log)) as f:
                    if json.load(f) != settings_key(unit.command):
                        return "stale"
            except (OSError, ValueError):
                pass  # made before settings were recorded, or by hand: taken as done
        return "done"
    if unit.kind == "train":
        return "partial" if os.path.isdir(unit.partial[0]) and os.listdir(unit.partial[0]) else "to do"
    if any(os.path.exists(p) and (not os.path.isdir(p) or _has_partial(p, unit)) for p in unit.partial):
        return "partial"
    return "to do"


def _has_partial(path: str, unit: Unit) -> bool:
    name = os.path.basename(unit.outputs[0])[:-5]
    return any(d.startswith(name + "-") for d in os.listdir(path))


def measured_seconds(unit: Unit) -> Optional[float]:
    """Wall time a done unit recorded in its own files (training: the epochs' ``time_s``; measures: ``time_s`` or
    ``seconds`` in the result), or None."""
    try:
        if unit.kind == "train":
            with open(os.path.join(os.path.dirname(unit.outputs[0]), "metrics.jsonl")) as f:
                return sum(float(json.loads(line).get("time_s", 0.0)) for line in f if line.strip()) or None
        with open(unit.outputs[0]) as f:
            d = json.load(f)
        t = d.get("time_s", d.get("seconds"))
        return float(t) if t else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def calibrate(units: Sequence[Unit]) -> dict[str, float]:
    """Per unit kind, the median ratio of measured to estimated time over the done units (the dry run's estimate
    then follows this machine's actual speed)."""
    ratios: dict[str, list[float]] = {}
    for u in units:
        if u.state == "done" and u.cost > 0:
            t = measured_seconds(u)
            if t:
                ratios.setdefault(u.kind, []).append(t / u.cost)
    return {k: sorted(v)[len(v) // 2] for k, v in ratios.items()}


# ------------------------------------------------------------------------------------------------ running
def run_unit(command: Sequence[str], log: str, done_marker: Optional[str] = None, in_process: bool = False) -> int:
    """Run one unit's command with its output appended to ``log``; returns the exit status. A training unit that
    finished writes ``done_marker`` (the trainer's own files do not say "finished" cheaply).

    ``in_process``: call the entry point's ``main(argv)`` in this process instead of starting ``python -m``, so the
    measurements of a run share one JAX start-up and the compiled programs of its earlier snapshots (the same
    model and shapes): 10-20 s less per unit on a CPU. Measurements only (training always gets its own process),
    one at a time: a unit that finds another one running in-process starts its own process instead."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(shlex.quote(c) for c in command)}\n")
        f.flush()
        entry = len(command) > 2 and command[1] == "-m" and command[2] != "experiments.cifar10_at"
        # one in-process unit at a time (it redirects this process's stdout); others meanwhile start a process
        if in_process and entry and _IN_PROCESS.acquire(blocking=False):
            try:
                rc = _run_in_process(command[2], list(command[3:]), f)
            finally:
                _IN_PROCESS.release()
        else:
            rc = _run_child(command, f)
    if rc == 0:
        record_settings(command, log)
        if done_marker:
            from robust_flat.io import atomic_write_text

            atomic_write_text(done_marker, time.strftime("%Y-%m-%d %H:%M:%S\n"))
    return rc


_LIVE: set = set()  # running unit processes, stopped with the grid
_STOPPING = threading.Event()
_IN_PROCESS = threading.Lock()


def _run_child(command: Sequence[str], out) -> int:
    if _STOPPING.is_set():
        return 130
    proc = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    _LIVE.add(proc)
    if _STOPPING.is_set():  # the grid stopped while this unit started: stop_children may not have seen it
        proc.terminate()
    try:
        return proc.wait()
    finally:
        _LIVE.discard(proc)


def stop_children(timeout: float = 120.0) -> None:
    """SIGTERM every running unit process and wait for it: the trainer saves a checkpoint and exits, the measures
    keep their finished pieces. A grid that is stopped never leaves a unit running on its own."""
    procs = list(_LIVE)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.time() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()


def _run_in_process(module_name: str, argv: list, out) -> int:
    import contextlib
    import importlib
    import traceback

    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            importlib.import_module(module_name).main(argv)
            return 0
        except SystemExit as e:
            if e.code not in (None, 0) and not isinstance(e.code, int):
                print(f"error: {e.code}")
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # the unit failed: its traceback goes to its log, the grid goes on
            traceback.print_exc()
            print(f"error: {type(e).__name__}: {e}")
            return 1
        finally:
            out.flush()


def _marker(unit: Unit) -> Optional[str]:
    return unit.outputs[0] if unit.kind == "train" else None


ORDERS = ("run", "snapshot")


def run_local(units: Sequence[Unit], workers: int = 1, log: Callable[[str], None] = print,
              order: str = "run") -> list[Unit]:
    """Run the units that are not done; a unit waits for the unit it needs. Returns the failed units. ``order``:
    ``run`` completes run after run (training_ahead's queue with several workers); ``snapshot`` trains every run
    first, then measures the final model of every run, then the early-stopped one, then the other snapshots epoch by
    epoch (snapshot_ahead), so a grid stopped halfway holds every run's final and best model measured."""
    if order not in ORDERS:
        raise GridError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    todo = [u for u in units if u.state != "done"]
    if order == "snapshot":
        todo = snapshot_ahead(todo)
    by_name = {u.name: u for u in units}
    failed: list[Unit] = []
    status: dict[str, str] = {u.name: "ok" for u in units if u.state == "done"}
    total = len(todo)
    t0 = time.time()

    def one(u: Unit, i: int) -> None:
        dep = by_name.get(u.after) if u.after else None
        if _STOPPING.is_set():
            return
        if dep is not None and status[dep.name] != "ok":
            status[u.name] = "skipped"
            log(f"[{i}/{total}] {u.name}: skipped ({dep.name} failed)")
            return
        same = reuse_same_model(u, by_name)
        if same is not None:
            status[u.name] = "ok"
            u.state = "done"
            log(f"[{i}/{total}] {u.name}: the same model as {same}, whose result is copied")
            return
        start = time.time()
        log(f"[{i}/{total}] {u.name}: {'resuming' if u.state == 'partial' else 'starting'} "
            f"(estimate {_fmt_s(u.cost)}; log {u.log})")
        rc = run_unit(u.command, u.log, _marker(u), in_process=True)
        status[u.name] = "ok" if rc == 0 else "failed"
        elapsed = time.time() - t0
        done = sum(1 for t in todo if t.name in status)
        eta = elapsed / done * (total - done) if done else 0.0
        if rc == 0:
            u.state = "done"
            log(f"[{i}/{total}] {u.name}: done in {_fmt_s(time.time() - start)} (grid ETA {_fmt_s(eta)})")
        elif _STOPPING.is_set() or rc in (130, 143):
            log(f"[{i}/{total}] {u.name}: stopped (it resumes when the grid runs again)")
        else:
            failed.append(u)
            log(f"[{i}/{total}] {u.name}: FAILED (exit {rc}); see {u.log}")

    if workers <= 1:
        for i, u in enumerate(todo, 1):
            one(u, i)
        return failed
    # A worker takes the first unit of the queue whose dependency has finished (training_ahead's order), so no
    # worker sits waiting for a training while another unit could run.
    pending = list(enumerate(training_ahead(todo) if order == "run" else todo, 1))
    lock = threading.Lock()

    def ready(u: Unit) -> bool:
        return not u.after or u.after not in by_name or u.after in status

    def worker() -> None:
        while not _STOPPING.is_set():
            with lock:
                if not pending:
                    return
                pick = next((k for k, (_, u) in enumerate(pending) if ready(u)), None)
                item = pending.pop(pick) if pick is not None else None
            if item is None:
                time.sleep(0.2)
                continue
            i, u = item
            one(u, i)

    pool = ThreadPoolExecutor(workers)
    try:
        for future in [pool.submit(worker) for _ in range(workers)]:
            future.result()
    except KeyboardInterrupt:
        _STOPPING.set()  # waiting units return instead of starting, finishing ones say "stopped"
        pool.shutdown(wait=False, cancel_futures=True)
        stop_children()
        raise
    pool.shutdown()
    return failed


def training_ahead(units: Sequence[Unit]) -> list[Unit]:
    """The queue for parallel workers: each run's training before the measurements of the run before it (train 1,
    train 2, measure 1, train 3, measure 2, ...), so one worker trains while another measures and finished runs
    are complete early."""
    runs = list(dict.fromkeys(u.run for u in units))
    train = {u.run: u for u in units if u.kind == "train"}
    out: list[Unit] = []
    for i, run in enumerate(runs):
        if i == 0 and run in train:
            out.append(train[run])
        if i + 1 < len(runs) and runs[i + 1] in train:
            out.append(train[runs[i + 1]])
        out.extend(u for u in units if u.run == run and u.kind != "train")
    return out


def run_submitit(units: Sequence[Unit], folder: str, *, cluster: Optional[str] = None, partition: Optional[str] = None,
                 gpus: int = 1, cpus: int = 8, time_min: int = 720, log: Callable[[str], None] = print
                 ) -> list[Unit]:
    """Submit the units through submitit: the training units as one job array, then each run's measurements as a
    job array that depends on its training job (SLURM ``afterok``). ``cluster="local"`` (tests, no SLURM) runs
    the jobs as local processes; it has no dependencies, so the measurements are submitted once training ended.
    Waits for all jobs; returns the failed units."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params: dict[str, Any] = dict(timeout_min=time_min, cpus_per_task=cpus)
    if executor.cluster == "slurm":
        params.update(slurm_partition=partition, gpus_per_node=gpus) if partition else params.update(
            gpus_per_node=gpus)
    executor.update_parameters(**params)
    todo = [u for u in units if u.state != "done"]
    trains = [u for u in todo if u.kind == "train"]
    jobs: dict[str, Any] = {}
    if trains:
        with executor.batch():
            for u in trains:
                jobs[u.name] = executor.submit(run_unit, u.command, u.log, _marker(u))
        log(f"submitted {len(trains)} training job(s): {', '.join(str(j.job_id) for j in jobs.values())}")
    failed: list[Unit] = []
    rest = [u for u in todo if u.kind != "train"]
    by_run: dict[str, list[Unit]] = {}
    for u in rest:
        by_run.setdefault(u.after, []).append(u)
    for after, group in by_run.items():
        dep = jobs.get(after)
        if dep is not None:
            if executor.cluster == "slurm":
                executor.update_parameters(slurm_additional_parameters={"dependency": f"afterok:{dep.job_id}"})
            elif _job_rc(dep) != 0:
                log(f"{after} failed: skipping its {len(group)} measurement(s)")
                failed.extend(u for u in [next(t for t in trains if t.name == after)] if u not in failed)
                continue
        with executor.batch():
            for u in group:
                jobs[u.name] = executor.submit(run_unit, u.command, u.log)
        log(f"submitted {len(group)} measurement job(s) of {after.split('/')[0]}")
    for name, job in jobs.items():
        u = next(t for t in todo if t.name == name)
        if _job_rc(job) != 0 and u not in failed:
            failed.append(u)
            log(f"{name}: FAILED; see {u.log}")
    return failed


def _job_rc(job) -> int:
    try:
        return int(job.result())
    except Exception:  # the job crashed, was cancelled or timed out
        return 1


# ------------------------------------------------------------------------------------------------ command line
def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def grid_record(grid, runs: Sequence[Run], path: str) -> dict:
    return {"name": grid.get("name", os.path.basename(path)), "grid_file": path,
            "description": grid.get("description", ""),
            "runs": [{"label": r.label, "config": r.config, "preset": r.preset, "method": r.method,
                      "group": r.group, "seed": r.seed, "overrides": dict(r.overrides), "epochs": r.epochs,
                      "snapshot_every": r.snapshot_every} for r in runs],
            "eps": grid.get("eps", None),
            "measures": check_measures(grid, runs)}  # with the grid's eps in each measure that takes it


def snapshot_ahead(units: Sequence[Unit]) -> list[Unit]:
    """The queue of ``--order snapshot``: every training (in run order), then the measurements stage by stage (the
    final model of every run, the early-stopped model of every run, then each other snapshot epoch), in run order
    within a stage."""
    train = [u for u in units if u.kind == "train"]
    return train + sorted((u for u in units if u.kind != "train"), key=lambda u: u.stage)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.grid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="grid file, e.g. experiments/grids/cpu.py")
    p.add_argument("--data-dir", default=None, help="dataset files (passed to every unit)")
    p.add_argument("--root", default=None, help="where the run directories go (default: the grid's root)")
    p.add_argument("--dry-run", action="store_true", help="list the units, their state and the time estimate")
    p.add_argument("--only", default=None, help="comma-separated run labels to run (default: all)")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local")
    p.add_argument("--workers", type=int, default=1, help="local launcher: units at once")
    p.add_argument("--order", choices=ORDERS, default="run",
                   help="local launcher: 'run' completes one run after the other; 'snapshot' trains every run first, "
                        "then measures every run's final model, then every early-stopped model, then the other "
                        "snapshots epoch by epoch (a grid stopped early still compares all runs)")
    p.add_argument("--partition", default=None, help="slurm: partition")
    p.add_argument("--gpus", type=int, default=1, help="slurm: GPUs per job")
    p.add_argument("--cpus", type=int, default=8, help="slurm: CPUs per job")
    p.add_argument("--time-min", type=int, default=720, help="slurm: time limit per job in minutes")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be >= 1")
    grid = load_grid(args.grid)
    root = args.root or grid.get("root", os.path.join("runs", "grid"))
    data_dir = args.data_dir or grid.get("data_dir", None) or None
    runs, units = plan(grid, root, data_dir)
    if args.only:
        keep = set(args.only.split(","))
        unknown = keep - {r.label for r in runs}
        if unknown:
            raise GridError(f"--only names runs the grid does not list: {', '.join(sorted(unknown))}")
        units = [u for u in units if u.run in keep]
    counts = {s: sum(u.state == s for u in units) for s in STATES}
    scale = calibrate(units)
    left = sum(u.cost * scale.get(u.kind, 1.0) for u in units if u.state != "done")
    if args.dry_run:
        width = max(len(u.name) for u in units)
        for u in units:
            print(f"{u.name:<{width}}  {u.state:<7}  ~{_fmt_s(u.cost):>7}  {u.kind}")
        basis = (f"scaled by the measured time of done units ({', '.join(f'{k} x{v:.2f}' for k, v in scale.items())})"
                 if scale else "from the grid's cost settings")
        print(f"{len(units)} units: {counts['done']} done, {counts['stale']} stale, {counts['partial']} partial, "
              f"{counts['to do']} to do; "
              f"estimated {_fmt_s(left)} left, {basis}")
        return 0
    if data_dir is None and any(r for r in runs):
        print("note: no --data-dir: the units load data through tensorflow-datasets", file=sys.stderr)
    from robust_flat.io import atomic_write_json

    os.makedirs(root, exist_ok=True)
    atomic_write_json(os.path.join(root, "grid.json"), grid_record(grid, runs, args.grid), indent=2)
    print(f"grid {grid.get('name', args.grid)} in {root}: {counts['done']} of {len(units)} units done, "
          f"{len(units) - counts['done']} to run (estimated {_fmt_s(left)})", flush=True)
    if args.launcher == "slurm":
        failed = run_submitit(units, os.path.join(root, "_submitit"), partition=args.partition, gpus=args.gpus,
                              cpus=args.cpus, time_min=args.time_min)
    else:
        failed = run_local(units, args.workers, log=lambda m: print(m, file=sys.__stdout__, flush=True),
                           order=args.order)
    if failed:
        print(f"{len(failed)} unit(s) failed: " + ", ".join(f"{u.name} ({u.log})" for u in failed), file=sys.stderr)
        return 1
    print(f"grid complete: {len(units)} units in {root}; next: python -m experiments.report {root}")
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def cli(argv: Optional[list[str]] = None) -> None:
    """``python -m experiments.grid``; exits with 0, 1 (a unit failed), 2 (a grid that cannot run) or 130 (stopped by
    Ctrl-C or SIGTERM, e.g. SLURM preemption). A stop is prompt even while a measurement runs inside this process: its
    thread cannot be interrupted, so the process ends without waiting for it (its finished pieces are on disk and it
    resumes), after the unit processes were stopped cleanly."""
    import signal

    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        code = main(argv)
    except GridError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        _STOPPING.set()
        stop_children()
        print("\ninterrupted: finished units are kept (and the unit in flight resumes); run the same command again "
              "to go on", file=sys.__stderr__, flush=True)  # (an in-process unit redirects sys.stderr to its log)
        sys.__stdout__.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    cli()

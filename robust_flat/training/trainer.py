"""The one trainer every method shares: data stream, sharded jitted step, checkpoints, resume, monitoring.

A method only supplies ``make_step(config, apply_fn, tx) -> step(state, batch, rng) -> (state, metrics)``
(:mod:`robust_flat.training`). The trainer owns everything else:

* resume: a rerun with the same command restores the newest intact rolling checkpoint and continues bit-identically
  (batches and step keys are pure functions of the seed and the step). The epoch-end writes come in a fixed order,
  the rolling checkpoint last, and every checkpoint write is idempotent, so an interruption at any instruction
  (before the first checkpoint, between the epoch-end writes, inside a write) resumes and ends bit-identical to an
  uninterrupted run; a damaged newest checkpoint (checksum) falls back to the previous one with a warning;
* one writer per run directory (:mod:`robust_flat.run_lock`); a second job on it is refused;
* Ctrl-C / SIGTERM: finish the current step, save, exit with status 130 / 143;
* a NaN or inf loss stops the run with an error naming the step; the last good checkpoint is kept;
* a step loop plus evaluators (:func:`robust_flat.training.monitor.make_evaluators`), each with its own schedule:
  per-epoch clean and robust loss/error on train and test subsets, and robust test error on the last 500 test
  images (PGD-7, 5 restarts: the paper's early stopping) at snapshot epochs, whose best epoch is kept as the
  ``best`` checkpoint; their metrics -> ``RUN/metrics.jsonl`` (with a progress bar; the START line gives their
  cost relative to an epoch, :func:`robust_flat.training.monitor.eval_cost`), and curves -> ``RUN/curves.png``
  (:mod:`robust_flat.curves`, rewritten every epoch; a plotting error is logged once and never stops the run);
* snapshots every ``snapshot_every`` epochs and after the last (a :class:`~robust_flat.training.monitor.Schedule`);
* weight averaging (``ema.enabled``): at every epoch end the averaged weights get batch-norm statistics of their
  own (:func:`robust_flat.training.averaging.recalibrate`, stored in the state, so in every checkpoint) and are
  evaluated like the raw ones (``ema_train_*``, ``ema_test_*``, ``ema_es_robust_error``); their own best epoch by
  early stopping is ``best_ema_epoch`` in the checkpoint metadata (``load_run(run, "best_ema")`` loads that
  epoch's snapshot; no separate checkpoint);
* data parallelism over all devices with ``jax.sharding`` (batch split on a ``data`` mesh axis), also across the
  processes of a multi-host run (:mod:`robust_flat.distributed`): each process gathers only its devices' rows of
  every batch, process 0 alone writes the log, metrics and config, and orbax writes each checkpoint once.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from robust_flat import data as data_lib
from robust_flat import distributed, models, xla
from robust_flat.io import atomic_write_text
from robust_flat.checkpoint import Checkpointer
from robust_flat.run_lock import RunLock, RunLocked
from robust_flat.training import make_step
from robust_flat.training.averaging import recalibrate
from robust_flat.training.monitor import Schedule, bn_batches, eval_cost, make_evaluators
from robust_flat.runs import build, restore_state
from robust_flat.training.state import TrainState
from robust_flat.training.update import augmentation


class TrainingError(RuntimeError):
    """A run cannot continue (bad config, NaN loss, mismatching run directory). The message says why."""


class Interrupted(Exception):
    def __init__(self, signum):
        self.signum = signum


# Config entries that may differ between a run and its resumption (where the data lives, not what it is).
_VOLATILE_KEYS = {("data", "data_dir"), ("debug", "sigkill_at_step"), ("debug", "sigkill_at_save"),
                  ("debug", "sigkill_save_delay_ms")}
# Options added after runs were written: a run whose config.json lacks one ran as this value, so it resumes when the
# new config has this value (its default).
_ADDED_KEYS = {("attack", "tau"): -1, ("data", "label_noise"): 0.0, ("train", "label_smoothing"): 0.0,
               ("ema", "bn_batches"): 0, ("attack", "step_rule"): "fixed", ("data", "autoaugment"): False,
               ("data", "cutout"): 0, ("data", "extra_path"): "", ("data", "extra_fraction"): 0.5,
               ("model", "whitening"): "cifar10", ("data", "synthetic_image_size"): 32}


def _flatten(d, prefix=()):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def config_to_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


def has_rolling_checkpoint(run_dir: str) -> bool:
    """Whether training has written a rolling checkpoint (intact or not) under ``run_dir``."""
    latest = os.path.join(run_dir, "checkpoints", "latest")
    return os.path.isdir(latest) and any(name.isdigit() for name in os.listdir(latest))


def prepare_run_dir(run_dir: str, config, write: bool = True, log=None) -> None:
    """Create the run directory and write ``config.json``, or check that an existing one has the same config.
    A run that has no rolling checkpoint yet (it failed or was stopped before its first one: nothing trained) takes
    the new config, and what it wrote is cleared. ``write=False`` only checks (the non-primary processes of a
    multi-host run)."""
    path = os.path.join(run_dir, "config.json")
    new = config_to_dict(config)
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            old = e
        if not has_rolling_checkpoint(run_dir):
            if isinstance(old, dict) and _config_diff(old, new) and write:
                shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
                if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
                    os.remove(os.path.join(run_dir, "metrics.jsonl"))
                if log:
                    log(f"NEW CONFIG: {run_dir} had no rolling checkpoint yet; its config is replaced "
                        f"({_describe(_config_diff(old, new), old, new)})")
            if write:
                atomic_write_text(path, json.dumps(new, indent=2, sort_keys=True) + "\n")
            return
        if not isinstance(old, dict):
            raise TrainingError(f"{path} is unreadable ({old}); use a new --run-dir")
        diff = _config_diff(old, new)
        if diff:
            raise TrainingError(f"run directory {run_dir} holds a run with a different config "
                                f"({_describe(diff, old, new)}); rerun with the same config to resume, or pass a "
                                "new --run-dir")
        return
    os.makedirs(run_dir, exist_ok=True)
    if write:
        atomic_write_text(path, json.dumps(new, indent=2, sort_keys=True) + "\n")


def _as_ran(config: dict) -> dict:
    """A config, flattened, with the options added since it was written at the values it ran with (both sides of a
    comparison: a config built without such an option, as experiments.import_torch's model dict, means the same)."""
    flat = _flatten(config)
    return {**{k: v for k, v in _ADDED_KEYS.items() if k not in flat}, **flat}


def _config_diff(old: dict, new: dict) -> list:
    a, b = _as_ran(old), _as_ran(new)
    return sorted(k for k in set(a) | set(b) if k not in _VOLATILE_KEYS and a.get(k) != b.get(k))


def _describe(diff: list, old: dict, new: dict) -> str:
    a, b = _as_ran(old), _as_ran(new)
    return ", ".join(f"{'.'.join(k)}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:4])


def _truncate_metrics(path: str, completed_epochs: int) -> None:
    """Drop metric lines of epochs that the restored checkpoint has not completed (they will be recomputed)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    keep = []
    for ln in lines:
        try:
            if json.loads(ln)["epoch"] <= completed_epochs:
                keep.append(ln)
        except (json.JSONDecodeError, KeyError):
            pass  # a torn last line from a killed job
    atomic_write_text(path, "".join(keep))


def _append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def load_data(config, log):
    d = config.data
    synthetic = data_lib.synthetic_config(d)
    x_train, y_train = data_lib.load_split(d.dataset, "train", d.data_dir or None, d.pixel_scale, **synthetic)
    x_test, y_test = data_lib.load_split(d.dataset, "test", d.data_dir or None, d.pixel_scale, **synthetic)
    if d.train_examples:
        x_train, y_train = x_train[:d.train_examples], y_train[:d.train_examples]
    for split, y in (("training", y_train), ("test", y_test)):  # a test label out of range would give a NaN loss
        if len(y) and int(y.max()) >= config.model.num_classes:
            raise TrainingError(f"{split} labels go up to {int(y.max())} but the model has "
                                f"{config.model.num_classes} classes; set --config.model.num_classes or fix the data")
    if d.label_noise:  # once, here: every example keeps its noisy label for the whole run and its resumptions
        from robust_flat.training.labels import noisy_labels

        noisy = noisy_labels(y_train, d.label_noise, config.seed, config.model.num_classes)
        log(f"DATA: label noise tau = {d.label_noise} (seed {config.seed}): {int((noisy != y_train).sum())} of "
            f"{len(y_train)} training labels changed")
        y_train = noisy
    if d.dataset == "synthetic":
        log("DATA: synthetic (generated by robust_flat.data.synthetic, NOT CIFAR-10): "
            f"{len(x_train)} train / {len(x_test)} test images, for smoke runs only")
    else:
        log(f"DATA: {d.dataset} from {d.data_dir or 'tensorflow-datasets'}: {len(x_train)} train / "
            f"{len(x_test)} test images")
    return x_train, y_train, x_test, y_test


def load_extra(config, image_shape, log):
    """The extra pseudo-labelled training data of ``data.extra_path`` (:func:`robust_flat.data.load_extra`), or
    ``None`` without one."""
    d = config.data
    if not d.get("extra_path", ""):
        return None
    x, y = data_lib.load_extra(d.extra_path, image_shape, config.model.num_classes, d.pixel_scale)
    log(f"DATA: {len(x)} extra pseudo-labelled images from {d.extra_path}, "
        f"{data_lib.extra_count(config.train.batch_size, d.extra_fraction)} of every mini-batch of "
        f"{config.train.batch_size}")
    return x, y


def _write_curves(run_dir: str, log, warned: list) -> None:
    """``RUN/curves.png`` from ``RUN/metrics.jsonl``; any error is logged once (``warned``) and never raised."""
    try:
        from robust_flat.curves import write_curves

        write_curves(run_dir)
    except Exception as e:  # a plot must never end a training run
        if not warned:
            warned.append(e)
            log(f"WARNING: curves.png not written ({type(e).__name__}: {e}); training goes on (shown once)")


def _eval_cost_text(config, n_train: int, n_test: int) -> str:
    cost = eval_cost(config, n_train, n_test)
    text = f"per-epoch evaluation ~{cost['ratio']:.2f} x an epoch's cost"
    if cost["ema_bn"]:
        text += f" (weight averaging: its own evaluations and batch-norm recalibration included)"
    if cost["ratio"] > 0.25:
        text += " (over 0.25: lower eval.n_examples or eval.es_restarts, or raise checkpoint.snapshot_every)"
    return text


# The jitted train steps of this process, by config (tests and notebooks train several runs of one config in one
# process: a resumed run reuses the compiled step). Not read inside jitted code.
_STEP_CACHE: dict = {}


def _jitted_step(config, model, tx, steps_per_epoch: int, mesh):
    """``jit((state, batch) -> (state, metrics))`` of the config's method, sharded over ``mesh``."""
    identity = {k: v for k, v in _flatten(config_to_dict(config)).items() if k not in _VOLATILE_KEYS}
    key = (json.dumps(sorted(identity.items(), key=str), default=str), steps_per_epoch,
           tuple(d.id for d in mesh.devices.flat))
    if key not in _STEP_CACHE:
        step_fn = make_step(config, models.make_apply_fn(model), tx)

        def step_with_key(state, batch):
            return step_fn(state, batch, jax.random.fold_in(state.rng, state.step))

        repl, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        while len(_STEP_CACHE) >= 4:
            _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
        _STEP_CACHE[key] = xla.jit(step_with_key, in_shardings=(repl, sharded), out_shardings=(repl, repl),
                                   donate_argnums=(0,))
    return _STEP_CACHE[key]


def train(config, run_dir: str, progress: bool = True) -> TrainState:
    """Train (or resume) the run ``run_dir`` with ``config``; returns the final state."""
    os.makedirs(run_dir, exist_ok=True)
    primary = jax.process_index() == 0  # multi-host: process 0 alone writes files, prints and holds the lock
    lock = RunLock(run_dir)
    if primary:
        try:
            lock.acquire()
        except RunLocked as e:
            raise TrainingError(str(e)) from None
    try:
        return _train(config, run_dir, progress, primary)
    finally:
        lock.release()


def _train(config, run_dir: str, progress: bool, primary: bool) -> TrainState:
    log_path = os.path.join(run_dir, "log.txt")
    n_proc = jax.process_count()

    def log(msg: str) -> None:
        if not primary:
            return
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stdout)
        with open(log_path, "a") as f:
            f.write(msg + "\n")

    prepare_run_dir(run_dir, config, write=primary, log=log)
    x_train, y_train, x_test, y_test = load_data(config, log)
    extra = load_extra(config, x_train.shape[1:], log)
    # a step may consume several mini-batches (Entropy-SGD: L + 1); the step function receives them as one batch
    per_step = int(config.train.get("batches_per_step", 1))
    if per_step < 1 or config.train.batch_size < 1:
        raise TrainingError(f"train.batch_size ({config.train.batch_size}) and train.batches_per_step ({per_step}) "
                            "must be >= 1")
    bs = config.train.batch_size * per_step
    n_dev = jax.device_count()
    if bs % n_dev:
        raise TrainingError(f"batch size {bs} is not divisible by the {n_dev} devices"
                            + (f" of the {n_proc} processes" if n_proc > 1 else ""))
    steps_per_epoch = len(x_train) // bs
    if steps_per_epoch == 0:
        raise TrainingError(f"batch size {bs} exceeds the {len(x_train)} training examples")
    total = steps_per_epoch * config.train.epochs
    model, tx, state = build(config, x_train.shape[1:], steps_per_epoch)
    logits_fn = models.make_logits_fn(model, train=False)

    # all devices of all processes, grouped by process so each process's rows of a batch are contiguous
    mesh = Mesh(np.asarray(sorted(jax.devices(), key=lambda d: (d.process_index, d.id))), ("data",))
    repl, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    rows = distributed.process_rows(sharded, bs)
    jstep = _jitted_step(config, model, tx, steps_per_epoch, mesh)
    ema = bool(config.ema.enabled)
    if ema and config.train.batch_size % n_dev:
        raise TrainingError(f"weight averaging recalibrates batch-norm statistics on batches of train.batch_size "
                            f"({config.train.batch_size}), which is not divisible by the {n_dev} devices")

    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), keep_latest=config.checkpoint.keep_latest)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    meta = {"best_robust_error": None, "best_epoch": None}
    if ema:  # the averaged weights' own early-stopping choice, and the step their statistics were recalibrated at
        meta.update(best_ema_robust_error=None, best_ema_epoch=None, ema_bn_step=0)
    input_shape = [int(d) for d in x_train.shape[1:]]  # stored with every checkpoint: loading needs no data
    n_saves = [0]

    def save(which: str, at: int, state, save_meta: dict) -> None:
        """Every checkpoint write of the run, in order (the debug options kill the process at the N-th one)."""
        if n_saves[0] == config.debug.get("sigkill_at_save", -1):
            delay_ms = float(config.debug.get("sigkill_save_delay_ms", 0.0))
            if delay_ms > 0:  # from a timer thread: usually lands inside the write
                threading.Timer(delay_ms / 1000, os.kill, (os.getpid(), signal.SIGKILL)).start()
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        n_saves[0] += 1
        ckpt.save(which, at, state, {**save_meta, "input_shape": input_shape,
                                     **({"ema_bn_step": meta.get("ema_bn_step", 0)} if ema else {})})

    # replicated before the first save or restore: multi-host, orbax then writes each array once (from process 0)
    # and every process restores the same values; device_get gives device_put host arrays, equal on all processes
    state = jax.device_put(jax.device_get(state) if n_proc > 1 else state, repl)
    if ckpt.latest_step() is not None:
        newest = ckpt.latest_step()
        state, meta, restored, damaged = ckpt.restore_intact(
            "latest", target=state, restore=lambda which, step, target: restore_state(ckpt, which, step, target))
        for bad, why in damaged:
            log(f"WARNING: {why}; resuming from the previous intact checkpoint instead (step {restored}): "
                f"{bad - restored} steps are redone")
        meta = dict(meta)
        meta.pop("input_shape", None)
        log(f"RESUME: step {int(state.step)} of {total} (epoch {int(state.step) // steps_per_epoch})"
            + (f", newest checkpoint step {newest} was damaged" if damaged else ""))
        if primary:
            _truncate_metrics(metrics_path, int(state.step) // steps_per_epoch)
        running = meta.pop("running", None) or {"sums": {}, "count": 0}
    else:
        log(f"START: {config.method} {config.model.name} {total} steps ({config.train.epochs} epochs x "
            f"{steps_per_epoch}), batch {bs}"
            + (f" ({per_step} x {config.train.batch_size})" if per_step > 1 else "")
            + f" on {n_dev} device(s) [{jax.default_backend()}]"
            + (f" in {n_proc} processes" if n_proc > 1 else "")
            + "; " + _eval_cost_text(config, len(x_train), len(x_test)))
        if primary:
            _truncate_metrics(metrics_path, 0)
        save("snapshots", 0, state, {"epoch": 0, "step": 0})
        running = {"sums": {}, "count": 0}

    es_x, es_y = data_lib.subset(x_test, y_test, "test_last500")
    n_eval = config.eval.n_examples
    evaluators = make_evaluators(config, logits_fn, {
        "curves": {"train": (x_train[:n_eval].astype(np.float32) / 255.0, y_train[:n_eval]),
                   "test": (x_test[:n_eval].astype(np.float32) / 255.0, y_test[:n_eval])},
        "es": (es_x.astype(np.float32) / 255.0, es_y)})
    snapshots = Schedule(config.checkpoint.snapshot_every)
    apply_fn = models.make_apply_fn(model)
    bn_rows = distributed.process_rows(sharded, config.train.batch_size) if ema else None

    def recalibrated(state, epoch: int):
        """The averaged weights' batch-norm statistics after ``epoch``: :func:`recalibrate` on ``bn_batches`` clean
        training batches of ``train.batch_size``, the data order of epoch ``epoch`` (and on) at that batch size."""
        bs1, per_epoch = config.train.batch_size, len(x_train) // config.train.batch_size
        batches = (distributed.global_batch(
            lambda r, i=i: data_lib.train_batch(x_train, y_train, config.seed, (epoch - 1) * per_epoch + i, bs1,
                                                rows=r), sharded, bs1, bn_rows)
            for i in range(bn_batches(config, len(x_train))))
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2_000_000 + epoch)
        stats = recalibrate(apply_fn, state.ema_params, state.ema_model_state, batches, key, augmentation(config))
        return state.replace(ema_model_state=jax.device_put(stats, repl))

    stop = {"signum": None}

    def on_signal(signum, frame):
        stop["signum"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    step = int(state.step)
    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, unit="step", disable=not (progress and primary), dynamic_ncols=True,
               file=sys.stdout)
    # running means of the step metrics over the current epoch; checkpointed so a resumed epoch reports the same
    sums, count, t_epoch = dict(running["sums"]), int(running["count"]), time.time()
    local = 0  # steps of this epoch run by this process (for images/s)
    curves_warned = []  # a failing plot is reported once

    def checkpoint_meta():
        return {**meta, "epoch": step // steps_per_epoch, "step": step, "steps_per_epoch": steps_per_epoch,
                "running": {"sums": sums, "count": count}}

    def batch_rows(r):
        """This process's rows ``r`` of batch ``step``: training examples, mixed with the extra data's share of
        every mini-batch when there is extra data; a function of (seed, step) either way."""
        if extra is None:
            return data_lib.train_batch(x_train, y_train, config.seed, step, bs, rows=r)
        return data_lib.mixed_train_batch(x_train, y_train, *extra, config.seed, step, bs, config.data.extra_fraction,
                                          chunk=config.train.batch_size, rows=r)

    try:
        while step < total:
            batch = distributed.global_batch(batch_rows, sharded, bs, rows)
            t0 = time.time()
            state, metrics = jstep(state, batch)
            metrics = jax.device_get(metrics)
            if not all(math.isfinite(float(v)) for v in metrics.values()):
                kept = ckpt.latest_step()
                raise TrainingError(f"non-finite training metrics at step {step + 1} (epoch "
                                    f"{step // steps_per_epoch + 1}): {metrics}; "
                                    + (f"the last good checkpoint (step {kept}) is kept" if kept is not None else
                                       "no checkpoint was written yet") + ". Lower the learning rate or check the "
                                    "data")
            step += 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += 1
            local += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(metrics['batch_loss']):.3f}",
                            err=f"{float(metrics['batch_error']):.3f}", img_s=f"{bs / (time.time() - t0):.0f}")
            if config.debug.sigkill_at_step == step:
                ckpt.close()
                os.kill(os.getpid(), signal.SIGKILL)
            epoch_end = step % steps_per_epoch == 0
            if epoch_end:
                epoch = step // steps_per_epoch
                record = {"epoch": epoch, "step": step, "time_s": round(time.time() - t_epoch, 2),
                          "images_per_s": round(local * bs / max(time.time() - t_epoch, 1e-9), 1),
                          **{k: v / count for k, v in sums.items()}}
                last = step == total
                t_eval = time.time()
                if ema:
                    state = recalibrated(state, epoch)
                    meta["ema_bn_step"] = step
                due = [ev for ev in evaluators if ev.schedule.due(epoch, last)]
                ebar = tqdm(total=sum(ev.images for ev in due), unit="img", leave=False,
                            disable=not (progress and primary), dynamic_ncols=True, file=sys.stdout)
                results = {}
                for ev in due:
                    ebar.set_description(f"epoch {epoch} {ev.label}")
                    results[ev.name] = ev.run(state, epoch, ebar.update)
                    evals = ev.record(results[ev.name])
                    if set(evals) & set(record):  # a step metric must never be overwritten by an evaluation
                        raise TrainingError(f"metric names collide: {sorted(set(evals) & set(record))}")
                    record.update(evals)
                ebar.close()
                # early stopping: the raw weights' best epoch is the "best" checkpoint (written first of the
                # epoch-end writes); the averaged weights' best is only recorded (its snapshot holds them)
                res = results.get("es")
                if res is not None and (meta.get("best_robust_error") is None
                                        or res["robust_error"] < meta["best_robust_error"]):
                    meta.update(best_robust_error=res["robust_error"], best_epoch=epoch)
                    save("best", epoch, state, {"epoch": epoch, "step": step, **res})
                res = results.get("ema_es")
                if res is not None and (meta.get("best_ema_robust_error") is None
                                        or res["robust_error"] < meta["best_ema_robust_error"]):
                    meta.update(best_ema_robust_error=res["robust_error"], best_ema_epoch=epoch)
                t_eval = time.time() - t_eval
                if primary:
                    _append_jsonl(metrics_path, record)
                    _write_curves(run_dir, log, curves_warned)
                if snapshots.due(epoch, last):
                    save("snapshots", epoch, state, {"epoch": epoch, "step": step})
                log(f"epoch {epoch}/{config.train.epochs}: " + ", ".join(
                    f"{k} {v:.4f}" for k, v in record.items()
                    if isinstance(v, float) and k not in ("time_s", "images_per_s"))
                    + f" [train {record['time_s']:.1f} s, {record['images_per_s']:.0f} img/s; eval {t_eval:.1f} s]")
                sums, count, local, t_epoch = {}, 0, 0, time.time()
            if epoch_end or step % config.checkpoint.every_steps == 0 or step == total:
                save("latest", step, state, checkpoint_meta())
            if n_proc > 1:  # all processes stop at the same step (a signal may reach only some, or at different steps)
                from jax.experimental import multihost_utils
                stop["signum"] = int(np.max(multihost_utils.process_allgather(np.int32(stop["signum"] or 0)))) or None
            if stop["signum"] is not None:
                raise Interrupted(stop["signum"])
        log(f"DONE: {total} steps; best epoch by early stopping: {meta.get('best_epoch')} "
            f"(robust error {meta.get('best_robust_error')})"
            + (f"; of the averaged weights: {meta.get('best_ema_epoch')} (robust error "
               f"{meta.get('best_ema_robust_error')})" if ema else ""))
    except Interrupted as e:
        if ckpt.latest_step() != step:  # not yet saved at this step (a signal during a checkpoint step)
            save("latest", step, state, checkpoint_meta())
        log(f"INTERRUPTED by signal {e.signum} at step {step}: saved; rerun the same command to resume")
        bar.close()
        ckpt.close()
        raise SystemExit(128 + e.signum)
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    ckpt.close()
    return state

"""Adversarial training on CIFAR-10 (and friends): trains, snapshots, resumes.

    python -m experiments.cifar10_at                      # offline smoke run (synthetic data, small CNN)
    python -m experiments.cifar10_at --config=experiments/configs/pgd_at.py --data-dir /path/to/cifar10 \
        --run-dir runs/at_resnet18                        # the paper's recipe
    python -m experiments.cifar10_at --config=experiments/configs/pgd_at.py:cpu --data-dir DIR \
        --config.train.epochs=5 --config.model.activation=silu   # overrides: --config.<field>=<value>

Rerunning the same command resumes from the newest checkpoint in --run-dir. Ctrl-C saves and exits.

Multi-host data parallel (one process per host or GPU, the same command on each; README "Multi-host"):

    python -m experiments.cifar10_at ... --coordinator HOST0:PORT --num-processes N --process-id I
    srun python -m experiments.cifar10_at ... --distributed=auto   # SLURM / Open MPI / TPU: detected
"""
from __future__ import annotations

import os
import signal
import sys


def _exit_before_training(signum, frame):
    # Until the trainer installs its own handler (which saves a checkpoint) nothing needs saving; an exception
    # raised here could land inside an extension module's import (seen: a segfault in jaxlib), so exit directly.
    os.write(2, b"\ninterrupted before training started; nothing was lost, run the same command again\n")
    os._exit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _exit_before_training)

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "pgd_at.py") + ":smoke",
    "Config file, optionally with a preset: path/to/config.py[:paper|smoke|cpu|tiny]. Default: the offline "
    "smoke run.", lock_config=True)
_RUN_DIR = flags.DEFINE_string("run-dir", None, "Run directory (default: runs/<method>_<model>_<dataset>).")
_DATA_DIR = flags.DEFINE_string("data-dir", None, "Local dataset files (see robust_flat.data); sets "
                                "config.data.data_dir.")
_NO_PROGRESS = flags.DEFINE_bool("no-progress", False, "Disable the progress bar.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "off", ["off", "auto"],
                                 "Multi-host training: 'auto' detects coordinator, process count and id under SLURM, "
                                 "Open MPI or on a TPU pod (flags below override); 'off' unless --coordinator is "
                                 "given.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0 for multi-host training (the same "
                                   "on every process).")
_NUM_PROCESSES = flags.DEFINE_integer("num-processes", None, "Number of processes of a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process-id", None, "This process's id in [0, num-processes).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from robust_flat import distributed
    from robust_flat.checkpoint import CheckpointError
    from robust_flat.data import DataError
    from robust_flat.training.trainer import TrainingError, train

    try:  # before anything touches a JAX backend
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               auto=_DISTRIBUTED.value == "auto")
    except ValueError as e:
        print(f"error: {e} (flags --coordinator, --num-processes, --process-id, --distributed=auto)",
              file=sys.stderr)
        sys.exit(2)
    config = _CONFIG.value
    if _DATA_DIR.value and config.data.dataset == "synthetic":
        print(f"error: --data-dir {_DATA_DIR.value} but this config trains on generated synthetic data "
              "(config.data.dataset=synthetic, the smoke/tiny presets); pick a real-data preset, e.g. "
              "--config=experiments/configs/pgd_at.py:cpu, or drop --data-dir", file=sys.stderr)
        sys.exit(2)
    if _DATA_DIR.value:
        with config.unlocked():
            config.data.data_dir = _DATA_DIR.value
    run_dir = _RUN_DIR.value or os.path.join("runs", f"{config.method}_{config.model.name}_{config.data.dataset}")
    try:
        train(config, run_dir, progress=not _NO_PROGRESS.value)
    except (DataError, TrainingError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    import jax

    if jax.process_index() == 0:
        print(f"run directory: {run_dir}")


if __name__ == "__main__":
    app.run(main)

"""Adversarial training on CIFAR-10 (and friends): trains, snapshots, resumes.

    python -m experiments.cifar10_at                      # offline smoke run (synthetic data, small CNN)
    python -m experiments.cifar10_at --config=experiments/configs/pgd_at.py --data-dir /path/to/cifar10 \
        --run-dir runs/at_resnet18                        # the paper's recipe
    python -m experiments.cifar10_at --config=experiments/configs/pgd_at.py:cpu --data-dir DIR \
        --config.train.epochs=5 --config.model.activation=silu   # overrides: --config.<field>=<value>

Rerunning the same command resumes from the newest checkpoint in --run-dir. Ctrl-C saves and exits.

Radii and step sizes take fractions: ``--config.attack.eps=8/255 --config.attack.step_size=2/255`` (the fields of
``robust_flat.training.config_check.FRACTION_FIELDS``, parsed by ``robust_flat.evaluation.parse_eps`` like every
entry point's ``--eps``). Every problem with the command line or the config (an unknown field, a value out of range, a
misspelt name) is reported up front, one line each, exit status 2, before anything is written.

Multi-host data parallel (one process per host or GPU, the same command on each; README "Multi-host"):

    python -m experiments.cifar10_at ... --coordinator HOST0:PORT --num-processes N --process-id I
    srun python -m experiments.cifar10_at ... --distributed=auto   # SLURM / Open MPI / TPU: detected
"""
from __future__ import annotations

import os
import re
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

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "pgd_at.py") + ":smoke"
# The command line the config flag reads its --config.<field> overrides from: filled by parse_flags after checking it
# (by default ml_collections reads sys.argv, already while this module is imported, where a bad override would end
# in a traceback before any of our code runs).
_ARGV: list = []
_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG,
    "Config file, optionally with a preset: path/to/config.py[:paper|smoke|cpu|tiny]. Default: the offline "
    "smoke run.", lock_config=True, sys_argv=_ARGV)
_RUN_DIR = flags.DEFINE_string("run-dir", None, "Run directory (default: runs/<method>_<model>_<dataset>).")
_DATA_DIR = flags.DEFINE_string("data-dir", None, "Local dataset files (see robust_flat.data); sets "
                                "config.data.data_dir.")
_NO_PROGRESS = flags.DEFINE_bool("no-progress", False, "Disable the progress bar.")
_LIST = flags.DEFINE_bool("list", False, "Print every method and config (file, summary, options with the paper's "
                          "values) and exit.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "off", ["off", "auto"],
                                 "Multi-host training: 'auto' detects coordinator, process count and id under SLURM, "
                                 "Open MPI or on a TPU pod (flags below override); 'off' unless --coordinator is "
                                 "given.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0 for multi-host training (the same "
                                   "on every process).")
_NUM_PROCESSES = flags.DEFINE_integer("num-processes", None, "Number of processes of a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process-id", None, "This process's id in [0, num-processes).")


def _fail(problems) -> None:
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    sys.exit(2)


def _first_line(e: BaseException) -> str:
    """The informative line of an exception message (ml_collections wraps a config's error in its traceback)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    line = lines[-1] if len(lines) > 1 and lines[0].startswith("Error whilst parsing config file") else lines[0]
    return re.sub(r"^[A-Za-z]*Error: ", "", line)


_CONFIG_ARG = re.compile(r"^--?config(=|$)")
_OVERRIDE_ARG = re.compile(r"^--?(?:no)?config\.([^=]+)(?:=(.*))?$", re.S)


def check_command_line(argv: list) -> tuple:
    """``(argv, problems)``: the command line as absl should parse it and every problem found before parsing.

    * ``--config`` is made explicit (the default smoke config when absent), so its overrides are parsed with it;
    * the values of the fraction fields (``--config.attack.eps=8/255``, also ``--config.attack.eps 8/255``) are
      parsed by :func:`robust_flat.evaluation.parse_eps` and passed on as numbers;
    * the config file is loaded and every ``--config.<field>`` it does not have is a problem with a suggestion
      (:func:`robust_flat.training.config_check.unknown_field`)."""
    from robust_flat.evaluation import parse_eps
    from robust_flat.training.config_check import FRACTION_FIELDS, unknown_field

    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)  # absl parses no flags after "--"
    problems, spec = [], None
    for i in range(1, end):
        if _CONFIG_ARG.match(argv[i]):
            spec = argv[i].split("=", 1)[1] if "=" in argv[i] else (argv[i + 1] if i + 1 < end else "")
    if spec is None:
        spec = DEFAULT_CONFIG
        argv.insert(1, f"--config={spec}")
        end += 1
    paths = []
    for i in range(1, end):
        m = _OVERRIDE_ARG.match(argv[i])
        if not m:
            continue
        path, value = m.group(1), m.group(2)
        paths.append(path)
        if path in FRACTION_FIELDS:
            at = i if value is not None else i + 1
            text = value if value is not None else (argv[at] if at < end else None)
            if text is not None and "/" in text:
                try:
                    number = repr(parse_eps(text, name=f"--config.{path}"))
                except ValueError as e:
                    problems.append(str(e))
                    continue
                argv[at] = f"{argv[i].split('=', 1)[0]}={number}" if at == i else number
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
        return argv, problems + [f"--config {spec}: no such file {path}; the configs are in experiments/configs/ "
                                 "(pgd_at.py, trades.py, mart.py, awp.py, entropy_sgd.py, clean.py)"]
    try:
        config = flags.FLAGS["config"].parser.parse(spec)
        config.get("method")  # a config that failed to load raises here
    except Exception as e:  # the config file's own error, e.g. an unknown preset
        return argv, problems + [f"--config {spec}: {_first_line(e)}"]
    problems += [p for p in (unknown_field(config, q) for q in dict.fromkeys(paths)) if p]
    return argv, problems


def parse_flags(argv: list) -> list:
    """absl's flag parser for this entry point (``app.run(main, flags_parser=parse_flags)``): the problems of
    :func:`check_command_line`, or a value absl refuses (``--config.train.epochs=abc``, an unknown flag), are one
    line each on stderr and exit status 2, never a traceback."""
    argv, problems = check_command_line(argv)
    if problems:
        _fail(problems)
    _ARGV[:] = argv
    try:
        return flags.FLAGS(argv)
    except (flags.Error, ValueError, AttributeError, KeyError, TypeError, OSError) as e:
        text = _first_line(e)
        _fail([text[len("flag "):] if text.startswith("flag --") else text])


def _summary(doc: str) -> str:
    """The first sentence of a module docstring's first paragraph, on one line."""
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    end = re.search(r"\.\s(?=[A-Z])", text)  # not at "et al. 2019"
    return text[:end.start() + 1] if end else text


def describe_configs(config_dir: str = os.path.join(os.path.dirname(__file__), "configs")) -> str:
    """The text of ``--list``, generated from the configs themselves: every config file of ``config_dir`` (its
    method, the first sentence of its docstring, its method block's options with their defaults), the methods of
    the registry (:data:`robust_flat.training.METHODS`) and the options every config has
    (:data:`experiments.configs.common.VARIANT_OPTIONS`, defaults from ``base_config()``), with the paper's values."""
    import importlib.util
    import textwrap

    from experiments.configs.common import PRESETS, VARIANT_OPTIONS, base_config
    from robust_flat.training import METHODS
    from robust_flat.training.config_check import METHOD_BLOCKS

    def wrap(text, indent):
        return textwrap.fill(text, 118, initial_indent=indent, subsequent_indent=indent)

    lines = [f"Configs (--config=experiments/configs/FILE[:PRESET], presets {', '.join(PRESETS)}):"]
    covered = set()
    for name in sorted(os.listdir(config_dir)):
        if not name.endswith(".py") or name in ("__init__.py", "common.py"):
            continue
        spec = importlib.util.spec_from_file_location(f"_list_{name[:-3]}", os.path.join(config_dir, name))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
        covered.add(config.method)
        lines += ["", f"  {name}  (method {config.method})", wrap(_summary(module.__doc__), "      ")]
        block = METHOD_BLOCKS.get(config.method)
        if block and block in config:
            lines.append(wrap("options: " + ", ".join(f"--config.{block}.{k}={v}" for k, v in config[block].items()),
                              "      "))
    missing = [m for m in METHODS if m not in covered]
    lines += ["", "Methods (robust_flat.training.METHODS): " + ", ".join(METHODS)
              + (f"; without a config file: {', '.join(missing)}" if missing else "")]
    base = base_config()
    lines += ["", "Options of every config (--config.FIELD=VALUE; default; the paper's values):"]
    for path, (what, paper) in VARIANT_OPTIONS.items():
        block, field = path.split(".")
        lines += [f"  {path} = {base[block][field]!r}", wrap(f"{what}. Paper: {paper}.", "      ")]
    return "\n".join(lines)


def main(argv):
    del argv
    if _LIST.value:
        print(describe_configs())
        return
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from robust_flat import distributed
    from robust_flat.training.config_check import check_config

    config = _CONFIG.value
    problems = check_config(config)  # all of them at once, before anything starts (the multi-host setup included)
    if problems:
        _fail(problems)
    try:  # before anything touches a JAX backend
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               auto=_DISTRIBUTED.value == "auto")
    except ValueError as e:
        print(f"error: {e} (flags --coordinator, --num-processes, --process-id, --distributed=auto)",
              file=sys.stderr)
        sys.exit(2)
    run(config, _RUN_DIR.value, _DATA_DIR.value, progress=not _NO_PROGRESS.value)


def run(config, run_dir=None, data_dir=None, progress: bool = True):
    """Check ``config`` (all its problems at once, before anything is written), then train it into ``run_dir``.
    Every error a user can fix is one line ``error: ...`` on stderr and exit status 2 (``SystemExit``): a bad config,
    data or run directory, a damaged checkpoint, and any ``OSError`` (an unwritable or read-only run directory, an
    unreadable data folder, a full disk: ``error: cannot write/read PATH: <reason>; <fix>``)."""
    from robust_flat.checkpoint import CheckpointError
    from robust_flat.data import DataError
    from robust_flat.training.config_check import check_config
    from robust_flat.training.trainer import TrainingError, train

    problems = check_config(config)
    if problems:
        _fail(problems)
    if data_dir and config.data.dataset == "synthetic":
        print(f"error: --data-dir {data_dir} but this config trains on generated synthetic data "
              "(config.data.dataset=synthetic, the smoke/tiny presets); pick a real-data preset, e.g. "
              "--config=experiments/configs/pgd_at.py:cpu, or drop --data-dir", file=sys.stderr)
        sys.exit(2)
    if data_dir:
        with config.unlocked():
            config.data.data_dir = data_dir
    run_dir = run_dir or os.path.join("runs", f"{config.method}_{config.model.name}_{config.data.dataset}")
    try:
        train(config, run_dir, progress=progress)
    except (DataError, TrainingError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # an unwritable run directory, an unreadable data folder, a full or read-only disk
        from experiments.cli import os_error_line

        print(os_error_line(e, writes=(run_dir,), kept="checkpoints already written are intact",
                            elsewhere="pass another --run-dir"), file=sys.stderr)
        sys.exit(2)
    import jax

    if jax.process_index() == 0:
        print(f"run directory: {run_dir}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

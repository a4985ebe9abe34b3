"""Test session setup: one persistent XLA compilation cache for the whole session, the longest test files handed
out to the xdist workers first (``LONGEST_FIRST``), and the ``run_module`` fixture (an entry point's
``python -m`` run in-process).

Most of the suite's time is XLA:CPU compiling small programs, and many programs are compiled more than once: by
both xdist workers (the toy models' training steps), by subprocesses that run an entry point on the same tiny config
as a test before them, and by new ``jit`` objects around the same function. The controller process creates one
temporary cache directory and exports it as ``JAX_COMPILATION_CACHE_DIR`` (with a minimum compile time of 0, so
every program is stored) before the workers start; workers and every subprocess they launch inherit it, and the
directory is removed at the end of the session. A cache hit returns the executable XLA compiled for the same
program and compile options, so results do not change.

``JAX_COMPILATION_CACHE_DIR`` already set in the environment is used as it is (not removed);
``ROBUST_FLAT_TEST_COMPILATION_CACHE=0`` turns the session cache off.

XLA:CPU compiles the session's programs without LLVM's optimizations (``--xla_backend_optimization_level=0`` added
to ``XLA_FLAGS``, inherited by the workers and their subprocesses): the tests run tiny programs on a few images,
where compiling costs far more than running, and unoptimized compiles are 2-3x faster (tests/test_pgd.py and
test_apgd.py: 248 s -> 100 s on the 2-core machine). The programs compute the same functions; every comparison in
the suite is between two results of the same session or against a tolerance. ``ROBUST_FLAT_TEST_XLA_OPT=1`` (or an
optimization level already in ``XLA_FLAGS``) keeps XLA's default level.

Counting compiles is not affected: JAX records its backend-compile event (``robust_flat.xla.CompileCounter``) around
the cache lookup, so a program read from the cache is counted like one compiled (test_compiles passes with every
program in the cache). The benchmark test's subprocess does not get the cache: it times compiles.
"""
from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import warnings

import pytest


_ENV = "JAX_COMPILATION_CACHE_DIR"
_MIN_TIME_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
_created: list[str] = []


def _apply_to_loaded_jax() -> None:
    """If jax was imported before the environment was set, pass the settings to its config too."""
    if "jax" in sys.modules and os.environ.get(_ENV):
        import jax

        jax.config.update("jax_compilation_cache_dir", os.environ[_ENV])
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(os.environ.get(_MIN_TIME_ENV, "0")))


_OPT_FLAG = "--xla_backend_optimization_level"


def _unoptimized_compiles() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("ROBUST_FLAT_TEST_XLA_OPT", "0") in ("0", "false", "False", "") and _OPT_FLAG not in flags:
        os.environ["XLA_FLAGS"] = (flags + f" {_OPT_FLAG}=0").strip()


def pytest_configure(config):
    _hand_out_files_in_collection_order(config)
    if not hasattr(config, "workerinput"):
        _unoptimized_compiles()
    if os.environ.get("ROBUST_FLAT_TEST_COMPILATION_CACHE", "1") in ("0", "false", "False", ""):
        return
    if not hasattr(config, "workerinput") and not os.environ.get(_ENV):  # the controller (or a run without xdist)
        path = tempfile.mkdtemp(prefix="robust-flat-test-xla-cache-")
        _created.append(path)
        os.environ[_ENV] = path
        os.environ.setdefault(_MIN_TIME_ENV, "0")
    _apply_to_loaded_jax()


# The test files that take longest (measured on the 2-core CI machine's kind, slowest first). With ``-n 2 --dist
# loadfile`` a file runs on one worker; xdist hands out files in collection order, which it reorders by number of
# tests (``--loadscope-reorder``, its default), so the few-test but long files (the notebook, 2-process training,
# the benchmark driver) were handed out last and one worker kept running them while the other had finished (1-4
# minutes of one idle worker here). Handing out the longest files first (then the rest in file order) balances the
# workers. Only the order changes: a stale entry makes no test fail.
# test_checkpoint_faults and test_compiles train the preset test_training trains, and come after it: started while
# test_training still compiles, they would compile the same programs instead of reading them from the cache.
LONGEST_FIRST = ("test_notebook.py", "test_distributed.py", "test_torch_import.py", "test_training.py",
                 "test_knobs.py", "test_flatness.py", "test_checkpoint_faults.py", "test_fab.py",
                 "test_autoaugment.py", "test_ema.py", "test_methods.py", "test_models.py", "test_weights.py",
                 "test_hessian.py", "test_compiles.py", "test_small_cnn_learns.py", "test_pgd.py",
                 "test_benchmarks.py", "test_labels.py", "test_report.py", "test_ssl_rotation.py",
                 "test_models_trees.py", "test_apgd.py", "test_autoattack.py", "test_landscape.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), order[id(item)]))


def _hand_out_files_in_collection_order(config) -> None:
    if getattr(config.option, "loadscopereorder", None):  # pytest-xdist's scheduler runs in the controller
        config.option.loadscopereorder = False


def pytest_unconfigure(config):
    for path in _created:
        shutil.rmtree(path, ignore_errors=True)
        if os.environ.get(_ENV) == path:
            del os.environ[_ENV]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _forget_absl_flags(module: str) -> None:
    """Remove the absl flags an earlier import or run of ``module`` defined (``experiments.cifar10_at`` defines its
    flags at import): running it again would define them twice (``DuplicateFlagError``)."""
    flags = sys.modules.get("absl.flags")
    if flags is None:
        return
    path = os.path.join(ROOT, *module.split(".")) + ".py"
    by_module = {name: list(defined) for name, defined in flags.FLAGS.flags_by_module_dict().items()}
    for name, defined in by_module.items():
        if name in (module, path, "__main__"):
            for flag in defined:
                for key in {flag.name, flag.short_name} - {None}:
                    if key in flags.FLAGS:
                        delattr(flags.FLAGS, key)


@pytest.fixture
def run_module(capfd, monkeypatch):
    """``run_module("experiments.X", *args)``: ``python -m experiments.X ARGS`` run in this process instead of a new
    interpreter (which pays 5-10 s of imports and start-up on a busy 2-core machine): the module's code is executed
    as ``__main__`` (``runpy``, so its ``if __name__ == "__main__":`` block and error handling run) with ``sys.argv``
    set, in the repository root. Returns a ``subprocess.CompletedProcess`` with the exit status (``SystemExit``'s,
    as the interpreter sets it: None 0, a message 1 after printing it to stderr) and the captured stdout/stderr. An
    exception that escapes the module propagates (a subprocess would print its traceback and exit 1).

    Each entry point keeps at least one test that runs it as a real process."""

    def run(module: str, *args: str) -> subprocess.CompletedProcess:
        argv = [module, *map(str, args)]
        _forget_absl_flags(module)
        monkeypatch.chdir(ROOT)
        monkeypatch.setattr(sys, "argv", argv)
        capfd.readouterr()
        code = 0
        try:
            with warnings.catch_warnings():  # the module was imported before (by this test or an earlier one)
                warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
                runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        finally:  # the run's flags (absl names them after the file runpy ran) would clash with a later import
            _forget_absl_flags(module)
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(argv, code, out, err)

    return run

"""What every entry point does with errors a user can fix: one line ``error: ...`` on stderr and exit status 2.

:func:`run_cli` wraps an entry point's ``main``; :class:`OneLineParser` makes argparse errors one line;
:func:`os_error_line` words a file-system error (full disk, read-only, permissions, missing paths) with its fix.

What the entry points that measure a run's snapshot (``experiments.evaluate``, ``experiments.robust_loss``,
``experiments.flatness``) share: the checks of their options (:func:`checked`, :func:`at_least`), loading the
snapshot with the chosen weights (:func:`load_snapshot`) and the evaluation examples (:func:`eval_examples`), the
PGD step rule (:func:`add_step_rule`), and their ``python -m`` start (:func:`run_measure_cli`).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (``error: ...; see PROG --help``), exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


NO_SPACE = "free disk space and rerun the same command; {kept}"


def os_error_line(e: OSError, writes=(), kept: str = "files already written are intact",
                  elsewhere: str = "choose another location") -> str:
    """The one line for an ``OSError`` a user can fix: ``error: cannot write/read PATH: <strerror>; <fix>``.

    ``writes``: the directories the command writes into (an error on them, or on a path that would contain them,
    is a write); ``kept``: what a full disk left intact; ``elsewhere``: how to pick another location."""
    import errno as E

    path = os.fsdecode(e.filename) if isinstance(e.filename, (str, bytes, os.PathLike)) else None
    strerror = e.strerror or str(e)
    code = e.errno
    writing = code in (E.ENOSPC, E.EDQUOT, E.EROFS, E.EFBIG) or type(e).__name__ == "AtomicWriteError"
    if path is not None and not writing:
        p = os.path.abspath(path)
        for w in writes:
            w = os.path.abspath(os.fsdecode(w))
            if p == w or p.startswith(w + os.sep) or w.startswith(p + os.sep):
                writing = True
        if code in (E.EACCES, E.EPERM) and not writing:  # an existing path we may not read, or a place to create
            writing = not (os.path.exists(p) and not os.access(p, os.R_OK | (os.X_OK if os.path.isdir(p) else 0)))
    verb = "write" if writing else "read"
    if code in (E.ENOSPC, E.EDQUOT):
        fix = NO_SPACE.format(kept=kept)
    elif code == E.EROFS:
        fix = f"that file system is read-only; {elsewhere} on a writable disk"
    elif code in (E.EACCES, E.EPERM) and writing:
        where = "the directory"
        if path is not None:  # the nearest existing directory is the one to open up
            where = os.path.dirname(os.path.abspath(path))
            while not os.path.isdir(where) and os.path.dirname(where) != where:
                where = os.path.dirname(where)
        fix = f"make {where} writable (chmod u+w) or {elsewhere}"
    elif code in (E.EACCES, E.EPERM):
        fix = f"make it readable (chmod -R u+rX {path})"
    elif code == E.ENOENT and writing:
        fix = f"its parent does not exist or does not take new files; {elsewhere}"
    elif code == E.ENOENT:
        fix = "check the path"
    else:
        fix = "check the path, its permissions and the disk"
    if type(e).__name__ == "AtomicWriteError":  # its message already names the file and what is unchanged
        return f"error: {strerror}; {fix}"
    return f"error: cannot {verb} {path if path is not None else '(unnamed file)'}: {strerror}; {fix}"


def user_errors() -> tuple:
    """The exceptions that are the user's to fix (bad input, a damaged run, data, the disk), not bugs."""
    from robust_flat.checkpoint import CheckpointError
    from robust_flat.data import DataError

    return CheckpointError, DataError, ValueError, OSError


def run_cli(main: Callable, argv, *, writes=(), kept: str = "files already written are intact",
            elsewhere: str = "choose another location", **kwargs):
    """``main(argv, **kwargs)`` with the entry points' error handling: a user error (:func:`user_errors`, or a
    ``SystemExit`` with a message) becomes ONE line ``error: ...`` on stderr and exit status 2 (no traceback);
    ``writes``/``kept``/``elsewhere`` go to :func:`os_error_line`. Returns ``main``'s result."""
    try:
        return main(argv, **kwargs)
    except SystemExit as e:
        if isinstance(e.code, str):  # raise SystemExit("message"): a refusal, worded for the user
            text = e.code[len("error: "):] if e.code.startswith("error: ") else e.code
            print(error_line(ValueError(text)), file=sys.stderr)
            sys.exit(2)
        raise
    except user_errors() as e:
        print(error_line(e, writes, kept, elsewhere), file=sys.stderr)
        sys.exit(2)


def error_line(e: BaseException, writes=(), kept: str = "files already written are intact",
               elsewhere: str = "choose another location") -> str:
    """``error: <the first line of the message>`` (an ``OSError``: :func:`os_error_line`)."""
    if isinstance(e, OSError):
        return os_error_line(e, writes, kept, elsewhere)
    return f"error: {' '.join(str(e).splitlines()[0].split()) if str(e).strip() else type(e).__name__}"


def load_checked(load_run: Callable, run_dir: str, snapshot):
    """``load_run(run_dir, snapshot)``; a ``config.json`` that parses but is not a run's config of this version
    (fields missing or of the wrong type) is a ``ValueError`` naming the run directory, not a traceback."""
    import logging

    absl_log = logging.getLogger("absl")  # orbax's warnings about a damaged checkpoint: the error below says it all
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        return load_run(run_dir, snapshot)
    except (AttributeError, KeyError, TypeError) as e:
        raise ValueError(f"cannot load the run in {run_dir} ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}); its config.json is not a training run's config of this "
                         "version of robust-flat; pass the --run-dir of a training run") from e
    finally:
        absl_log.setLevel(level)


def add_step_rule(add_argument: Callable, **kwargs) -> None:
    """``--pgd-step-rule``, the option of every measuring entry point whose PGD follows ``--eps``: ``add_argument`` of
    a parser or group (``kwargs`` go with it)."""
    from robust_flat.attacks.pgd import STEP_RULES

    add_argument("--pgd-step-rule", choices=STEP_RULES, default="scaled",
                 help="how the PGD step follows --eps (robust_flat.attacks.pgd.step_size_for): scaled (default: "
                      "0.007 x eps / (8/255), 0.0035 at 4/255) or fixed (0.007 at every eps, the released code's); "
                      "both give 0.007 at 8/255", **kwargs)


def checked(parser: argparse.ArgumentParser, check: Callable, *args):
    """``check(*args)`` (e.g. :func:`robust_flat.runs.check_snapshot` of ``--snapshot``,
    :func:`robust_flat.evaluation.parse_eps` of ``--eps``); its ``ValueError`` is ``parser.error`` (one line, exit
    status 2), before anything is loaded."""
    try:
        return check(*args)
    except ValueError as e:
        parser.error(str(e))


def at_least(parser: argparse.ArgumentParser, args, low, *dests: str, hint: str = "") -> None:
    """``parser.error`` when an option among ``dests`` (``args`` attributes; ``None``, not given, passes) is below
    ``low`` or NaN: ``--a, --b and --c must be >= LOW``; a single option: ``--a must be >= LOW<hint>, got V``."""
    values = [getattr(args, d) for d in dests]
    if all(v is None or v >= low for v in values):
        return
    flags = [f"--{d.replace('_', '-')}" for d in dests]
    names = flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} and {flags[-1]}"
    parser.error(f"{names} must be >= {low}" + (f"{hint}, got {values[0]}" if len(dests) == 1 else ""))


def load_snapshot(load_run: Optional[Callable], run_dir: str, snapshot, weights: str):
    """The snapshot of ``run_dir`` (:func:`load_checked`) with ``weights`` (``--weights``: ``params`` or ``ema``) as
    its weights and batch-norm statistics (:func:`robust_flat.runs.select_weights`); weights the run does not have
    are a ``SystemExit`` with the reason. ``load_run`` (``None``: :func:`robust_flat.runs.load_run`) is injectable
    for tests."""
    from robust_flat.runs import select_weights

    if load_run is None:
        from robust_flat.runs import load_run
    loaded = load_checked(load_run, run_dir, snapshot)
    try:
        return select_weights(loaded, weights)
    except ValueError as e:
        raise SystemExit(str(e))


def eval_examples(load_eval_set: Optional[Callable], config, subset: str, data_dir, n: Optional[int]):
    """The first ``n`` (``None``: all) examples of the evaluation subset ``subset`` of the run's data as float32
    images and int32 labels; ``n`` larger than the subset is a ``SystemExit`` saying so. ``load_eval_set``
    (``None``: :func:`robust_flat.data.load_eval_set`) is injectable for tests."""
    import numpy as np

    if load_eval_set is None:
        from robust_flat.data import load_eval_set
    x, y = load_eval_set(config, subset, data_dir)
    if n is not None:
        if n > len(x):
            raise SystemExit(f"--n-examples {n} but subset {subset} has only {len(x)} examples")
        x, y = x[:n], y[:n]
    return np.asarray(x, np.float32), np.asarray(y, np.int32)


def run_measure_cli(main: Callable, sub: str, interrupted: str, *, kept: str = "files already written are intact",
                    elsewhere: str = "choose another location") -> None:
    """``python -m`` of an entry point that writes into ``RUN/<sub>``: :func:`run_cli` of ``main`` on the command
    line (``writes``: :func:`output_dirs`); Ctrl-C prints the line ``interrupted`` (what is kept, how to resume) and
    exits with status 130."""
    argv = sys.argv[1:]
    try:
        run_cli(main, argv, writes=output_dirs(argv, sub), kept=kept, elsewhere=elsewhere)
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        sys.exit(130)


def output_dirs(argv, sub: str) -> list:
    """``RUN/<sub>`` of the ``--run-dir`` in ``argv`` (where an evaluation CLI writes), for :func:`os_error_line`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(argv):
        if a == "--run-dir" and i + 1 < len(argv):
            return [os.path.join(argv[i + 1], sub)]
        if a.startswith("--run-dir="):
            return [os.path.join(a.split("=", 1)[1], sub)]
    return []

"""A run directory from a published PyTorch checkpoint, so evaluate/flatness measure it like a trained run.

    python -m experiments.import_torch --checkpoint PATH --arch ARCH --run-dir RUN
        [--width 64] [--whiten auto|cifar10|none|M,M,M/S,S,S] [--preact-shortcut auto|input|activation]
        [--activation relu|silu|mish|gelu|gelu_erf] [--dataset cifar10] [--allow-pickle] [--no-check]

then, unchanged:

    python -m experiments.evaluate --run-dir RUN --attack autoattack
    python -m experiments.flatness --run-dir RUN --measure avg      # and worst, hessian, landscape

``ARCH``: ``resnet18_stutz`` (Stutz et al.'s own ``models.ResNet`` checkpoints, re-parameterized BN),
``resnet18``, ``preact_resnet18``, ``wrn28_10``, ``wrn34_10`` (RobustBench's architectures and state-dict names).
The checkpoint may be a bare state dict or wrapped (``{"state_dict": ...}``, ``{"model": ...}`` as Stutz et al.'s
``common.state.State`` saves it, ``module.`` prefixes of DataParallel); see :mod:`robust_flat.torch_import` for the
layouts, what is inferred (width, classes, whitening, the PreActResNet shortcut) and the input normalization
(``--whiten``: ``auto`` takes the constants the checkpoint holds, ``mu``/``sigma`` or ``whiten.*``).

The run directory holds ``config.json`` (method ``imported``, the model options, the checkpoint's SHA-256) and one
orbax checkpoint (``latest``, step 0, epoch 0) written as training writes it, so
``robust_flat.runs.load_run(RUN, "last")`` restores it; ``imported.json`` records where it came from. After
writing, the run is loaded back and its logits compared with the converted weights' (``--no-check`` skips that).
Running the same command again does nothing; another checkpoint into the same RUN is refused. A bad input (missing
file, not a checkpoint, weights that do not fit the arch) is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Optional

STUTZ_ACTIVATIONS = {"relu": "relu", "silu": "silu", "mish": "mish", "gelu": "gelu_erf"}  # theirs -> ours


def build_parser() -> argparse.ArgumentParser:
    from robust_flat.models.layers import ACTIVATIONS
    from robust_flat.torch_import import ARCHS

    p = argparse.ArgumentParser(prog="python -m experiments.import_torch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="PyTorch checkpoint file (torch.save of a state dict)")
    p.add_argument("--arch", required=True, choices=tuple(ARCHS))
    p.add_argument("--run-dir", required=True, help="run directory to write (config.json, checkpoints/)")
    p.add_argument("--width", type=int, default=None, help="base width of the ResNets (default: from conv1)")
    p.add_argument("--whiten", default="auto",
                   help="input normalization inside the model: auto (the checkpoint's mu/sigma or whiten.*; else "
                        "none, or clamp only for resnet18_stutz), cifar10, none, or MEAN/STD as "
                        "0.5,0.5,0.5/0.5,0.5,0.5")
    p.add_argument("--preact-shortcut", default="auto", choices=("auto", "input", "activation"),
                   help="preact_resnet18: input of the 1x1 shortcut conv (auto: activation with a final bn, "
                        "input without, as in RobustBench's zoo)")
    p.add_argument("--activation", default=None, choices=tuple(ACTIVATIONS),
                   help="activation (not stored in state dicts; default: from a Stutz et al. checkpoint's "
                        "arguments, else relu)")
    p.add_argument("--dataset", default="cifar10", choices=("cifar10", "cifar100", "svhn"),
                   help="dataset the evaluations load (default cifar10)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="torch.load with weights_only=False (runs code in the file: only for files you trust)")
    p.add_argument("--no-check", action="store_true", help="skip loading the run back and comparing logits")
    return p


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _activation(args, meta) -> str:
    if args.activation:
        return args.activation
    theirs = (meta.get("arguments") or {}).get("activation")
    if args.arch == "resnet18_stutz" and theirs:
        if theirs not in STUTZ_ACTIVATIONS:
            from robust_flat.torch_import import TorchImportError
            raise TorchImportError(f"the checkpoint's activation {theirs!r} has no counterpart here "
                                   f"({', '.join(STUTZ_ACTIVATIONS)})")
        return STUTZ_ACTIVATIONS[theirs]
    return "relu"


def make_config(imported, args, sha256: str):
    """The run's config: the base config (data, attack and eval settings the analyses read) with the imported
    model's options, method ``imported`` and the checkpoint's identity."""
    import ml_collections

    from experiments.configs.common import base_config

    c = base_config()
    c.method = "imported"
    c.model = ml_collections.ConfigDict(imported.model_config)
    c.data.dataset = args.dataset
    c.imported = ml_collections.ConfigDict(dict(arch=imported.arch, layout=imported.layout, sha256=sha256,
                                                whiten=str(args.whiten)))
    return c


def write_run(run_dir: str, config, imported, provenance: dict, check: bool = True) -> str:
    """Write config.json and the step-0 checkpoint; returns "written" or "exists"."""
    import jax
    import numpy as np

    from robust_flat.checkpoint import Checkpointer
    from robust_flat.runs import load_run
    from robust_flat.io import atomic_write_text
    from robust_flat.training.optim import make_optimizer
    from robust_flat.training.state import create_train_state
    from robust_flat.training.trainer import prepare_run_dir

    prepare_run_dir(run_dir, config)  # raises TrainingError if RUN holds another run
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"))
    try:
        if ckpt.latest_step() is not None:
            return "exists"
        # the train state as robust_flat.training.trainer.build makes it, with the imported weights
        tx = make_optimizer(config.optimizer, 1, config.train.epochs)
        state = create_train_state(imported.params, imported.model_state, tx,
                                   jax.random.fold_in(jax.random.PRNGKey(config.seed), 1), ema=False)
        ckpt.save("latest", 0, state, {"epoch": 0, "step": 0, "imported": True})
    finally:
        ckpt.close()
    atomic_write_text(os.path.join(run_dir, "imported.json"), json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    if check:
        from robust_flat.models import make_logits_fn

        x = np.random.default_rng(0).uniform(0, 1, (4, 32, 32, 3)).astype(np.float32)
        loaded = load_run(run_dir, "last")
        a = np.asarray(make_logits_fn(imported.model)(imported.params, imported.model_state, x))
        b = np.asarray(make_logits_fn(loaded.model)(loaded.params, loaded.model_state, x))
        diff = float(np.abs(a - b).max())
        if not diff <= 1e-6:
            from robust_flat.checkpoint import CheckpointError
            raise CheckpointError(f"{run_dir} loads back with other logits (max difference {diff:.2e}); delete it")
        print(f"check: load_run({run_dir!r}, 'last') gives the converted model's logits (max difference {diff:.1e})")
    return "written"


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from robust_flat.checkpoint import CheckpointError
    from robust_flat.torch_import import TorchImportError, import_torch, read_checkpoint
    from robust_flat.training.trainer import TrainingError

    try:
        sd, meta = read_checkpoint(args.checkpoint, allow_pickle=args.allow_pickle)
        imported = import_torch(sd, args.arch, width=args.width, whiten=args.whiten,
                                activation=_activation(args, meta), preact_shortcut=args.preact_shortcut)
        sha = _sha256(args.checkpoint)
        config = make_config(imported, args, sha)
        import torch

        from robust_flat.models import count_params

        provenance = {"checkpoint": os.path.abspath(args.checkpoint), "sha256": sha, "arch": args.arch,
                      "layout": imported.layout, "wrapper": meta.get("wrapper", []),
                      "stripped_prefixes": meta.get("stripped_prefixes", []), "notes": imported.notes,
                      "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "params": count_params(imported.params)}
        status = write_run(args.run_dir, config, imported, provenance, check=not args.no_check)
    except (TorchImportError, CheckpointError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if status == "exists":
        print(f"{args.run_dir} already holds this import ({args.arch}, sha256 {sha[:12]}); nothing to do")
        return 0
    print(f"imported {args.checkpoint} as {args.arch} ({provenance['params']:,} parameters, "
          f"{imported.model_config['num_classes']} classes) -> {args.run_dir}")
    for note in imported.notes:
        print(f"  {note}")
    print(f"next:\n  python -m experiments.evaluate --run-dir {args.run_dir} --attack autoattack\n"
          f"  python -m experiments.flatness --run-dir {args.run_dir} --measure avg\n"
          f"  python -m experiments.flatness --run-dir {args.run_dir} --measure worst")
    return 0


if __name__ == "__main__":
    sys.exit(main())

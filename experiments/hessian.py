"""``python -m experiments.flatness --measure hessian``: extreme eigenvalues, trace and spectral density of the Hessian
of a snapshot's clean or robust loss (:mod:`robust_flat.hessian`; the defaults are the released code's, on the last
500 test images: docs/paper-vs-code.md#hessian).

Writes ``RUN/flatness/NAME.json`` (eigenvalues with their Ritz residuals, trace, density, timing) and
``NAME_density.png``; ``NAME`` = ``--name`` or ``hessian[_robust]_{snapshot}`` (e.g. ``hessian_last-ep30``).

Progress: a bar over Hessian-vector products. Resumption: the adversarial examples (robust loss), the top/bottom-k
Lanczos run, each Hutchinson probe and each SLQ probe are saved atomically under
``RUN/flatness/.partial/NAME-<fingerprint>/`` (:class:`robust_flat.partial.PartialResults`; the fingerprint covers
every setting that changes the numbers, the weights and the data) and skipped by a rerun, which gives the same
numbers. A finished result with the same fingerprint is read back, not recomputed, unless ``--fresh``.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time

LANCZOS_ITERS = 80  # --lanczos-iters when not given


def add_options(option) -> None:
    """This measure's own options; ``option(*flags, **kwargs)`` is ``add_argument`` of its group in
    :func:`experiments.flatness.build_parser` (which also holds the options it shares with other measures)."""
    option("--k", type=int, default=4, help="extreme eigenvalues at each end of the spectrum")
    option("--trace-probes", type=int, default=50, help="Hutchinson probes for the trace (0: no trace)")
    option("--density-probes", type=int, default=5, help="SLQ probes for the spectral density (0: no density)")
    option("--hessian-loss", choices=("clean", "robust"), default="clean",
           help="clean cross-entropy (paper, code) or the cross-entropy at PGD examples computed once at the "
                "weights and then held fixed")
    option("--hessian-reduction", choices=("sum", "mean"), default="sum",
           help="sum of the batch-mean Hessians (the code's; eigenvalues grow with the number of batches) or the "
                "Hessian of the mean loss over all examples")
    option("--hessian-select", default=None, metavar="SELECTION",
           help="the weights: 'kernels' (default: every tensor with >= 2 dims, the code's), 'layers' (the "
                "flatness measures' layers) or a regular expression on parameter paths (conv1/kernel)")


def config(args):
    """The :class:`robust_flat.hessian.HessianConfig` of the command line; a bad setting is a ``ValueError``."""
    from robust_flat.attacks.pgd import PGDConfig, step_size_for
    from robust_flat.hessian import HessianConfig, resolve_filter

    if args.k < 1 or lanczos_iters(args) < 1:
        raise ValueError(f"--k and --lanczos-iters must be >= 1, got {args.k} and {lanczos_iters(args)}")
    if args.trace_probes < 0 or args.density_probes < 0:
        raise ValueError("--trace-probes and --density-probes must be >= 0 (0: skip)")
    try:
        resolve_filter(args.hessian_select)
    except re.error as e:
        raise ValueError(f"--hessian-select {args.hessian_select!r} is not a regular expression: {e}") from None
    pgd = PGDConfig(eps=args.eps, steps=args.pgd_steps, step_size=step_size_for(args.eps, args.pgd_step_rule))
    return HessianConfig(loss=args.hessian_loss, select=args.hessian_select, batch_size=args.batch_size,
                         reduction=args.hessian_reduction, pgd=pgd)


def lanczos_iters(args) -> int:
    return LANCZOS_ITERS if args.lanczos_iters is None else args.lanczos_iters


def run(args, loaded_run, params, x, y, out_dir: str, depends_on: dict) -> dict:
    """Measure, write and return the summary. ``params``: the run's weights (or their average, ``--weights ema``);
    ``x, y``: the examples; ``depends_on``: what the result depends on besides these settings (digests of the
    weights and the data, the snapshot: part of the fingerprint)."""
    import jax

    from robust_flat.hessian import HessianOperator, num_matvecs, plot_density, spectrum_summary
    from robust_flat.io import atomic_write_json
    from robust_flat.models import make_logits_fn
    from robust_flat.partial import PartialResults, finished_result, fingerprint
    from robust_flat.runs import snapshot_tag
    from tqdm import tqdm

    cfg = config(args)
    k, num_iters, trace_probes, density_probes = args.k, lanczos_iters(args), args.trace_probes, args.density_probes
    prefix = "hessian" if cfg.loss == "clean" else "hessian_robust"
    name = args.name or f"{prefix}_{snapshot_tag(args.snapshot, loaded_run.epoch)}"
    path = os.path.join(out_dir, f"{name}.json")
    fp = fingerprint({"measure": "hessian", "config": dataclasses.asdict(cfg), "seed": args.seed, "k": k,
                      "lanczos_iters": num_iters, "trace_probes": trace_probes, "density_probes": density_probes,
                      **depends_on})
    previous = None if args.fresh else finished_result(path, fp)
    if previous is not None:
        print(f"{path} is up to date (lambda_max {previous['lambda_max']:.4g}); use --fresh to recompute")
        return previous
    partial = PartialResults(out_dir, name, fp, fresh=args.fresh)

    key_attack, key_spectrum = jax.random.split(jax.random.PRNGKey(args.seed))
    logits_fn = make_logits_fn(loaded_run.model, train=False)
    t0 = time.perf_counter()
    adversarial = partial.load_array("adversarial_examples", x.shape) if cfg.loss == "robust" else None
    if cfg.loss == "robust" and adversarial is None:
        print(f"hessian: PGD-{cfg.pgd.steps} adversarial examples for {len(x)} inputs ...")
    op = HessianOperator(logits_fn, params, loaded_run.model_state, x, y, cfg, key=key_attack,
                         adversarial=adversarial)
    if cfg.loss == "robust" and adversarial is None:
        partial.save_array("adversarial_examples", op.x_used)
    done = partial.load_all()
    per_unit = num_matvecs(op.dim, k, num_iters, trace_probes, density_probes)
    units = ["eigen"] + [f"trace_{i:04d}" for i in range(trace_probes)] + \
        [f"density_{i:04d}" for i in range(density_probes)]
    resumed = [u for u in units if u in done]
    if resumed or adversarial is not None:
        print(f"hessian: resuming, {len(resumed)}/{len(units)} units already done ({partial.path})")
    bar = tqdm(total=sum(per_unit[u.split("_")[0]] for u in units if u not in done),
               desc=f"hessian ({cfg.loss} loss)", unit="hvp", dynamic_ncols=True, disable=args.no_progress)
    try:
        summary, eig, _, density = spectrum_summary(
            op, key_spectrum, k=k, num_iters=num_iters, trace_probes=trace_probes, density_probes=density_probes,
            done=done, on_unit=lambda unit, arrays: partial.save(unit, **arrays), progress=bar.update)
    finally:
        bar.close()
    summary.update(
        loss_kind=cfg.loss, loss=op.loss(), reduction=cfg.reduction, batch_size=cfg.batch_size,
        num_examples=int(len(op.x_used)), num_batches=op.num_batches, dim=op.dim, parameters=list(op.paths),
        seed=args.seed, epoch=loaded_run.epoch, use_ema=args.weights == "ema", num_hvps=op.num_hvps,
        seconds_per_hvp=op.hvp_seconds / max(op.num_hvps, 1), seconds=time.perf_counter() - t0, fingerprint=fp,
        resumed_units=resumed)
    if density is not None:
        plot_density(density, os.path.join(out_dir, f"{name}_density.png"), eig,
                     title=f"Hessian of the {cfg.loss} loss: lambda_max={eig.max:.4g}")
    atomic_write_json(path, summary, indent=1)
    partial.remove()
    print(f"hessian ({cfg.loss} loss, {op.dim} weights, {len(op.x_used)} examples): lambda_max {eig.max:.4g}, "
          f"lambda_min {eig.min:.4g}" + (f", trace {summary['trace']:.4g}" if "trace" in summary else "")
          + f" -> {path}")
    return summary

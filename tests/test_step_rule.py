"""One PGD step rule for training and every measurement: robust_flat.attacks.pgd.step_size_for, reached from each
entry point's --pgd-step-rule (scaled by default: the step at 8/255 times eps / (8/255); fixed: the step as given).
experiments.robust_loss's is tested in test_robust_loss.py, the grid's in test_grid.py."""
from __future__ import annotations

import pytest

from robust_flat.attacks.pgd import PAPER_EPS, PAPER_STEP, step_size_for


def test_the_rule():
    assert step_size_for(PAPER_EPS) == step_size_for(PAPER_EPS, "fixed") == PAPER_STEP == 0.007
    assert step_size_for(4 / 255) == pytest.approx(0.0035)
    assert step_size_for(4 / 255, "fixed") == 0.007
    assert step_size_for(16 / 255, "scaled", 2 / 255) == pytest.approx(4 / 255)
    with pytest.raises(ValueError, match="unknown PGD step rule 'scald'"):
        step_size_for(4 / 255, "scald")


def _steps(module, argv):
    """Every PGD step size in the configuration an entry point builds from ``argv``."""
    from experiments import flatness, hessian, landscape

    if module == "evaluate":
        from experiments import evaluate
        from robust_flat.evaluation import make_components, parse_eps

        args = evaluate.build_parser().parse_args(["--run-dir", "R", "--attack", "pgd", *argv])
        return [c.config.step_size for c in make_components("pgd", parse_eps(args.eps),
                                                             pgd_step_rule=args.pgd_step_rule)]
    args = flatness.build_parser().parse_args(["--run-dir", "R", "--measure", module, *argv])
    if module == "hessian":
        return [hessian.config(args).pgd.step_size]
    if module == "landscape":
        cfg = landscape.config(args)
        return [cfg.pgd.step_size, cfg.direction_pgd.step_size]
    cfg = flatness.make_config(args)
    inner = cfg.attack.input_attack if module == "worst" else cfg.attack
    return [inner.step_size, cfg.reference_attack.step_size]


@pytest.mark.parametrize("module", ["evaluate", "avg", "worst", "hessian", "landscape"])
def test_every_measuring_entry_point_follows_the_rule(module):
    assert _steps(module, []) == pytest.approx([0.007] * len(_steps(module, [])))  # 8/255: the paper's step
    half = _steps(module, ["--eps", "4/255"])
    assert half == pytest.approx([0.0035] * len(half))
    assert _steps(module, ["--eps", "4/255", "--pgd-step-rule", "fixed"]) == pytest.approx([0.007] * len(half))


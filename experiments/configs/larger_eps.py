"""PGD-7 adversarial training with a larger training radius, the paper's "Larger eps" model: eps = 9/255 (the
released code's 0.0352), everything else the AT recipe. The PGD step follows eps (``attack.step_rule="scaled"``:
0.007 x eps / (8/255) = 0.007875 at 9/255, the same share of the ball per step as the 8/255 recipe);
``--config.attack.step_rule=fixed`` keeps 0.007, as the released code does for every eps of its registry (0.0235,
0.0275, 0.0314, 0.0352). The paper reports RErr 60.9% with AutoAttack at 8/255
(AT: 62.8%), a larger robust-loss overfitting and the sharpest average-case flatness of its "poor" group (1.33).

    python -m experiments.cifar10_at --config=experiments/configs/larger_eps.py --run-dir runs/eps9 --data-dir DIR
    python -m experiments.cifar10_at --config=experiments/configs/larger_eps.py:smoke --config.attack.eps=10/255

Only the training attack changes (robust_flat/training/pgd_at.py attack_config); the evaluations
(experiments/evaluate.py, robust_loss.py, flatness.py) attack at their own ``--eps``, 8/255 by default. The trainer's
per-epoch curves and early stopping use the training attack, as the code's per-epoch curves do (its early stopping
attacks at 0.0314: docs/paper-vs-code.md#larger-eps).
"""
from experiments.configs.common import apply_preset, base_config


def get_config(preset: str = ""):
    c = base_config()
    c.method = "pgd_at"
    c.attack.eps = 9 / 255
    c.attack.step_rule = "scaled"
    return apply_preset(c, preset)

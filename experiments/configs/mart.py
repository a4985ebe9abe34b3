"""MART (Wang et al. 2020) on the paper's AT recipe: PGD-7 on the cross-entropy, loss = boosted CE on the
adversarial batch + beta * KL(clean || adversarial) weighted by (1 - p_clean(y)). The paper's grid is beta (its
lambda) in 1, 3, 6, 9; beta = 6 is its MART model (the paper reports RErr 61.0%, average-case flatness 0.73).

    python -m experiments.cifar10_at --config=experiments/configs/mart.py --run-dir runs/mart6 --data-dir DIR
    python -m experiments.cifar10_at --config=experiments/configs/mart.py:smoke --config.mart.beta=3
"""
import ml_collections

from experiments.configs.common import apply_preset, base_config


def get_config(preset: str = ""):
    c = base_config()
    c.method = "mart"
    c.mart = ml_collections.ConfigDict(dict(beta=6.0))
    return apply_preset(c, preset)

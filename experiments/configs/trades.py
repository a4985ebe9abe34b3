"""TRADES (Zhang et al. 2019) on the paper's AT recipe: same model, data, optimizer, schedule and PGD-7 settings,
loss CE(clean) + beta * KL(clean || adversarial). The paper's grid is beta (its lambda) in 1, 3, 6, 9; beta = 6 is
its "good" TRADES model (the paper reports RErr 56.7% with AutoAttack, average-case flatness 0.57).

    python -m experiments.cifar10_at --config=experiments/configs/trades.py --run-dir runs/trades6 --data-dir DIR
    python -m experiments.cifar10_at --config=experiments/configs/trades.py:smoke --config.trades.beta=3

The attack follows the released code (AT's init, per-batch best iterate); the original TRADES attack is
``--config.attack.init=small_normal --config.trades.best_iterate=last`` (see robust_flat/training/trades.py and
docs/paper-vs-code.md#trades-mart).
"""
import ml_collections

from experiments.configs.common import apply_preset, base_config


def get_config(preset: str = ""):
    c = base_config()
    c.method = "trades"
    c.trades = ml_collections.ConfigDict(dict(
        beta=6.0,                # weight of the KL term (the paper's lambda)
        best_iterate="batch",    # batch (code: max summed KL) | last (Zhang et al.) | example
    ))
    return apply_preset(c, preset)

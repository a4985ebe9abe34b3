"""Plain (non-adversarial) training with the same model, data and optimizer as the paper's AT baseline.

    python -m experiments.cifar10_at --config=experiments/configs/clean.py --run-dir runs/clean --data-dir DIR
"""
from experiments.configs.common import apply_preset, base_config


def get_config(preset: str = ""):
    c = base_config()
    c.method = "clean"
    c.eval.early_stopping = False
    return apply_preset(c, preset)

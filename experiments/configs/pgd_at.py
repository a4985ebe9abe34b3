"""PGD adversarial training, the paper's baseline (AT): ResNet-18, L-inf eps 8/255, PGD-7 with step 0.007,
150 epochs, SGD lr 0.05 (x0.1 at 60/90/120), Nesterov momentum 0.9, weight decay 5e-4, batch 128.

    python -m experiments.cifar10_at --config=experiments/configs/pgd_at.py --run-dir runs/at --data-dir DIR
    python -m experiments.cifar10_at --config=experiments/configs/pgd_at.py:smoke   # offline, synthetic data

Paper numbers for this recipe (ResNet-18, its main table): RErr (AutoAttack) 62.8% at the last epoch,
54.6% early-stopped; test RLoss 3.91 (last) vs 1.53 (early-stopped).
"""
from experiments.configs.common import apply_preset, base_config


def get_config(preset: str = ""):
    c = base_config()
    c.method = "pgd_at"
    return apply_preset(c, preset)

"""PGD-7 adversarial training with AutoAugment, the paper's "AutoAugment" model: random crop and flip, then the
CIFAR-10 AutoAugment policy (Cubuk et al. 2019) and Cutout of one 16 x 16 square per image, everything else the AT
recipe. The paper finds that it avoids robust overfitting entirely (its training curves) and reports RErr 54.0%
with AutoAttack at the last epoch (AT: 62.8%).

    python -m experiments.cifar10_at --config=experiments/configs/autoaugment.py --run-dir runs/aa --data-dir DIR
    python -m experiments.cifar10_at --config=experiments/configs/autoaugment.py:smoke

Any other method takes the same two options: ``--config.data.autoaugment=True --config.data.cutout=16``. The
augmentation runs inside the jitted step before the attack (robust_flat/training/update.py prepare_images,
robust_flat/autoaugment.py); its differences to the released code's PIL pipeline are in
docs/paper-vs-code.md#autoaugment.
"""
from experiments.configs.common import apply_preset, base_config


def get_config(preset: str = ""):
    c = base_config()
    c.method = "pgd_at"
    c.data.autoaugment = True
    c.data.cutout = 16
    return apply_preset(c, preset)

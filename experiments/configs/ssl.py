"""Self-supervised AT (the paper's AT-SSL, Hendrycks et al. 2019) on the paper's AT recipe: PGD-7 AT plus lambda x the
cross-entropy of an auxiliary head predicting the rotation (0, 90, 180, 270 degrees) of the 4 rotated copies of every
training image, themselves attacked through the head. The paper's grid is lambda in 0.5, 1, 2, 4, 8; lambda = 4 is the
model of its main table (RErr 57.1% with AutoAttack, vs AT's 62.8%).

    python -m experiments.cifar10_at --config=experiments/configs/ssl.py --run-dir runs/ssl4 --data-dir DIR
    python -m experiments.cifar10_at --config=experiments/configs/ssl.py:smoke --config.ssl.lam=1

The head (``model.rotation_head``: its hidden width; 256 as the released code's MLP) is not part of the classifier
that attacks, evaluation and flatness see (robust_flat/training/ssl_rotation.py). The released code trains half of
every batch clean (attack.fraction 0.5, docs/paper-vs-code.md#self-supervision); the paper's "on top of AT" is the
default here (fraction 1).
"""
import ml_collections

from experiments.configs.common import apply_preset, base_config


def get_config(preset: str = ""):
    c = base_config()
    c.method = "ssl"
    c.model.rotation_head = 256  # hidden width of the rotation head (code: 512 -> 256 -> 4 on ResNet-18)
    c.ssl = ml_collections.ConfigDict(dict(
        lam=4.0,  # weight of the rotation loss (paper's grid: 0.5, 1, 2, 4, 8)
    ))
    return apply_preset(c, preset)

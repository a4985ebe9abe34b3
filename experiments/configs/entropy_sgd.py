"""Entropy-SGD (Chaudhari et al. 2017) with PGD-7 adversarial examples on the paper's AT recipe: L Langevin steps
per outer step, each on its own adversarially attacked mini-batch (L + 1 mini-batches of 128 per step), outer SGD
with momentum 0 (the code's, docs/paper-vs-code.md#entropy-sgd), lr 0.05, weight decay 5e-4, 150 / L epochs. The
paper's grid is L in 1, 2, 3, 5; L = 1 is its Entropy-SGD model in the main figure (the paper reports RErr 58.6%,
average-case flatness 0.28).

    python -m experiments.cifar10_at --config=experiments/configs/entropy_sgd.py --run-dir runs/esgd1 --data-dir DIR
    python -m experiments.cifar10_at --config=experiments/configs/entropy_sgd.py --config.esgd.L=2 ...  # 75 epochs

``train.batches_per_step`` (L + 1) and ``train.epochs`` (150 // L) follow ``esgd.L`` unless set explicitly.
"""
import ml_collections

from experiments.configs.common import apply_preset, base_config


def get_config(preset: str = ""):
    c = base_config()
    c.method = "entropy_sgd"
    steps = ml_collections.FieldReference(1, field_type=int)
    c.esgd = ml_collections.ConfigDict(dict(
        L=steps,             # Langevin steps per outer step
        gamma0=1e-4,         # coupling to w, scoped as gamma0 * (1 + gamma1)^t
        gamma1=1e-3,
        langevin_lr=0.1,     # inner step size eta'
        beta1=0.75,          # running average of the inner iterates
        noise=1e-4,          # Langevin noise (the code's eps)
    ))
    c.train.batches_per_step = steps + 1
    c.train.epochs = 150 // steps
    c.optimizer.momentum = 0.0
    c.optimizer.nesterov = False
    return apply_preset(c, preset)

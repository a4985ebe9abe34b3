"""AT-AWP (Wu et al. 2020) on the paper's AT recipe: PGD-7 inputs, then one normalized adversarial weight step in the
layer-wise relative ball B_xi(w) (xi = 0.01, the paper's best), gradients at w + nu clipped to +-0.05 and applied to
w. The paper reports RErr 54.3% with AutoAttack, the paper's most robust and flattest method. The paper's grid:
xi in 0.0005, 0.001, 0.005, 0.01, 0.015, 0.02 with 1-7 iterations.

    python -m experiments.cifar10_at --config=experiments/configs/awp.py --run-dir runs/awp001 --data-dir DIR
    python -m experiments.cifar10_at --config=experiments/configs/awp.py:smoke --config.awp.xi=0.005

As released, the code's one-step configs apply no perturbation (docs/paper-vs-code.md#awp-one-step):
``--config.awp.xi=0``.
"""
import ml_collections

from experiments.configs.common import apply_preset, base_config


def get_config(preset: str = ""):
    c = base_config()
    c.method = "awp"
    c.awp = ml_collections.ConfigDict(dict(
        xi=0.01,             # relative radius of the weight perturbation per layer
        steps=1,             # ascent steps on the weights (paper's best: 1)
        lr=0.0,              # step size of each ascent step, relative to ||w_l||; 0: xi (one step to the sphere)
        grad_clip=0.05,      # element-wise clipping of the gradient at w + nu (0: off)
        include_bias=False,  # False: kernels only (the code's no_normalization_no_bias); BN never perturbed
        loss_threshold=0.0,  # 0: perturb every batch (code: "simple"); 2.1: only while the robust loss is below (code: "threshold")
    ))
    return apply_preset(c, preset)

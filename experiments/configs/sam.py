"""SAM / ASAM on the robust loss (not in the paper; Foret et al. 2021, Kwon et al. 2021) on the paper's AT recipe:
PGD-7 adversarial inputs as in PGD-AT, then the gradient of the robust batch loss at w + eps, eps the first-order
worst case in the ball of radius rho (SAM: ||eps|| <= rho; ASAM: ||eps / (|w| + eta)|| <= rho, biases not rescaled),
applied to w. Batch-norm statistics come from the pass at w (robust_flat/training/sam.py says why).

    python -m experiments.cifar10_at --config=experiments/configs/sam.py --run-dir runs/sam005 --data-dir DIR
    python -m experiments.cifar10_at --config=experiments/configs/sam.py:smoke --config.sam.adaptive=True

``sam.rho`` unset (None) is the papers' CIFAR radius of the variant: 0.05 for SAM, 0.5 for ASAM.
``--config.sam.rho=0`` is PGD-AT (with one more forward/backward per step).
"""
import ml_collections

from experiments.configs.common import apply_preset, base_config


def get_config(preset: str = ""):
    c = base_config()
    c.method = "sam"
    c.sam = ml_collections.ConfigDict(dict(
        rho=ml_collections.FieldReference(None, field_type=float),  # None: 0.05 (SAM), 0.5 (ASAM)
        adaptive=False,  # False: SAM (Foret et al.); True: ASAM (Kwon et al.)
        eta=0.01,        # ASAM's offset in T_w = |w| + eta (Kwon et al.: 0.01); unused by SAM
    ))
    return apply_preset(c, preset)

"""Input-space attacks: PGD, APGD / APGD-T, FAB / FAB-T, Square, and the AutoAttack cascade.

Every attack is ``attack(logits_fn, x, y, key, config) -> x_adv`` with a frozen-dataclass config (see
:mod:`robust_flat.attacks.common`). FAB and Square are imported tolerantly so that the package works without them.
"""
from robust_flat.attacks.apgd import APGDConfig, apgd, apgd_with_trace
from robust_flat.attacks.autoattack import (ATTACK_NAMES, VERSIONS, AutoAttackConfig, CascadeState, Component,
                                            autoattack, run_cascade)
from robust_flat.attacks.pgd import PGDConfig, pgd

__all__ = ["PGDConfig", "pgd", "APGDConfig", "apgd", "apgd_with_trace", "AutoAttackConfig", "autoattack",
           "run_cascade", "CascadeState", "Component", "ATTACK_NAMES", "VERSIONS"]

try:
    from robust_flat.attacks.fab import FABConfig, fab
    __all__ += ["FABConfig", "fab"]
except ImportError:  # pragma: no cover - FAB not available
    pass
try:
    from robust_flat.attacks.square import SquareConfig, square
    __all__ += ["SquareConfig", "square"]
except ImportError:  # pragma: no cover - Square not available
    pass

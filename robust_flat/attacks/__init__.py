"""Input-space attacks: PGD, APGD / APGD-T, FAB / FAB-T, Square, and the AutoAttack cascade.

Every attack is ``attack(logits_fn, x, y, key, config) -> x_adv`` with a frozen-dataclass config (see
:mod:`robust_flat.attacks.common`).
"""
from robust_flat.attacks.apgd import APGDConfig, apgd, apgd_with_trace
from robust_flat.attacks.autoattack import (ATTACK_NAMES, VERSIONS, AutoAttackConfig, CascadeState, Component,
                                            autoattack, run_cascade)
from robust_flat.attacks.fab import FABConfig, fab
from robust_flat.attacks.pgd import PGDConfig, pgd
from robust_flat.attacks.square import SquareConfig, square

__all__ = ["PGDConfig", "pgd", "APGDConfig", "apgd", "apgd_with_trace", "AutoAttackConfig", "autoattack",
           "run_cascade", "CascadeState", "Component", "ATTACK_NAMES", "VERSIONS", "FABConfig", "fab", "SquareConfig",
           "square"]


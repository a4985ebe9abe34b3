"""Weight-space perturbations for flatness: layer selection, the relative neighbourhood B_xi(w), random and
adversarial perturbations. See :mod:`robust_flat.flatness` for the paper's flatness measures built on these."""
from robust_flat.weights.selection import LayerSelection, selected_paths, selection_mask
from robust_flat.weights.neighbourhood import (Neighbourhood, normalize, perturb, project, radii, relative_norms,
                                               within_ball)
from robust_flat.weights.random import sample
from robust_flat.weights.adversarial import WeightAttackConfig, weight_attack

__all__ = ["LayerSelection", "selected_paths", "selection_mask", "Neighbourhood", "normalize", "perturb", "project",
           "radii", "relative_norms", "within_ball", "sample", "WeightAttackConfig", "weight_attack"]

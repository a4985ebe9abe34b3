"""Label noise on the training set: the paper's "label noise" models (tau in 0.1, ..., 0.5; tau = 0.3 is in its
main table with RErr 56.2% vs AT's 62.8%).

:func:`noisy_labels` is a pure function of ``(labels, tau, seed, num_classes)``: the trainer applies it once, where
the training set is loaded (:func:`robust_flat.training.trainer.load_data`), so every example keeps the same noisy
label for the whole run, and a resumed run or a rerun with the same seed trains on the same labels. Exactly
``round(tau * N)`` examples are chosen (without replacement) and each gets a label drawn uniformly from all
``num_classes`` classes, as the released code draws it (U{0, ..., 9}): the new label may equal the true one, so about
``tau * (1 - 1/C)`` of the labels actually change (0.27 of them at tau = 0.3 on CIFAR-10). The released code instead
draws fresh noise for every mini-batch inside its loss and attacks the true label
(docs/paper-vs-code.md#label-noise).
"""
from __future__ import annotations

import numpy as np

# a fixed second word of the numpy seed, so that the noise stream differs from every other use of the run's seed
_STREAM = 0x1ABE1


def label_noise_mask(n: int, tau: float, seed: int) -> np.ndarray:
    """Boolean mask of the ``round(tau * n)`` examples whose label is redrawn (a pure function of its arguments)."""
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"label noise tau must be in [0, 1), got {tau}")
    rng = np.random.default_rng([int(seed), _STREAM])
    mask = np.zeros(n, bool)
    mask[rng.permutation(n)[:int(round(tau * n))]] = True
    return mask


def noisy_labels(labels, tau: float, seed: int, num_classes: int) -> np.ndarray:
    """``labels`` with the examples of :func:`label_noise_mask` relabelled uniformly from ``0 .. num_classes - 1``
    (a redrawn label may equal the true one). ``tau = 0`` returns the labels unchanged (a copy)."""
    labels = np.asarray(labels)
    mask = label_noise_mask(len(labels), tau, seed)
    rng = np.random.default_rng([int(seed), _STREAM, 1])
    drawn = rng.integers(0, num_classes, len(labels)).astype(labels.dtype)
    return np.where(mask, drawn, labels)

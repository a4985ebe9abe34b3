"""The newer training settings against PGD-AT at the overfitting CPU scale: weight averaging, label smoothing, label
noise, SAM and ASAM, each trained with ``cpu_overfit.py``'s data, model, budget and seed.

    python -m experiments.grid experiments/grids/cpu_methods.py --data-dir DIR --workers 2
    python -m experiments.correlate runs/grid_cpu_methods runs/grid_cpu_overfit/at --out docs/methods

Every run is ``cpu_overfit.py``'s AT recipe (small CNN with BN at width 2, the first 500 CIFAR-10 training images,
40 epochs of batch 32, lr 0.05 decayed at 50% and 75%, PGD-5 at eps 4/255, seed 0) with one change; the PGD-AT
baseline is ``cpu_overfit.py``'s ``at`` run (same settings and seed), so it is not trained again here. Each model is
measured at its last epoch and at its early-stopped epoch: clean and PGD-20 robust loss/error on 300 test images and
average-case flatness (xi 0.5, 2 samples, 200 images), as in ``cpu_overfit.py``.

* ``at_ema``: weight averaging with tau 0.99 (the paper's grid is 0.98-0.9975; at 15 steps per epoch 0.9975
  averages over ~27 epochs, 0.99 over ~7), the average's batch-norm statistics re-estimated on 60 training batches
  (4 passes over the 500 images, so the reset values keep a weight of 0.9^60 = 0.002) and every measure taken on the
  averaged weights. Its raw weights are exactly ``at``'s (averaging does not change training).
* ``at_ls0.2``: label smoothing tau 0.2 (the paper's grid 0.1, 0.2, 0.3).
* ``at_ln0.2``: label noise tau 0.2 (the paper's grid 0.1-0.5).
* ``sam``: SAM on the robust loss, rho 0.05 (Foret et al.'s CIFAR value).
* ``asam``: adaptive SAM, rho 0.5 (Kwon et al.'s CIFAR value).
"""
from experiments.grids import cpu_overfit


def get_config():
    g = cpu_overfit.get_config()
    g.name = "cpu_methods"
    g.description = ("The newer settings against PGD-AT at cpu_overfit's scale: small CNN (BN, width 2) on 500 CIFAR-10 "
                     "training images, 40 epochs of batch 32, eps 4/255; measures at the last and early-stopped epoch")
    g.root = "runs/grid_cpu_methods"
    g.runs = [
        dict(label="at_ema", config="ema", group="AT + EMA", weights="ema",
             overrides={"ema.decay": 0.99, "ema.bn_batches": 60}),
        dict(label="at_ls0.2", config="pgd_at", group="AT + label smoothing", overrides={"train.label_smoothing": 0.2}),
        dict(label="at_ln0.2", config="pgd_at", group="AT + label noise", overrides={"data.label_noise": 0.2}),
        dict(label="sam", config="sam", group="SAM"),
        dict(label="asam", config="sam", group="ASAM", overrides={"sam.adaptive": True}),
    ]
    g.measures = {
        "rloss": dict(g.measures["rloss"], snapshots="last,best", subsets=("test_first1000",)),
        "avg": dict(g.measures["avg"], snapshots="last,best"),
    }
    return g

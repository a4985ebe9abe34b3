"""The first CPU-scale grid (docs/reproduction-cpu/REPORT.md), sized for a 2-core machine; its models underfit, so
the reproduction is its successor ``cpu_overfit.py`` (docs/reproduction/REPORT.md), with its methods and measures.

    python -m experiments.grid experiments/grids/cpu.py --data-dir DIR      # DIR: CIFAR-10 (see README "Data")
    python -m experiments.report runs/grid_cpu --out docs/reproduction-cpu

Scale (chosen so that the grid finishes within about 1.5 hours on 2 CPU cores with 2 workers, and so that AT could
overfit robustly, which it did not): the small CNN with BN on the first 1,000 CIFAR-10 training images (class-
balanced), 30 epochs of the paper's recipe (SGD lr 0.05, x0.1 at 40/60/80% of training) with batch 32 instead of 128
(930 steps; the paper keeps lr 0.05 for its batch-size variants), snapshots every 5 epochs, and a smaller radius:
training and every measure at eps 4/255 (training PGD-5 with step 1/255). At the paper's eps 8/255 this model only
underfits in this budget (a pilot AT run: train/test robust loss 1.91/2.03 after 18 of 30 epochs, past the first
decay, test still falling), so nothing could overfit. Measures at every 10th epoch and on the early-stopped model, on
300 images (robust loss) and 200 images (flatness) instead of 1,000, with fewer samples/restarts than the paper (see
``measures``); the paper's full settings are in ``experiments/grids/paper.py``. Run it with ``--workers 2`` on a
2-core machine.
"""
import ml_collections


def get_config():
    g = ml_collections.ConfigDict()
    g.name = "cpu"
    g.description = ("CPU-scale reproduction: small CNN (BN) on 1,000 CIFAR-10 training images, 30 epochs of batch 32, "
                     "eps 4/255 for training and every measure, measures on 200-300 test/train images")
    g.root = "runs/grid_cpu"
    g.eps = 4 / 255  # the input radius of every measure (training: attack.eps below)
    g.preset = "cpu"
    # applied to every run (a run's own overrides win); nested like the training config
    g.overrides = {
        "data": {"train_examples": 1000},
        "train": {"epochs": 30, "batch_size": 32},
        "attack": {"eps": 4 / 255, "step_size": 1 / 255, "steps": 5},
        "checkpoint": {"snapshot_every": 5, "every_steps": 100},
        "eval": {"n_examples": 128, "es_restarts": 1},  # per-epoch curves: cheap (snapshots get PGD-20 on 300)
    }
    g.runs = [
        dict(label="at", config="pgd_at", group="AT"),
        dict(label="at_wd5e-3", config="pgd_at", group="AT wd 5e-3", overrides={"optimizer.weight_decay": 5e-3}),
        dict(label="trades6", config="trades", group="TRADES"),
        dict(label="trades1", config="trades", group="TRADES", overrides={"trades.beta": 1.0}),
        dict(label="mart6", config="mart", group="MART"),
        dict(label="awp0.01", config="awp", group="AT-AWP"),
        dict(label="awp0.005", config="awp", group="AT-AWP", overrides={"awp.xi": 0.005}),
        dict(label="esgd1", config="entropy_sgd", group="Entropy-SGD"),
    ]
    g.measures = {
        # clean and PGD-20 robust loss/error, test and train (robust generalization gap)
        "rloss": dict(snapshots="10,20,30,best", subsets=("test_first1000", "train_first1000"), n_examples=300,
                      pgd_steps=20, restarts=1),
        # average-case flatness of the robust loss (paper: xi 0.5, 10 samples, 1000 images, reference PGD-20x10)
        "avg": dict(snapshots="10,20,30,best", xi=0.5, samples=2, n_examples=200, pgd_steps=20, reference_restarts=1,
                    nu_per="dataset"),
        # worst-case flatness (paper: xi 0.003, 20 iterations, 10 restarts)
        "worst": dict(snapshots="10,20,30,best", xi=0.003, restarts=1, n_examples=200, pgd_steps=20,
                      reference_restarts=1, attack_iters=20, nu_per="dataset"),
        # RErr of the last and the early-stopped model (AutoAttack's APGD-CE + APGD-T)
        "autoattack": dict(snapshots="last,best", version="fast", n_examples=200, n_iter=50),
        # 1D robust-loss landscapes along random and adversarial directions
        "landscape": dict(snapshots="last", runs=("at", "awp0.01"), n_examples=100,
                          directions="random,adversarial", num_directions=2, steps=11),
    }
    # dry-run estimates: seconds per (image x forward-backward) of the small CNN on the 2-core development machine
    g.cost = {"seconds_per_image_grad": 1.0e-3}
    return g

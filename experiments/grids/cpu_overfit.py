"""The CPU-scale reproduction (docs/reproduction/REPORT.md): ``cpu.py`` resized so that AT overfits robustly (H1).

    python -m experiments.grid experiments/grids/cpu_overfit.py --data-dir DIR --workers 2 --order snapshot
    python -m experiments.report runs/grid_cpu_overfit --out docs/reproduction

``cpu.py`` (1,000 images, the small CNN at width 1, 30 epochs, first decay at 40%) only underfits: at its end AT's
robust training error is still 55% and test robust loss never rises after the decay, so robust overfitting (H1) does
not show and a correlation says little about generalization. A pilot AT run with this grid's settings (half the images,
twice the width, 40 epochs, decays at 50% and 75%; docs/reproduction/pilots/at_w2_n500_40ep.*) fits the training set
robustly after the first decay (robust training loss 0.97 -> 0.80, robust training error 27%) while test robust loss
rises from its post-decay minimum 2.17 (epoch 22) to 2.28 (epoch 40): robust overfitting. The pilot took ~26 s per
epoch on 2 busy cores (17 min), so AT with its measures takes about 40 minutes here, the heavier methods more; the
whole grid is sized for about 8 hours with ``--workers 2``. Everything else (methods, measures, eps 4/255) is ``cpu.py``'s,
except Entropy-SGD's outer step.

Entropy-SGD's outer step is the released code's SGD with lr 0.05 and no momentum on the gradient ``w - mu``. With
L = 1, ``w - mu = (1 - beta1) eta' g = 0.025 g`` (eta' = 0.1, beta1 = 0.75), so one outer step moves w by about
0.00125 g: at the paper's scale (about 29,000 outer steps) that trains, but this grid's 320 outer steps do not leave the
initialization (``cpu.py``'s esgd1 ended at 99.5% robust error). Here the outer step is ucla-vision's original
Entropy-SGD default, lr 1 with momentum 0.9 (a steady-state step of about 0.25 g, half PGD-AT's 0.5 g): a pilot on
this grid's data learns at PGD-AT's pace (epoch 6: robust test error 77% vs AT's 78%, robust training loss 2.07 vs
1.82).
"""
from experiments.grids import cpu


def get_config():
    g = cpu.get_config()
    g.name = "cpu_overfit"
    g.description = ("CPU-scale reproduction sized to overfit: small CNN (BN, width 2) on 500 CIFAR-10 training "
                     "images, 40 epochs of batch 32 (lr decays at 50% and 75%), eps 4/255 for training and every "
                     "measure, measures on 200-300 test/train images")
    g.root = "runs/grid_cpu_overfit"
    g.overrides.data.train_examples = 500
    g.overrides.train.epochs = 40
    g.overrides.model = {"width": 2}
    g.overrides.optimizer = {"milestones": (0.5, 0.75)}
    for name in ("rloss", "avg", "worst"):
        g.measures[name].snapshots = "10,20,30,40,best"
    for run in g.runs:
        if run["label"] == "esgd1":
            run["overrides"] = {"optimizer.lr": 1.0, "optimizer.momentum": 0.9}
    g.cost = {"seconds_per_image_grad": 3.0e-3}  # width 2: ~3x the width-1 model's cost per image (the pilot)
    return g

"""The CPU reproduction resized so that AT overfits robustly (H1): candidate successor of ``cpu.py``.

    python -m experiments.grid experiments/grids/cpu_overfit.py --data-dir DIR --workers 2
    python -m experiments.report runs/grid_cpu_overfit --out docs/reproduction

``cpu.py`` (1,000 images, the small CNN at width 1, 30 epochs, first decay at 40%) only underfits: at its end AT's
robust training error is still 55% and test robust loss never rises after the decay, so robust overfitting (H1) does
not show and a correlation says little about generalization. A pilot AT run with this grid's settings (half the images,
twice the width, 40 epochs, decays at 50% and 75%; docs/reproduction/pilots/at_w2_n500_40ep.*) fits the training set
robustly after the first decay (robust training loss 0.97 -> 0.80, robust training error 27%) while test robust loss
rises from its post-decay minimum 2.17 (epoch 22) to 2.28 (epoch 40): robust overfitting. The pilot took ~26 s per
epoch on 2 busy cores (17 min), so AT with its measures takes about 40 minutes here, the heavier methods more; the
whole grid is sized for about 8 hours with ``--workers 2``. Everything else (methods, measures, eps 4/255) is ``cpu.py``'s.
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
    g.cost = {"seconds_per_image_grad": 3.0e-3}  # width 2: ~3x the width-1 model's cost per image (the pilot)
    return g

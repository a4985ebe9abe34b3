"""The paper's table at full scale (GPU cluster): ResNet-18, 150 epochs, snapshots every 5 epochs, its methods and
hyper-parameter sweeps, every measure with the paper's settings.

    python -m experiments.grid experiments/grids/paper.py --data-dir /shared/cifar10 --launcher slurm \\
        --partition gpu --gpus 1 --time-min 720
    python -m experiments.report runs/grid_paper --out reports/paper

One H200 trains a run in about 25 minutes plus its evaluations (README "GPU"); the measures on 31 snapshots of
each run dominate, so the dry run's estimate is for this machine's CPU and only useful as a relative size.
"""
import ml_collections


def get_config():
    g = ml_collections.ConfigDict()
    g.name = "paper"
    g.description = "The paper's methods and sweeps at full scale: ResNet-18, 150 epochs, snapshots every 5 epochs"
    g.root = "runs/grid_paper"
    g.preset = "paper"
    g.overrides = {}
    runs = [dict(label="at", config="pgd_at", group="AT"),
            dict(label="at_wd5e-3", config="pgd_at", group="AT wd", overrides={"optimizer.weight_decay": 5e-3}),
            dict(label="at_wd1e-2", config="pgd_at", group="AT wd", overrides={"optimizer.weight_decay": 1e-2}),
            dict(label="at_eps9", config="pgd_at", group="AT eps 9/255", overrides={"attack.eps": 9 / 255}),
            dict(label="at_silu", config="pgd_at", group="AT SiLU", overrides={"model.activation": "silu"}),
            dict(label="at_adam", config="pgd_at", group="AT Adam",
                 overrides={"optimizer.name": "adam", "optimizer.lr": 0.001})]
    runs += [dict(label=f"trades{b}", config="trades", group="TRADES", overrides={"trades.beta": float(b)})
             for b in (1, 3, 6, 9)]
    runs += [dict(label=f"mart{b}", config="mart", group="MART", overrides={"mart.beta": float(b)})
             for b in (1, 3, 6, 9)]
    runs += [dict(label=f"awp{xi:g}", config="awp", group="AT-AWP", overrides={"awp.xi": xi})
             for xi in (0.0005, 0.001, 0.005, 0.01, 0.015, 0.02)]
    runs += [dict(label=f"esgd{L}", config="entropy_sgd", group="Entropy-SGD", overrides={"esgd.L": L})
             for L in (1, 2, 3, 5)]
    g.runs = runs
    g.measures = {
        "rloss": dict(snapshots="all", subsets=("test_first1000", "train_first1000"), n_examples=1000,
                      pgd_steps=20, restarts=10),
        "avg": dict(snapshots="all", xi=0.5, samples=10, n_examples=1000, pgd_steps=20, reference_restarts=10,
                    nu_per="dataset"),
        "worst": dict(snapshots="all", xi=0.003, restarts=10, n_examples=1000, pgd_steps=20, reference_restarts=10,
                      attack_iters=20, nu_per="dataset"),
        "autoattack": dict(snapshots="last,best", version="standard_nosquare", n_examples=1000, n_iter=100),
        "landscape": dict(snapshots="last", runs=("at", "awp0.01", "at_adam"), n_examples=100,
                          directions="random,adversarial", num_directions=10, steps=51),
    }
    g.cost = {"seconds_per_image_grad": 1.0e-3, "train_factor": 20.0}  # ResNet-18: ~20x the small CNN per image
    return g

"""PGD-7 adversarial training with weight averaging, the paper's "Weight averaging" models: the AT recipe, and after
every optimizer step w_avg <- tau w_avg + (1 - tau) w with tau = ``ema.decay`` (paper: 0.98, 0.985, 0.99, 0.9975;
default 0.9975, the value the released code passes for all four, docs/paper-vs-code.md#sweeps). The paper reports
RErr 60.0% with AutoAttack for tau = 0.9975 (AT: 62.8%) and no less robust overfitting than AT.

    python -m experiments.cifar10_at --config=experiments/configs/ema.py --run-dir runs/ema9975 --data-dir DIR
    python -m experiments.cifar10_at --config=experiments/configs/ema.py --config.ema.decay=0.98 --run-dir runs/ema98
    python -m experiments.evaluate --run-dir runs/ema9975 --snapshot last --weights ema    # the averaged model

The averaged weights get batch-norm statistics of their own, re-estimated on clean training data at every epoch end
(``ema.bn_batches`` batches; 0 = one pass, the released code's calibration: docs/paper-vs-code.md#ema-bn), and are
evaluated every epoch next to the raw ones (``ema_test_robust_loss``, ... in metrics.jsonl) and early-stopped on
their own (``--snapshot best_ema``). ``--weights ema`` selects them in experiments.evaluate, flatness and robust_loss.
"""
from experiments.configs.common import apply_preset, base_config


def get_config(preset: str = ""):
    c = base_config()
    c.method = "pgd_at"
    c.ema.enabled = True
    c.ema.decay = 0.9975
    c = apply_preset(c, preset)
    # Two models are evaluated, and the average's statistics re-estimated, at every epoch end: the small presets
    # evaluate less to stay within a quarter of an epoch's cost (robust_flat.training.monitor.eval_cost)
    if preset == "cpu":  # curves on 400 images, early stopping every 2 epochs: 0.24 of an epoch
        c.eval.n_examples = 400
        c.checkpoint.snapshot_every = 2
    elif preset == "smoke":  # curves on 32 images, no early stopping (its 500 images alone cost 0.19): 0.20
        c.eval.n_examples = c.eval.batch_size = 32
        c.eval.early_stopping = False
    return c

"""The base config every training config starts from: the paper's PGD-AT recipe on CIFAR-10 with ResNet-18.

Values follow the paper's setup, with the released code's choices where the paper's text is a typo or silent: weight
decay 5e-4, Nesterov momentum, eps 8/255 (the code uses 0.0314); see docs/paper-vs-code.md (#weight-decay,
#nesterov, #eps).
"""
import ml_collections

from robust_flat.data import default_whitening

PRESETS = ("paper", "smoke", "cpu", "tiny")  # apply_preset

# The paper's variants that are one option of any config (its supplementary's "Methods" and hyper-parameter grids):
# field -> (what it does, the paper's values). ``python -m experiments.cifar10_at --list`` prints them next to their
# defaults, read from base_config() (tests/test_knobs.py checks that every field exists).
VARIANT_OPTIONS = {
    "train.label_smoothing": ("label smoothing of the training targets, (1 - tau) one-hot + tau / C, for the weight "
                              "update only (pgd_at, clean)", "tau 0.1, 0.2, 0.3"),
    "data.label_noise": ("label noise: a share tau of the training labels redrawn uniformly once, fixed per example",
                         "tau 0.1, 0.2, 0.3, 0.4, 0.5"),
    "attack.tau": ("PGD-tau: the training attack stops tau iterations after the label flipped (-1: plain PGD)",
                   "tau 0, 1, 2, 3"),
    "attack.step_rule": ("how the PGD step follows eps: fixed (step_size as given) or scaled (step_size x eps / "
                         "(8/255))", "larger eps 9/255: scaled (0.007875); the released code: fixed 0.007"),
    "attack.eps": ("training radius (L-inf); evaluations keep their own --eps (8/255)",
                   "8/255; larger eps 9/255 (larger_eps.py)"),
    "attack.steps": ("PGD iterations of the training attack", "7; PGD-5, PGD-14"),
    "attack.fraction": ("share of each batch trained adversarially", "1.0"),
    "train.clip_weights": ("weight clipping: every parameter in [-w_max, w_max] after each step (0: off)",
                           "w_max 0.005, 0.01, 0.025"),
    "train.batch_size": ("batch size (lr kept)", "128; 8 ... 512"),
    "optimizer.name": ("sgd (coupled L2, Nesterov) or adam", "sgd; Adam"),
    "optimizer.schedule": ("multistep, constant, or cyclic (0 -> lr -> 0 every optimizer.cycle_epochs)",
                           "multistep; cyclic with lr 0.2, 1-4 cycles of 30 epochs"),
    "optimizer.weight_decay": ("coupled L2 weight decay", "5e-4; 0 ... 0.05"),
    "ema.enabled": ("weight averaging w_avg <- tau w_avg + (1 - tau) w (ema.decay = tau)",
                    "tau 0.98, 0.985, 0.99, 0.9975"),
    "data.autoaugment": ("AutoAugment (CIFAR-10 policy) after crop/flip, every method; with data.cutout=16 the "
                         "paper's AutoAugment model (autoaugment.py)", "on, with Cutout 16"),
    "data.extra_path": ("extra pseudo-labelled training data: an .npz with images (uint8 NHWC) and labels, mixed "
                        "into every batch at data.extra_fraction (\"\": none)",
                        "500k pseudo-labelled Tiny Images (Carmon et al. 2019)"),
    "data.extra_fraction": ("share of every batch taken from data.extra_path", "0.5 (released code: 0.7)"),
    "model.activation": ("activation", "relu; silu, mish, gelu"),
    "model.dropout": ("dropout before each block's second norm", "0.1"),
}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "pgd_at"
    c.seed = 0
    dataset = ml_collections.FieldReference("cifar10")  # data.dataset, which model.whitening follows unless set

    c.model = ml_collections.ConfigDict(dict(
        name="resnet18", num_classes=10,
        activation="relu",   # relu | silu | mish | gelu (paper: x*sigmoid(1.702x)) | gelu_erf (code)
        norm="rebn",         # rebn (paper: scale 1+gamma) | bn | none
        dropout=0.0,         # paper's dropout variant: 0.1
        width=ml_collections.FieldReference(None, field_type=int),  # None: the model's default (64 for ResNet-18)
        dtype="float32",     # compute dtype; bfloat16: faster on GPU/TPU, params/optimizer/BN stats stay float32
        # input whitening constants: cifar10 | cifar100 | svhn | none; default: data.dataset's (synthetic: cifar10's).
        # Runs written before this option whitened with cifar10's whatever the dataset (robust_flat/runs.py).
        whitening=dataset._apply_op(default_whitening),  # a lazy reference: set data.dataset later, it follows
    ))

    c.data = ml_collections.ConfigDict(dict(
        dataset=dataset,     # cifar10 | cifar100 | svhn | synthetic (generated, NOT CIFAR-10)
        data_dir="",         # local files (also the --data-dir flag); empty: tensorflow-datasets
        pixel_scale=255.0,   # declared range of float images in .npz files: 255.0 or 1.0
        train_examples=0,    # 0: all; N: the first N training images
        augment=True,        # random crop (pad 4) + horizontal flip
        autoaugment=False,   # then the CIFAR-10 AutoAugment policy (the paper's AutoAugment model: True)
        cutout=0,            # then one Cutout square of this side (0: none; the paper's AutoAugment model: 16)
        extra_path="",       # .npz of extra pseudo-labelled images (images uint8 NHWC, labels) mixed into every batch
        extra_fraction=0.5,  # extra_path's share of each batch (paper 0.5, code 0.7: docs/paper-vs-code.md#unlabeled)
        label_noise=0.0,     # share tau of training labels redrawn once, fixed per example (paper: 0.1 ... 0.5)
        synthetic_train=2560, synthetic_test=1024,  # dataset "synthetic": training and test images
        synthetic_image_size=32,                    # and their side (a multiple of 8)
    ))

    c.train = ml_collections.ConfigDict(dict(
        epochs=150, batch_size=128,
        clip_weights=0.0,     # w_max: parameters clipped to [-w_max, w_max] after each step (paper: 0.005 ... 0.025)
        label_smoothing=0.0,  # tau of the training targets (1 - tau) one-hot + tau / C (paper: 0.1, 0.2, 0.3)
    ))

    c.optimizer = ml_collections.ConfigDict(dict(
        name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
        schedule="multistep", milestones=(0.4, 0.6, 0.8), gamma=0.1,  # epochs 60/90/120 of 150
        cycle_epochs=30,
    ))

    c.attack = ml_collections.ConfigDict(dict(
        eps=8 / 255, step_size=0.007, steps=7, norm="linf", init="uniform_norm", restarts=1,
        fraction=1.0,        # share of each batch trained adversarially (paper: 1.0; code's 50/50 variant: 0.5)
        unroll=True,         # unrolled PGD loop (2-5x faster than a rolled loop on XLA:CPU)
        tau=-1,              # PGD-tau: stop tau iterations after the label flipped (paper: 0, 1, 2, 3); -1: plain PGD
        step_rule="fixed",   # fixed: step_size as given; scaled: step_size x eps / (8/255)
                             # (step_size is then the 8/255 step)
    ))

    # weight averaging: tau (paper: 0.98, 0.985, 0.99, 0.9975); the average's batch-norm statistics are re-estimated at
    # every epoch end on bn_batches training batches (0: one pass, the released code's; docs/paper-vs-code.md#ema-bn)
    c.ema = ml_collections.ConfigDict(dict(enabled=False, decay=0.9975, bn_batches=0))

    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=100, snapshot_every=5, keep_latest=2))

    c.eval = ml_collections.ConfigDict(dict(
        n_examples=1280,     # per-epoch curves on the first 1280 train and test images (paper: 10 test batches)
        batch_size=256,
        early_stopping=True, es_steps=7, es_restarts=5,  # RErr on the last 500 test images at every snapshot
    ))

    # tests and tests/faults.py: SIGKILL the job after this step / at its N-th checkpoint write (0: the first), after
    # a delay that usually lands inside that write
    c.debug = ml_collections.ConfigDict(dict(sigkill_at_step=-1, sigkill_at_save=-1, sigkill_save_delay_ms=0.0))
    return c


def apply_preset(c: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
    """Named presets shared by the method configs (``--config=experiments/configs/pgd_at.py:PRESET``).

    * ``paper``: the full recipe above (GPU).
    * ``smoke``: the README's offline first run: small CNN (with BN) on generated synthetic data (NOT CIFAR-10), 3 short
      epochs of the paper's optimizer and attack, about 2 minutes on a 2-core CPU, compilation included.
    * ``cpu``: small CNN on 10,000 CIFAR-10 training images, 10 epochs (pass --data-dir or have tfds data).
    * ``tiny``: the test suite's model and data (16x16 synthetic images; seconds).

    Every preset but ``tiny`` (a test fixture) keeps the per-epoch evaluation (curves and early stopping) at most a
    quarter of an epoch's cost (``robust_flat.training.monitor.eval_cost``; checked by tests/test_training.py).
    Clean training costs about 2 passes per image instead of PGD-7 AT's 9, so its curves use fewer images.
    """
    if preset in ("", "paper", None):
        return c
    if preset in ("smoke", "tiny"):
        c.data.dataset = "synthetic"
        c.model.name = "small_cnn"
        c.model.norm = "rebn"  # the BN variant: adversarial training leaves its initial plateau far sooner
        c.checkpoint.snapshot_every = 1
        if preset == "smoke":
            # The synthetic task is easy: ~20 steps of PGD-AT reach 0% robust error. Short epochs (6 steps of 128)
            # let the robust curves rise over all 3 epochs (clean test error is 0 from epoch 2); their evaluation
            # then has to be small to stay within a quarter of an epoch: 64 images per curve (clean: 16), early
            # stopping (PGD-3, 1 restart, last 500 of 576 test images, disjoint from the curve's first 64) once, at
            # the end.
            c.data.synthetic_train, c.data.synthetic_test = 768, 576
            c.train.epochs = 3
            c.eval.n_examples = 16 if c.method == "clean" else 64
            c.eval.batch_size = c.eval.n_examples
            c.eval.es_steps, c.eval.es_restarts = 3, 1
            c.checkpoint.snapshot_every = 3
            c.checkpoint.every_steps = 10
        else:
            # 16x16 images: the suite trains this preset dozens of times, and at 32x32 running the steps costs more
            # than compiling them. Early stopping uses the curves' attack (PGD-2, one restart, batches of 64), so
            # both evaluations run one compiled program.
            c.data.synthetic_train, c.data.synthetic_test = 256, 128
            c.data.synthetic_image_size = 16
            c.train.epochs, c.train.batch_size = 2, 32
            c.attack.steps = 2
            c.eval.n_examples, c.eval.batch_size = 64, 64
            c.eval.es_steps, c.eval.es_restarts = 2, 1
            c.checkpoint.every_steps = 3
        return c
    if preset == "cpu":
        c.model.name = "small_cnn"
        c.model.norm = "rebn"
        c.data.train_examples = 10000
        c.train.epochs = 10
        c.eval.n_examples = 256 if c.method == "clean" else 1000  # clean steps are ~4.5x cheaper than PGD-7 AT's
        c.eval.es_restarts = 1  # early stopping every epoch: 5 restarts alone would cost 0.22 of an epoch
        c.checkpoint.snapshot_every = 1
        c.checkpoint.every_steps = 20
        return c
    raise ValueError(f"unknown preset {preset!r}; choose paper, smoke, cpu or tiny")

"""robust_flat.training.config_check: every problem of a training config at once, one line each, before training."""
import pytest

from experiments.configs import awp, clean, entropy_sgd, mart, pgd_at, trades
from robust_flat.training.config_check import FRACTION_FIELDS, check_config, config_fields, unknown_field

CONFIGS = (pgd_at, trades, mart, awp, entropy_sgd, clean)


def _with(module, preset="tiny", **values):
    c = module.get_config(preset)
    with c.unlocked():
        for path, value in values.items():
            *blocks, field = path.split("__")
            target = c
            for b in blocks:
                target = target[b]
            target[field] = value
    return c


@pytest.mark.parametrize("module", CONFIGS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_shipped_config_and_preset_passes(module):
    for preset in ("", "paper", "smoke", "cpu", "tiny"):
        assert check_config(module.get_config(preset)) == []


BAD = [  # (field, bad value, part of the problem line)
    ("train__epochs", -1, "train.epochs must be an integer >= 1, got -1"),
    ("train__epochs", 0, "train.epochs must be an integer >= 1"),
    ("train__batch_size", 0, "train.batch_size must be an integer >= 1"),
    ("checkpoint__every_steps", 0, "checkpoint.every_steps must be an integer >= 1"),
    ("checkpoint__snapshot_every", 0, "checkpoint.snapshot_every must be an integer >= 1"),
    ("checkpoint__keep_latest", 0, "checkpoint.keep_latest must be an integer >= 1"),
    ("eval__n_examples", -1, "eval.n_examples must be an integer >= 0"),
    ("eval__batch_size", 0, "eval.batch_size must be an integer >= 1"),
    ("eval__es_restarts", 0, "eval.es_restarts must be an integer >= 1"),
    ("data__train_examples", -5, "data.train_examples must be an integer >= 0"),
    ("data__synthetic_image_size", 20, "data.synthetic_image_size must be a multiple of 8"),  # tiny: synthetic data
    ("data__synthetic_image_size", 0, "data.synthetic_image_size must be a multiple of 8"),
    ("attack__eps", 0.0, "attack.eps must be a number > 0"),
    ("attack__eps", float("nan"), "attack.eps must be a number > 0"),
    ("attack__step_size", -0.01, "attack.step_size must be a number > 0"),
    ("attack__restarts", 0, "attack.restarts must be an integer >= 1"),
    ("attack__fraction", 1.5, "attack.fraction must be a number in [0, 1]"),
    ("attack__norm", "linfinity", "attack.norm must be one of linf, l2, got 'linfinity'"),
    ("attack__init", "uniform-norm", "(did you mean uniform_norm?)"),
    ("optimizer__lr", 0.0, "optimizer.lr must be a number > 0"),
    ("optimizer__momentum", 1.0, "optimizer.momentum must be a number in [0, 1)"),
    ("optimizer__weight_decay", -1e-4, "optimizer.weight_decay must be a number >= 0"),
    ("optimizer__name", "sgdm", "optimizer.name must be one of sgd, adam, got 'sgdm'"),
    ("optimizer__schedule", "cosine", "optimizer.schedule must be one of multistep, constant, cyclic"),
    ("optimizer__milestones", (0.8, 0.4), "optimizer.milestones must be increasing fractions"),
    ("model__name", "resnet19", "model.name must be one of resnet18, "),
    ("model__activation", "rellu", "(did you mean relu?)"),
    ("model__norm", "batchnorm", "model.norm must be one of rebn, bn, none"),
    ("model__dtype", "fp16", "model.dtype must be one of float32, bfloat16, float16"),
    ("model__num_classes", 1, "model.num_classes must be an integer >= 2"),
    ("model__dropout", 1.0, "model.dropout must be a number in [0, 1)"),
    ("data__dataset", "cifar-10", "(did you mean cifar10?)"),
    ("data__pixel_scale", 100.0, "data.pixel_scale must be 255.0"),
    ("ema__decay", 1.5, "ema.decay must be a number in [0, 1)"),
    ("seed", -1, "seed must be an integer >= 0"),
    ("method", "pgd-at", "method must be one of pgd_at, "),
]


@pytest.mark.parametrize("path,value,problem", BAD, ids=[f"{p}={v}" for p, v, _ in BAD])
def test_each_bad_value_is_one_problem_line(path, value, problem):
    problems = check_config(_with(pgd_at, **{path: value}))
    assert len(problems) == 1 and problem in problems[0], problems
    assert "\n" not in problems[0]


def test_all_problems_are_reported_at_once():
    problems = check_config(_with(pgd_at, train__epochs=-1, checkpoint__every_steps=0, model__name="resnet19",
                                  attack__eps=0.0))
    assert len(problems) == 4
    assert sum(p.startswith(f) for p in problems for f in ("train.epochs", "checkpoint.every_steps", "model.name",
                                                           "attack.eps")) == 4


def test_method_blocks_are_checked():
    assert "trades.beta must be a number >= 0" in check_config(_with(trades, trades__beta=-1.0))[0]
    assert "did you mean" in check_config(_with(trades, trades__best_iterate="lst"))[0]
    assert "awp.steps must be an integer >= 1" in check_config(_with(awp, awp__steps=0))[0]
    assert "esgd.langevin_lr must be a number > 0" in check_config(_with(entropy_sgd, esgd__langevin_lr=0.0))[0]
    # Entropy-SGD consumes L + 1 mini-batches a step: an explicit batches_per_step must agree
    bad = _with(entropy_sgd, esgd__L=2, train__batches_per_step=2)
    assert any("train.batches_per_step must be esgd.L + 1 = 3" in p for p in check_config(bad))
    c = pgd_at.get_config("tiny")
    with c.unlocked():
        c.method = "trades"  # a trades run without its block
    assert any("needs the config block 'trades'" in p for p in check_config(c))
    # a plain dict (a config.json read back) is checked the same way
    assert check_config(pgd_at.get_config("tiny").to_dict()) == []


def test_unknown_fields_get_a_suggestion():
    c = pgd_at.get_config("tiny")
    assert unknown_field(c, "train.epochs") is None and unknown_field(c, "model.width") is None
    assert unknown_field(c, "train.epochz") == "unknown config field train.epochz (did you mean train.epochs?)"
    assert "(did you mean train.epochs?)" in unknown_field(c, "trainn.epochs")
    assert "belongs to the trades config" in unknown_field(c, "trades.beta")
    assert "blocks are attack, checkpoint" in unknown_field(c, "zzz")
    assert "train.epochs" in config_fields(c) and "train" in config_fields(c)
    for path in FRACTION_FIELDS:  # the fields that take 8/255 on the command line exist in every config
        assert all(unknown_field(m.get_config("tiny"), path) is None for m in CONFIGS)

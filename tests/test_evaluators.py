"""The trainer's evaluators (robust_flat.training.monitor): schedules, which evaluators a config gets, the one
config-to-attack translation they use, and that an evaluator measures the model it names."""
import jax
import numpy as np
import optax

from experiments.configs import pgd_at as pgd_at_config
from flatness_toy import make_data, trained
from robust_flat.attacks.pgd import PGDConfig
from robust_flat.models import make_logits_fn
from robust_flat.training.monitor import Schedule, eval_key, evaluate, make_evaluators
from robust_flat.training.pgd_at import attack_config
from robust_flat.training.state import create_train_state


def test_schedule_every_n_epochs_and_at_the_end():
    every5 = Schedule(5)
    assert [e for e in range(1, 13) if every5.due(e, last=e == 12)] == [5, 10, 12]
    assert [e for e in range(1, 13) if Schedule(5, at_end=False).due(e, last=e == 12)] == [5, 10]
    assert [e for e in range(1, 4) if Schedule(0).due(e, last=e == 3)] == [3]  # only after the last epoch
    assert not any(Schedule(0, at_end=False).due(e, last=True) for e in range(1, 4))


def _data(n=8):
    x, y = make_data(n, seed=2)
    return {"curves": {"train": (x, y), "test": (x[:4], y[:4])}, "es": (x, y)}


def test_a_config_gets_curves_and_early_stopping_and_with_ema_the_same_for_the_average():
    c = pgd_at_config.get_config("tiny")
    c.checkpoint.snapshot_every = 3
    logits_fn = make_logits_fn(trained("rebn")[0])
    evs = make_evaluators(c, logits_fn, _data())
    assert [(e.name, e.prefix) for e in evs] == [("train", "train_"), ("test", "test_"), ("es", "es_")]
    assert [e.images for e in evs] == [8, 4, 8]
    assert evs[0].schedule == Schedule(1) and evs[2].schedule == Schedule(3)
    assert evs[2].record({"loss": 1.0, "robust_error": 0.5}) == {"es_robust_error": 0.5}  # only its robust error
    assert evs[0].record({"loss": 1.0, "robust_error": 0.5}) == {"train_loss": 1.0, "train_robust_error": 0.5}

    c.ema.enabled = True
    names = [(e.name, e.prefix) for e in make_evaluators(c, logits_fn, _data())]
    assert names[3:] == [("ema_train", "ema_train_"), ("ema_test", "ema_test_"), ("ema_es", "ema_es_")]

    c.eval.early_stopping, c.eval.n_examples = False, 0
    empty = _data()
    empty["curves"] = {k: (x[:0], y[:0]) for k, (x, y) in empty["curves"].items()}
    assert make_evaluators(c, logits_fn, empty) == []


def test_evaluation_attacks_come_from_the_training_attack_block_without_pgd_tau():
    c = pgd_at_config.get_config("paper")
    c.attack.tau = 2
    assert attack_config(c).tau == 2 and attack_config(c).restarts == c.attack.restarts
    a = c.attack
    # what the trainer's curves and early stopping attacked with before the one translation existed
    assert attack_config(c, steps=a.steps, restarts=1) == PGDConfig(
        eps=a.eps, step_size=a.step_size, steps=a.steps, norm=a.norm, init=a.init, restarts=1, unroll=a.unroll)
    es = attack_config(c, steps=c.eval.es_steps, restarts=c.eval.es_restarts)
    assert (es.steps, es.restarts, es.tau, es.eps, es.step_size) == (7, 5, None, a.eps, a.step_size)


def test_an_evaluator_measures_the_weights_it_names():
    model, params, model_state = trained("rebn")
    state = create_train_state(params, model_state, optax.sgd(0.1), jax.random.PRNGKey(0), ema=True)
    ema_params = jax.tree.map(lambda p: p * 0.8, params)
    ema_state = jax.tree.map(lambda s: s * 2.0 + 0.1, model_state)
    state = state.replace(ema_params=ema_params, ema_model_state=ema_state)
    c = pgd_at_config.get_config("tiny")
    c.ema.enabled, c.eval.early_stopping, c.eval.batch_size = True, False, 8
    logits_fn = make_logits_fn(model)
    data = _data()
    evs = {e.name: e for e in make_evaluators(c, logits_fn, data)}
    x, y = data["curves"]["train"]
    attack = attack_config(c, steps=c.attack.steps, restarts=1)
    for name, (p, s) in {"train": (params, model_state), "ema_train": (ema_params, ema_state)}.items():
        assert evs[name].run(state, 3) == evaluate(logits_fn, p, s, x, y, eval_key(c, 3), attack, 8)
    assert evs["train"].run(state, 3) != evs["ema_train"].run(state, 3)
    np.testing.assert_array_equal(np.asarray(eval_key(c, 3)), np.asarray(
        jax.random.fold_in(jax.random.PRNGKey(c.seed), 1_000_000 + 3)))  # the trainer's key of epoch 3

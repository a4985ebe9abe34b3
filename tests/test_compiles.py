"""No recompiles across batches, weights or epochs: counted with JAX's backend-compile monitoring event.

A jitted function that is traced again for every batch (a Python scalar baked in, a new closure per call, a shape
that changes) is correct but silently slow; these tests catch it.
"""
import jax
import numpy as np
import pytest

from experiments.configs import pgd_at as pgd_at_config
from robust_flat import flatness as F
from robust_flat.attacks.apgd import APGDConfig, apgd
from robust_flat.attacks.pgd import PGDConfig, pgd
from robust_flat.models import bind, make_logits_fn
from robust_flat.training.trainer import train
from robust_flat.weights import Neighbourhood
from robust_flat.xla import CompileCounter

from flatness_toy import make_data, random_params, tiny_model


@pytest.fixture
def compiles():
    with CompileCounter() as counter:
        yield counter


def _weights(model, seeds):
    return [random_params(model, seed) for seed in seeds]


def test_counter_sees_a_compile(compiles):
    f = jax.jit(lambda x: x * 3.0 + 1.0)
    f(np.ones(3, np.float32))
    assert compiles.count >= 1
    before = compiles.count
    f(np.ones(4, np.float32))  # new shape: must be counted
    assert compiles.count > before


def test_pgd_and_apgd_compile_once_for_new_batches_and_new_weights(compiles):
    model = tiny_model()
    logits_fn = make_logits_fn(model)
    x, _ = make_data(64)
    cfg, acfg = PGDConfig(steps=2), APGDConfig(n_iter=4, unroll=2)
    keys = [jax.random.PRNGKey(i) for i in range(3)]
    warm = None
    for i, (p, s) in enumerate(_weights(model, (0, 1, 2))):
        f = bind(logits_fn, p, s)
        xb = x[32 * (i % 2):32 * (i % 2) + 32]
        yb = np.asarray(f(xb).argmax(-1))  # the model's own predictions: every point is attacked (APGD skips
        jax.block_until_ready(pgd(f, xb, yb, keys[i], cfg))  # misclassified points, and with them its compiles)
        jax.block_until_ready(apgd(f, xb, yb, keys[i], acfg))
        if i == 0:
            warm = compiles.count
    assert compiles.count == warm


def test_average_case_flatness_compiles_once_per_shape(compiles):
    model = tiny_model()
    logits_fn = make_logits_fn(model)
    x, y = make_data(64)
    cfg = F.AverageCaseConfig(neighbourhood=Neighbourhood(xi=0.1), samples=2, attack=PGDConfig(steps=2),
                              reference_attack=PGDConfig(steps=2), batch_size=32, strategy="loop")
    (p0, s0), (p1, s1) = _weights(model, (0, 1))
    F.average_case(logits_fn, p0, s0, x, y, jax.random.PRNGKey(0), cfg)  # 2 batches x 2 samples
    warm = compiles.count
    F.average_case(logits_fn, p1, s1, x, y, jax.random.PRNGKey(1), cfg)  # new weights, new key
    assert compiles.count == warm


def test_training_compiles_nothing_after_the_first_epoch(tmp_path, monkeypatch):
    """The second epoch (its steps, evaluations, snapshot and checkpoints) compiles nothing: every compile happens
    while the trainer is still in its first epoch (the step of the last batch drawn is recorded at each compile)."""
    from robust_flat import data as data_lib

    config = pgd_at_config.get_config("tiny")  # 2 epochs of 8 steps
    steps_per_epoch = config.data.synthetic_train // config.train.batch_size
    current = {"step": -1}
    real_batch = data_lib.train_batch

    def train_batch(x, y, seed, step, batch_size, *args, **kwargs):
        current["step"] = step
        return real_batch(x, y, seed, step, batch_size, *args, **kwargs)

    monkeypatch.setattr(data_lib, "train_batch", train_batch)
    steps_at_compile = []

    jax.clear_caches()  # compiles of earlier tests in this process must not hide the first epoch's
    with CompileCounter(on_compile=lambda: steps_at_compile.append(current["step"])):
        state = train(config, str(tmp_path / "run"), progress=False)
    assert int(state.step) == 2 * steps_per_epoch
    assert steps_at_compile and max(steps_at_compile) < steps_per_epoch, steps_at_compile


def test_average_case_shares_the_reference_attack_program(compiles):
    """With the paper's settings the reference loss (PGD-20, restarts run one per call) and every weight sample
    (PGD-20 on w + nu) run the same attack program, so it compiles once; the weight sampler is a program of its own
    (inside the attack program XLA:CPU recomputed the sampler in every bias broadcast of every PGD pass)."""
    model = tiny_model()
    logits_fn = make_logits_fn(model)
    x, y = make_data(32)
    cfg = F.AverageCaseConfig(neighbourhood=Neighbourhood(xi=0.1), samples=2, attack=PGDConfig(steps=3),
                              reference_attack=PGDConfig(steps=3, restarts=2), batch_size=32, strategy="loop")
    params, model_state = random_params(model, 3)
    jax.clear_caches()  # an earlier test in this process may have compiled the same programs
    result = F.average_case(logits_fn, params, model_state, x, y, jax.random.PRNGKey(0), cfg)
    assert np.all(np.isfinite(result.per_example))
    assert compiles.names.count("jit(_robust_losses)") == 1, compiles.names
    assert compiles.names.count("jit(_avg_unit_weights)") == 1, compiles.names

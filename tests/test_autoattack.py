"""AutoAttack cascade: worst-case semantics, per-example records, fixed shapes, resuming, bad inputs."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_flat import xla
from robust_flat.attacks.autoattack import (AutoAttackConfig, CascadeState, Component, autoattack, bucket_size,
                                            predict, run_cascade)
from toy_task import make_data, toy_logits_fn

N, SIZE, BS = 40, 16, 16  # 40 points in batches of 16: every stage has a padded last batch
EPS = 3 / 255
FAST = AutoAttackConfig(eps=EPS, version="fast", n_iter=10, n_target_classes=2, apgd_unroll=2)  # as test_apgd
QUIET = dict(batch_size=BS, shape_buckets=1, log=lambda s: None)  # one compile per attack (compiles dominate)


@pytest.fixture(scope="module")
def setup():
    f = toy_logits_fn(SIZE)
    x, y = make_data(N, SIZE, seed=11)
    return f, x, y


@pytest.fixture(scope="module")
def fast(setup):
    f, x, y = setup
    return autoattack(f, x, y, jax.random.key(0), FAST, **QUIET)


def test_never_weaker_than_a_component(setup, fast):
    f, x, y = setup
    acc = fast.accuracy()
    assert list(acc) == ["clean", "apgd-ce", "apgd-t"]
    assert acc["clean"] >= acc["apgd-ce"] >= acc["apgd-t"]
    assert 0 < acc["apgd-t"] < acc["clean"]  # informative: some, not all, points broken
    alone = {name: autoattack(f, x, y, jax.random.key(0), dataclasses.replace(FAST, version="custom",
                                                                              attacks=(name,)), **QUIET).accuracy()
             for name in ("apgd-ce", "apgd-t")}
    for name in alone:
        assert acc["apgd-t"] <= alone[name][name]
        assert alone[name]["clean"] == acc["clean"]
    # the first attack sees the same batches and keys alone and in the cascade: identical result
    assert alone["apgd-ce"]["apgd-ce"] == acc["apgd-ce"]


def test_flags_match_the_returned_examples(setup, fast):
    f, x, y = setup
    x_adv = fast.x_adv
    correct = np.asarray(jnp.argmax(f(jnp.asarray(x_adv)), axis=1)) == y
    np.testing.assert_array_equal(fast.robust, correct)
    assert fast.accuracy()["apgd-t"] == pytest.approx(correct.mean())
    delta = (x_adv - x).reshape(N, -1)
    assert np.abs(delta).max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    np.testing.assert_allclose(fast.perturbation_norm, np.abs(delta).max(1), atol=1e-6)
    names = np.array(fast.broken_by_names(), dtype=object)
    clean_ok = np.asarray(jnp.argmax(f(jnp.asarray(x)), axis=1)) == y
    np.testing.assert_array_equal(names == "clean", ~clean_ok)
    np.testing.assert_array_equal(names == None, fast.robust)  # noqa: E711
    assert set(names[~fast.robust & clean_ok]) <= {"apgd-ce", "apgd-t"}
    np.testing.assert_array_equal(fast.perturbation_norm[names == None] == 0, True)  # noqa: E711


def test_cascade_attacks_only_robust_points(fast):
    clean_ok = fast.clean_correct
    np.testing.assert_array_equal(fast.attempted[0], clean_ok)
    np.testing.assert_array_equal(fast.attempted[1], clean_ok & (fast.broken_by != 0))


def test_same_key_same_result(setup, fast):
    f, x, y = setup
    again = autoattack(f, x, y, jax.random.key(0), FAST, **QUIET)
    np.testing.assert_array_equal(again.x_adv, fast.x_adv)
    np.testing.assert_array_equal(again.broken_by, fast.broken_by)


# ------------------------------------------------------------------ cheap fake attacks for the mechanics
TRACES = {"count": 0}


def _noise_attack(logits_fn, x, y, key, config):
    TRACES["count"] += 1  # runs at trace time only
    step = config * jnp.sign(jax.random.uniform(key, x.shape, minval=-1.0, maxval=1.0))
    return jnp.clip(x + step, 0.0, 1.0)


noise_attack = xla.jit(_noise_attack, static_argnames=("config",))


def _fake_cascade():
    return [Component("noise-a", noise_attack, 0.25), Component("noise-b", noise_attack, 0.3)]


def test_no_recompiles_for_changing_robust_counts(setup):
    f, x, y = setup
    TRACES["count"] = 0
    state = run_cascade(f, x, y, jax.random.key(1), _fake_cascade(), norm="linf", **QUIET)
    n_robust = [int(state.clean_correct.sum()), int((state.clean_correct & (state.broken_by != 0)).sum())]
    assert n_robust[0] != n_robust[1] and n_robust[1] % BS != 0  # different, padded sizes ...
    assert TRACES["count"] == 2  # ... but one compile per attack config
    # with shape buckets (16, 12, 8, 6): remainders are padded to the next bucket, at most 4 compiles per attack
    assert [bucket_size(n, 16, 4) for n in (16, 13, 12, 9, 8, 5, 3, 1)] == [16, 16, 12, 12, 8, 6, 6, 6]
    assert [bucket_size(n, 128, 6) for n in (128, 97, 96, 65, 47, 33, 24, 1)] == [128, 128, 96, 96, 48, 48, 24, 24]
    TRACES["count"] = 0
    run_cascade(f, x, y, jax.random.key(1), _fake_cascade(), norm="linf", **{**QUIET, "shape_buckets": 4})
    assert TRACES["count"] <= 2 * 4


def test_resume_reproduces_the_uninterrupted_run(setup):
    f, x, y = setup
    full = run_cascade(f, x, y, jax.random.key(2), _fake_cascade(), norm="l2", **QUIET)
    saved = {}

    def interrupt(state, stage, done, total):
        saved["state"] = json.dumps(state.to_dict())
        if stage == "noise-a" and done >= BS:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_cascade(f, x, y, jax.random.key(2), _fake_cascade(), norm="l2", on_batch=interrupt, **QUIET)
    partial = CascadeState.from_dict(json.loads(saved["state"]))
    assert 0 < partial.attempted[0].sum() < full.attempted[0].sum()
    resumed = run_cascade(f, x, y, jax.random.key(2), _fake_cascade(), norm="l2", state=partial, **QUIET)
    np.testing.assert_array_equal(resumed.broken_by, full.broken_by)
    np.testing.assert_allclose(resumed.perturbation_norm, full.perturbation_norm, rtol=1e-6)
    assert resumed.accuracy() == full.accuracy()
    assert 0 < full.accuracy()["noise-b"] < full.accuracy()["clean"]


def test_standard_version(setup, fast):
    f, x, y = setup
    std = dataclasses.replace(FAST, version="standard", square_queries=50)
    state = autoattack(f, x, y, jax.random.key(0), std, **QUIET)
    acc = state.accuracy()
    assert list(acc) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    # the first two attacks see the same points, batches and keys as in "fast": identical up to there
    assert acc["apgd-t"] == fast.accuracy()["apgd-t"]
    assert acc["square"] <= acc["fab-t"] <= acc["apgd-t"]
    correct = predict(f, jnp.asarray(state.x_adv)) == y
    np.testing.assert_array_equal(state.robust, correct)


def test_bad_inputs(setup):
    f, x, y = setup
    with pytest.raises(ValueError, match="eps"):
        AutoAttackConfig(eps=0.0)
    with pytest.raises(ValueError, match="version"):
        AutoAttackConfig(version="strongest")
    with pytest.raises(ValueError, match="unknown attack"):
        AutoAttackConfig(version="custom", attacks=("apgd-ce", "cw"))
    with pytest.raises(ValueError, match="custom"):
        AutoAttackConfig(version="standard", attacks=("apgd-ce",))
    with pytest.raises(ValueError, match="custom"):
        AutoAttackConfig(version="custom")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        autoattack(f, x + 1.0, y, jax.random.key(0), FAST, **QUIET)
    with pytest.raises(ValueError, match="state"):
        run_cascade(f, x, y, jax.random.key(0), _fake_cascade(), norm="linf",
                    state=CascadeState.new(N, ("apgd-ce",)), **QUIET)


# ------------------------------------------------------------------ target classes follow the class count
def _linear_model(n_classes: int, n: int = 12, size: int = 8, seed: int = 3):
    """A fixed random linear classifier on [size, size, 3] images and inputs labelled by it (clean accuracy 100%,
    easy to attack): cheap to compile, any number of classes."""
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(size * size * 3, n_classes)).astype(np.float32) / 8.0)

    def f(x):
        return x.reshape(x.shape[0], -1) @ w

    x = rng.uniform(0.3, 0.7, (n, size, size, 3)).astype(np.float32)
    return f, x, np.asarray(jnp.argmax(f(jnp.asarray(x)), axis=1), np.int32)


def test_target_classes_follow_the_class_count():
    from robust_flat.attacks.autoattack import components, target_classes

    assert [target_classes(None, c) for c in (2, 4, 10, 100)] == [1, 3, 9, 9]  # min(9, C - 1): the standard 9
    targeted = {c.name: c.config.n_target_classes for c in components(AutoAttackConfig(), n_classes=4)
                if c.name in ("apgd-t", "fab-t")}
    assert targeted == {"apgd-t": 3, "fab-t": 3}
    assert {c.config.n_target_classes for c in components(AutoAttackConfig(), n_classes=10)
            if c.name in ("apgd-t", "fab-t")} == {9}
    # AutoAttack standard end to end on a 4-class model (it used to fail in APGD-T, after APGD-CE had run)
    f, x, y = _linear_model(4)
    cfg = AutoAttackConfig(eps=8 / 255, n_iter=3, square_queries=10, apgd_unroll=3)
    state = autoattack(f, x, y, jax.random.key(0), cfg, batch_size=12, shape_buckets=1, log=lambda s: None)
    acc = state.accuracy()
    assert list(acc) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"] and acc["clean"] == 1.0
    assert state.done and acc["square"] <= acc["apgd-t"] <= acc["apgd-ce"]


def test_too_many_target_classes_are_refused_before_anything_runs():
    f, x, y = _linear_model(4)
    too_many = AutoAttackConfig(version="custom", attacks=("apgd-ce", "apgd-t"), n_target_classes=5)
    with pytest.raises(ValueError, match="at most 3"):
        autoattack(f, x, y, jax.random.key(0), too_many, **QUIET)
    # a cascade built without the class count is checked by run_cascade before its first stage (the clean pass)
    from robust_flat.attacks.autoattack import components

    calls = []
    spy = Component("spy", lambda *a: calls.append("attack") or a[1], None)
    with pytest.raises(ValueError, match="apgd-t: 5 target classes .* at most 3"):
        run_cascade(f, x, y, jax.random.key(0), [spy] + components(too_many), norm="linf",
                    on_batch=lambda *a: calls.append("batch"), **QUIET)
    assert calls == []
    with pytest.raises(ValueError, match="integer >= 1"):
        AutoAttackConfig(n_target_classes=0)
    f3, x3, y3 = _linear_model(3)  # APGD-T's targeted DLR loss needs 4 classes: also refused up front
    with pytest.raises(ValueError, match="at least 4 classes"):
        autoattack(f3, x3, y3, jax.random.key(0), AutoAttackConfig(version="fast", n_iter=2), **QUIET)

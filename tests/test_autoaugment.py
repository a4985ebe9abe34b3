"""AutoAugment (CIFAR-10 policy) and Cutout: each operation against PIL (the library the policy was defined with) or
an obvious property, the policy's randomness as a function of (seed, step, example position), and a tiny training
run with them that resumes bit-identically."""
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from robust_flat import autoaugment as A
from robust_flat.training.update import Augmentation, prepare_images, step_options


def _image(seed=0, size=8):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    img[..., 2] = rng.integers(40, 90, (size, size))  # a narrow channel: autocontrast and equalize stretch it
    return img


def _levels(x):
    return np.round(np.asarray(x) * 255).astype(int)


def _on_levels(x):
    x = np.asarray(x)
    return x.min() >= 0 and x.max() <= 1 and np.abs(x * 255 - np.round(x * 255)).max() < 1e-3


def test_pixel_operations_equal_pil():
    img = _image()
    pil, x = Image.fromarray(img), jnp.asarray(img, jnp.float32) / 255
    exact = [(A.invert(x), ImageOps.invert(pil)), (A.autocontrast(x), ImageOps.autocontrast(pil)),
             (A.equalize(x), ImageOps.equalize(pil)), (A.rotate(x, 90.0), pil.rotate(90))]
    exact += [(A.posterize(x, b), ImageOps.posterize(pil, b)) for b in (7, 5, 4)]
    exact += [(A.solarize(x, t), ImageOps.solarize(pil, t)) for t in (227.6, 113.8, 0)]
    for f in (0.1, 0.5, 1.7):
        exact += [(A.contrast(x, f), ImageEnhance.Contrast(pil).enhance(f)),
                  (A.brightness(x, f), ImageEnhance.Brightness(pil).enhance(f)),
                  (A.sharpness(x, f), ImageEnhance.Sharpness(pil).enhance(f))]
        # dm-pix's float luma vs PIL's integer one: at most one level apart
        assert np.abs(_levels(A.color(x, f)) - np.asarray(ImageEnhance.Color(pil).enhance(f))).max() <= 1
    for ours, theirs in exact:
        np.testing.assert_array_equal(_levels(ours), np.asarray(theirs))
    fill = (128, 128, 128)
    np.testing.assert_array_equal(_levels(A.translate_x(x, 3.0)), np.asarray(
        pil.transform(pil.size, Image.AFFINE, (1, 0, 3, 0, 1, 0), fillcolor=fill)))
    np.testing.assert_array_equal(_levels(A.translate_y(x, -2.0)), np.asarray(
        pil.transform(pil.size, Image.AFFINE, (1, 0, 0, 0, 1, -2), fillcolor=fill)))
    np.testing.assert_array_equal(_levels(A.rotate(x, 90.0)), np.rot90(img))  # counter-clockwise
    for shear in (0.3, -0.2):  # linear interpolation (PIL's policy: bicubic), PIL's pixel-centre convention
        for ours, data in ((A.shear_x(x, shear), (1, shear, 0, 0, 1, 0)),
                           (A.shear_y(x, shear), (1, 0, 0, shear, 1, 0))):
            theirs = np.asarray(pil.transform(pil.size, Image.AFFINE, data, Image.BILINEAR, fillcolor=fill))
            assert np.abs(_levels(ours) - theirs).max() <= 1


def test_operations_at_their_neutral_magnitude_are_the_identity_and_keep_uint8_levels():
    x = jnp.asarray(_image(1), jnp.float32) / 255
    for out in (A.rotate(x, 0.0), A.shear_x(x, 0.0), A.shear_y(x, 0.0), A.translate_x(x, 0.0),
                A.translate_y(x, 0.0), A.posterize(x, 8), A.solarize(x, 256), A.color(x, 1.0), A.contrast(x, 1.0),
                A.brightness(x, 1.0), A.sharpness(x, 1.0), A.invert(A.invert(x))):
        np.testing.assert_array_equal(_levels(out), _levels(x))
    assert np.all(_levels(A.posterize(x, 4)) % 16 == 0)
    np.testing.assert_array_equal(_levels(A.solarize(x, 0)), _levels(A.invert(x)))
    assert np.all(_levels(A.brightness(x, 0.0)) == 0)
    gray = _levels(A.color(x, 0.0))
    assert np.all(gray[..., 0] == gray[..., 1]) and np.all(gray[..., 1] == gray[..., 2])
    assert len(np.unique(_levels(A.contrast(x, 0.0)))) == 1
    stretched = _levels(A.autocontrast(x))
    assert np.all(stretched.min(axis=(0, 1)) == 0) and np.all(stretched.max(axis=(0, 1)) == 255)
    flat = jnp.full((8, 8, 3), 102 / 255)
    np.testing.assert_array_equal(_levels(A.autocontrast(flat)), _levels(flat))  # a constant channel is unchanged
    np.testing.assert_array_equal(_levels(A.equalize(flat)), _levels(flat))
    for name, (fn, signed, _) in A.OPERATIONS.items():  # every operation at its largest magnitude, both signs
        for sign in (1.0, -1.0) if signed else (1.0,):
            out = fn(x, A._argument(name, A.magnitude(name, 9), sign, 8))
            assert out.shape == x.shape and _on_levels(out), name


def test_the_cifar10_policy_and_its_magnitudes():
    assert len(A.CIFAR10_POLICY) == 25
    assert all(len(s) == 2 and all(n in A.OPERATIONS and 0 <= p <= 1 and 0 <= i <= 9 for n, p, i in s)
               for s in A.CIFAR10_POLICY)
    assert A.magnitude("posterize", 7) == 5 and A.magnitude("posterize", 0) == 8
    assert A.magnitude("solarize", 0) == 256 and A.magnitude("solarize", 9) == 0
    assert A.magnitude("rotate", 9) == pytest.approx(30) and A.magnitude("shearX", 0) == 0


def test_a_sub_policy_applies_its_operations_with_their_probabilities():
    x = jnp.asarray(np.stack([_image(s) for s in range(4)]), jnp.float32) / 255
    key = jax.random.PRNGKey(3)
    never = ((("invert", 0.0, 0), ("rotate", 0.0, 9)),)
    np.testing.assert_array_equal(A.autoaugment(key, x, never), x)
    twice = ((("invert", 1.0, 0), ("invert", 1.0, 0)),)
    np.testing.assert_array_equal(_levels(A.autoaugment(key, x, twice)), _levels(x))
    once = ((("invert", 1.0, 0), ("posterize", 0.0, 9)),)
    np.testing.assert_array_equal(_levels(A.autoaugment(key, x, once)), 255 - _levels(x))


def test_augmentation_is_a_function_of_seed_step_and_position():
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))}
    spec = Augmentation(crop_flip=True, autoaugment=True, cutout=6)
    step_key = lambda seed, step: jax.random.fold_in(jax.random.PRNGKey(seed), step)  # the trainer's
    run = jax.jit(prepare_images, static_argnums=2)
    a = run(batch, step_key(0, 5), spec)
    np.testing.assert_array_equal(a, run(batch, step_key(0, 5), spec))
    assert _on_levels(a) and a.shape == (6, 16, 16, 3)
    for other in (step_key(0, 6), step_key(1, 5)):
        b = run(batch, other, spec)
        assert all(not np.array_equal(a[i], b[i]) for i in range(6))
    x = batch["image"].astype(jnp.float32) / 255
    key = jax.random.PRNGKey(7)  # the policy and Cutout of example i depend on its position, not the batch size
    policy = ((("invert", 0.5, 0), ("rotate", 0.5, 9)), (("solarize", 0.5, 4), ("translateX", 0.5, 9)))
    autoaugment = jax.jit(A.autoaugment, static_argnums=2)  # one program per batch size (eager: one per operation)
    cutout = jax.jit(A.cutout, static_argnums=2)
    np.testing.assert_array_equal(autoaugment(key, x, policy)[:3], autoaugment(key, x[:3], policy))
    np.testing.assert_array_equal(cutout(key, x, 6)[:3], cutout(key, x[:3], 6))
    # without AutoAugment and Cutout the step augments exactly as before they existed (crop/flip from the same key)
    np.testing.assert_array_equal(run(batch, step_key(0, 5), Augmentation()), run(batch, step_key(0, 5), True))


def test_cutout_sets_one_clipped_square_to_gray():
    x = jnp.zeros((32, 16, 16, 3))
    out = np.asarray(A.cutout(jax.random.PRNGKey(0), x, 6))
    for m in out[..., 0] > 0:
        rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        assert 3 <= len(rows) <= 6 and 3 <= len(cols) <= 6 and m.sum() == len(rows) * len(cols)
        assert np.ptp(rows) == len(rows) - 1 and np.ptp(cols) == len(cols) - 1  # contiguous
    assert np.all((out == 0) | (np.abs(out - A.FILL) < 1e-7))
    assert (out[..., 0] > 0).sum(axis=(1, 2)).max() == 36  # some squares lie wholly inside


def _interrupt_at(monkeypatch, module, name, step):
    """Make the trainer receive SIGINT while it loads batch ``step`` (it then saves and exits with status 130)."""
    real = getattr(module, name)

    def load(*args, **kwargs):
        if args[5 if name == "mixed_train_batch" else 3] == step:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, load)


def _tiny(config):
    c = config.get_config("tiny")
    c.train.epochs = 1
    c.eval.n_examples, c.eval.batch_size, c.eval.early_stopping = 32, 32, False
    return c


def test_training_with_autoaugment_runs_and_resumes_bit_identically(tmp_path, monkeypatch):
    from experiments.configs import autoaugment as aa_config
    from robust_flat import data as data_lib
    from robust_flat.runs import load_run
    from robust_flat.training.trainer import train

    c = _tiny(aa_config)
    assert step_options(c)["augment"] == Augmentation(True, True, 16)  # what every method's step is built with
    reference = jax.device_get(train(c, str(tmp_path / "ref"), progress=False))
    assert int(reference.step) == 8
    with monkeypatch.context() as m:
        _interrupt_at(m, data_lib, "train_batch", 3)
        with pytest.raises(SystemExit) as e:
            train(c, str(tmp_path / "resumed"), progress=False)
        assert e.value.code == 128 + signal.SIGINT
    assert load_run(str(tmp_path / "resumed"), "last").step == 4
    resumed = jax.device_get(train(c, str(tmp_path / "resumed"), progress=False))
    for a, b in zip(jax.tree.leaves((reference.params, reference.model_state)),
                    jax.tree.leaves((resumed.params, resumed.model_state))):
        np.testing.assert_array_equal(a, b)

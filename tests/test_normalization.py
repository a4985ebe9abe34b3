"""Input whitening follows the dataset (``model.whitening``), and runs written before that option existed are rebuilt
with the CIFAR-10 constants they were trained with."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import pgd_at as pgd_at_config
from experiments.configs.common import base_config
from robust_flat import models
from robust_flat.data import PIXEL_STATS
from robust_flat.runs import model_from_config, read_config
from robust_flat.training.config_check import check_config
from robust_flat.training.trainer import TrainingError, config_to_dict, prepare_run_dir


def _tiny(dataset=None):
    c = pgd_at_config.get_config("tiny")
    if dataset is not None:
        c.data.dataset = dataset
    return c


def _whitened(model, x):
    """What the model's ``whiten`` layer outputs for ``x`` (None: the model has none)."""
    variables = models.init_model(model, jax.random.PRNGKey(0), x.shape)
    _, state = model.apply({"params": variables[0], **variables[1]}, x, train=False,
                           capture_intermediates=lambda mdl, _: mdl.name == "whiten")
    found = state.get("intermediates", {}).get("whiten")
    return None if found is None else np.asarray(found["__call__"][0])


X = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), minval=-0.1, maxval=1.1)


@pytest.mark.parametrize("dataset,stats", [("cifar10", "cifar10"), ("cifar100", "cifar100"), ("svhn", "svhn"),
                                           ("synthetic", "cifar10")])
def test_a_new_config_whitens_with_the_constants_of_its_dataset(dataset, stats):
    c = _tiny(dataset)
    assert c.model.whitening == stats
    mean, std = PIXEL_STATS[stats]
    expected = (np.clip(np.asarray(X), 0, 1) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    np.testing.assert_allclose(_whitened(model_from_config(c), X), expected, rtol=1e-6, atol=1e-6)


def test_the_constants_are_those_of_the_training_images():
    assert PIXEL_STATS["cifar10"] == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert PIXEL_STATS["cifar100"] == ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    assert PIXEL_STATS["svhn"] == ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))


def test_a_cifar10_runs_model_is_unchanged():
    """CIFAR-10 (and the synthetic presets): the very module the config built before model.whitening existed."""
    for c in (base_config(), _tiny()):
        m = c.model
        before = models.create_model(m.name, num_classes=m.num_classes, **{
            k: v for k, v in m.to_dict().items() if k not in ("name", "num_classes", "whitening") and v is not None})
        assert model_from_config(c) == before


def test_an_old_run_without_the_key_is_rebuilt_with_cifar10_constants(tmp_path):
    """config.json of a run written before model.whitening existed: CIFAR-10's constants whatever its dataset
    (what every model whitened with then), not the new default (the dataset's)."""
    c = _tiny("cifar100")
    c.model.num_classes = 100
    old = config_to_dict(c)
    del old["model"]["whitening"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    model = model_from_config(read_config(str(tmp_path)))
    mean, std = PIXEL_STATS["cifar10"]
    expected = (np.clip(np.asarray(X), 0, 1) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    np.testing.assert_allclose(_whitened(model, X), expected, rtol=1e-6, atol=1e-6)
    assert model == model_from_config(ml_collections.ConfigDict({**old, "model": {**old["model"],
                                                                                  "whitening": "cifar10"}}))


def test_an_old_run_resumes_only_with_the_constants_it_was_trained_with(tmp_path):
    """A CIFAR-10 (or synthetic) run written before the key resumes with the new config as it is; a CIFAR-100 one
    refuses the new default (it would train another model) and resumes with --config.model.whitening=cifar10."""
    for dataset, ok in (("cifar10", True), ("synthetic", True), ("cifar100", False)):
        run = tmp_path / dataset
        c = _tiny(dataset)
        prepare_run_dir(str(run), c)
        old = json.loads((run / "config.json").read_text())
        del old["model"]["whitening"]
        (run / "config.json").write_text(json.dumps(old))
        os.makedirs(run / "checkpoints" / "latest" / "3")  # a rolling checkpoint: the stored config is binding
        if ok:
            prepare_run_dir(str(run), c)
            continue
        with pytest.raises(TrainingError, match=r"different config \(model.whitening: 'cifar10' -> 'cifar100'\)"):
            prepare_run_dir(str(run), c)
        c.model.whitening = "cifar10"
        prepare_run_dir(str(run), c)


def test_an_explicit_choice_is_kept_and_does_not_touch_the_dataset():
    c = _tiny("cifar100")
    c.model.whitening = "none"
    assert c.data.dataset == "cifar100"
    c.data.dataset = "svhn"  # set after an explicit whitening: the whitening stays
    assert c.model.whitening == "none"
    model = model_from_config(c)
    assert not model.whiten and _whitened(model, X) is None
    c.model.whitening = "svhn"
    assert model_from_config(c).whiten_mean == PIXEL_STATS["svhn"][0]


def test_whitening_options_of_an_imported_model_win():
    """An imported model's config (robust_flat.torch_import) holds whiten/whiten_mean/whiten_std itself."""
    c = _tiny("cifar100")
    c.model.whiten_mean, c.model.whiten_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    model = model_from_config(c)
    assert model.whiten_mean == (0.5, 0.5, 0.5) and model.whiten_std == (0.25, 0.25, 0.25)


def test_a_misspelt_whitening_is_one_clear_problem():
    c = _tiny()
    c.model.whitening = "cifar1O"
    problems = check_config(c)
    assert problems == ["model.whitening must be one of cifar10, cifar100, svhn, none (the input whitening "
                        "constants), got 'cifar1O'"]
    assert check_config(_tiny("svhn")) == []
    with pytest.raises(ValueError, match="whitening"):
        model_from_config(c)

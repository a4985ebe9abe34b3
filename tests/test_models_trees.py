"""The models' variable trees and outputs are pinned: refactoring the model code keeps every parameter and
batch-statistic path and shape (existing checkpoints and the PyTorch importer read them by name) and the function.

The expected trees and logits were captured from the models before their stems, layer partials and common fields
were shared (robust_flat/models/layers.py ``Classifier``, ``Block``, ``layer_partials``), for small configs that
between them create every module the models can have (stem conv with/without bias, shortcut convs and norms,
re-parameterized and plain BN, the final norm, the rotation head, the small CNN's hidden-layer norm).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_flat.models import ApplyFn, PreActResNet, ResNet, SmallCNN, WideResNet

CASES = {
    "resnet": lambda: ResNet(num_classes=3, stage_sizes=(1, 1), width=4),
    "resnet_nobias_bn_rot": lambda: ResNet(num_classes=3, stage_sizes=(1, 1), width=4, conv_bias=False, norm="bn",
                                           rotation_head=5),
    "preact": lambda: PreActResNet(num_classes=3, stage_sizes=(1, 1), width=4),
    "preact_input_nofinal_rot": lambda: PreActResNet(num_classes=3, stage_sizes=(1, 1), width=4,
                                                     shortcut_from="input", final_norm=False, rotation_head=5,
                                                     norm="bn"),
    "wrn": lambda: WideResNet(num_classes=3, depth=10, widen_factor=1),
    "small_cnn": lambda: SmallCNN(num_classes=3, channels=(2, 3), hidden=5),
    "small_cnn_rebn_rot": lambda: SmallCNN(num_classes=3, channels=(2, 3), hidden=5, norm="rebn", rotation_head=4,
                                           width=2),
}

TREES = {
    'resnet': {
        'batch_stats/norm1/stats/mean': (4,), 'batch_stats/norm1/stats/var': (4,),
        'batch_stats/stage1_block0/norm1/stats/mean': (4,), 'batch_stats/stage1_block0/norm1/stats/var': (4,),
        'batch_stats/stage1_block0/norm2/stats/mean': (4,), 'batch_stats/stage1_block0/norm2/stats/var': (4,),
        'batch_stats/stage2_block0/norm1/stats/mean': (8,), 'batch_stats/stage2_block0/norm1/stats/var': (8,),
        'batch_stats/stage2_block0/norm2/stats/mean': (8,), 'batch_stats/stage2_block0/norm2/stats/var': (8,),
        'batch_stats/stage2_block0/shortcut_norm/stats/mean': (8,),
        'batch_stats/stage2_block0/shortcut_norm/stats/var': (8,), 'params/conv1/bias': (4,),
        'params/conv1/kernel': (3, 3, 3, 4), 'params/logits/bias': (3,), 'params/logits/kernel': (8, 3),
        'params/norm1/bias': (4,), 'params/norm1/scale': (4,), 'params/stage1_block0/conv1/kernel': (3, 3, 4, 4),
        'params/stage1_block0/conv2/kernel': (3, 3, 4, 4), 'params/stage1_block0/norm1/bias': (4,),
        'params/stage1_block0/norm1/scale': (4,), 'params/stage1_block0/norm2/bias': (4,),
        'params/stage1_block0/norm2/scale': (4,), 'params/stage2_block0/conv1/kernel': (3, 3, 4, 8),
        'params/stage2_block0/conv2/kernel': (3, 3, 8, 8), 'params/stage2_block0/norm1/bias': (8,),
        'params/stage2_block0/norm1/scale': (8,), 'params/stage2_block0/norm2/bias': (8,),
        'params/stage2_block0/norm2/scale': (8,), 'params/stage2_block0/shortcut_conv/bias': (8,),
        'params/stage2_block0/shortcut_conv/kernel': (1, 1, 4, 8), 'params/stage2_block0/shortcut_norm/bias': (8,),
        'params/stage2_block0/shortcut_norm/scale': (8,),
    },
    'resnet_nobias_bn_rot': {
        'batch_stats/aux_rotation_head/norm1/stats/mean': (5,),
        'batch_stats/aux_rotation_head/norm1/stats/var': (5,), 'batch_stats/norm1/stats/mean': (4,),
        'batch_stats/norm1/stats/var': (4,), 'batch_stats/stage1_block0/norm1/stats/mean': (4,),
        'batch_stats/stage1_block0/norm1/stats/var': (4,), 'batch_stats/stage1_block0/norm2/stats/mean': (4,),
        'batch_stats/stage1_block0/norm2/stats/var': (4,), 'batch_stats/stage2_block0/norm1/stats/mean': (8,),
        'batch_stats/stage2_block0/norm1/stats/var': (8,), 'batch_stats/stage2_block0/norm2/stats/mean': (8,),
        'batch_stats/stage2_block0/norm2/stats/var': (8,),
        'batch_stats/stage2_block0/shortcut_norm/stats/mean': (8,),
        'batch_stats/stage2_block0/shortcut_norm/stats/var': (8,), 'params/aux_rotation_head/dense1/bias': (5,),
        'params/aux_rotation_head/dense1/kernel': (8, 5), 'params/aux_rotation_head/dense2/bias': (4,),
        'params/aux_rotation_head/dense2/kernel': (5, 4), 'params/aux_rotation_head/norm1/bias': (5,),
        'params/aux_rotation_head/norm1/scale': (5,), 'params/conv1/kernel': (3, 3, 3, 4),
        'params/logits/bias': (3,), 'params/logits/kernel': (8, 3), 'params/norm1/bias': (4,),
        'params/norm1/scale': (4,), 'params/stage1_block0/conv1/kernel': (3, 3, 4, 4),
        'params/stage1_block0/conv2/kernel': (3, 3, 4, 4), 'params/stage1_block0/norm1/bias': (4,),
        'params/stage1_block0/norm1/scale': (4,), 'params/stage1_block0/norm2/bias': (4,),
        'params/stage1_block0/norm2/scale': (4,), 'params/stage2_block0/conv1/kernel': (3, 3, 4, 8),
        'params/stage2_block0/conv2/kernel': (3, 3, 8, 8), 'params/stage2_block0/norm1/bias': (8,),
        'params/stage2_block0/norm1/scale': (8,), 'params/stage2_block0/norm2/bias': (8,),
        'params/stage2_block0/norm2/scale': (8,), 'params/stage2_block0/shortcut_conv/kernel': (1, 1, 4, 8),
        'params/stage2_block0/shortcut_norm/bias': (8,), 'params/stage2_block0/shortcut_norm/scale': (8,),
    },
    'preact': {
        'batch_stats/norm_final/stats/mean': (8,), 'batch_stats/norm_final/stats/var': (8,),
        'batch_stats/stage1_block0/norm1/stats/mean': (4,), 'batch_stats/stage1_block0/norm1/stats/var': (4,),
        'batch_stats/stage1_block0/norm2/stats/mean': (4,), 'batch_stats/stage1_block0/norm2/stats/var': (4,),
        'batch_stats/stage2_block0/norm1/stats/mean': (4,), 'batch_stats/stage2_block0/norm1/stats/var': (4,),
        'batch_stats/stage2_block0/norm2/stats/mean': (8,), 'batch_stats/stage2_block0/norm2/stats/var': (8,),
        'params/conv1/kernel': (3, 3, 3, 4), 'params/logits/bias': (3,), 'params/logits/kernel': (8, 3),
        'params/norm_final/bias': (8,), 'params/norm_final/scale': (8,),
        'params/stage1_block0/conv1/kernel': (3, 3, 4, 4), 'params/stage1_block0/conv2/kernel': (3, 3, 4, 4),
        'params/stage1_block0/norm1/bias': (4,), 'params/stage1_block0/norm1/scale': (4,),
        'params/stage1_block0/norm2/bias': (4,), 'params/stage1_block0/norm2/scale': (4,),
        'params/stage2_block0/conv1/kernel': (3, 3, 4, 8), 'params/stage2_block0/conv2/kernel': (3, 3, 8, 8),
        'params/stage2_block0/norm1/bias': (4,), 'params/stage2_block0/norm1/scale': (4,),
        'params/stage2_block0/norm2/bias': (8,), 'params/stage2_block0/norm2/scale': (8,),
        'params/stage2_block0/shortcut_conv/kernel': (1, 1, 4, 8),
    },
    'preact_input_nofinal_rot': {
        'batch_stats/aux_rotation_head/norm1/stats/mean': (5,),
        'batch_stats/aux_rotation_head/norm1/stats/var': (5,), 'batch_stats/stage1_block0/norm1/stats/mean': (4,),
        'batch_stats/stage1_block0/norm1/stats/var': (4,), 'batch_stats/stage1_block0/norm2/stats/mean': (4,),
        'batch_stats/stage1_block0/norm2/stats/var': (4,), 'batch_stats/stage2_block0/norm1/stats/mean': (4,),
        'batch_stats/stage2_block0/norm1/stats/var': (4,), 'batch_stats/stage2_block0/norm2/stats/mean': (8,),
        'batch_stats/stage2_block0/norm2/stats/var': (8,), 'params/aux_rotation_head/dense1/bias': (5,),
        'params/aux_rotation_head/dense1/kernel': (8, 5), 'params/aux_rotation_head/dense2/bias': (4,),
        'params/aux_rotation_head/dense2/kernel': (5, 4), 'params/aux_rotation_head/norm1/bias': (5,),
        'params/aux_rotation_head/norm1/scale': (5,), 'params/conv1/kernel': (3, 3, 3, 4),
        'params/logits/bias': (3,), 'params/logits/kernel': (8, 3),
        'params/stage1_block0/conv1/kernel': (3, 3, 4, 4), 'params/stage1_block0/conv2/kernel': (3, 3, 4, 4),
        'params/stage1_block0/norm1/bias': (4,), 'params/stage1_block0/norm1/scale': (4,),
        'params/stage1_block0/norm2/bias': (4,), 'params/stage1_block0/norm2/scale': (4,),
        'params/stage2_block0/conv1/kernel': (3, 3, 4, 8), 'params/stage2_block0/conv2/kernel': (3, 3, 8, 8),
        'params/stage2_block0/norm1/bias': (4,), 'params/stage2_block0/norm1/scale': (4,),
        'params/stage2_block0/norm2/bias': (8,), 'params/stage2_block0/norm2/scale': (8,),
        'params/stage2_block0/shortcut_conv/kernel': (1, 1, 4, 8),
    },
    'wrn': {
        'batch_stats/norm_final/stats/mean': (64,), 'batch_stats/norm_final/stats/var': (64,),
        'batch_stats/stage1_block0/norm1/stats/mean': (16,), 'batch_stats/stage1_block0/norm1/stats/var': (16,),
        'batch_stats/stage1_block0/norm2/stats/mean': (16,), 'batch_stats/stage1_block0/norm2/stats/var': (16,),
        'batch_stats/stage2_block0/norm1/stats/mean': (16,), 'batch_stats/stage2_block0/norm1/stats/var': (16,),
        'batch_stats/stage2_block0/norm2/stats/mean': (32,), 'batch_stats/stage2_block0/norm2/stats/var': (32,),
        'batch_stats/stage3_block0/norm1/stats/mean': (32,), 'batch_stats/stage3_block0/norm1/stats/var': (32,),
        'batch_stats/stage3_block0/norm2/stats/mean': (64,), 'batch_stats/stage3_block0/norm2/stats/var': (64,),
        'params/conv1/kernel': (3, 3, 3, 16), 'params/logits/bias': (3,), 'params/logits/kernel': (64, 3),
        'params/norm_final/bias': (64,), 'params/norm_final/scale': (64,),
        'params/stage1_block0/conv1/kernel': (3, 3, 16, 16), 'params/stage1_block0/conv2/kernel': (3, 3, 16, 16),
        'params/stage1_block0/norm1/bias': (16,), 'params/stage1_block0/norm1/scale': (16,),
        'params/stage1_block0/norm2/bias': (16,), 'params/stage1_block0/norm2/scale': (16,),
        'params/stage2_block0/conv1/kernel': (3, 3, 16, 32), 'params/stage2_block0/conv2/kernel': (3, 3, 32, 32),
        'params/stage2_block0/norm1/bias': (16,), 'params/stage2_block0/norm1/scale': (16,),
        'params/stage2_block0/norm2/bias': (32,), 'params/stage2_block0/norm2/scale': (32,),
        'params/stage2_block0/shortcut_conv/kernel': (1, 1, 16, 32),
        'params/stage3_block0/conv1/kernel': (3, 3, 32, 64), 'params/stage3_block0/conv2/kernel': (3, 3, 64, 64),
        'params/stage3_block0/norm1/bias': (32,), 'params/stage3_block0/norm1/scale': (32,),
        'params/stage3_block0/norm2/bias': (64,), 'params/stage3_block0/norm2/scale': (64,),
        'params/stage3_block0/shortcut_conv/kernel': (1, 1, 32, 64),
    },
    'small_cnn': {
        'params/conv1/bias': (2,), 'params/conv1/kernel': (3, 3, 3, 2), 'params/conv2/bias': (2,),
        'params/conv2/kernel': (3, 3, 2, 2), 'params/conv3/bias': (3,), 'params/conv3/kernel': (3, 3, 2, 3),
        'params/conv4/bias': (3,), 'params/conv4/kernel': (3, 3, 3, 3), 'params/fc1/bias': (5,),
        'params/fc1/kernel': (12, 5), 'params/logits/bias': (3,), 'params/logits/kernel': (5, 3),
    },
    'small_cnn_rebn_rot': {
        'batch_stats/aux_rotation_head/norm1/stats/mean': (4,),
        'batch_stats/aux_rotation_head/norm1/stats/var': (4,), 'batch_stats/norm1/stats/mean': (4,),
        'batch_stats/norm1/stats/var': (4,), 'batch_stats/norm2/stats/mean': (4,),
        'batch_stats/norm2/stats/var': (4,), 'batch_stats/norm3/stats/mean': (6,),
        'batch_stats/norm3/stats/var': (6,), 'batch_stats/norm4/stats/mean': (6,),
        'batch_stats/norm4/stats/var': (6,), 'batch_stats/norm_fc1/stats/mean': (10,),
        'batch_stats/norm_fc1/stats/var': (10,), 'params/aux_rotation_head/dense1/bias': (4,),
        'params/aux_rotation_head/dense1/kernel': (10, 4), 'params/aux_rotation_head/dense2/bias': (4,),
        'params/aux_rotation_head/dense2/kernel': (4, 4), 'params/aux_rotation_head/norm1/bias': (4,),
        'params/aux_rotation_head/norm1/scale': (4,), 'params/conv1/bias': (4,),
        'params/conv1/kernel': (3, 3, 3, 4), 'params/conv2/bias': (4,), 'params/conv2/kernel': (3, 3, 4, 4),
        'params/conv3/bias': (6,), 'params/conv3/kernel': (3, 3, 4, 6), 'params/conv4/bias': (6,),
        'params/conv4/kernel': (3, 3, 6, 6), 'params/fc1/bias': (10,), 'params/fc1/kernel': (24, 10),
        'params/logits/bias': (3,), 'params/logits/kernel': (10, 3), 'params/norm1/bias': (4,),
        'params/norm1/scale': (4,), 'params/norm2/bias': (4,), 'params/norm2/scale': (4,),
        'params/norm3/bias': (6,), 'params/norm3/scale': (6,), 'params/norm4/bias': (6,),
        'params/norm4/scale': (6,), 'params/norm_fc1/bias': (10,), 'params/norm_fc1/scale': (10,),
    },
}

# eval-mode logits of the models initialized with PRNGKey(0) on ``_inputs()``
LOGITS = {
    'preact': [[-3.767793, -2.119108, -0.125048], [-3.337082, -1.636456, 0.134716]],
    'preact_input_nofinal_rot': [[-1.415688, 0.903403, 3.330119], [-2.277311, 0.864329, 1.65487]],
    'resnet': [[-4.294183, -2.532063, -0.146264], [-4.281157, -2.594011, -0.077164]],
    'resnet_nobias_bn_rot': [[-4.294183, -2.532063, -0.146264], [-4.281157, -2.594011, -0.077164]],
    'small_cnn': [[-1.802807, -1.878268, -0.698273], [-1.226075, -1.433272, -0.856445]],
    'small_cnn_rebn_rot': [[-1.11151, 0.502833, -0.451273], [-1.484531, 0.169092, -0.798114]],
    'wrn': [[-0.442143, -0.767152, 0.608408], [-1.046484, -1.111373, 0.859317]],
}


def _init(model):
    return model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)}, jnp.zeros((1, 8, 8, 3)),
                      train=False)


def _inputs():
    return jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3), minval=-0.2, maxval=1.2)  # clamping matters too


def _tree(variables) -> dict:
    return {"/".join(str(k.key) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}


@pytest.mark.parametrize("name", sorted(CASES))
def test_variable_tree_paths_and_shapes_are_unchanged(name):
    assert _tree(jax.eval_shape(lambda: _init(CASES[name]()))) == TREES[name]


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_are_unchanged(name):
    model = CASES[name]()
    variables = dict(_init(model))
    params = variables.pop("params")
    logits, _ = ApplyFn(model)(params, variables, _inputs(), train=False)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(LOGITS[name]), rtol=1e-5, atol=2e-6)

"""Models: shapes, the released parameter count, jit without recompiling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ounl_jax import models


@pytest.mark.parametrize("name", models.MODEL_NAMES)
@pytest.mark.parametrize("shape,classes", [((32, 32, 3), 10), ((96, 96, 3), 100)])
def test_output_shape_logits(name, shape, classes):
  model = models.get_model(name, num_classes=classes, input_shape=shape, width=4)
  variables = model.init(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (2,) + shape, minval=-0.5, maxval=0.5)
  logits = model.apply(variables, x)
  assert logits.shape == (2, classes)
  # Logits, not probabilities: rows do not sum to one.
  assert not np.allclose(np.asarray(jnp.sum(logits, -1)), 1.0)
  train_logits, stats = model.apply(variables, x, train=True,
                                    rngs=jax.random.key(2))
  assert train_logits.shape == (2, classes)
  assert jax.tree_util.tree_structure(stats) == jax.tree_util.tree_structure(
      variables["batch_stats"])


def test_vgg3_has_the_released_parameter_count():
  model = models.get_model("vgg3", num_classes=10)
  variables = jax.eval_shape(model.init, jax.random.key(0))
  assert models.count_params(variables["params"]) == 1_798_282  # docs/protocol.md §2.1


def test_head_is_the_last_six_tensors():
  model = models.get_model("vgg3", num_classes=10, width=4)
  params = model.init(jax.random.key(0))["params"]
  mask = models.head_mask(params)
  flagged = [path for path, m in jax.tree_util.tree_flatten_with_path(mask)[0] if m]
  assert len(flagged) == 6
  assert {jax.tree_util.keystr(p).split("'")[1] for p in flagged} == set(
      models.HEAD_LAYERS)


def test_jit_does_not_recompile_on_second_call():
  model = models.get_model("vgg3", num_classes=10, width=4)
  variables = model.init(jax.random.key(0))
  apply = jax.jit(model.apply)
  x = jnp.zeros((3, 32, 32, 3))
  apply(variables, x)
  size = apply._cache_size()  # pylint: disable=protected-access
  apply(variables, x + 0.1)
  assert apply._cache_size() == size == 1  # pylint: disable=protected-access


def test_dropout_is_active_only_in_training():
  model = models.get_model("vgg3", num_classes=10, width=8)
  variables = model.init(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3), minval=-0.5, maxval=0.5)
  np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))
  a, _ = model.apply(variables, x, train=True, rngs=jax.random.key(1))
  b, _ = model.apply(variables, x, train=True, rngs=jax.random.key(2))
  assert not np.allclose(a, b)


def test_unknown_model_names_the_choices():
  with pytest.raises(ValueError, match="Did you mean vgg3"):
    models.get_model("vgg33", num_classes=10)
  with pytest.raises(ValueError, match="resnet"):
    models.get_model("alexnet", num_classes=10)

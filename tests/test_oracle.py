"""The black-box oracle: exact counts under jit and scan, budget, no parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ounl_jax import oracle as oracle_lib

SHAPE = (2, 2, 3)
NUM_CLASSES = 4
WEIGHTS = np.asarray(jax.random.normal(jax.random.key(0), (12, NUM_CLASSES)))


def probabilities(images):
  return jax.nn.softmax(images.reshape((images.shape[0], -1)) @ WEIGHTS)


def make(**kwargs):
  return oracle_lib.make_oracle(probabilities, input_shape=SHAPE,
                                num_classes=NUM_CLASSES, **kwargs)


def images(count, seed=0):
  return jax.random.uniform(jax.random.key(seed), (count,) + SHAPE,
                            minval=-0.5, maxval=0.5)


def test_answers_are_the_model_probabilities_and_count_eagerly():
  oracle = make()
  state = oracle.init()
  assert int(state.queries) == 0
  x = images(5)
  answers, state = oracle.query(state, x)
  np.testing.assert_allclose(answers, probabilities(x), rtol=1e-6)
  answers, state = oracle.query(state, images(3, 1))
  assert int(state.queries) == 8 and not bool(state.exceeded)


def test_labels_output():
  oracle = make(output="labels")
  x = images(6)
  answers, state = oracle.query(oracle.init(), x)
  np.testing.assert_array_equal(answers, np.argmax(probabilities(x), -1))
  assert answers.shape == (6,) and int(state.queries) == 6


def test_counts_exactly_under_jit():
  oracle = make()

  @jax.jit
  def attack_step(state, x):
    _, state = oracle.query(state, x[:3])
    _, state = oracle.query(state, x)  # 3 + 7 images.
    return state

  state = attack_step(oracle.init(), images(7))
  state = attack_step(state, images(7, 1))
  assert int(state.queries) == 20


def test_counts_exactly_under_scan():
  oracle = make()

  def body(state, x):
    answers, state = oracle.query(state, x)
    return state, answers.sum()

  batches = jnp.stack([images(9, seed) for seed in range(6)])
  state, _ = jax.jit(lambda s: jax.lax.scan(body, s, batches))(oracle.init())
  assert int(state.queries) == 54


def test_budget_is_enforced_eagerly():
  oracle = make(budget=10)
  _, state = oracle.query(oracle.init(), images(10))  # Exactly the budget.
  assert int(state.queries) == 10
  with pytest.raises(oracle_lib.QueryBudgetExceeded, match="budget of 10"):
    oracle.query(state, images(1))
  oracle_lib.check_budget(oracle, state)  # Nothing was refused so far.


def test_budget_is_enforced_under_scan_and_reported_at_the_boundary():
  oracle = make(budget=20)

  def body(state, x):
    answers, state = oracle.query(state, x)
    return state, answers

  batches = jnp.stack([images(7, seed) for seed in range(5)])
  state, answers = jax.jit(lambda s: jax.lax.scan(body, s, batches))(oracle.init())
  # 7 + 7 answered; the third query (21 > 20) and every later one refused.
  assert int(state.queries) == 14 and bool(state.exceeded)
  assert np.isfinite(answers[:2]).all() and np.isnan(answers[2:]).all()
  with pytest.raises(oracle_lib.QueryBudgetExceeded):
    oracle_lib.check_budget(oracle, state)
  with pytest.raises(oracle_lib.QueryBudgetExceeded):  # Refused state stays refused.
    oracle.query(state, images(1))


def test_refused_labels_are_minus_one_under_jit():
  oracle = make(budget=4, output="labels")
  answers, state = jax.jit(oracle.query)(oracle.init(), images(5))
  assert np.all(np.asarray(answers) == -1) and int(state.queries) == 0


def test_oracle_exposes_no_parameters():
  oracle = make(budget=100)
  leaves = jax.tree_util.tree_leaves(oracle)
  assert not any(isinstance(leaf, (np.ndarray, jax.Array)) for leaf in leaves)
  assert set(oracle._fields) == {"init", "query", "output", "budget",
                                 "input_shape", "num_classes"}
  state = oracle.init()
  assert set(state._fields) == {"queries", "exceeded"}
  assert all(np.shape(leaf) == () for leaf in jax.tree_util.tree_leaves(state))


def test_bad_arguments():
  with pytest.raises(ValueError, match="output"):
    make(output="logits")
  with pytest.raises(ValueError, match="budget"):
    make(budget=-1)
  with pytest.raises(ValueError, match="shape"):
    make().query(make().init(), jnp.zeros((2, 3, 3, 3)))

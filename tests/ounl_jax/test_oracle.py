"""The black-box oracle: exact counts under jit and scan, budget, parameters as jit
arguments, input validation, masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ounl_jax import oracle as oracle_lib

SHAPE = (2, 2, 3)
NUM_CLASSES = 4
WEIGHTS = np.asarray(jax.random.normal(jax.random.key(0), (12, NUM_CLASSES)))


def linear_softmax(weights, images):
  return jax.nn.softmax(images.reshape((images.shape[0], -1)) @ weights)


def probabilities(images):
  return linear_softmax(WEIGHTS, images)


def make(weights=WEIGHTS, **kwargs):
  return oracle_lib.make_oracle(linear_softmax, weights, input_shape=SHAPE,
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
  for view in (oracle, oracle.static()):
    leaves = jax.tree_util.tree_leaves(view)
    assert not any(isinstance(leaf, (np.ndarray, jax.Array)) for leaf in leaves)
  assert set(oracle._fields) == {"init", "query", "output", "budget",
                                 "input_shape", "num_classes"}
  state = oracle.init()
  assert set(state._fields) == {"queries", "exceeded", "server"}
  assert np.shape(state.queries) == np.shape(state.exceeded) == ()
  assert repr(state.server) == "ServerHandle(<opaque>)"
  assert not [name for name in dir(state.server) if not name.startswith("_")]
  with pytest.raises(RuntimeError, match="init"):
    oracle.static().init()


def test_parameters_are_jit_arguments_not_constants():
  other_weights = np.asarray(jax.random.normal(jax.random.key(9), WEIGHTS.shape))
  first, second = make(), make(other_weights)
  assert first.static() == second.static()
  assert hash(first.static()) == hash(second.static())
  traced = []

  def answer(oracle, state, x):
    traced.append(1)  # Runs once per compilation.
    return oracle.query(state, x)

  query = jax.jit(answer, static_argnums=0)
  x = images(5)
  a, state_a = query(first.static(), first.init(), x)
  b, state_b = query(second.static(), second.init(), x)
  assert len(traced) == 1
  assert query._cache_size() == 1  # pylint: disable=protected-access
  np.testing.assert_allclose(a, linear_softmax(WEIGHTS, x), rtol=1e-6)
  np.testing.assert_allclose(b, linear_softmax(other_weights, x), rtol=1e-6)
  assert int(state_a.queries) == int(state_b.queries) == 5


def test_legacy_closure_oracle_still_answers_and_counts():
  oracle = oracle_lib.make_oracle(probabilities, input_shape=SHAPE,
                                  num_classes=NUM_CLASSES)
  x = images(4)
  answers, state = oracle.query(oracle.init(), x)
  np.testing.assert_allclose(answers, probabilities(x), rtol=1e-6)
  answers, state = jax.jit(oracle.query)(state, x)
  assert int(state.queries) == 8 and state.server is None


@pytest.mark.parametrize("bad,message", [
    (np.nan, "non-finite"), (np.inf, "non-finite"), (200.0, "x / 255 - 0.5"),
    (0.5 + 1e-5, r"\[-0.5, 0.5\]"), (-0.6, r"\[-0.5, 0.5\]")])
def test_invalid_pixels_are_refused_eagerly_and_not_counted(bad, message):
  oracle = make()
  x = np.array(images(3))
  x[1, 0, 1, 2] = bad
  _, state = oracle.query(oracle.init(), images(2))
  with pytest.raises(ValueError, match=message):
    oracle.query(state, x)
  assert int(state.queries) == 2
  # Within the float32 rounding tolerance of x / 255 - 0.5: accepted.
  x[1, 0, 1, 2] = 0.5 + 5e-7
  _, state = oracle.query(state, x)
  assert int(state.queries) == 5


def test_non_float_images_are_refused_even_under_jit():
  oracle = make()
  pixels = np.zeros((2,) + SHAPE, np.uint8)
  with pytest.raises(ValueError, match="x.astype"):
    oracle.query(oracle.init(), pixels)
  with pytest.raises(ValueError, match="float"):
    jax.jit(oracle.query)(oracle.init(), jnp.zeros((2,) + SHAPE, jnp.int32))


@pytest.mark.parametrize("output,refused", [("probabilities", "nan"),
                                            ("labels", -1)])
def test_invalid_pixels_under_jit_are_unanswered_and_uncounted(output, refused):
  oracle = make(output=output)
  x = np.array(images(4))
  x[0, 0, 0, 0] = np.nan
  x[2] = x[2] * 255 + 127.5  # A 0..255 image.
  answers, state = jax.jit(oracle.query)(oracle.init(), x)
  answers = np.asarray(answers)
  assert int(state.queries) == 2
  good = np.array([False, True, False, True])
  if refused == "nan":
    assert np.isnan(answers[~good]).all() and np.isfinite(answers[good]).all()
    np.testing.assert_allclose(answers[good], probabilities(x[good]), rtol=1e-6)
  else:
    assert (answers[~good] == -1).all()
    np.testing.assert_array_equal(answers[good],
                                  np.argmax(probabilities(x[good]), -1))


def test_empty_query_answers_nothing_and_counts_zero():
  for output, shape in (("probabilities", (0, NUM_CLASSES)), ("labels", (0,))):
    oracle = make(output=output, budget=3)
    empty = jnp.zeros((0,) + SHAPE)
    answers, state = oracle.query(oracle.init(), empty)
    assert answers.shape == shape and int(state.queries) == 0
    answers, state = jax.jit(oracle.query)(state, empty)
    assert answers.shape == shape and int(state.queries) == 0


@pytest.mark.parametrize("jitted", [False, True])
def test_mask_answers_and_counts_only_masked_in_images(jitted):
  oracle = make(budget=4)
  x = np.array(images(6))
  x[5] = np.nan  # Masked out: neither validated nor answered.
  mask = np.array([True, False, True, True, False, False])
  query = jax.jit(oracle.query) if jitted else oracle.query
  answers, state = query(oracle.init(), x, mask)
  answers = np.asarray(answers)
  assert int(state.queries) == 3 and not bool(state.exceeded)
  assert np.isnan(answers[~mask]).all()
  np.testing.assert_allclose(answers[mask], probabilities(x[mask]), rtol=1e-6)
  # The budget counts masked-in images only: 3 + 1 fits, 3 + 2 does not.
  _, fits = query(state, x, np.eye(6, dtype=bool)[0])
  assert int(fits.queries) == 4


def test_bad_arguments():
  with pytest.raises(ValueError, match="output"):
    make(output="logits")
  with pytest.raises(ValueError, match="budget"):
    make(budget=-1)
  with pytest.raises(ValueError, match="shape"):
    make().query(make().init(), jnp.zeros((2, 3, 3, 3)))


class NoCopy:
  """An array-like that fails the test if anything converts it to an array."""

  def __init__(self, shape):
    self.shape = shape
    self.dtype = np.dtype(np.float32)

  def __array__(self, *args, **kwargs):
    raise AssertionError("the query was converted before its size was checked")


def _peak_bytes(fn) -> int:
  """Peak bytes newly allocated (numpy reports to tracemalloc) while ``fn`` runs."""
  import tracemalloc  # pylint: disable=g-import-not-at-top
  tracemalloc.start()
  try:
    tracemalloc.reset_peak()
    start, _ = tracemalloc.get_traced_memory()
    fn()
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  return peak - start


def test_a_query_over_the_cap_is_refused_before_any_copy():
  oracle = make(max_query_images=100)
  state = oracle.init()
  with pytest.raises(oracle_lib.QueryTooLarge, match="limit of 100 images"):
    oracle.query(state, NoCopy((101,) + SHAPE))
  # A float64 batch would be converted to float32 (half its size) if it got that
  # far: the refusal allocates nothing of the kind.
  big = np.zeros((200_000,) + SHAPE, np.float64)   # 19 MB

  def refused():
    with pytest.raises(oracle_lib.QueryTooLarge, match="200000 images"):
      oracle.query(state, big)
  assert _peak_bytes(refused) < big.nbytes // 20
  # At the cap it answers and counts; a list over the cap is refused too.
  _, state = oracle.query(state, images(100))
  assert int(state.queries) == 100
  with pytest.raises(oracle_lib.QueryTooLarge):
    oracle.query(state, [np.zeros(SHAPE, np.float32)] * 101)
  # Inside jit a batch is the compiled attack's own: not capped, but counted.
  answers, jitted = jax.jit(oracle.query)(state, images(150))
  assert answers.shape == (150, NUM_CLASSES) and int(jitted.queries) == 250
  with pytest.raises(ValueError, match=">= 1"):
    make(max_query_images=0)


def test_the_budget_is_checked_before_the_batch_is_converted():
  oracle = make(budget=10)
  state = oracle.init()
  big = np.zeros((200_000,) + SHAPE, np.float64)   # 19 MB

  def refused():
    with pytest.raises(oracle_lib.QueryBudgetExceeded, match="200000 more"):
      oracle.query(state, big)
  assert _peak_bytes(refused) < big.nbytes // 20
  with pytest.raises(oracle_lib.QueryBudgetExceeded):
    oracle.query(oracle.init(), NoCopy((11,) + SHAPE))

"""Research code extends the benchmark from outside the package, one call each.

Everything here is defined in this file only: a toy black-box attack, a toy
defence screen and a toy unlearning method. Each is registered with one call and
then runs through the benchmark's own commands (the main pipeline, the defences
study, ``experiments.unlearn``), with no other file of the repo knowing of it.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest

from experiments import defences
from experiments import unlearn
from experiments.attacks import registry
from experiments.attacks.pushing import pushers
from experiments.server import methods
from experiments.server import screens
from experiments.setup import cli
from experiments.setup import configs
from experiments.setup import overrides
from ounl_jax import unlearning
from ounl_jax.attacks import labels as labels_lib
from ounl_jax.attacks import pushing as pushing_lib
from ounl_jax.attacks import scheduler
from ounl_jax.attacks import trajectory
from tests.experiments.test_experiments import parse
from tests.experiments.test_experiments import run_script


@pytest.fixture
def mock_cifar10(monkeypatch, tmp_path):
  from tests.experiments.test_experiments import _mock_data  # pylint: disable=g-import-not-at-top
  with _mock_data(monkeypatch, tmp_path, 300):
    yield tmp_path


@pytest.fixture
def registered():
  """Registers what a test hands it; unregisters it afterwards."""
  added = []

  def add(table, register, item):
    register(item)
    added.append((table, item.name))
    return item
  yield add
  for table, name in added:
    del table[name]


# --- A toy unlearning method: shrink the output layer towards zero. -----------

@dataclasses.dataclass(frozen=True)
class ShrinkSettings:
  """Attributes:
    factor: what the output layer's weights are multiplied by.
  """

  factor: float = 0.5


CALLS = []


def shrink_unlearn(model, variables, images, labels, key, *, settings):
  del model, key
  CALLS.append(len(labels))
  params = dict(variables["params"])
  params["logits"] = jax.tree_util.tree_map(lambda w: w * settings.factor,
                                            params["logits"])
  return {**variables, "params": params}


def test_a_registered_method_runs_through_experiments_unlearn(mock_cifar10,
                                                              registered):
  registered(methods.METHODS, methods.register_method,
             unlearning.Method("toy_shrink", shrink_unlearn, ShrinkSettings))
  CALLS.clear()
  fv = parse(mock_cifar10 / "unlearn", "--unlearning=toy_shrink",
             "--fraction=0.5", define=unlearn.define_flags)
  results = unlearn.run(cli.experiment_config(fv), fv.workdir,
                        show_progress=False)
  assert results["method"] == "toy_shrink"
  assert results["settings"] == {"factor": 0.5}
  assert CALLS == [results["num_unlearned"]] and CALLS[0] >= 1
  # A flag of another method's settings is refused for it.
  fv = parse(mock_cifar10 / "unlearn", "--unlearning=toy_shrink", "--tau=1e-3",
             define=unlearn.define_flags)
  with pytest.raises(ValueError, match="--tau does not apply"):
    cli.experiment_config(fv)


# --- A toy defence: flags images far from the training set's mean. ------------

def fit_distance_screen(ctx, calibration, rate):
  del calibration, rate
  mean = ctx.splits.train.images.mean(axis=0)
  return screens.Scorer(
      lambda images, labels: np.sqrt(((images - mean) ** 2).sum(axis=(1, 2, 3))),
      {"mean_pixel": float(mean.mean())})


def test_a_registered_defence_runs_through_the_defences_study(
    mock_cifar10, registered, monkeypatch):
  spec = registered(screens.DEFENCES, screens.register_defence, screens.DefenceSpec(
      "toy_distance", "Toy distance to the mean", fit_distance_screen,
      reason="is far from the average training image"))
  plotted = []
  original_plot = __import__("matplotlib.axes").axes.Axes.plot

  def recording_plot(self, *args, **kwargs):
    plotted.append(kwargs.get("label", ""))
    return original_plot(self, *args, **kwargs)
  monkeypatch.setattr("matplotlib.axes.Axes.plot", recording_plot)
  workdir = mock_cifar10 / "defended"
  config = overrides.override(
      configs.ExperimentConfig(), width=2, epochs=1, patience=1,
      max_train_per_class=12, max_test_per_class=4, fraction=0.5, max_samples=3,
      max_iterations=10, iterations_per_chunk=10, sample_rule="fraction_first")
  settings = defences.DefenceConfig(honest_samples=30, guard_requests=2,
                                    adaptive_kappas=(0.1,), mix_fractions=(0.5,))
  path = defences.run(config, settings, str(workdir), show_progress=False)
  results = json.loads(open(path).read())
  entry = results["sample_defences"]["toy_distance"]
  assert set(entry["attacks"]) >= {"normal", "blending", "pushing_i", "pushing_ii"}
  assert entry["calibration_false_rejection"] <= 0.01 + 1e-9
  markdown = (workdir / "defences.md").read_text()
  assert f"| {spec.display_name} | Blending |" in markdown
  assert f"{spec.display_name} fit on this model: mean pixel" in markdown
  after_screening = next(line for line in markdown.splitlines()
                         if line.startswith("| Attack | no screen |"))
  assert f"| {spec.display_name} |" in after_screening
  assert any(label.startswith(spec.display_name) for label in plotted)
  # ... and the pushing experiment's server installs it by name.
  fv = parse(workdir, "--defence=toy_distance", "--attack=blending",
             "--fraction=0.5")
  assert cli.experiment_config(fv).server.defence == "toy_distance"


# --- A toy black-box attack: bisection towards an image of another class. ----

BISECTIONS = 7


def line_search_pusher(settings, start_images):
  """Bisects the segment from each sample to an image the oracle gives another
  class: Pushing-I is the last point found predicted as A, Pushing-II the last one
  found across. One counted label query per step (the goal, then each midpoint).
  """

  def push(oracle, images, labels, key, oracle_state, on_chunk):
    del on_chunk
    images, labels = np.asarray(images), np.asarray(labels)
    clean, oracle_state = pushing_lib.clean_query(
        oracle, oracle_state, images, labels, target_class=None, batch_size=256)
    n, dim = len(labels), int(np.prod(images.shape[1:]))
    goal = start_images[np.asarray(jax.random.choice(key, len(start_images),
                                                     (n,)))]
    inside, across = [jax.tree_util.tree_map(np.array, trajectory.empty(
        n, dim, np.inf)) for _ in range(2)]
    low, high = np.zeros(n), np.ones(n)
    live = np.flatnonzero(clean.attacked)
    queries = np.zeros(n, np.int32)
    crossed = np.zeros(n, bool)
    for step in range(BISECTIONS + 1):
      t = high[live] if step == 0 else (low[live] + high[live]) / 2
      x = images[live] + t[:, None, None, None] * (goal[live] - images[live])
      predicted, oracle_state = labels_lib.oracle_predictions(
          oracle, oracle_state, x)
      queries[live] += 1
      is_a = predicted == labels[live]
      if step == 0:
        crossed[live] = ~is_a
      l2 = np.sqrt(((x - images[live]) ** 2).reshape(len(live), -1).sum(1))
      for iterate, keep in ((inside, is_a & (step > 0)), (across, ~is_a)):
        rows = live[keep]
        iterate.image[rows] = x[keep].reshape(len(rows), dim)
        iterate.l2[rows], iterate.predicted[rows] = l2[keep], predicted[keep]
        iterate.iteration[rows] = step
      low[live[is_a]], high[live[~is_a]] = t[is_a], t[~is_a]
      live = live[crossed[live]]
    return pushing_lib.finish_push(
        oracle, oracle_state, images, labels, clean, (inside, across), settings,
        crossed=crossed, iterations=queries, attack_queries=queries,
        statistics=scheduler.statistics())
  return pushers.Pusher(push)


def test_a_registered_black_box_attack_runs_through_the_pipeline(mock_cifar10,
                                                                 registered):
  registered(registry.ATTACKS, registry.register_attack, registry.AttackSpec(
      "toy_bisection", "Toy bisection", pusher=line_search_pusher,
      oracle_output="labels"))
  fv = parse(mock_cifar10 / "toy", "--attack=toy_bisection", "--max_l2=100")
  results = json.loads(open(run_script(fv)).read())
  assert results["attacker"] == "toy_bisection"
  assert set(results["conditions"]) == {"clean", "normal", "pushing_i",
                                        "pushing_ii"}
  stats = results["attack"]
  assert stats["attacked"] >= 1 and stats["pushing_ii"]["successes"] >= 1
  # The runner billed every image the oracle answered: the clean query, the
  # bisection's steps and the verification of what it found.
  assert stats["oracle_queries"] == (stats["screening_queries"]
                                     + round(stats["queries_per_sample"]["mean"]
                                             * stats["attacked"]))
  assert stats["queries_per_sample"]["max"] <= 1 + (BISECTIONS + 1) + 2

"""The protections in the defences study (experiments/studies/defences/protect.py):
damage kept's formula, the adaptive users' sets, and the study on mock data."""

import json

import numpy as np
import pytest

from experiments import defences
from experiments.attacks import adaptive
from experiments.run import pipeline
from experiments.server import protections
from experiments.setup import configs
from experiments.setup import overrides
from experiments.studies.defences import damage
from experiments.studies.defences import protect
from ounl_jax.defences import record_matching


@pytest.fixture
def mock_cifar10(monkeypatch, tmp_path):
  from tests.experiments.test_experiments import _mock_data  # pylint: disable=g-import-not-at-top
  with _mock_data(monkeypatch, tmp_path, 300):
    yield tmp_path


def test_damage_kept_against_a_hand_computation():
  # normal 0.80, attack without defence 0.40 (gap 0.40), with it 0.70 (gap 0.10):
  # 1 - 0.10 / 0.40 = 0.75 of the damage kept away.
  assert protect.damage_kept(0.80, 0.40, 0.70) == pytest.approx(0.75)
  assert protect.damage_kept(0.80, 0.40, 0.40) == pytest.approx(0.0)
  assert protect.damage_kept(0.80, 0.40, 0.80) == pytest.approx(1.0)
  assert protect.damage_kept(0.80, 0.40, 0.20) == pytest.approx(-0.5)
  assert protect.damage_kept(0.80, 0.80, 0.70) is None   # no damage to keep
  assert protect.damage_kept(0.80, 0.90, 0.70) is None
  assert protect.damage_kept(None, 0.4, 0.7) is None


def test_damage_kept_map_covers_protections_and_screens():
  def acc(a):
    return {"class_a_accuracy": a}
  results = {
      "protections": {
          "none": {"attacks": {"normal": acc(0.8), "pushing_ii": acc(0.2),
                               "pushing_ii_split4": acc(0.3)}},
          "shield": {"attacks": {"normal": acc(0.8), "pushing_ii": acc(0.65),
                                 "pushing_ii_split4": acc(0.3)}}},
      "after_screening": {
          "none": {"normal": acc(0.8), "pushing_ii": acc(0.4)},
          "clean": acc(0.9),
          "margin": {"normal": acc(0.8), "pushing_ii": acc(0.7)}}}
  kept = protect.damage_kept_map(results)
  assert kept == {"shield": {"pushing_ii": pytest.approx(0.75),
                             "pushing_ii_split4": pytest.approx(0.0)},
                  "margin": {"pushing_ii": pytest.approx(0.75)}}
  # Measured against the unmodified request sent the same way, when there is one:
  # normal in 4 requests 0.6, the split attack 0.3 (gap 0.3), shielded 0.5 (gap
  # 0.1): 1 - 0.1 / 0.3 of it kept away. The honest split is no attack.
  results["protections"]["none"]["attacks"]["normal_split4"] = acc(0.6)
  results["protections"]["shield"]["attacks"].update(
      normal_split4=acc(0.6), pushing_ii_split4=acc(0.5))
  kept = protect.damage_kept_map(results)
  assert kept["shield"] == {"pushing_ii": pytest.approx(0.75),
                            "pushing_ii_split4": pytest.approx(2 / 3)}


def test_goal_needs_every_attacker_and_a_low_honest_cost():
  assert damage.meets_goal({"a": 0.9, "b": None}, 0.01, 0.004)
  assert not damage.meets_goal({"a": None}, 0.0, 0.0)   # nothing to keep away
  assert not damage.meets_goal({"a": 0.9, "b": 0.5}, 0.0, 0.0)
  assert not damage.meets_goal({"a": 0.9}, 0.02, 0.0)
  assert not damage.meets_goal({"a": 0.9}, 0.0, 0.006)
  # Holding back the user's own unmodified request, either way, fails it.
  assert damage.meets_goal({"a": 0.9}, 0.0, 0.0, shift=-0.004)
  assert not damage.meets_goal({"a": 0.9}, 0.0, 0.0, shift=0.094)
  assert not damage.meets_goal({"a": 0.9}, 0.0, 0.0, shift=-0.006)


def test_unmodified_shift_is_the_class_a_change_of_the_honest_request():
  results = {"protections": {"none": {"attacks": {
      "normal": {"class_a_accuracy": 0.429}}}}}
  assert damage.unmodified_shift(results, {"normal": 0.523}) == pytest.approx(0.094)
  assert damage.unmodified_shift(results, {"pushing_ii": 0.5}) is None
  assert damage.unmodified_shift({}, {"normal": 0.5}) is None


def test_split_sets_send_the_request_in_k_parts():
  images = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
  attacks = {"pushing_ii": (images, np.arange(10))}
  parts = protect.split_sets(attacks, (3,))["pushing_ii_split3"]
  assert [len(y) for _, y in parts] == [4, 3, 3]
  np.testing.assert_array_equal(np.concatenate([y for _, y in parts]),
                                np.arange(10))
  assert adaptive.label("pushing_ii_split3") == "Pushing-II in 3 requests (adaptive)"


def test_projected_push_lies_within_the_radius_of_its_original():
  rng = np.random.default_rng(0)
  original = rng.uniform(-0.3, 0.3, (6, 8, 8, 3)).astype(np.float32)
  pushed = original + rng.normal(0, 0.05, original.shape).astype(np.float32)
  projected = adaptive.project_within_radius(original, pushed, 0.1)
  assert np.all(record_matching.distance(projected, original) <= 0.1)
  # What the matching cannot see, (I - P) d, is kept.
  high = lambda x: x - record_matching.project(x)
  np.testing.assert_allclose(high(projected - original), high(pushed - original),
                             atol=1e-5)


def _hand_made_push(config, workdir) -> str:
  """A push of the user's samples by hand (noise; the mock model is too small
  for the real attack to push anything in a few iterations), as pushed.npz."""
  ctx = pipeline.prepare(config.train, str(workdir), show_progress=False)
  samples = pipeline.user_samples(ctx, config)
  rng = np.random.default_rng(0)
  noisy = lambda scale: np.clip(samples.images + rng.normal(
      0, scale, samples.images.shape), -0.5, 0.5).astype(np.float32)
  ok = np.ones(len(samples), bool)
  path = str(workdir / "hand_pushed.npz")
  np.savez(path, ids=samples.ids, original=samples.images,
           original_labels=samples.labels, pushing_i=noisy(0.01),
           pushing_i_labels=samples.labels, pushing_ii=noisy(0.05),
           pushing_ii_labels=samples.labels, pushing_i_success=ok,
           pushing_ii_success=ok, requested=len(samples))
  return path


def test_the_study_measures_every_protection_on_mock_data(mock_cifar10):
  workdir = mock_cifar10 / "defended"
  config = overrides.override(
      configs.ExperimentConfig(), width=2, epochs=1, patience=1,
      max_train_per_class=12, max_test_per_class=4, fraction=0.5, max_samples=3,
      max_iterations=10, iterations_per_chunk=10, sample_rule="fraction_first")
  settings = defences.DefenceConfig(
      honest_samples=30, guard_requests=2, adaptive_kappas=(),
      mix_fractions=(0.5,), split_requests=(2,),
      pushed=_hand_made_push(config, workdir))
  path = defences.run(config, settings, str(workdir), show_progress=False)
  results = json.loads(open(path).read())
  runs = results["protections"]
  assert set(runs) == {"none", *protections.PROTECTIONS}
  attacks = set(runs["none"]["attacks"])
  assert {"normal", "blending", "pushing_i", "pushing_ii", "mixed_0.5"} <= attacks
  assert {"normal_split2", "pushing_ii_split2", "pushing_i_projected",
          "pushing_ii_projected", "boundary_records"} <= attacks
  assert results["attack_notes"]["sizes"]["pushing_ii_projected"] == 3
  # Two requests in sequence, each scaled by its own alpha.
  assert len(runs["damage_bound"]["attacks"]["pushing_ii_split2"]["alpha"]) == 2
  # Record matching unlearns stored records only: at most one per sample.
  assert runs["record_matching"]["attacks"]["pushing_ii"]["unlearned"] <= 3
  # The user aiming at other users' records: 3 stored airplanes, none its own,
  # each matching itself, so record matching unlearns all 3.
  assert results["attack_notes"]["sizes"]["boundary_records"] == 3
  assert runs["record_matching"]["attacks"]["boundary_records"]["unlearned"] == 3
  kept = results["damage_kept"]
  for name in protections.PROTECTIONS:
    assert set(kept[name]) == attacks - {"normal", "normal_split2"}
    honest = runs[name]["honest"]
    assert honest["requests"] == 2 and 0 <= honest["refusal_rate"] <= 1
  for name in results["sample_defences"]:
    assert name in kept
  # The plain path is the service's: no defence gives the same accuracies.
  for attack, entry in results["after_screening"]["none"].items():
    assert runs["none"]["attacks"][attack]["class_a_accuracy"] == pytest.approx(
        entry["class_a_accuracy"])
  fit = runs["record_matching"]["fit"]
  assert fit["radius"] >= 0 and fit["index_bytes"] > 0
  assert len(runs["damage_bound"]["fit"]["envelope"]) == 10
  markdown = (workdir / "defences.md").read_text()
  assert "## Damage kept away" in markdown and "Goal (issue 25)" in markdown
  assert "| Record matching + damage bound | Pushing-II |" in markdown
  assert (workdir / "defences_damage.png").read_bytes()[:4] == b"\x89PNG"


def test_boundary_records_are_other_users_class_a_records_nearest_the_boundary(
    mock_cifar10):
  config = overrides.override(
      configs.ExperimentConfig(), width=2, epochs=1, patience=1,
      max_train_per_class=12, max_test_per_class=4)
  ctx = pipeline.prepare(config.train, str(mock_cifar10 / "run"),
                         show_progress=False)
  class_a = pipeline.class_a_of(ctx.spec, config)
  train = ctx.splits.train
  airplanes = train.ids[train.labels == class_a]
  user = airplanes[:3]
  images, labels = adaptive.boundary_records(ctx, config, user, 4)[
      "boundary_records"]
  assert (labels == class_a).all() and len(labels) == 4
  # By hand: the clean model's margins of every airplane the user does not own.
  others = np.flatnonzero((train.labels == class_a) & ~np.isin(train.ids, user))
  logits = ctx.trained.model.apply(ctx.trained.variables, train.images[others])
  logs = np.asarray(logits) - np.log(np.exp(np.asarray(logits, np.float64)).sum(
      1, keepdims=True))
  margin = logs[:, class_a] - np.max(np.delete(logs, class_a, axis=1), axis=1)
  flat = train.images[others].reshape(len(others), -1)
  chosen = np.array([np.flatnonzero((flat == image.ravel()).all(1))[0]
                     for image in images])
  assert len(set(chosen.tolist())) == 4  # Other users' records, all distinct.
  rest = np.setdiff1d(np.arange(len(others)), chosen)
  assert margin[chosen].max() <= margin[rest].min() + 1e-5

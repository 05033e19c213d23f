"""Experiment scripts end to end at --scale=smoke: mock data, then the real copy."""

import json
import os

from absl import flags
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import blending  # noqa: F401  (defines nothing new; uses runner)
from experiments import common
from experiments import finetune  # noqa: F401
from experiments import pushing  # noqa: F401
from experiments import reproduce
from experiments import runner
from ounl_jax import data as data_lib
from tests.conftest import mock_prepared_folder
from tests.conftest import real_data_dir

FLAGS = flags.FLAGS

CONDITION_KEYS = {"overall_accuracy", "per_class_accuracy", "class_a_accuracy",
                  "histogram", "histogram_total"}
TOP_KEYS = {"experiment", "dataset", "class_a", "conditions", "attack", "timings",
            "config", "versions", "git", "submitted_ids", "unlearning_settings"}


def parse(workdir, *extra):
  FLAGS.unparse_flags()
  FLAGS(["test", "--scale=smoke", f"--workdir={workdir}", "--noprogress", *extra])


def check_schema(results, conditions):
  assert TOP_KEYS - {"timings"} <= set(results)
  assert set(results["conditions"]) == set(conditions)
  clean_total = results["conditions"]["clean"]["histogram_total"]
  for name, cond in results["conditions"].items():
    assert CONDITION_KEYS <= set(cond), name
    assert 0.0 <= cond["overall_accuracy"] <= 1.0
    assert 0.0 <= cond["class_a_accuracy"] <= 1.0
    assert all(v is None or 0.0 <= v <= 1.0 for v in cond["per_class_accuracy"].values())
    # Histogram rows count the clean model's correct class-A predictions.
    assert sum(cond["histogram"].values()) == cond["histogram_total"] == clean_total
  for key in ("train", "attack"):
    assert key in results["config"]
  assert results["git"]["commit"]


def _mock_data(monkeypatch, tmp_path, num_examples):
  folder = mock_prepared_folder(tmp_path)
  monkeypatch.setattr(data_lib, "find_prepared", lambda spec, d: folder)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "data"))
  return tfds.testing.mock_data(num_examples=num_examples)


@pytest.fixture
def mock_cifar10(monkeypatch, tmp_path):
  with _mock_data(monkeypatch, tmp_path, 300):
    yield tmp_path


@pytest.fixture
def mock_cifar100(monkeypatch, tmp_path):
  """Enough mock CIFAR-100 for 10% of one class to be one sample."""
  with _mock_data(monkeypatch, tmp_path, 2000):
    yield tmp_path


@pytest.mark.parametrize("script,conditions", [
    ("pushing", {"clean", "normal", "pushing_i", "pushing_ii"}),
    ("blending", {"clean", "normal", "blending"}),
])
def test_scripts_write_well_formed_outputs_on_mock_data(mock_cifar10, script,
                                                        conditions):
  workdir = mock_cifar10 / "run"
  parse(workdir, "--max_iterations=20", "--iterations_per_chunk=10")
  path = runner.run(script)
  assert path == str(workdir / "results.json")
  results = json.loads((workdir / "results.json").read_text())
  check_schema(results, conditions)
  assert (workdir / "results.md").read_text().startswith("# ")
  for png in (f"{script}_class_accuracy.png", f"{script}_prediction_distribution.png"):
    assert (workdir / png).read_bytes()[:4] == b"\x89PNG"


def test_finetune_script_uses_fine_tune_unlearning(mock_cifar10):
  workdir = mock_cifar10 / "run"
  parse(workdir, "--max_iterations=10", "--iterations_per_chunk=10")
  runner.run("pushing", unlearning="fine_tune")
  results = json.loads((workdir / "results.json").read_text())
  assert results["unlearning"] == "fine_tune"
  assert results["config"]["attack"]["unlearning"] == "fine_tune"


def test_reproduce_writes_a_report_and_reuses_points(mock_cifar10, capsys):
  workdir = mock_cifar10 / "run"
  parse(workdir, "--table=III", "--fraction=0.1")
  reproduce.main([])
  report = workdir / "table_III" / "report.md"
  assert capsys.readouterr().out.strip().splitlines()[-1] == str(report)
  text = report.read_text()
  assert "paper" in text and "fraction_0.5_ratio_0.5" in text
  stamp = os.path.getmtime(workdir / "table_III" / "fraction_0.1_ratio_0.3" /
                           "results.json")
  reproduce.main([])
  assert os.path.getmtime(workdir / "table_III" / "fraction_0.1_ratio_0.3" /
                          "results.json") == stamp


def test_unknown_class_is_a_clear_error(mock_cifar10):
  parse(mock_cifar10 / "run", "--unlearn_class=airplan")
  with pytest.raises(ValueError, match="Did you mean airplane"):
    runner.run("pushing")


def strip_timings(value):
  if isinstance(value, dict):
    return {k: strip_timings(v) for k, v in value.items()
            if "seconds" not in k and k not in ("timings", "reused_saved_push",
                                                "command", "git")}
  if isinstance(value, list):
    return [strip_timings(v) for v in value]
  return value


@pytest.mark.realdata
def test_real_data_smoke_run_is_consistent_and_reproducible(tmp_path):
  if real_data_dir() is None:
    pytest.skip("Real CIFAR-10 not found (set TFDS_DATA_DIR).")
  runs = []
  for name in ("a", "b"):
    parse(tmp_path / name)
    runs.append(json.loads(open(runner.run("pushing")).read()))
  results = runs[0]
  check_schema(results, {"clean", "normal", "pushing_i", "pushing_ii"})
  # Every condition submitted the same training ids, all of class A.
  submitted = results["submitted_ids"]
  counts = {c["num_submitted"] for n, c in results["conditions"].items()
            if n != "clean"}
  assert counts == {len(submitted)}
  assert results["attack"]["attacked"] >= 1
  pushed = np.load(tmp_path / "a" / "attack" / "pushed.npz")
  both = pushed["ids"][pushed["pushing_i_success"] & pushed["pushing_ii_success"]]
  # The released rule: exactly N = min(requested, pushed) submitted, the first
  # ones pushed by both methods; failures are never submitted.
  assert results["requested"] == min(8, results["attack"]["requested"])
  assert len(submitted) == min(results["requested"], len(both))
  np.testing.assert_array_equal(submitted, both[:len(submitted)])
  assert (pushed["original_labels"] == 0).all()
  ok = pushed["pushing_ii_success"]
  assert (pushed["pushing_ii_l2"][ok] <= 20.0).all()
  # Same seed, fresh workdir: identical results apart from timings.
  assert strip_timings(runs[0]) == strip_timings(runs[1])


def test_table_vi_runs_on_cifar100_up_to_the_push(mock_cifar100):
  # A smoke model on random mock images gets no apple right: the grid must stop
  # with the one-line reason, not a KeyError or an empty results file.
  parse(mock_cifar100 / "run", "--table=VI", "--dataset=cifar100",
        "--max_iterations=10", "--iterations_per_chunk=10")
  with pytest.raises(common.UserError, match="misclassifies all"):
    reproduce.main([])
  assert not list((mock_cifar100 / "run").glob("table_VI/*/results.json"))


def test_table_vi_report_puts_the_paper_beside_the_histogram():
  def result(fraction, kept, moved):
    hist = {"apple": kept, "pear": 1, "sweet_pepper": moved}
    return {"config": {"attack": {"fraction": fraction}}, "class_a": "apple",
            "conditions": {c: {"histogram": hist, "histogram_total": 71}
                           for c in ("normal", "pushing_i", "pushing_ii")}}
  lines = reproduce.paper_tables.TABLES["VI"].report(
      "cifar100", {"fraction_0.5_to_sweet_pepper": result(0.5, 3, 40)})
  assert ("| fraction_0.5_to_sweet_pepper | pushing_i | (2, 41) | (3, 40) of 71 |"
          in lines)


@pytest.mark.parametrize("dataset,tables", [
    ("cifar10", ("IV", "VII", "XI", "fig5", "fig8", "fig10")),
])
def test_new_reproduce_grids_report_paper_beside_measured(request, dataset, tables):
  workdir = request.getfixturevalue(f"mock_{dataset}") / dataset
  for table in tables:
    parse(workdir, f"--table={table}", f"--dataset={dataset}",
          "--max_iterations=10", "--iterations_per_chunk=10")
    reproduce.main([])
    report = (workdir / f"table_{table}" / "report.md").read_text()
    points = [p for p, _, _ in reproduce.paper_tables.TABLES[table].grid()]
    assert len(points) >= 2
    for point in points:
      assert f"| {point} |" in report, (table, point)
    if table.startswith("fig8") or table == "fig10":
      png = workdir / f"table_{table}" / f"{table}.png"
      assert png.read_bytes()[:4] == b"\x89PNG"
  if dataset == "cifar10":
    iv = (workdir / "table_IV" / "report.md").read_text()
    # Eq. 13 and the released regime side by side, with the paper's numbers.
    assert "fraction_0.1_eq13 | 79.3" in iv and "fraction_0.1_released | 79.3" in iv
    eq13 = json.loads((workdir / "table_IV" / "fraction_0.1_eq13" /
                       "results.json").read_text())
    released = json.loads((workdir / "table_IV" / "fraction_0.1_released" /
                           "results.json").read_text())
    # Both regimes unlearn the same pushed samples (one shared push).
    assert eq13["submitted_ids"] == released["submitted_ids"]
    assert released["attack"]["reused_saved_push"]
    assert eq13["noise_term_share"] == 1.0


def test_table_of_another_dataset_is_refused_before_any_work(mock_cifar10):
  parse(mock_cifar10 / "run", "--table=VI", "--dataset=cifar10")
  with pytest.raises(Exception, match="--dataset=cifar100"):
    reproduce.main([])
  assert not (mock_cifar10 / "run").exists()


@pytest.mark.parametrize("attack", ["zoo_directions", "label_only"])
def test_other_attackers_run_through_the_same_pipeline(mock_cifar10, attack):
  workdir = mock_cifar10 / attack
  parse(workdir, f"--attack={attack}", "--max_iterations=10",
        "--iterations_per_chunk=10")
  results = json.loads(open(runner.run("pushing")).read())
  check_schema(results, {"clean", "normal", "pushing_i", "pushing_ii"})
  assert results["attacker"] == attack
  stats = results["attack"]
  # Every image the oracle answered is billed to a candidate (screening included).
  assert stats["oracle_queries"] == (stats["screening_queries"]
                                     + round(stats["queries_per_sample"]["mean"]
                                             * stats["attacked"]))

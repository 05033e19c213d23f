"""Experiment scripts end to end at --scale=smoke: mock data, then the real copy."""

import json
import os

from absl import flags
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.setup import cli
from experiments.run import errors
from experiments.setup import configs
from experiments import reproduce
from experiments.run import runner
from ounl_jax import data as data_lib
from tests.conftest import mock_prepared_folder
from tests.conftest import real_data_dir

CONDITION_KEYS = {"overall_accuracy", "per_class_accuracy", "class_a_accuracy",
                  "histogram", "histogram_total"}
TOP_KEYS = {"experiment", "dataset", "class_a", "conditions", "attack", "timings",
            "config", "versions", "git", "submitted_ids", "unlearning_settings"}


# What each script's main passes to ``runner.run`` (experiments/<script>.py).
SCRIPTS = {"pushing": {}, "blending": {"attack": "blending"},
           "finetune": {"unlearning": "fine_tune"}}


def parse(workdir, *extra, define=cli.define_experiment_flags):
  """A command line parsed into fresh flags, as the entry modules' main does."""
  fv = flags.FlagValues()
  define(fv)
  fv(["test", "--scale=smoke", f"--workdir={workdir}", "--noprogress", *extra])
  return fv


def run_script(fv, script="pushing") -> str:
  """``python -m experiments.<script>`` in-process; the path of results.json."""
  config = cli.experiment_config(fv, **SCRIPTS[script])
  runner.run(config, fv.workdir, data_dir=fv.data_dir, show_progress=False)
  return os.path.join(fv.workdir, "results.json")


def parse_table(workdir, *extra):
  return parse(workdir, *extra, define=reproduce.define_flags)


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
  rss = results["host_peak_rss_mib"]  # a peak never falls between phases
  assert 0 < rss["before_attack"] <= rss["after_attack"] <= rss["at_end"]


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
  fv = parse(workdir, "--max_iterations=20", "--iterations_per_chunk=10")
  path = run_script(fv, script)
  assert path == str(workdir / "results.json")
  results = json.loads((workdir / "results.json").read_text())
  check_schema(results, conditions)
  if script == "pushing":
    # Busy slot-iterations over slot-iterations of the scheduler's batches.
    occupancy = results["attack"]["slot_occupancy"]
    assert 0 < occupancy <= 1
    assert results["throughput"]["slot_occupancy"] == occupancy
  assert (workdir / "results.md").read_text().startswith("# ")
  for png in (f"{script}_class_accuracy.png", f"{script}_prediction_distribution.png"):
    assert (workdir / png).read_bytes()[:4] == b"\x89PNG"


def test_finetune_script_uses_fine_tune_unlearning(mock_cifar10):
  workdir = mock_cifar10 / "run"
  fv = parse(workdir, "--max_iterations=10", "--iterations_per_chunk=10")
  run_script(fv, "finetune")
  results = json.loads((workdir / "results.json").read_text())
  assert results["unlearning"] == "fine_tune"
  assert results["config"]["server"]["method"] == "fine_tune"


def test_reproduce_writes_a_report_and_reuses_points(mock_cifar10, capsys):
  workdir = mock_cifar10 / "run"
  fv = parse_table(workdir, "--table=III", "--fraction=0.1")
  reproduce.main([], fv)
  report = workdir / "table_III" / "report.md"
  assert capsys.readouterr().out.strip().splitlines()[-1] == str(report)
  text = report.read_text()
  assert "paper" in text and "fraction_0.5_ratio_0.5" in text
  stamp = os.path.getmtime(workdir / "table_III" / "fraction_0.1_ratio_0.3" /
                           "results.json")
  reproduce.main([], fv)
  assert os.path.getmtime(workdir / "table_III" / "fraction_0.1_ratio_0.3" /
                          "results.json") == stamp


def test_unknown_class_is_a_clear_error(mock_cifar10):
  fv = parse(mock_cifar10 / "run", "--unlearn_class=airplan")
  with pytest.raises(ValueError, match="Did you mean airplane"):
    run_script(fv)


def strip_timings(value):
  if isinstance(value, dict):
    return {k: strip_timings(v) for k, v in value.items()
            if "seconds" not in k and k not in ("timings", "throughput",
                                                "host_peak_rss_mib",
                                                "reused_saved_push",
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
    runs.append(json.loads(open(run_script(parse(tmp_path / name))).read()))
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
  fv = parse_table(mock_cifar100 / "run", "--table=VI", "--dataset=cifar100",
                   "--max_iterations=10", "--iterations_per_chunk=10")
  with pytest.raises(errors.UserError, match="misclassifies all"):
    reproduce.main([], fv)
  assert not list((mock_cifar100 / "run").glob("table_VI/*/results.json"))


def test_table_vi_report_puts_the_paper_beside_the_histogram():
  def result(fraction, kept, moved):
    hist = {"apple": kept, "pear": 1, "sweet_pepper": moved}
    return {"config": {"samples": {"fraction": fraction}}, "class_a": "apple",
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
    fv = parse_table(workdir, f"--table={table}", f"--dataset={dataset}",
                     "--max_iterations=10", "--iterations_per_chunk=10")
    reproduce.main([], fv)
    report = (workdir / f"table_{table}" / "report.md").read_text()
    points = [p for p, _ in reproduce.paper_tables.TABLES[table].grid()]
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
  fv = parse_table(mock_cifar10 / "run", "--table=VI", "--dataset=cifar10")
  with pytest.raises(Exception, match="--dataset=cifar100"):
    reproduce.main([], fv)
  assert not (mock_cifar10 / "run").exists()


@pytest.mark.parametrize("attack", ["zoo_directions", "label_only"])
def test_other_attackers_run_through_the_same_pipeline(mock_cifar10, attack):
  workdir = mock_cifar10 / attack
  fv = parse(workdir, f"--attack={attack}", "--max_iterations=10",
             "--iterations_per_chunk=10")
  results = json.loads(open(run_script(fv)).read())
  check_schema(results, {"clean", "normal", "pushing_i", "pushing_ii"})
  assert results["attacker"] == attack
  stats = results["attack"]
  # Every image the oracle answered is billed to a candidate (screening included).
  assert stats["oracle_queries"] == (stats["screening_queries"]
                                     + round(stats["queries_per_sample"]["mean"]
                                             * stats["attacked"]))


def test_every_experiment_module_imports_in_one_process_without_flags():
  # pylint: disable=g-import-not-at-top,unused-import
  import experiments.architectures
  import experiments.blending
  import experiments.defences
  import experiments.finetune
  import experiments.pushing
  import experiments.stealthiness
  import experiments.train
  import experiments.unlearn
  for name in ("dataset", "scale", "fraction", "table", "pushed", "method"):
    assert name not in flags.FLAGS, name


def test_flag_defaults_come_from_the_library_settings():
  fv = flags.FlagValues()
  cli.define_experiment_flags(fv)
  library = configs.ExperimentConfig()
  assert fv["tau"].default == library.server.first_order.tau == 2e-4
  assert fv["max_l2"].default == library.attack.push.max_l2
  assert fv["pushing_ii"].default == library.attack.push.pushing_ii
  assert fv["sample_chunk_size"].default == library.attack.push.zoo.sample_chunk_size
  # The one stated difference: the released first-order regime (docs/protocol.md §5).
  assert fv["reference_code"].default is True
  fv(["test"])
  config = cli.experiment_config(fv)
  assert config.server.settings().reference_code
  assert config.samples.max_samples is None  # cpu preset


@pytest.mark.parametrize("attack", ["unlearning_gradient", "transfer"])
def test_gradient_attacks_run_through_the_same_conditions(mock_cifar10, attack):
  workdir = mock_cifar10 / attack
  fv = parse(workdir, f"--attack={attack}", "--sample_rule=fraction_first",
             "--fraction=0.5")
  results = json.loads(open(run_script(fv)).read())
  assert set(results["conditions"]) == {"clean", "normal", attack}
  assert results["white_box"] == (attack == "unlearning_gradient")
  assert results["conditions"][attack]["num_submitted"] == results["attack"][
      "successes"]


def test_server_defence_is_chosen_by_name(mock_cifar10):
  workdir = mock_cifar10 / "defended"
  fv = parse(workdir, "--defence=margin", "--max_iterations=10",
             "--iterations_per_chunk=10")
  results = json.loads(open(run_script(fv, "blending")).read())
  assert results["defence"] == "margin"
  for name in ("normal", "blending"):
    condition = results["conditions"][name]
    assert condition.get("refused") or condition["num_submitted"] >= 1

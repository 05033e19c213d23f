"""Heavy: the paper's effect at the cpu scale (minutes). ``pytest -m heavy``.

Kept out of the default run (and CI); run on a developer machine or an accelerator
with TFDS_DATA_DIR pointing at CIFAR-10.
"""

import json

import pytest

from tests.conftest import real_data_dir
from tests.experiments.test_experiments import parse
from tests.experiments.test_experiments import run_script


@pytest.mark.heavy
@pytest.mark.realdata
def test_cpu_scale_pushing_over_unlearns_airplane(tmp_path):
  """Sec. V-B at the cpu scale: pushing removes more of class A than normal."""
  if real_data_dir() is None:
    pytest.skip("Real CIFAR-10 not found (set TFDS_DATA_DIR).")
  # Later flags win: --scale=cpu replaces parse's --scale=smoke.
  results = json.loads(open(run_script(parse(tmp_path, "--scale=cpu"))).read())
  conditions = results["conditions"]
  clean = conditions["clean"]["class_a_accuracy"]
  normal = conditions["normal"]["class_a_accuracy"]
  # Normal unlearning of 10% of a class is gentle (there is something to exceed).
  assert normal >= clean - 0.03
  # Over-unlearning-I (Definition 1): alpha_2 < alpha_1, by a clear margin.
  for attack in ("pushing_i", "pushing_ii"):
    assert conditions[attack]["class_a_accuracy"] <= normal - 0.03, attack
  assert results["attack"]["pushing_ii"]["success_rate"] >= 0.9

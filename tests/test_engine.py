"""The Ray grid engine on a two-node cluster simulated here (one CPU per node).

Table IV at --scale=smoke is 4 points sharing one model and one push of two
blocks (N = 8, blocks of 8, 9 positions with the spare). Ray's workers read the
real small copy (TFDS_DATA_DIR): mock data lives in the test's process only.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import reproduce
from experiments.run import stages
from experiments.setup import cli
from tests.conftest import real_data_dir
from tests.experiments.test_experiments import parse_table
from tests.experiments.test_experiments import strip_timings

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")
cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = [pytest.mark.realdata,
              # The drivers are started with fork+exec, which is safe.
              pytest.mark.filterwarnings("ignore:os.fork")]
MODEL_FILES = ("checkpoints", "train_metrics.json", "train_history.json",
               "data_fingerprint.json")


@pytest.fixture(scope="module")
def data_dir():
  found = real_data_dir()
  if found is None:
    pytest.skip("Real CIFAR-10 not found (set TFDS_DATA_DIR): Ray's workers "
                "cannot see the test's mock data.")
  return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
  # Workers share compiled programs through JAX's persistent cache.
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla"))
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  two_nodes = cluster_utils.Cluster(initialize_head=True,
                                    head_node_args={"num_cpus": 1})
  two_nodes.add_node(num_cpus=1)
  two_nodes.wait_for_nodes()
  yield two_nodes
  two_nodes.shutdown()


def run_table(workdir, data_dir, **engine):
  fv = parse_table(workdir, "--table=IV", "--dataset=cifar10",
                   f"--data_dir={data_dir}")
  return reproduce.run("IV", cli.experiment_config(fv), str(workdir),
                       data_dir=data_dir, show_progress=False, **engine)


def outputs(workdir) -> dict:
  """Every point's results.json and the report, without timings, hosts, commit."""
  found = {}
  for path in sorted(glob.glob(str(workdir / "table_IV" / "*" / "results.json"))):
    with open(path) as f:
      found[os.path.basename(os.path.dirname(path))] = strip_timings(json.load(f))
  with open(workdir / "table_IV" / "report.md") as f:
    found["report.md"] = [l for l in f if not l.startswith("Commands:")]
  return found


def events(workdir, event=None) -> list[dict]:
  found = stages.read_events(str(workdir / "grid"))
  return [e for e in found if event is None or e["event"] == event]


def count(workdir, event, kind) -> dict:
  counted = {}
  for e in events(workdir, event):
    if e["kind"] == kind:
      counted[e["stage"]] = counted.get(e["stage"], 0) + 1
  return counted


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("local")
  run_table(workdir, data_dir, engine="local")
  return workdir


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, data_dir, cluster):
  workdir = tmp_path_factory.mktemp("ray")
  run_table(workdir, data_dir, engine="ray", ray_address=cluster.address)
  return workdir


def test_ray_grid_uses_both_nodes_and_equals_the_local_run(local_run, ray_run):
  assert len(outputs(ray_run)) == 5  # 4 points and the report.
  assert outputs(ray_run) == outputs(local_run)
  # The model trained once, each push block pushed once, no point pushed.
  assert count(ray_run, "start", "train") == {"train-model": 1}
  blocks = count(ray_run, "done", "push")
  assert len(blocks) == 2 and set(blocks.values()) == {1}
  assert count(ray_run, "start", "push") == blocks
  assert sum(count(ray_run, "done", "point").values()) == 4
  for path in glob.glob(str(ray_run / "grid" / "done" / "point-*.json")):
    with open(path) as f:
      assert json.load(f)["record"]["pushed_now"] == 0
  assert len({e["node"] for e in events(ray_run, "done")}) == 2


def with_model(source, workdir):
  """A fresh workdir holding ``source``'s trained model and its done record."""
  os.makedirs(workdir / "grid" / "done")
  for name in MODEL_FILES:
    copy = shutil.copytree if name == "checkpoints" else shutil.copy
    copy(source / name, workdir / name)
  shutil.copy(source / "grid" / "done" / "train-model.json",
              workdir / "grid" / "done")
  return workdir


def start_driver(workdir, data_dir, address):
  return subprocess.Popen(
      [sys.executable, "-m", "experiments.reproduce", "--table=IV",
       "--scale=smoke", "--dataset=cifar10", f"--data_dir={data_dir}",
       f"--workdir={workdir}", "--engine=ray", f"--ray_address={address}",
       "--noprogress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for(workdir, predicate, driver, timeout=240):
  deadline = time.time() + timeout
  while not predicate(events(workdir)):
    assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
    assert time.time() < deadline, "timed out"
    time.sleep(0.2)


def test_a_worker_killed_mid_push_is_retried(tmp_path, data_dir, cluster, ray_run):
  workdir = with_model(ray_run, tmp_path / "run")
  driver = start_driver(workdir, data_dir, cluster.address)
  wait_for(workdir, lambda found: any(
      e["stage"].endswith("block-0000") and e["event"] == "start"
      for e in found), driver)
  time.sleep(2.0)  # Mid-push: block 0 takes seconds to compile and push.
  victim = next(e for e in events(workdir, "start")
                if e["stage"].endswith("block-0000"))
  assert not [e for e in events(workdir, "done") if e["stage"] == victim["stage"]]
  os.kill(victim["pid"], signal.SIGKILL)
  assert driver.wait(timeout=300) == 0, driver.stderr.read().decode()[-2000:]
  assert count(workdir, "start", "push")[victim["stage"]] == 2
  assert set(count(workdir, "done", "push").values()) == {1}
  assert outputs(workdir) == outputs(ray_run)
  assert not glob.glob(str(workdir / "**" / "*.tmp*"), recursive=True)
  for path in glob.glob(str(workdir / "attack" / "**" / "*.npz"), recursive=True):
    with np.load(path) as saved:
      assert len(saved.files)


def test_rerun_after_killing_the_driver_redoes_only_unfinished_stages(
    tmp_path, data_dir, cluster, ray_run):
  workdir = with_model(ray_run, tmp_path / "run")
  driver = start_driver(workdir, data_dir, cluster.address)
  # Killed once the push is done, while the points compile and run.
  wait_for(workdir, lambda found: any(
      e["kind"] == "push_rest" and e["event"] == "done" for e in found), driver)
  driver.send_signal(signal.SIGKILL)
  driver.wait()
  time.sleep(2.0)
  finished = {e["stage"] for e in events(workdir, "done")}
  assert len([s for s in finished if s.startswith("push-")]) == 3
  started_before = len(events(workdir, "start"))
  driver = start_driver(workdir, data_dir, cluster.address)
  assert driver.wait(timeout=300) == 0, driver.stderr.read().decode()[-2000:]
  rerun = {e["stage"] for e in events(workdir, "start")[started_before:]}
  every = {os.path.splitext(os.path.basename(p))[0]
           for p in glob.glob(str(workdir / "grid" / "done" / "*.json"))}
  assert rerun == every - finished and "train-model" not in rerun
  assert outputs(workdir) == outputs(ray_run)

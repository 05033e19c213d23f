"""The service and workdir failures of issue 24, tried on any checkout of ounl_jax.

Runs each failure case against the checkout at ``--repo`` (so the same script
shows an older commit's behaviour and today's) and prints one row per case: exit
code, seconds, and the last line the command printed. The commands are real user
commands at smoke scale on a scratch workdir, or a few lines of library calls
(threads, oracle, ledger) run with that checkout first on ``sys.path``.

  TFDS_DATA_DIR=../shared/tensorflow_datasets_small \\
    python benchmarks/reliability.py --repo=. --out=/tmp/reliability

Takes about 4 minutes on 2 cores (one smoke training and push, then reruns that
reuse them). ``--full_data`` (the full copy, for the data-guard case) defaults to
``TFDS_DATA_DIR`` with ``_small`` removed. The tests that hold these behaviours:
``tests/ounl_jax/test_service.py``, ``tests/ounl_jax/test_oracle.py``,
``tests/experiments/run/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

SMOKE = ["--dataset=cifar10", "--scale=smoke"]

_THREADS = """
import threading, jax, numpy as np
from ounl_jax import data, models, service, unlearning
model = models.get_model("vgg3", num_classes=4, input_shape=(8, 8, 3), width=2)
v = model.init(jax.random.key(0))
x = np.linspace(-0.5, 0.5, 8 * 8 * 8 * 3, dtype=np.float32).reshape(8, 8, 8, 3)
test = data.LabelledImages(x, np.arange(8, dtype=np.int32) % 4, np.arange(8))
def make():
  return service.UnlearningService(
      model, v, test, key=jax.random.key(1),
      settings=unlearning.FirstOrderSettings(tau=1e-2))
requests = [service.UnlearningRequest(x[:2], np.array([0, 1])),
            service.UnlearningRequest(x[2:4], np.array([2, 3]))]
def sequential(order):
  s = make()
  for i in order:
    s.unlearn(requests[i])
  return s.model_fingerprint()
both = {sequential((0, 1)), sequential((1, 0))}
lost = 0
for trial in range(5):
  s = make()
  barrier = threading.Barrier(2)
  def worker(i):
    barrier.wait()
    s.unlearn(requests[i])
  threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
  [t.start() for t in threads]; [t.join() for t in threads]
  lost += s.model_fingerprint() not in both
print(f"requests_served {s.requests_served}; {lost} of 5 trials lost an update")
"""

_ORACLE = """
import resource, sys, jax, numpy as np
from ounl_jax import data, models, service
model = models.get_model("vgg3", num_classes=10, input_shape=(32, 32, 3), width=2)
v = model.init(jax.random.key(0))
x = np.zeros((4, 32, 32, 3), np.float32)
s = service.UnlearningService(model, v, data.LabelledImages(
    x, np.zeros(4, np.int32), np.arange(4)), key=jax.random.key(1))
budget = None if sys.argv[1] == "none" else int(sys.argv[1])
oracle = s.oracle(budget=budget)
big = np.full((40_000, 32, 32, 3), 0.1, np.float32)  # resident before we measure
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before = rss()
try:
  oracle.query(oracle.init(), big)
  outcome = "answered"
except Exception as e:
  outcome = type(e).__name__
print(f"40,000 images, budget {budget}: {outcome}; peak RSS +{rss() - before:.0f} MB")
"""

_LEDGER = """
import jax, numpy as np
from ounl_jax import data, models, service
model = models.get_model("vgg3", num_classes=4, input_shape=(8, 8, 3), width=2)
v = model.init(jax.random.key(0))
x = np.linspace(-0.5, 0.5, 4 * 8 * 8 * 3, dtype=np.float32).reshape(4, 8, 8, 3)
s = service.UnlearningService(model, v, data.LabelledImages(
    x, np.arange(4, dtype=np.int32), np.arange(4)), key=jax.random.key(1))
s.unlearn(service.UnlearningRequest(x[:2], np.array([0, 1])))
out = []
for name, images in (("same", x[:2]), ("noised 1e-6", x[:2] + 1e-6)):
  try:
    s.unlearn(service.UnlearningRequest(images, np.array([0, 1])))
    out.append(f"{name}: accepted")
  except Exception as e:
    out.append(f"{name}: {type(e).__name__}")
print("; ".join(out) + f"; requests_served {s.requests_served}")
"""


def _last_line(text: str) -> str:
  lines = [l for l in text.strip().splitlines() if l.strip()]
  return lines[-1][:240] if lines else ""


def _run(repo, args, env, timeout=600):
  start = time.time()
  try:
    p = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True,
                       timeout=timeout)
    return p.returncode, time.time() - start, _last_line(p.stdout + p.stderr)
  except subprocess.TimeoutExpired:
    return "timeout", time.time() - start, ""


def _claims(workdir):
  """What the run's results.json says of class A, if it wrote one."""
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    return "no results.json"
  with open(path) as f:
    conditions = json.load(f)["conditions"]
  return "class-A accuracy " + ", ".join(
      f"{name} {100 * c['class_a_accuracy']:.1f}%" for name, c in conditions.items()
      if isinstance(c, dict) and "class_a_accuracy" in c)


def _module(name, *flags):
  return [sys.executable, "-m", f"experiments.{name}", *SMOKE, *flags]


def _copy(src, dst):
  shutil.rmtree(dst, ignore_errors=True)
  shutil.copytree(src, dst)
  return dst


def _truncate(path):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


def _cut_dataset_info(data_dir, out):
  """A copy of data_dir (links) whose cifar10 dataset_info.json is cut short."""
  copy = os.path.join(out, "tfds_cut")
  shutil.rmtree(copy, ignore_errors=True)
  version = os.path.join(data_dir, "cifar10", "3.0.2")
  target = os.path.join(copy, "cifar10", "3.0.2")
  os.makedirs(target)
  for name in os.listdir(version):
    if name == "dataset_info.json":
      shutil.copy(os.path.join(version, name), target)
      _truncate(os.path.join(target, name))
    else:
      os.symlink(os.path.join(version, name), os.path.join(target, name))
  return copy


def _busy_workdir(repo, out, env):
  """A second run while a first one trains on the same workdir."""
  work = os.path.join(out, "busy")
  shutil.rmtree(work, ignore_errors=True)
  first = subprocess.Popen(_module("pushing", f"--workdir={work}"), cwd=repo,
                           env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  time.sleep(8)
  try:
    return _run(repo, _module("pushing", f"--workdir={work}"), env, timeout=300)
  finally:
    first.kill()
    first.wait()


def cases(repo, out, env, full_data):
  base = os.path.join(out, "base")
  yield "setup: smoke run (trains, pushes)", _run(
      repo, _module("pushing", f"--workdir={base}"), env)
  yield "two threads unlearn at once (5 trials)", _run(
      repo, [sys.executable, "-c", _THREADS], env)
  for budget in ("none", "1000"):
    yield f"oracle: one 40,000-image query, budget {budget}", _run(
        repo, [sys.executable, "-c", _ORACLE, budget], env)
  tau = _copy(base, os.path.join(out, "tau"))
  os.remove(os.path.join(tau, "results.json"))
  yield "--tau=1e30", _run(repo, _module(
      "pushing", f"--workdir={tau}", "--tau=1e30"), env)
  yield "--tau=1e30: results.json", ("-", 0.0, _claims(tau))
  yield "second run on a busy workdir", _busy_workdir(repo, out, env)
  nofp = _copy(base, os.path.join(out, "no_fingerprint"))
  os.remove(os.path.join(nofp, "data_fingerprint.json"))
  yield "no data_fingerprint.json, full copy", _run(
      repo, _module("pushing", f"--workdir={nofp}"),
      dict(env, TFDS_DATA_DIR=full_data))
  history = _copy(base, os.path.join(out, "history"))
  # Training interrupted after its epoch checkpoints: the run resumes from them.
  shutil.rmtree(os.path.join(history, "checkpoints", "model"))
  os.remove(os.path.join(history, "train_metrics.json"))
  _truncate(os.path.join(history, "train_history.json"))
  yield "cut-short train_history.json, resuming training", _run(
      repo, _module("pushing", f"--workdir={history}"), env)
  os.remove(os.path.join(history, "train_history.json"))
  yield "train_history.json deleted, resuming training", _run(
      repo, _module("pushing", f"--workdir={history}"), env)
  cut = _cut_dataset_info(env["TFDS_DATA_DIR"], out)
  yield "cut-short dataset_info.json", _run(
      repo, _module("pushing", f"--workdir={_copy(base, out + '/info')}"),
      dict(env, TFDS_DATA_DIR=cut))
  pushed = _copy(base, os.path.join(out, "pushed"))
  _truncate(os.path.join(pushed, "attack", "pushed.npz"))
  yield "cut-short pushed.npz, stealthiness", _run(
      repo, [sys.executable, "-m", "experiments.stealthiness",
             f"--workdir={pushed}"], env)
  yield "ledger: resubmitted and noised samples", _run(
      repo, [sys.executable, "-c", _LEDGER], env)
  for flag in ("--attack=nope", "--scale=nope"):
    yield flag, _run(repo, [sys.executable, "-m", "experiments.pushing",
                            "--dataset=cifar10", flag,
                            f"--workdir={out}/flags"], env)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repo", default=".", help="the checkout to try")
  parser.add_argument("--out", required=True, help="scratch folder")
  parser.add_argument("--full_data", default=None,
                      help="full TFDS copy (default: TFDS_DATA_DIR minus _small)")
  args = parser.parse_args()
  if not os.environ.get("TFDS_DATA_DIR"):
    sys.exit("Set TFDS_DATA_DIR to the small CIFAR-10 copy "
             "(../shared/tensorflow_datasets_small).")
  repo, out = os.path.abspath(args.repo), os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  full = args.full_data or os.environ["TFDS_DATA_DIR"].replace("_small", "")
  env = dict(os.environ, PYTHONPATH=repo)
  print(f"checkout {repo}\n\n| case | exit | seconds | last line |\n|---|---|---|---|")
  for name, (code, seconds, line) in cases(repo, out, env, full):
    line = line.replace("|", "/")
    print(f"| {name} | {code} | {seconds:.1f} | {line} |", flush=True)


if __name__ == "__main__":
  main()

"""Samples and batches split over several devices (ounl_jax/devices.py), on forced
host devices: ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` on the CPU.

The flag must be set before JAX starts, so the checks run in one subprocess
(``python tests/ounl_jax/test_sharding.py``, which prints one JSON line) and the tests assert
on its report. In that process, with the tiny task and MLP of ``tests/tiny.py``:

* a short ZOO push (7 samples, at most 4 in flight, early abort and first-crossing
  stops on, so batches refill, shrink and are padded) on a 2-device mesh and on a
  1-device mesh: every ``ZooState`` leaf bit for bit equal;
* the 2-device chunk's inputs and outputs split over both devices (rows), the
  oracle state replicated;
* the oracle's total equals the sum of the per-sample counts on both, for ZOO and
  for label-only pushing (the same host scheduler);
* ``zoo_run_chunk`` compiles once per batch size, never again for a chunk of the
  same size, and the refill between chunks at most once per batch size (counted
  from JAX's backend-compile events);
* a few data-parallel training steps on 2 devices against 1: parameters within a
  relative 1e-5 (gradient sums run in another order), the state replicated, the
  batch split, one compilation.

Bit for bit holds here because every device evaluates at least 51 rows per forward
pass: XLA:CPU's dot gives slightly different row results below that (measured:
the tiny MLP's rows differ from a large batch's for 1..50 rows), which is the same
batch-size effect as docs/protocol.md §19, not the sharding's.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

DEVICES = 2
_REPORT = {}


def _report() -> dict:
  if not _REPORT:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                          f"platform_device_count={DEVICES}").strip())
    root = next(str(p) for p in pathlib.Path(__file__).resolve().parents
                if (p / "pyproject.toml").exists())
    done = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    if done.returncode:
      pytest.fail(f"the forced-device subprocess failed:\n{done.stderr[-4000:]}")
    _REPORT.update(json.loads(done.stdout.strip().splitlines()[-1]))
  return _REPORT


def test_the_subprocess_sees_two_host_devices():
  assert _report()["devices"] == DEVICES


def test_zoo_on_two_devices_equals_one_device_bit_for_bit():
  zoo = _report()["zoo"]
  assert zoo["different_leaves"] == []
  assert zoo["leaves"] > 20
  # The push really refilled, shrank and padded (7 samples, 4 slots, 1 left).
  assert zoo["batch_sizes"]["2"][0] == 4 and zoo["batch_sizes"]["2"][-1] == 2
  assert min(zoo["iterations"]) < max(zoo["iterations"])


def test_zoo_chunk_is_split_over_both_devices():
  zoo = _report()["zoo"]
  assert zoo["state_in"] == zoo["state_out"] == {"devices": DEVICES,
                                                 "rows_per_device": 2}
  assert zoo["oracle_state_replicated"]


def test_oracle_total_is_exact_on_every_mesh():
  for devices, (oracle, billed) in _report()["zoo"]["queries"].items():
    assert oracle == billed > 0, devices


def test_zoo_compiles_once_per_batch_size():
  for devices, compiles in _report()["zoo"]["compiles"].items():
    sizes = _report()["zoo"]["batch_sizes"][devices]
    # The first chunk of each size compiles; no later chunk does.
    assert compiles[0] == 1, (devices, compiles)
    for i in range(1, len(sizes)):
      assert compiles[i] == (1 if sizes[i] != sizes[i - 1] else 0), (devices, i)
    # 7 samples through 4 slots: finished samples are replaced several times, and
    # the refill (and ZOO's init of the new samples) compiles at most once per
    # batch size, not once per refill (the init is not sharded: the second mesh
    # may reuse the first's compilation).
    refills, starts = _report()["zoo"]["refill_compiles"][devices]
    assert 1 <= refills <= len(set(sizes)), (devices, refills, sizes)
    assert starts <= len(set(sizes)), (devices, starts, sizes)


def test_label_only_on_two_devices_counts_exactly():
  for devices, run in _report()["label_only"].items():
    assert run["oracle_queries"] == run["queries"], devices
    assert run["crossed"] > 0, devices
    assert run["busy"] == run["iterations"], devices


def test_training_on_two_devices_matches_one():
  train = _report()["train"]
  assert train["max_relative_difference"] < 1e-5
  assert train["loss"]["2"] == pytest.approx(train["loss"]["1"], rel=1e-5)
  assert train["params_replicated"] and train["batch_split"]
  assert train["compiles"] == {"1": 1, "2": 1}


# ---------------------------------------------------------------------------------
# The subprocess.
# ---------------------------------------------------------------------------------


def _main():
  # pylint: disable=import-outside-toplevel
  import jax
  import numpy as np

  sys.path.insert(0, os.getcwd())
  from ounl_jax import devices as devices_lib
  from ounl_jax import oracle as oracle_lib
  from ounl_jax import train as train_lib
  from ounl_jax.attacks import zoo
  from tests import tiny

  compiles = []

  def listener(event, duration, **kwargs):
    del duration
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(kwargs.get("fun_name"))

  jax.monitoring.register_event_duration_secs_listener(listener)
  report = {"devices": jax.device_count()}
  model = tiny.mlp_model()
  variables = tiny.fit(model, *tiny.synthetic(64, 0), steps=50)
  oracle = oracle_lib.make_oracle(oracle_lib.Softmax(model.apply), variables,
                                  input_shape=tiny.SHAPE, num_classes=tiny.CLASSES)
  images, labels = tiny.synthetic(7, 3)
  # 65 probes per sample: a device never evaluates fewer than 65 rows.
  settings = zoo.ZooSettings(coordinates_per_iteration=32, max_iterations=120,
                             iterations_per_chunk=5, sample_chunk_size=4,
                             stop_at_first_crossing=True, learning_rate=0.05)
  layout = {}
  real_chunk = zoo.compiled_chunk

  def spying_chunk(oracle, settings, mesh=None):
    run = real_chunk(oracle, settings, mesh)

    def spy(state, oracle_state):
      out = run(state, oracle_state)
      if mesh is not None and "state_in" not in layout:
        layout["state_in"] = _rows(state.modifier)
        layout["state_out"] = _rows(out[0].modifier)
        layout["oracle_state_replicated"] = all(
            leaf.sharding.is_fully_replicated and len(leaf.devices()) == DEVICES
            for leaf in jax.tree_util.tree_leaves(out[1]))
      return out

    return spy

  def _rows(array):
    shards = array.addressable_shards
    return {"devices": len({s.device for s in shards}),
            "rows_per_device": max(s.data.shape[0] for s in shards)}

  zoo.compiled_chunk = spying_chunk
  results, sizes, chunk_compiles, queries, refills = {}, {}, {}, {}, {}
  for count in (2, 1):
    mesh = devices_lib.sample_mesh(jax.devices()[:count])
    sizes[count], chunk_compiles[count] = [], []
    before = [len(compiles)]
    attack_start = len(compiles)

    def on_chunk(progress, count=count, before=before):
      sizes[count].append(progress.batch_size)
      chunk_compiles[count].append(compiles[before[0]:].count("jit(zoo_run_chunk)"))
      before[0] = len(compiles)

    result = zoo.zoo_attack(oracle, images, labels, jax.random.key(3), settings,
                            mesh=mesh, on_chunk=on_chunk)
    results[count] = result.state
    refills[count] = [compiles[attack_start:].count(name)
                      for name in ("jit(_refill)", "jit(_start)")]
    queries[count] = [int(result.oracle_state.queries),
                      int(np.sum(result.state.queries))]
  zoo.compiled_chunk = real_chunk
  paths = jax.tree_util.tree_leaves_with_path(results[1])
  different = [jax.tree_util.keystr(path) for (path, a), b in
               zip(paths, jax.tree_util.tree_leaves(results[2]))
               if not np.array_equal(a, b, equal_nan=True)]
  report["zoo"] = dict(layout, different_leaves=different, leaves=len(paths),
                       batch_sizes=sizes, compiles=chunk_compiles, queries=queries,
                       refill_compiles=refills,
                       iterations=results[2].iterations.tolist())

  # Label-only pushing on the same scheduler: groups of 3 samples, split over the
  # mesh (padded to a multiple of 2 rows); the oracle's count stays exact.
  from ounl_jax.attacks import label_only
  walk = label_only.LabelOnlySettings(max_iterations=4, directions=16,
                                      iterations_per_chunk=2, sample_chunk_size=3,
                                      binary_search_steps=6)
  others, _ = tiny.synthetic(16, 11)
  label_only_report = {}
  for count in (2, 1):
    mesh = devices_lib.sample_mesh(jax.devices()[:count])
    pushed = label_only.label_only_push(oracle, images, labels, jax.random.key(4),
                                        walk, start_images=others, mesh=mesh)
    label_only_report[count] = dict(
        oracle_queries=pushed.oracle_queries, queries=int(pushed.queries.sum()),
        crossed=int(pushed.crossed.sum()),
        busy=pushed.statistics.busy_slot_iterations,
        iterations=int(pushed.iterations.sum()))
  report["label_only"] = label_only_report

  train_images, train_labels = tiny.synthetic(256, 5)
  params, losses, train_compiles = {}, {}, {}
  for count in (1, 2):
    mesh = devices_lib.sample_mesh(jax.devices()[:count])
    optimizer = train_lib.amsgrad(1e-2)
    state = train_lib.init_train_state(model.init(jax.random.key(0)), optimizer)
    before = len(compiles)
    step = train_lib.make_train_step(model, optimizer, mesh=mesh)
    for epoch in range(2):
      state, metrics = train_lib.train_epoch(step, state, train_images,
                                             train_labels, jax.random.key(epoch))
    train_compiles[count] = compiles[before:].count("jit(train_step)")
    losses[count] = metrics["loss"]
    params[count] = jax.tree_util.tree_map(np.asarray, state.params)
    if count == 2:
      leaf = jax.tree_util.tree_leaves(state.params)[0]
      replicated = leaf.sharding.is_fully_replicated and len(leaf.devices()) == 2
      x = jax.device_put(train_images[:64], devices_lib.row_sharding(mesh))
      split = _rows(x) == {"devices": 2, "rows_per_device": 32}
      # The step's compiled input layout for the images: split rows.
      lowered = step.jitted.lower(state, train_images[:64], train_labels[:64],
                           jax.random.key(0))
      split = split and lowered.compile().input_shardings[0][1] == (
          devices_lib.row_sharding(mesh))
  difference = max(float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
                   for a, b in zip(jax.tree_util.tree_leaves(params[1]),
                                   jax.tree_util.tree_leaves(params[2])))
  report["train"] = dict(max_relative_difference=difference, loss=losses,
                         params_replicated=replicated, batch_split=split,
                         compiles=train_compiles)
  print(json.dumps(report, default=str))


if __name__ == "__main__":
  _main()

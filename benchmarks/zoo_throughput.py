"""ZOO queries/s against the raw forward throughput of the same model.

For S samples attacked at once (``--samples``, default 1,16,64), one ZOO iteration
sends ``S * (2B + 1)`` images (B = 128) to the oracle in one flat batch. This
measures

* ``zoo q/s``: images queried per second by ``zoo_run_chunk`` (compiled, every
  sample active, early abort and crossing stops off, so every iteration is full),
  against the parameters-as-arguments oracle the service hands out;
* ``fwd img/s``: the same model's softmax forward on a batch of the same size
  ``S * (2B + 1)``, the same number of times, the better of two ways: one call per
  batch (``call``), or all batches in one compiled ``fori_loop`` (``loop``,
  ``devices.forward_images_per_second``; on CPU this avoids re-allocating the large
  activations every call and is the fairer baseline for the ZOO loop, which also
  runs its iterations in one call);

and prints the table, then as its last line ``zoo/forward ratio: X.XX``, the worst
ratio over S (target >= 0.9: the attack adds at most 10% over the model's cost).
Both are timed alternately, several rounds, best round kept, so that other load on
the machine hurts both alike.

Three modes:

* default: the table above on every device JAX sees (samples split over them,
  ``ounl_jax/devices.py``; S is rounded up to a multiple of the device count);
* ``--devices=1,2,4``: one table row per device count and S, with queries/s per
  device. On a CPU each count runs in a subprocess with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (forced host devices share
  the same cores: this checks the sharded program, not a speed-up); on
  accelerators the first N real devices, in this process;
* ``--allocator``: plain glibc malloc, the ``MALLOC_*`` variables of WORKSPACE.md
  and the built-in ``cpu_memory.tune_malloc()`` side by side, each in its own
  subprocess, alternating for ``--allocator_rounds`` rounds: best queries/s and peak
  RSS (``ru_maxrss`` of each run) per variant, then whether the built-in fix is
  adopted (at least as fast as the variables at <= 1.2x the plain peak memory).

Models: ``--model_scale=cpu`` is the VGG-3 at width 16 (the ``cpu`` preset; 32 with
``--width=32``), ``paper`` the paper's width 128 (for an accelerator). Weights are a
seeded random init: throughput does not depend on training.

Allocator: ``--malloc=tuned`` applies ``cpu_memory.tune_malloc()`` at start (not by
default: measured on the 2-core CPU it was not adopted, see WORKSPACE.md); the
script prints what was applied and which ``MALLOC_*`` variables are set. ``--json=FILE`` also writes the results as JSON.

  python benchmarks/zoo_throughput.py --model_scale=cpu
  python benchmarks/zoo_throughput.py --devices=1,2 --samples=16
  python benchmarks/zoo_throughput.py --allocator --samples=64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from ounl_jax import cpu_memory  # Before JAX: nothing large allocated yet.

import jax
import numpy as np

from ounl_jax import devices as devices_lib
from ounl_jax import models
from ounl_jax import oracle as oracle_lib
from ounl_jax.attacks import zoo
from ounl_jax.attacks import zoo_state

MALLOC_VARS = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "4294967296",
               "MALLOC_TRIM_THRESHOLD_": "68719476736",
               "MALLOC_TOP_PAD_": "268435456"}
WIDTHS = {"cpu": 16, "paper": 128}
VARIANTS = ("plain", "env", "builtin")
FORCE_FLAG = "--xla_force_host_platform_device_count"


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model_scale", choices=sorted(WIDTHS), default="cpu")
  parser.add_argument("--width", type=int, default=None,
                      help="VGG-3 width (default: 16 for cpu, 128 for paper).")
  parser.add_argument("--samples", default="1,16,64",
                      help="Comma-separated S values.")
  parser.add_argument("--coordinates", type=int, default=128, help="B.")
  parser.add_argument("--images_per_round", type=int, default=20000,
                      help="Images per timed round (sets the iterations per S).")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--devices", default=None,
                      help="Comma-separated device counts to compare.")
  parser.add_argument("--allocator", action="store_true",
                      help="Compare plain malloc, the MALLOC_* variables and "
                           "tune_malloc() in subprocesses.")
  parser.add_argument("--allocator_rounds", type=int, default=3)
  parser.add_argument("--malloc", choices=("tuned", "plain"), default="plain",
                      help="tuned: call cpu_memory.tune_malloc() at start (not "
                           "adopted: see --allocator).")
  parser.add_argument("--json", default=None, help="Also write results here.")
  parser.add_argument("--child", action="store_true",
                      help=argparse.SUPPRESS)  # One JSON line, for the parent.
  return parser.parse_args(argv)


def timed(fn, repeats: int) -> float:
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn()
  jax.block_until_ready(out)
  return time.perf_counter() - start


def measure(model, variables, count: int, settings: zoo.ZooSettings, rounds: int,
            images_per_round: int, mesh=None):
  """Best-of-rounds rates for ``count`` samples (split over ``mesh``).

  Returns:
    ``(rates, batch, iterations)``: images per second for ``zoo``, ``call`` and
    ``loop``, the flat batch ``count * (2B + 1)``, iterations per round.
  """
  apply = oracle_lib.Softmax(model.apply)
  oracle = oracle_lib.make_oracle(apply, variables, input_shape=model.input_shape,
                                  num_classes=model.num_classes)
  batch = count * settings.queries_per_iteration
  iterations = max(2, math.ceil(images_per_round / batch))
  settings = zoo.dataclasses.replace(settings, iterations_per_chunk=iterations,
                                     sample_chunk_size=count)
  key = jax.random.key(1)
  images = jax.random.uniform(jax.random.fold_in(key, 0),
                              (count,) + model.input_shape, minval=-0.5, maxval=0.5)
  labels = np.zeros((count,), np.int32)
  state = zoo_state.zoo_init(images, labels, jax.random.fold_in(key, 1), settings)
  oracle_state = oracle.init()
  probes = jax.random.uniform(jax.random.fold_in(key, 2),
                              (batch,) + model.input_shape, minval=-0.5, maxval=0.5)
  params = variables
  if devices_lib.is_sharded(mesh):
    state = devices_lib.shard_rows(state, mesh)
    oracle_state = devices_lib.replicate(oracle_state, mesh)
    probes = devices_lib.shard_rows(probes, mesh)
    params = devices_lib.replicate(variables, mesh)
  run = zoo.compiled_chunk(oracle, settings, mesh)
  forward = jax.jit(apply)

  jax.block_until_ready(run(state, oracle_state))  # Compile.
  jax.block_until_ready(forward(params, probes))
  seconds = {"zoo": math.inf, "call": math.inf}
  loop = 0.0
  for _ in range(rounds):  # Interleaved, best round kept.
    seconds["zoo"] = min(seconds["zoo"], timed(lambda: run(state, oracle_state), 1))
    seconds["call"] = min(seconds["call"],
                          timed(lambda: forward(params, probes), iterations))
    loop = max(loop, devices_lib.forward_images_per_second(
        apply, params, probes, iterations=iterations, rounds=1, mesh=mesh))
  images_sent = batch * iterations
  rates = {k: images_sent / v for k, v in seconds.items()}
  rates["loop"] = loop
  return rates, batch, iterations


def run_table(args, mesh) -> list[dict]:
  """The ZOO/forward table for every S on ``mesh``: a list of row dicts."""
  width = args.width or WIDTHS[args.model_scale]
  model = models.get_model("vgg3", num_classes=10, width=width)
  variables = model.init(jax.random.key(0))
  settings = zoo.ZooSettings(coordinates_per_iteration=args.coordinates,
                             abort_early=False, max_iterations=10**9)
  rows = []
  for requested in [int(s) for s in args.samples.split(",")]:
    count = devices_lib.round_up(requested, mesh)
    rates, batch, iterations = measure(model, variables, count, settings,
                                       args.rounds, args.images_per_round, mesh)
    forward = max(rates["call"], rates["loop"])
    rows.append(dict(devices=devices_lib.device_count(mesh), samples=count,
                     batch=batch, iterations=iterations, zoo=rates["zoo"],
                     forward=forward, call=rates["call"], loop=rates["loop"],
                     ratio=rates["zoo"] / forward))
  return rows


def header(args, tuning) -> None:
  width = args.width or WIDTHS[args.model_scale]
  queries = (2 * args.coordinates + 1)
  set_vars = [f"{v}={os.environ[v]}" for v in MALLOC_VARS if v in os.environ]
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}) x "
        f"{jax.device_count()}, {os.cpu_count()} CPUs")
  print(f"model: vgg3 width {width} ({args.model_scale} scale), "
        f"B={args.coordinates}, {queries} queries/sample/iteration")
  print("malloc: " + (f"tune_malloc() applied {tuning.applied}" if tuning.applied
                      else f"tune_malloc() not applied ({tuning.reason})")
        + "; env: " + (", ".join(set_vars) if set_vars else "no MALLOC_* set"))


def print_rows(rows) -> None:
  print(f"{'dev':>3} {'S':>4} {'batch':>7} {'iters':>6} {'zoo q/s':>10} "
        f"{'q/s/dev':>9} {'fwd img/s':>10} {'(call':>8} {'loop)':>8} {'ratio':>6}")
  for r in rows:
    print(f"{r['devices']:>3} {r['samples']:>4} {r['batch']:>7} "
          f"{r['iterations']:>6} {r['zoo']:>10.0f} {r['zoo'] / r['devices']:>9.0f} "
          f"{r['forward']:>10.0f} {r['call']:>8.0f} {r['loop']:>8.0f} "
          f"{r['ratio']:>6.2f}", flush=True)


def child_argv(args, extra=()) -> list[str]:
  argv = [sys.executable, os.path.abspath(__file__), "--child",
          f"--model_scale={args.model_scale}", f"--samples={args.samples}",
          f"--coordinates={args.coordinates}",
          f"--images_per_round={args.images_per_round}", f"--rounds={args.rounds}"]
  if args.width:
    argv.append(f"--width={args.width}")
  return argv + list(extra)


def run_child(argv, env) -> dict:
  done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def by_devices(args) -> list[dict]:
  """One table per device count: subprocesses with forced host devices on a CPU,
  the first N real devices otherwise."""
  rows = []
  for count in [int(n) for n in args.devices.split(",")]:
    if jax.default_backend() == "cpu":
      env = dict(os.environ, JAX_PLATFORMS="cpu")
      flags = [f for f in env.get("XLA_FLAGS", "").split()
               if not f.startswith(FORCE_FLAG)]
      env["XLA_FLAGS"] = " ".join(flags + [f"{FORCE_FLAG}={count}"])
      extra = [f"--malloc={args.malloc}"]
      rows += run_child(child_argv(args, extra), env)["rows"]
    else:
      if count > jax.device_count():
        print(f"skipping {count} devices: only {jax.device_count()} here")
        continue
      rows += run_table(args, devices_lib.sample_mesh(jax.devices()[:count]))
    print_rows(rows[-len(args.samples.split(",")):])
  return rows


def allocators(args) -> dict:
  """Plain, variables and built-in, alternating in subprocesses."""
  base = {k: v for k, v in os.environ.items() if k not in MALLOC_VARS}
  setups = {"plain": (base, ["--malloc=plain"]),
            "env": (dict(base, **MALLOC_VARS), ["--malloc=plain"]),
            "builtin": (base, ["--malloc=tuned"])}
  results = {name: {"zoo": [], "forward": [], "maxrss_mib": []} for name in VARIANTS}
  for _ in range(args.allocator_rounds):
    for name in VARIANTS:
      env, extra = setups[name]
      report = run_child(child_argv(args, extra), env)
      results[name]["zoo"].append(min(r["zoo"] for r in report["rows"]))
      results[name]["forward"].append(min(r["forward"] for r in report["rows"]))
      results[name]["maxrss_mib"].append(report["maxrss_kib"] / 1024)
      print(f"  round {len(results[name]['zoo'])} {name}: "
            f"{results[name]['zoo'][-1]:.0f} q/s, "
            f"{results[name]['maxrss_mib'][-1]:.0f} MiB", flush=True)
  summary = {}
  plain_rss = max(results["plain"]["maxrss_mib"])
  print(f"{'allocator':>10} {'zoo q/s':>10} {'fwd img/s':>10} {'peak RSS MiB':>13} "
        f"{'x plain':>8}   (best q/s and largest RSS of "
        f"{args.allocator_rounds} runs, S={args.samples})")
  for name in VARIANTS:
    r = results[name]
    summary[name] = dict(zoo=max(r["zoo"]), forward=max(r["forward"]),
                         maxrss_mib=max(r["maxrss_mib"]),
                         rss_ratio=max(r["maxrss_mib"]) / plain_rss, runs=r)
    s = summary[name]
    print(f"{name:>10} {s['zoo']:>10.0f} {s['forward']:>10.0f} "
          f"{s['maxrss_mib']:>13.0f} {s['rss_ratio']:>8.2f}", flush=True)
  adopt = (summary["builtin"]["zoo"] >= summary["env"]["zoo"]
           and summary["builtin"]["rss_ratio"] <= 1.2)
  summary["adopt_builtin"] = adopt
  print(f"built-in fix {'adopted' if adopt else 'not adopted'}: "
        f"{summary['builtin']['zoo'] / summary['env']['zoo']:.2f}x the variables' "
        f"q/s at {summary['builtin']['rss_ratio']:.2f}x plain peak memory "
        "(rule: >= 1.00x at <= 1.20x)")
  return summary


def main(argv=None):
  args = parse_args(argv)
  tuning = (cpu_memory.tune_malloc() if args.malloc == "tuned"
            else cpu_memory.MallocTuning({}, "--malloc=plain"))
  if args.child:
    import resource  # pylint: disable=import-outside-toplevel
    rows = run_table(args, devices_lib.sample_mesh())
    print(json.dumps({"rows": rows, "malloc": tuning.applied,
                      "maxrss_kib": resource.getrusage(
                          resource.RUSAGE_SELF).ru_maxrss}))
    return
  header(args, tuning)
  if args.allocator:
    results = {"allocator": allocators(args)}
  elif args.devices:
    results = {"devices": by_devices(args)}
  else:
    rows = run_table(args, devices_lib.sample_mesh())
    print_rows(rows)
    print(f"zoo/forward ratio: {min(r['ratio'] for r in rows):.2f}")
    results = {"rows": rows}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(results, device=str(jax.devices()[0].device_kind),
                     device_count=jax.device_count(), malloc=tuning.applied,
                     args=vars(args)), f, indent=1, default=str)


if __name__ == "__main__":
  main()

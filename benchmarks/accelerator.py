"""Summarises one ``benchmarks/accelerator.sh`` run into ``OUT/summary.json``.

Reads the step table the script wrote (``steps.tsv``: name, exit status, seconds),
the pytest JUnit file, the ZOO and determinism benchmarks' JSON and the pushing
experiment's ``results.json``, adds the devices and package versions this Python sees, writes
``summary.json`` and prints it. Exit status 1 when a step failed, when
``pytest -m gpu`` skipped on a machine that has a GPU, when deterministic runs differ
on a GPU, or when an output is missing.

  python benchmarks/accelerator.py OUT [--smoke=1]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import xml.etree.ElementTree as ElementTree

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
            "tensorflow-datasets", "array-record")


def _read_json(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _steps(out):
  steps = {}
  path = os.path.join(out, "steps.tsv")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        name, status, seconds = line.rstrip("\n").split("\t")
        steps[name] = {"exit_status": int(status),
                       "seconds": round(float(seconds), 1) if seconds else None}
  return steps


def _pytest(out):
  path = os.path.join(out, "pytest_gpu.xml")
  if not os.path.exists(path):
    return None
  root = ElementTree.parse(path).getroot()
  suite = root if root.tag == "testsuite" else root.find("testsuite")
  counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors",
                                              "skipped")}
  counts["skip_reasons"] = [s.get("message", "") for s in suite.iter("skipped")]
  return counts


def _versions():
  found = {}
  for name in PACKAGES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  return found


def _pushing(out):
  results = _read_json(os.path.join(out, "pushing", "results.json"))
  if results is None:
    return None
  keep = {}
  for key in ("conditions", "accuracy", "attack", "timings", "throughput",
              "host_peak_rss_mib", "config"):
    if key in results:
      keep[key] = results[key]
  return keep or {"keys": sorted(results)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("out")
  parser.add_argument("--smoke", default="0")
  args = parser.parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel

  has_gpu = any(d.platform == "gpu" for d in jax.devices())
  summary = {
      "smoke": args.smoke == "1",
      "devices": [str(d) for d in jax.devices()],
      "device_kind": jax.devices()[0].device_kind,
      "python": sys.version.split()[0],
      "versions": _versions(),
      "steps": _steps(args.out),
      "pytest_gpu": _pytest(args.out),
      "zoo_throughput": _read_json(os.path.join(args.out, "zoo_throughput.json")),
      "determinism": _read_json(os.path.join(args.out, "determinism.json")),
      "pushing": _pushing(args.out),
  }
  problems = [f"step {name} exited {step['exit_status']}"
              for name, step in summary["steps"].items() if step["exit_status"]]
  for name in ("pytest_gpu", "zoo_throughput", "determinism", "pushing"):
    if summary[name] is None:
      problems.append(f"no output from {name}")
  if has_gpu and summary["pytest_gpu"] and summary["pytest_gpu"]["skipped"]:
    problems.append("pytest -m gpu skipped on a machine with a GPU")
  if has_gpu and summary["determinism"] and not (
      summary["determinism"]["deterministic"]["bit_identical"]):
    problems.append("deterministic GPU runs gave different parameters")
  summary["problems"] = problems
  summary["total_seconds"] = round(sum(s["seconds"] or 0 for s in
                                       summary["steps"].values()), 1)
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, default=str)
  rows = (summary["zoo_throughput"] or {}).get("rows", [])
  print(f"accelerator: {summary['device_kind']} x {len(summary['devices'])}, "
        f"{summary['total_seconds']} s in steps; "
        + ", ".join(f"S={r['samples']}: {r['zoo']:.0f} q/s (ratio {r['ratio']:.2f})"
                    for r in rows))
  print("problems: " + ("; ".join(problems) if problems else "none"))
  print(os.path.join(args.out, "summary.json"))
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())

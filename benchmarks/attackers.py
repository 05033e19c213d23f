"""Issue 14's table: every attacker against one server, same N, same model.

``--workdir`` mode (the cpu-scale table): restores the server model of the main job
(``python -m experiments.pushing --dataset=cifar10``, its ``checkpoints/model``) and
its saved push (``attack/pushed.npz``, or ``--pushed``), takes the N samples the main
job submitted (the first N pushed by both Pushing-I and II in its seeded candidate
order; N = 400, the paper's 10% of airplane) and compares, on exactly those ids:

* every registered pusher (``experiments.attacks.registry``), built as the
  experiments build it: ``zoo``, the paper's coordinate ZOO (released settings,
  Sec. III-C; in workdir mode the main job's saved push, not pushed again, with its
  saved queries and seconds), ``zoo_directions`` (random directions,
  ``--zoo_max_iterations``), ``label_only`` (HopSkipJump-style on labels; start
  images: the user's own non-class-A validation images) and any pusher research
  code registers;
* ``unlearning_gradient``: gradient through the server's first-order update
  (white-box; its objective: the user's own validation class-A images);
* ``transfer``: the same against a surrogate trained on the validation split.

For each submission a fresh server holding the clean model (first-order, the
experiments' defaults: released regime, tau 2e-4, server key 0) unlearns it and is
evaluated on the test set. The class-A gap is normal unlearning's class-A accuracy
(the same ids, clean, true labels) minus the row's. Prints a Markdown table and
writes JSON (config, seeds, versions, commit) to ``--out``
(default ``WORKDIR/attackers.json``).

Smoke mode (no ``--workdir``): trains a small VGG-3 for ``--epochs`` on the data in
``TFDS_DATA_DIR`` and pushes ZOO fresh (``--zoo_max_iterations``), for CI-sized runs.

Examples::

  TFDS_DATA_DIR=../shared/tensorflow_datasets nice -n 5 \\
    python benchmarks/attackers.py --workdir=runs/cifar10 --samples=400
  TFDS_DATA_DIR=../shared/tensorflow_datasets_small \\
    python benchmarks/attackers.py --samples=8 --epochs=1 --zoo_max_iterations=20 \\
    --ug_steps=3 --surrogate_epochs=1
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import time

import jax
import numpy as np

from experiments.attacks import registry
from experiments.run import records
from ounl_jax import checkpoint
from ounl_jax import data as data_lib
from ounl_jax import evaluation
from ounl_jax import models
from ounl_jax import service as service_lib
from ounl_jax import unlearning
from ounl_jax.attacks import pushing
from ounl_jax.attacks import unlearning_gradient as ug
from ounl_jax.attacks import zoo

# Every registered attack: the pushers as the experiments run them, then the
# gradient attacks (registry names).
ATTACKERS = tuple(registry.ATTACKS)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", default=None, help="Default: $TFDS_DATA_DIR.")
  parser.add_argument("--workdir", default=None,
                      help="An experiments.pushing workdir: its model and push.")
  parser.add_argument("--pushed", default=None,
                      help="The saved ZOO push (default WORKDIR/attack/pushed.npz).")
  parser.add_argument("--samples", type=int, default=400)
  parser.add_argument("--class_a", default="airplane")
  parser.add_argument("--epochs", type=int, default=3, help="Smoke mode only.")
  parser.add_argument("--width", type=int, default=16, help="Smoke mode only.")
  parser.add_argument("--zoo_max_iterations", type=int, default=300,
                      help="ZOO iterations (cpu preset 300); the saved push keeps "
                           "its own.")
  parser.add_argument("--start_images", type=int, default=256)
  parser.add_argument("--held_out", type=int, default=256,
                      help="The user's own validation images of class A (the "
                           "gradient attacks' objective).")
  parser.add_argument("--ug_steps", type=int, default=30)
  parser.add_argument("--ug_learning_rate", type=float, default=0.01)
  parser.add_argument("--surrogate_epochs", type=int, default=10)
  parser.add_argument("--skip", default="",
                      help=f"Comma-separated attackers to skip: {ATTACKERS}.")
  parser.add_argument("--seed", type=int, default=1216, help="Attack seed.")
  parser.add_argument("--server_seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="JSON path.")
  args = parser.parse_args(argv)
  unknown = {s for s in args.skip.split(",") if s} - set(ATTACKERS)
  if unknown:
    parser.error(f"--skip: unknown attackers {sorted(unknown)}; choose from "
                 f"{ATTACKERS}.")
  return args


@dataclasses.dataclass
class Server:
  """The model, its data, the unlearning settings and the user's samples."""

  model: models.Model
  variables: object
  splits: data_lib.Splits
  class_a: int
  unlearning_settings: object
  server_seed: int
  images: np.ndarray        # The user's N samples (clean).
  labels: np.ndarray
  ids: np.ndarray
  saved: dict | None        # The main job's ZOO push (workdir mode).
  saved_rows: np.ndarray | None

  def service(self, output="probabilities") -> service_lib.UnlearningService:
    return service_lib.UnlearningService(
        self.model, self.variables, self.splits.test,
        key=jax.random.key(self.server_seed), method="first_order",
        settings=self.unlearning_settings, output=output)

  def after_unlearning(self, images, labels) -> dict:
    """Test-set accuracies after a fresh clean server unlearns (images, labels)."""
    server = self.service()
    if len(labels):
      server.unlearn(service_lib.UnlearningRequest(images, labels))
    report = server.evaluate(self.class_a).report
    return {"class_a_accuracy": float(report.class_a_accuracy),
            "accuracy": float(report.accuracy)}


def released_unlearning_settings():
  """The experiments' default: first-order, released regime (docs/protocol.md §5)."""
  return dataclasses.replace(unlearning.default_settings("first_order"),
                             reference_code=True)


def restore(args, data_dir) -> Server:
  """The main job's model, data and submitted samples (workdir mode)."""
  with open(os.path.join(args.workdir, "train_metrics.json")) as f:
    train = json.load(f)["config"]["train"]
  splits = data_lib.load(train["dataset"], data_dir=data_dir, seed=train["seed"],
                         max_train_per_class=train["max_train_per_class"],
                         max_test_per_class=train["max_test_per_class"])
  spec = data_lib.get_spec(train["dataset"])
  model = models.get_model(train["model"], num_classes=spec.num_classes,
                           input_shape=spec.image_shape, width=train["width"])
  like = model.init(jax.random.key(0))
  restored = checkpoint.restore_latest(
      os.path.join(args.workdir, "checkpoints", "model"), like)
  if restored is None:
    raise SystemExit(f"{args.workdir} holds no trained model; run "
                     "python -m experiments.pushing there first.")
  path = args.pushed or os.path.join(args.workdir, "attack", "pushed.npz")
  with np.load(path) as f:
    saved = {k: f[k] for k in f.files}
  both = saved["pushing_i_success"] & saved["pushing_ii_success"]
  rows = np.flatnonzero(both)[:min(args.samples, int(saved["requested"]))]
  # The saved originals are the training images: check they are the same data.
  where = {int(i): r for r, i in enumerate(splits.train.ids)}
  train_rows = np.asarray([where.get(int(i), -1) for i in saved["ids"][rows]])
  if (train_rows < 0).any() or not np.allclose(splits.train.images[train_rows],
                                               saved["original"][rows]):
    raise SystemExit(f"{path} was pushed on other data than {data_dir}.")
  saved["path"] = os.path.abspath(path)
  return Server(model, restored[1], splits,
                data_lib.class_index(spec, args.class_a),
                released_unlearning_settings(), args.server_seed,
                saved["original"][rows].astype(np.float32),
                saved["original_labels"][rows].astype(np.int32),
                saved["ids"][rows], saved, rows)


def train_small(args, data_dir) -> Server:
  """Smoke mode: a small VGG-3 trained here; the first N correct class-A samples."""
  splits = data_lib.load("cifar10", data_dir=data_dir, seed=0)
  spec = data_lib.get_spec("cifar10")
  model = models.get_model("vgg3", num_classes=10, width=args.width)
  variables = ug.train_surrogate(model, splits.train.images, splits.train.labels,
                                 jax.random.key(0), epochs=args.epochs)
  class_a = data_lib.class_index(spec, args.class_a)
  predicted = evaluation.predict_labels(model, variables, splits.train.images)
  own = np.flatnonzero(splits.train.labels == class_a)
  chosen = own[predicted[own] == class_a][:args.samples]
  train = splits.train
  return Server(model, variables, splits, class_a, released_unlearning_settings(),
                args.server_seed, train.images[chosen], train.labels[chosen],
                train.ids[chosen], None, None)


def query_stats(queries) -> dict | None:
  if queries is None or not len(queries):
    return None
  queries = np.asarray(queries)
  return {"median": float(np.median(queries)), "mean": float(np.mean(queries)),
          "max": int(np.max(queries))}


def row_for(server: Server, method, images, labels, success, l2, status, *,
            seconds, queries) -> dict:
  return {"method": method, "submitted": int(len(labels)),
          "success_rate": float(np.mean(success)), "attack_seconds": seconds,
          "queries": query_stats(queries),
          "mean_l2": float(np.mean(l2[success])) if np.any(success) else None,
          "status": dict(collections.Counter(np.asarray(status).tolist())),
          **server.after_unlearning(images, labels)}


def pushed_rows(server, name, result: pushing.PushResult, seconds) -> list[dict]:
  rows = []
  for which, pushed in (("Pushing-I", result.pushing_i),
                        ("Pushing-II", result.pushing_ii)):
    images, labels, _ = pushed.successful()
    rows.append(row_for(server, f"{name} {which}", images, labels, pushed.success,
                        pushed.l2, pushed.status, seconds=seconds,
                        queries=result.queries[result.attacked]))
  return rows


def saved_zoo_rows(server: Server) -> list[dict]:
  """The main job's ZOO push on the submitted rows (not pushed again)."""
  saved, rows = server.saved, server.saved_rows
  attacked = saved["attacked"]
  out = []
  for which, name in (("Pushing-I", "pushing_i"), ("Pushing-II", "pushing_ii")):
    out.append({
        "method": f"{registry.get('zoo').display_name} (saved push) {which}",
        "submitted": int(len(rows)),
        "success_rate": float(saved[f"{name}_success"][attacked].mean()),
        "attack_seconds": float(saved["seconds"]),
        "queries": query_stats(saved["queries"][rows]),
        "queries_all_attacked": query_stats(saved["queries"][attacked]),
        "mean_l2": float(np.mean(saved[f"{name}_l2"][rows])),
        "status": dict(collections.Counter(
            saved[f"{name}_status"][attacked].tolist())),
        **server.after_unlearning(saved[name][rows].astype(np.float32),
                                  saved[f"{name}_labels"][rows].astype(np.int32))})
  return out


def push_settings(args) -> pushing.PushSettings:
  """What every pusher is built from (each factory derives its own settings)."""
  return pushing.PushSettings(zoo=zoo.ZooSettings(
      max_iterations=args.zoo_max_iterations, iterations_per_chunk=10))


def push_rows(args, server: Server, key, start_pool, skip) -> list[dict]:
  """Every registered pusher (``registry.ATTACKS``) on the same N samples."""
  rows = []
  for index, spec in enumerate(registry.ATTACKS.values(), 1):
    if not spec.pushes or spec.name in skip:
      continue
    if spec.name == "zoo" and server.saved is not None:
      rows += saved_zoo_rows(server)
      continue
    pusher = spec.pusher(push_settings(args), start_pool)
    oracle = server.service(spec.oracle_output).oracle()
    started = time.perf_counter()
    result = pusher.push(oracle, server.images, server.labels,
                         jax.random.fold_in(key, index), oracle.init(), None)
    seconds = time.perf_counter() - started
    rows += pushed_rows(server, spec.display_name, result, seconds)
    print(rows[-1]["method"], rows[-1]["class_a_accuracy"], f"{seconds:.0f} s",
          flush=True)
  return rows


def metadata(args, config: dict) -> dict:
  """The experiments' stamp (versions, commit, command) plus this run's args."""
  return {"args": vars(args), **records.run_metadata(config)}


def markdown(rows: list[dict], normal_a: float) -> str:
  lines = ["| method | submitted | success | mean L2 | queries per sample "
           "median / mean / max | attack s | class A | overall | class-A gap |",
           "|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    q = row.get("queries")
    queries = ("-" if q is None else
               f"{q['median']:,.0f} / {q['mean']:,.0f} / {q['max']:,}")
    success = ("-" if row.get("success_rate") is None
               else f"{100 * row['success_rate']:.1f}%")
    seconds = ("-" if row.get("attack_seconds") is None
               else f"{row['attack_seconds']:.0f}")
    l2 = "-" if row.get("mean_l2") is None else f"{row['mean_l2']:.2f}"
    gap = 100 * (normal_a - row["class_a_accuracy"])
    lines.append(f"| {row['method']} | {row['submitted']} | {success} | {l2} | "
                 f"{queries} | {seconds} | {100 * row['class_a_accuracy']:.1f}% | "
                 f"{100 * row['accuracy']:.1f}% | {gap:+.1f} |")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  skip = {s for s in args.skip.split(",") if s}
  data_dir = args.data_dir or data_lib.default_data_dir()
  started = time.perf_counter()
  server = restore(args, data_dir) if args.workdir else train_small(args, data_dir)
  setup_seconds = time.perf_counter() - started
  splits, class_a = server.splits, server.class_a
  images, labels = server.images, server.labels
  key = jax.random.key(args.seed)
  # The user's own data: the validation split (never the server's training set).
  valid = splits.valid
  start_pool = valid.images[np.flatnonzero(valid.labels != class_a)
                            [:args.start_images]]
  held_out = valid.images[np.flatnonzero(valid.labels == class_a)[:args.held_out]]

  rows = [{"method": "clean (no unlearning)", "submitted": 0,
           **server.after_unlearning(images[:0], labels[:0])},
          {"method": "normal unlearning (same ids, clean)",
           "submitted": len(labels), **server.after_unlearning(images, labels)}]
  print(f"setup {setup_seconds:.0f} s; N = {len(labels)}; normal unlearning "
        f"class A {rows[1]['class_a_accuracy']:.3f}", flush=True)

  def timed(function):
    t = time.perf_counter()
    value = function()
    return value, time.perf_counter() - t

  rows += push_rows(args, server, key, start_pool, skip)
  ug_settings = ug.UnlearningGradientSettings(
      steps=args.ug_steps, learning_rate=args.ug_learning_rate,
      unlearning=server.unlearning_settings)
  if "unlearning_gradient" not in skip:
    result, seconds = timed(lambda: ug.unlearning_gradient_attack(
        server.model, server.variables, images, labels, held_out,
        jax.random.fold_in(key, 4), ug_settings))
    sub = result.submission
    rows.append(row_for(server, registry.get("unlearning_gradient").display_name,
                        *sub.successful()[:2], sub.success, sub.l2, sub.status,
                        seconds=seconds, queries=None))
    print(rows[-1]["method"], rows[-1]["class_a_accuracy"], f"{seconds:.0f} s",
          flush=True)
  if "transfer" not in skip:
    def transfer():
      surrogate = ug.train_surrogate(server.model, valid.images, valid.labels,
                                     jax.random.fold_in(key, 5),
                                     epochs=args.surrogate_epochs)
      return ug.unlearning_gradient_attack(
          server.model, surrogate, images, labels, held_out,
          jax.random.fold_in(key, 6), ug_settings)
    result, seconds = timed(transfer)
    sub = result.submission
    rows.append(row_for(server, registry.get("transfer").display_name,
                        *sub.successful()[:2], sub.success, sub.l2, sub.status,
                        seconds=seconds, queries=None))
    print(rows[-1]["method"], rows[-1]["class_a_accuracy"], f"{seconds:.0f} s",
          flush=True)

  normal_a = rows[1]["class_a_accuracy"]
  for row in rows:
    row["class_a_gap"] = normal_a - row["class_a_accuracy"]
  table = markdown(rows, normal_a)
  print(f"\n{'Restored ' + args.workdir if args.workdir else 'Trained'} "
        f"{server.model.name}; N = {len(labels)} {args.class_a} samples; test set "
        f"of {len(splits.test)}; first-order unlearning "
        f"{dataclasses.asdict(server.unlearning_settings)}.\n")
  print(table)
  print("\nQueries per sample include the clean and verification queries. Class-A "
        "gap: normal unlearning's class-A accuracy minus the row's, in points.")
  config = {
      "unlearning": dataclasses.asdict(server.unlearning_settings),
      "samples": len(labels), "ids": server.ids,
      "seeds": {"attack": args.seed, "server": args.server_seed},
      "push_settings": dataclasses.asdict(push_settings(args)),
      "pushers": [spec.name for spec in registry.ATTACKS.values() if spec.pushes],
      "unlearning_gradient": {"steps": args.ug_steps,
                              "learning_rate": args.ug_learning_rate,
                              "surrogate_epochs": args.surrogate_epochs,
                              "held_out": len(held_out)},
      "saved_push": None if server.saved is None else {
          "path": server.saved["path"],
          "fingerprint": str(server.saved.get("fingerprint"))},
  }
  out = args.out or (os.path.join(args.workdir, "attackers.json") if args.workdir
                     else None)
  if out:
    payload = {"rows": rows, "table": table, "setup_seconds": setup_seconds,
               **metadata(args, config)}
    with open(out, "w") as f:
      json.dump(payload, f, indent=2, default=lambda v: np.asarray(v).tolist())
    print(out)
  return rows


if __name__ == "__main__":
  main()

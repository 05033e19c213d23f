"""Four attackers against one server: ZOO, label-only, gradient through unlearning.

On one model (a width-16 VGG-3 trained ``--epochs`` epochs on the CIFAR-10 copy, or
restored from ``--workdir`` of ``experiments.pushing``) and the same N correctly
classified airplanes, it runs

* ZOO Pushing-I / II (``pushing.push``, probabilities oracle; its defaults except
  ``--zoo_max_iterations``),
* label-only Pushing-I / II (``label_only.label_only_push``, labels oracle; start
  images: the user's own non-airplane training images),
* the white-box gradient-through-unlearning attack (``unlearning_gradient``;
  held-out class-A images: other airplanes the user owns),
* its transfer variant (a surrogate trained on the validation split, the
  attacker's own data),

and for each submission a fresh ``service.UnlearningService`` (first-order,
released defaults) unlearns the successful samples. It prints a Markdown table:
success rate, queries per sample, attack seconds, the test-set class-A and overall
accuracy after unlearning, and the class-A gap against normal unlearning of the same
clean samples. Example (about 6 minutes at the defaults on a busy 2-core CPU):

  TFDS_DATA_DIR=../shared/tensorflow_datasets_small \\
  MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=4294967296 \\
  MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=268435456 \\
  python benchmarks/attackers.py --samples=16
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

from ounl_jax import data as data_lib
from ounl_jax import evaluation
from ounl_jax import models
from ounl_jax import service as service_lib
from ounl_jax.attacks import label_only
from ounl_jax.attacks import pushing
from ounl_jax.attacks import unlearning_gradient as ug


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--workdir", default=None,
                      help="Restore the server model of an experiments.pushing "
                           "workdir instead of training one.")
  parser.add_argument("--samples", type=int, default=16)
  parser.add_argument("--class_a", default="airplane")
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--width", type=int, default=16)
  parser.add_argument("--zoo_max_iterations", type=int, default=100,
                      help="0 keeps ZOO's default (20,000).")
  parser.add_argument("--label_only_iterations", type=int, default=20)
  parser.add_argument("--label_only_directions", type=int, default=64)
  parser.add_argument("--start_images", type=int, default=64)
  parser.add_argument("--held_out", type=int, default=64,
                      help="The attacker's other class-A images (its objective).")
  parser.add_argument("--ug_steps", type=int, default=30)
  parser.add_argument("--ug_learning_rate", type=float, default=0.01)
  parser.add_argument("--surrogate_epochs", type=int, default=10)
  parser.add_argument("--skip", default="",
                      help="Comma-separated attackers to skip: zoo, label_only, "
                           "white_box, transfer.")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="Optional JSON summary path.")
  return parser.parse_args()


def server_model(args, data_dir):
  """(model, variables, splits): restored from --workdir or trained here."""
  if args.workdir:
    from experiments import common  # pylint: disable=g-import-not-at-top
    from experiments import training  # pylint: disable=g-import-not-at-top
    with open(os.path.join(args.workdir, "train_metrics.json")) as f:
      saved = json.load(f)["config"]
    fields = common.TrainConfig.__dataclass_fields__
    config = common.TrainConfig(**{k: v for k, v in saved.items() if k in fields})
    splits = training.load_splits(config, data_dir)
    trained = training.train_or_restore(config, args.workdir, splits,
                                        show_progress=False)
    return trained.model, trained.variables, splits
  splits = data_lib.load("cifar10", data_dir=data_dir, seed=args.seed)
  model = models.get_model("vgg3", num_classes=10, width=args.width)
  # The same fixed-epoch recipe as the server's training (AMSGrad, batch 64).
  variables = ug.train_surrogate(model, splits.train.images, splits.train.labels,
                                 jax.random.key(args.seed), epochs=args.epochs)
  return model, variables, splits


def query_stats(queries: np.ndarray) -> dict:
  return {"median": float(np.median(queries)), "mean": float(np.mean(queries)),
          "max": int(np.max(queries))}


def after_unlearning(model, variables, splits, class_a, images, labels, seed):
  """Test-set metrics after a fresh first-order server unlearns (images, labels)."""
  server = service_lib.UnlearningService(model, variables, splits.test,
                                         key=jax.random.key(88 + seed))
  if len(labels):
    server.unlearn(service_lib.UnlearningRequest(images, labels))
  report = server.evaluate(class_a).report
  return {"class_a_accuracy": float(report.class_a_accuracy),
          "accuracy": float(report.accuracy)}


def main():
  args = parse_args()
  skip = {s for s in args.skip.split(",") if s}
  data_dir = args.data_dir or data_lib.default_data_dir()
  started = time.perf_counter()
  model, variables, splits = server_model(args, data_dir)
  train_seconds = time.perf_counter() - started
  spec = data_lib.get_spec("cifar10")
  class_a = data_lib.class_index(spec, args.class_a)
  train = splits.train
  predicted = evaluation.predict_labels(model, variables, train.images)
  own_a = np.flatnonzero(train.labels == class_a)
  correct = own_a[predicted[own_a] == class_a]
  chosen = correct[:args.samples]
  held_out = np.setdiff1d(own_a, chosen)[:args.held_out]
  others = np.flatnonzero(train.labels != class_a)[:args.start_images]
  images, labels = train.images[chosen], train.labels[chosen]
  key = jax.random.key(args.seed)

  def server(output="probabilities"):
    return service_lib.UnlearningService(model, variables, splits.test,
                                         key=jax.random.key(88), output=output)

  rows = [{"method": "before unlearning", "submitted": 0,
           **after_unlearning(model, variables, splits, class_a, images[:0],
                              labels[:0], args.seed)},
          {"method": "normal unlearning (clean samples)", "submitted": len(labels),
           **after_unlearning(model, variables, splits, class_a, images, labels,
                              args.seed)}]

  def add(method, submission: pushing.Pushed, seconds, queries=None):
    sub_images, sub_labels, _ = submission.successful()
    ok = submission.success
    row = {"method": method, "submitted": len(sub_labels),
           "success_rate": float(ok.mean()), "seconds": seconds,
           "queries": None if queries is None else query_stats(queries),
           "mean_l2": float(submission.l2[ok].mean()) if ok.any() else None,
           "status": collections.Counter(submission.status.tolist()),
           **after_unlearning(model, variables, splits, class_a, sub_images,
                              sub_labels, args.seed)}
    rows.append(row)

  if "zoo" not in skip:
    settings = pushing.PushSettings()
    if args.zoo_max_iterations:
      settings = dataclasses.replace(settings, zoo=dataclasses.replace(
          settings.zoo, max_iterations=args.zoo_max_iterations))
    t = time.perf_counter()
    result = pushing.push(server().oracle(), images, labels, jax.random.fold_in(
        key, 1), settings)
    seconds = time.perf_counter() - t
    add("ZOO Pushing-I", result.pushing_i, seconds, result.queries)
    add("ZOO Pushing-II", result.pushing_ii, seconds, result.queries)

  if "label_only" not in skip:
    settings = label_only.LabelOnlySettings(
        max_iterations=args.label_only_iterations,
        directions=args.label_only_directions)
    t = time.perf_counter()
    result = label_only.label_only_push(server("labels").oracle(), images, labels,
                                        jax.random.fold_in(key, 2), settings,
                                        start_images=train.images[others])
    seconds = time.perf_counter() - t
    add("label-only Pushing-I", result.pushing_i, seconds, result.queries)
    add("label-only Pushing-II", result.pushing_ii, seconds, result.queries)

  settings = ug.UnlearningGradientSettings(steps=args.ug_steps,
                                           learning_rate=args.ug_learning_rate)
  if "white_box" not in skip:
    t = time.perf_counter()
    result = ug.unlearning_gradient_attack(model, variables, images, labels,
                                           train.images[held_out],
                                           jax.random.fold_in(key, 3), settings)
    add("gradient through unlearning (white-box)", result.submission,
        time.perf_counter() - t)

  if "transfer" not in skip:
    t = time.perf_counter()
    surrogate_model = model  # The attacker guesses the architecture, not weights.
    surrogate = ug.train_surrogate(surrogate_model, splits.valid.images,
                                   splits.valid.labels, jax.random.fold_in(key, 4),
                                   epochs=args.surrogate_epochs)
    result = ug.unlearning_gradient_attack(surrogate_model, surrogate, images,
                                           labels, train.images[held_out],
                                           jax.random.fold_in(key, 5), settings)
    add("gradient through unlearning (transfer)", result.submission,
        time.perf_counter() - t)

  clean_a = rows[1]["class_a_accuracy"]
  print(f"\nServer: {model.name} ({'restored' if args.workdir else 'trained'} in "
        f"{train_seconds:.0f} s), {args.samples} requested / {len(labels)} correctly "
        f"classified {args.class_a} samples, test set of {len(splits.test)}.\n")
  print("| method | submitted | success | mean L2 | queries median / mean / max "
        "| attack s | class-A acc | overall acc | class-A gap vs normal |")
  print("|---|---|---|---|---|---|---|---|---|")
  for row in rows:
    queries = row.get("queries")
    q = ("-" if queries is None else
         f"{queries['median']:.0f} / {queries['mean']:.0f} / {queries['max']}")
    success = ("-" if "success_rate" not in row
               else f"{100 * row['success_rate']:.0f}%")
    seconds = "-" if "seconds" not in row else f"{row['seconds']:.1f}"
    gap = clean_a - row["class_a_accuracy"]
    l2 = "-" if row.get("mean_l2") is None else f"{row['mean_l2']:.2f}"
    print(f"| {row['method']} | {row['submitted']} | {success} | {l2} | {q} | "
          f"{seconds} | "
          f"{100 * row['class_a_accuracy']:.1f}% | {100 * row['accuracy']:.1f}% | "
          f"{100 * gap:+.1f} |")
  failures = {row["method"]: {k: v for k, v in row["status"].items() if k != "ok"}
              for row in rows if "status" in row}
  failures = {k: v for k, v in failures.items() if v}
  if failures:
    print(f"\nFailed samples by status: {failures}")
  print("\nQueries per sample include the clean and verification queries. "
        "Class-A gap: normal unlearning's class-A accuracy minus this row's "
        "(positive = over-unlearning).")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"args": vars(args), "rows": rows, "train_seconds": train_seconds},
                f, indent=2)


if __name__ == "__main__":
  main()

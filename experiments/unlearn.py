"""Normal unlearning of a fraction of one class (paper Sec. IV, Fig. 5, Tables IV/XII).

``python -m experiments.unlearn --dataset=cifar10 --unlearn_class=airplane
--fraction=0.1 --method=first_order --workdir=DIR [--scale=smoke|cpu|paper]``

Reuses the model checkpointed in ``DIR`` (or trains it, as ``experiments.train``),
selects a seeded ``fraction`` of class A's training samples (docs/protocol.md §4: 400 /
2,000 CIFAR-10 airplanes for 10% / 50% at paper scale), submits them with their true
labels to the unlearning service and writes ``DIR/unlearn_results.json``: overall,
per-class and class-A test accuracy before and after, and class A's prediction
histogram (docs/protocol.md §11), with config, seeds and run metadata.
"""

from __future__ import annotations

import dataclasses
import os

from absl import flags
import jax

from experiments import common
from experiments import training
from experiments import validation
from ounl_jax import data as data_lib
from ounl_jax import service as service_lib
from ounl_jax import unlearning

FLAGS = flags.FLAGS
common.define_common_flags({"workdir": "./runs/unlearn"})
flags.DEFINE_string("unlearn_class", None,
                    "Class A whose samples are unlearned (name or index); the "
                    "paper's class of the dataset if unset (CIFAR-10 airplane).")
flags.DEFINE_float("fraction", 0.1, "Fraction of class A's training samples "
                   "submitted (the paper's 0.1 and 0.5).")
flags.DEFINE_enum("method", "first_order", list(unlearning.METHODS),
                  "The server's unlearning method.")
flags.DEFINE_integer("unlearn_seed", 88, "Seeds the unlearn-set selection "
                     "(released code default 88).")
flags.DEFINE_integer("server_seed", 0, "Seeds the server's unlearning noise (the "
                     "same key as the pushing and blending experiments).")
flags.DEFINE_float("tau", None, "first_order / gradient_ascent: unlearning rate "
                   "(default 2e-4, the released code; Warnecke CIFAR 2e-5).")
flags.DEFINE_integer("steps", None, "first_order / gradient_ascent: steps (1).")
flags.DEFINE_enum("reduction", None, ["sum", "mean"],
                  "first_order / gradient_ascent: gradient reduction (sum).")
flags.DEFINE_enum("scope", None, ["head", "all"],
                  "first_order / gradient_ascent: updated parameters (head).")
flags.DEFINE_enum("replacement", None, ["noise", "black", "white", "none"],
                  "first_order: irrelevant samples (noise).")
flags.DEFINE_bool("reference_code", True, "first_order: the released code's "
                  "update, noise term dropped on full gradient batches "
                  "(docs/protocol.md §5), as the pushing experiments; "
                  "--noreference_code: Eq. 13 as written.")
flags.DEFINE_integer("reference_batch_size", None, "first_order with "
                     "--reference_code: the gradient batch (released 256).")
flags.DEFINE_float("finetune_learning_rate", None, "fine_tune: SGD rate (0.01).")
flags.DEFINE_integer("finetune_epochs", None, "fine_tune: epochs (1).")
flags.DEFINE_string("results_name", "unlearn_results.json",
                    "File name of the results inside --workdir.")

# Flag name -> settings field, for the flags each method reads.
_SETTING_FLAGS = {
    "tau": "tau", "steps": "steps", "reduction": "reduction", "scope": "scope",
    "replacement": "replacement", "reference_code": "reference_code",
    "reference_batch_size": "reference_batch_size",
    "finetune_learning_rate": "learning_rate", "finetune_epochs": "epochs",
}


def settings_from_flags(method: str):
  """The method's default settings, overridden by the flags given for it."""
  settings = unlearning.default_settings(method)
  fields = {f.name for f in dataclasses.fields(settings)}
  overrides = {}
  for flag, field in _SETTING_FLAGS.items():
    value = FLAGS[flag].value
    if value is None:
      continue
    if field not in fields:
      if FLAGS[flag].present:
        raise common.UserError(f"--{flag} does not apply to --method={method}.")
      continue
    overrides[field] = value
  return dataclasses.replace(settings, **overrides)


def evaluation_dict(result: service_lib.ServiceEvaluation,
                    spec: data_lib.DatasetSpec) -> dict:
  out = result.report.to_dict(spec.class_names)
  if result.histogram is not None:
    out["class_a_histogram"] = dict(zip(spec.class_names,
                                        result.histogram.tolist()))
  return out


def main(argv):
  del argv
  common.quiet_logs()
  config = common.train_config_from_flags()
  spec = validation.check_train(config)
  class_a = validation.check_class("unlearn_class",
                                   FLAGS.unlearn_class or spec.class_a, spec)
  if not 0 < FLAGS.fraction <= 1:
    raise common.UserError(f"--fraction={FLAGS.fraction}: must be in (0, 1].")
  try:
    settings = settings_from_flags(FLAGS.method)
  except ValueError as error:
    raise common.UserError(str(error)) from None
  validation.check_workdir(FLAGS.workdir)
  splits = training.load_splits(config, FLAGS.data_dir)
  trained = training.train_or_restore(config, FLAGS.workdir, splits,
                                      show_progress=FLAGS.progress)
  unlearn_set = data_lib.select_unlearn_set(splits.train, class_a, FLAGS.fraction,
                                            FLAGS.unlearn_seed)
  server = service_lib.UnlearningService(
      trained.model, trained.variables, splits.test,
      key=jax.random.key(FLAGS.server_seed), method=FLAGS.method,
      settings=settings)
  before = server.evaluate(class_a)
  receipt = server.unlearn(service_lib.UnlearningRequest(unlearn_set.images,
                                                         unlearn_set.labels))
  after = server.evaluate(class_a)
  results = {
      "dataset": config.dataset,
      "unlearn_class": spec.class_names[class_a],
      "fraction": FLAGS.fraction,
      "num_unlearned": len(unlearn_set),
      "class_train_samples": int((splits.train.labels == class_a).sum()),
      "unlearned_ids": unlearn_set.ids,
      "method": FLAGS.method,
      "settings": dataclasses.asdict(settings),
      "seeds": {"train": config.seed, "unlearn": FLAGS.unlearn_seed,
                "server": FLAGS.server_seed},
      "receipt": dataclasses.asdict(receipt),
      "clean_class_a_correct": int(before.histogram.sum()),
      "before": evaluation_dict(before, spec),
      "after": evaluation_dict(after, spec),
      "splits": data_lib.describe(splits),
      **common.run_metadata({"train": config.to_dict(),
                             "unlearn": {"method": FLAGS.method,
                                         "fraction": FLAGS.fraction,
                                         "unlearn_class": spec.class_names[class_a],
                                         "unlearn_seed": FLAGS.unlearn_seed,
                                         "server_seed": FLAGS.server_seed,
                                         "settings": dataclasses.asdict(settings)}}),
  }
  path = common.write_json(os.path.join(FLAGS.workdir, FLAGS.results_name), results)
  b, a = before.report, after.report
  print(f"{FLAGS.method} unlearning of {len(unlearn_set)} "
        f"{spec.class_names[class_a]} samples ({receipt.seconds:.1f}s): "
        f"class-A accuracy {b.class_a_accuracy:.4f} -> {a.class_a_accuracy:.4f}, "
        f"overall {b.accuracy:.4f} -> {a.accuracy:.4f}")
  print(path)


if __name__ == "__main__":
  common.run_main(main)

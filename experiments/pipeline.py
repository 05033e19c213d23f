"""The paper's experiment, step by step, shared by every experiment script.

1. Train (or reuse) the server's model (``training.train_or_restore``).
2. Select the malicious user's samples: a seeded ``fraction`` of class A's training
   samples (docs/protocol.md §4), capped at ``max_samples`` at reduced scales.
3. Modify them through the black-box oracle only (pushing with ZOO, or blending).
4. For every condition, a fresh server holding the clean model unlearns the submitted
   samples (same server key, so the same noise / relabelling) and is evaluated on its
   test set. ``normal`` submits the same training ids unmodified, with their true
   labels (the paired baseline).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any, NamedTuple

from absl import flags
import jax
import numpy as np

from experiments import attackers
from experiments import common
from experiments import pushes
from experiments import training
from ounl_jax import data as data_lib
from ounl_jax import service as service_lib
from ounl_jax import unlearning
from ounl_jax.attacks import blending as blending_lib
from ounl_jax.attacks import pushing as pushing_lib
from ounl_jax.attacks import zoo

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class AttackConfig:
  """Everything of an over-unlearning run beyond the trained model."""

  unlearn_class: str | None = None     # None: the paper's class A of the dataset.
  fraction: float = 0.1
  sample_rule: str = "released"        # experiments/pushes.py SAMPLE_RULES.
  attack: str = "zoo"                  # experiments/attackers.py ATTACKS.
  max_samples: int | None = None       # Cap on the user's samples (reduced scales).
  unlearning: str = "first_order"
  tau: float | None = None             # None: the method's default (2e-4).
  reduction: str | None = None
  scope: str | None = None
  reference_code: bool = True         # The released noise regime (README).
  reference_batch_size: int | None = None
  finetune_epochs: int | None = None
  finetune_learning_rate: float | None = None
  # Pushing.
  target_class: str | None = None      # Targeted pushing (Tables V-VI).
  max_iterations: int = 20000
  iterations_per_chunk: int = 100
  sample_chunk_size: int = 64
  pushing_i: str = "last"
  pushing_ii: str = "first_crossing"
  label_mode: str = "original"
  max_l2: float = 20.0
  # Blending.
  blend_class: str | None = None       # None: the paper's class B of the dataset.
  blend_ratio: float = 0.3
  blend_label_mode: str = "prediction"
  blend_pool: str = "valid"            # Data the user holds: valid or test split.
  # Seeds.
  unlearn_seed: int = 88               # Sample selection (released --random_seed).
  attack_seed: int = 1216              # ZOO coordinates / class-B draws.
  server_seed: int = 0                 # The server's noise and relabelling.

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def define_attack_flags() -> None:
  flags.DEFINE_string("unlearn_class", None,
                      "Class A whose samples the user owns (default: the paper's, "
                      "airplane / apple).")
  flags.DEFINE_float("fraction", 0.1, "Fraction of class A's training samples the "
                     "user owns and asks to unlearn (paper: 0.1 and 0.5).")
  flags.DEFINE_integer("max_samples", None,
                       "Cap on the number of samples (preset if unset).")
  flags.DEFINE_enum("attack", "zoo", list(attackers.ATTACKS),
                    "Black-box attacker: zoo (the paper's, released settings), "
                    "zoo_directions (query-efficient ZOO), label_only (labels "
                    "only).")
  flags.DEFINE_enum("sample_rule", "released", list(pushes.SAMPLE_RULES),
                    "released: push class-A samples until N = fraction x class A "
                    "are pushed, submit those N (the authors' code); "
                    "fraction_first: draw the fraction, drop the failures.")
  flags.DEFINE_enum("unlearning", "first_order", list(unlearning.METHODS),
                    "The server's unlearning method.")
  flags.DEFINE_float("tau", None, "First-order unlearning rate (default 2e-4, "
                     "the released code; Warnecke's CIFAR value is 2e-5).")
  flags.DEFINE_enum("reduction", None, ["sum", "mean"], "First-order gradient "
                    "reduction (default sum, as the released code).")
  flags.DEFINE_enum("scope", None, ["head", "all"], "First-order parameter scope "
                    "(default head, as the released code).")
  flags.DEFINE_bool("reference_code", True, "The released code's first-order "
                    "update: the noise term is dropped on full gradient batches "
                    "(docs/protocol.md §5), the regime behind the paper's numbers "
                    "(default). --noreference_code: Eq. 13 as written.")
  flags.DEFINE_integer("reference_batch_size", None, "With --reference_code: the "
                       "gradient batch whose full batches lose the noise term "
                       "(released 256; smaller keeps the released share at "
                       "smaller N).")
  flags.DEFINE_integer("finetune_epochs", None, "Fine-tune unlearning epochs (1).")
  flags.DEFINE_float("finetune_learning_rate", None, "Fine-tune SGD rate (0.01).")
  flags.DEFINE_string("target_class", None, "Targeted pushing towards this class "
                      "(Tables V-VI); untargeted when unset.")
  flags.DEFINE_integer("max_iterations", None, "ZOO iterations (preset if unset).")
  flags.DEFINE_integer("iterations_per_chunk", None,
                       "ZOO iterations per compiled call (preset if unset).")
  flags.DEFINE_integer("sample_chunk_size", 64, "Samples pushed at once (memory).")
  flags.DEFINE_enum("pushing_i", "last", list(pushing_lib.PUSHING_I),
                    "Pushing-I selection: last (paper) or largest_l2 (code).")
  flags.DEFINE_enum("pushing_ii", "first_crossing", list(pushing_lib.PUSHING_II),
                    "Pushing-II selection: first_crossing (paper) or smallest_l2 "
                    "(released code).")
  flags.DEFINE_enum("label_mode", "original", ["original", "prediction", "target"],
                    "Submitted label of pushed samples (docs/protocol.md §9; released "
                    "default original).")
  flags.DEFINE_float("max_l2", 20.0, "L2 bound on the pushing perturbation.")
  flags.DEFINE_string("blend_class", None, "Class B blended in (default: the "
                      "paper's, cat / orange).")
  flags.DEFINE_float("blend_ratio", 0.3, "Blending ratio r, the weight on the "
                     "class-B image (Eq. 1's lambda = 1 - r).")
  flags.DEFINE_enum("blend_label_mode", "prediction",
                    ["prediction", "original", "target"],
                    "Submitted label of blended samples (paper: prediction).")
  flags.DEFINE_enum("blend_pool", "valid", ["valid", "test"],
                    "Split the user draws class-B images from (never the server's "
                    "training data).")
  flags.DEFINE_integer("unlearn_seed", 88, "Seed of the sample selection.")
  flags.DEFINE_integer("attack_seed", 1216, "Seed of the attack.")
  flags.DEFINE_integer("server_seed", 0, "Seed of the server's unlearning noise.")


def attack_config_from_flags(**overrides) -> AttackConfig:
  scale = FLAGS.scale
  config = AttackConfig(
      unlearn_class=FLAGS.unlearn_class, fraction=FLAGS.fraction,
      sample_rule=FLAGS.sample_rule, attack=FLAGS.attack,
      reference_batch_size=FLAGS.reference_batch_size,
      max_samples=common.from_preset("max_samples", scale),
      unlearning=FLAGS.unlearning, tau=FLAGS.tau, reduction=FLAGS.reduction,
      scope=FLAGS.scope, reference_code=FLAGS.reference_code,
      finetune_epochs=FLAGS.finetune_epochs,
      finetune_learning_rate=FLAGS.finetune_learning_rate,
      target_class=FLAGS.target_class,
      max_iterations=common.from_preset("max_iterations", scale),
      iterations_per_chunk=common.from_preset("iterations_per_chunk", scale),
      sample_chunk_size=FLAGS.sample_chunk_size, pushing_i=FLAGS.pushing_i,
      pushing_ii=FLAGS.pushing_ii, label_mode=FLAGS.label_mode,
      max_l2=FLAGS.max_l2, blend_class=FLAGS.blend_class,
      blend_ratio=FLAGS.blend_ratio, blend_label_mode=FLAGS.blend_label_mode,
      blend_pool=FLAGS.blend_pool, unlearn_seed=FLAGS.unlearn_seed,
      attack_seed=FLAGS.attack_seed, server_seed=FLAGS.server_seed)
  return dataclasses.replace(config, **overrides)


class Context(NamedTuple):
  """The trained server model and its data."""

  spec: data_lib.DatasetSpec
  splits: data_lib.Splits
  trained: training.TrainedModel
  train_config: common.TrainConfig


def prepare(train_config: common.TrainConfig, workdir: str, *,
            data_dir: str | None = None, show_progress: bool = True) -> Context:
  """Loads the data and trains (or reuses) the server's model in ``workdir``."""
  spec = data_lib.get_spec(train_config.dataset)
  splits = training.load_splits(train_config, data_dir)
  trained = training.train_or_restore(train_config, workdir, splits,
                                      show_progress=show_progress)
  return Context(spec, splits, trained, train_config)


def class_a_of(spec: data_lib.DatasetSpec, config: AttackConfig) -> int:
  return data_lib.class_index(spec, config.unlearn_class or spec.class_a)


def user_samples(ctx: Context, config: AttackConfig) -> data_lib.LabelledImages:
  """The user's samples of class A (seeded; the same ids for every condition)."""
  chosen = data_lib.select_unlearn_set(ctx.splits.train, class_a_of(ctx.spec, config),
                                       config.fraction, seed=config.unlearn_seed)
  if config.max_samples is not None and len(chosen) > config.max_samples:
    keep = np.sort(np.random.default_rng(config.unlearn_seed).choice(
        len(chosen), config.max_samples, replace=False))
    chosen = chosen.take(keep)
  return chosen


def unlearning_settings(config: AttackConfig):
  """The server's method settings: the released defaults, then the given flags."""
  settings = unlearning.default_settings(config.unlearning)
  overrides = {"tau": config.tau, "reduction": config.reduction,
               "scope": config.scope,
               "reference_batch_size": config.reference_batch_size,
               "epochs": config.finetune_epochs,
               "learning_rate": config.finetune_learning_rate}
  fields = {f.name for f in dataclasses.fields(settings)}
  given = {k: v for k, v in overrides.items() if v is not None and k in fields}
  if "reference_code" in fields:
    given["reference_code"] = config.reference_code
  return dataclasses.replace(settings, **given)


def new_server(ctx: Context, config: AttackConfig, *,
               output: str = "probabilities") -> service_lib.UnlearningService:
  """A server holding the clean model (each condition starts from it)."""
  return service_lib.UnlearningService(
      ctx.trained.model, ctx.trained.variables, ctx.splits.test,
      key=jax.random.key(config.server_seed), method=config.unlearning,
      settings=unlearning_settings(config), output=output)


def condition_report(ctx: Context, server: service_lib.UnlearningService,
                     class_a: int, extra_classes: dict[str, int]) -> dict:
  evaluated = server.evaluate(class_a)
  names = ctx.spec.class_names
  report = evaluated.report
  result = {
      "overall_accuracy": report.accuracy,
      "per_class_accuracy": dict(zip(names, report.per_class_accuracy.tolist())),
      "class_a_accuracy": report.class_a_accuracy,
      "other_classes_accuracy": report.other_classes_accuracy,
      "histogram": {n: int(c) for n, c in zip(names, evaluated.histogram)},
      "histogram_total": int(np.sum(evaluated.histogram)),
  }
  for role, index in extra_classes.items():
    result[f"{role}_accuracy"] = float(report.per_class_accuracy[index])
  return result


def run_condition(ctx: Context, config: AttackConfig, images, labels, class_a: int,
                  extra_classes: dict[str, int]) -> dict:
  """A fresh clean server unlearns (images, labels); its test-set report."""
  server = new_server(ctx, config)
  result = {}
  if images is not None:
    receipt = server.unlearn(service_lib.UnlearningRequest(images, labels))
    result = {"num_submitted": receipt.num_samples,
              "unlearn_seconds": receipt.seconds}
  result.update(condition_report(ctx, server, class_a, extra_classes))
  return result


def run_summary(ctx: Context, config: AttackConfig, experiment: str, class_a: int,
                user_samples_count: int, submitted_count: int) -> dict:
  """What every over-unlearning results file starts with."""
  settings = unlearning_settings(config)
  noise_share = (unlearning.noise_term_count(submitted_count, settings)
                 / max(submitted_count, 1)
                 if isinstance(settings, unlearning.FirstOrderSettings) else None)
  final = ctx.trained.metrics["final"]
  return {
      "experiment": experiment,
      "dataset": ctx.spec.name,
      "data_note": ("CIFAR-10 (JPEG-q75 copy)" if ctx.spec.name == "cifar10"
                    else ctx.spec.name),
      "class_a": ctx.spec.class_names[class_a],
      "unlearning": config.unlearning,
      "unlearning_settings": dataclasses.asdict(settings),
      "user_samples": user_samples_count,
      "noise_term_share": noise_share,
      "clean_model": {"train_accuracy": final["train"]["accuracy"],
                      "test_accuracy": final["test"]["accuracy"],
                      "num_params": ctx.trained.metrics["num_params"]},
  }


# ----------------------------------------------------------------------------------
# Pushing


def push_settings(config: AttackConfig, spec: data_lib.DatasetSpec):
  target = (None if config.target_class is None
            else data_lib.class_index(spec, config.target_class))
  zoo_settings = zoo.ZooSettings(
      max_iterations=config.max_iterations,
      iterations_per_chunk=config.iterations_per_chunk,
      sample_chunk_size=config.sample_chunk_size)
  return pushing_lib.PushSettings(zoo=zoo_settings, target_class=target,
                                  pushing_i=config.pushing_i,
                                  pushing_ii=config.pushing_ii,
                                  max_l2=config.max_l2, label_mode=config.label_mode)


def _array_digest(*arrays) -> str:
  digest = hashlib.sha256()
  for array in arrays:
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()[:16]


def push_fingerprint(ctx: Context, config: AttackConfig,
                     candidates: data_lib.LabelledImages) -> str:
  """Identifies a push: model weights, candidate ids and pixels, every setting."""
  leaves = jax.tree_util.tree_leaves(ctx.trained.variables)
  # The paper's attacker keeps the fingerprint pushes had before --attack existed.
  attacker = {} if config.attack == "zoo" else {"attack": config.attack}
  # Released-rule blocks do not depend on N; a fraction_first push does.
  size = ({"block_size": pushes.block_size(config.max_samples)}
          if config.sample_rule == "released" else
          {"fraction": config.fraction, "max_samples": config.max_samples})
  return pushes.fingerprint({**attacker,
      "train": ctx.train_config.to_dict(),
      "model": _array_digest(*[np.asarray(leaf) for leaf in leaves]),
      "candidates": _array_digest(candidates.ids, candidates.images),
      "sample_rule": config.sample_rule, **size,
      "settings": dataclasses.asdict(push_settings(config, ctx.spec)),
      "attack_seed": config.attack_seed, "unlearn_seed": config.unlearn_seed})


def push_for(ctx: Context, config: AttackConfig, workdir: str, *,
             show_progress: bool = True) -> dict:
  """The user's push under ``config.sample_rule`` (reused when saved)."""
  class_a = class_a_of(ctx.spec, config)
  settings = push_settings(config, ctx.spec)
  pool = getattr(ctx.splits, config.blend_pool)
  attack = attackers.make(config.attack, settings, attackers.start_images(
      pool.images, pool.labels, class_a, settings.target_class))
  oracle = lambda: new_server(ctx, config, output=attack.oracle_output).oracle()
  key = jax.random.key(config.attack_seed)
  if config.sample_rule == "released":
    candidates = pushes.candidate_order(ctx.splits.train, class_a,
                                        config.unlearn_seed)
    requested = pushes.requested_count(ctx.splits.train, class_a, config.fraction,
                                       config.max_samples)
    store = pushes.block_cache(workdir, push_fingerprint(ctx, config, candidates))
    return pushes.latest(workdir, pushes.push_released(
        oracle(), candidates, requested, key, attack,
        target_class=settings.target_class,
        size=pushes.block_size(config.max_samples), block_store=store,
        show_progress=show_progress))
  candidates = user_samples(ctx, config)
  run = lambda: pushes.push_fraction_first(oracle(), candidates, key, attack,
                                           show_progress=show_progress)
  return pushes.cached_push(workdir, push_fingerprint(ctx, config, candidates), run)


def run_pushing(ctx: Context, config: AttackConfig, workdir: str, *,
                show_progress: bool = True) -> dict:
  """Clean, normal, Pushing-I and Pushing-II on the same training ids (Sec. V-B)."""
  spec = ctx.spec
  class_a = class_a_of(spec, config)
  pushed = push_for(ctx, config, workdir, show_progress=show_progress)
  # Paired: the same ids are submitted in every condition, so the conditions
  # differ only in what the user did to the images.
  rows = pushes.submitted_rows(pushed, int(pushed["requested"]))
  if not len(rows):
    raise common.UserError(
        "No sample was pushed by both Pushing-I and Pushing-II, so nothing can be "
        "submitted; raise --max_iterations or --max_l2, or use a larger --fraction.")
  extra = {}
  if config.target_class is not None:
    extra["target_class"] = data_lib.class_index(spec, config.target_class)
  started = time.time()
  submissions = {
      "normal": (pushed["original"][rows], pushed["original_labels"][rows]),
      "pushing_i": (pushed["pushing_i"][rows], pushed["pushing_i_labels"][rows]),
      "pushing_ii": (pushed["pushing_ii"][rows], pushed["pushing_ii_labels"][rows]),
  }
  conditions = {"clean": run_condition(ctx, config, None, None, class_a, extra)}
  for name, (images, labels) in submissions.items():
    conditions[name] = run_condition(ctx, config, images, labels, class_a, extra)
  requested = int(pushed["requested"])
  return {
      **run_summary(ctx, config, "pushing", class_a, requested, len(rows)),
      "target_class": config.target_class,
      "sample_rule": config.sample_rule,
      "attacker": config.attack,
      "requested": requested,
      "short_by": requested - len(rows),
      "submitted_ids": pushed["ids"][rows],
      "conditions": conditions,
      "attack": pushes.statistics(pushed),
      "timings": {"unlearn_and_evaluate_seconds": time.time() - started,
                  "attack_seconds": float(pushed["seconds"])},
  }


# ----------------------------------------------------------------------------------
# Blending


def run_blending(ctx: Context, config: AttackConfig) -> dict:
  """Clean, normal and Blending on the same training ids (Sec. V-A, Table III)."""
  spec = ctx.spec
  class_a = class_a_of(spec, config)
  class_b = data_lib.class_index(spec, config.blend_class or spec.class_b)
  samples = user_samples(ctx, config)
  pool = getattr(ctx.splits, config.blend_pool)
  oracle = new_server(ctx, config).oracle()
  settings = blending_lib.BlendSettings(class_b=class_b, ratio=config.blend_ratio,
                                        label_mode=config.blend_label_mode)
  started = time.time()
  blended = blending_lib.blending_attack(
      oracle, samples.images, samples.labels, jax.random.key(config.attack_seed),
      pool.images, pool.labels, settings)
  attack_seconds = time.time() - started
  extra = {"class_b": class_b}
  conditions = {
      "clean": run_condition(ctx, config, None, None, class_a, extra),
      "normal": run_condition(ctx, config, samples.images, samples.labels, class_a,
                              extra),
      "blending": run_condition(ctx, config, blended.images, blended.labels,
                                class_a, extra),
  }
  labels, counts = np.unique(blended.labels, return_counts=True)
  return {
      **run_summary(ctx, config, "blending", class_a, len(samples), len(samples)),
      "class_b": spec.class_names[class_b],
      "blend_ratio": config.blend_ratio,
      "submitted_ids": samples.ids,
      "conditions": conditions,
      "attack": {"submitted_label_counts": {spec.class_names[int(l)]: int(c)
                                            for l, c in zip(labels, counts)},
                 "queries": int(blended.queries.sum()),
                 "attack_seconds": attack_seconds},
      "timings": {"attack_seconds": attack_seconds},
  }


def stamp(results: dict, train_config: common.TrainConfig,
          config: AttackConfig) -> dict:
  """Adds the full config, seeds, versions and commit to a results dict."""
  return {**results, **common.run_metadata({"train": train_config.to_dict(),
                                            "attack": config.to_dict()})}

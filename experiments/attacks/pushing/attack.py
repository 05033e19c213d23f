"""The pushing attacks (Sec. III-C, V-B): a push under a sample rule, its submissions.

Whatever pusher the attack's spec holds (``experiments/attacks/registry.py``), the user
pushes class-A samples under the sample rule (``experiments/attacks/pushing/sample_rules.py``) through
the oracle only, and submits Pushing-I and Pushing-II of the same training ids as
``normal`` (paired conditions, docs/protocol.md §4, §9).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import NamedTuple

import jax
import numpy as np

from experiments.run import errors
from experiments.run import stop_signal
from experiments.setup import configs
from experiments.run import pipeline
from experiments.attacks.pushing import artefact
from experiments.attacks.pushing import cache
from experiments.attacks.pushing import pushers
from experiments.attacks.pushing import blocks
from experiments.attacks.pushing import partial
from experiments.attacks.pushing import released_rule
from experiments.attacks.pushing import sample_rules
from ounl_jax import data as data_lib
from ounl_jax import devices
from ounl_jax import oracle as oracle_lib
from ounl_jax.attacks import pushing as pushing_lib


def push_settings(config: configs.ExperimentConfig, spec: data_lib.DatasetSpec
                  ) -> pushing_lib.PushSettings:
  """The config's ``PushSettings`` with the target class as an index."""
  target = config.attack.target_class
  return dataclasses.replace(
      config.attack.push,
      target_class=None if target is None else data_lib.class_index(spec, target))


def _array_digest(*arrays) -> str:
  digest = hashlib.sha256()
  for array in arrays:
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()[:16]


def _trajectory_settings(settings: pushing_lib.PushSettings) -> dict:
  """The settings that decide a sample's trajectory: not how many samples or
  iterations share a compiled call (scheduling only; a sample draws from its own
  key, docs/protocol.md §19)."""
  fields = dataclasses.asdict(settings)
  for name in ("iterations_per_chunk", "sample_chunk_size"):
    fields["zoo"].pop(name)
  return fields


def push_fingerprint(ctx: pipeline.Context, config: configs.ExperimentConfig,
                     candidates: data_lib.LabelledImages) -> str:
  """Identifies a push: model weights, candidate ids and pixels, every setting."""
  leaves = jax.tree_util.tree_leaves(ctx.trained.variables)
  samples = config.samples
  # The paper's attacker keeps the fingerprint pushes had before --attack existed.
  attacker = {} if config.attack.name == "zoo" else {"attack": config.attack.name}
  # Released-rule blocks do not depend on N; a fraction_first push does.
  size = ({"block_size": blocks.block_size(samples.max_samples)}
          if samples.rule == "released" else
          {"fraction": samples.fraction, "max_samples": samples.max_samples})
  return cache.fingerprint({**attacker,
      "train": ctx.train_config.to_dict(),
      "model": _array_digest(*[np.asarray(leaf) for leaf in leaves]),
      "candidates": _array_digest(candidates.ids, candidates.images),
      "sample_rule": samples.rule, **size,
      "settings": _trajectory_settings(push_settings(config, ctx.spec)),
      "attack_seed": config.attack.seed, "unlearn_seed": samples.seed})


class _ReleasedPush(NamedTuple):
  """What a push under the released rule needs (``_released``)."""

  oracle: object
  candidates: data_lib.LabelledImages
  requested: int
  key: jax.Array
  pusher: pushers.Pusher
  target_class: int | None
  size: int
  store: cache.BlockCache
  keep: partial.Keep


def _keep(ctx: pipeline.Context, workdir: str, key: str) -> partial.Keep:
  """The push's finished samples on disk (``partial.py``) and its deadline."""
  return partial.Keep(partial.PartialPush(workdir, key), ctx.deadline)


def _pusher_and_oracle(ctx, config, attack_spec):
  class_a = pipeline.class_a_of(ctx.spec, config)
  settings = push_settings(config, ctx.spec)
  pool = getattr(ctx.splits, config.samples.pool)
  pusher = attack_spec.pusher(settings, pushers.start_images(
      pool.images, pool.labels, class_a, settings.target_class))
  oracle = pipeline.new_server(ctx, config,
                               output=attack_spec.oracle_output).oracle()
  return class_a, settings, pusher, oracle


def _released(ctx, config, workdir: str, attack_spec) -> _ReleasedPush:
  class_a, settings, pusher, oracle = _pusher_and_oracle(ctx, config, attack_spec)
  samples = config.samples
  candidates = sample_rules.candidate_order(ctx.splits.train, class_a, samples.seed)
  requested = sample_rules.requested_count(ctx.splits.train, class_a,
                                           samples.fraction, samples.max_samples)
  key = push_fingerprint(ctx, config, candidates)
  return _ReleasedPush(oracle, candidates, requested,
                       jax.random.key(config.attack.seed), pusher,
                       settings.target_class,
                       blocks.block_size(samples.max_samples),
                       cache.block_cache(workdir, key), _keep(ctx, workdir, key))


@stop_signal.listening()  # SIGTERM stops the push cleanly (its samples saved).
def push_for(ctx: pipeline.Context, config: configs.ExperimentConfig, workdir: str,
             attack_spec, *, show_progress: bool = True) -> dict:
  """The user's push under ``config.samples.rule`` (reused when saved; an
  interrupted push resumes from its finished samples, ``partial.py``, and stops
  at ``ctx.deadline`` with ``errors.TimeBudgetReached``)."""
  if config.samples.rule == "released":
    push = _released(ctx, config, workdir, attack_spec)
    return cache.latest(workdir, released_rule.push_released(
        push.oracle, push.candidates, push.requested, push.key, push.pusher,
        target_class=push.target_class, size=push.size, store=push.store,
        show_progress=show_progress, keep=push.keep))
  _, _, pusher, oracle = _pusher_and_oracle(ctx, config, attack_spec)
  candidates = pipeline.user_samples(ctx, config)
  key = push_fingerprint(ctx, config, candidates)
  keep = _keep(ctx, workdir, key)
  run = lambda: sample_rules.push_fraction_first(
      oracle, candidates, jax.random.key(config.attack.seed), pusher,
      show_progress=show_progress, keep=keep)
  pushed = cache.cached_push(workdir, key, run)
  keep.prune(np.arange(len(candidates)))   # Saved whole now.
  return pushed


@stop_signal.listening()
def push_block_for(ctx: pipeline.Context, config: configs.ExperimentConfig,
                   workdir: str, attack_spec, block: int, end: int) -> dict:
  """Pushes block ``block``'s queue positions before ``end`` into the workdir's
  block cache (the released rule's blocks, ``released_rule.push_block``): what
  the grid engine runs as one task (``experiments/run/grid.py``)."""
  push = _released(ctx, config, workdir, attack_spec)
  return released_rule.push_block(push.oracle, push.candidates, push.key,
                                  push.pusher, target_class=push.target_class,
                                  size=push.size, store=push.store, block=block,
                                  end=end, keep=push.keep)


def throughput(ctx: pipeline.Context, settings: pushing_lib.PushSettings,
               pushed: dict) -> dict | None:
  """The push's oracle images/s beside this process's raw forward images/s.

  Only the samples pushed by this process count (saved ones were timed by
  another). The attack's rate leaves out the seconds JAX spent compiling during the
  push, as the forward baseline (compiled, then timed) does; ``ratio_with_compiling``
  keeps them. The forward baseline is the server's softmax on one ZOO call's batch,
  ``sample_chunk_size * queries_per_iteration`` images (``devices.
  forward_images_per_second``). None when every sample was reused.
  """
  if "pushed_now" not in pushed or int(pushed["pushed_now"]) == 0:
    return None
  queries = int(pushed["push_queries"])
  seconds = float(pushed["seconds"])
  zoo_settings = settings.zoo_settings()
  mesh = devices.sample_mesh()
  count = devices.round_up(min(zoo_settings.sample_chunk_size, len(pushed["ids"])),
                           mesh)
  batch = jax.random.uniform(
      jax.random.key(0), (count * zoo_settings.queries_per_iteration,)
      + tuple(ctx.spec.image_shape), minval=-0.5, maxval=0.5)
  forward = devices.forward_images_per_second(
      oracle_lib.Softmax(ctx.trained.model.apply), ctx.trained.variables, batch,
      iterations=2, rounds=2, mesh=mesh)
  compiling = float(pushed.get("compile_seconds", 0.0))
  attack = queries / max(seconds - compiling, 1e-9)
  with_compiling = queries / max(seconds, 1e-9)
  return {"attack_queries_per_second": attack, "forward_images_per_second": forward,
          "ratio": attack / forward, "compile_seconds": compiling,
          "attack_queries_per_second_with_compiling": with_compiling,
          "ratio_with_compiling": with_compiling / forward,
          "samples_timed": int(pushed["pushed_now"]),
          "slot_occupancy": artefact.slot_occupancy(pushed),
          "devices": len(jax.devices()), "forward_batch": int(batch.shape[0])}


def pushing(ctx: pipeline.Context, config: configs.ExperimentConfig, workdir: str,
            attack_spec, *, show_progress: bool = True) -> pipeline.Submissions:
  """Clean, normal, Pushing-I and Pushing-II on the same training ids (Sec. V-B)."""
  pushed = push_for(ctx, config, workdir, attack_spec, show_progress=show_progress)
  # Paired: the same ids are submitted in every condition, so the conditions
  # differ only in what the user did to the images.
  requested = int(pushed["requested"])
  rows = artefact.submitted_rows(pushed, requested)
  if not len(rows):
    raise errors.UserError(
        "No sample was pushed by both Pushing-I and Pushing-II, so nothing can be "
        "submitted; raise --max_iterations or --max_l2, or use a larger --fraction.")
  target = config.attack.target_class
  extra = ({} if target is None
           else {"target_class": data_lib.class_index(ctx.spec, target)})
  fields = {"target_class": target, "sample_rule": config.samples.rule,
            "attacker": config.attack.name, "requested": requested,
            "short_by": requested - len(rows), "submitted_ids": pushed["ids"][rows],
            "throughput": throughput(ctx, push_settings(config, ctx.spec), pushed)
            if config.attack.name == "zoo" else None}
  return pipeline.Submissions(
      "pushing", artefact.submissions(pushed, rows), artefact.statistics(pushed),
      fields,
      extra, requested, len(rows), pushed["ids"], float(pushed["seconds"]))

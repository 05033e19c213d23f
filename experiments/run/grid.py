"""A table's grid as stages: what the grid engines run (``experiments/run/engines.py``).

A grid of points (``experiments.reproduce``) is three kinds of stage, so that
nothing is done twice and independent work can run side by side:

- ``train``: the server's model, once per model folder
  (``training.train_or_restore``);
- ``push``: one block of a push shared by points, once per push and block. Under
  the released rule queue position p draws from its own key (``blocks.sample_keys``,
  docs/protocol.md §4), so the blocks are independent
  (``push_attack.push_block_for``);
- ``point``: a grid point's attack and unlearn-and-evaluate
  (``runner.run_experiment``), which reads the pushed blocks; it writes the point's
  results.json, and the report is assembled from those files.

Every stage runs through ``stages.execute``, which records it in ``WORKDIR/grid``
(``events.jsonl``, and ``done/<stage>.json`` once finished, so a rerun skips it).
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

from experiments.attacks import registry
from experiments.attacks.pushing import blocks
from experiments.attacks.pushing import cache
from experiments.attacks.pushing import released_rule
from experiments.attacks.pushing import sample_rules
from experiments.run import pipeline
from experiments.run import stages
from experiments.setup import configs
from ounl_jax import data as data_lib


class Point(NamedTuple):
  """A grid point: its name, full config, results folder and model folder."""

  name: str
  config: configs.ExperimentConfig
  directory: str
  model_dir: str


class Stage(NamedTuple):
  """One task of the graph: ``kind`` with ``args``, after the stages ``needs``."""

  name: str
  kind: str  # stages.STAGE_KINDS
  needs: tuple[str, ...]
  fingerprint: str
  args: tuple
  outputs: tuple[str, ...] = ()  # Files a finished stage leaves.


def _stage_name(kind: str, text: str) -> str:
  return f"{kind}-{text}".replace(os.sep, "--")


def _push_group(config: configs.ExperimentConfig) -> str | None:
  """Points with one group share a push's blocks (None: the point pushes itself)."""
  if (config.samples.rule != "released"
      or not registry.get(config.attack.name).pushes):
    return None
  settings = dataclasses.asdict(config.attack)
  for name in ("iterations_per_chunk", "sample_chunk_size"):  # Scheduling only.
    settings["push"]["zoo"].pop(name, None)
  return cache.fingerprint({
      "train": config.train.to_dict(), "attack": settings,
      "samples": {k: getattr(config.samples, k)
                  for k in ("seed", "rule", "unlearn_class", "pool")},
      "block_size": blocks.block_size(config.samples.max_samples)})


def _requested(config: configs.ExperimentConfig, data_dir: str | None) -> int:
  train = stages.splits(config.train, data_dir).train
  class_a = pipeline.class_a_of(data_lib.get_spec(config.train.dataset), config)
  return sample_rules.requested_count(train, class_a, config.samples.fraction,
                                      config.samples.max_samples)


def _push_stages(group: str, members: list[Point], train: str,
                 data_dir: str | None) -> list[Stage]:
  """A group's blocks, the positions its largest point needs (spares included),
  then ``push_rest``, which pushes what failures left short."""
  largest = max(members, key=lambda p: _requested(p.config, data_dir))
  config, model_dir = largest.config, largest.model_dir
  positions = released_rule.spare(_requested(config, data_dir))
  size = blocks.block_size(config.samples.max_samples)
  stages = [Stage(_stage_name("push", f"{group[:8]}-block-{b:04d}"), "push",
                  (train,), cache.fingerprint({"group": group, "end": min(
                      (b + 1) * size, positions)}),
                  (config, model_dir, data_dir, b, min((b + 1) * size, positions)))
            for b in range(-(-positions // size))]
  return stages + [Stage(
      _stage_name("push", f"{group[:8]}-rest"), "push_rest",
      tuple(s.name for s in stages), cache.fingerprint(
          {"group": group, "positions": positions}),
      (config, model_dir, data_dir))]


def plan(points: list[Point], workdir: str, data_dir: str | None,
         command: str = "") -> list[Stage]:
  """The stages of ``points`` in an order that runs (needs first); ``command``,
  the command line that asked for them, goes into each point's results."""
  trains, groups = {}, {}
  for point in points:
    key = (point.model_dir, point.config.train)
    if key not in trains:
      model = os.path.relpath(point.model_dir, workdir)
      trains[key] = Stage(
          _stage_name("train", "model" if model == "." else model),
          "train", (), cache.fingerprint({"train": point.config.train.to_dict(),
                                          "model_dir": point.model_dir}),
          (point.config.train, point.model_dir, data_dir),
          (os.path.join(point.model_dir, "train_metrics.json"),))
    group = _push_group(point.config)
    if group is not None:
      groups.setdefault((key, group), []).append(point)
  pushes = {k: _push_stages(k[1], members, trains[k[0]].name, data_dir)
            for k, members in groups.items()}
  stages = list(trains.values()) + [s for group in pushes.values() for s in group]
  for point in points:
    key = (point.model_dir, point.config.train)
    push = pushes.get((key, _push_group(point.config)))
    needs = (trains[key].name,) + ((push[-1].name,) if push else ())
    stages.append(Stage(
        _stage_name("point", os.path.relpath(point.directory, workdir)),
        "point", needs, cache.fingerprint(point.config.to_dict()),
        (point.config, point.directory, point.model_dir, data_dir, command),
        (os.path.join(point.directory, "results.json"),)))
  return stages

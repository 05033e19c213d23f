"""What a grid's stages do (``grid.py`` plans them), and their records.

``execute(root, stage)`` runs one stage: it appends ``start``, ``done`` or
``failed`` (with the node and pid) to ``ROOT/events.jsonl`` and, once the stage has
finished, writes ``ROOT/done/<stage>.json`` with its fingerprint, so a rerun skips
it (``is_done``). Every file a stage writes is written atomically (a unique
temporary, then a rename): a stage killed half way leaves nothing that counts.
A worker process keeps the data and the model between the stages it runs.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
import time

from experiments.attacks import registry
from experiments.attacks.pushing import attack as push_attack
from experiments.run import errors
from experiments.run import pipeline
from experiments.run import records
from experiments.run import runner
from experiments.run import training
from experiments.setup import configs
from ounl_jax import data as data_lib


@functools.lru_cache(maxsize=2)
def splits(train_config: configs.TrainConfig, data_dir: str | None):
  """The data, once per process."""
  return training.load_splits(train_config, data_dir)


@functools.lru_cache(maxsize=2)
def _context(train_config: configs.TrainConfig, model_dir: str,
             data_dir: str | None) -> pipeline.Context:
  """The trained model and its data, once per process (a worker runs many stages)."""
  data = splits(train_config, data_dir)
  trained = training.train_or_restore(train_config, model_dir, data,
                                      show_progress=False)
  return pipeline.Context(data_lib.get_spec(train_config.dataset), data, trained,
                          train_config)


def _train(train_config, model_dir, data_dir, show_progress) -> dict:
  trained = training.train_or_restore(train_config, model_dir,
                                      splits(train_config, data_dir),
                                      show_progress=show_progress)
  return {"test_accuracy": trained.metrics["final"]["test"]["accuracy"]}


def _push(config, model_dir, data_dir, block, end, show_progress) -> dict:
  del show_progress  # A block is one stream; the grid's bar counts blocks.
  ctx = _context(config.train, model_dir, data_dir)
  return push_attack.push_block_for(ctx, config, model_dir,
                                    registry.get(config.attack.name), block, end)


def _push_rest(config, model_dir, data_dir, show_progress) -> dict:
  """After the blocks: the shortfall of the group's largest point, if more of its
  positions failed than the spares cover (``released_rule.push_released`` reads
  the saved blocks and pushes only what is missing)."""
  ctx = _context(config.train, model_dir, data_dir)
  pushed = push_attack.push_for(ctx, config, model_dir,
                                registry.get(config.attack.name),
                                show_progress=show_progress)
  return {"rows": int(pushed["pushed_now"]), "queries": int(pushed["push_queries"])}


def _point(config, directory, model_dir, data_dir, command, show_progress) -> dict:
  path = os.path.join(directory, "results.json")
  if os.path.exists(path):
    saved = records.read_json(path)
    if saved.get("config") == records.to_jsonable(config.to_dict()):
      return {"reused": True}
  ctx = _context(config.train, model_dir, data_dir)
  os.makedirs(directory, exist_ok=True)
  results = runner.run_experiment(ctx, config, model_dir, show_progress=show_progress)
  runner.write_results({**results, "command": command}, directory)
  return {"reused": False, "pushed_now": int(results["attack"].get("pushed_now", 0))}


STAGE_KINDS = {"train": _train, "push": _push, "push_rest": _push_rest,
               "point": _point}


def node() -> str:
  """This process's node: Ray's node id inside a Ray worker, else the host name."""
  ray = sys.modules.get("ray")
  if ray is not None and ray.is_initialized():
    return ray.get_runtime_context().get_node_id()[:12]
  return socket.gethostname()


def log_event(root: str, stage: str, event: str, **fields) -> None:
  """Appends one line to ``events.jsonl`` (one write, so lines never interleave)."""
  os.makedirs(root, exist_ok=True)
  line = json.dumps({"time": time.time(), "stage": stage, "event": event,
                     "node": node(), "host": socket.gethostname(),
                     "pid": os.getpid(), **fields}) + "\n"
  with open(os.path.join(root, "events.jsonl"), "a") as f:
    f.write(line)


def read_events(root: str) -> list[dict]:
  path = os.path.join(root, "events.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def _done_path(root: str, name: str) -> str:
  return os.path.join(root, "done", f"{name}.json")


def is_done(root: str, stage) -> bool:
  """Finished by an earlier run with the same fingerprint, its outputs there."""
  path = _done_path(root, stage.name)
  if not os.path.exists(path) or not all(map(os.path.exists, stage.outputs)):
    return False
  try:
    return records.read_json(path).get("fingerprint") == stage.fingerprint
  except Exception:  # pylint: disable=broad-except
    return False  # Unreadable: run the stage again.


def one_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[-1] if text else ''}"


def execute(root: str, stage, show_progress: bool = False) -> dict:
  """Runs ``stage``, logging it; records it as done once it has finished."""
  log_event(root, stage.name, "start", kind=stage.kind)
  started = time.time()
  try:
    record = STAGE_KINDS[stage.kind](*stage.args, show_progress)
  except errors.TimeBudgetReached as stop:  # Saved; the next run goes on.
    log_event(root, stage.name, "stopped", kind=stage.kind, error=one_line(stop))
    raise
  except BaseException as error:
    log_event(root, stage.name, "failed", kind=stage.kind, error=one_line(error))
    raise
  # The peak of the process that ran it: a Ray worker serves several stages, so
  # it is that worker's peak so far; locally, the whole grid's so far.
  record = {**record, "seconds": time.time() - started, "node": node(),
            "host_peak_rss_mib": records.host_peak_rss_mib()}
  records.write_json(_done_path(root, stage.name),
                     {"stage": stage.name, "fingerprint": stage.fingerprint,
                      "record": record})
  log_event(root, stage.name, "done", kind=stage.kind, seconds=record["seconds"],
            host_peak_rss_mib=record["host_peak_rss_mib"])
  return record

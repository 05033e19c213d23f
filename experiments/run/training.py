"""Train the server's model (or reuse it), with checkpoints, resume and metrics.

Workdir layout (WORKSPACE.md): ``checkpoints/train`` holds one checkpoint per epoch
(state, best weights, early-stopping state), ``checkpoints/model`` the final
early-stopped model, ``train_metrics.json`` the history and final accuracies.
"""

from __future__ import annotations

import os
import time
from typing import Any, NamedTuple

import jax
import numpy as np

from experiments.run import data_guard
from experiments.run import errors
from experiments.run import progress
from experiments.run import records
from experiments.setup import configs
from ounl_jax import checkpoint
from ounl_jax import data as data_lib
from ounl_jax import models
from ounl_jax import train as train_lib


class TrainedModel(NamedTuple):
  model: models.Model
  variables: Any
  metrics: dict


def load_splits(config: configs.TrainConfig,
                data_dir: str | None = None) -> data_lib.Splits:
  return data_lib.load(config.dataset, data_dir=data_dir, seed=config.seed,
                       max_train_per_class=config.max_train_per_class,
                       max_test_per_class=config.max_test_per_class)


def build_model(config: configs.TrainConfig) -> models.Model:
  spec = data_lib.get_spec(config.dataset)
  return models.get_model(config.model, num_classes=spec.num_classes,
                          input_shape=spec.image_shape, width=config.width)


def learning_rate(config: configs.TrainConfig) -> float:
  if config.learning_rate is not None:
    return config.learning_rate
  return data_lib.get_spec(config.dataset).learning_rate


def split_report(trained_eval, split: data_lib.LabelledImages,
                 spec: data_lib.DatasetSpec) -> dict:
  per_class = train_lib.per_class_accuracy(trained_eval.predictions,
                                           split.labels, spec.num_classes)
  return {"loss": trained_eval.loss, "accuracy": trained_eval.accuracy,
          "per_class_accuracy": dict(zip(spec.class_names, per_class.tolist()))}


def _checkpoint_tree(state, best_variables, stopping, epoch) -> dict:
  return {"state": state, "best_variables": best_variables,
          "best_loss": np.float32(stopping.best_loss),
          "best_epoch": np.int32(stopping.best_epoch),
          "epochs_since_best": np.int32(stopping.epochs_since_best),
          "epoch": np.int32(epoch)}


def _resume(epoch_dir: str, history_path: str, state, best_variables, stopping):
  """The newest intact epoch checkpoint (and history), or the fresh start."""
  history: list[dict] = []
  start_epoch = 0
  resumed = checkpoint.restore_newest_intact(
      epoch_dir, _checkpoint_tree(state, best_variables, stopping, 0))
  if resumed is not None:
    for skipped in resumed.skipped:
      print(f"checkpoint {skipped.step} is corrupt ({skipped.reason}); resuming "
            f"from {resumed.step}", flush=True)
    tree = resumed[1]
    state, best_variables = tree["state"], tree["best_variables"]
    stopping = train_lib.EarlyStoppingState(
        float(tree["best_loss"]), int(tree["best_epoch"]),
        int(tree["epochs_since_best"]))
    start_epoch = int(tree["epoch"]) + 1
    retrain = (f"Restore it, or delete {os.path.dirname(history_path)}/"
               "checkpoints/train and train_history.json to train again from the "
               "first epoch (resuming without it would lose the history).")
    if not os.path.exists(history_path):
      raise errors.UserError(
          f"{history_path} is missing but the epoch checkpoints reach epoch "
          f"{start_epoch}. {retrain}")
    history = records.read_json(history_path, advice=retrain)[:start_epoch]
    if len(history) < start_epoch:
      raise errors.UserError(
          f"{history_path} holds {len(history)} epochs but the epoch checkpoints "
          f"reach epoch {start_epoch}. {retrain}")
  return state, best_variables, stopping, history, start_epoch


def _final_metrics(config, splits, spec, eval_fn, best_variables, stopping,
                   history) -> dict:
  """train_metrics.json: the final accuracies of the early-stopped model."""
  final = {}
  for name in ("train", "valid", "test"):
    split = getattr(splits, name)
    final[name] = split_report(
        train_lib.evaluate(eval_fn, best_variables, split.images, split.labels),
        split, spec)
  return {
      "dataset_note": ("CIFAR-10 (JPEG-q75 copy)" if config.dataset == "cifar10"
                       else config.dataset),
      "splits": data_lib.describe(splits),
      "num_params": models.count_params(best_variables["params"]),
      "learning_rate": learning_rate(config),
      "best_epoch": stopping.best_epoch,
      "epochs_run": len(history),
      "mean_epoch_seconds": (float(np.mean([h["epoch_seconds"] for h in history]))
                             if history else None),
      "history": history,
      "final": final,
      **records.run_metadata({"train": config.to_dict()}),
  }


def _epoch(config, splits, step_fn, eval_fn, state, best_variables, stopping,
           key, epoch: int, show_progress: bool):
  """One training epoch, its validation and early-stopping update."""
  num_batches = len(splits.train) // config.batch_size
  bar = progress.progress(total=num_batches, desc=f"epoch {epoch + 1}/{config.epochs}",
                        enabled=show_progress)
  started = time.time()
  state, train_metrics = train_lib.train_epoch(
      step_fn, state, splits.train.images, splits.train.labels, key,
      batch_size=config.batch_size, on_batch=lambda _: bar.update(1))
  epoch_seconds = time.time() - started
  bar.close()
  valid = train_lib.evaluate(eval_fn, state.variables, splits.valid.images,
                             splits.valid.labels)
  stopping, improved, stop = train_lib.early_stopping_update(
      stopping, valid.loss, epoch, patience=config.patience)
  if improved:
    best_variables = jax.tree_util.tree_map(np.asarray, state.variables)
  record = {"epoch": epoch, "train_loss": train_metrics["loss"],
            "train_accuracy": train_metrics["accuracy"],
            "valid_loss": valid.loss, "valid_accuracy": valid.accuracy,
            "epoch_seconds": epoch_seconds, "improved": improved}
  if show_progress:
    print(f"epoch {epoch + 1}: train loss {train_metrics['loss']:.4f} "
          f"acc {train_metrics['accuracy']:.4f} | valid loss {valid.loss:.4f} "
          f"acc {valid.accuracy:.4f} | {epoch_seconds:.1f}s"
          + (" *" if improved else ""), flush=True)
  return state, best_variables, stopping, stop, record


def train_or_restore(config: configs.TrainConfig, workdir: str,
                     splits: data_lib.Splits, *,
                     show_progress: bool = True) -> TrainedModel:
  """Trains with early stopping (App. B), resuming or reusing what ``workdir`` has.

  * A finished model for the same config is reused as is.
  * An interrupted training resumes from its last epoch checkpoint.
  * A workdir trained with another config fails with a clear message.
  """
  spec = data_lib.get_spec(config.dataset)
  model = build_model(config)
  data_guard.check_data_identity(workdir, config, splits)
  metrics_path = os.path.join(workdir, "train_metrics.json")
  model_dir = os.path.join(workdir, "checkpoints", "model")
  epoch_dir = os.path.join(workdir, "checkpoints", "train")
  variables = model.init(jax.random.fold_in(jax.random.key(config.seed), 0))

  if os.path.exists(metrics_path):
    saved = records.read_json(metrics_path)
    if saved.get("config", {}).get("train") != records.to_jsonable(config.to_dict()):
      raise errors.UserError(
          f"{workdir!r} holds a model trained with another configuration "
          f"({saved.get('config', {}).get('train')}); this run asks for "
          f"{config.to_dict()}. Use another --workdir, or the same flags.")
    restored = checkpoint.restore_latest(model_dir, variables)
    if restored is not None:
      return TrainedModel(model, restored[1], saved)

  optimizer = train_lib.amsgrad(learning_rate(config))
  step_fn = train_lib.make_train_step(model, optimizer)
  eval_fn = train_lib.make_eval_step(model)
  state = train_lib.init_train_state(variables, optimizer)
  history_path = os.path.join(workdir, "train_history.json")
  state, best_variables, stopping, history, start_epoch = _resume(
      epoch_dir, history_path, state, state.variables,
      train_lib.early_stopping_init())
  train_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  stop = stopping.epochs_since_best >= config.patience
  for epoch in range(start_epoch, config.epochs):
    if stop:
      break
    state, best_variables, stopping, stop, record = _epoch(
        config, splits, step_fn, eval_fn, state, best_variables, stopping,
        jax.random.fold_in(train_key, epoch), epoch, show_progress)
    history.append(record)
    # History first: a crash in between leaves it one epoch ahead, and resuming
    # trims it to the checkpoint.
    records.write_json(history_path, history)
    checkpoint.save(epoch_dir, epoch,
                    _checkpoint_tree(state, best_variables, stopping, epoch))

  metrics = _final_metrics(config, splits, spec, eval_fn, best_variables, stopping,
                           history)
  checkpoint.save(model_dir, 0, best_variables, max_to_keep=1)
  records.write_json(metrics_path, metrics)
  return TrainedModel(model, best_variables, metrics)

"""Train the server's model: ``python -m experiments.train --dataset=cifar10``.

Writes ``WORKDIR/train_metrics.json`` (per-epoch losses and accuracies, final
train/validation/test accuracy overall and per class, config, seed, versions, commit)
and checkpoints; an interrupted run resumes where it stopped.
"""

from absl import flags

from experiments.setup import cli
from experiments.run import progress
from experiments.setup import configs
from experiments.run import training
from experiments.setup import validation


def run(config: configs.TrainConfig, workdir: str, *, data_dir: str | None = None,
        show_progress: bool = True) -> training.TrainedModel:
  """Checks the config and the workdir, then trains (or reuses) the model."""
  progress.quiet_logs()
  validation.check_train(config)
  validation.check_workdir(workdir)
  splits = training.load_splits(config, data_dir)
  return training.train_or_restore(config, workdir, splits,
                                   show_progress=show_progress)


def main(argv, fv=flags.FLAGS):
  del argv
  config = cli.train_config(fv)
  trained = run(config, fv.workdir, data_dir=fv.data_dir, show_progress=fv.progress)
  final = trained.metrics["final"]
  print(f"{config.model} on {config.dataset}: {trained.metrics['num_params']:,} "
        f"parameters, best epoch {trained.metrics['best_epoch'] + 1}, "
        f"test accuracy {final['test']['accuracy']:.4f} "
        f"(valid {final['valid']['accuracy']:.4f}, train {final['train']['accuracy']:.4f})")
  print(f"{fv.workdir}/train_metrics.json")


if __name__ == "__main__":
  cli.define_common_flags(flags.FLAGS, workdir="./runs/train")
  cli.run_main(main)

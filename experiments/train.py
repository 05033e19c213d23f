"""Train the server's model: ``python -m experiments.train --dataset=cifar10``.

Writes ``WORKDIR/train_metrics.json`` (per-epoch losses and accuracies, final
train/validation/test accuracy overall and per class, config, seed, versions, commit)
and checkpoints; an interrupted run resumes where it stopped.
"""

from experiments import common
from experiments import training
from experiments import validation

FLAGS = common.FLAGS
common.define_common_flags({"workdir": "./runs/train"})


def main(argv):
  del argv
  common.quiet_logs()
  config = common.train_config_from_flags()
  validation.check_train(config)
  validation.check_workdir(FLAGS.workdir)
  splits = training.load_splits(config, FLAGS.data_dir)
  trained = training.train_or_restore(config, FLAGS.workdir, splits,
                                      show_progress=FLAGS.progress)
  final = trained.metrics["final"]
  print(f"{config.model} on {config.dataset}: {trained.metrics['num_params']:,} "
        f"parameters, best epoch {trained.metrics['best_epoch'] + 1}, "
        f"test accuracy {final['test']['accuracy']:.4f} "
        f"(valid {final['valid']['accuracy']:.4f}, train {final['train']['accuracy']:.4f})")
  print(f"{FLAGS.workdir}/train_metrics.json")


if __name__ == "__main__":
  common.run_main(main)

"""Table XII: pushing against fine-tune unlearning.

``python -m experiments.finetune`` is ``python -m experiments.pushing
--unlearning=fine_tune``: the server relabels the submitted samples at random among
the wrong classes and fine-tunes with SGD (docs/protocol.md §6).
"""

from absl import flags

from experiments.setup import cli
from experiments.run import runner


def main(argv):
  del argv
  runner.main(flags.FLAGS, unlearning="fine_tune")


if __name__ == "__main__":
  cli.define_experiment_flags(flags.FLAGS)
  cli.run_main(main)

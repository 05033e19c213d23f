"""Table XII: pushing against fine-tune unlearning.

``python -m experiments.finetune`` is ``python -m experiments.pushing
--unlearning=fine_tune``: the server relabels the submitted samples at random among
the wrong classes and fine-tunes with SGD (docs/protocol.md §6).
"""

from experiments import common
from experiments import runner


def main(argv):
  del argv
  print(runner.run("pushing", unlearning="fine_tune"))


if __name__ == "__main__":
  common.run_main(main)

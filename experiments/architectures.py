"""Tables VIII-IX: the attack on other architectures.

``python -m experiments.architectures --table=VIII`` (VGG-3 vs ResNet) or
``--table=IX`` (VGG with 3, 4 and 5 blocks) is ``experiments.reproduce`` with that
table: one model trained per architecture in ``WORKDIR/<model>``, pushing at 10%.
"""

from absl import flags

from experiments.setup import cli
from experiments import reproduce

if __name__ == "__main__":
  reproduce.define_flags(flags.FLAGS, table="VIII")
  cli.run_main(reproduce.main)

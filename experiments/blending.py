"""Blending (Sec. III-B, Eq. 1): ``python -m experiments.blending --dataset=cifar10``.

Blends each of the user's class-A samples with a class-B image the user holds (ratio
``--blend_ratio`` = the weight on the class-B image), submits it with the server's
predicted label, and compares the class-B accuracy (Over-unlearning-II) with normal
unlearning of the same samples. Covers Table III, Table VII (``--blend_ratio``),
Table XI, Fig. 8 (``--fraction``, ``--blend_class``). Writes WORKDIR/results.json,
results.md and figures; the last line printed is the path of results.json.
"""

from absl import flags

from experiments.setup import cli
from experiments.run import runner


def main(argv):
  del argv
  runner.main(flags.FLAGS, attack="blending")


if __name__ == "__main__":
  cli.define_experiment_flags(flags.FLAGS)
  cli.run_main(main)

"""The paper's core experiment: ``python -m experiments.pushing --dataset=cifar10``.

Trains (or reuses) the server's model, pushes a seeded fraction of class A's training
samples to the decision boundary with black-box ZOO (Pushing-I and Pushing-II, Sec.
III-C), has the server unlearn them and, separately, the same samples unmodified
(normal unlearning), and evaluates every model on the server's test set.

Covers Table IV and Fig. 5-7 (``--fraction=0.1|0.5``), Fig. 10 (``--fraction``),
Table X (``--unlearn_class=bird``), Tables V-VI (``--target_class=cat``) and Table XII
(``--unlearning=fine_tune``). Writes WORKDIR/results.json, results.md and figures;
the last line printed is the path of results.json.
"""

from absl import flags

from experiments.setup import cli
from experiments.run import runner


def main(argv):
  del argv
  runner.main(flags.FLAGS)


if __name__ == "__main__":
  cli.define_experiment_flags(flags.FLAGS)
  cli.define_time_budget_flag(flags.FLAGS)
  cli.run_main(main)

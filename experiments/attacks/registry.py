"""The attacks, chosen by name (``--attack``): each makes the user's submissions.

An attack is ``attack(ctx, config, workdir, *, show_progress) ->
pipeline.Submissions``: ``{condition: (images, labels)}`` (``normal`` first, the
same ids unmodified) plus its statistics; ``experiments.run.runner`` has a fresh
server unlearn and evaluate each submission (``pipeline.run_conditions``).

Every attack but one receives only the oracle (``pipeline.new_server(...).oracle()``):

* ``zoo``, ``zoo_directions``, ``label_only``: pushing (Sec. III-C) under the
  sample rule, with the pusher of ``experiments/attacks/pushing/pushers.py``;
* ``blending``: Eq. 1 (Sec. III-B);
* ``transfer``: gradient through unlearning against the user's own surrogate;
* ``unlearning_gradient``: **white-box**, it receives the server's model and
  parameters: the upper bound, breaking the black-box boundary on purpose.

Adding an attack is one module and one line here.

>>> sorted(ATTACKS)[:3]
['blending', 'label_only', 'transfer']
"""

from __future__ import annotations

from experiments.attacks import blending
from experiments.attacks import gradient
from experiments.attacks.pushing import attack

ATTACKS = {
    "zoo": attack.pushing,
    "zoo_directions": attack.pushing,
    "label_only": attack.pushing,
    "blending": blending.blending,
    "unlearning_gradient": gradient.white_box,
    "transfer": gradient.transfer,
}
# Attacks that push under a sample rule and share the push cache.
PUSHING = ("zoo", "zoo_directions", "label_only")

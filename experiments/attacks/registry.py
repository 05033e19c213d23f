"""The attacks, one ``AttackSpec`` each, chosen by name (``--attack``).

An attack makes the user's submissions, ``{condition: (images, labels)}``
(``normal`` first: the same ids unmodified), plus its statistics;
``experiments.run.runner`` has a fresh server unlearn and evaluate each
submission. There are two kinds:

* a **pusher** (``pusher`` set): pushes class-A samples towards the boundary
  under the sample rule (Sec. III-C; ``experiments/attacks/pushing/``), sharing
  the sample rules, the push cache, the conditions and the reports. Its factory
  ``pusher(settings, start_images) -> pushers.Pusher`` is its own maths only;
* any other attack (``submissions`` set): ``submissions(ctx, config, workdir, *,
  show_progress) -> pipeline.Submissions``.

Every attack but one receives only the oracle (``pipeline.new_server(...).oracle()``)
answering ``oracle_output``; ``unlearning_gradient`` is **white-box** (it receives
the server's model and parameters: the upper bound, breaking the black-box boundary
on purpose).

Registering is one call, from anywhere (research code included)::

    registry.register_attack(registry.AttackSpec(
        "my_pusher", "My pusher", pusher=make_my_pusher))

>>> sorted(ATTACKS)[:3]
['blending', 'label_only', 'transfer']
>>> [name for name, spec in ATTACKS.items() if spec.pushes]
['zoo', 'zoo_directions', 'label_only']
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from experiments.attacks import blending
from experiments.attacks import gradient
from experiments.attacks.pushing import attack as push_attack
from experiments.attacks.pushing import pushers
from ounl_jax import oracle as oracle_lib


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """Everything downstream code needs of an attack.

  Attributes:
    name: the registry key and ``--attack`` value.
    display_name: its name in reports and figures.
    pusher: ``pusher(push_settings, start_images) -> pushers.Pusher`` for an
      attack that pushes under the sample rule; None otherwise.
    submissions: ``submissions(ctx, config, workdir, *, show_progress)`` for an
      attack that is not a pusher; None for pushers.
    oracle_output: what the oracle answers it (``probabilities`` or ``labels``).
    white_box: it sees the server's parameters (an upper bound, not a user).
  """

  name: str
  display_name: str
  pusher: Callable[..., pushers.Pusher] | None = None
  submissions: Callable | None = None
  oracle_output: str = "probabilities"
  white_box: bool = False

  def __post_init__(self):
    if (self.pusher is None) == (self.submissions is None):
      raise ValueError(f"Attack {self.name!r}: give exactly one of pusher "
                       "(pushes under the sample rule) and submissions.")
    if self.oracle_output not in oracle_lib.OUTPUTS:
      raise ValueError(f"Attack {self.name!r}: oracle_output must be one of "
                       f"{oracle_lib.OUTPUTS}, got {self.oracle_output!r}.")

  @property
  def pushes(self) -> bool:
    """Pushes under the sample rule (shares the push cache and its reports)."""
    return self.pusher is not None

  def make_submissions(self, ctx, config, workdir: str, *, show_progress: bool):
    """The attack's ``pipeline.Submissions`` for ``config``."""
    if self.pushes:
      return push_attack.pushing(ctx, config, workdir, self,
                                 show_progress=show_progress)
    return self.submissions(ctx, config, workdir, show_progress=show_progress)


ATTACKS: dict[str, AttackSpec] = {}


def register_attack(spec: AttackSpec) -> AttackSpec:
  """Adds ``spec`` (its name must be new); ``--attack=NAME`` then runs it."""
  if spec.name in ATTACKS:
    raise ValueError(f"An attack named {spec.name!r} is already registered.")
  ATTACKS[spec.name] = spec
  return spec


def get(name: str) -> AttackSpec:
  """The registered attack ``name``; the error names the choices."""
  if name not in ATTACKS:
    raise ValueError(f"Unknown attack {name!r}; choose one of "
                     f"{', '.join(ATTACKS)}.")
  return ATTACKS[name]


for _spec in (
    AttackSpec("zoo", "ZOO (released settings)", pusher=pushers.zoo_pusher),
    AttackSpec("zoo_directions", "ZOO (random directions)",
               pusher=pushers.zoo_directions_pusher),
    AttackSpec("label_only", "Label-only pushing", pusher=pushers.label_only_pusher,
               oracle_output="labels"),
    AttackSpec("blending", "Blending", submissions=blending.blending),
    AttackSpec("unlearning_gradient", "Unlearning gradient (white-box)",
               submissions=gradient.white_box, white_box=True),
    AttackSpec("transfer", "Unlearning gradient (transfer)",
               submissions=gradient.transfer),
):
  register_attack(_spec)

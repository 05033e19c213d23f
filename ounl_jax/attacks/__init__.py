"""The malicious user's side (Sec. III): turn owned samples into an unlearning request
that makes the server over-unlearn, with black-box access only (an ``Oracle``).

* ``blending``: Sec. III-B, Eq. 1 (docs/protocol.md §10).
* ``zoo``: the black-box Carlini-Wagner attack by zeroth-order optimisation
  (Eq. 4-8; docs/protocol.md §8 and §12), from ``margins`` (Eq. 4-6, the loss),
  ``estimators`` (Eq. 7-8, coordinate and direction finite differences) and
  ``trajectory`` (the Pushing-I/II iterates).
* ``scheduler``: the host loop every pusher runs on (bounded batch, refilled
  slots, devices, progress, slot occupancy).
* ``pushing``: Pushing-I / Pushing-II from the ZOO trajectory (Sec. III-C;
  docs/protocol.md §8.2 and §16), and ``finish_push``, the verification and
  result of every pusher.
* ``labels``: the submitted-label modes (docs/protocol.md §9).
* ``label_only``: decision-based pushing on label answers (HopSkipJump-style).
* ``unlearning_gradient`` (import it as a module: it is white-box and needs the
  model): the attack that differentiates through the unlearning update.
"""

from ounl_jax.attacks.blending import BlendResult
from ounl_jax.attacks.blending import BlendSettings
from ounl_jax.attacks.blending import blend
from ounl_jax.attacks.blending import blending_attack
from ounl_jax.attacks.blending import draw_class_b
from ounl_jax.attacks.label_only import LabelOnlySettings
from ounl_jax.attacks.label_only import label_only_push
from ounl_jax.attacks.labels import LABEL_MODES
from ounl_jax.attacks.labels import oracle_predictions
from ounl_jax.attacks.labels import submitted_labels
from ounl_jax.attacks.pushing import PushResult
from ounl_jax.attacks.pushing import PushSettings
from ounl_jax.attacks.pushing import Pushed
from ounl_jax.attacks.pushing import push
from ounl_jax.attacks.scheduler import Progress
from ounl_jax.attacks.scheduler import Schedule
from ounl_jax.attacks.scheduler import Statistics
from ounl_jax.attacks.zoo import ZooSettings
from ounl_jax.attacks.zoo import zoo_attack
from ounl_jax.attacks.zoo import zoo_run_chunk
from ounl_jax.attacks.zoo import query_efficient_settings
from ounl_jax.attacks.zoo import zoo_step
from ounl_jax.attacks.zoo_state import ZooState
from ounl_jax.attacks.zoo_state import zoo_init

__all__ = (
    "BlendResult", "BlendSettings", "LABEL_MODES", "LabelOnlySettings",
    "PushResult", "PushSettings", "label_only_push", "query_efficient_settings",
    "Progress", "Pushed", "Schedule", "Statistics", "ZooSettings", "ZooState",
    "blend",
    "blending_attack", "draw_class_b", "oracle_predictions", "push",
    "submitted_labels", "zoo_attack", "zoo_init", "zoo_run_chunk", "zoo_step",
)

"""Defences against over-unlearning (paper Sec. VII), measured.

Screens run on a request before any unlearning; each module has a frozen settings
dataclass, ``fit(settings, ...)`` on what the server legitimately holds, and
``score(fitted, images, labels) -> (N,)`` (higher = more suspicious):

  hashing     registry of exact (sha256 of uint8) and perceptual (DCT pHash) hashes
              of the training images; unregistered = suspicious.
  margin      -(top-1 - top-2 probability) under the server's model: pushed
              samples sit at the decision boundary.
  membership  the submitted label's loss: a non-member-like sample is suspicious.

and one check after the tentative update:

  utility     refuse (roll back) when held-out accuracy, overall or of any class,
              falls more than a bound.

``screening`` holds what they share: ``calibrate`` (threshold at 1% false
rejection), ``roc_auc``, and ``Screen`` for ``UnlearningService(screens=...)``.

Defences that change what is unlearned rather than refusing (docs/defences.md):

  record_matching  unlearn the nearest stored record of the same label (low-pass
                   pixel space), refuse beyond a radius calibrated on JPEG copies.
  damage_bound     scale the update to the largest alpha keeping every class's
                   held-out drop within an envelope fitted on honest requests.
  healing          a bounded repair (clipped SGD, the unlearning's scope) on spare
                   records near the unlearned ones (arXiv 2507.10886).
"""

from ounl_jax.defences import damage_bound
from ounl_jax.defences import hashing
from ounl_jax.defences import healing
from ounl_jax.defences import margin
from ounl_jax.defences import membership
from ounl_jax.defences import record_matching
from ounl_jax.defences import screening
from ounl_jax.defences import utility
from ounl_jax.defences.screening import apply_screens
from ounl_jax.defences.screening import calibrate
from ounl_jax.defences.screening import flag_rate
from ounl_jax.defences.screening import roc_auc
from ounl_jax.defences.screening import Screen
from ounl_jax.defences.screening import ScreenOutcome


def hash_screen(registry: hashing.HashRegistry, threshold: float) -> Screen:
  """The registry as a service screen (exact: use threshold 0.5)."""
  kind = registry.settings.kind
  return Screen(f"{kind}_hash", lambda x, y: hashing.score(registry, x, y),
                threshold,
                "not found among the hashes of the training images" if kind ==
                "exact" else "no training image has a similar perceptual hash")


def margin_screen(detector: margin.MarginDetector, threshold: float) -> Screen:
  return Screen("margin", lambda x, y: margin.score(detector, x, y), threshold,
                "sits at the model's decision boundary (top-2 probabilities "
                "nearly equal), as pushed samples do")


def membership_screen(check: membership.MembershipCheck,
                      threshold: float | None = None) -> Screen:
  """The membership check as a screen (default: its member-calibrated threshold)."""
  return Screen("membership", lambda x, y: membership.score(check, x, y),
                check.threshold if threshold is None else threshold,
                "its loss under the submitted label is that of a sample the "
                "model was not trained on")


def record_matching_screen(index: record_matching.RecordIndex,
                           radius: float) -> Screen:
  """Record matching's refusal as a screen (score: distance to the nearest
  same-label record). The substitution of the stored records is the caller's:
  ``record_matching.match`` / ``matched_records``."""
  return Screen("record_matching",
                lambda x, y: record_matching.match_distance(index, x, y), radius,
                "no stored training record of its label is near enough")

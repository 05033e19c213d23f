"""Gradient ascent on the submitted samples ("NegGrad"), a data-free baseline.

theta_u = theta + tau * sum_i grad_theta L(z_i): Eq. 13 with no irrelevant samples
Z_hat (the released code's ``unlearn_type=4``, docs/protocol.md §5), which is also
what the released first-order code reduces to on full batches of 256 (section 5
"Likely bug"). Like the first-order update it needs only the submitted data, runs
BatchNorm in inference mode and by default uses the released code's tau, sum
reduction and head scope, so the two methods differ only in the noise term.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from ounl_jax import models
from ounl_jax.unlearning import first_order


@dataclasses.dataclass(frozen=True)
class GradientAscentSettings:
  """Settings of gradient ascent (names and defaults as ``FirstOrderSettings``).

  Attributes:
    tau: step size (released code 2e-4).
    steps: number of ascent steps.
    reduction: ``sum`` or ``mean`` of the per-sample gradients.
    scope: ``head`` or ``all`` parameters.
    batch_size: samples per gradient batch (memory only).
  """

  tau: float = 2e-4
  steps: int = 1
  reduction: str = "sum"
  scope: str = "head"
  batch_size: int = first_order.REFERENCE_BATCH_SIZE

  def as_first_order(self) -> first_order.FirstOrderSettings:
    """The equivalent first-order settings: no replacement samples."""
    return first_order.FirstOrderSettings(
        tau=self.tau, steps=self.steps, reduction=self.reduction,
        scope=self.scope, replacement="none", batch_size=self.batch_size)

  def __post_init__(self):
    self.as_first_order()  # Validates the shared settings.


@functools.partial(jax.jit, static_argnames=("model", "settings"))
def gradient_ascent_unlearn(model: models.Model, variables, images, labels,
                            key: jax.Array, *, settings: GradientAscentSettings):
  """Unlearns (images, labels) by gradient ascent on their loss.

  Args:
    model: the server's model.
    variables: ``{'params', 'batch_stats'}``; BatchNorm statistics are unchanged.
    images: submitted images (N, H, W, C) in [-0.5, 0.5].
    labels: submitted labels (N,).
    key: unused (the method is deterministic); kept for a uniform signature.
    settings: ``GradientAscentSettings``.

  Returns:
    The unlearned variables.
  """
  return first_order.first_order_unlearn(model, variables, images, labels, key,
                                         settings=settings.as_first_order())

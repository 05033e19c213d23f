"""ounl_jax: over-unlearning attacks on machine-unlearning services, in JAX.

Reproduces Hu et al., "A Duty to Forget, a Right to be Assured? Exposing
Vulnerabilities in Machine Unlearning Services" (NDSS 2024). The package is a library
of pure functions over pytrees; side effects live in ``experiments/``.

Modules:
  data        CIFAR-10/100 and STL-10 through TFDS, the paper's splits.
  models      The paper's VGG (3/4/5 blocks) and ResNet, returning logits.
  train       Jitted training/evaluation steps, early stopping.
  checkpoint  Orbax checkpoints with clear errors.
  oracle      The counted black-box prediction oracle the attacker receives.
"""

from ounl_jax import checkpoint
from ounl_jax import data
from ounl_jax import models
from ounl_jax import oracle
from ounl_jax import train

__version__ = "0.1.0"

"""ounl_jax: over-unlearning attacks on machine-unlearning services, in JAX.

Reproduces Hu et al., "A Duty to Forget, a Right to be Assured? Exposing
Vulnerabilities in Machine Unlearning Services" (NDSS 2024). The package is a library
of pure functions over pytrees; side effects live in ``experiments/``.

Modules:
  data          CIFAR-10/100 and STL-10 from TFDS ArrayRecord, the paper's splits.
  models        The paper's VGG (3/4/5 blocks) and ResNet, returning logits.
  train         Jitted training/evaluation steps, early stopping.
  checkpoint    Orbax checkpoints with clear errors.
  unlearning    Data-free unlearning: first-order (Eq. 13), fine-tune, NegGrad.
  service       The MLaaS server: predict / unlearn, and the oracle it hands out.
  oracle        The counted black-box prediction oracle the attacker receives.
  evaluation    Test-set accuracies and class-A prediction histograms.
  attacks       Blending (Eq. 1), ZOO (Eq. 4-8), Pushing-I / Pushing-II,
                label-only pushing, the gradient-through-unlearning attack.
  defences      Screens the paper only discusses (Sec. VII): hash registry,
                boundary margin, membership check, utility guard.
  stealthiness  SSIM and LPIPS of the modified samples (Table XIII).
"""

from ounl_jax import attacks
from ounl_jax import checkpoint
from ounl_jax import data
from ounl_jax import defences
from ounl_jax import evaluation
from ounl_jax import models
from ounl_jax import oracle
from ounl_jax import service
from ounl_jax import stealthiness
from ounl_jax import train
from ounl_jax import unlearning

__version__ = "0.1.0"

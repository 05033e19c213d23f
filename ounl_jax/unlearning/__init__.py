"""Data-free unlearning methods a server can run on a request (paper Sec. II, App. A).

Every method is a jitted pure function
``method(model, variables, images, labels, key, *, settings) -> new_variables`` with
its settings in a frozen dataclass, chosen by name from ``METHODS``:

* ``first_order``: Warnecke et al.'s update, Eq. 13 (docs/protocol.md §5, 7);
* ``fine_tune``: SGD on random wrong labels (App. C; docs/protocol.md §6);
* ``gradient_ascent``: ascent on the submitted samples' loss ("NegGrad").

Example (a tiny model; any ``models.Model`` works):

>>> import jax, numpy as np
>>> from ounl_jax import models, unlearning
>>> model = models.get_model("vgg3", num_classes=4, input_shape=(8, 8, 3), width=2)
>>> variables = model.init(jax.random.key(0))
>>> x_u, y_u = np.zeros((2, 8, 8, 3), np.float32), np.array([0, 1])
>>> new_variables = unlearning.unlearn("first_order", model, variables, x_u, y_u,
...                                    jax.random.key(88))
>>> sorted(new_variables)
['batch_stats', 'params']
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, NamedTuple

import jax

from ounl_jax import models
from ounl_jax.unlearning.fine_tune import FineTuneSettings
from ounl_jax.unlearning.fine_tune import fine_tune_labels
from ounl_jax.unlearning.fine_tune import fine_tune_unlearn
from ounl_jax.unlearning.fine_tune import random_wrong_labels
from ounl_jax.unlearning.first_order import FirstOrderSettings
from ounl_jax.unlearning.first_order import first_order_unlearn
from ounl_jax.unlearning.first_order import noise_term_count
from ounl_jax.unlearning.first_order import replacement_images
from ounl_jax.unlearning.first_order import replacement_weights
from ounl_jax.unlearning.gradient_ascent import GradientAscentSettings
from ounl_jax.unlearning.gradient_ascent import gradient_ascent_unlearn


class Method(NamedTuple):
  """An unlearning method: its jitted function and its settings class."""

  name: str
  unlearn: Callable[..., Any]
  settings_class: type


METHODS = {
    "first_order": Method("first_order", first_order_unlearn, FirstOrderSettings),
    "fine_tune": Method("fine_tune", fine_tune_unlearn, FineTuneSettings),
    "gradient_ascent": Method("gradient_ascent", gradient_ascent_unlearn,
                              GradientAscentSettings),
}


def get_method(name: str) -> Method:
  """The method by name; a clear error naming the choices otherwise."""
  key = name.lower().replace("-", "_")
  if key not in METHODS:
    close = difflib.get_close_matches(key, METHODS, n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    raise ValueError(f"Unknown unlearning method {name!r}.{hint} Choose one of: "
                     f"{', '.join(METHODS)}.")
  return METHODS[key]


def default_settings(name: str) -> Any:
  """The released code's settings of method ``name``."""
  return get_method(name).settings_class()


def unlearn(name: str, model: models.Model, variables, images, labels,
            key: jax.Array, settings: Any = None):
  """Runs the unlearning method ``name`` on (images, labels).

  Args:
    name: ``first_order``, ``fine_tune`` or ``gradient_ascent``.
    model: the server's model.
    variables: ``{'params', 'batch_stats'}``.
    images: submitted images (N, H, W, C) in [-0.5, 0.5].
    labels: submitted labels (N,).
    key: the method's randomness (noise, relabelling, shuffling, dropout).
    settings: the method's settings; None takes ``default_settings(name)``.

  Returns:
    The unlearned variables.

  Raises:
    ValueError: unknown method, or settings of another method.
  """
  method = get_method(name)
  settings = method.settings_class() if settings is None else settings
  if not isinstance(settings, method.settings_class):
    raise ValueError(f"Method {method.name!r} takes "
                     f"{method.settings_class.__name__}, got "
                     f"{type(settings).__name__}.")
  return method.unlearn(model, variables, images, labels, key, settings=settings)


__all__ = (
    "FineTuneSettings", "FirstOrderSettings", "GradientAscentSettings", "METHODS",
    "Method", "default_settings", "fine_tune_labels", "fine_tune_unlearn",
    "first_order_unlearn", "get_method", "noise_term_count", "gradient_ascent_unlearn",
    "random_wrong_labels", "replacement_images", "replacement_weights", "unlearn",
)

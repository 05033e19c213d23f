"""The server's unlearning methods, one ``unlearning.Method`` each (``--unlearning``).

The library's methods (``ounl_jax.unlearning.METHODS``: first_order, fine_tune,
gradient_ascent) are registered here; research code adds its own with one call::

    methods.register_method(unlearning.Method("my_method", my_unlearn,
                                              MySettings))

where ``my_unlearn(model, variables, images, labels, key, *, settings)`` returns
the new variables (the library's method signature). The server
(``ounl_jax.service.UnlearningService``) runs the ``Method`` it is given.

>>> list(METHODS)
['first_order', 'fine_tune', 'gradient_ascent']
"""

from __future__ import annotations

from ounl_jax import unlearning

METHODS: dict[str, unlearning.Method] = {}


def register_method(method: unlearning.Method) -> unlearning.Method:
  """Adds ``method`` (its name must be new); ``--unlearning=NAME`` then runs it."""
  if method.name in METHODS:
    raise ValueError(f"A method named {method.name!r} is already registered.")
  METHODS[method.name] = method
  return method


def get(name: str) -> unlearning.Method:
  """The registered method ``name``; the error names the choices."""
  if name not in METHODS:
    raise ValueError(f"Unknown unlearning method {name!r}; choose one of "
                     f"{', '.join(METHODS)}.")
  return METHODS[name]


for _method in unlearning.METHODS.values():
  register_method(_method)

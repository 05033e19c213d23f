"""Server-side protections that change what is unlearned, one ``ProtectionSpec`` each.

Screens (``screens.py``) refuse samples; a protection changes *what* the server
unlearns, or *how much* (docs/defences.md, "Server-side defences that change what
is unlearned"). ``fit(ctx, config, calibration, rate, *, request_size)`` returns a
``Protected``: ``unlearn(images, labels, *, start=None, request=0) -> (variables,
info)``, the server's parameters after the protected unlearning of one request
starting from ``start`` (default: the clean model ``ctx.trained.variables``), and
the ``details`` of the fit (radius, envelope, index bytes, fit seconds). The
unlearning itself is the server's own method and settings, keyed as the service
keys its request number ``request`` (``server_unlearn``). The defences study
(``experiments.defences``) measures every registered protection.

Registering is one call, from anywhere::

    protections.register_protection(protections.ProtectionSpec(
        "my_protection", "My protection", fit=fit_my_protection))

>>> sorted(PROTECTIONS)
['damage_bound', 'healing', 'record_matching', 'record_matching_damage_bound']
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from experiments.server import methods
from experiments.server import screens
from ounl_jax.defences import damage_bound
from ounl_jax.defences import healing
from ounl_jax.defences import record_matching

ENVELOPE_REQUESTS = 10    # Honest requests the damage bound's envelope is fit on.
SPARES_PER_SAMPLE = 4     # healing.select_spares' per_sample.


class Protected(NamedTuple):
  """A fitted protection: ``unlearn(images, labels, *, start, request)`` and its
  fit's ``details``."""

  unlearn: Callable[..., tuple[Any, dict]]
  details: dict


@dataclasses.dataclass(frozen=True)
class ProtectionSpec:
  """Attributes:
    name: the registry key (defences.json, defences.md).
    display_name: its name in defences.md and the figure.
    fit: ``fit(ctx, config, calibration, rate, *, request_size) -> Protected``;
      calibration: honest training samples the user does not own; rate: the
      server's false-rejection rate; request_size: the requests' size.
  """

  name: str
  display_name: str
  fit: Callable[..., Protected]


PROTECTIONS: dict[str, ProtectionSpec] = {}


def register_protection(spec: ProtectionSpec) -> ProtectionSpec:
  """Adds ``spec`` (its name must be new); the defences study then measures it."""
  if spec.name in PROTECTIONS:
    raise ValueError(f"A protection named {spec.name!r} is already registered.")
  PROTECTIONS[spec.name] = spec
  return spec


def server_unlearn(ctx, config, variables, images, labels, request: int = 0):
  """The server's own method and settings on (images, labels) from ``variables``,
  with the key ``UnlearningService`` gives its request number ``request``."""
  if not len(labels):
    return variables
  key = jax.random.fold_in(jax.random.key(config.server.seed), request)
  return jax.block_until_ready(methods.get(config.server.method).unlearn(
      ctx.trained.model, variables, np.asarray(images, np.float32),
      np.asarray(labels, np.int32), key, settings=config.server.settings()))


# A stage: ``select(images, labels) -> (images, labels, info)`` (what to unlearn)
# or ``after(start, unlearned, images, labels, request) -> (variables, info)``.

def compose(ctx, config, details: dict, select=None, after=None) -> Protected:
  """The protection running ``select``, the server's unlearning, then ``after``;
  ``info["seconds"]`` is the stages' time (the server's extra compute)."""

  def unlearn(images, labels, *, start=None, request: int = 0):
    start = ctx.trained.variables if start is None else start
    info, extra = {"submitted": int(len(labels)), "refused": 0}, 0.0
    if select is not None:
      began = time.perf_counter()
      images, labels, more = select(images, labels)
      extra += time.perf_counter() - began
      info.update(more)
    variables = server_unlearn(ctx, config, start, images, labels, request)
    if after is not None:
      began = time.perf_counter()
      variables, more = after(start, variables, images, labels, request)
      variables = jax.block_until_ready(variables)
      extra += time.perf_counter() - began
      info.update(more)
    return variables, {**info, "unlearned": int(len(labels)), "seconds": extra}
  return Protected(unlearn, details)


def _index(ctx) -> record_matching.RecordIndex:
  train = ctx.splits.train
  return record_matching.build_index(
      record_matching.MatchSettings(), train.images, train.labels,
      num_classes=ctx.spec.num_classes, record_ids=train.ids)


def _rows(ctx, ids: np.ndarray) -> np.ndarray:
  """Positions in ``ctx.splits.train`` of training-set ids."""
  order = np.argsort(ctx.splits.train.ids)
  return order[np.searchsorted(ctx.splits.train.ids, ids, sorter=order)]


def matching_stage(ctx, calibration, rate):
  """Record matching: refuse beyond the radius (calibrated at ``rate`` on JPEG
  copies of ``calibration``), unlearn the matched stored records instead."""
  began = time.perf_counter()
  index = _index(ctx)
  radius = record_matching.calibrate_radius(
      index, record_matching.reencode_jpeg(calibration.images),
      calibration.labels, rate=rate)
  train = ctx.splits.train

  def select(images, labels):
    matches = record_matching.match(index, images, labels, radius)
    rows = _rows(ctx, record_matching.matched_records(matches))
    return train.images[rows], train.labels[rows], {
        "refused": int((~matches.accepted).sum()),
        "unlearned_records": train.ids[rows].tolist()}
  return select, {"radius": float(radius), "index_bytes": int(index.nbytes),
                  "index_records": int(index.num_records),
                  "fit_seconds": time.perf_counter() - began}


def bound_stage(ctx, config, calibration, request_size: int):
  """Damage bound: the envelope of honest requests' per-class drops on the
  held-out split; each update scaled to stay within it, cumulatively from the
  clean model (``baseline_accuracy``), so splitting a request does not help."""
  began = time.perf_counter()
  model, clean, valid = ctx.trained.model, ctx.trained.variables, ctx.splits.valid
  drops = [damage_bound.class_drops(
      model, clean, server_unlearn(ctx, config, clean, r.images, r.labels),
      valid.images, valid.labels)
           for r in screens.honest_requests(
               calibration, request_size, ENVELOPE_REQUESTS, ctx.spec.num_classes,
               config.server.defence_seed)]
  settings = damage_bound.DamageBoundSettings()
  envelope = damage_bound.fit_envelope(np.stack(drops), settings)
  correct, totals = damage_bound.class_counts(model, clean, valid.images,
                                              valid.labels)
  baseline = np.asarray(correct) / np.maximum(np.asarray(totals), 1)

  def after(start, unlearned, images, labels, request):
    del images, labels, request
    bound = damage_bound.bound_update(model, start, unlearned, valid.images,
                                      valid.labels, envelope, settings=settings,
                                      baseline_accuracy=baseline)
    return bound.variables, {"alpha": bound.alpha, "within": bound.within}
  return after, {"envelope": envelope.tolist(),
                 "honest_requests": len(drops),
                 "fit_seconds": time.perf_counter() - began}


def healing_stage(ctx, config):
  """Healing: after unlearning, a bounded repair on the stored records nearest
  the submitted images (their own nearest record excluded: it stays forgotten)."""
  began = time.perf_counter()
  index, train = _index(ctx), ctx.splits.train
  scope = getattr(config.server.settings(), "scope", "all")
  settings = healing.HealSettings(scope=scope)

  def after(start, unlearned, images, labels, request):
    del start
    if not len(labels):
      return unlearned, {"spares": 0}
    own, _ = record_matching.nearest_records(index, images, labels, k=1)
    spares = _rows(ctx, healing.select_spares(
        index, images, labels, per_sample=SPARES_PER_SAMPLE, exclude_ids=own[:, 0]))
    if not len(spares):
      return unlearned, {"spares": 0}
    key = jax.random.fold_in(jax.random.key(config.server.seed + 1), request)
    return healing.heal(ctx.trained.model, unlearned, train.images[spares],
                        train.labels[spares], key, settings=settings), {
                            "spares": int(len(spares))}
  return after, {"index_bytes": int(index.nbytes), "steps": settings.steps,
                 "scope": scope, "fit_seconds": time.perf_counter() - began}


def _record_matching(ctx, config, calibration, rate, *, request_size):
  del request_size
  select, details = matching_stage(ctx, calibration, rate)
  return compose(ctx, config, details, select=select)


def _damage_bound(ctx, config, calibration, rate, *, request_size):
  del rate
  after, details = bound_stage(ctx, config, calibration, request_size)
  return compose(ctx, config, details, after=after)


def _healing(ctx, config, calibration, rate, *, request_size):
  del calibration, rate, request_size
  after, details = healing_stage(ctx, config)
  return compose(ctx, config, details, after=after)


def _matching_and_bound(ctx, config, calibration, rate, *, request_size):
  select, matching = matching_stage(ctx, calibration, rate)
  after, bound = bound_stage(ctx, config, calibration, request_size)
  return compose(ctx, config, {
      **matching, **bound,
      "fit_seconds": matching["fit_seconds"] + bound["fit_seconds"]},
                 select=select, after=after)


for _spec in (
    ProtectionSpec("record_matching", "Record matching", _record_matching),
    ProtectionSpec("damage_bound", "Per-class damage bound", _damage_bound),
    ProtectionSpec("healing", "Healing", _healing),
    ProtectionSpec("record_matching_damage_bound",
                   "Record matching + damage bound", _matching_and_bound),
):
  register_protection(_spec)

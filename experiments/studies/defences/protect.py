"""The protections' measurements in the defences study (``experiments.defences``).

Every registered protection (``experiments/server/protections.py``) is fitted on
the honest calibration half and runs every attack set from the clean model, the
``<attack>_split<k>`` sets as ``k`` requests in sequence (the many-small-requests
user). Per protection and attack: class-A and overall test accuracy after it, what
it refused and unlearned, and ``damage_kept`` (``damage_kept``). Its honest cost:
seeded honest requests of the evaluation half (JPEG-re-encoded when the study
calibrates on JPEG) unlearned with and without it: the fraction of their samples
refused and the accuracy change. ``none`` is the server's plain unlearning through
the same path (the reference of both).
"""

from __future__ import annotations

import numpy as np

from experiments.run import pipeline
from experiments.server import protections
from experiments.server import screens
from ounl_jax import evaluation as evaluation_lib

NONE = "none"


def damage_kept(normal: float, without: float, protected: float) -> float | None:
  """1 - gap_after / gap_without: the share of the attack's class-A damage the
  defence keeps away (1: all, 0: none, < 0: it made it worse).

  ``normal`` is class-A accuracy after the unmodified request with no defence,
  ``without`` after the attack with no defence, ``protected`` after the attack
  with the defence; None when the attack did no damage (gap_without <= 0).

  >>> round(damage_kept(0.8, 0.4, 0.7), 6)
  0.75
  >>> damage_kept(0.8, 0.9, 0.7) is None
  True
  """
  if normal is None or without is None or protected is None:
    return None
  gap_without = normal - without
  if not gap_without > 0:
    return None
  return float(1.0 - (normal - protected) / gap_without)


def split_sets(attacks: dict, counts, bases=("pushing_ii",)) -> dict:
  """``<attack>_split<k>``: the attack's request as ``k`` requests in sequence."""
  return {f"{base}_split{k}": [tuple(part) for part in zip(
      np.array_split(attacks[base][0], k), np.array_split(attacks[base][1], k))]
          for base in bases if base in attacks and len(attacks[base][1])
          for k in counts}


def accuracies_on_test(ctx, variables, class_a: int) -> dict:
  """Overall and class-A accuracy of ``variables`` on the server's test set."""
  test = ctx.splits.test
  report = evaluation_lib.report(
      evaluation_lib.predict_labels(ctx.trained.model, variables, test.images),
      test.labels, ctx.spec.num_classes, class_a)
  return {"overall_accuracy": report.accuracy,
          "class_a_accuracy": report.class_a_accuracy}


def run_requests(ctx, protected, requests: list, class_a: int) -> dict:
  """The requests in sequence from the clean model; accuracies and totals."""
  variables, infos = None, []
  for number, (images, labels) in enumerate(requests):
    variables, info = protected.unlearn(images, labels, start=variables,
                                        request=number)
    infos.append(info)
  result = accuracies_on_test(
      ctx, ctx.trained.variables if variables is None else variables, class_a)
  for key in ("submitted", "refused", "unlearned", "seconds"):
    result[key] = sum(info.get(key, 0) for info in infos)
  if any("alpha" in info for info in infos):
    result["alpha"] = [info.get("alpha") for info in infos]
  return result


def honest_cost(ctx, protected, requests: list, reference: list,
                class_a: int) -> dict:
  """Refusal rate and mean accuracy change (protected - none) on honest requests."""
  runs = [run_requests(ctx, protected, [r], class_a) for r in requests]
  submitted = sum(r["submitted"] for r in runs)
  return {
      "requests": len(runs),
      "refusal_rate": (sum(r["refused"] for r in runs) / submitted
                       if submitted else None),
      "overall_change": float(np.mean([r["overall_accuracy"] - n["overall_accuracy"]
                                       for r, n in zip(runs, reference)])),
      "class_a_change": float(np.mean([r["class_a_accuracy"] - n["class_a_accuracy"]
                                       for r, n in zip(runs, reference)])),
      "seconds_per_request": float(np.mean([r["seconds"] for r in runs]))}


def honest_sample_requests(ctx, config, settings, evaluation, size: int) -> list:
  """Seeded honest requests of the evaluation half, as honest users send them."""
  requests = screens.honest_requests(evaluation, size, settings.guard_requests,
                                     ctx.spec.num_classes,
                                     config.server.defence_seed + 2)
  jpeg = settings.calibrate_on == "jpeg"
  return [(screens.jpeg_reencode(r.images, settings.jpeg_quality) if jpeg
           else r.images, r.labels) for r in requests]


def fit_protections(ctx, config, calibration, size: int) -> dict:
  """Every registered protection, fitted on the calibration half."""
  rate = config.server.false_rejection_rate
  return {name: spec.fit(ctx, config, calibration, rate, request_size=size)
          for name, spec in protections.PROTECTIONS.items()}


def measure(ctx, config, settings, fitted: dict, evaluation, attacks: dict,
            size: int) -> dict:
  """``{protection: {"display_name", "fit", "attacks", "honest"}}`` and ``none``."""
  class_a = pipeline.class_a_of(ctx.spec, config)
  sequences = {a: [s] for a, s in attacks.items()}
  sequences.update(split_sets(attacks, settings.split_requests,
                              bases=("normal", "pushing_ii")))
  honest = honest_sample_requests(ctx, config, settings, evaluation, size)
  plain = protections.compose(ctx, config, {})
  reference = [run_requests(ctx, plain, [r], class_a) for r in honest]
  out = {NONE: {"display_name": "No defence", "fit": {},
                "attacks": {a: run_requests(ctx, plain, s, class_a)
                            for a, s in sequences.items()}}}
  for name, protected in fitted.items():
    out[name] = {
        "display_name": protections.PROTECTIONS[name].display_name,
        "fit": protected.details,
        "attacks": {a: run_requests(ctx, protected, s, class_a)
                    for a, s in sequences.items()},
        "honest": honest_cost(ctx, protected, honest, reference, class_a)}
  return out


def unmodified_twin(attack: str, measured) -> str:
  """The unmodified request an attack's damage is measured from: ``normal``, or
  ``normal_split<k>`` (the same samples sent as k requests) for an attack sent as
  k requests, where that was measured.

  >>> unmodified_twin("pushing_ii_split4", {"normal", "normal_split4"})
  'normal_split4'
  >>> unmodified_twin("pushing_ii_split4", {"normal"})
  'normal'
  """
  _, split, k = attack.rpartition("_split")
  twin = f"normal_split{k}"
  return twin if split and twin in measured else "normal"


def damage_kept_map(results: dict) -> dict:
  """``{defence: {attack: damage_kept}}`` of the protections and of the screens
  (their after-screening accuracies), each against its own no-defence run and
  the unmodified request sent the same way (``unmodified_twin``)."""
  out = {}
  runs = results.get("protections", {})
  screened = results.get("after_screening", {})
  for table, skip in ((runs, (NONE,)), (screened, (NONE, "clean"))):
    if NONE not in table:
      continue
    none = table[NONE].get("attacks", table[NONE])
    for name, entry in table.items():
      if name in skip:
        continue
      attacks = entry.get("attacks", entry)
      out[name] = {a: damage_kept(
          none[unmodified_twin(a, none)]["class_a_accuracy"],
          none[a]["class_a_accuracy"], attacks[a]["class_a_accuracy"])
                   for a in attacks if not a.startswith("normal") and a in none}
  return out

"""The defences experiment's measurements (``experiments.defences``, Sec. VII).

What the user submits under each attack, each per-sample defence's detection rate,
ROC AUC and false rejections at a threshold calibrated on honest samples, and the
utility guard's refusals. The defences themselves are ``experiments/server/screens.py``'s
(the same ones ``--defence`` installs on the pushing and blending servers).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from experiments.attacks import blending
from experiments.run import errors
from experiments.setup import configs
from experiments.run import pipeline
from experiments.attacks.pushing import attack
from experiments.attacks.pushing import sample_rules
from experiments.server import screens
from ounl_jax import data as data_lib
from ounl_jax import service as service_lib
from ounl_jax.defences import hashing
from ounl_jax.defences import membership
from ounl_jax.defences import screening
from ounl_jax.defences import utility


@dataclasses.dataclass(frozen=True)
class DefenceConfig:
  """The settings of this experiment beyond the model and the attacks."""

  false_rejection_rate: float = 0.01
  honest_samples: int = 2000        # Per half (calibration, evaluation); capped.
  guard_requests: int = 10          # Honest requests per half for the guard.
  jpeg_quality: int = 75
  # Honest samples the thresholds are set on: "jpeg" (re-encoded at jpeg_quality:
  # the threshold must hold for honest uploads that were re-encoded on the way,
  # the paper's objection to hashing) or "as_sent" (bit-exact copies).
  calibrate_on: str = "jpeg"
  seed: int = 0
  pushed: str | None = None         # A pushed.npz to use instead of pushing.
  # Adaptive users (experiments/attacks/adaptive.py): margins the evading pushes
  # keep, and the Pushing-II share of the mixed requests.
  adaptive_kappas: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
  mix_fractions: tuple[float, ...] = (0.25, 0.5)

  def __post_init__(self):
    if not all(0 < k < 1 for k in self.adaptive_kappas) or not all(
        0 < p <= 1 for p in self.mix_fractions):
      raise errors.UserError(
          f"--adaptive_kappas={list(self.adaptive_kappas)} must lie in (0, 1) and "
          f"--mix_fractions={list(self.mix_fractions)} in (0, 1].")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def submitted_rows(pushed: dict) -> np.ndarray:
  """The rows the pushing experiment submits (``sample_rules.submitted_rows``)."""
  if "pushing_i_success" not in pushed:  # No candidate could be pushed at all.
    return np.zeros(0, np.int64)
  requested = int(pushed.get("requested", len(pushed["pushing_i_success"])))
  return sample_rules.submitted_rows(pushed, requested)


def attack_sets(ctx: pipeline.Context, config: configs.ExperimentConfig,
                workdir: str, pushed_path: str | None,
                show_progress: bool) -> tuple[dict, np.ndarray, dict, tuple]:
  """What the user submits under each attack (``normal``: the pushed rows
  unmodified), the ids involved, notes, and ``(pushed, rows)``."""
  if pushed_path:
    with np.load(pushed_path) as saved:
      pushed = {k: saved[k] for k in saved.files}
    pushed["reused"] = True
    source = os.path.abspath(pushed_path)
  else:
    pushed = attack.push_for(ctx, config, workdir,
                                  show_progress=show_progress)
    source = "WORKDIR/attack (push matching the flags)"
  rows = submitted_rows(pushed)
  empty = (np.zeros((0,) + tuple(ctx.spec.image_shape), np.float32),
           np.zeros(0, np.int32))
  sets = {name: ((pushed[name][rows].astype(np.float32),
                  pushed[f"{name}_labels"][rows].astype(np.int32))
                 if len(rows) else empty)
          for name in ("pushing_i", "pushing_ii")}
  samples = pipeline.user_samples(ctx, config)
  class_b = blending.class_b_of(ctx.spec, config)
  blended = blending.blend(ctx, config, samples)
  normal = ((pushed["original"][rows].astype(np.float32),
             pushed["original_labels"][rows].astype(np.int32))
            if len(rows) else empty)
  sets = {"normal": normal, "blending": (np.asarray(blended.images, np.float32),
                                         np.asarray(blended.labels, np.int32)),
          **sets}
  user_ids = np.union1d(samples.ids, pushed.get("ids", np.zeros(0, np.int64)))
  notes = {"pushed_source": source, "pushed_reused": bool(pushed["reused"]),
           "pushed_fingerprint": (str(pushed["fingerprint"])
                                  if "fingerprint" in pushed else None),
           "blend_class": ctx.spec.class_names[class_b],
           "blend_ratio": config.attack.blend_ratio,
           "sizes": {k: int(len(v[1])) for k, v in sets.items()}}
  return sets, user_ids, notes, (pushed, rows)


def fit_sample_defences(ctx: pipeline.Context, calibration, rate: float):
  """Each per-sample defence's score function (``experiments/server/screens.py``)."""
  check = screens.fit_membership(ctx, calibration, rate)
  scorers = {name: screens.DEFENCES[name](ctx, calibration, rate)
             for name in ("exact_hash", "perceptual_hash", "margin")}
  scorers["membership"] = lambda x, y: membership.score(check, x, y)
  membership_fit = {"auc_members_vs_validation": check.auc,
                    "validation_flagged": check.nonmember_detection_rate,
                    "members_flagged": check.member_rejection_rate}
  return scorers, membership_fit


def request_refusal_rate(flags_per_sample: np.ndarray, size: int, requests: int,
                         seed: int) -> float:
  """Fraction of seeded honest requests of ``size`` holding a flagged sample."""
  if size == 0 or not len(flags_per_sample):
    return float("nan")
  rng = np.random.default_rng(seed)
  size = min(size, len(flags_per_sample))
  hits = [flags_per_sample[rng.choice(len(flags_per_sample), size,
                                      replace=False)].any()
          for _ in range(requests)]
  return float(np.mean(hits))


def sample_defence_results(scorers, calibration, evaluation, evaluation_jpeg,
                           attacks: dict, settings: DefenceConfig) -> dict:
  rate = settings.false_rejection_rate
  calibration_images = (screens.jpeg_reencode(calibration.images,
                                              settings.jpeg_quality)
                        if settings.calibrate_on == "jpeg" else calibration.images)
  results = {}
  for name, score in scorers.items():
    honest_cal = score(calibration_images, calibration.labels)
    honest = score(evaluation.images, evaluation.labels)
    honest_jpeg = score(evaluation_jpeg, evaluation.labels)
    threshold = screening.calibrate(honest_cal, rate)
    entry = {"threshold": threshold,
             "calibration_false_rejection": screening.flag_rate(honest_cal,
                                                                threshold),
             "false_rejection": screening.flag_rate(honest, threshold),
             "false_rejection_jpeg": screening.flag_rate(honest_jpeg, threshold),
             "honest_scores": honest, "attacks": {}}
    for attack, (images, labels) in attacks.items():
      if not len(labels):
        entry["attacks"][attack] = {"samples": 0, "detection_rate": None,
                                    "auc": None, "honest_request_refusal": None,
                                    "honest_request_refusal_jpeg": None}
        continue
      scores = score(images, labels)
      entry["attacks"][attack] = {
          "samples": int(len(labels)),
          "detection_rate": screening.flag_rate(scores, threshold),
          "auc": screening.roc_auc(honest, scores),
          "honest_request_refusal": request_refusal_rate(
              screening.flagged(honest, threshold), len(labels), 200,
              settings.seed),
          "honest_request_refusal_jpeg": request_refusal_rate(
              screening.flagged(honest_jpeg, threshold), len(labels), 200,
              settings.seed),
          "scores": scores}
    results[name] = entry
  return results


def honest_requests(pool: data_lib.LabelledImages, size: int, count: int,
                    num_classes: int, seed: int) -> list:
  """``count`` seeded single-class requests of up to ``size`` samples (the classes
  present in ``pool`` in turn)."""
  rng = np.random.default_rng(seed)
  present = [c for c in range(num_classes) if np.any(pool.labels == c)]
  requests = []
  for i in range(count):
    members = np.flatnonzero(pool.labels == present[i % len(present)])
    chosen = np.sort(rng.choice(members, min(size, len(members)), replace=False))
    requests.append(pool.take(chosen))
  return requests


def guard_drops(ctx, config, guard, images, labels) -> tuple[float, float, bool]:
  """(overall drop, worst class drop, refused) of one request on a fresh server."""
  try:
    receipt = pipeline.new_server(ctx, config, guard=guard).unlearn(
        service_lib.UnlearningRequest(images, labels))
    return receipt.guard["overall_drop"], receipt.guard["worst_class_drop"], False
  except service_lib.RequestRefused as refused:
    verdict = refused.verdict
    return (verdict.overall_drop, float(np.nanmax(verdict.class_drops)), True)


def utility_guard_results(ctx, config, calibration, evaluation, attacks: dict,
                          settings: DefenceConfig, size: int) -> dict:
  """Bounds from honest requests' drops; refusals of honest and attack requests."""
  model, variables = ctx.trained.model, ctx.trained.variables
  holdout = ctx.splits.valid
  open_guard = utility.fit(utility.UtilitySettings(np.inf, np.inf), model,
                           variables, holdout.images, holdout.labels)
  k = ctx.spec.num_classes
  cal = [guard_drops(ctx, config, open_guard, r.images, r.labels)
         for r in honest_requests(calibration, size, settings.guard_requests, k,
                                  settings.seed)]
  bounds = utility.UtilitySettings(
      max_overall_drop=screening.calibrate([c[0] for c in cal],
                                           settings.false_rejection_rate),
      max_class_drop=screening.calibrate([c[1] for c in cal],
                                         settings.false_rejection_rate))
  guard = open_guard._replace(settings=bounds)
  honest = [guard_drops(ctx, config, guard, r.images, r.labels)
            for r in honest_requests(evaluation, size, settings.guard_requests, k,
                                     settings.seed + 1)]
  honest_worst = [h[1] for h in honest]
  result = {"holdout": "valid split", "request_size": size,
            "bounds": dataclasses.asdict(bounds),
            "calibration_requests": len(cal),
            "false_rejection": float(np.mean([h[2] for h in honest])),
            "honest_worst_class_drops": honest_worst, "attacks": {}}
  for attack, (images, labels) in attacks.items():
    if not len(labels):
      result["attacks"][attack] = {"samples": 0, "refused": None}
      continue
    overall, worst, refused = guard_drops(ctx, config, guard, images, labels)
    result["attacks"][attack] = {
        "samples": int(len(labels)), "refused": refused,
        "overall_drop": overall, "worst_class_drop": worst,
        "detection_rate": float(refused),
        # Rank of the attack's worst class drop among honest requests' (AUC of
        # one attack request against the honest ones).
        "auc": screening.roc_auc(honest_worst, [worst])}
  return result

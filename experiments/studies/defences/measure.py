"""The defences experiment's measurements (``experiments.defences``, Sec. VII).

What the user submits under each attack, each per-sample defence's detection rate,
ROC AUC and false rejections at a threshold calibrated on honest samples, and the
utility guard's refusals. The defences themselves are ``experiments/server/screens.py``'s
(the same ones ``--defence`` installs on the pushing and blending servers).
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
import zlib

import numpy as np

from experiments.attacks import blending
from experiments.attacks import registry
from experiments.run import errors
from experiments.setup import configs
from experiments.run import pipeline
from experiments.attacks.pushing import attack as push_attack
from experiments.attacks.pushing import artefact
from experiments.server import screens
from ounl_jax import service as service_lib
from ounl_jax.defences import screening
from ounl_jax.defences import utility


CALIBRATE_ON = ("jpeg", "as_sent")


@dataclasses.dataclass(frozen=True)
class DefenceConfig:
  """The defences study's settings beyond the model, the attacks and the server
  (whose ``false_rejection_rate`` and ``defence_seed`` it uses).

  Attributes:
    honest_samples: honest samples per half (calibration, evaluation); capped.
    guard_requests: honest requests per half for the utility guard.
    jpeg_quality: JPEG quality of the re-encoded honest samples.
    calibrate_on: honest samples the thresholds are set on: jpeg (re-encoded at
      jpeg_quality: the threshold must hold for honest uploads re-encoded on the
      way, the paper's objection to hashing) or as_sent (bit-exact copies).
    pushed: a pushed.npz to use (None: the push matching the flags in
      WORKDIR/attack, made if missing).
    adaptive_kappas: margins the adaptive (margin-evading) pushes keep
      (experiments/attacks/adaptive.py).
    mix_fractions: Pushing-II shares of the adaptive mixed requests.
    split_requests: the many-small-requests user against the protections:
      Pushing-II sent as k requests in sequence, for each k here
      (experiments/studies/defences/protect.py).
  """

  honest_samples: int = 2000
  guard_requests: int = 10
  jpeg_quality: int = 75
  calibrate_on: str = "jpeg"
  pushed: str | None = None
  adaptive_kappas: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
  mix_fractions: tuple[float, ...] = (0.25, 0.5)
  split_requests: tuple[int, ...] = (4,)

  def __post_init__(self):
    if not all(0 < k < 1 for k in self.adaptive_kappas):
      raise ValueError(f"adaptive_kappas must lie in (0, 1), got "
                       f"{list(self.adaptive_kappas)}.")
    if not all(0 < p <= 1 for p in self.mix_fractions):
      raise ValueError(f"mix_fractions must lie in (0, 1], got "
                       f"{list(self.mix_fractions)}.")
    if not all(k >= 2 for k in self.split_requests):
      raise ValueError(f"split_requests must be >= 2, got "
                       f"{list(self.split_requests)}.")
    if self.calibrate_on not in CALIBRATE_ON:
      raise ValueError(f"calibrate_on must be one of {CALIBRATE_ON}, got "
                       f"{self.calibrate_on!r}.")


def attack_sets(ctx: pipeline.Context, config: configs.ExperimentConfig,
                workdir: str, pushed_path: str | None,
                show_progress: bool) -> tuple[dict, np.ndarray, dict, tuple]:
  """What the user submits under each attack (``normal``: the pushed rows
  unmodified), the ids involved, notes, and ``(pushed, rows)``."""
  if pushed_path:
    try:
      with np.load(pushed_path) as saved:
        pushed = {k: saved[k] for k in saved.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile,
            zlib.error) as error:
      raise errors.UserError(
          f"--pushed={pushed_path} is not a readable .npz ({type(error).__name__}:"
          f" {error}); it was cut short or damaged. Rerun experiments.pushing to "
          "write it again.") from error
    pushed["reused"] = True
    source = os.path.abspath(pushed_path)
  else:
    pushed = push_attack.push_for(ctx, config, workdir,
                                  registry.get(config.attack.name),
                                  show_progress=show_progress)
    source = "WORKDIR/attack (push matching the flags)"
  rows = artefact.submitted_rows(pushed)
  empty = (np.zeros((0,) + tuple(ctx.spec.image_shape), np.float32),
           np.zeros(0, np.int32))
  paired = (artefact.submissions(pushed, rows) if len(rows) else
            dict.fromkeys(("normal", "pushing_i", "pushing_ii"), empty))
  samples = pipeline.user_samples(ctx, config)
  class_b = blending.class_b_of(ctx.spec, config)
  blended = blending.blend(ctx, config, samples)
  sets = {"normal": paired["normal"],
          "blending": (np.asarray(blended.images, np.float32),
                       np.asarray(blended.labels, np.int32)),
          "pushing_i": paired["pushing_i"], "pushing_ii": paired["pushing_ii"]}
  user_ids = np.union1d(samples.ids, artefact.ids(pushed))
  notes = {"pushed_source": source, "pushed_reused": bool(pushed["reused"]),
           "pushed_fingerprint": (str(pushed["fingerprint"])
                                  if "fingerprint" in pushed else None),
           "blend_class": ctx.spec.class_names[class_b],
           "blend_ratio": config.attack.blend_ratio,
           "sizes": {k: int(len(v[1])) for k, v in sets.items()}}
  return sets, user_ids, notes, (pushed, rows)


def fit_sample_defences(ctx: pipeline.Context, calibration,
                        rate: float) -> dict[str, screens.Scorer]:
  """Every registered per-sample defence, fitted (``experiments/server/screens.py``)."""
  return {name: spec.scorer(ctx, calibration, rate)
          for name, spec in screens.DEFENCES.items()}


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
                           attacks: dict, settings: DefenceConfig,
                           server: configs.ServerConfig) -> dict:
  """Each defence's threshold (at the server's false-rejection rate), its false
  rejections of honest samples as sent and re-encoded, and per attack its
  detection rate, ROC AUC and honest-request refusals."""
  rate = server.false_rejection_rate
  calibration_images = (screens.jpeg_reencode(calibration.images,
                                              settings.jpeg_quality)
                        if settings.calibrate_on == "jpeg" else calibration.images)
  results = {}
  for name, scorer in scorers.items():
    score = scorer.score
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
              server.defence_seed),
          "honest_request_refusal_jpeg": request_refusal_rate(
              screening.flagged(honest_jpeg, threshold), len(labels), 200,
              server.defence_seed),
          "scores": scores}
    if scorer.details:
      entry["fit"] = scorer.details
    results[name] = entry
  return results


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
         for r in screens.honest_requests(calibration, size, settings.guard_requests, k,
                                  config.server.defence_seed)]
  rate = config.server.false_rejection_rate
  bounds = utility.UtilitySettings(
      max_overall_drop=screening.calibrate([c[0] for c in cal], rate),
      max_class_drop=screening.calibrate([c[1] for c in cal], rate))
  guard = open_guard._replace(settings=bounds)
  honest = [guard_drops(ctx, config, guard, r.images, r.labels)
            for r in screens.honest_requests(evaluation, size, settings.guard_requests, k,
                                     config.server.defence_seed + 1)]
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

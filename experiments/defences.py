"""The paper's Sec. VII defences, measured against Blending, Pushing-I and Pushing-II.

``python -m experiments.defences --dataset=cifar10 --workdir=DIR [--scale=cpu]``

Reuses what ``python -m experiments.pushing --workdir=DIR`` (same flags) left in DIR:
the trained model (``checkpoints/model/0``) and the push (``attack/pushed-<fp>.npz``,
or ``--pushed=PATH``); whatever is missing is trained / pushed as that script would.
Blends the same user samples as ``experiments.blending``.

Honest requests are training samples the user does not own, split (seeded) into a
calibration half and an evaluation half. Each per-sample defence (exact and
perceptual hash registry, boundary margin, membership loss) is calibrated at
``--false_rejection_rate`` (1%) on the calibration half (JPEG-re-encoded by
default, since honest uploads may be re-encoded on the way; ``--calibrate_on=
as_sent`` for bit-exact copies) and measured on:
the evaluation half as submitted and after a JPEG-q75 re-encoding (false
rejections), and on every attack (detection rate at the threshold, ROC AUC against
the honest evaluation half). "Honest request refusal" is the fraction of honest
requests of the attack's size refused under the default refuse-whole-request policy
(one flagged sample refuses it). The utility guard is calibrated on honest requests
of the attack's size (bounds = the 1% quantile of their accuracy drops on the
validation split) and run on each attack request through the service.

Writes ``DIR/defences.json``, ``DIR/defences.md`` and ``DIR/defences_roc.png`` (not
results.json, which belongs to the attack scripts); the last line printed is the
path of defences.json.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from typing import Any

from absl import app
from absl import flags
import jax
import matplotlib
import numpy as np
from PIL import Image

from experiments import common
from experiments import pipeline
from experiments import pushes
from ounl_jax import data as data_lib
from ounl_jax import defences
from ounl_jax import service as service_lib
from ounl_jax.attacks import blending as blending_lib
from ounl_jax.defences import hashing
from ounl_jax.defences import margin
from ounl_jax.defences import membership
from ounl_jax.defences import screening
from ounl_jax.defences import utility

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS

ATTACKS = {"blending": "Blending", "pushing_i": "Pushing-I",
           "pushing_ii": "Pushing-II"}
SAMPLE_DEFENCES = {"exact_hash": "Hash registry (exact sha256)",
                   "perceptual_hash": "Hash registry (perceptual pHash)",
                   "margin": "Boundary margin",
                   "membership": "Membership (loss)"}


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

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def jpeg_reencode(images: np.ndarray, quality: int) -> np.ndarray:
  """Each image through a JPEG encode/decode at ``quality`` (a re-encoding upload)."""
  out = []
  for image in hashing.quantise(images):
    buffer = io.BytesIO()
    squeeze = image.shape[-1] == 1
    Image.fromarray(image[..., 0] if squeeze else image).save(
        buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
    out.append(decoded[..., None] if squeeze else decoded)
  return data_lib.to_unit_range(np.stack(out))


def honest_halves(train: data_lib.LabelledImages, exclude_ids: np.ndarray,
                  per_half: int, seed: int):
  """Two disjoint seeded sets of training samples the user does not own."""
  pool = np.flatnonzero(~np.isin(train.ids, exclude_ids))
  pool = np.random.default_rng(seed).permutation(pool)
  per_half = min(per_half, len(pool) // 2)
  return (train.take(np.sort(pool[:per_half])),
          train.take(np.sort(pool[per_half:2 * per_half])))


def submitted_rows(pushed: dict) -> np.ndarray:
  """The rows the pushing experiment submits (``pushes.submitted_rows``)."""
  if "pushing_i_success" not in pushed:  # No candidate could be pushed at all.
    return np.zeros(0, np.int64)
  requested = int(pushed.get("requested", len(pushed["pushing_i_success"])))
  return pushes.submitted_rows(pushed, requested)


def attack_sets(ctx: pipeline.Context, config: pipeline.AttackConfig,
                workdir: str, settings: DefenceConfig,
                show_progress: bool) -> tuple[dict, np.ndarray, dict]:
  """What the malicious user submits under each attack, the ids involved, notes."""
  if settings.pushed:
    with np.load(settings.pushed) as saved:
      pushed = {k: saved[k] for k in saved.files}
    pushed["reused"] = True
    source = os.path.abspath(settings.pushed)
  else:
    pushed = pipeline.push_for(ctx, config, workdir, show_progress=show_progress)
    source = "WORKDIR/attack (push matching the flags)"
  rows = submitted_rows(pushed)
  empty = (np.zeros((0,) + tuple(ctx.spec.image_shape), np.float32),
           np.zeros(0, np.int32))
  sets = {name: ((pushed[name][rows].astype(np.float32),
                  pushed[f"{name}_labels"][rows].astype(np.int32))
                 if len(rows) else empty)
          for name in ("pushing_i", "pushing_ii")}
  samples = pipeline.user_samples(ctx, config)
  class_b = data_lib.class_index(ctx.spec, config.blend_class or ctx.spec.class_b)
  pool = getattr(ctx.splits, config.blend_pool)
  blended = blending_lib.blending_attack(
      pipeline.new_server(ctx, config).oracle(), samples.images, samples.labels,
      jax.random.key(config.attack_seed), pool.images, pool.labels,
      blending_lib.BlendSettings(class_b=class_b, ratio=config.blend_ratio,
                                 label_mode=config.blend_label_mode))
  sets = {"blending": (np.asarray(blended.images, np.float32),
                       np.asarray(blended.labels, np.int32)), **sets}
  user_ids = np.union1d(samples.ids, pushed.get("ids", np.zeros(0, np.int64)))
  notes = {"pushed_source": source, "pushed_reused": bool(pushed["reused"]),
           "pushed_fingerprint": (str(pushed["fingerprint"])
                                  if "fingerprint" in pushed else None),
           "blend_class": ctx.spec.class_names[class_b],
           "blend_ratio": config.blend_ratio,
           "sizes": {k: int(len(v[1])) for k, v in sets.items()}}
  return sets, user_ids, notes


def fit_sample_defences(ctx: pipeline.Context, calibration, settings: DefenceConfig):
  """Each per-sample defence's score function (fitted on what the server holds)."""
  model, variables = ctx.trained.model, ctx.trained.variables
  registries = {kind: hashing.fit(hashing.HashSettings(kind=kind),
                                  ctx.splits.train.images)
                for kind in hashing.KINDS}
  detector = margin.fit(margin.MarginSettings(), model, variables)
  check = membership.fit(
      membership.MembershipSettings(settings.false_rejection_rate), model,
      variables, (calibration.images, calibration.labels),
      (ctx.splits.valid.images, ctx.splits.valid.labels))
  scorers = {
      "exact_hash": lambda x, y: hashing.score(registries["exact"], x, y),
      "perceptual_hash": lambda x, y: hashing.score(registries["perceptual"], x, y),
      "margin": lambda x, y: margin.score(detector, x, y),
      "membership": lambda x, y: membership.score(check, x, y),
  }
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
  calibration_images = (jpeg_reencode(calibration.images, settings.jpeg_quality)
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


def guard_server(ctx, config, guard):
  return service_lib.UnlearningService(
      ctx.trained.model, ctx.trained.variables, ctx.splits.test,
      key=jax.random.key(config.server_seed), method=config.unlearning,
      settings=pipeline.unlearning_settings(config), guard=guard)


def guard_drops(ctx, config, guard, images, labels) -> tuple[float, float, bool]:
  """(overall drop, worst class drop, refused) of one request on a fresh server."""
  try:
    receipt = guard_server(ctx, config, guard).unlearn(
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


def _fmt(value, digits=3):
  if value is None or (isinstance(value, float) and not np.isfinite(value)):
    return "n/a"
  return f"{value:.{digits}f}"


def markdown(results: dict) -> str:
  rate = results["config"]["defence"]["false_rejection_rate"]
  lines = [
      "# Defences against over-unlearning (paper Sec. VII)", "",
      f"{results['data_note']}; model `{results['model']}`; attacks on "
      f"{results['class_a']} ({results['attack_notes']['sizes']}). Thresholds at "
      f"{rate:.0%} false rejection on {results['honest']['calibration']} honest "
      "calibration samples "
      + ("re-encoded as JPEG" if results['config']['defence']['calibrate_on'] ==
         "jpeg" else "as sent") + "; false rejection measured on "
      f"{results['honest']['evaluation']} other honest samples, as sent and after "
      f"JPEG-q{results['config']['defence']['jpeg_quality']}.", "",
      "| Defence | Attack | Detection rate | ROC AUC | False rejection | "
      "False rejection (JPEG) | Honest request refusal | "
      "Honest request refusal (JPEG) |",
      "|---|---|---|---|---|---|---|---|"]
  for name, label in SAMPLE_DEFENCES.items():
    entry = results["sample_defences"][name]
    for attack, attack_label in ATTACKS.items():
      a = entry["attacks"][attack]
      lines.append(
          f"| {label} | {attack_label} | {_fmt(a['detection_rate'])} | "
          f"{_fmt(a['auc'])} | {_fmt(entry['false_rejection'])} | "
          f"{_fmt(entry['false_rejection_jpeg'])} | "
          f"{_fmt(a['honest_request_refusal'])} | "
          f"{_fmt(a['honest_request_refusal_jpeg'])} |")
  guard = results["utility_guard"]
  for attack, attack_label in ATTACKS.items():
    a = guard["attacks"][attack]
    lines.append(f"| Utility guard | {attack_label} | "
                 f"{_fmt(a.get('detection_rate'))} | {_fmt(a.get('auc'))} | "
                 f"{_fmt(guard['false_rejection'])} | n/a | "
                 f"{_fmt(guard['false_rejection'])} | n/a |")
  b = guard["bounds"]
  m = results["membership_fit"]
  lines += [
      "", "Honest request refusal: fraction of 200 seeded honest requests of the "
      "attack's size with at least one flagged sample (refused whole, the "
      "service's default); (JPEG): the same requests re-encoded.",
      f"Utility guard: bounds from {guard['calibration_requests']} honest requests "
      f"of {guard['request_size']} samples (overall drop <= "
      f"{_fmt(b['max_overall_drop'])}, class drop <= {_fmt(b['max_class_drop'])} "
      "on the validation split); its detection rate is whether the one attack "
      "request was refused, its false rejection the fraction of "
      f"{results['config']['defence']['guard_requests']} other honest requests "
      "refused.",
      f"Membership threshold on this model: AUC members vs validation "
      f"{_fmt(m['auc_members_vs_validation'])}, validation samples flagged "
      f"{_fmt(m['validation_flagged'])}.", ""]
  return "\n".join(lines)


def plot_roc(results: dict, path: str) -> str:
  fig, axes = plt.subplots(1, len(ATTACKS), figsize=(4.2 * len(ATTACKS), 4.0),
                           squeeze=False)
  for ax, (attack, attack_label) in zip(axes[0], ATTACKS.items()):
    for name, label in SAMPLE_DEFENCES.items():
      entry = results["sample_defences"][name]
      a = entry["attacks"][attack]
      if a.get("scores") is None:
        continue
      fpr, tpr = screening.roc_curve(entry["honest_scores"], a["scores"])
      ax.plot(fpr, tpr, label=f"{label} (AUC {_fmt(a['auc'], 2)})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
    ax.axvline(results["config"]["defence"]["false_rejection_rate"], color="grey",
               lw=0.5)
    ax.set_title(attack_label)
    ax.set_xlabel("false rejection (honest)")
    ax.set_ylabel("detection")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=6, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _strip_arrays(value):
  """Drops per-sample score arrays from the json (kept small and readable)."""
  if isinstance(value, dict):
    return {k: _strip_arrays(v) for k, v in value.items()
            if k not in ("scores", "honest_scores")}
  return value


def run(train_config: common.TrainConfig, config: pipeline.AttackConfig,
        settings: DefenceConfig, workdir: str, *, data_dir: str | None = None,
        show_progress: bool = True) -> str:
  """Measures every defence against every attack; returns the json path."""
  started = time.time()
  ctx = pipeline.prepare(train_config, workdir, data_dir=data_dir,
                         show_progress=show_progress)
  attacks, user_ids, notes = attack_sets(ctx, config, workdir, settings,
                                         show_progress)
  calibration, evaluation = honest_halves(ctx.splits.train, user_ids,
                                          settings.honest_samples, settings.seed)
  evaluation_jpeg = jpeg_reencode(evaluation.images, settings.jpeg_quality)
  scorers, membership_fit = fit_sample_defences(ctx, calibration, settings)
  sample_results = sample_defence_results(scorers, calibration, evaluation,
                                          evaluation_jpeg, attacks, settings)
  size = max(1, max(len(v[1]) for v in attacks.values()))
  guard = utility_guard_results(ctx, config, calibration, evaluation, attacks,
                                settings, size)
  results = {
      "experiment": "defences (paper Sec. VII)",
      "dataset": ctx.spec.name,
      "data_note": ("CIFAR-10 (JPEG-q75 copy)" if ctx.spec.name == "cifar10"
                    else ctx.spec.name),
      "model": train_config.model,
      "class_a": ctx.spec.class_names[pipeline.class_a_of(ctx.spec, config)],
      "attack_notes": notes,
      "honest": {"calibration": len(calibration), "evaluation": len(evaluation),
                 "source": "training samples the user does not own"},
      "sample_defences": sample_results,
      "membership_fit": membership_fit,
      "utility_guard": guard,
      "seconds": time.time() - started,
      **common.run_metadata({"train": train_config.to_dict(),
                             "attack": config.to_dict(),
                             "defence": settings.to_dict()}),
  }
  os.makedirs(workdir, exist_ok=True)
  plot_roc(results, os.path.join(workdir, "defences_roc.png"))
  with open(os.path.join(workdir, "defences.md"), "w") as f:
    f.write(markdown(results))
  return common.write_json(os.path.join(workdir, "defences.json"),
                           _strip_arrays(results))


def define_flags() -> None:
  common.define_common_flags({"workdir": "./runs/cifar10"})
  pipeline.define_attack_flags()
  flags.DEFINE_float("false_rejection_rate", 0.01,
                     "Honest samples each defence may reject (calibration).")
  flags.DEFINE_integer("honest_samples", 2000,
                       "Honest samples per half (calibration / evaluation).")
  flags.DEFINE_integer("guard_requests", 10,
                       "Honest requests per half for the utility guard.")
  flags.DEFINE_integer("jpeg_quality", 75, "JPEG quality of the re-encoded "
                       "honest requests.")
  flags.DEFINE_enum("calibrate_on", "jpeg", ["jpeg", "as_sent"],
                    "Honest calibration samples: JPEG re-encoded or as sent.")
  flags.DEFINE_integer("defence_seed", 0, "Seeds the honest halves and requests.")
  flags.DEFINE_string("pushed", None, "A pushed.npz to use (default: the push "
                      "matching the flags in WORKDIR/attack, made if missing).")


def main(argv):
  del argv
  common.quiet_logs()
  settings = DefenceConfig(
      false_rejection_rate=FLAGS.false_rejection_rate,
      honest_samples=FLAGS.honest_samples, guard_requests=FLAGS.guard_requests,
      jpeg_quality=FLAGS.jpeg_quality, calibrate_on=FLAGS.calibrate_on,
      seed=FLAGS.defence_seed,
      pushed=FLAGS.pushed)
  path = run(common.train_config_from_flags(), pipeline.attack_config_from_flags(),
             settings, FLAGS.workdir, data_dir=FLAGS.data_dir,
             show_progress=FLAGS.progress)
  with open(os.path.join(FLAGS.workdir, "defences.md")) as f:
    print(f.read())
  print(path)


if __name__ == "__main__":
  define_flags()
  app.run(main)

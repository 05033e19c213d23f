"""The paper's Sec. VII defences, measured against Blending, Pushing-I and Pushing-II.

``python -m experiments.defences --dataset=cifar10 --workdir=DIR [--scale=cpu]``

Reuses what ``python -m experiments.pushing --workdir=DIR`` (same flags) left in DIR:
the trained model (``checkpoints/model/0``) and the push (``attack/pushed-<fp>.npz``,
or ``--pushed=PATH``); whatever is missing is trained / pushed as that script would.
Blends the same user samples as ``experiments.blending``.

Honest requests are training samples the user does not own, split (seeded by
``--defence_seed``) into a calibration half and an evaluation half. Each registered
per-sample defence (``experiments/server/screens.py``: exact and perceptual hash
registry, boundary margin, membership loss, and any registered by the caller) is
calibrated at ``--false_rejection_rate`` (1%) on the calibration half (JPEG-re-encoded by
default, since honest uploads may be re-encoded on the way; ``--calibrate_on=
as_sent`` for bit-exact copies) and measured on:
the evaluation half as submitted and after a JPEG-q75 re-encoding (false
rejections), and on every attack (detection rate at the threshold, ROC AUC against
the honest evaluation half). "Honest request refusal" is the fraction of honest
requests of the attack's size refused under the default refuse-whole-request policy
(one flagged sample refuses it). The utility guard is calibrated on honest requests
of the attack's size (bounds = the 1% quantile of their accuracy drops on the
validation split) and run on each attack request through the service.

Adaptive users (``experiments/attacks/adaptive.py``) join the attacks: pushes moved
to margin kappa (``--adaptive_kappas``) and requests mixing Pushing-II with the
user's unmodified samples (``--mix_fractions``). For every screen and attack the
server then drops the flagged samples and unlearns the rest: class-A and overall
accuracy after it (``after_screening``).

Writes ``DIR/defences.json``, ``DIR/defences.md``, ``DIR/defences_roc.png`` and
``DIR/defences_tradeoff.png`` (detection against the class-A gap left) (not
results.json, which belongs to the attack scripts); the last line printed is the
path of defences.json.
"""

from __future__ import annotations

import dataclasses
import os
import time

from absl import flags

from experiments.attacks import adaptive
from experiments.setup import cli
from experiments.run import progress
from experiments.run import records
from experiments.setup import configs
from experiments.studies.defences import report
from experiments.studies.defences import damage
from experiments.studies.defences import measure as study
from experiments.studies.defences import protect
from experiments.run import pipeline
from experiments.setup import validation

DefenceConfig = study.DefenceConfig
STAGES = ("attack sets", "margin-evading pushes", "fitting protections",
          "fitting screens", "screens on every attack", "unlearning after screens",
          "utility guard", "protections on every attack")


def measure(ctx: pipeline.Context, config: configs.ExperimentConfig,
            settings: DefenceConfig, workdir: str, show_progress: bool) -> dict:
  """Every defence against every attack (score arrays kept for the ROC plot)."""
  stage = progress.stages(STAGES, desc="defences study", enabled=show_progress)
  next(stage)
  attacks, user_ids, notes, (pushed, rows) = study.attack_sets(
      ctx, config, workdir, settings.pushed, show_progress)
  next(stage)
  evading, notes["adaptive"] = adaptive.evasion_sets(ctx, config, pushed, rows,
                                                     settings.adaptive_kappas)
  attacks.update(evading, **adaptive.mixed_sets(
      attacks["normal"], attacks["pushing_ii"], settings.mix_fractions))
  calibration, evaluation = study.screens.honest_halves(
      ctx.splits.train, user_ids, settings.honest_samples,
      config.server.defence_seed)
  size = max(1, max(len(v[1]) for v in attacks.values()))
  next(stage)
  fitted = protect.fit_protections(ctx, config, calibration, size)
  if "record_matching" in fitted:
    attacks.update(adaptive.projected_sets(
        attacks, fitted["record_matching"].details["radius"]),
                   **adaptive.boundary_records(ctx, config, user_ids,
                                               len(attacks["normal"][1])))
  notes["sizes"] = {k: int(len(v[1])) for k, v in attacks.items()}
  evaluation_jpeg = study.screens.jpeg_reencode(evaluation.images,
                                                settings.jpeg_quality)
  next(stage)
  scorers = study.fit_sample_defences(ctx, calibration,
                                     config.server.false_rejection_rate)
  next(stage)
  sample_results = study.sample_defence_results(
      scorers, calibration, evaluation, evaluation_jpeg, attacks, settings,
      config.server)
  next(stage)
  screened = adaptive.after_screening(ctx, config, {
      name: scorer.score for name, scorer in scorers.items()}, sample_results,
                                      attacks)
  next(stage)
  guard = study.utility_guard_results(ctx, config, calibration, evaluation,
                                      attacks, settings, size)
  next(stage)
  results = {
      "experiment": "defences (paper Sec. VII)",
      "dataset": ctx.spec.name,
      "data_note": ("CIFAR-10 (JPEG-q75 copy)" if ctx.spec.name == "cifar10"
                    else ctx.spec.name),
      "model": config.train.model,
      "class_a": ctx.spec.class_names[pipeline.class_a_of(ctx.spec, config)],
      "attack_notes": notes,
      "honest": {"calibration": len(calibration), "evaluation": len(evaluation),
                 "source": "training samples the user does not own"},
      "sample_defences": sample_results,
      "utility_guard": guard,
      "after_screening": screened,
      "protections": protect.measure(ctx, config, settings, fitted, evaluation,
                                     attacks, size),
  }
  results["damage_kept"] = protect.damage_kept_map(results)
  next(stage, None)
  return results


def run(config: configs.ExperimentConfig, settings: DefenceConfig, workdir: str,
        *, data_dir: str | None = None, show_progress: bool = True) -> str:
  """Measures every defence against every attack; returns the json path."""
  progress.quiet_logs()
  started = time.time()
  validation.check_experiment(config)
  validation.check_workdir(workdir)
  ctx = pipeline.prepare(config.train, workdir, data_dir=data_dir,
                         show_progress=show_progress)
  results = measure(ctx, config, settings, workdir, show_progress)
  results.update(seconds=time.time() - started, **records.run_metadata(
      {**config.to_dict(), "defence": dataclasses.asdict(settings)}))
  os.makedirs(workdir, exist_ok=True)
  report.plot_roc(results, os.path.join(workdir, "defences_roc.png"))
  adaptive.tradeoff_figure(results, os.path.join(workdir, "defences_tradeoff.png"))
  damage.figure(results, os.path.join(workdir, "defences_damage.png"))
  with open(os.path.join(workdir, "defences.md"), "w") as f:
    f.write(report.markdown(results))
  return records.write_json(os.path.join(workdir, "defences.json"),
                           report.strip_arrays(results))


def define_flags(fv) -> None:
  """The experiments' flags and this study's (``DefenceConfig``'s fields)."""
  cli.define_experiment_flags(fv)
  cli.define_dataclass_flags(fv, DefenceConfig(),
                             choices={"calibrate_on": study.CALIBRATE_ON})


def main(argv, fv=flags.FLAGS):
  del argv
  settings = cli.dataclass_from_flags(fv, DefenceConfig)
  path = run(cli.experiment_config(fv), settings, fv.workdir,
             data_dir=fv.data_dir, show_progress=fv.progress)
  with open(os.path.join(fv.workdir, "defences.md")) as f:
    print(f.read())
  print(path)


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  cli.run_main(main)

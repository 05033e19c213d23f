"""The defences experiment's report: ``defences.md`` and ``defences_roc.png``."""

from __future__ import annotations

import numpy as np

from experiments.attacks import adaptive
from experiments.studies.defences import damage
from experiments.server import screens
from ounl_jax.defences import screening
from experiments.reports import figures


ATTACKS = {"blending": "Blending", "pushing_i": "Pushing-I",
           "pushing_ii": "Pushing-II"}


def defence_names(results: dict) -> dict[str, str]:
  """Every measured defence, by its registered display name (the key when it is
  no longer registered)."""
  return {name: getattr(screens.DEFENCES.get(name), "display_name", name)
          for name in results["sample_defences"]}


def _fit_lines(results: dict) -> list[str]:
  """What each defence's fit found (e.g. the membership threshold's AUC)."""
  names = defence_names(results)
  return [f"{names[name]} fit on this model: " + ", ".join(
      f"{key.replace('_', ' ')} {_fmt(value)}" for key, value in entry["fit"].items())
          + "." for name, entry in results["sample_defences"].items()
          if entry.get("fit")]


def _fmt(value, digits=3):
  if value is None or (isinstance(value, float) and not np.isfinite(value)):
    return "n/a"
  return f"{value:.{digits}f}"


def markdown(results: dict) -> str:
  rate = results["config"]["server"]["false_rejection_rate"]
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
  attacks = list(next(iter(results["sample_defences"].values()))["attacks"])
  for name, label in defence_names(results).items():
    entry = results["sample_defences"][name]
    for attack in attacks:
      a, attack_label = entry["attacks"][attack], adaptive.label(attack)
      lines.append(
          f"| {label} | {attack_label} | {_fmt(a['detection_rate'])} | "
          f"{_fmt(a['auc'])} | {_fmt(entry['false_rejection'])} | "
          f"{_fmt(entry['false_rejection_jpeg'])} | "
          f"{_fmt(a['honest_request_refusal'])} | "
          f"{_fmt(a['honest_request_refusal_jpeg'])} |")
  guard = results["utility_guard"]
  for attack in attacks:
    a = guard["attacks"][attack]
    lines.append(f"| Utility guard | {adaptive.label(attack)} | "
                 f"{_fmt(a.get('detection_rate'))} | {_fmt(a.get('auc'))} | "
                 f"{_fmt(guard['false_rejection'])} | n/a | "
                 f"{_fmt(guard['false_rejection'])} | n/a |")
  b = guard["bounds"]
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
      "refused.", *_fit_lines(results), ""]
  return "\n".join(lines + after_screening_lines(results, attacks)
                   + damage.markdown_lines(results))


def after_screening_lines(results: dict, attacks: list) -> list[str]:
  """Class-A accuracy (%) the server ends with when it drops flagged samples."""
  passed = results.get("after_screening")
  if not passed:
    return []
  names = {"none": "no screen", **defence_names(results)}
  shown = list(names)
  lines = ["## What the server unlearns after screening", "",
           "The server drops the flagged samples and unlearns the rest: class-A "
           "accuracy (%) after it, with the samples that passed; overall accuracy "
           "(%) in brackets. Clean model: "
           f"{100 * passed['clean']['class_a_accuracy']:.1f} "
           f"({100 * passed['clean']['overall_accuracy']:.1f}).", "",
           "| Attack | " + " | ".join(names[s] for s in shown) + " |",
           "|---|" + "---|" * len(shown)]
  for attack in attacks:
    cells = [f"{100 * passed[s][attack]['class_a_accuracy']:.1f} "
             f"({100 * passed[s][attack]['overall_accuracy']:.1f}; "
             f"{passed[s][attack]['passed']} passed)" for s in shown]
    lines.append(f"| {adaptive.label(attack)} | " + " | ".join(cells) + " |")
  return lines + ["", "![trade-off](defences_tradeoff.png)", ""]


def plot_roc(results: dict, path: str) -> str:
  """ROC curves: each per-sample defence against each attack (honest vs attack)."""
  plt = figures.pyplot()
  fig, axes = plt.subplots(1, len(ATTACKS), figsize=(4.2 * len(ATTACKS), 4.0),
                           squeeze=False)
  for ax, (attack, attack_label) in zip(axes[0], ATTACKS.items()):
    for name, label in defence_names(results).items():
      entry = results["sample_defences"][name]
      a = entry["attacks"][attack]
      if a.get("scores") is None:
        continue
      fpr, tpr = screening.roc_curve(entry["honest_scores"], a["scores"])
      ax.plot(fpr, tpr, label=f"{label} (AUC {_fmt(a['auc'], 2)})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
    ax.axvline(results["config"]["server"]["false_rejection_rate"], color="grey",
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


def strip_arrays(value):
  """Drops per-sample score arrays from the json (kept small and readable)."""
  if isinstance(value, dict):
    return {k: strip_arrays(v) for k, v in value.items()
            if k not in ("scores", "honest_scores")}
  return value

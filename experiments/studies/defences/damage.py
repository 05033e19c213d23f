"""The defences study's damage report: how much of each attack's class-A damage
every defence keeps away, at what honest cost (``defences.md``'s last section and
``defences_damage.png``; the numbers are ``protect.py``'s)."""

from __future__ import annotations

import numpy as np

from experiments.attacks import adaptive
from experiments.reports import figures
from experiments.server import screens
from experiments.studies.defences import protect

# The goal (issue 25): every attacker, at most this honest cost.
GOAL_KEPT, GOAL_REFUSAL, GOAL_COST = 0.8, 0.01, 0.005


def _fmt(value, scale=1.0, digits=2):
  if value is None or (isinstance(value, float) and not np.isfinite(value)):
    return "n/a"
  return f"{round(scale * value, digits) + 0.0:.{digits}f}"  # No "-0.00".


def defence_rows(results: dict) -> dict:
  """``{defence: (display name, honest refusal, honest overall cost, class-A
  cost, {attack: class-A after})}`` for every defence in the damage map; the
  unmodified request (``normal``) is among the attacks."""
  jpeg = results["config"]["defence"]["calibrate_on"] == "jpeg"
  rows = {}
  for name, entry in results.get("protections", {}).items():
    if name == protect.NONE:
      continue
    honest = entry["honest"]
    rows[name] = (entry["display_name"], honest["refusal_rate"],
                  _cost(honest["overall_change"]), _cost(honest["class_a_change"]),
                  {a: r["class_a_accuracy"] for a, r in entry["attacks"].items()})
  for name, entry in results.get("sample_defences", {}).items():
    after = results.get("after_screening", {}).get(name, {})
    spec = screens.DEFENCES.get(name)
    rows[name] = (f"{getattr(spec, 'display_name', name)} (screen)",
                  entry["false_rejection_jpeg" if jpeg else "false_rejection"],
                  None, None, {a: r["class_a_accuracy"] for a, r in after.items()})
  return rows


def _cost(change):
  return None if change is None else -change


def meets_goal(kept: dict, refusal, cost, shift=None) -> bool:
  """Damage kept >= 80% against every attacker that did damage (at least one
  did), honest refusal <= 1%, honest overall cost <= 0.5 points, and the
  user's unmodified class-A request unlearned as without the defence: its
  class-A accuracy ``shift`` from the plain server's within 0.5 points either
  way (a defence that also holds back honest forgetting keeps the damage away
  by not unlearning). Unmeasured cost or shift: not held against it."""
  measured = [v for v in kept.values() if v is not None]
  return (bool(measured) and min(measured) >= GOAL_KEPT
          and refusal is not None and refusal <= GOAL_REFUSAL
          and (cost is None or cost <= GOAL_COST)
          and (shift is None or abs(shift) <= GOAL_COST))


def unmodified_shift(results: dict, after: dict):
  """Class-A accuracy after the unmodified request under a defence minus with
  none (positive: the defence unlearned less of it); None if unmeasured."""
  plain = results.get("protections", {}).get(protect.NONE, {}).get(
      "attacks", {}).get("normal")
  if plain is None or after.get("normal") is None:
    return None
  return after["normal"] - plain["class_a_accuracy"]


def _any_damage(results: dict) -> bool:
  return any(v is not None for kept in results["damage_kept"].values()
             for v in kept.values())


def _table(results: dict, rows: dict) -> list[str]:
  lines = ["| Defence | Attack | Damage kept | Class-A after (%) | Honest refusal | "
           "Honest cost overall / class-A (points) |", "|---|---|---|---|---|---|"]
  for name, kept in results["damage_kept"].items():
    display, refusal, cost, cost_a, after = rows[name]
    for attack, value in kept.items():
      lines.append(f"| {display} | {adaptive.label(attack)} | {_fmt(value)} | "
                   f"{_fmt(after.get(attack), 100, 1)} | {_fmt(refusal, 1, 3)} | "
                   f"{_fmt(cost, 100)} / {_fmt(cost_a, 100)} |")
  return lines


def goals_met(results: dict, rows: dict) -> dict[str, bool]:
  """``{defence: meets_goal(...)}`` for every defence in the damage map."""
  return {name: meets_goal(kept, rows[name][1], rows[name][2],
                           unmodified_shift(results, rows[name][4]))
          for name, kept in results["damage_kept"].items()}


def _summary(results: dict, rows: dict, goals: dict) -> list[str]:
  """One row per defence: its honest costs, the unmodified request, the goal."""
  lines = ["| Defence | Honest refusal | Honest cost overall / class-A (points) | "
           "Unmodified class-A request: class-A after (%), shift (points) | Goal |",
           "|---|---|---|---|---|"]
  for name, met in goals.items():
    display, refusal, cost, cost_a, after = rows[name]
    shift = unmodified_shift(results, after)
    lines.append(f"| {display} | {_fmt(refusal, 1, 3)} | {_fmt(cost, 100)} / "
                 f"{_fmt(cost_a, 100)} | {_fmt(after.get('normal'), 100, 1)}, "
                 f"{_fmt(shift, 100, 1)} | {'met' if met else 'not met'} |")
  return lines


def _fit_lines(results: dict) -> list[str]:
  lines = []
  for name, entry in results.get("protections", {}).items():
    fit = {k: v for k, v in entry["fit"].items() if not isinstance(v, list)}
    if entry.get("honest"):
      fit["extra seconds per honest request"] = entry["honest"][
          "seconds_per_request"]
    if fit:
      lines.append(f"{entry['display_name']} fit: " + ", ".join(
          f"{k.replace('_', ' ')} {_fmt(v, digits=3) if isinstance(v, float) else v}"
          for k, v in fit.items()) + ".")
  return lines


def markdown_lines(results: dict) -> list[str]:
  """The damage section of defences.md (empty when nothing was measured)."""
  if not results.get("damage_kept"):
    return []
  rows = defence_rows(results)
  goals = goals_met(results, rows)
  met = [rows[name][0] for name, holds in goals.items() if holds]
  return [
      "## Damage kept away", "",
      "Damage kept = 1 - gap_after / gap_without, with gap_without = class-A "
      "accuracy after the unmodified request minus after the attack, both with no "
      "defence, and gap_after the same with the defence (n/a: the attack did no "
      "damage; above 1: class A ends higher than the plain server leaves it "
      "after the unmodified request). Protections (record matching, damage "
      "bound, healing: docs/defences.md) change what the server unlearns; screens drop the "
      "samples they flag. Honest refusal: fraction of honest samples refused "
      "(protections: on seeded honest requests of the attack's size; screens: "
      "their per-sample false rejection). Honest cost: mean test accuracy lost "
      "on those honest requests against the plain unlearning (screens: not "
      "measured). The unmodified class-A request (the user's own samples, sent "
      "as they are) is an honest request too: its shift is its class-A accuracy "
      "under the defence minus without (positive: less was unlearned).", "",
      *_summary(results, rows, goals), "", *_table(results, rows), "",
      *_fit_lines(results), "",
      f"Goal (issue 25): a defence keeping >= {GOAL_KEPT:.0%} of the damage away "
      f"from every attacker at <= {GOAL_REFUSAL:.0%} honest refusal and <= "
      f"{100 * GOAL_COST:.1f} points honest accuracy cost, the unmodified "
      f"class-A request shifted by <= {100 * GOAL_COST:.1f} points: "
      + (f"met by {', '.join(met)}." if met else "not met by any defence"
         + ("." if _any_damage(results) else " (no attack did damage here).")),
      "", "![damage kept](defences_damage.png)", ""]


def figure(results: dict, path: str) -> str:
  """Damage kept (y) against honest refusal (x): one point per defence and
  attacker; the goal's corner shaded."""
  plt = figures.pyplot()
  rows = defence_rows(results)
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  ax.fill_between([0, GOAL_REFUSAL], GOAL_KEPT, 1.05, color="green", alpha=0.1,
                  label="goal")
  for name, kept in results.get("damage_kept", {}).items():
    points = [(a, v) for a, v in kept.items() if v is not None]
    refusal = rows[name][1]
    if not points or refusal is None:
      continue
    ys = [v for _, v in points]
    ax.scatter([refusal] * len(ys), ys, s=14, label=rows[name][0])
    for attack, y in points:
      ax.annotate(attack, (refusal, y), fontsize=5, xytext=(3, 0),
                  textcoords="offset points")
  ax.set_xlabel("honest refusal (fraction of honest samples refused)")
  ax.set_ylabel("damage kept away (1 - gap after / gap without)")
  ax.set_title("Defences: damage kept away against honest refusal")
  ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path

"""Result files people read: Markdown tables in the paper's layout and figures."""

from __future__ import annotations

import os

from experiments.attacks import registry
from experiments.reports import figures


CONDITION_NAMES = {"clean": "Clean model", "normal": "Normal unlearning",
                   "pushing_i": "Pushing-I", "pushing_ii": "Pushing-II",
                   "blending": "Blending",
                   "unlearning_gradient": "Gradient (white-box)",
                   "transfer": "Gradient (transfer)"}


def pct(value) -> str:
  return "n/a" if value is None else f"{100 * value:.1f}%"


def _delta(value, reference) -> str:
  if value is None or reference is None:
    return ""
  diff = 100 * (reference - value)
  return f" ({abs(diff):.1f}%{'↓' if diff >= 0 else '↑'})"


def accuracy_table(results: dict) -> list[str]:
  """Overall / class-A (/ class-B) accuracy per condition; Δ against normal."""
  conditions = results["conditions"]
  normal = conditions.get("normal", {})
  extra = [k for k in ("target_class_accuracy", "class_b_accuracy")
           if k in normal]
  extra_name = {"target_class_accuracy": f"{results.get('target_class')} (target)",
                "class_b_accuracy": f"{results.get('class_b')} (class B)"}
  header = (["Condition", "Submitted", "Overall accuracy",
             f"{results['class_a']} (class A) accuracy"]
            + [f"{extra_name[k]} accuracy" for k in extra])
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  for name, cond in conditions.items():
    cells = [CONDITION_NAMES.get(name, name), str(cond.get("num_submitted", "-"))]
    for key in ["overall_accuracy", "class_a_accuracy"] + extra:
      delta = "" if name in ("clean", "normal") else _delta(cond[key], normal.get(key))
      cells.append(pct(cond[key]) + delta)
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def histogram_table(results: dict) -> list[str]:
  """Predictions on the class-A test samples the clean model got right (Table V)."""
  conditions = results["conditions"]
  names = list(next(iter(conditions.values()))["histogram"])
  header = ["Condition"] + names + ["total"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, cond in conditions.items():
    row = [CONDITION_NAMES.get(name, name)] + [str(cond["histogram"][n]) for n in names]
    lines.append("| " + " | ".join(row + [str(cond["histogram_total"])]) + " |")
  return lines


def attacker_name(name: str) -> str:
  """The attack's registered display name and its ``--attack`` value."""
  spec = registry.ATTACKS.get(name)
  return f"{spec.display_name} (`{name}`)" if spec else f"`{name}`"


def attack_lines(results: dict) -> list[str]:
  attack = results["attack"]
  if results["experiment"] == "blending":
    return [f"- Blending ratio {results['blend_ratio']} with class "
            f"{results['class_b']}; submitted labels: "
            f"{attack['submitted_label_counts']}; {attack['queries']} oracle queries."]
  if results["experiment"] == "unlearning_gradient":
    return [f"- Attacker {attacker_name(results['attacker'])}"
            + (" (white-box: the server's model, the upper bound)"
               if results["white_box"] else " (surrogate transfer)")
            + f"; {attack['successes']}/{attack['samples']} within the L2 bound "
            f"(mean {attack['l2_mean']}); objective {attack['objective_first']} -> "
            f"{attack['objective_final']}."]
  submitted = len(results["submitted_ids"])
  lines = [f"- Attacker {attacker_name(results.get('attacker', 'zoo'))}; sample rule "
           f"`{results.get('sample_rule', 'fraction_first')}`: N = "
           f"{attack['requested']} requested; {attack['candidates_tried']} "
           f"candidates tried ({attack['candidates_misclassified']} misclassified "
           f"by the clean model, {attack['attacked']} attacked); submitted in every "
           f"condition: {submitted} (pushed by both methods)"
           + (f", {attack['requested'] - submitted} short of N: "
              + ("class A ran out." if results.get("sample_rule") == "released"
                 else "the failures are dropped (fraction_first).")
              if submitted < attack["requested"] else ".")]
  if results.get("noise_term_share") is not None:
    lines.append(f"- Samples keeping their noise term in the first-order update: "
                 f"{pct(results['noise_term_share'])}.")
  for name in ("pushing_i", "pushing_ii"):
    s = attack[name]
    l2 = s["l2"]
    lines.append(
        f"- {CONDITION_NAMES[name]}: {s['successes']}/{attack['attacked']} "
        f"succeeded ({pct(s['success_rate'])}), L2 mean "
        f"{l2['mean'] if l2['mean'] is None else round(l2['mean'], 3)}, "
        f"max {l2['max'] if l2['max'] is None else round(l2['max'], 3)}; "
        f"statuses {s['status_counts']}.")
  q = attack["queries_per_sample"]
  lines.append(f"- Queries per attacked sample: median "
               f"{q['median'] if q['median'] is None else round(q['median'])}, mean "
               f"{q['mean'] if q['mean'] is None else round(q['mean'])}, "
               f"max {q['max'] if q['max'] is None else round(q['max'])}; oracle "
               f"total {attack['oracle_queries']:,}; attack time "
               f"{attack['attack_seconds']:.0f}s"
               + (" (reused a saved push)" if attack["reused_saved_push"] else "")
               + ".")
  speed = results.get("throughput")
  if speed:
    compiling = speed.get("compile_seconds")
    lines.append(f"- Throughput: {speed['attack_queries_per_second']:,.0f} oracle "
                 f"images/s in the attack against {speed['forward_images_per_second']:,.0f}"
                 f" raw forward images/s of the same model in the same process "
                 f"(ratio {speed['ratio']:.2f}, {speed['devices']} device(s))"
                 + (f"; both leave out compiling, {compiling:.0f} s of the push "
                    f"(with it: {speed['attack_queries_per_second_with_compiling']:,.0f}"
                    f" images/s, ratio {speed['ratio_with_compiling']:.2f})."
                    if compiling is not None else "."))
  if attack.get("slot_occupancy") is not None:
    lines.append(f"- Slot occupancy: {attack['slot_occupancy']:.3f} of the pushes' "
                 "batch rows x iterations run held a live sample.")
  return lines


def memory_lines(results: dict) -> list[str]:
  rss = results.get("host_peak_rss_mib")
  if not rss:
    return []
  return [f"- Peak host memory (RSS): {rss['before_attack'] / 1024:.1f} GiB before "
          f"the attack, {rss['after_attack'] / 1024:.1f} GiB after it, "
          f"{rss['at_end'] / 1024:.1f} GiB at the end."]


def markdown(results: dict) -> str:
  """``results.md``: the run's tables in the paper's layout."""
  config = results["config"]
  train = config["train"]
  title = {"pushing": "Pushing-I / Pushing-II", "blending": "Blending",
           "unlearning_gradient": "Gradient through unlearning"}[
               results["experiment"]]
  clean = results["clean_model"]
  lines = [
      f"# {title} on {results['data_note']}",
      "",
      f"Model {train['model']} (width {train['width'] or 'paper'}, "
      f"{clean['num_params']:,} parameters), clean train accuracy "
      f"{pct(clean['train_accuracy'])}, test accuracy {pct(clean['test_accuracy'])}. "
      f"Class A: {results['class_a']}, fraction {config['samples']['fraction']}, "
      f"unlearning: {results['unlearning']} {results['unlearning_settings']}.",
      "",
      "## Test accuracy (Table IV / Fig. 5 layout; arrows: change vs normal "
      "unlearning)",
      "", *accuracy_table(results), "",
      f"## Predictions on the {results['class_a']} test samples the clean model got "
      "right (Fig. 6-7 / Table V layout)",
      "", *histogram_table(results), "",
      "## Attack", "", *attack_lines(results), *memory_lines(results), "",
      f"Commit {results['git']['commit'][:12]}"
      + (" (with local changes)" if results["git"]["dirty"] else "")
      + f"; command: `{results['command']}`.",
      "",
  ]
  return "\n".join(lines)


def class_a_figure(results: dict, path: str) -> str:
  """Fig. 5: class-A (and class-B) accuracy per condition."""
  plt = figures.pyplot()
  conditions = results["conditions"]
  names = [CONDITION_NAMES.get(n, n) for n in conditions]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  values = [100 * c["class_a_accuracy"] for c in conditions.values()]
  bars = ax.bar(names, values, color=["#888", "#4c72b0", "#dd8452", "#c44e52",
                                      "#55a868"][:len(names)])
  ax.bar_label(bars, fmt="%.1f")
  ax.set_ylabel(f"{results['class_a']} test accuracy (%)")
  ax.set_ylim(0, 105)
  ax.set_title(f"Over-unlearning-I on {results['dataset']} ({results['class_a']})")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def histogram_figure(results: dict, path: str) -> str:
  """Fig. 6-7: where the clean-correct class-A test samples go after unlearning."""
  plt = figures.pyplot()
  conditions = {k: v for k, v in results["conditions"].items() if k != "clean"}
  classes = list(next(iter(conditions.values()))["histogram"])
  fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(classes) + 2), 3.8))
  width = 0.8 / len(conditions)
  for i, (name, cond) in enumerate(conditions.items()):
    total = max(cond["histogram_total"], 1)
    xs = [j + i * width for j in range(len(classes))]
    ax.bar(xs, [100 * cond["histogram"][c] / total for c in classes], width,
           label=CONDITION_NAMES.get(name, name))
  ax.set_xticks([j + 0.4 - width / 2 for j in range(len(classes))])
  ax.set_xticklabels(classes, rotation=45, ha="right")
  ax.set_yscale("symlog", linthresh=1)
  ax.set_ylabel("% of clean-correct samples")
  ax.set_title(f"Predictions on {results['class_a']} test samples after unlearning")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def sweep_figure(measured: dict, path: str) -> str:
  """Fig. 8 / Fig. 10: drop versus normal unlearning against the number of samples."""
  plt = figures.pyplot()
  first = next(iter(measured.values()))
  pushing = first["experiment"] == "pushing"
  key = "overall_accuracy" if pushing else "class_b_accuracy"
  methods = ("pushing_i", "pushing_ii") if pushing else ("blending",)
  counts = [len(r["submitted_ids"]) for r in measured.values()]
  fig, ax = plt.subplots(figsize=(5.5, 3.5))
  for method in methods:
    drops = [100 * (r["conditions"]["normal"][key] - r["conditions"][method][key])
             for r in measured.values()]
    ax.plot(counts, drops, marker="o", label=CONDITION_NAMES[method])
  ax.set_xlabel("samples submitted (N)")
  ax.set_ylabel(f"drop vs normal unlearning\n({key.replace('_', ' ')}, points)")
  ax.axhline(0, color="#888", lw=0.8)
  ax.legend(fontsize=8)
  ax.set_title(f"{'Fig. 10' if pushing else 'Fig. 8a'} on {first['dataset']}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_figures(results: dict, workdir: str) -> list[str]:
  prefix = results["experiment"]
  return [class_a_figure(results, os.path.join(workdir, f"{prefix}_class_accuracy.png")),
          histogram_figure(results, os.path.join(workdir,
                                                 f"{prefix}_prediction_distribution.png"))]

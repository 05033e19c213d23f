"""The paper's tables and figures as grids of runs, with the paper's numbers.

Each entry of ``TABLES`` says which runs a table needs (``grid``: point name and
the settings it overrides, by flag name: ``overrides.override``) and how to put the paper's numbers beside
the measured ones (``report``). The numbers are those of docs/protocol.md §14, in
percent.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

OVERALL = ("normal", "pushing_i", "pushing_ii")
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)

PAPER = {
    "IV": {"cifar10": {0.1: (79.3, 73.5, 73.7), 0.5: (78.7, 66.4, 66.9)},
           "cifar100": {0.1: (51.1, 50.7, 50.7), 0.5: (49.7, 49.1, 49.2)},
           "stl10": {0.1: (56.6, 56.2, 49.7), 0.5: (50.2, 49.5, 32.8)}},
    "XII": {"cifar10": {0.1: (80.6, 79.8, 79.6), 0.5: (78.9, 75.9, 75.8)},
            "cifar100": {0.1: (51.3, 50.8, 51.0), 0.5: (51.3, 50.8, 50.7)},
            "stl10": {0.1: (58.3, 56.6, 56.9), 0.5: (56.8, 56.1, 56.0)}},
    # Table V: (airplane still correct, predicted cat) of 878 clean-correct.
    "V": {0.1: {"normal": (817, 2), "pushing_i": (509, 25), "pushing_ii": (538, 20)},
          0.5: {"normal": (708, 5), "pushing_i": (26, 378), "pushing_ii": (31, 247)}},
    # Table VI: (apple still correct, predicted sweet pepper) of 71 clean-correct.
    "VI": {0.1: {"normal": (70, 1), "pushing_i": (57, 10), "pushing_ii": (59, 8)},
           0.5: {"normal": (54, 13), "pushing_i": (2, 41), "pushing_ii": (5, 45)}},
    "VII": {"bird": (74.6, 74.4), "horse": (80.5, 80.4), "ship": (94.0, 93.8)},
    "VIII": {"vgg3": (79.3, 73.6, 73.7), "resnet": (69.4, 66.9, 68.3)},
    "IX": {"vgg3": (79.3, 73.6, 73.7), "vgg4": (76.5, 72.7, 69.5),
           "vgg5": (73.3, 65.6, 65.7)},
    "X": {"bird": (76.2, 74.1, 73.7), "horse": (78.4, 75.6, 75.8),
          "ship": (77.5, 73.5, 72.9)},
    "XI": {"cifar10": {0.1: (79.3, 73.2), 0.5: (78.7, 65.0)},
           "cifar100": {0.1: (51.1, 50.9), 0.5: (49.7, 49.2)},
           "stl10": {0.1: (56.6, 56.5), 0.5: (50.2, 49.0)}},
    # Table III: cat-class accuracy drop of blending vs normal, by (fraction, ratio).
    "III": {(0.1, 0.3): 0.7, (0.1, 0.5): 1.4, (0.5, 0.3): 2.8, (0.5, 0.5): 8.1},
    # Fig. 5 (CIFAR-10 airplane accuracy): clean, normal, pushing (about).
    "fig5": {0.1: (87.8, 81.7, 29.5), 0.5: (87.8, None, 2.0)},
    # Fig. 10: overall drop of pushing vs normal (about), by fraction.
    "fig10": {0.1: 6.0, 0.5: 12.0},
    # Fig. 8a: cat drop of blending vs normal at ratio 0.3 (about), by fraction.
    "fig8": {0.1: 0.7, 0.5: 2.8},
}


class Table(NamedTuple):
  grid: Callable[[], list[tuple[str, dict]]]
  report: Callable[[str, dict], list[str]]
  models: tuple[str, ...] | None = None   # None: the --model flag's.
  dataset: str | None = None              # The paper's dataset, when fixed.


def pct(results: dict, condition: str, key: str = "overall_accuracy") -> float:
  return 100 * results["conditions"][condition][key]


def _cells(paper, measured) -> str:
  return " | ".join(f"{p} | {m:.1f} | {m - p:+.1f}" if p is not None
                    else f"- | {m:.1f} | -" for p, m in zip(paper, measured))


def _header(names) -> list[str]:
  return ["| Point | " + " | ".join(f"{n} paper | measured | diff" for n in names)
          + " |", "|" + "---|" * (1 + 3 * len(names))]


def _fraction(results: dict) -> float:
  return results["config"]["samples"]["fraction"]


def _class_a_line(measured: dict) -> list[str]:
  return ["", "Class-A test accuracy (%): " + "; ".join(
      f"{p}: " + ", ".join(f"{c} {pct(r, c, 'class_a_accuracy'):.1f}"
                           for c in ("clean",) + OVERALL)
      for p, r in measured.items()), ""]


def overall_report(paper_of: Callable[[str, dict], tuple]):
  def report(dataset: str, measured: dict) -> list[str]:
    lines = ["Overall test accuracy (%) after unlearning.", "", *_header(OVERALL)]
    for point, results in measured.items():
      paper = paper_of(dataset, point, results) or (None,) * 3
      lines.append(f"| {point} | "
                   + _cells(paper, [pct(results, c) for c in OVERALL]) + " |")
    return lines + _class_a_line(measured)
  return report


def histogram_report(table: str, target: str):
  def report(dataset: str, measured: dict) -> list[str]:
    del dataset
    lines = [f"Predictions on the class-A test samples the clean model got right: "
             f"(still class A, now {target}).", "",
             "| Point | Condition | paper | measured (of total) |", "|---|---|---|---|"]
    for point, results in measured.items():
      for c in OVERALL:
        h = results["conditions"][c]["histogram"]
        paper = PAPER[table].get(_fraction(results), {}).get(c)
        lines.append(f"| {point} | {c} | {paper} | ({h[results['class_a']]}, "
                     f"{h.get(target)}) of "
                     f"{results['conditions'][c]['histogram_total']} |")
    return lines
  return report


def blending_drop_report(key: Callable[[dict], object], table: str):
  def report(dataset: str, measured: dict) -> list[str]:
    del dataset
    lines = ["Class-B test accuracy (%), blending vs normal.", "",
             "| Point | paper drop | normal | blending | measured drop |",
             "|---|---|---|---|---|"]
    for point, results in measured.items():
      normal = pct(results, "normal", "class_b_accuracy")
      blended = pct(results, "blending", "class_b_accuracy")
      lines.append(f"| {point} | {PAPER[table].get(key(results))} | {normal:.1f} | "
                   f"{blended:.1f} | {normal - blended:.1f} |")
    return lines
  return report


def table_vii_report(dataset: str, measured: dict) -> list[str]:
  del dataset
  lines = ["Class-B test accuracy (%), N = 50% of airplane, ratio 0.3.", "",
           *_header(("normal", "blending"))]
  for point, results in measured.items():
    values = [pct(results, c, "class_b_accuracy") for c in ("normal", "blending")]
    lines.append(f"| {point} | " + _cells(PAPER["VII"][point], values) + " |")
  return lines


def table_xi_report(dataset: str, measured: dict) -> list[str]:
  lines = ["Overall test accuracy (%) with blending.", "",
           *_header(("normal", "blending"))]
  for point, results in measured.items():
    paper = PAPER["XI"].get(dataset, {}).get(_fraction(results), (None, None))
    values = [pct(results, c) for c in ("normal", "blending")]
    lines.append(f"| {point} | " + _cells(paper, values) + " |")
  return lines


def fig5_report(dataset: str, measured: dict) -> list[str]:
  del dataset
  lines = ["Class-A (airplane) test accuracy (%); the paper's pushing value is "
           "'about', read from the figure.", "",
           *_header(("clean", "normal", "Pushing-II"))]
  for point, results in measured.items():
    paper = PAPER["fig5"].get(_fraction(results), (None,) * 3)
    values = [pct(results, c, "class_a_accuracy")
              for c in ("clean", "normal", "pushing_ii")]
    lines.append(f"| {point} | " + _cells(paper, values) + " |")
  return lines


def sweep_report(experiment: str):
  def report(dataset: str, measured: dict) -> list[str]:
    del dataset
    methods = ("pushing_i", "pushing_ii") if experiment == "pushing" else (
        "blending",)
    key = "overall_accuracy" if experiment == "pushing" else "class_b_accuracy"
    lines = [f"Drop versus normal unlearning ({key}, points); the paper's values "
             "are 'about', read from its figure.", "",
             "| Point | paper | " + " | ".join(methods) + " |",
             "|" + "---|" * (2 + len(methods))]
    figure = "fig10" if experiment == "pushing" else "fig8"
    for point, results in measured.items():
      normal = pct(results, "normal", key)
      drops = [f"{normal - pct(results, m, key):.1f}" for m in methods]
      paper = PAPER[figure].get(_fraction(results))
      lines.append(f"| {point} | {paper if paper is not None else '-'} | "
                   + " | ".join(drops) + " |")
    return lines
  return report


def _iv_paper(table):
  def paper_of(dataset, point, results):
    return PAPER[table].get(dataset, {}).get(_fraction(results))
  return paper_of


BLEND = {"attack": "blending"}
REGIMES = {"eq13": {"reference_code": False}, "released": {"reference_code": True}}

TABLES = {
    "III": Table(lambda: [(f"fraction_{f}_ratio_{r}",
                           {**BLEND, "fraction": f, "blend_ratio": r})
                          for f in (0.1, 0.5) for r in (0.3, 0.5)],
                 blending_drop_report(lambda r: (_fraction(r),
                                                 r["blend_ratio"]), "III")),
    "IV": Table(lambda: [(f"fraction_{f}_{name}",
                          {"fraction": f, **regime})
                         for f in (0.1, 0.5) for name, regime in REGIMES.items()],
                overall_report(_iv_paper("IV"))),
    "V": Table(lambda: [(f"fraction_{f}_to_cat",
                         {"fraction": f, "target_class": "cat"})
                        for f in (0.1, 0.5)],
               histogram_report("V", "cat")),
    "VI": Table(lambda: [(f"fraction_{f}_to_sweet_pepper",
                          {"fraction": f, "target_class": "sweet_pepper"})
                         for f in (0.1, 0.5)],
                histogram_report("VI", "sweet_pepper"), dataset="cifar100"),
    "VII": Table(lambda: [(c, {**BLEND, "fraction": 0.5, "blend_ratio": 0.3,
                                "blend_class": c})
                          for c in ("bird", "horse", "ship")], table_vii_report),
    "VIII": Table(lambda: [("fraction_0.1", {"fraction": 0.1})],
                  overall_report(lambda d, p, r: PAPER["VIII"].get(p.split("/")[0])),
                  models=("vgg3", "resnet")),
    "IX": Table(lambda: [("fraction_0.1", {"fraction": 0.1})],
                overall_report(lambda d, p, r: PAPER["IX"].get(p.split("/")[0])),
                models=("vgg3", "vgg4", "vgg5")),
    "X": Table(lambda: [(c, {"unlearn_class": c})
                        for c in ("bird", "horse", "ship")],
               overall_report(lambda d, p, r: PAPER["X"].get(p))),
    "XI": Table(lambda: [(f"fraction_{f}", {**BLEND, "fraction": f})
                         for f in (0.1, 0.5)], table_xi_report),
    "XII": Table(lambda: [(f"fraction_{f}",
                           {"fraction": f, "unlearning": "fine_tune"})
                          for f in (0.1, 0.5)],
                 overall_report(_iv_paper("XII"))),
    "fig5": Table(lambda: [(f"fraction_{f}", {"fraction": f})
                           for f in (0.1, 0.5)], fig5_report),
    "fig8": Table(lambda: [(f"fraction_{f}", {**BLEND, "fraction": f})
                           for f in FRACTIONS], sweep_report("blending")),
    "fig10": Table(lambda: [(f"fraction_{f}", {"fraction": f})
                            for f in FRACTIONS], sweep_report("pushing")),
}

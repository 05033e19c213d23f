"""Adaptive attackers against the defences, and what each screen lets through.

Two users who know the server screens requests (issue 13; not in the paper):

* **Margin evasion** (``pushing_i_kappa<k>``, ``pushing_ii_kappa<k>``): every
  submitted Pushing-I / Pushing-II sample is moved along its push direction until
  the oracle's probability margin is at least kappa
  (``ounl_jax/attacks/margin_evasion.py``), to slip under the boundary-margin
  screen. Black-box: the moves are counted oracle queries.
* **Mixing** (``mixed_<p>``): a request whose first ``p`` of the samples are
  Pushing-II and the rest the user's other samples unmodified, to stay under the
  utility guard's accuracy-drop bounds.

Two against the protections (issue 25, ``experiments/server/protections.py``):

* **Projection** (``pushing_i_projected``, ``pushing_ii_projected``): the push's
  low-pass part (the record-matching space, docs/defences.md) shrunk to within
  the match radius of the user's own original, the rest kept
  (``project_within_radius``): each sample then matches its original.
* **Many small requests** (``<attack>_split<k>``, made by
  ``experiments/studies/defences/protect.py``): the attack's request sent as k
  requests in sequence, to stay under a per-request damage bound.
* **Aiming at other records** (``boundary_records``): under record matching the
  server unlearns whichever stored record a submitted image matches, so the most a
  user can make it unlearn is N stored records of the label, chosen to hurt. This
  set is the upper bound of that user: the N stored class-A training records that
  are not the user's and that the clean model puts nearest its boundary (smallest
  ``log p_A - max_j log p_j``), sent as they are, so each matches itself. A real
  user holds none of them and could at best aim near some; the set grants it all.

``after_screening`` measures what a server that drops the flagged samples and
unlearns the rest ends up with (class-A and overall accuracy), per screen and
attack; ``tradeoff_figure`` plots detection against the class-A gap left.
"""

from __future__ import annotations

import numpy as np

from experiments.attacks.pushing import artefact
from experiments.run import pipeline
from ounl_jax import service as service_lib
from ounl_jax.attacks import labels as labels_lib
from ounl_jax.attacks import margin_evasion
from ounl_jax.defences import record_matching
from ounl_jax.defences import screening
from experiments.reports import figures



def label(attack: str) -> str:
  """A reader's name for an attack set."""
  names = {"normal": "Normal (unmodified)", "blending": "Blending",
           "pushing_i": "Pushing-I", "pushing_ii": "Pushing-II"}
  if attack in names:
    return names[attack]
  if "_kappa" in attack:
    base, kappa = attack.split("_kappa")
    return f"{names[base]}, margin >= {kappa} (adaptive)"
  if attack.startswith("mixed_"):
    return f"Pushing-II {float(attack[6:]):.0%} + honest (adaptive)"
  if attack == "boundary_records":
    return "Other users' records nearest the boundary (adaptive, upper bound)"
  if attack.endswith("_projected") and attack[:-10] in names:
    return f"{names[attack[:-10]]}, projected to its record (adaptive)"
  if "_split" in attack:
    base, k = attack.split("_split")
    return (f"{names.get(base, base)} in {k} requests"
            + ("" if base == "normal" else " (adaptive)"))
  return attack


def evasion_sets(ctx: pipeline.Context, config, pushed: dict, rows: np.ndarray,
                 kappas) -> tuple[dict, dict]:
  """Pushing-I / II of ``rows`` moved to each margin kappa; sets and statistics."""
  paired = artefact.submissions(pushed, rows)
  original, class_a = paired["normal"]
  sets, stats = {}, {}
  for kappa in kappas:
    for name, inside in (("pushing_i", True), ("pushing_ii", False)):
      oracle = pipeline.new_server(ctx, config).oracle()
      evaded = margin_evasion.evade_margin(
          oracle, oracle.init(), original, paired[name][0],
          class_a, margin_evasion.MarginEvasionSettings(
              kappa=kappa, max_l2=config.attack.push.max_l2), inside=inside)
      ok = evaded.success
      key = f"{name}_kappa{kappa:g}"
      sets[key] = (evaded.images[ok].astype(np.float32),
                   paired[name][1][ok])
      stats[key] = {"kappa": kappa, "successes": int(ok.sum()),
                    "samples": int(len(ok)),
                    "queries_per_sample": (float(evaded.queries.mean())
                                           if len(ok) else None),
                    "l2_mean": float(np.nanmean(evaded.l2)) if ok.any() else None}
  return sets, stats


def mixed_sets(normal: tuple, pushing_ii: tuple, fractions) -> dict:
  """Requests of the same size: the first ``p`` Pushing-II, the rest unmodified."""
  sets = {}
  for p in fractions:
    k = int(round(p * len(normal[1])))
    sets[f"mixed_{p:g}"] = (np.concatenate([pushing_ii[0][:k], normal[0][k:]]),
                            np.concatenate([pushing_ii[1][:k], normal[1][k:]]))
  return sets


def boundary_records(ctx: pipeline.Context, config, user_ids: np.ndarray,
                     count: int) -> dict:
  """``{"boundary_records": (images, labels)}``: the ``count`` stored class-A
  training records outside ``user_ids`` with the smallest clean margin (module
  doc; margins from the server's own answers, an upper bound's knowledge)."""
  class_a = pipeline.class_a_of(ctx.spec, config)
  train = ctx.splits.train
  others = np.flatnonzero((train.labels == class_a)
                          & ~np.isin(train.ids, np.asarray(user_ids)))
  oracle = pipeline.new_server(ctx, config).oracle()
  answers, _ = labels_lib.oracle_answers(oracle, oracle.init(),
                                         train.images[others])
  logs = np.log(np.maximum(answers, 1e-30))
  rival = np.max(np.delete(logs, class_a, axis=1), axis=1)
  chosen = others[np.argsort(logs[:, class_a] - rival, kind="stable")[:count]]
  return {"boundary_records": (train.images[chosen], train.labels[chosen])}


def project_within_radius(original, pushed, radius: float,
                          slack: float = 0.9) -> np.ndarray:
  """``pushed`` with the low-pass part P d of its push d = pushed - original
  scaled to L2 at most ``slack * radius`` (the rest, (I - P) d, kept), clipped to
  the pixel range: within the match radius of ``original`` (up to the clipping)."""
  settings = record_matching.MatchSettings()
  low = (record_matching.project(pushed, settings)
         - record_matching.project(original, settings))
  norms = np.sqrt((low.astype(np.float64) ** 2).reshape(len(low), -1).sum(1))
  scale = np.minimum(1.0, slack * radius / np.maximum(norms, 1e-12))
  moved = pushed - (1.0 - scale)[:, None, None, None] * low
  return np.clip(moved, -0.5, 0.5).astype(np.float32)


def projected_sets(attacks: dict, radius: float) -> dict:
  """Pushing-I / II projected to within ``radius`` of their originals."""
  original = attacks["normal"][0]
  return {f"{name}_projected": (project_within_radius(original, attacks[name][0],
                                                      radius), attacks[name][1])
          for name in ("pushing_i", "pushing_ii") if len(attacks[name][1])}


_EMPTY = (np.zeros((0, 1, 1, 1), np.float32), np.zeros(0, np.int32))


def _accuracies(ctx, config, class_a: int, images, labels) -> dict:
  server = pipeline.new_server(ctx, config)
  if len(labels):
    server.unlearn(service_lib.UnlearningRequest(images, labels))
  report = pipeline.condition_report(ctx, server, class_a, {})
  return {"passed": int(len(labels)), "overall_accuracy": report["overall_accuracy"],
          "class_a_accuracy": report["class_a_accuracy"]}


def after_screening(ctx, config, scorers: dict, sample_results: dict,
                    attacks: dict) -> dict:
  """Per screen and attack: the server drops flagged samples, unlearns the rest."""
  class_a = pipeline.class_a_of(ctx.spec, config)
  out = {"none": {a: _accuracies(ctx, config, class_a, *s)
                  for a, s in attacks.items()},
         "clean": _accuracies(ctx, config, class_a, *_EMPTY)}
  for name, score in scorers.items():
    threshold = sample_results[name]["threshold"]
    out[name] = {}
    for attack, (images, labels) in attacks.items():
      keep = (~screening.flagged(score(images, labels), threshold)
              if len(labels) else np.zeros(0, bool))
      out[name][attack] = _accuracies(ctx, config, class_a, images[keep],
                                      labels[keep])
  return out


def tradeoff_figure(results: dict, path: str) -> str:
  """Margin-screen detection against the class-A gap (vs normal) left after it."""
  plt = figures.pyplot()
  passed = results["after_screening"]["margin"]
  normal = passed["normal"]["class_a_accuracy"]
  detection = results["sample_defences"]["margin"]["attacks"]
  fig, ax = plt.subplots(figsize=(5.5, 4.2))
  for base, marker in (("pushing_i", "o"), ("pushing_ii", "s")):
    names = [base] + sorted((a for a in passed if a.startswith(base + "_kappa")),
                            key=lambda a: float(a.split("_kappa")[1]))
    xs = [np.nan if detection[a]["detection_rate"] is None
          else detection[a]["detection_rate"] for a in names]
    ys = [100 * (normal - passed[a]["class_a_accuracy"]) for a in names]
    ax.plot(xs, ys, marker=marker, label=label(base) + " (kappa 0 -> max)")
    for a, x, y in zip(names, xs, ys):
      ax.annotate(a.split("_kappa")[1] if "_kappa" in a else "0", (x, y),
                  fontsize=7, xytext=(3, 3), textcoords="offset points")
  ax.set_xlabel("detected by the margin screen (1% false rejection)")
  ax.set_ylabel("class-A gap vs normal after screening (points)")
  ax.set_title("Margin screen against margin-evading pushes (kappa labels)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path

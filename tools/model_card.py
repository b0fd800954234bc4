"""Writes docs/MODEL_CARD.md from the JSON files of `python -m idgbr.validate` and the model cards."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from idgbr.checkpoint import read_card
from idgbr.validate import CLASSICAL_ROW, bar_misses

METRICS = (("miou", "mIoU"), ("pixel_accuracy", "PA"), ("boundary_f", "BF (2 px)"),
           ("boundary_iou", "Boundary IoU (3 px)"), ("iou_imp", "IoU_imp"))


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _deltas(row: dict, base: dict) -> list[str]:
    """ΔBF, ΔBoundary IoU and ΔmIoU of a row over the coarse input."""
    return [_fmt(row[m] - base[m], True) for m in ("boundary_f", "boundary_iou", "miou")]


def results_table(results: dict) -> list[str]:
    lines = ["| coarse source | method | " + " | ".join(label for _, label in METRICS) + " | ΔBF | ΔBIoU | ΔmIoU |",
             "|---" * (len(METRICS) + 5) + "|"]
    for source, rows in results.items():
        base = rows["coarse (input)"]
        for method, r in rows.items():
            deltas = _deltas(r, base) if method != "coarse (input)" else ["", "", ""]
            cells = [_fmt(r.get(m)) if not (m == "iou_imp" and method == "coarse (input)") else "—" for m, _ in METRICS]
            lines.append(f"| {source} | {method} | " + " | ".join(cells) + " | " + " | ".join(deltas) + " |")
    return lines


def delta_table(results: dict) -> list[str]:
    lines = ["| coarse source | method | ΔBF | ΔBIoU | ΔmIoU |", "|---|---|---|---|---|"]
    for source, rows in results.items():
        base = rows["coarse (input)"]
        for method, r in rows.items():
            if method != "coarse (input)":
                lines.append(f"| {source} | {method} | " + " | ".join(_deltas(r, base)) + " |")
    return lines


def per_class_table(results: dict) -> list[str]:
    first = next(iter(next(iter(results.values())).values()))
    names = list(first["per_class_iou"])
    lines = ["| coarse source | method | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for source, rows in results.items():
        for method, r in rows.items():
            lines.append(f"| {source} | {method} | " + " | ".join(_fmt(r["per_class_iou"][n]) for n in names) + " |")
    return lines




def _default_row(rows: dict) -> str:
    return next(r for r in rows if r.endswith("(default)"))


def bar_table(results: dict) -> list[str]:
    """One line per dataset and coarse source: the default sampler's gains against the bar."""
    lines = ["| data | coarse source | ΔBF | ΔBIoU | ΔmIoU | classical ΔBF | bar |", "|---|---|---|---|---|---|---|"]
    for dataset, per_source in results.items():
        for source, rows in per_source.items():
            base, row = rows["coarse (input)"], rows[_default_row(rows)]
            classical = rows[CLASSICAL_ROW]
            misses = bar_misses(source, base, row, classical)
            verdict = "**met**" if not misses else "not met: " + ", ".join(misses)
            lines.append(f"| {dataset} | {source} | " + " | ".join(_deltas(row, base)) +
                         f" | {_fmt(classical['boundary_f'] - base['boundary_f'], True)} | {verdict} |")
    return lines


def stage_lines(stages: list[dict]) -> list[str]:
    """How a refiner trained in several stages spent its iterations (nothing for a run of one stage)."""
    if len(stages) < 2:
        return []

    def crops(stage: dict) -> str:
        if "dubai_share" not in stage:
            return ""
        share = stage["dubai_share"]
        return ", crops by area" if share is None else f", {share:.0%} of crops from Dubai"

    return ["", "Stages: " + "; ".join(
        f"iterations {s['iterations'][0]:,}–{s['iterations'][1]:,} at {s.get('precision', 'an unrecorded precision')}"
        f"{crops(s)}" + (f" (schedule of {s['scheduled_iterations']:,})" if "scheduled_iterations" in s else "")
        for s in stages) + "."]


def section(summary_path: Path, models_dir: Path) -> list[str]:
    summary = json.loads(summary_path.read_text())
    name = summary_path.stem
    card = read_card(models_dir / f"{name}.safetensors")
    sampler = card.sampler
    coarse = card.training.get("coarse", {})
    refiner = card.training.get("refiner", {})
    datasets = summary["datasets"]
    lines = [
        f"## `{name}` — {card.task}, {card.num_classes} classes",
        "",
        "Classes: " + ", ".join(f"{c.id} {c.name} ({c.color})" for c in card.classes) + ".",
        f"Works at about {card.pixel_size_m} m per pixel.",
        f"Sampler defaults: **{sampler.steps} DDIM step{'s' if sampler.steps > 1 else ''}** from pure noise, "
        f"changes only within **{sampler.band} px** of a coarse boundary, only to classes present within "
        f"**{sampler.vocabulary} px**, and only where the refiner prefers the new class over the coarse class with a "
        "probability of at least "
        f"**{sampler.min_confidence}**; seed {sampler.seed}.",
        "",
        f"Training: coarse segmenter {coarse.get('iterations')} iterations ({coarse.get('minutes')} min); refiner "
        f"{refiner.get('iterations')} of {refiner.get('scheduled_iterations')} scheduled iterations, "
        f"{refiner.get('hours')} h over {refiner.get('sessions')} session(s) on {refiner.get('device')} "
        f"({refiner.get('precision')}), real coarse maps of {', '.join(refiner.get('coarse_sources', [])) or 'none'}"
        f" plus synthetic errors ({refiner.get('synthetic_errors')}); {refiner.get('augmentation')}"
        f"{'; Accra drone tiles included' if refiner.get('accra') else ''}.",
        *stage_lines(refiner.get("stages", [])),
        "",
        "Validation data, never seen in training: " + "; ".join(
            f"{d} ({v['images']} images, {v['megapixels']} MP; defaults chosen on {len(v['selection_images'])} of "
            "them)" for d, v in datasets.items()) + ".",
        "",
        "Against the bar (default sampler; ΔmIoU ≥ −0.005 for every source, ΔBF ≥ +0.03 on the bundled "
        "segmenter's maps, +0.10 on 16-px blocky maps, +0.03 on displaced boundaries, and a higher BF than the "
        "classical refiner on every foreign source):",
        "",
        *bar_table(summary["results"]),
        "",
        *selection_section(summary),
    ]
    for dataset, per_source in summary["results"].items():
        lines += [f"### {name} on {dataset}", "", *results_table(per_source), "",
                  "The same rows on the images that the selection of the defaults never looked at:", "",
                  *delta_table(summary["results_outside_selection"][dataset]), "",
                  "Per-class IoU:", "", *per_class_table(per_source), ""]
    native = summary_path.with_name(f"{name}_native.json")
    if native.is_file():
        lines += native_section(name, json.loads(native.read_text()))
    lines += [f"![image, coarse, refined, truth](images/refinement_{name}.png)", ""]
    return lines


def selection_section(summary: dict) -> list[str]:
    """How the defaults were chosen. Older summaries hold the mean score alone, later ones also the worst
    source's mIoU change, the newest also the number of boundary-F targets missed on the selection images."""
    sweep = summary["selection_sweep"]
    tolerance = summary.get("step_tolerance")
    intro = ("Selection of the defaults (score = ΔBF + ΔBoundary IoU + ΔmIoU, an mIoU loss beyond −0.005 counted "
             "ten times, mean over datasets and coarse sources on the selection images")
    steps_first = f"; steps first, the fewest within {tolerance} of the best, then band and confidence together"
    first = next(iter(sweep.values()), None)
    if not isinstance(first, dict):
        header, rows = ["| setting | selection score |", "|---|---|"], [f"| {k} | {v:+.4f} |" for k, v in sweep.items()]
        return [f"{intro}{steps_first}):", "", *header, *rows, ""]
    if "bf_missed" not in first and "rules_missed" not in first:
        header = ["| setting | selection score | worst source's ΔmIoU |", "|---|---|---|"]
        rows = [f"| {k} | {v['score']:+.4f} | {v['worst_miou']:+.4f} |" for k, v in sweep.items()]
        return [f"{intro}{steps_first}, the best score among the settings where no source's mIoU falls below "
                "−0.005):", "", *header, *rows, ""]
    # Until the classical refiner's rule joined the selection, it counted the boundary-F targets alone.
    missed, column, what = ("bf_missed", "BF targets", "boundary-F targets") if "bf_missed" in first else \
        ("rules_missed", "BF rules", "boundary-F rules (each source's target gain, and on foreign sources a BF "
                                     "above the classical refiner's)")
    header = [f"| setting | selection score | worst source's ΔmIoU | {column} missed |",
              "|---|---|---|---|"]
    rows = [f"| {k} | {v['score']:+.4f} | {v['worst_miou']:+.4f} | {v[missed]} |" for k, v in sweep.items()]
    return [f"{intro}). For each step count, among the settings where no source loses mIoU on the selection "
            f"images (a margin under the bar's −0.005, as those images are few): the fewest {what} of the bar "
            "missed (per dataset and source), then the best score; then the fewest steps whose best "
            f"setting is as harmless, misses no more targets and scores within {tolerance} of the best:", "",
            *header, *rows, ""]


def native_section(name: str, native: dict) -> list[str]:
    """The whole pipeline at the imagery's own resolution (`python -m idgbr.validate_native`)."""
    lines = [f"### {name} at the imagery's own resolution", "",
             f"The {native['images']} Accra `val/` tiles as GeoTIFFs at their native {native['pixel_size_m']} m, "
             "run as a user would run them (`idgbr segment`, then `idgbr refine --coarse`) with the defaults; "
             "scored on the input's grid. The run plans: " + "; ".join(native["notes"]) + ".", "",
             "| coarse source | method | mIoU | BF (2 px) | Boundary IoU | ΔBF | ΔBIoU | ΔmIoU |",
             "|---|---|---|---|---|---|---|---|"]
    labels = {"coarse": "coarse (input)", "refined": "IDGBR (default)",
              "classical": CLASSICAL_ROW}
    for source, rows in native["results"].items():
        for method, row in rows.items():
            deltas = [_fmt(row.get(f"delta_{m}"), True) if method != "coarse" else ""
                      for m in ("boundary_f", "boundary_iou", "miou")]
            lines.append(f"| {source} | {labels.get(method, method)} | {_fmt(row['miou'])} | "
                         f"{_fmt(row['boundary_f'])} | {_fmt(row['boundary_iou'])} | " + " | ".join(deltas) + " |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("summaries", nargs="+", type=Path)
    parser.add_argument("--models", type=Path, default=Path("resources/models"))
    parser.add_argument("--intro", type=Path, default=Path("docs/model_card_intro.md"))
    parser.add_argument("--out", type=Path, default=Path("docs/MODEL_CARD.md"))
    args = parser.parse_args()
    lines = [args.intro.read_text().rstrip(), ""] if args.intro.is_file() else ["# Model card", ""]
    for summary in args.summaries:
        lines += section(summary, args.models)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Writes docs/MODEL_CARD.md from the JSON files of `python -m idgbr.validate` and the model cards."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from idgbr.checkpoint import read_card

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


def section(summary_path: Path, models_dir: Path) -> list[str]:
    summary = json.loads(summary_path.read_text())
    name = summary_path.stem
    card = read_card(models_dir / f"{name}.safetensors")
    training = card.get("training", {})
    sampler = card["sampler"]
    lines = [
        f"## `{name}` — {card['task']}, {card['num_classes']} classes",
        "",
        "Classes: " + ", ".join(f"{c['id']} {c['name']} ({c['color']})" for c in card["classes"]) + ".",
        f"Sampler defaults: **{sampler['steps']} DDIM steps**, strength {sampler['strength']} (start from pure "
        f"noise), guard band {sampler['guard_band']} px, seed {sampler['seed']}.",
        "",
        "Training: coarse segmenter on tiles " + ", ".join(training.get("coarse", {}).get("tiles", [])) +
        f" ({training.get('coarse', {}).get('iterations')} iterations, {training.get('coarse', {}).get('minutes')} "
        f"min); refiner {training.get('refiner', {}).get('iterations')} iterations, "
        f"{training.get('refiner', {}).get('minutes')} min on {training.get('refiner', {}).get('device')}, "
        f"coarse inputs: {training.get('refiner', {}).get('coarse_sources')}; out-of-fold models: "
        f"{', '.join(training.get('refiner', {}).get('out_of_fold_models') or {}) or 'none'}.",
        "",
        f"Validation: the whole held-out {summary['tile']} ({summary['images']} images, {summary['megapixels']} MP), "
        "never seen in training. Defaults were picked on " + ", ".join(summary["selection_images"]) +
        " by the score ΔBF + ΔBoundary IoU + ΔmIoU, mIoU losses counted three times, averaged over the coarse "
        "sources; the default is the fewest steps within "
        f"{summary.get('step_tolerance', 0)} of the best score (each step costs about 20 GFLOP/MP), then the best "
        "guard band for that step count:",
        "",
        "| setting | selection score |",
        "|---|---|",
        *[f"| {k} | {v:+.4f} |" for k, v in summary["selection_sweep"].items()],
        "",
        *results_table(summary["results"]),
        "",
        *([f"The same rows on the {summary['images'] - len(summary['selection_images'])} images that the selection "
           "of the defaults never looked at:", "", *delta_table(summary["results_outside_selection"]), ""]
          if "results_outside_selection" in summary else []),
        "Per-class IoU:",
        "",
        *per_class_table(summary["results"]),
        "",
        f"![image, coarse, refined, truth](images/refinement_{name}.png)",
        "",
    ]
    return lines


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

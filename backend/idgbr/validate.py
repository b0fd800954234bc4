"""Validation on data the models never saw: picks the sampler defaults, writes the model card's metrics and
the tables and figure of docs/MODEL_CARD.md.

    python -m idgbr.validate --model resources/models/dubai5.safetensors --data ../shared/datasets/dubai-aerial

Datasets: the held-out Dubai tile 8 (whole), and for building models the Accra `val/` band (drone tiles
shrunk to ~0.2 m). Coarse maps come from many sources, because a user brings *their own* model's map:
the bundled CNN segmenter, a second CNN of another architecture (a plain FCN), a gradient-boosted pixel
classifier, blocky maps (8, 16 and 32 px blocks, as from a low-resolution model) and maps with displaced
boundaries. Each is refined by a classical superpixel refiner, by the one-shot refiner (1 step of the same
network) and by the default sampler.

Defaults (steps, band = vocabulary radius, minimum confidence) are chosen on a selection part of each
dataset and reported on the rest as well as on the whole.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from .card import ModelCard
from .checkpoint import load_checkpoint, save_checkpoint
from .classes import IGNORE_ID
from .classical import PixelClassifier, superpixel_refine
from .data import BINARY_TASKS, Scene, load_accra, load_scenes
from .degrade import block_majority, jitter
from .metrics import Scores
from .model_bundle import ModelBundle, build_bundle, select_device
from .models.constraints import allowed_classes, constrain_logits, gate_changes
from .precision import check_precision, resolve_precision
from .train import pad_to_multiple, predict_scene

STEP_CHOICES = (1, 2)  # each further step costs 42 GFLOP/MP more; 3+ are not swept (validation time)
BAND_CHOICES = (4, 8, 16)  # the vocabulary radius equals the band
# The gate weighs the new class against the coarse class: 0.5 lets every change the refiner prefers through.
CONFIDENCE_CHOICES = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9)
STEP_TOLERANCE = 0.005  # fewer steps are preferred unless more steps gain more than this
MIOU_FLOOR = -0.005  # the bar: no coarse source may lose more mIoU than this
# The selection's constraint: no loss at all on its few images, a margin under the bar. At the bar itself,
# roads2's pick lost -0.004 on the selection images and -0.007 on the whole tile.
SELECTION_MIOU_FLOOR = 0.0
OWN_SOURCE = "bundled CNN segmenter"  # the model's own maps; every other source is foreign
# The bar's boundary-F gains, per coarse source (the model card checks the same numbers).
BF_TARGETS = {OWN_SOURCE: 0.03, "blocky (16-px blocks)": 0.10, "displaced boundaries (3-5 px)": 0.03}
CLASSICAL_ROW = "classical: SLIC superpixels + coarse majority"


def bar_misses(source: str, base: dict, refined: dict, classical: dict | None,
               miou_floor: float = MIOU_FLOOR) -> list[str]:
    """What of the bar a refined map misses for one coarse source (empty: met): mIoU not below the floor,
    the source's boundary-F gain, and on a foreign source a boundary F above the classical refiner's."""
    misses = []
    if refined["miou"] - base["miou"] < miou_floor:
        misses.append("mIoU")
    target = BF_TARGETS.get(source, 0.0)
    if refined["boundary_f"] - base["boundary_f"] < target:
        misses.append(f"BF < +{target:.2f}")
    if classical is not None and source != OWN_SOURCE and refined["boundary_f"] <= classical["boundary_f"]:
        misses.append("classical BF higher")
    return misses


@dataclass
class Dataset:
    name: str
    scenes: list[Scene]
    selection: list[int]  # indices used to choose the defaults


def binary_task(card: ModelCard) -> str | None:
    """"roads" or "buildings" for a binary model (from its foreground class name), None for multiclass."""
    if card.task == "multiclass":
        return None
    return "buildings" if "building" in card.classes[1].name.lower() else "roads"


def validation_datasets(card: ModelCard, data: Path, accra: Path | None, tile: str, select_parts: list[int],
                        max_images: int = 0) -> list[Dataset]:
    task = binary_task(card) or "multiclass"
    scenes = load_scenes(data, [tile], task)[: max_images or None]
    names = {f"{tile}/image_part_{p:03d}" for p in select_parts}
    datasets = [Dataset(f"Dubai {tile}", scenes, [i for i, s in enumerate(scenes) if s.name in names] or [0])]
    if task == "buildings" and accra is not None:
        val = load_accra(accra, "val", 4)[: max_images * 8 or None]
        # Every third tile chooses the defaults; the other two thirds are reported apart.
        datasets.append(Dataset("Accra val (~0.2 m)", val, list(range(0, len(val), 3))))
    return datasets


def _filled(truth: np.ndarray) -> torch.Tensor:
    """(1, H, W) ids of the truth with unlabelled pixels as class 0, for the synthetic coarse maps."""
    return torch.from_numpy(np.where(truth == IGNORE_ID, 0, truth).astype(np.int64))[None]


def displaced(truth: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The truth with its boundaries displaced by a smooth warp of a few px (seeded, reproducible)."""
    generator = torch.Generator().manual_seed(seed)
    return jitter(_filled(truth), k, generator, (3.0, 5.0))[0].numpy().astype(np.uint8)


def blocky_map(truth: np.ndarray, k: int, block: int) -> np.ndarray:
    return block_majority(_filled(truth), k, block)[0].numpy().astype(np.uint8)


def coarse_sources(bundle: ModelBundle, dataset: Dataset, second: ModelBundle | None,
                   classifier: PixelClassifier | None, task: str, foreground: int | None) -> dict[str, list]:
    k = bundle.num_classes
    scenes = dataset.scenes
    sources = {OWN_SOURCE: [predict_scene(bundle, s, task, foreground) for s in scenes]}
    if second is not None:
        sources["FCN (second CNN architecture)"] = [predict_scene(second, s, task, foreground) for s in scenes]
    if classifier is not None:
        sources["pixel classifier (gradient boosting)"] = [classifier.predict(s.image) for s in scenes]
    for block in (8, 16, 32):
        sources[f"blocky ({block}-px blocks)"] = [blocky_map(s.labels, k, block) for s in scenes]
    sources["displaced boundaries (3-5 px)"] = [displaced(s.labels, k, i) for i, s in enumerate(scenes)]
    return sources


def refine_logits(bundle: ModelBundle, image: np.ndarray, coarse: np.ndarray, steps: int, band: int,
                  seed: int = 0) -> torch.Tensor:
    """(K, H, W) refined logits of a whole image, under band = vocabulary radius ``band`` (-1: no rules)."""
    padded, height, width = pad_to_multiple(bundle.normalize(image.transpose(2, 0, 1)), bundle.card.size_multiple)
    coarse_t = torch.from_numpy(coarse.astype(np.int64))[None, None].float()
    coarse_t = F.pad(coarse_t, (0, padded.shape[-1] - width, 0, padded.shape[-2] - height), mode="replicate")
    logits = bundle.refine(padded, coarse_t[:, 0].long(), [(0, 0)], steps=steps, band=band, vocabulary=band,
                           seed=seed)
    return logits[0, :, :height, :width].float().cpu()


def decide(logits: torch.Tensor, coarse: np.ndarray, band: int, min_confidence: float) -> np.ndarray:
    """The map the sampler writes: rules of radius ``band`` on the logits, then the confidence gate."""
    coarse_t = torch.from_numpy(coarse.astype(np.int64))[None]
    allowed = allowed_classes(coarse_t, logits.shape[0], band, band)
    ids, _ = gate_changes(constrain_logits(logits[None], allowed), coarse_t, min_confidence)
    return ids[0].numpy().astype(np.uint8)


def score_maps(preds: list[np.ndarray], scenes: list[Scene], k: int, names: list[str],
               coarse: list[np.ndarray] | None, indices: list[int]) -> dict:
    scores = Scores(k, names)
    for i in indices:
        scores.add(preds[i], scenes[i].labels, None if coarse is None else coarse[i])
    return scores.result()


def score_whole_and_rest(preds: list[np.ndarray], dataset: Dataset, k: int, names: list[str],
                         coarse: list[np.ndarray]) -> tuple[dict, dict]:
    """Metrics over every image and over those outside the selection; each image is scored once."""
    per_image = []
    for pred, scene, base in zip(preds, dataset.scenes, coarse):
        per_image.append(Scores(k, names))
        per_image[-1].add(pred, scene.labels, base)
    whole, rest = Scores(k, names), Scores(k, names)
    for i, scores in enumerate(per_image):
        whole.absorb(scores)
        if i not in dataset.selection:
            rest.absorb(scores)
    return whole.result(), rest.result()


def selection_score(result: dict, base: dict) -> float:
    """Boundary gains; an mIoU loss beyond the bar counts ten times (semantics must not suffer)."""
    d_miou = result["miou"] - base["miou"]
    penalty = 10.0 * max(0.0, MIOU_FLOOR - d_miou)
    return (result["boundary_f"] - base["boundary_f"]) + (result["boundary_iou"] - base["boundary_iou"]) \
        + d_miou - penalty


@dataclass
class OperatingPoint:
    """How one sampler setting did on the selection images: the mean selection score over every dataset and
    coarse source, the mIoU change of the source that fared worst, and how many of the bar's boundary-F
    rules it missed (per dataset and source: the gain of BF_TARGETS, and on foreign sources a boundary F
    above the classical refiner's)."""
    score: float
    worst_miou: float
    rules_missed: int = 0

    @property
    def harmless(self) -> bool:
        return self.worst_miou >= SELECTION_MIOU_FLOOR


def best_point(points: dict[tuple[int, float], OperatingPoint], log) -> tuple[int, float]:
    """The key of the best setting among those where no source loses mIoU (SELECTION_MIOU_FLOOR): the one
    that misses the fewest boundary-F rules of the bar, then the highest mean score.

    A mean alone let large gains on blocky maps pay for losses on maps that were already good (displaced
    boundaries): the bar holds for each source, so the floor is a constraint and the per-source gains come
    before the average. When no setting meets the floor, the least harmful one is taken (the log says so)."""
    harmless = {key: point for key, point in points.items() if point.harmless}
    if harmless:
        return max(harmless, key=lambda key: (-harmless[key].rules_missed, harmless[key].score))
    log(f"  no setting keeps every source's mIoU change above {SELECTION_MIOU_FLOOR}; taking the least harmful")
    return max(points, key=lambda key: points[key].worst_miou)


def fewest_steps(best_by_steps: dict[int, OperatingPoint]) -> int:
    """The fewest sampler steps whose best setting is as good as the best of any step count: no more harmful,
    missing no more boundary-F rules of the bar, and within STEP_TOLERANCE of the best score (each step costs time)."""
    def rank(point: OperatingPoint) -> tuple[bool, int]:
        return point.harmless, -point.rules_missed

    top = max(best_by_steps.values(), key=lambda p: (rank(p), p.score))
    return min(steps for steps, point in best_by_steps.items()
               if rank(point) >= rank(top) and point.score >= top.score - STEP_TOLERANCE)


def classical_maps(dataset: Dataset, sources: dict[str, list], k: int) -> dict[str, list]:
    """The classical superpixel refiner's map of every image, per coarse source: the selection and the
    tables both score them."""
    return {source: [superpixel_refine(s.image, c, k) for s, c in zip(dataset.scenes, coarse)]
            for source, coarse in sources.items()}


# Refined logits of the selection images at the widest band: {(dataset, source): {steps: {scene index: logits}}}.
SampledLogits = dict[tuple[str, str], dict[int, dict[int, torch.Tensor]]]


def choose_defaults(bundle: ModelBundle, datasets: list[Dataset], all_sources: list[dict],
                    all_classical: list[dict], log, sampled: SampledLogits | None = None) -> tuple[dict, dict]:
    """Pick steps, band and minimum confidence together (a wide band needs a stricter gate, and fewer steps
    may need another gate): for each step count the best setting on the selection images (best_point),
    then the fewest steps whose best setting is as good (fewest_steps).

    Each step count is sampled once with the widest band; narrower bands and the gate are applied to its
    logits afterwards (for one step that is exactly the sampler's result, for more a close estimate). The
    samples are kept in ``sampled`` when given, so the tables need not sample those images again.

    The sweep records, per setting, each dataset and source's ΔBF and ΔmIoU on the selection images: which
    rule a setting misses, and where a lower gate would gain or harm."""
    if sampled is None:
        sampled = {}
    k, names = bundle.num_classes, [c.name for c in bundle.card.classes]
    widest = max(BAND_CHOICES)
    # (dataset, source name, coarse maps, base scores, classical refiner's scores, {steps: {scene: logits}})
    cases: list[tuple[Dataset, str, list[np.ndarray], dict, dict, dict[int, dict[int, torch.Tensor]]]] = []
    for dataset, sources, classical in zip(datasets, all_sources, all_classical):
        for source, coarse in sources.items():
            base = score_maps(coarse, dataset.scenes, k, names, None, dataset.selection)
            cases.append((dataset, source, coarse, base,
                          score_maps(classical[source], dataset.scenes, k, names, None, dataset.selection),
                          sampled.setdefault((dataset.name, source), {})))
    per_source: dict[str, dict[str, float]] = {}

    def evaluate(steps: int, band: int, conf: float) -> OperatingPoint:
        values, miou_changes, missed = [], [], 0
        per_source.clear()
        for dataset, source, coarse, base, classical, logits in cases:
            if steps not in logits:
                logits[steps] = {i: refine_logits(bundle, dataset.scenes[i].image, coarse[i], steps, widest)
                                 for i in dataset.selection}
            preds: list[np.ndarray | None] = [None] * len(dataset.scenes)
            for i in dataset.selection:
                preds[i] = decide(logits[steps][i], coarse[i], band, conf)
            # Only the selection's maps are set, and only those are scored.
            scores = score_maps(cast("list[np.ndarray]", preds), dataset.scenes, k, names, None, dataset.selection)
            values.append(selection_score(scores, base))
            miou_changes.append(scores["miou"] - base["miou"])
            # The floor is the harmless test's; here only the boundary-F rules count.
            missed += len(bar_misses(source, base, scores, classical, miou_floor=-np.inf))
            per_source[f"{dataset.name} / {source}"] = {
                "bf": round(scores["boundary_f"] - base["boundary_f"], 4),
                "miou": round(scores["miou"] - base["miou"], 4)}
        return OperatingPoint(float(np.mean(values)), float(min(miou_changes)), missed)

    sweep: dict[str, dict] = {}

    def record(key: str, point: OperatingPoint) -> OperatingPoint:
        sweep[key] = {"score": round(point.score, 4), "worst_miou": round(point.worst_miou, 4),
                      "rules_missed": point.rules_missed, "per_source": dict(per_source)}
        log(f"  {key}: score {point.score:+.4f}, worst ΔmIoU {point.worst_miou:+.4f}, "
            f"bar rules missed {point.rules_missed}")
        return point

    best_by_steps: dict[int, tuple[tuple[int, float], OperatingPoint]] = {}
    for steps in STEP_CHOICES:
        grid = {(b, c): record(f"steps={steps} band={b} min_confidence={c}", evaluate(steps, b, c))
                for b in BAND_CHOICES for c in CONFIDENCE_CHOICES}
        key = best_point(grid, log)
        best_by_steps[steps] = (key, grid[key])
    steps = fewest_steps({s: point for s, (_, point) in best_by_steps.items()})
    (band, conf), _ = best_by_steps[steps]
    log(f"defaults: steps={steps} band=vocabulary={band} min_confidence={conf}")
    return {"steps": steps, "band": band, "vocabulary": band, "min_confidence": conf}, sweep


def evaluate_dataset(bundle: ModelBundle, dataset: Dataset, sources: dict, classical: dict, defaults: dict,
                     sampled: SampledLogits | None = None) -> tuple[dict, dict]:
    """Rows per coarse source: coarse, classical refiner, one-shot refiner, default sampler (whole / rest).

    The selection's samples (``sampled``, at the widest band) are reused where they give exactly the
    sampler's map: one step, or the widest band."""
    k, names = bundle.num_classes, [c.name for c in bundle.card.classes]
    scenes = dataset.scenes
    band, conf = defaults["band"], defaults["min_confidence"]
    whole: dict[str, dict[str, dict]] = {}
    rest: dict[str, dict[str, dict]] = {}
    for source, coarse in sources.items():
        maps = {"coarse (input)": coarse, CLASSICAL_ROW: classical[source]}
        step_rows = [1] if defaults["steps"] == 1 else [1, defaults["steps"]]
        for steps in step_rows:
            label = f"IDGBR {steps} step{'s' if steps > 1 else ''}" + (" (default)" if steps == defaults["steps"]
                                                                       else " (one-shot)")
            exact = steps == 1 or band == max(BAND_CHOICES)
            reuse = (sampled or {}).get((dataset.name, source), {}).get(steps, {}) if exact else {}
            maps[label] = [decide(reuse[i] if i in reuse else refine_logits(bundle, s.image, c, steps, band),
                                  c, band, conf) for i, (s, c) in enumerate(zip(scenes, coarse))]
        whole[source], rest[source] = {}, {}
        for row, m in maps.items():
            whole[source][row], rest[source][row] = score_whole_and_rest(m, dataset, k, names, coarse)
    return whole, rest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idgbr.validate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/dubai-aerial"))
    parser.add_argument("--accra", type=Path, default=None, help="the accra-buildings folder (building models)")
    parser.add_argument("--tile", default="tile8", help="held-out Dubai tile")
    parser.add_argument("--select-parts", default="1,2,3,4",
                        help="parts of the tile used to pick the defaults (enough that a per-source mIoU floor holds "
                             "beyond them)")
    parser.add_argument("--max-images", type=int, default=0, help="quick check: only this many images")
    parser.add_argument("--second-model", type=Path,
                        help="a multiclass coarse model of another architecture (e.g. the FCN) whose maps are refined")
    parser.add_argument("--classifier-tiles", default="tile1,tile2,tile3,tile4,tile5,tile6")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--figure", type=Path, help="PNG of image / coarse / refined / truth crops")
    parser.add_argument("--no-update", action="store_true", help="do not write defaults and metrics into the model")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--precision", default=None,
                        help="of the networks (fp32, bf16, auto; default: auto), e.g. to check that bf16 "
                             "maps score as fp32 maps do")
    parser.add_argument("--card-defaults", action="store_true",
                        help="score with the model card's sampler defaults instead of choosing them again")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:5.0f}s] {message}", flush=True)

    tensors, card = load_checkpoint(args.model)
    device = select_device("auto")
    bundle = build_bundle(tensors, card, device, args.model)
    bundle.precision = check_precision(args.precision)
    precision = resolve_precision(bundle.precision, device)
    log(f"networks at {precision}")
    task = binary_task(card)
    foreground = BINARY_TASKS[task] if task else None
    task_name = "multiclass" if task is None else "binary"
    datasets = validation_datasets(card, args.data, args.accra, args.tile,
                                   [int(p) for p in args.select_parts.split(",")], args.max_images)
    second = build_bundle(*load_checkpoint(args.second_model), device, args.second_model) if args.second_model else None
    train_scenes = load_scenes(args.data, args.classifier_tiles.split(","), task or "multiclass")
    if task == "buildings" and args.accra is not None:
        train_scenes += load_accra(args.accra, "train", 4)[::4]
    classifier = PixelClassifier(seed=0).fit([s.image for s in train_scenes], [s.labels for s in train_scenes])
    all_sources = [coarse_sources(bundle, d, second, classifier, task_name, foreground) for d in datasets]
    log(f"coarse maps ready: {', '.join(f'{d.name} ({len(d.scenes)} images)' for d in datasets)}")
    all_classical = [classical_maps(d, sources, bundle.num_classes) for d, sources in zip(datasets, all_sources)]

    defaults: dict
    sampled: SampledLogits = {}
    if args.card_defaults:
        sampler = card.sampler
        defaults = {"steps": sampler.steps, "band": sampler.band, "vocabulary": sampler.vocabulary,
                    "min_confidence": sampler.min_confidence}
        sweep: dict[str, float] = {}
    else:
        defaults, sweep = choose_defaults(bundle, datasets, all_sources, all_classical, log, sampled)
    results, results_rest = {}, {}
    for dataset, sources, classical in zip(datasets, all_sources, all_classical):
        results[dataset.name], results_rest[dataset.name] = evaluate_dataset(bundle, dataset, sources, classical,
                                                                             defaults, sampled)
        log(f"scored {dataset.name}")

    summary = {"datasets": {d.name: {"images": len(d.scenes),
                                     "megapixels": round(sum(s.labels.size for s in d.scenes) / 1e6, 1),
                                     "selection_images": [d.scenes[i].name for i in d.selection]} for d in datasets},
               "precision": precision,
               "defaults": defaults, "selection_sweep": sweep, "step_tolerance": STEP_TOLERANCE,
               "results": results, "results_outside_selection": results_rest}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    if args.figure:
        first = datasets[-1] if task == "buildings" else datasets[0]
        draw_figure(args.figure, first.scenes, all_sources[datasets.index(first)]["bundled CNN segmenter"],
                    bundle, defaults, card)
    if not args.no_update and not args.card_defaults:
        card.sampler = replace(card.sampler, **defaults)
        card.metrics = {
            "validation": {"datasets": summary["datasets"], "defaults": defaults},
            **{f"{name} / {src}": {row: {m: r[m] for m in ("miou", "boundary_f", "boundary_iou", "iou_imp")}
                                   for row, r in rows.items()}
               for name, per_source in results.items() for src, rows in per_source.items()}}
        save_checkpoint(args.model, tensors, card)
        log(f"updated sampler defaults and metrics in {args.model}")
    log("done")
    return 0


def draw_figure(path: Path, scenes: list[Scene], coarse: list[np.ndarray], bundle: ModelBundle, defaults: dict,
                card: ModelCard, crop: int = 256, count: int = 3) -> None:
    """Rows of image | coarse | refined | truth crops, class colours with black class boundaries."""
    from PIL import Image, ImageDraw

    from .classes import hex_to_rgb

    palette = np.zeros((256, 3), np.uint8)
    for c in card.classes:
        palette[c.id] = hex_to_rgb(c.color)
    palette[IGNORE_ID] = (155, 155, 155)

    def paint(ids: np.ndarray) -> np.ndarray:
        rgb = palette[ids].copy()
        edge = np.zeros(ids.shape, bool)
        edge[1:] |= ids[1:] != ids[:-1]
        edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
        rgb[edge] = 0
        return rgb

    rng = np.random.default_rng(3)
    rows = []
    for index in rng.choice(len(scenes), size=min(count, len(scenes)), replace=False):
        scene = scenes[index]
        height, width = scene.labels.shape
        size = min(crop, height, width)
        r, c = rng.integers(0, height - size + 1), rng.integers(0, width - size + 1)
        window = (slice(r, r + size), slice(c, c + size))
        image, tile_coarse = scene.image[window], coarse[index][window]
        logits = refine_logits(bundle, image, tile_coarse, defaults["steps"], defaults["band"])
        refined = decide(logits, tile_coarse, defaults["band"], defaults["min_confidence"])
        tiles = [image, paint(tile_coarse), paint(refined), paint(scene.labels[window])]
        rows.append(np.concatenate([np.pad(t, ((4, 4), (4, 4), (0, 0)), constant_values=255) for t in tiles], 1))
    grid = np.concatenate(rows, 0)
    header = 28
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + header), "white")
    canvas.paste(Image.fromarray(grid), (0, header))
    draw = ImageDraw.Draw(canvas)
    steps = defaults["steps"]
    titles = ["image", "coarse (CNN)", f"IDGBR refined ({steps} step{'s' if steps > 1 else ''})", "truth"]
    for i, title in enumerate(titles):
        draw.text((i * (crop + 8) + 10, 8), title, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


if __name__ == "__main__":
    raise SystemExit(main())

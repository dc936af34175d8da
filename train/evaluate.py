"""Evaluate a trained model: the thesis's JC_w at 128x128 and the KiTS19 Dice scores per case.

    python -m train.evaluate --run RUN_DIR --kits KITS_DIR [--cases 200-209] [--data DATASET_DIR]
                             --out DIR

Two evaluations, each run when its data is available:

1. **Preprocessed test split** (``--data``, or the dataset recorded in config.json if it still
   exists): weighted Jaccard JC_w with the run's class weights, and per-class Dice and Jaccard,
   at model resolution (128x128), the setting of the thesis's Tables 5.1 and 5.2. Counts are
   pooled over every voxel of every real test sample (``is_padding`` samples are skipped), with
   the definitions of ``train.metrics`` (``np_weighted_jaccard_from_confusion``: a class absent
   from both truth and prediction scores 1.0).
2. **Whole volumes** at original resolution (``--kits``, ``train.volume_eval``): a folder of
   KiTS19-format cases, real or synthetic, whole volumes or single slices (``case_XXXXX_sNNN``),
   in any axis-aligned orientation. Per case kidney+tumor Dice (label > 0) and tumor Dice
   (label == 2), their means over cases, and the headline figures (``volumes.headline`` in
   metrics.json): kidney+tumor Dice over the cases holding kidney, tumor Dice over those holding
   tumor, and the share of empty slices given more than 50 false-positive pixels. Default
   cases: the test split of the dataset's manifest, else every case in KITS_DIR.

Writes ``DIR/metrics.json`` (everything), ``DIR/per_case.csv`` (one row per volume),
``DIR/results.md`` (a Markdown table beside the thesis's numbers), each atomically, and
``DIR/overlays/`` (reference and prediction side by side on the worst cases).
Exit codes: 0 done; 2 bad input (missing or inconsistent files, an output that is a file,
named in the message); 1 other.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from preprocess.dataset_format import (
    DatasetError,
    load_manifest,
    manifest_sha256,
    read_shard,
    shard_paths,
    write_json_atomic,
)
from preprocess.kits import N_CLASSES, CaseError, atomic_path, list_cases, parse_case_list
from train.inference import (
    LoadedModel,
    add_inference_options,
    add_model_arguments,
    check_inference_args,
    check_output_dir,
    checked_preprocessing,
    configure_logging,
    default_batch_size,
    instantiate,
    preprocessing_params,
    progress_bar,
    resolve_model_source,
)
from train.metrics import np_confusion_matrix
from train.volume_eval import (
    DEFAULT_OVERLAYS,
    EMPTY_FP_PIXELS,
    PER_CASE_COLUMNS,
    TUMOR_DICE_CONVENTION,
    evaluate_volumes,
    scores_from_confusion,
)
from train.volumes import InferenceError

log = logging.getLogger("train.evaluate")

EXIT_BAD_INPUT = 2
TEST_SPLIT = "test"

# --------------------------------------------------------------------------------------------
# 1. The preprocessed test split at model resolution
# --------------------------------------------------------------------------------------------


def find_dataset(
    data: str | None, config: dict[str, Any], run_dir: str | None
) -> tuple[Path | None, str]:
    """The dataset folder to use and why: ``--data`` (must exist), else config.json's if present
    (recorded relative to the run folder)."""
    if data is not None:
        path = Path(data)
        load_manifest(path)  # DatasetError naming the folder if it is not a dataset
        return path, "--data"
    recorded = (config.get("dataset") or {}).get("dir")
    if not recorded:
        return None, "no dataset given (--data) or recorded in config.json"
    path = Path(run_dir or ".") / recorded
    if not (path / "manifest.json").is_file():
        return None, f"dataset recorded in config.json ({recorded}) not found"
    return path, "config.json"


def _grid_text(target_spacing: float | None) -> str:
    return "whole slices resized" if target_spacing is None else f"{target_spacing} mm/pixel"


def check_dataset_fits(manifest: dict[str, Any], config: dict[str, Any], where: Path) -> None:
    """The dataset must hold what the model was trained on: same HU window, size, block depth."""
    prep = preprocessing_params(config)
    norm = manifest.get("normalization", {})
    if (float(norm.get("hu_min", np.nan)), float(norm.get("hu_max", np.nan))) != (
        prep.hu_min,
        prep.hu_max,
    ):
        raise DatasetError(
            f"{where}: HU window [{norm.get('hu_min')}, {norm.get('hu_max')}] differs from the "
            f"model's [{prep.hu_min}, {prep.hu_max}]"
        )
    if manifest.get("image_size") != prep.image_size:
        raise DatasetError(
            f"{where}: image size {manifest.get('image_size')} differs from the model's "
            f"{prep.image_size}"
        )
    if manifest.get("target_spacing") != prep.target_spacing:
        raise DatasetError(
            f"{where}: slices on a grid of {_grid_text(manifest.get('target_spacing'))}, the "
            f"model's are on {_grid_text(prep.target_spacing)}"
        )
    if prep.block_depth is not None:
        if manifest.get("kind") != "blocks" or manifest.get("block_depth") != prep.block_depth:
            raise DatasetError(
                f"{where}: a 3D model with blocks of {prep.block_depth} slices needs a block "
                f"dataset of that depth (this one: kind {manifest.get('kind')!r}, depth "
                f"{manifest.get('block_depth')})"
            )


def class_weights_for(
    config: dict[str, Any], manifest: dict[str, Any] | None, n_classes: int
) -> tuple[list[float], str]:
    """JC_w weights: the run's (config.json), else the manifest's balanced ones, else equal."""
    if config.get("class_weights"):
        return [float(w) for w in config["class_weights"]], "config.json class_weights"
    if manifest and manifest.get("class_weights_balanced"):
        return (
            [float(w) for w in manifest["class_weights_balanced"]],
            "manifest class_weights_balanced (no weights in a run config)",
        )
    return [1.0] * n_classes, "equal weights (no run config, no manifest)"


def evaluate_dataset(
    loaded: LoadedModel,
    dataset_dir: Path,
    manifest: dict[str, Any],
    class_weights: Sequence[float],
    batch_size: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """JC_w, per-class Dice and Jaccard on the real samples of the dataset's test split.

    Samples are the stored uint8 images / 255 with the channel repeated, as in training. A 2D
    model on a block dataset sees the blocks' slices one by one.
    """
    prep = preprocessing_params(loaded.config)
    n_classes = int(loaded.config.get("n_classes", N_CLASSES))
    batch_size = batch_size or default_batch_size(loaded.is_3d)
    t0 = time.perf_counter()
    cm = np.zeros((n_classes, n_classes), np.int64)
    n_samples = n_padding = 0
    paths = shard_paths(dataset_dir, TEST_SPLIT, manifest)
    bar = progress_bar("  test split", progress)
    for k, path in enumerate(paths):
        shard = read_shard(path, ("images", "masks", "is_padding"))
        real = ~shard["is_padding"].astype(bool)
        n_padding += int((~real).sum())
        images, masks = shard["images"][real], shard["masks"][real]
        n_samples += len(images)
        if images.ndim == 4 and not loaded.is_3d:  # blocks -> slices for a 2D model
            images = images.reshape(-1, *images.shape[2:])
            masks = masks.reshape(-1, *masks.shape[2:])
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].astype(np.float32) / np.float32(255.0)
            x = np.repeat(x[..., None], prep.channels, axis=-1)
            probs = np.asarray(loaded.model.predict_on_batch(x))
            pred = np.argmax(probs, axis=-1)
            cm += np_confusion_matrix(masks[start : start + batch_size], pred, n_classes)
        if bar:
            bar(k + 1, len(paths))
    result = {
        "dir": str(dataset_dir),
        "split": TEST_SPLIT,
        "kind": manifest.get("kind"),
        "cases": manifest["splits"][TEST_SPLIT].get("cases", []),
        "n_samples": n_samples,
        "n_padding_skipped": n_padding,
        "image_size": manifest.get("image_size"),
        "class_weights": [float(w) for w in class_weights],
        **scores_from_confusion(cm, class_weights),
        "seconds": time.perf_counter() - t0,
    }
    return result


# --------------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------------


def write_text_atomic(text: str, path: Path) -> None:
    """Write a text file via a temporary name and rename (readers never see half a file)."""
    tmp = atomic_path(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def per_case_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The per-case table as CSV text (header always present)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=PER_CASE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def thesis_reference(model_name: str) -> tuple[str, float | None]:
    """(name printed in the thesis, its JC_w on the test data), from the models registry."""
    import models

    try:
        entry = models.spec(model_name)
    except ValueError:
        return model_name, None
    return entry.thesis_name, entry.thesis_jc_w


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def results_markdown(metrics: dict[str, Any]) -> str:
    """A Markdown summary whose main table can be pasted into the README beside the thesis."""
    ds = metrics.get("dataset")
    vol = metrics.get("volumes")
    name, thesis = metrics["thesis_name"], metrics["thesis_jc_w"]
    lines = [
        f"## Evaluation of {metrics['model']} ({metrics['weights']})",
        "",
        "| Model | JC_w (ours) | JC_w (thesis) | Kidney Dice | Tumor Dice | Cases |",
        "|---|---|---|---|---|---|",
        f"| {name} | {_fmt(ds['weighted_jaccard'] if ds else None)} | {_fmt(thesis)} "
        f"| {_fmt(vol['kidney_dice_mean'] if vol else None)} "
        f"| {_fmt(vol['tumor_dice_mean'] if vol else None)} | {vol['n_cases'] if vol else 0} |",
        "",
    ]
    if ds:
        lines += [
            f"Test split at {ds['image_size']}x{ds['image_size']} ({ds['n_samples']} samples):",
            "",
            "| Class | Dice | Jaccard |",
            "|---|---|---|",
            *(f"| {c} | {ds['dice'][c]:.4f} | {ds['jaccard'][c]:.4f} |" for c in ds["dice"]),
            "",
        ]
    notes = [
        "- JC_w (ours): weighted Jaccard sum_c w_c JC_c / sum_c w_c over background, kidney "
        "and tumor, pooled over all voxels of the real (non-padding) samples of the test "
        "split at model resolution, as in the thesis's Tables 5.1 and 5.2"
        + (
            f"; class weights {[round(w, 4) for w in ds['class_weights']]} "
            f"({metrics['class_weights_source']})."
            if ds
            else f". Not computed: {metrics['dataset_note']}."
        ),
        "- JC_w (thesis): Table 5.1 (smaller models) or 5.2 (bigger models), KiTS19 test "
        "cases 200-209 of the thesis's split.",
    ]
    if vol:
        notes.append(
            "- Kidney Dice = KiTS19 kidney+tumor Dice (label > 0), Tumor Dice = label 2; per "
            f"case on whole volumes at original resolution, mean over {vol['n_cases']} cases "
            f"({'post-processed' if vol['postprocess'] else 'no post-processing'}). "
            + TUMOR_DICE_CONVENTION[0].upper()
            + TUMOR_DICE_CONVENTION[1:]
            + "."
        )
        head = vol["headline"]
        lines += [
            "| Headline | Value | Over |",
            "|---|---|---|",
            f"| kidney+tumor Dice | {_fmt(head['kidney_tumor_dice'])} "
            f"| {head['n_kidney']} cases with kidney |",
            f"| tumor Dice | {_fmt(head['tumor_dice'])} | {head['n_tumor']} cases with tumor |",
            f"| empty slices with > {head['empty_fp_pixels']} false-positive pixels "
            f"| {_fmt(head['empty_fp_rate'])} | {head['n_empty']} empty slices |",
            "",
        ]
    else:
        notes.append("- Kidney/Tumor Dice not computed (no --kits folder given).")
    data = [
        f"dataset {ds['dir']}" if ds else None,
        f"KiTS folder {vol['kits_dir']}" if vol else None,
    ]
    notes.append(
        "- Data: "
        + ", ".join(d for d in data if d)
        + ". If this data is synthetic (e.g. made by preprocess.synthetic), the numbers check "
        "the pipeline and are not comparable with the thesis column."
    )
    return "\n".join(lines + notes) + "\n"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.evaluate",
        description=(
            "Evaluate a trained model.\n\n"
            "1. Test split of a preprocessed dataset (--data, or the one recorded in the run's\n"
            "   config.json): weighted Jaccard JC_w with the run's class weights and per-class\n"
            "   Dice/Jaccard at model resolution, as in the thesis's Tables 5.1 and 5.2.\n"
            "2. Whole KiTS19 volumes at original resolution (--kits): kidney+tumor Dice and\n"
            "   tumor Dice per case, and their means. Tumor Dice is 1.0 when neither truth nor\n"
            "   prediction has tumor, 0.0 when only one of them has.\n\n"
            "Writes DIR/metrics.json, DIR/per_case.csv and DIR/results.md."
        ),
        epilog=(
            "Example:\n  python -m train.evaluate --run runs/unet2d --kits data/kits19 "
            "--cases 200-209 --out runs/unet2d/eval\n\n"
            "Exit codes: 0 success; 2 bad input (message names the file); 1 unexpected error."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    data = p.add_argument_group("data")
    data.add_argument(
        "--kits",
        metavar="KITS_DIR",
        help="folder of KiTS19-format cases (case_XXXXX/ or case_XXXXX_<tag>/ with "
        "imaging.nii.gz + segmentation.nii.gz; volumes or single slices, any axis-aligned "
        "orientation) for the whole-volume metrics",
    )
    data.add_argument(
        "--cases",
        metavar="LIST",
        help="case ids such as 200-209 or 3,7,9-12 "
        "(default: the dataset's test split, else every case in KITS_DIR)",
    )
    data.add_argument(
        "--data",
        metavar="DATASET_DIR",
        help="preprocessed dataset for JC_w at "
        "model resolution (default: the one in config.json, if it still exists)",
    )
    data.add_argument(
        "--volumes-only",
        action="store_true",
        help="whole volumes only: no dataset evaluation, even if config.json names one "
        "(e.g. shipped weights on new cases)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the result files")
    opt = add_inference_options(p)
    opt.add_argument(
        "--save-predictions",
        action="store_true",
        help="also write each volume's prediction to DIR/predictions/<case folder>.nii.gz, on "
        "the case's own grid",
    )
    opt.add_argument(
        "--overlays",
        type=int,
        default=DEFAULT_OVERLAYS,
        metavar="N",
        help="PNGs of the N worst cases in DIR/overlays/: the CT with the reference (left) and "
        "the prediction (right) on its most wrong slice (default %(default)s; 0: none)",
    )
    return p


def _error(msg: str) -> None:
    log.error("error: %s", msg)


def choose_cases(
    args: argparse.Namespace,
    config: dict[str, Any],
    manifest: dict[str, Any] | None,
    dataset_dir: Path | None,
) -> tuple[list[int], str]:
    """The cases to score on whole volumes and why: --cases, else the test split, else all."""
    if args.cases:
        try:
            cases = parse_case_list(args.cases)
        except ValueError as exc:
            raise InferenceError(f"--cases {args.cases!r}: {exc}") from exc
        source = "--cases"
    elif manifest and manifest["splits"].get(TEST_SPLIT, {}).get("cases"):
        cases = [int(c) for c in manifest["splits"][TEST_SPLIT]["cases"]]
        source = f"test split of {dataset_dir}"
    elif ((config.get("dataset") or {}).get("splits") or {}).get(TEST_SPLIT):
        # train.train records the split's cases, so this works without the dataset folder
        cases = [int(c) for c in config["dataset"]["splits"][TEST_SPLIT]]
        source = "test split recorded in config.json"
    else:
        cases, source = [], "every case in the KiTS folder"
    if args.kits is not None:
        cases = list_cases(Path(args.kits), cases or None)  # CaseError if a case is missing
    return cases, source


def dataset_metrics(
    args: argparse.Namespace,
    loaded: LoadedModel,
    dataset_dir: Path,
    manifest: dict[str, Any],
    class_weights: list[float],
    dataset_source: str,
) -> dict[str, Any]:
    """:func:`evaluate_dataset` with where the dataset came from and whether training used it."""
    ds = evaluate_dataset(
        loaded, dataset_dir, manifest, class_weights, args.batch_size, not args.no_progress
    )
    ds["source"] = dataset_source
    ds["manifest_sha256"] = manifest_sha256(dataset_dir)
    trained_on = (loaded.config.get("dataset") or {}).get("manifest_sha256")
    ds["same_as_training_dataset"] = (
        None if trained_on is None else trained_on == ds["manifest_sha256"]
    )
    log.info(
        "test split (%d samples): JC_w %.4f, Dice kidney %.4f, tumor %.4f",
        ds["n_samples"],
        ds["weighted_jaccard"],
        ds["dice"].get("kidney", float("nan")),
        ds["dice"].get("tumor", float("nan")),
    )
    return ds


def volume_metrics(
    args: argparse.Namespace,
    loaded: LoadedModel,
    cases: list[int],
    class_weights: list[float],
    out: Path,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """:func:`evaluate_volumes` on ``--kits`` with the command line's options; logs the result."""
    summary, rows = evaluate_volumes(
        loaded,
        Path(args.kits),
        cases,
        class_weights,
        args.batch_size,
        args.overlap,
        args.components if args.postprocess else None,
        out / "predictions" if args.save_predictions else None,
        not args.no_progress,
        overlay_dir=out / "overlays" if args.overlays else None,
        n_overlays=args.overlays,
    )
    head = summary["headline"]
    log.info(
        "%d cases: kidney+tumor Dice %s over %d with kidney, tumor Dice %s over %d with tumor, "
        "%s of %d empty slices with more than %d false-positive pixels",
        summary["n_cases"],
        _fmt(head["kidney_tumor_dice"]),
        head["n_kidney"],
        _fmt(head["tumor_dice"]),
        head["n_tumor"],
        "n/a" if head["empty_fp_rate"] is None else f"{head['empty_fp_rate']:.1%}",
        head["n_empty"],
        EMPTY_FP_PIXELS,
    )
    return summary, rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both evaluations and the result files; returns the metrics written to JSON."""
    t0 = time.perf_counter()
    out = Path(args.out)
    check_output_dir(out, "--out")
    # Every input is checked before the model is built (the slow part), so mistakes show at once.
    config, weights_path, config_path = resolve_model_source(args.run, args.weights, args.model)
    checked_preprocessing(config, config_path)
    if args.volumes_only:
        if args.data:
            raise InferenceError("--volumes-only and --data exclude each other")
        dataset_dir, dataset_source = None, "no dataset evaluation (--volumes-only)"
    else:
        dataset_dir, dataset_source = find_dataset(args.data, config, args.run)
    manifest = load_manifest(dataset_dir) if dataset_dir else None
    n_classes = int(config.get("n_classes", N_CLASSES))
    class_weights, weights_source = class_weights_for(config, manifest, n_classes)
    if dataset_dir is None and args.kits is None:
        raise InferenceError(f"nothing to evaluate: {dataset_source}, and no --kits folder")
    cases, cases_source = choose_cases(args, config, manifest, dataset_dir)
    if dataset_dir is not None and manifest is not None:
        check_dataset_fits(manifest, config, dataset_dir)
    loaded = instantiate(config, weights_path, config_path)
    log.info("model %s from %s", loaded.name, loaded.weights_path)
    out.mkdir(parents=True, exist_ok=True)  # only after the inputs passed their checks

    thesis_name, thesis_jc_w = thesis_reference(loaded.name)
    metrics: dict[str, Any] = {
        "model": loaded.name,
        "thesis_name": thesis_name,
        "thesis_jc_w": thesis_jc_w,
        "run_dir": str(args.run) if args.run else None,
        "weights": str(loaded.weights_path),
        "config": str(loaded.config_path) if loaded.config_path else None,
        "model_options": config.get("model_options") or {},
        "input_shape": list(config["input_shape"]),
        "class_weights_source": weights_source,
        "dataset_note": dataset_source,
        "dataset": None,
        "volumes": None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if dataset_dir is not None and manifest is not None:
        if not manifest["splits"].get(TEST_SPLIT, {}).get("shards"):
            metrics["dataset_note"] = f"{dataset_dir} has no test split"
        else:
            metrics["dataset"] = dataset_metrics(
                args, loaded, dataset_dir, manifest, class_weights, dataset_source
            )
    rows: list[dict[str, Any]] = []
    if args.kits is not None:
        metrics["volumes"], rows = volume_metrics(args, loaded, cases, class_weights, out)
        metrics["volumes"]["cases_source"] = cases_source
    metrics["seconds"] = time.perf_counter() - t0
    write_json_atomic(metrics, out / "metrics.json")
    write_text_atomic(per_case_csv(rows), out / "per_case.csv")
    write_text_atomic(results_markdown(metrics), out / "results.md")
    log.info("wrote %s, %s, %s", out / "metrics.json", out / "per_case.csv", out / "results.md")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_inference_args(parser, args)
    if args.overlays < 0:
        parser.error("--overlays must be >= 0")
    configure_logging()
    try:
        run(args)
    except (InferenceError, CaseError, DatasetError) as exc:
        _error(str(exc))
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate a trained model: the thesis's JC_w at 128x128 and the KiTS19 Dice scores per case.

    python -m train.evaluate --run RUN_DIR --kits KITS_DIR [--cases 200-209] [--data DATASET_DIR]
                             --out DIR

Two evaluations, each run when its data is available:

1. **Preprocessed test split** (``--data``, or the dataset recorded in config.json if it still
   exists): weighted Jaccard JC_w with the run's class weights, and per-class Dice and Jaccard,
   at model resolution (128x128), the setting of the thesis's Tables 5.1 and 5.2. Counts are
   pooled over every voxel of every real test sample (``is_padding`` samples are skipped), with
   the definitions of ``train.losses`` (``np_weighted_jaccard_from_confusion``: a class absent
   from both truth and prediction scores 1.0).
2. **Whole volumes** at original resolution (``--kits``): the KiTS19 challenge metrics per case,
   kidney+tumor Dice (label > 0) and tumor Dice (label == 2), and their means over cases. A case
   with no tumor in the truth and none predicted scores tumor Dice 1.0; a case where only one of
   them has tumor scores 0.0 (``train.losses.np_dice``). Default cases: the test split of the
   dataset's manifest, else every case in KITS_DIR.

Writes ``DIR/metrics.json`` (everything), ``DIR/per_case.csv`` (one row per volume) and
``DIR/results.md`` (a Markdown table beside the thesis's numbers), each atomically.
Exit codes: 0 done; 2 bad input (missing or inconsistent files, named in the message); 1 other.
"""

from __future__ import annotations

import argparse
import csv
import io
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
from preprocess.kits import (
    CaseError,
    atomic_path,
    case_name,
    list_cases,
    load_case,
    parse_case_list,
)
from train.inference import (
    DEFAULT_OVERLAP,
    InferenceError,
    LoadedModel,
    TextProgress,
    check_affine,
    check_ct_header,
    check_inference_args,
    checked_preprocessing,
    default_batch_size,
    format_seconds,
    instantiate,
    keep_largest_components,
    labels_to_original,
    predict_volume,
    preprocessing_params,
    resolve_model_source,
    write_labels,
)
from train.losses import (
    CLASS_NAMES,
    np_confusion_matrix,
    np_dice,
    np_dice_per_class,
    np_jaccard_per_class,
    np_weighted_jaccard_from_confusion,
)

EXIT_BAD_INPUT = 2
TEST_SPLIT = "test"
TUMOR_DICE_CONVENTION = (
    "tumor Dice 2TP/(2TP+FP+FN) of label == 2 per case; 1.0 when neither truth nor prediction "
    "has tumor, 0.0 when only one of them has"
)
PER_CASE_COLUMNS = (
    "case",
    "n_slices",
    "height",
    "width",
    "spacing_z",
    "spacing_y",
    "spacing_x",
    "kidney_dice",
    "tumor_dice",
    "true_kidney_tumor_voxels",
    "pred_kidney_tumor_voxels",
    "true_tumor_voxels",
    "pred_tumor_voxels",
    "seconds",
)
#: Slices per confusion-matrix chunk at full resolution (an int64 index per voxel otherwise).
_CM_CHUNK = 32


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def kits_case_metrics(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """KiTS19 per-case scores: kidney+tumor Dice (label > 0) and tumor Dice (label == 2).

    Both use ``train.losses.np_dice``: empty in truth and prediction -> 1.0, empty in only one
    -> 0.0 (there 2TP = 0 over a positive denominator).
    """
    return {"kidney_dice": np_dice(truth, pred, (1, 2)), "tumor_dice": np_dice(truth, pred, 2)}


def confusion_matrix_chunked(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``np_confusion_matrix`` summed over chunks of slices (bounded memory on whole CTs)."""
    cm = np.zeros((n_classes, n_classes), np.int64)
    for start in range(0, truth.shape[0], _CM_CHUNK):
        end = start + _CM_CHUNK
        cm += np_confusion_matrix(truth[start:end], pred[start:end], n_classes)
    return cm


def scores_from_confusion(cm: np.ndarray, class_weights: Sequence[float]) -> dict[str, Any]:
    """JC_w and per-class Dice and Jaccard of a pooled confusion matrix."""
    names = (
        list(CLASS_NAMES) if len(cm) == len(CLASS_NAMES) else [f"class{i}" for i in range(len(cm))]
    )
    dice = np_dice_per_class(cm)
    jaccard = np_jaccard_per_class(cm)
    return {
        "weighted_jaccard": np_weighted_jaccard_from_confusion(cm, class_weights),
        "dice": {n: float(v) for n, v in zip(names, dice, strict=True)},
        "jaccard": {n: float(v) for n, v in zip(names, jaccard, strict=True)},
        "confusion_matrix": cm.astype(int).tolist(),
    }


# --------------------------------------------------------------------------------------------
# 1. The preprocessed test split at model resolution
# --------------------------------------------------------------------------------------------


def find_dataset(data: str | None, config: dict[str, Any]) -> tuple[Path | None, str]:
    """The dataset folder to use and why: ``--data`` (must exist), else config.json's if present."""
    if data is not None:
        path = Path(data)
        load_manifest(path)  # DatasetError naming the folder if it is not a dataset
        return path, "--data"
    recorded = (config.get("dataset") or {}).get("dir")
    if not recorded:
        return None, "no dataset given (--data) or recorded in config.json"
    path = Path(recorded)
    if not (path / "manifest.json").is_file():
        return None, f"dataset recorded in config.json ({recorded}) not found"
    return path, "config.json"


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
    n_classes = int(loaded.config.get("n_classes", 3))
    batch_size = batch_size or default_batch_size(loaded.is_3d)
    t0 = time.perf_counter()
    cm = np.zeros((n_classes, n_classes), np.int64)
    n_samples = n_padding = 0
    paths = shard_paths(dataset_dir, TEST_SPLIT, manifest)
    bar = TextProgress("  test split") if progress else None
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
# 2. Whole volumes at original resolution (KiTS19 metrics)
# --------------------------------------------------------------------------------------------


def evaluate_volumes(
    loaded: LoadedModel,
    kits_dir: Path,
    cases: Sequence[int],
    class_weights: Sequence[float],
    batch_size: int | None = None,
    overlap: float = DEFAULT_OVERLAP,
    postprocess: int | None = None,
    save_dir: Path | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """KiTS19 Dice per case and their means; also JC_w pooled over all voxels of all cases.

    Returns (summary, rows); rows follow :data:`PER_CASE_COLUMNS`. ``save_dir`` also writes
    each prediction as ``case_XXXXX.nii.gz`` on the case's grid.
    """
    n_classes = int(loaded.config.get("n_classes", 3))
    rows: list[dict[str, Any]] = []
    cm = np.zeros((n_classes, n_classes), np.int64)
    for case_id in cases:
        t0 = time.perf_counter()
        case = load_case(kits_dir, case_id, require_segmentation=True)
        imaging_path = Path(kits_dir) / case_name(case_id) / "imaging.nii.gz"
        check_affine(case.affine, str(imaging_path))
        bar = TextProgress(f"  {case_name(case_id)}") if progress else None
        probs = predict_volume(loaded.model, case.imaging, loaded.config, batch_size, overlap, bar)
        pred = labels_to_original(probs, case.imaging.shape)
        if postprocess:
            pred = keep_largest_components(pred, postprocess)
        truth = case.segmentation
        assert truth is not None
        if save_dir is not None:
            write_labels(
                pred, check_ct_header(imaging_path), save_dir / f"{case_name(case_id)}.nii.gz"
            )
        scores = kits_case_metrics(truth, pred)
        cm += confusion_matrix_chunked(truth, pred, n_classes)
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "case": case_name(case_id),
                "n_slices": truth.shape[0],
                "height": truth.shape[1],
                "width": truth.shape[2],
                "spacing_z": round(case.spacing[0], 6),
                "spacing_y": round(case.spacing[1], 6),
                "spacing_x": round(case.spacing[2], 6),
                "kidney_dice": scores["kidney_dice"],
                "tumor_dice": scores["tumor_dice"],
                "true_kidney_tumor_voxels": int(np.count_nonzero(truth)),
                "pred_kidney_tumor_voxels": int(np.count_nonzero(pred)),
                "true_tumor_voxels": int(np.count_nonzero(truth == 2)),
                "pred_tumor_voxels": int(np.count_nonzero(pred == 2)),
                "seconds": round(seconds, 3),
            }
        )
        print(
            f"{case_name(case_id)}: kidney+tumor Dice {scores['kidney_dice']:.4f}, "
            f"tumor Dice {scores['tumor_dice']:.4f} ({format_seconds(seconds)} s)",
            flush=True,
        )
    kidney = [r["kidney_dice"] for r in rows]
    tumor = [r["tumor_dice"] for r in rows]
    summary = {
        "kits_dir": str(kits_dir),
        "cases": [case_name(c) for c in cases],
        "n_cases": len(rows),
        "postprocess": {"keep_largest_components": postprocess} if postprocess else None,
        "kidney_dice_mean": float(np.mean(kidney)) if rows else None,
        "tumor_dice_mean": float(np.mean(tumor)) if rows else None,
        # the KiTS19 leaderboard ranked by the average of the two means
        "kits_score": float((np.mean(kidney) + np.mean(tumor)) / 2) if rows else None,
        "tumor_dice_convention": TUMOR_DICE_CONVENTION,
        "pooled_original_resolution": scores_from_confusion(cm, class_weights),
        "seconds_per_volume_mean": float(np.mean([r["seconds"] for r in rows])) if rows else None,
    }
    return summary, rows


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
    src = p.add_argument_group("model (a run folder, or a weights file and a model name)")
    src.add_argument(
        "--run",
        metavar="RUN_DIR",
        help="training run folder (config.json, "
        "checkpoints/best.weights.h5, else latest.weights.h5)",
    )
    src.add_argument(
        "--weights",
        metavar="FILE",
        help="weights file; with --run it replaces "
        "the run's checkpoint; alone, config.json is looked for beside it or in "
        "its parent, else the thesis's preprocessing is assumed",
    )
    src.add_argument("--model", metavar="NAME", help="model name, with --weights")
    data = p.add_argument_group("data")
    data.add_argument(
        "--kits",
        metavar="KITS_DIR",
        help="KiTS19 folder (case_XXXXX/imaging."
        "nii.gz + segmentation.nii.gz) for the whole-volume metrics",
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
    opt = p.add_argument_group("inference options")
    opt.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="slices (2D) or blocks (3D) per batch (default 32 / 2)",
    )
    opt.add_argument(
        "--overlap",
        type=float,
        default=DEFAULT_OVERLAP,
        help="3D sliding-window overlap as a fraction of the block depth (default %(default)s)",
    )
    opt.add_argument(
        "--postprocess",
        action="store_true",
        help="keep only the largest 3D "
        "kidney+tumor components (--components) before scoring volumes",
    )
    opt.add_argument(
        "--components",
        type=int,
        default=2,
        help="components kept by --postprocess (default %(default)s)",
    )
    opt.add_argument(
        "--save-predictions",
        action="store_true",
        help="also write each volume's prediction to DIR/predictions/case_XXXXX.nii.gz",
    )
    opt.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return p


def _error(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both evaluations and the three result files; returns the metrics written to JSON."""
    t0 = time.perf_counter()
    out = Path(args.out)
    # Every input is checked before the model is built (the slow part), so mistakes show at once.
    config, weights_path, config_path = resolve_model_source(args.run, args.weights, args.model)
    checked_preprocessing(config, config_path)
    n_classes = int(config.get("n_classes", 3))
    if args.volumes_only:
        if args.data:
            raise InferenceError("--volumes-only and --data exclude each other")
        dataset_dir, dataset_source = None, "no dataset evaluation (--volumes-only)"
    else:
        dataset_dir, dataset_source = find_dataset(args.data, config)
    manifest = load_manifest(dataset_dir) if dataset_dir else None
    class_weights, weights_source = class_weights_for(config, manifest, n_classes)
    kits_dir = Path(args.kits) if args.kits else None
    if dataset_dir is None and kits_dir is None:
        raise InferenceError(f"nothing to evaluate: {dataset_source}, and no --kits folder")
    if args.cases:
        try:
            cases = parse_case_list(args.cases)
        except ValueError as exc:
            raise InferenceError(f"--cases {args.cases!r}: {exc}") from exc
        cases_source = "--cases"
    elif manifest and manifest["splits"].get(TEST_SPLIT, {}).get("cases"):
        cases = [int(c) for c in manifest["splits"][TEST_SPLIT]["cases"]]
        cases_source = f"test split of {dataset_dir}"
    elif ((config.get("dataset") or {}).get("splits") or {}).get(TEST_SPLIT):
        # train.train records the split's cases, so this works without the dataset folder
        cases = [int(c) for c in config["dataset"]["splits"][TEST_SPLIT]]
        cases_source = "test split recorded in config.json"
    else:
        cases, cases_source = [], "every case in the KiTS folder"
    if kits_dir is not None:
        cases = list_cases(kits_dir, cases or None)  # CaseError if a case is missing
    if dataset_dir is not None and manifest is not None:
        check_dataset_fits(manifest, config, dataset_dir)
    loaded = instantiate(config, weights_path, config_path)
    print(f"model {loaded.name} from {loaded.weights_path}", flush=True)
    out.mkdir(parents=True, exist_ok=True)  # only after the inputs passed their checks

    metrics: dict[str, Any] = {
        "model": loaded.name,
        "thesis_name": thesis_reference(loaded.name)[0],
        "thesis_jc_w": thesis_reference(loaded.name)[1],
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
            ds = evaluate_dataset(
                loaded, dataset_dir, manifest, class_weights, args.batch_size, not args.no_progress
            )
            ds["source"] = dataset_source
            ds["manifest_sha256"] = manifest_sha256(dataset_dir)
            trained_on = (config.get("dataset") or {}).get("manifest_sha256")
            ds["same_as_training_dataset"] = (
                None if trained_on is None else trained_on == ds["manifest_sha256"]
            )
            metrics["dataset"] = ds
            print(
                f"test split ({ds['n_samples']} samples): JC_w {ds['weighted_jaccard']:.4f}, "
                f"Dice kidney {ds['dice'].get('kidney', float('nan')):.4f}, "
                f"tumor {ds['dice'].get('tumor', float('nan')):.4f}",
                flush=True,
            )
    rows: list[dict[str, Any]] = []
    if kits_dir is not None:
        summary, rows = evaluate_volumes(
            loaded,
            kits_dir,
            cases,
            class_weights,
            args.batch_size,
            args.overlap,
            args.components if args.postprocess else None,
            out / "predictions" if args.save_predictions else None,
            not args.no_progress,
        )
        summary["cases_source"] = cases_source
        metrics["volumes"] = summary
        print(
            f"{summary['n_cases']} volumes: kidney+tumor Dice {_fmt(summary['kidney_dice_mean'])}"
            f", tumor Dice {_fmt(summary['tumor_dice_mean'])}",
            flush=True,
        )
    metrics["seconds"] = time.perf_counter() - t0
    write_json_atomic(metrics, out / "metrics.json")
    write_text_atomic(per_case_csv(rows), out / "per_case.csv")
    write_text_atomic(results_markdown(metrics), out / "results.md")
    print(f"wrote {out / 'metrics.json'}, {out / 'per_case.csv'}, {out / 'results.md'}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_inference_args(parser, args)
    try:
        run(args)
    except (InferenceError, CaseError, DatasetError) as exc:
        _error(str(exc))
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())

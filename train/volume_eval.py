"""Whole volumes at original resolution: KiTS19 Dice per case, headline figures, worst overlays.

Works on any folder of KiTS19-format cases (``case_XXXXX/`` or ``case_XXXXX_<suffix>/``), real
or synthetic, volumes or single slices, in any axis-aligned orientation (``load_case`` brings
them to the canonical layout; Dice does not depend on the layout).

Headline figures (``headline``), the ones a real-CT comparison quotes:

- ``kidney_tumor_dice``: mean kidney+tumor Dice over the cases whose reference holds kidney or
  tumor (``n_kidney`` of them);
- ``tumor_dice``: mean tumor Dice over the cases whose reference holds tumor (``n_tumor``);
- ``empty_fp_rate``: share of the empty slices (no kidney, no tumor in the reference; ``n_empty``
  over all cases) on which the prediction marks more than ``EMPTY_FP_PIXELS`` pixels at original
  resolution. A case of one slice is one slice here, so for slice folders the figures are per
  slice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from preprocess.kits import IMAGING, N_CLASSES, case_folder, load_case
from train.inference import (
    LoadedModel,
    format_seconds,
    preprocessing_params,
    progress_bar,
    segment_volume,
)
from train.metrics import (
    CLASS_NAMES,
    np_confusion_matrix,
    np_dice,
    np_dice_per_class,
    np_jaccard_per_class,
    np_weighted_jaccard_from_confusion,
)
from train.overlays import render_comparison, write_png_atomic
from train.postprocess import keep_largest_components
from train.sliding_window import DEFAULT_OVERLAP
from train.volumes import open_ct, write_labels

log = logging.getLogger(__name__)

#: Predicted kidney+tumor pixels on an empty reference slice that count as a false alarm.
EMPTY_FP_PIXELS = 50
#: Worst cases drawn as overlay PNGs by default.
DEFAULT_OVERLAYS = 4
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
    "empty_slices",
    "empty_slices_false_positive",
    "seconds",
)
#: Slices per confusion-matrix chunk at full resolution (an int64 index per voxel otherwise).
_CM_CHUNK = 32


def kits_case_metrics(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """KiTS19 per-case scores: kidney+tumor Dice (label > 0) and tumor Dice (label == 2).

    Both use ``np_dice``: empty in truth and prediction -> 1.0, empty in only one -> 0.0.
    """
    return {"kidney_dice": np_dice(truth, pred, (1, 2)), "tumor_dice": np_dice(truth, pred, 2)}


def empty_slice_false_positives(
    truth: np.ndarray, pred: np.ndarray, threshold: int = EMPTY_FP_PIXELS
) -> tuple[int, int]:
    """(empty reference slices, those with more than ``threshold`` predicted pixels > 0)."""
    n = truth.shape[0]
    empty = ~(truth.reshape(n, -1) > 0).any(axis=1)
    marked = (pred.reshape(n, -1) > 0).sum(axis=1) > threshold
    return int(empty.sum()), int((empty & marked).sum())


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
    return {
        "weighted_jaccard": np_weighted_jaccard_from_confusion(cm, class_weights),
        "dice": {n: float(v) for n, v in zip(names, np_dice_per_class(cm), strict=True)},
        "jaccard": {n: float(v) for n, v in zip(names, np_jaccard_per_class(cm), strict=True)},
        "confusion_matrix": cm.astype(int).tolist(),
    }


def headline(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The headline figures of per-case rows (see the module docstring)."""
    kidney = [r["kidney_dice"] for r in rows if r["true_kidney_tumor_voxels"] > 0]
    tumor = [r["tumor_dice"] for r in rows if r["true_tumor_voxels"] > 0]
    n_empty = sum(r["empty_slices"] for r in rows)
    n_fp = sum(r["empty_slices_false_positive"] for r in rows)
    return {
        "kidney_tumor_dice": float(np.mean(kidney)) if kidney else None,
        "tumor_dice": float(np.mean(tumor)) if tumor else None,
        "empty_fp_rate": n_fp / n_empty if n_empty else None,
        "n_kidney": len(kidney),
        "n_tumor": len(tumor),
        "n_empty": n_empty,
        "n_empty_false_positive": n_fp,
        "empty_fp_pixels": EMPTY_FP_PIXELS,
    }


def case_badness(row: dict[str, Any]) -> float:
    """Lower is worse: kidney+tumor Dice, or for an empty reference the share of clean slices."""
    if row["true_kidney_tumor_voxels"] > 0:
        return float(row["kidney_dice"])
    return 1.0 - row["empty_slices_false_positive"] / max(1, row["empty_slices"])


@dataclass
class WorstCases:
    """The ``n`` worst cases seen so far, each kept as its most wrong slice only (memory)."""

    n: int
    kept: list[tuple[float, str, int, np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=list
    )

    def offer(
        self, row: dict[str, Any], hu: np.ndarray, truth: np.ndarray, pred: np.ndarray
    ) -> None:
        """Keep this case if it is among the ``n`` worst, as the slice it gets most wrong."""
        if self.n < 1:
            return
        wrong = (truth != pred).reshape(truth.shape[0], -1).sum(axis=1)
        z = int(np.argmax(wrong)) if wrong.any() else truth.shape[0] // 2
        item = (case_badness(row), row["case"], z, hu[z].copy(), truth[z].copy(), pred[z].copy())
        self.kept = sorted([*self.kept, item], key=lambda t: (t[0], t[1]))[: self.n]

    def write(self, out_dir: Path, hu_window: tuple[float, float]) -> list[Path]:
        """``out_dir/<case>_zNNNN.png``: reference (left) and prediction (right) on the CT."""
        return [
            write_png_atomic(
                render_comparison(hu, truth, pred, hu_window), out_dir / f"{name}_z{z:04d}.png"
            )
            for _, name, z, hu, truth, pred in self.kept
        ]


def case_row(
    name: str, spacing: Sequence[float], truth: np.ndarray, pred: np.ndarray
) -> dict[str, Any]:
    """One per-case CSV row (``seconds`` added by the caller)."""
    n_empty, n_fp = empty_slice_false_positives(truth, pred)
    return {
        "case": name,
        "n_slices": truth.shape[0],
        "height": truth.shape[1],
        "width": truth.shape[2],
        "spacing_z": round(float(spacing[0]), 6),
        "spacing_y": round(float(spacing[1]), 6),
        "spacing_x": round(float(spacing[2]), 6),
        **kits_case_metrics(truth, pred),
        "true_kidney_tumor_voxels": int(np.count_nonzero(truth)),
        "pred_kidney_tumor_voxels": int(np.count_nonzero(pred)),
        "true_tumor_voxels": int(np.count_nonzero(truth == 2)),
        "pred_tumor_voxels": int(np.count_nonzero(pred == 2)),
        "empty_slices": n_empty,
        "empty_slices_false_positive": n_fp,
    }


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
    overlay_dir: Path | None = None,
    n_overlays: int = DEFAULT_OVERLAYS,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """KiTS19 Dice per case, their means and the headline figures; JC_w pooled over all voxels.

    Returns (summary, rows); rows follow :data:`PER_CASE_COLUMNS`. ``save_dir`` also writes
    each prediction as ``<case folder>.nii.gz`` on the case's own grid; ``overlay_dir`` gets
    PNGs of the ``n_overlays`` worst cases.
    """
    n_classes = int(loaded.config.get("n_classes", N_CLASSES))
    rows: list[dict[str, Any]] = []
    cm = np.zeros((n_classes, n_classes), np.int64)
    worst = WorstCases(n_overlays if overlay_dir is not None else 0)
    for case_id in cases:
        t0 = time.perf_counter()
        case = load_case(kits_dir, case_id, require_segmentation=True)
        folder = case_folder(kits_dir, case_id)
        spacing = tuple(float(s) for s in case.spacing)
        pred = segment_volume(
            loaded.model,
            case.imaging,
            (spacing[1], spacing[2]),
            loaded.config,
            batch_size,
            overlap,
            progress_bar(f"  {folder.name}", progress),
            name=folder.name,
        )
        if postprocess:
            pred = keep_largest_components(pred, postprocess)
        truth = case.segmentation
        assert truth is not None
        if save_dir is not None:
            source, orient = open_ct(folder / IMAGING)
            write_labels(pred, source, orient, save_dir / f"{folder.name}.nii.gz")
        cm += confusion_matrix_chunked(truth, pred, n_classes)
        row = case_row(folder.name, spacing, truth, pred)
        row["seconds"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
        worst.offer(row, case.imaging, truth, pred)
        log.info(
            "%s: kidney+tumor Dice %.4f, tumor Dice %.4f (%s s)",
            folder.name,
            row["kidney_dice"],
            row["tumor_dice"],
            format_seconds(row["seconds"]),
        )
    if overlay_dir is not None and worst.kept:
        prep = preprocessing_params(loaded.config)
        worst.write(overlay_dir, (prep.hu_min, prep.hu_max))
    return volume_summary(kits_dir, rows, cm, class_weights, postprocess), rows


def volume_summary(
    kits_dir: Path,
    rows: Sequence[dict[str, Any]],
    cm: np.ndarray,
    class_weights: Sequence[float],
    postprocess: int | None,
) -> dict[str, Any]:
    """Means over all cases (the KiTS19 leaderboard's), headline figures, pooled scores."""
    kidney = [r["kidney_dice"] for r in rows]
    tumor = [r["tumor_dice"] for r in rows]
    return {
        "kits_dir": str(kits_dir),
        "cases": [r["case"] for r in rows],
        "n_cases": len(rows),
        "postprocess": {"keep_largest_components": postprocess} if postprocess else None,
        "kidney_dice_mean": float(np.mean(kidney)) if rows else None,
        "tumor_dice_mean": float(np.mean(tumor)) if rows else None,
        # the KiTS19 leaderboard ranked by the average of the two means
        "kits_score": float((np.mean(kidney) + np.mean(tumor)) / 2) if rows else None,
        "headline": headline(rows),
        "tumor_dice_convention": TUMOR_DICE_CONVENTION,
        "pooled_original_resolution": scores_from_confusion(cm, class_weights),
        "seconds_per_volume_mean": float(np.mean([r["seconds"] for r in rows])) if rows else None,
    }

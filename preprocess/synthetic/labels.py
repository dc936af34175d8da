"""Real KiTS19 label maps as the anatomy source: finding, reading, validating, shrinking."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from preprocess.kits import (
    CASE_RE,
    SEGMENTATION,
    CaseError,
    case_name,
    read_volume,
    spacing_from_affine,
    validate_labels,
)
from preprocess.resize import resize_masks

FLAT_RE = CASE_RE.pattern[:-1] + r"_segmentation\.nii\.gz$"  # case_XXXXX_segmentation.nii.gz


def find_label_files(labels_dir: str | Path) -> dict[int, Path]:
    """Case id -> label file, from ``case_XXXXX_segmentation.nii.gz`` files or KiTS19-style
    ``case_XXXXX/segmentation.nii.gz`` folders (the flat file wins if both exist)."""
    folder = Path(labels_dir)
    if not folder.is_dir():
        raise CaseError(f"{folder}: labels folder not found")
    flat = re.compile(FLAT_RE)
    found: dict[int, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_dir() and (m := CASE_RE.match(p.name)) and (p / SEGMENTATION).is_file():
            found.setdefault(int(m.group(1)), p / SEGMENTATION)
    for p in sorted(folder.iterdir()):
        if p.is_file() and (m := flat.match(p.name)):
            found[int(m.group(1))] = p
    if not found:
        raise CaseError(
            f"{folder}: no label files (expected case_XXXXX_segmentation.nii.gz files "
            f"or case_XXXXX/{SEGMENTATION} folders)"
        )
    return dict(sorted(found.items()))


def _json_spacing(path: Path, case_id: int) -> tuple[float, float, float] | None:
    """Spacing from a kits.json beside the label files (KiTS19 clinical metadata), if any."""
    meta = path.parent / "kits.json"
    if not meta.is_file():
        meta = path.parent.parent / "kits.json"
    try:
        for entry in json.loads(meta.read_text()):
            if entry.get("case_id") == case_name(case_id):
                v = entry["voxel_spacing"]
                return float(v["z_spacing"]), float(v["y_spacing"]), float(v["x_spacing"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def load_label_map(
    path: str | Path,
    case_id: int,
    max_slices: int | None = None,
    size: int | None = None,
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A validated label map (uint8 (slices, H, W)) and its spacing (sz, sy, sx) from the affine.

    ``max_slices`` crops to at most that many slices centred on the kidneys; ``size`` resizes
    in-plane to size x size (nearest neighbour) and scales the spacing to match.
    """
    path = Path(path)
    raw, affine, _ = read_volume(path, case_name(case_id))
    if raw.ndim != 3:
        raise CaseError(f"{path}: label map is {raw.ndim}-D, expected 3-D (slices, H, W)")
    if raw.dtype.kind == "f" and not np.all(np.isfinite(raw)):
        raise CaseError(f"{path}: label map contains non-finite values")
    if raw.dtype.kind in "ub" and raw.size and int(raw.max()) <= 2:
        labels = raw.astype(np.uint8, copy=False)  # fast path: np.unique sorts 10^8 voxels
    else:
        labels = validate_labels(raw, str(path))
    spacing = spacing_from_affine(affine)
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        spacing = _json_spacing(path, case_id)
        if spacing is None:
            raise CaseError(f"{path}: degenerate affine and no spacing in kits.json")
    if max_slices is not None and labels.shape[0] > max_slices:
        occupied = np.flatnonzero(labels.any(axis=(1, 2)))
        centre = (occupied[0] + occupied[-1]) // 2 if len(occupied) else labels.shape[0] // 2
        start = int(np.clip(centre - max_slices // 2, 0, labels.shape[0] - max_slices))
        labels = labels[start : start + max_slices]
    if size is not None and labels.shape[1:] != (size, size):
        h, w = labels.shape[1:]
        labels = resize_masks(labels, size, method="nearest")
        spacing = (spacing[0], spacing[1] * h / size, spacing[2] * w / size)
    return np.ascontiguousarray(labels, dtype=np.uint8), tuple(float(s) for s in spacing)

"""PNG overlays of label maps on CT slices, for a quick look without a NIfTI viewer.

Slices are canonical (KiTS19-layout) axial slices, whatever the orientation of the input file.
Images are written atomically (temporary name, then rename).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from preprocess.kits import atomic_path
from preprocess.resize import window_to_uint8
from train.volumes import InferenceError

#: Overlay colours (BGR for OpenCV): kidney red, tumor yellow.
OVERLAY_COLOURS = {1: (40, 40, 230), 2: (0, 220, 255)}
OVERLAY_ALPHA = 0.45
_SEPARATOR_PX = 4


def pick_overlay_slices(labels: np.ndarray, n: int = 3) -> list[int]:
    """The ``n`` slices with the most kidney+tumor (the middle slice if there is none)."""
    per_slice = (labels > 0).reshape(labels.shape[0], -1).sum(axis=1)
    if per_slice.max(initial=0) == 0:
        return [labels.shape[0] // 2]
    order = np.argsort(-per_slice, kind="stable")
    return sorted(int(i) for i in order[:n] if per_slice[i] > 0)


def render_overlay(
    hu_slice: np.ndarray, label_slice: np.ndarray, hu_min: float, hu_max: float
) -> np.ndarray:
    """(H, W) HU and labels -> (H, W, 3) uint8 BGR image: grey CT with coloured labels blended."""
    grey = np.clip(np.rint(window_to_uint8(hu_slice, hu_min, hu_max)), 0, 255).astype(np.uint8)
    image = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR).astype(np.float32)
    for label, colour in OVERLAY_COLOURS.items():
        where = label_slice == label
        image[where] = (1 - OVERLAY_ALPHA) * image[where] + OVERLAY_ALPHA * np.float32(colour)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_comparison(
    hu_slice: np.ndarray,
    reference: np.ndarray,
    prediction: np.ndarray,
    hu_window: tuple[float, float],
) -> np.ndarray:
    """Reference (left) and prediction (right) overlaid on the same CT slice, side by side."""
    left = render_overlay(hu_slice, reference, *hu_window)
    right = render_overlay(hu_slice, prediction, *hu_window)
    gap = np.full((left.shape[0], _SEPARATOR_PX, 3), 255, np.uint8)
    image = np.concatenate([left, gap, right], axis=1)
    scale = max(0.3, left.shape[0] / 512)
    for text, x in (("reference", 4), ("prediction", left.shape[1] + _SEPARATOR_PX + 4)):
        y = int(16 * scale) + 2
        cv2.putText(image, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, (255, 255, 255))
    return image


def write_png_atomic(image: np.ndarray, path: Path) -> Path:
    """Encode ``image`` (BGR) as PNG and write it via a temporary name and rename."""
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    try:
        tmp.write_bytes(encoded.tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_overlays(
    hu: np.ndarray,
    labels: np.ndarray,
    out_dir: str | Path,
    stem: str,
    slices: Sequence[int] | None,
    hu_window: tuple[float, float],
) -> list[Path]:
    """PNG overlays ``out_dir/<stem>_zNNNN.png`` of the given slices (None: automatic pick).

    Slice numbers outside the volume raise InferenceError.
    """
    chosen = pick_overlay_slices(labels) if slices is None else list(slices)
    bad = [s for s in chosen if not 0 <= s < labels.shape[0]]
    if bad:
        raise InferenceError(
            f"{stem}: overlay slices {bad} outside the volume (0..{labels.shape[0] - 1})"
        )
    out_dir = Path(out_dir)
    return [
        write_png_atomic(
            render_overlay(hu[s], labels[s], *hu_window), out_dir / f"{stem}_z{s:04d}.png"
        )
        for s in chosen
    ]

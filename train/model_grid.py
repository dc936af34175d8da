"""Between a CT's canonical slices and the model's grid: HU to model input, probabilities back.

The geometry is ``preprocess.geometry``'s, the one preprocessing used for the training data:
either the thesis's whole-slice resize to ``size x size`` (``target_spacing`` None) or a
resample to a fixed in-plane spacing, then a centred crop or zero pad. Going back, class
probabilities (not labels) are resampled to the original slice grid and the argmax taken there,
so class boundaries fall between pixels where the classes cross.
"""

from __future__ import annotations

import numpy as np

from preprocess.geometry import (
    SliceGeometry,
    probabilities_from_grid,
    slice_geometry,
    window_to_grid,
)

#: Slices per resampling call: a whole 512x512 volume of float32 probabilities needs gigabytes.
CHUNK_SLICES = 16


def grid_geometry(
    in_shape: tuple[int, int],
    spacing_yx: tuple[float, float] | None,
    target_spacing: float | None,
    size: int,
) -> SliceGeometry:
    """Where the canonical slices of ``in_shape`` land on the model's ``size x size`` grid."""
    return slice_geometry(tuple(int(v) for v in in_shape), spacing_yx, target_spacing, size)


def to_model_grid(hu: np.ndarray, geom: SliceGeometry, hu_min: float, hu_max: float) -> np.ndarray:
    """(S, H, W) canonical HU -> (S, size, size) float32 in [0, 1], one channel, as in training.

    Training stored the windowed slices on the grid as uint8 and divided by 255; the same
    function and rounding are used here.
    """
    if hu.ndim != 3:
        raise ValueError(f"expected a (slices, H, W) volume, got shape {hu.shape}")
    return window_to_grid(hu, hu_min, hu_max, geom).astype(np.float32) / np.float32(255.0)


def labels_from_grid(probs: np.ndarray, geom: SliceGeometry) -> np.ndarray:
    """(S, size, size, C) probabilities -> (S, H, W) uint8 labels on the canonical slice grid.

    Ties go to the lower class (background first).
    """
    if probs.ndim != 4 or probs.shape[1:3] != (geom.size, geom.size):
        raise ValueError(f"probabilities {probs.shape} are not on a {geom.size}-pixel grid")
    out = np.empty((probs.shape[0], *geom.in_shape), np.uint8)
    for start in range(0, probs.shape[0], CHUNK_SLICES):
        big = probabilities_from_grid(probs[start : start + CHUNK_SLICES], geom)
        out[start : start + CHUNK_SLICES] = np.argmax(big, axis=-1)
    return out

"""Where a canonical CT slice lands on the model's square grid, and the way back.

Two recipes share one description, :class:`SliceGeometry`:

- ``target_spacing`` None (the thesis's): each whole slice (H, W) is resized to size x size,
  whatever its field of view; pixels then differ in physical size from scan to scan;
- ``target_spacing`` MM: each slice is resampled to MM mm per pixel from its own spacing, then
  centre-cropped or zero-padded to size x size, so a kidney has the same size in pixels in every
  scan. Padding is 0 in the windowed uint8 images (below the HU window, as air) and background
  in the masks.

Preprocessing maps images and masks to the grid; inference maps the model's probabilities
back to the slice's own grid with :func:`probabilities_from_grid`.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from preprocess.resize import resize_images, resize_masks, window_and_resize

# OpenCV resizes at most 512 channels at once (CV_CN_MAX)
_MAX_CHANNELS = 512


@dataclass(frozen=True)
class SliceGeometry:
    in_shape: tuple[int, int]  # (H, W) of the canonical slices
    scaled_shape: tuple[int, int]  # (h, w) after resampling
    # (oy, ox): where scaled pixel (0, 0) lands on the size x size grid (negative: cropped)
    offset: tuple[int, int]
    size: int


def slice_geometry(
    in_shape: tuple[int, int],
    spacing_yx: tuple[float, float] | None,
    target_spacing: float | None,
    size: int,
) -> SliceGeometry:
    """The geometry of slices of ``in_shape`` (H, W) with in-plane spacing ``spacing_yx`` (mm;
    row, column) on a ``size`` x ``size`` grid; ``target_spacing`` None squeezes the whole slice
    onto the grid, a value in mm resamples to it and centres the result."""
    height, width = (int(v) for v in in_shape)
    if target_spacing is None:
        return SliceGeometry((height, width), (size, size), (0, 0), size)
    if target_spacing <= 0:
        raise ValueError(f"target spacing {target_spacing} mm must be positive")
    if spacing_yx is None:
        raise ValueError("a target spacing needs the slices' own spacing")
    sy, sx = (float(v) for v in spacing_yx)
    scaled = (
        max(1, round(height * sy / target_spacing)),
        max(1, round(width * sx / target_spacing)),
    )
    offset = ((size - scaled[0]) // 2, (size - scaled[1]) // 2)
    return SliceGeometry((height, width), scaled, offset, size)


def _overlap(geom: SliceGeometry) -> tuple[slice, slice, slice, slice]:
    """(grid rows, grid columns, scaled rows, scaled columns) of the part both cover."""
    parts = []
    for offset, length in zip(geom.offset, geom.scaled_shape, strict=True):
        lo, hi = max(0, offset), min(geom.size, offset + length)
        parts.append((slice(lo, max(lo, hi)), slice(lo - offset, max(lo, hi) - offset)))
    (grid_y, scaled_y), (grid_x, scaled_x) = parts
    return grid_y, grid_x, scaled_y, scaled_x


def _place(scaled: np.ndarray, geom: SliceGeometry) -> np.ndarray:
    """(n, h, w) uint8 -> (n, size, size): crop or pad with 0 around the centre."""
    if scaled.shape[1:] == (geom.size, geom.size) and geom.offset == (0, 0):
        return scaled
    out = np.zeros((len(scaled), geom.size, geom.size), np.uint8)
    grid_y, grid_x, scaled_y, scaled_x = _overlap(geom)
    out[:, grid_y, grid_x] = scaled[:, scaled_y, scaled_x]
    return out


def _check_input(array: np.ndarray, geom: SliceGeometry) -> None:
    if array.ndim != 3 or tuple(array.shape[1:]) != geom.in_shape:
        raise ValueError(f"slices of shape {array.shape} do not fit {geom.in_shape}")


def images_to_grid(slices_uint8: np.ndarray, geom: SliceGeometry) -> np.ndarray:
    """(n, H, W) windowed CT (0..255: uint8, or the float32 of ``window_to_uint8``) ->
    (n, size, size) uint8. With no target spacing: exactly ``resize_images(slices, size)``."""
    _check_input(slices_uint8, geom)
    return _place(resize_images(slices_uint8, geom.scaled_shape), geom)


def window_to_grid(hu: np.ndarray, hu_min: float, hu_max: float, geom: SliceGeometry) -> np.ndarray:
    """(n, H, W) HU -> (n, size, size) uint8: ``images_to_grid(window_to_uint8(hu, ...), geom)``
    without a full-resolution float copy (the window is applied as the slices are resized)."""
    _check_input(hu, geom)
    return _place(window_and_resize(hu, hu_min, hu_max, geom.scaled_shape), geom)


def masks_to_grid(
    labels: np.ndarray, geom: SliceGeometry, method: str = "area_rescue"
) -> np.ndarray:
    """(n, H, W) labels 0/1/2 -> (n, size, size) uint8 labels, resized by ``method`` (see
    ``preprocess.resize.resize_masks``: ``area_rescue`` keeps small tumors); padding is
    background."""
    _check_input(labels, geom)
    return _place(resize_masks(labels, geom.scaled_shape, method), geom)


def _resize_probabilities(probs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(n, h, w, C) float32 -> (n, rows, columns, C), bilinear, in chunks OpenCV accepts."""
    n, _, _, n_classes = probs.shape
    rows, columns = shape
    if probs.shape[1:3] == shape:
        return probs.astype(np.float32, copy=True)
    out = np.empty((n, rows, columns, n_classes), np.float32)
    step = max(1, _MAX_CHANNELS // n_classes)
    for start in range(0, n, step):
        part = probs[start : start + step]
        k = len(part)
        stack = np.ascontiguousarray(np.moveaxis(part, 0, 2).reshape(*part.shape[1:3], -1))
        big = cv2.resize(stack, (columns, rows), interpolation=cv2.INTER_LINEAR)
        out[start : start + k] = np.moveaxis(big.reshape(rows, columns, k, n_classes), 2, 0)
    return out


def probabilities_from_grid(probs: np.ndarray, geom: SliceGeometry) -> np.ndarray:
    """(n, size, size, C) float32 class probabilities -> (n, H, W, C) float32 on the slices'
    own grid (bilinear). Where the grid did not cover the slice (cropped), background
    (class 0) has probability 1."""
    if probs.ndim != 4 or probs.shape[1:3] != (geom.size, geom.size):
        raise ValueError(f"probabilities {probs.shape} are not on a {geom.size}-pixel grid")
    n, _, _, n_classes = probs.shape
    grid_y, grid_x, scaled_y, scaled_x = _overlap(geom)
    if geom.offset == (0, 0) and geom.scaled_shape == (geom.size, geom.size):
        scaled = probs
    else:
        scaled = np.zeros((n, *geom.scaled_shape, n_classes), np.float32)
        scaled[..., 0] = 1.0
        scaled[:, scaled_y, scaled_x] = probs[:, grid_y, grid_x]
    return _resize_probabilities(np.asarray(scaled, np.float32), geom.in_shape)

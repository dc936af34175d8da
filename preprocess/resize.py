"""HU windowing and 512 -> 128 resizing of CT slices and label masks (OpenCV).

Masks are the delicate part: a tumor of a few pixels at 512x512 covers a fraction of one pixel
at 128x128, and plain nearest-neighbour sampling keeps or loses it depending on where the
sampling grid happens to fall. The default method here, ``area_rescue``, computes each class's
covered fraction per output pixel (INTER_AREA on the one-hot mask), labels by the largest
fraction, then puts back every connected component that vanished at the output pixel where it
covered most. Nothing is erased, and boundaries stay where the area says they are.
"""

from __future__ import annotations

import cv2
import numpy as np

MASK_METHODS = ("area_rescue", "nearest", "cubic_threshold")
# OpenCV resizes at most 512 channels at once (CV_CN_MAX); stacks of slices go in chunks.
_CV_MAX_CHANNELS = 512


def window_to_uint8(hu: np.ndarray, hu_min: float, hu_max: float) -> np.ndarray:
    """Clip HU to [hu_min, hu_max] and map linearly to 0..255 (float32, not yet rounded)."""
    scale = np.float32(255.0 / (hu_max - hu_min))
    out = np.clip(hu, hu_min, hu_max).astype(np.float32, copy=False)
    out -= np.float32(hu_min)
    out *= scale
    return out


def _max_channels(height: int, width: int, size: int, interpolation: int) -> int:
    """Channels OpenCV accepts per cv2.resize call for this resize.

    INTER_AREA shrinking by a non-integer factor (e.g. a 512x796 CT to 128x128) takes at most
    4 channels (cv2.error "cn <= 4"); integer factors and other interpolations take 512.
    """
    if interpolation == cv2.INTER_AREA and (height % size or width % size):
        return 4
    return _CV_MAX_CHANNELS


def _resize_stack(stack_hwc: np.ndarray, size: int, interpolation: int) -> np.ndarray:
    """Resize an (H, W, C) array to (size, size, C), C of any length."""
    parts = []
    step = _max_channels(stack_hwc.shape[0], stack_hwc.shape[1], size, interpolation)
    for start in range(0, stack_hwc.shape[2], step):
        chunk = np.ascontiguousarray(stack_hwc[:, :, start : start + step])
        out = cv2.resize(chunk, (size, size), interpolation=interpolation)
        if out.ndim == 2:  # OpenCV drops a channel axis of length 1
            out = out[:, :, None]
        parts.append(out)
    return np.concatenate(parts, axis=2) if len(parts) > 1 else parts[0]


def resize_images(slices: np.ndarray, size: int) -> np.ndarray:
    """(S, H, W) float32 window-scaled slices -> (S, size, size) uint8, area-averaged."""
    if len(slices) == 0 or slices.shape[1:] == (size, size):
        resized = slices.reshape(len(slices), size, size) if len(slices) == 0 else slices
    else:
        resized = _resize_stack(np.moveaxis(slices, 0, 2), size, cv2.INTER_AREA)
        resized = np.moveaxis(resized, 2, 0)
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


def _rescue_lost_components(
    source: np.ndarray, fractions: np.ndarray, out: np.ndarray, label: int
) -> None:
    """Put back components of ``label`` that vanished when ``source`` (H, W) became ``out``."""
    src = (source == label).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(src, connectivity=8)
    fy = out.shape[0] / source.shape[0]
    fx = out.shape[1] / source.shape[1]
    for k in range(1, n):
        x, y, w, h = (int(v) for v in stats[k, :4])
        # the output pixels whose footprint overlaps the component's bounding box
        y0, y1 = int(y * fy), min(int(np.ceil((y + h) * fy)), out.shape[0])
        x0, x1 = int(x * fx), min(int(np.ceil((x + w) * fx)), out.shape[1])
        if np.any(out[y0:y1, x0:x1] == label):
            continue
        window = fractions[y0:y1, x0:x1]
        iy, ix = np.unravel_index(int(np.argmax(window)), window.shape)
        out[y0 + iy, x0 + ix] = label


def resize_masks(masks: np.ndarray, size: int, method: str = "area_rescue") -> np.ndarray:
    """(S, H, W) uint8 labels 0/1/2 -> (S, size, size) uint8 labels.

    Methods: ``area_rescue`` (default, see the module docstring), ``nearest`` (OpenCV
    INTER_NEAREST), ``cubic_threshold`` (the thesis: cubic interpolation of each class's mask,
    then a class is present where the result exceeds 0.2; tumor over kidney over background).
    """
    if method not in MASK_METHODS:
        raise ValueError(f"unknown mask resize method {method!r}; choose from {MASK_METHODS}")
    if len(masks) == 0:
        return np.zeros((0, size, size), np.uint8)
    if masks.shape[1:] == (size, size):
        return masks.astype(np.uint8, copy=True)
    n_slices = masks.shape[0]
    stack = np.moveaxis(masks, 0, 2)  # (H, W, S)
    if method == "nearest":
        out = _resize_stack(stack, size, cv2.INTER_NEAREST)
        return np.ascontiguousarray(np.moveaxis(out, 2, 0)).astype(np.uint8)

    interpolation = cv2.INTER_AREA if method == "area_rescue" else cv2.INTER_CUBIC
    fractions = np.empty((3, size, size, n_slices), np.float32)
    for label in (0, 1, 2):
        fractions[label] = _resize_stack((stack == label).astype(np.float32), size, interpolation)
    if method == "cubic_threshold":
        out = np.zeros((size, size, n_slices), np.uint8)
        out[fractions[1] > 0.2] = 1
        out[fractions[2] > 0.2] = 2
        return np.ascontiguousarray(np.moveaxis(out, 2, 0))

    # Largest covered fraction wins; ties go to the rarer class (tumor, then kidney).
    bias = np.array([0.0, 1e-6, 2e-6], np.float32)[:, None, None, None]
    out = np.argmax(fractions + bias, axis=0).astype(np.uint8)
    for s in range(n_slices):
        src = masks[s]
        for label in (2, 1):
            if np.any(src == label):
                _rescue_lost_components(src, fractions[label, :, :, s], out[:, :, s], label)
    return np.ascontiguousarray(np.moveaxis(out, 2, 0))

"""HU windowing and resizing of CT slices and label masks (OpenCV), e.g. 512x512 -> 128x128.

Every resize takes an output size ``size``: an int for square slices, or ``(rows, columns)``.

Masks are the delicate part: a tumor of a few pixels at 512x512 covers a fraction of one pixel
at 128x128, and plain nearest-neighbour sampling keeps or loses it depending on where the
sampling grid happens to fall. The default method here, ``area_rescue``, computes each class's
covered fraction per output pixel (INTER_AREA on the one-hot mask), labels by the largest
fraction, then gives every blob of a class's covered pixels that lost all of them one pixel back,
where the class covered most. Nothing is erased (a tumor of one voxel at 512x512 keeps one pixel
at 128x128), and boundaries stay where the area says they are.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

MASK_METHODS = ("area_rescue", "nearest", "cubic_threshold")
# OpenCV resizes at most 512 channels at once (CV_CN_MAX); stacks of slices go in chunks.
_CV_MAX_CHANNELS = 512
# Slices per cv2.resize call: 64 one-byte labels are one cache line of a Fortran-ordered volume,
# and the float32 buffer of a chunk (64 MB at 512x512) is allocated once per volume.
_CHUNK_SLICES = 64


def _window_into(hu: np.ndarray, out: np.ndarray, hu_min: float, hu_max: float) -> np.ndarray:
    """Write the HU window of ``hu``, scaled to 0..255, into float32 ``out`` (same shape)."""
    lo, hi = np.float32(hu_min), np.float32(hu_max)
    # Converting first and clipping in float32 gives the same numbers as clipping the input's
    # own type (the bounds are float32 values, and rounding to float32 keeps order), and it is
    # faster: a clip that converts as it goes runs a slow buffered loop.
    np.copyto(out, hu, casting="unsafe")
    np.clip(out, lo, hi, out=out)
    out -= lo
    out *= np.float32(255.0) / (hi - lo)
    return out


def window_to_uint8(hu: np.ndarray, hu_min: float, hu_max: float) -> np.ndarray:
    """Clip HU to [hu_min, hu_max] and map linearly to 0..255 (float32, not yet rounded).

    Takes any numeric dtype (KiTS19 stores int16) and keeps the input's memory layout.
    """
    return _window_into(hu, np.empty_like(hu, dtype=np.float32), hu_min, hu_max)


def _max_channels(shape: tuple[int, int], out: tuple[int, int], interpolation: int) -> int:
    """Channels OpenCV accepts per cv2.resize call for this resize (``shape`` -> ``out``).

    INTER_AREA shrinking by a non-integer factor (e.g. a 512x796 CT to 128x128) takes at most
    4 channels (cv2.error "cn <= 4"); integer factors and other interpolations take 512.
    """
    if interpolation == cv2.INTER_AREA and (shape[0] % out[0] or shape[1] % out[1]):
        return 4
    return _CV_MAX_CHANNELS


# A function writing a converted copy of a (W, H, c) source chunk into a float32 buffer.
Convert = Callable[[np.ndarray, np.ndarray], np.ndarray]


Size = int | tuple[int, int]


def _rows_columns(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _resize_volume(
    volume: np.ndarray,
    size: Size,
    interpolation: int,
    convert: Convert | None = None,
) -> np.ndarray:
    """Resize every slice of a (S, H, W) array to ``size`` (an int: square; or (rows, columns));
    returns (S, rows, columns).

    Works on the transposed view (W, H, S), which OpenCV takes as W x H images with the slices
    as channels, _CHUNK_SLICES at a time. NIfTI volumes from nibabel are Fortran-ordered, so
    that view reads each pixel's run of slices contiguously, and the volume is never copied into
    slice order (a copy as large as the CT). ``convert``, when given, turns each chunk into
    float32 first (HU window, one-hot mask) in one reused buffer instead of a full-resolution
    float copy of the volume. Every layout takes the same path, so
    the result does not depend on where the array came from.
    """
    rows, columns = _rows_columns(size)
    n_slices = volume.shape[0]
    dtype = np.float32 if convert is not None else volume.dtype
    if n_slices == 0:
        return np.zeros((0, rows, columns), dtype)
    transposed = volume.T  # (W, H, S)
    width, height = transposed.shape[:2]
    step = min(_CHUNK_SLICES, _max_channels((height, width), (rows, columns), interpolation))
    out = np.empty((columns, rows, n_slices), dtype)
    buffer = np.empty((width, height, min(step, n_slices)), np.float32) if convert else None
    for start in range(0, n_slices, step):
        source = transposed[:, :, start : start + step]
        if convert is None:
            chunk = np.ascontiguousarray(source)
        else:
            assert buffer is not None
            fits = source.shape[2] == buffer.shape[2]
            chunk = buffer if fits else np.empty(source.shape, np.float32)
            convert(source, chunk)
        resized = cv2.resize(chunk, (rows, columns), interpolation=interpolation)
        out[:, :, start : start + step] = resized.reshape(columns, rows, -1)
    return np.ascontiguousarray(out.T)  # (S, rows, columns); small, so the copy is cheap


def _to_uint8(resized: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


def resize_images(slices: np.ndarray, size: Size) -> np.ndarray:
    """(S, H, W) window-scaled slices (float32 or uint8) -> (S, rows, columns) uint8,
    area-averaged."""
    if slices.shape[1:] == _rows_columns(size):
        return _to_uint8(np.asarray(slices))
    return _to_uint8(_resize_volume(slices, size, cv2.INTER_AREA))


def window_and_resize(hu: np.ndarray, hu_min: float, hu_max: float, size: Size) -> np.ndarray:
    """(S, H, W) HU -> (S, rows, columns) uint8: ``resize_images(window_to_uint8(hu, ...), size)``.

    The same numbers, without the full-resolution float32 copy in between: the window is applied
    chunk by chunk as the slices are resized. What preprocessing and inference both use.
    """
    if hu.shape[1:] == _rows_columns(size):
        return resize_images(window_to_uint8(hu, hu_min, hu_max), size)

    def window(source: np.ndarray, out: np.ndarray) -> np.ndarray:
        return _window_into(source, out, hu_min, hu_max)

    return _to_uint8(_resize_volume(hu, size, cv2.INTER_AREA, window))


def _rescue_lost_components(fractions: np.ndarray, out: np.ndarray, label: int) -> None:
    """Give back ``label`` to each blob of its covered pixels in ``out`` (H, W) that lost it all.

    A blob is a connected group (8-neighbourhood) of output pixels with a non-zero covered
    fraction of ``label``; one that holds no ``label`` pixel after the argmax gets one, at its
    pixel of largest fraction. Works at the output resolution only, so it costs little more than
    the argmax. Kidney never replaces tumor.
    """
    n, blobs = cv2.connectedComponents((fractions > 0).astype(np.uint8), connectivity=8)
    if n <= 1:
        return
    kept = np.zeros(n, bool)
    kept[blobs[out == label]] = True
    for blob in np.flatnonzero(~kept[1:]) + 1:
        allowed = blobs == blob
        if label == 1:
            allowed &= out != 2
        if not allowed.any():
            continue
        where = int(np.argmax(np.where(allowed, fractions, -1.0)))
        out.flat[where] = label


def resize_masks(masks: np.ndarray, size: Size, method: str = "area_rescue") -> np.ndarray:
    """(S, H, W) uint8 labels 0/1/2 -> (S, rows, columns) uint8 labels.

    Methods: ``area_rescue`` (default, see the module docstring), ``nearest`` (OpenCV
    INTER_NEAREST), ``cubic_threshold`` (the thesis: cubic interpolation of each class's mask,
    then a class is present where the result exceeds 0.2; tumor over kidney over background).
    """
    if method not in MASK_METHODS:
        raise ValueError(f"unknown mask resize method {method!r}; choose from {MASK_METHODS}")
    if len(masks) == 0:
        return np.zeros((0, *_rows_columns(size)), np.uint8)
    if masks.shape[1:] == _rows_columns(size):
        return np.array(masks, np.uint8, copy=True)
    if method == "nearest":
        return _resize_volume(np.asarray(masks, np.uint8), size, cv2.INTER_NEAREST)

    interpolation = cv2.INTER_AREA if method == "area_rescue" else cv2.INTER_CUBIC
    # Kidney and tumor fractions only: background's is what they leave (area averaging is
    # linear), which saves a third of the full-resolution work.
    fractions: dict[int, np.ndarray] = {}
    for label in (1, 2):

        def one_hot(source: np.ndarray, out: np.ndarray, label: int = label) -> np.ndarray:
            return np.equal(source, label, out=out, casting="unsafe")

        fractions[label] = _resize_volume(masks, size, interpolation, one_hot)
    if method == "cubic_threshold":
        out = np.zeros(fractions[1].shape, np.uint8)
        out[fractions[1] > 0.2] = 1
        out[fractions[2] > 0.2] = 2
        return out

    return labels_from_fractions(fractions[1], fractions[2])


def labels_from_fractions(kidney: np.ndarray, tumor: np.ndarray) -> np.ndarray:
    """``area_rescue`` labels (S, rows, columns) from each class's covered fraction per pixel."""
    fractions = {1: kidney, 2: tumor}
    # Largest covered fraction wins; ties go to the rarer class (tumor, then kidney). Two
    # comparisons are the argmax over (background, kidney, tumor) with its first-wins rule on
    # exact ties, without stacking the three.
    background = 1.0 - kidney - tumor
    kidney_score, tumor_score = kidney + 1e-6, tumor + 2e-6
    out = (kidney_score > background).astype(np.uint8)
    out[(tumor_score > background) & (tumor_score > kidney_score)] = 2
    for label in (2, 1):
        for s in np.flatnonzero((fractions[label] > 0).any(axis=(1, 2))):
            _rescue_lost_components(fractions[label][s], out[s], label)
    return out

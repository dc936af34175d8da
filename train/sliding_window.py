"""Sliding windows of a 3D model along the slice axis, blended with Gaussian weights.

A 3D model sees blocks of ``depth`` slices; a volume is covered by windows overlapping by a
fraction of the depth (MLPerf's KiTS19 3D U-Net reference: half) and each slice's probabilities
are the Gaussian-weighted mean of the windows that hold it. Predictions near a block's edges see
less context and are less reliable, hence their lower weight.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: Default overlap of consecutive windows, as a fraction of the block depth (MLPerf: 0.5).
DEFAULT_OVERLAP = 0.5
#: Gaussian sigma as a fraction of the block depth (MLPerf's KiTS19 3D U-Net reference: 0.125).
GAUSSIAN_SIGMA_SCALE = 0.125

#: ``progress(done, total)``, called after each batch.
Progress = Callable[[int, int], None]
#: ``predict(batch)``: (B, depth, h, w, channels) model input -> (B, depth, h, w, C) probabilities.
PredictBatch = Callable[[np.ndarray], np.ndarray]


def gaussian_weights(depth: int, sigma_scale: float = GAUSSIAN_SIGMA_SCALE) -> np.ndarray:
    """Blending weights along the slice axis of a block: a Gaussian centred on the block.

    ``w[i] = exp(-(i - (depth - 1) / 2)^2 / (2 sigma^2))`` with ``sigma = sigma_scale * depth``,
    maximum 1 at the centre and positive everywhere, so every slice of a block counts a little.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    sigma = sigma_scale * depth
    z = np.arange(depth, dtype=np.float64) - (depth - 1) / 2.0
    w = np.exp(-(z**2) / (2.0 * sigma**2))
    return (w / w.max()).astype(np.float32)


def window_starts(n_slices: int, depth: int, overlap: float = DEFAULT_OVERLAP) -> list[int]:
    """First slices of the windows of ``depth`` slices covering ``n_slices`` slices.

    Consecutive windows share ``round(overlap * depth)`` slices (at least one slice of step);
    the last window ends exactly at the last slice, so every slice is covered and no window
    reaches past the volume. A volume thinner than one window gets one window at 0 (the caller
    pads it).
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if n_slices <= depth:
        return [0]
    step = max(1, depth - int(round(overlap * depth)))
    starts = list(range(0, n_slices - depth + 1, step))
    if starts[-1] + depth < n_slices:
        starts.append(n_slices - depth)
    return starts


class WindowBlend:
    """Running Gaussian-weighted sum of window predictions over a volume of ``n_slices``.

    Windows are added as they come, so memory holds one volume of probabilities, not every
    window. The result is ``sum_k w[z - s_k] p_k[z - s_k] / sum_k w[z - s_k]`` per slice: a
    convex combination, so class probabilities still sum to 1.
    """

    def __init__(self, n_slices: int, weights: np.ndarray) -> None:
        self.n_slices = n_slices
        self.weights = np.asarray(weights, np.float32)
        self.acc: np.ndarray | None = None
        self.norm = np.zeros(n_slices, np.float32)

    def add(self, probs: np.ndarray, start: int) -> None:
        """Add a (depth, h, w, C) window starting at slice ``start`` (padding past the end is
        dropped)."""
        if self.acc is None:
            self.acc = np.zeros((self.n_slices, *np.shape(probs)[1:]), np.float32)
        n = min(len(self.weights), self.n_slices - start)
        w = self.weights[:n]
        self.acc[start : start + n] += np.asarray(probs[:n], np.float32) * w[:, None, None, None]
        self.norm[start : start + n] += w

    def result(self) -> np.ndarray:
        if self.acc is None or np.any(self.norm <= 0):
            raise ValueError("some slices are covered by no window")
        return self.acc / self.norm[:, None, None, None]


def predict_windows(
    predict: PredictBatch,
    x: np.ndarray,
    depth: int,
    channels: int,
    overlap: float = DEFAULT_OVERLAP,
    batch_size: int = 2,
    progress: Progress | None = None,
) -> np.ndarray:
    """Blended probabilities (S, h, w, C) of (S, h, w) single-channel model input ``x``.

    A volume thinner than a window is padded at the end with zeros (the HU window's minimum,
    as training padded the blocks of thin volumes) and cropped back; ``progress`` counts
    windows.
    """
    n_slices = x.shape[0]
    if n_slices < depth:
        x = np.concatenate([x, np.zeros((depth - n_slices, *x.shape[1:]), x.dtype)])
    starts = window_starts(n_slices, depth, overlap)
    blend = WindowBlend(n_slices, gaussian_weights(depth))
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        batch = np.stack([x[s : s + depth] for s in chunk])
        out = predict(np.repeat(batch[..., None], channels, axis=-1))
        for window, start in zip(out, chunk, strict=True):
            blend.add(window, start)
        if progress:
            progress(min(i + batch_size, len(starts)), len(starts))
    return blend.result()

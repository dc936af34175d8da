"""Sliding windows along the slice axis (train.sliding_window): weights, starts, blending."""

from __future__ import annotations

import numpy as np
import pytest

from train.sliding_window import WindowBlend, gaussian_weights, predict_windows, window_starts


def test_gaussian_weights_symmetric_peaked_and_sigma():
    for depth in (8, 32, 33):
        w = gaussian_weights(depth)
        np.testing.assert_allclose(w, w[::-1], rtol=0, atol=1e-7)
        assert w.max() == pytest.approx(1.0) and np.all(w > 0)
        centre = (depth - 1) / 2
        sigma = 0.125 * depth
        z = np.arange(depth)
        expected = np.exp(-((z - centre) ** 2) / (2 * sigma**2))
        np.testing.assert_allclose(w, expected / expected.max(), rtol=1e-6)
    assert np.argmax(gaussian_weights(33)) == 16


def test_window_starts_cover_the_volume_with_overlap():
    assert window_starts(32, 32) == [0]
    assert window_starts(5, 32) == [0]
    starts = window_starts(100, 32, 0.5)
    assert starts[:3] == [0, 16, 32] and starts[-1] == 100 - 32
    covered = np.zeros(100, int)
    for s in starts:
        covered[s : s + 32] += 1
    assert covered.min() >= 1 and covered.max() <= 3
    assert window_starts(40, 8, 0.0) == [0, 8, 16, 24, 32]
    with pytest.raises(ValueError, match="overlap"):
        window_starts(40, 8, 1.0)


def _blend(windows, starts, n, weights):
    blend = WindowBlend(n, weights)
    for window, start in zip(windows, starts, strict=True):
        blend.add(window, start)
    return blend.result()


def test_blend_is_the_weighted_average_and_sums_to_one():
    depth, n = 4, 6
    w = gaussian_weights(depth)
    starts = [0, 2]
    a = np.zeros((depth, 1, 1, 3), np.float32)
    a[..., 1] = 1.0  # window 0 says kidney everywhere
    b = np.zeros((depth, 1, 1, 3), np.float32)
    b[..., 2] = 1.0  # window 1 says tumor everywhere
    out = _blend([a, b], starts, n, w)
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, rtol=1e-6)
    # slice 2 is a's 3rd slice and b's 1st: kidney share w[2] / (w[2] + w[0])
    np.testing.assert_allclose(out[2, 0, 0, 1], w[2] / (w[2] + w[0]), rtol=1e-6)
    np.testing.assert_allclose(out[3, 0, 0, 2], w[1] / (w[3] + w[1]), rtol=1e-6)
    np.testing.assert_allclose(out[0, 0, 0], [0, 1, 0])  # only window a
    np.testing.assert_allclose(out[5, 0, 0], [0, 0, 1])  # only window b
    # equal windows blend to themselves, whatever the weights
    same = _blend([a, a], starts, n, w)
    np.testing.assert_allclose(same, np.broadcast_to(a[:1], same.shape), rtol=1e-6)
    with pytest.raises(ValueError, match="no window"):
        _blend([a], [0], n, w)  # slices 4 and 5 uncovered


def _slice_mean_model(batch: np.ndarray) -> np.ndarray:
    """A stand-in 3D model: per voxel, class 1's probability is the mean of its slice's input."""
    mean = batch[..., 0].mean(axis=(2, 3), keepdims=True)
    kidney = np.broadcast_to(mean, batch.shape[:-1])
    return np.stack([1 - kidney, kidney, np.zeros_like(kidney)], axis=-1)


def test_predict_windows_pads_thin_volumes_and_counts_progress():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (19, 4, 4)).astype(np.float32)
    seen = []
    probs = predict_windows(_slice_mean_model, x, 8, 3, 0.5, 2, lambda d, t: seen.append((d, t)))
    # each slice's prediction depends only on the slice, so blending gives it back exactly
    np.testing.assert_allclose(
        probs[..., 1], np.broadcast_to(x.mean((1, 2))[:, None, None], x.shape), rtol=1e-5
    )
    n_windows = len(window_starts(19, 8))
    assert seen[-1] == (n_windows, n_windows)
    thin = predict_windows(_slice_mean_model, x[:3], 8, 3)
    assert thin.shape == (3, 4, 4, 3)
    np.testing.assert_allclose(thin, probs[:3], rtol=1e-5)

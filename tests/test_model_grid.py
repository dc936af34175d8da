"""HU to the model grid and probabilities back (train.model_grid), both spacing recipes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from inference_runs import synthetic_ct

from preprocess.resize import resize_images, window_to_uint8
from train.model_grid import grid_geometry, labels_from_grid, to_model_grid


def test_whole_slice_resize_is_the_training_preprocessing():
    # 40x48 -> 32x32 is a non-integer shrink (OpenCV's INTER_AREA then takes few channels)
    hu, _ = synthetic_ct()
    geom = grid_geometry(hu.shape[1:], (0.8, 0.8), None, 32)
    x = to_model_grid(hu, geom, -512, 512)
    expected = resize_images(window_to_uint8(hu, -512, 512), 32).astype(np.float32) / 255
    assert x.shape == (hu.shape[0], 32, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(x, expected)


def test_whole_slice_labels_upsample_probabilities_then_argmax():
    probs = np.zeros((2, 4, 4, 3), np.float32)
    probs[..., 0] = 1.0
    probs[0, :2, :2] = [0, 1, 0]  # kidney in the top-left quarter of slice 0
    probs[1, 2:, 2:] = [0, 0, 1]  # tumor in the bottom-right quarter of slice 1
    labels = labels_from_grid(probs, grid_geometry((8, 12), None, None, 4))
    assert labels.shape == (2, 8, 12) and labels.dtype == np.uint8
    big = cv2.resize(
        np.ascontiguousarray(np.moveaxis(probs, 0, 2).reshape(4, 4, 6)),
        (12, 8),
        interpolation=cv2.INTER_LINEAR,
    )
    np.testing.assert_array_equal(labels, np.moveaxis(big.reshape(8, 12, 2, 3), 2, 0).argmax(-1))
    assert labels[0, 0, 0] == 1 and labels[0, 7, 11] == 0 and labels[1, 7, 11] == 2
    same = labels_from_grid(probs, grid_geometry((4, 4), None, None, 4))
    np.testing.assert_array_equal(same, probs.argmax(-1))
    with pytest.raises(ValueError, match="not on a 8-pixel grid"):
        labels_from_grid(probs, grid_geometry((8, 8), None, None, 8))


def test_fixed_spacing_gives_the_stated_mm_per_pixel_and_background_outside():
    # a 20 mm wide bright square on 0.5 mm pixels; the grid at 1 mm shows it 20 pixels wide
    hu = np.full((1, 100, 120), -1000.0, np.float32)
    hu[0, 30:70, 40:80] = 300.0
    geom = grid_geometry(hu.shape[1:], (0.5, 0.5), 1.0, 64)
    assert geom.scaled_shape == (50, 60)
    x = to_model_grid(hu, geom, -512, 512)
    bright = x[0] > 0.5
    assert bright.sum(axis=1).max() == 20 and bright.sum(axis=0).max() == 20
    # a grid smaller than the field of view is cropped: labels there are background
    small = grid_geometry(hu.shape[1:], (0.5, 0.5), 1.0, 40)
    probs = np.zeros((1, 40, 40, 3), np.float32)
    probs[..., 1] = 1.0  # kidney everywhere the model looked
    labels = labels_from_grid(probs, small)
    assert labels.shape == (1, 100, 120)
    assert labels[0, 50, 60] == 1 and labels[0, 0, 0] == 0 and labels[0, 99, 119] == 0

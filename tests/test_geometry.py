"""Slices on the model's grid and back (preprocess.geometry): whole-slice resize, fixed spacing."""

from __future__ import annotations

import numpy as np
import pytest

from preprocess.geometry import (
    SliceGeometry,
    images_to_grid,
    masks_to_grid,
    probabilities_from_grid,
    slice_geometry,
    window_to_grid,
)
from preprocess.resize import resize_masks, window_and_resize, window_to_uint8


def _volume(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """HU (Fortran-ordered int16, as nibabel gives) and labels: a kidney box with a tumor."""
    rng = np.random.default_rng(seed)
    n, h, w = shape
    labels = np.zeros(shape, np.uint8)
    labels[:, h // 4 : 3 * h // 4, w // 5 : w // 2] = 1
    labels[:, h // 3 : h // 3 + h // 8, w // 4 : w // 4 + w // 8] = 2
    hu = rng.normal(40, 30, shape) + 150.0 * (labels == 1) - 60.0 * (labels == 2)
    return np.asfortranarray(hu.astype(np.int16)), labels


def test_without_target_spacing_it_is_the_whole_slice_resize():
    hu, labels = _volume((5, 96, 80))
    geom = slice_geometry((96, 80), (0.7, 0.9), None, 32)
    assert geom == SliceGeometry((96, 80), (32, 32), (0, 0), 32)
    want = window_and_resize(hu, -512, 512, 32)
    np.testing.assert_array_equal(window_to_grid(hu, -512, 512, geom), want)
    np.testing.assert_array_equal(images_to_grid(window_to_uint8(hu, -512, 512), geom), want)
    for method in ("area_rescue", "nearest", "cubic_threshold"):
        np.testing.assert_array_equal(
            masks_to_grid(labels, geom, method), resize_masks(labels, 32, method)
        )


@pytest.mark.parametrize(
    "in_shape,spacing,target,size,scaled,offset",
    [
        ((64, 64), (0.8, 0.8), 1.6, 48, (32, 32), (8, 8)),  # padded
        ((512, 512), (0.8, 0.8), 0.8, 128, (512, 512), (-192, -192)),  # cropped
        ((512, 400), (0.7, 1.0), 2.8, 128, (128, 143), (0, -8)),  # both, anisotropic
    ],
)
def test_target_spacing_geometry(in_shape, spacing, target, size, scaled, offset):
    geom = slice_geometry(in_shape, spacing, target, size)
    assert geom == SliceGeometry(in_shape, scaled, offset, size)


def test_bad_geometry_input_is_refused():
    with pytest.raises(ValueError, match="positive"):
        slice_geometry((64, 64), (1.0, 1.0), 0.0, 32)
    with pytest.raises(ValueError, match="own spacing"):
        slice_geometry((64, 64), None, 1.0, 32)
    geom = slice_geometry((64, 64), (1.0, 1.0), 2.0, 32)
    with pytest.raises(ValueError, match="do not fit"):
        images_to_grid(np.zeros((2, 60, 64), np.uint8), geom)
    with pytest.raises(ValueError, match="grid"):
        probabilities_from_grid(np.zeros((2, 30, 30, 3), np.float32), geom)


@pytest.mark.parametrize("target", [1.6, 0.5])  # field of view padded / cropped
def test_images_and_masks_on_a_spacing_grid(target):
    hu, labels = _volume((4, 64, 64), seed=1)
    geom = slice_geometry((64, 64), (0.8, 0.8), target, 48)
    images = window_to_grid(hu, -512, 512, geom)
    np.testing.assert_array_equal(images, images_to_grid(window_to_uint8(hu, -512, 512), geom))
    masks = masks_to_grid(labels, geom)
    assert images.shape == masks.shape == (4, 48, 48)
    if target == 1.6:  # 32 px in the middle of 48: zero (below the window) and background around
        inside = np.zeros((48, 48), bool)
        inside[8:40, 8:40] = True
        assert not images[:, ~inside].any() and not masks[:, ~inside].any()
        np.testing.assert_array_equal(masks[:, 8:40, 8:40], resize_masks(labels, 32))
    else:  # 102 px cropped to the middle 48
        full = resize_masks(labels, 102)
        np.testing.assert_array_equal(masks, full[:, 27:75, 27:75])
    assert (masks == 2).any() and (masks == 1).any()


@pytest.mark.parametrize("target", [None, 1.6, 0.5])
def test_probabilities_come_back_on_the_slice_grid(target):
    """Masks to the grid as one-hot probabilities and back give the labels again, except near
    boundaries; what the grid did not cover comes back as background."""
    _, labels = _volume((3, 64, 64), seed=2)
    geom = slice_geometry((64, 64), (0.8, 0.8), target, 48)
    on_grid = masks_to_grid(labels, geom)
    probs = np.eye(3, dtype=np.float32)[on_grid]
    back = probabilities_from_grid(probs, geom)
    assert back.shape == (3, 64, 64, 3) and back.dtype == np.float32
    np.testing.assert_allclose(back.sum(axis=-1), 1.0, atol=1e-5)
    restored = back.argmax(axis=-1)
    covered = np.zeros((64, 64), bool)
    if target == 0.5:  # the grid holds pixels 27-74 of 102 at 0.5 mm: 17-47 of 64 at 0.8 mm
        covered[19:45, 19:45] = True
        assert np.all(back[:, :16, :, 0] == 1.0) and np.all(back[:, :, 49:, 0] == 1.0)
    else:
        covered[:] = True
    for label in (1, 2):
        truth, got = labels[:, covered] == label, restored[:, covered] == label
        dice = 2 * (truth & got).sum() / (truth.sum() + got.sum())
        assert dice > 0.85, (label, dice)

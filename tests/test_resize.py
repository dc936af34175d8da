"""Resizing of CT slices and label masks (preprocess.resize)."""

import numpy as np
import pytest

from preprocess.resize import resize_images, resize_masks, window_and_resize, window_to_uint8


def _small_tumor_mask(offset: int) -> np.ndarray:
    """512x512 kidney disc with a 3x3-pixel tumor at a given sub-grid offset."""
    yy, xx = np.mgrid[:512, :512]
    mask = np.zeros((1, 512, 512), np.uint8)
    mask[0][(yy - 256) ** 2 + (xx - 200) ** 2 < 40**2] = 1
    mask[0, 250 + offset : 253 + offset, 190 + offset : 193 + offset] = 2
    return mask


@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_area_rescue_keeps_small_tumor_wherever_it_falls(offset):
    small = resize_masks(_small_tumor_mask(offset), 128, "area_rescue")
    assert (small == 2).sum() >= 1
    assert (small == 1).sum() > 0.9 * np.pi * 10**2  # the kidney's area is kept (r=40/4=10)


def test_nearest_loses_small_tumors_that_area_rescue_keeps():
    """The comparison the thesis worried about: nearest-neighbour erases some small tumors."""
    lost_nearest = sum(
        (resize_masks(_small_tumor_mask(o), 128, "nearest") == 2).sum() == 0 for o in range(4)
    )
    lost_rescue = sum(
        (resize_masks(_small_tumor_mask(o), 128, "area_rescue") == 2).sum() == 0 for o in range(4)
    )
    assert lost_nearest >= 1
    assert lost_rescue == 0


def test_thesis_cubic_threshold_is_available_and_differs():
    mask = _small_tumor_mask(0)
    cubic = resize_masks(mask, 128, "cubic_threshold")
    assert set(np.unique(cubic)) <= {0, 1, 2}
    assert cubic.shape == (1, 128, 128)


def test_area_rescue_matches_area_fractions_for_large_regions():
    mask = np.zeros((2, 512, 512), np.uint8)
    mask[:, 100:300, 100:300] = 1  # 200 px -> 50 px exactly
    out = resize_masks(mask, 128, "area_rescue")
    assert (out == 1).sum() == 2 * 50 * 50


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="unknown mask resize method"):
        resize_masks(np.zeros((1, 8, 8), np.uint8), 4, "bilinear")


def test_window_and_image_resize():
    hu = np.array([[[-1000.0, -512.0, 0.0, 512.0, 2000.0]]], np.float32)
    scaled = window_to_uint8(hu, -512, 512)
    np.testing.assert_allclose(scaled[0, 0], [0, 0, 127.5, 255, 255])
    img = np.full((3, 512, 512), 100.0, np.float32)
    out = resize_images(img, 128)
    assert out.shape == (3, 128, 128) and out.dtype == np.uint8 and np.all(out == 100)


def test_resize_handles_more_slices_than_opencv_channels():
    masks = np.zeros((600, 64, 64), np.uint8)
    masks[:, 10:20, 10:20] = 1
    masks[599, 40:42, 40:42] = 2
    out = resize_masks(masks, 32)
    assert out.shape == (600, 32, 32)
    assert (out[599] == 2).sum() >= 1 and (out[0] == 2).sum() == 0


@pytest.mark.parametrize("shape", [(70, 96, 96), (9, 40, 48)])  # > one chunk; non-integer shrink
def test_resize_is_the_same_for_any_memory_layout_and_fused_window(shape):
    # nibabel hands over Fortran-ordered int16 volumes; tests and inference may pass C order.
    rng = np.random.default_rng(0)
    hu_c = rng.integers(-1024, 2000, size=shape).astype(np.int16)
    hu_f = np.asfortranarray(hu_c)
    labels_c = rng.integers(0, 3, size=shape).astype(np.uint8)
    labels_f = np.asfortranarray(labels_c)
    two_step = resize_images(window_to_uint8(hu_c, -79, 304), 32)
    for hu in (hu_c, hu_f, hu_f[3:-2]):  # the last: a span of slices, a non-contiguous view
        expected = two_step[3:-2] if hu.shape[0] != shape[0] else two_step
        np.testing.assert_array_equal(window_and_resize(hu, -79, 304, 32), expected)
        np.testing.assert_array_equal(resize_images(window_to_uint8(hu, -79, 304), 32), expected)
    for method in ("area_rescue", "nearest", "cubic_threshold"):
        np.testing.assert_array_equal(
            resize_masks(labels_f, 32, method), resize_masks(labels_c, 32, method)
        )


def test_area_rescue_never_lets_kidney_replace_tumor():
    # a one-pixel tumor inside a one-pixel kidney speck: both lose the argmax to background,
    # both are rescued, and the shared output pixel stays tumor
    mask = np.zeros((1, 64, 64), np.uint8)
    mask[0, 8, 8] = 1
    mask[0, 9, 9] = 2
    out = resize_masks(mask, 16, "area_rescue")
    assert out[0, 2, 2] == 2 and (out == 1).sum() == 0


def test_resizes_take_a_rows_columns_shape():
    """A (rows, columns) size gives that shape; a square one the same as the int size."""
    rng = np.random.default_rng(5)
    hu = np.asfortranarray(rng.integers(-1100, 1500, (6, 40, 60)).astype(np.int16))
    labels = np.zeros(hu.shape, np.uint8)
    labels[:, 10:30, 20:50] = 1
    labels[2, 15:17, 25:26] = 2
    assert window_and_resize(hu, -512, 512, (20, 30)).shape == (6, 20, 30)
    np.testing.assert_array_equal(
        window_and_resize(hu, -512, 512, (16, 16)), window_and_resize(hu, -512, 512, 16)
    )
    np.testing.assert_array_equal(
        resize_images(window_to_uint8(hu, -512, 512), (20, 30)),
        window_and_resize(hu, -512, 512, (20, 30)),
    )
    small = resize_masks(labels, (10, 15))
    assert small.shape == (6, 10, 15) and (small[2] == 2).sum() >= 1
    np.testing.assert_array_equal(resize_masks(labels, (16, 16)), resize_masks(labels, 16))
    assert resize_masks(labels[:0], (10, 15)).shape == (0, 10, 15)

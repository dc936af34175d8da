"""PNG overlays (train.overlays): slice choice, side-by-side comparison, atomic writes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from train.overlays import (
    OVERLAY_COLOURS,
    pick_overlay_slices,
    render_comparison,
    write_overlays,
    write_png_atomic,
)
from train.volumes import InferenceError


def _volume():
    hu = np.full((5, 20, 30), 40.0, np.float32)
    labels = np.zeros((5, 20, 30), np.uint8)
    labels[1, 2:6, 2:6] = 1
    labels[3, 2:12, 2:12] = 1
    labels[3, 4:6, 4:6] = 2
    return hu, labels


def test_pick_overlay_slices_prefers_most_foreground():
    hu, labels = _volume()
    assert pick_overlay_slices(labels, n=1) == [3]
    assert pick_overlay_slices(labels) == [1, 3]  # only slices with something on them
    assert pick_overlay_slices(np.zeros_like(labels)) == [2]


def test_comparison_puts_reference_left_and_prediction_right():
    hu, labels = _volume()
    image = render_comparison(hu[3], labels[3], np.zeros_like(labels[3]), (-512, 512))
    assert image.shape == (20, 2 * 30 + 4, 3) and image.dtype == np.uint8
    grey = image[15, 20]  # a background pixel: grey, no label colour
    assert grey[0] == grey[1] == grey[2]
    kidney_left = image[10, 10].astype(int)  # kidney on the reference side is tinted red (BGR)
    assert kidney_left[2] > kidney_left[0] + 40
    right = image[10, 34 + 10].astype(int)  # the same place in the empty prediction: grey
    assert right[0] == right[1] == right[2]
    assert OVERLAY_COLOURS[1][2] > OVERLAY_COLOURS[1][0]


def test_write_overlays_named_by_slice_and_refuses_slices_outside(tmp_path):
    hu, labels = _volume()
    paths = write_overlays(hu, labels, tmp_path, "scan", None, (-512, 512))
    assert [p.name for p in paths] == ["scan_z0001.png", "scan_z0003.png"]
    assert cv2.imread(str(paths[0])).shape == (20, 30, 3)
    assert not list(tmp_path.glob(".*"))  # no temporary files left
    with pytest.raises(InferenceError, match=r"scan: overlay slices \[7\] outside"):
        write_overlays(hu, labels, tmp_path, "scan", [0, 7], (-512, 512))
    path = write_png_atomic(np.zeros((4, 4, 3), np.uint8), tmp_path / "sub" / "x.png")
    assert path.is_file()

"""Post-processing of label volumes (train.postprocess)."""

from __future__ import annotations

import numpy as np
import pytest

from train.postprocess import keep_largest_components


def test_keep_largest_components_removes_small_islands():
    labels = np.zeros((10, 20, 20), np.uint8)
    labels[2:8, 2:8, 2:8] = 1
    labels[4:6, 4:6, 4:6] = 2  # tumor inside the first kidney
    labels[2:8, 12:18, 12:18] = 1
    labels[9, 19, 0] = 1  # a one-voxel island
    labels[0, 10, 10] = 2  # a tumor island
    out = keep_largest_components(labels, n=2)
    expected = labels.copy()
    expected[9, 19, 0] = 0
    expected[0, 10, 10] = 0
    np.testing.assert_array_equal(out, expected)
    # n=1 keeps the component with the most kidney: the second (216 kidney voxels), not the
    # first (208 kidney and 8 tumor voxels)
    only_one = keep_largest_components(labels, n=1)
    assert (only_one[2:8, 2:8, 2:8] == 0).all() and (only_one[2:8, 12:18, 12:18] == 1).all()
    # a diagonal neighbour between slices belongs to the component (26-connectivity)
    diag = np.zeros((3, 3, 3), np.uint8)
    diag[0, 0, 0] = diag[1, 1, 1] = diag[2, 2, 2] = 1
    np.testing.assert_array_equal(keep_largest_components(diag, n=1), diag)
    assert not keep_largest_components(np.zeros((2, 2, 2), np.uint8)).any()
    # min_voxels drops a small second component even among the n largest
    assert not keep_largest_components(labels, n=3, min_voxels=2)[9, 19, 0]
    with pytest.raises(ValueError):
        keep_largest_components(labels, n=0)


def test_a_large_tumor_only_false_positive_loses_to_the_kidneys():
    labels = np.zeros((12, 30, 30), np.uint8)
    labels[2:6, 2:6, 2:6] = 1  # left kidney, 64 voxels
    labels[3:5, 3:5, 5:7] = 2  # its tumor, attached
    labels[2:6, 2:6, 24:28] = 1  # right kidney, 64 voxels
    labels[4:12, 12:22, 10:20] = 2  # a bladder marked as tumor: 800 voxels, no kidney
    labels[0, 15, 0] = 1  # a one-voxel kidney island: some kidney, still ranked below both
    out = keep_largest_components(labels, n=2)
    assert not out[4:12, 12:22, 10:20].any() and not out[0, 15, 0]
    kept = labels > 0
    kept[4:12, 12:22, 10:20] = False
    kept[0, 15, 0] = False
    np.testing.assert_array_equal(out, np.where(kept, labels, 0))

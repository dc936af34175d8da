"""CT volumes in, labels out (train.volumes): any axis-aligned orientation, header checks."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from inference_runs import reoriented, synthetic_ct, write_ct

from preprocess.kits import kits_affine
from train.volumes import InferenceError, open_ct, read_ct, write_labels

ORIENTATIONS = {
    "kits19": ("I", "P", "L"),
    "ras": ("R", "A", "S"),
    "lps": ("L", "P", "S"),
    "slices_in_the_middle": ("A", "S", "R"),
}


@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_any_orientation_reads_canonical_and_labels_go_back_to_its_grid(name, tmp_path):
    hu, seg = synthetic_ct(n_slices=6, height=10, width=14)
    affine = kits_affine((2.5, 0.7, 0.9))
    affine[:3, 3] = [10.0, -20.0, 30.0]
    array, moved_affine = reoriented(hu, affine, ORIENTATIONS[name])
    path = write_ct(tmp_path / f"{name}.nii.gz", array, moved_affine)
    volume = read_ct(path)
    np.testing.assert_array_equal(volume.hu, hu.astype(np.float32))
    np.testing.assert_allclose(volume.reorientation.canonical_affine, affine, atol=1e-5)
    assert volume.spacing == pytest.approx((2.5, 0.7, 0.9))
    assert volume.spacing_yx == pytest.approx((0.7, 0.9))
    write_labels(seg, volume.image, volume.reorientation, tmp_path / "out.nii.gz")
    out = nib.load(str(tmp_path / "out.nii.gz"))
    assert out.shape == array.shape and out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(out.affine, nib.load(str(path)).affine)
    expected, _ = reoriented(seg, affine, ORIENTATIONS[name])
    np.testing.assert_array_equal(np.asarray(out.dataobj), expected)


def test_header_problems_name_the_file(tmp_path):
    hu, _ = synthetic_ct(n_slices=4, height=8, width=8)
    oblique = kits_affine((2.5, 0.8, 0.8))
    angle = np.deg2rad(15)
    rot = np.array(
        [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
    )
    oblique[:3, :3] = rot @ oblique[:3, :3]
    cases = {
        write_ct(tmp_path / "oblique.nii.gz", hu, oblique): "oblique orientation",
        write_ct(tmp_path / "flat.nii.gz", hu[0]): "2D image",
        tmp_path / "missing.nii.gz": "file not found",
    }
    for path, message in cases.items():
        with pytest.raises(InferenceError, match=message) as exc:
            open_ct(path)
        assert str(path) in str(exc.value)
    nan = hu.astype(np.float32)
    nan[1, 2, 3] = np.nan
    with pytest.raises(InferenceError, match="1 voxels are NaN"):
        read_ct(write_ct(tmp_path / "nan.nii.gz", nan))

"""preprocess.orientation: any axis-aligned layout to KiTS19's and back."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from preprocess.kits import kits_affine
from preprocess.orientation import (
    KITS_AXCODES,
    OrientationError,
    reorientation,
)


def _kits_volume() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    affine = kits_affine((3.0, 0.8, 0.7))
    affine[:3, 3] = [10.0, -20.0, 30.0]
    return rng.random((5, 6, 7)), affine


def _reoriented(volume: np.ndarray, affine: np.ndarray, axcodes: str) -> nib.Nifti1Image:
    """The same voxels in the same world places, stored in another array layout."""
    img = nib.Nifti1Image(volume, affine)
    start = nib.orientations.io_orientation(affine)
    transform = nib.orientations.ornt_transform(
        start, nib.orientations.axcodes2ornt(tuple(axcodes))
    )
    data = nib.orientations.apply_orientation(volume, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, volume.shape)
    return nib.Nifti1Image(data, new_affine, img.header)


def test_kits_layout_is_inferior_posterior_left_and_identity():
    volume, affine = _kits_volume()
    assert KITS_AXCODES == ("I", "P", "L")
    r = reorientation(affine, volume.shape, "kits")
    assert r.is_identity
    assert r.to_canonical(volume) is volume


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "SRA", "PIL", "ALI"])
def test_any_layout_comes_back_to_the_same_canonical_array(axcodes):
    volume, affine = _kits_volume()
    img = _reoriented(volume, affine, axcodes)
    assert nib.aff2axcodes(img.affine) == tuple(axcodes)
    r = reorientation(img.affine, img.shape, axcodes)
    canonical = r.to_canonical(np.asarray(img.dataobj))
    np.testing.assert_array_equal(canonical, volume)
    np.testing.assert_allclose(r.canonical_affine, affine, atol=1e-9)
    assert r.canonical_shape == volume.shape
    assert r.canonical_spacing == pytest.approx((3.0, 0.8, 0.7))
    # labels and class probabilities go back onto the file's own grid
    np.testing.assert_array_equal(r.to_source(canonical), np.asarray(img.dataobj))
    probs = np.stack([volume, 1 - volume], axis=-1)
    back = r.to_source(probs)
    assert back.shape == (*img.shape, 2)
    np.testing.assert_array_equal(back[..., 0], np.asarray(img.dataobj))


def test_oblique_and_non_3d_are_refused_with_the_file_named():
    volume, affine = _kits_volume()
    angle = np.deg2rad(10)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    oblique = affine.copy()
    oblique[:3, :3] = rotation @ affine[:3, :3]
    with pytest.raises(OrientationError, match="tilted.nii.gz: oblique"):
        reorientation(oblique, volume.shape, "tilted.nii.gz")
    with pytest.raises(OrientationError, match="flat.nii.gz: 2D"):
        reorientation(affine, (5, 6), "flat.nii.gz")
    degenerate = affine.copy()
    degenerate[:3, 1] = 0
    with pytest.raises(OrientationError, match="zero voxel spacing"):
        reorientation(degenerate, volume.shape, "zero.nii.gz")

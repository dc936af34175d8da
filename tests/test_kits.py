"""KiTS19 case folders (preprocess.kits): nibabel reading, orientation, affine checks, folders."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT

from preprocess.kits import (
    CaseError,
    case_folder,
    kits_affine,
    list_cases,
    load_case,
    read_volume,
    write_case,
)


def _case(folder: Path, case_id: int = 3, shape: tuple[int, int, int] = (6, 10, 12)) -> Path:
    rng = np.random.default_rng(case_id)
    seg = np.zeros(shape, np.uint8)
    seg[1:5, 2:7, 3:9] = 1
    seg[2:4, 3:5, 4:6] = 2
    hu = rng.normal(0, 100, shape) + 150.0 * seg
    write_case(folder, case_id, hu, seg, (2.5, 0.8, 0.7))
    return folder / f"case_{case_id:05d}"


def _stored_as(image: nib.Nifti1Image, axcodes: str) -> nib.Nifti1Image:
    """The same voxels in the same world places, stored in the array layout ``axcodes``."""
    orient = nib.orientations
    transform = orient.ornt_transform(
        orient.io_orientation(image.affine), orient.axcodes2ornt(tuple(axcodes))
    )
    data = orient.apply_orientation(np.asarray(image.dataobj), transform)
    return nib.Nifti1Image(data, image.affine @ orient.inv_ornt_aff(transform, image.shape))


@pytest.mark.parametrize("name", ["vol.nii.gz", "vol.nii"])
def test_read_volume_is_nibabel_with_the_file_checksum(tmp_path, name):
    rng = np.random.default_rng(1)
    hu = rng.integers(-1024, 3000, size=(7, 12, 10)).astype(np.int16)
    affine = kits_affine((2.5, 0.8, 0.8))
    path = tmp_path / name
    nib.save(nib.Nifti1Image(hu, affine), str(path))
    voxels, got_affine, digest = read_volume(path, "case_x")
    np.testing.assert_array_equal(voxels, hu)
    assert voxels.dtype == np.int16  # the stored type, no float copy
    np.testing.assert_allclose(got_affine, affine)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    scaled = nib.Nifti1Image(hu, affine)
    scaled.header.set_slope_inter(0.5, -10)
    nib.save(scaled, str(path))
    np.testing.assert_allclose(read_volume(path, "case_x")[0], hu * 0.5 - 10, rtol=1e-6)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CaseError, match=r"case_x: cannot read .*vol\.nii"):
        read_volume(path, "case_x")
    with pytest.raises(CaseError, match="case_x: missing file"):
        read_volume(tmp_path / "none.nii.gz", "case_x")


def test_read_volume_reads_nifti2_big_endian_and_several_gzip_members(tmp_path):
    hu = np.random.default_rng(2).integers(-1024, 3000, size=(5, 6, 7)).astype(np.int16)
    affine = kits_affine((2.0, 0.7, 0.7))
    nib.save(nib.Nifti2Image(hu, affine), tmp_path / "two.nii.gz")
    big_endian = nib.Nifti1Image(hu, affine).header.as_byteswapped(">")
    nib.save(nib.Nifti1Image(hu.astype(">i2"), affine, big_endian), tmp_path / "big.nii.gz")
    content = gzip.decompress((tmp_path / "two.nii.gz").read_bytes())  # as bgzip writes
    (tmp_path / "members.nii.gz").write_bytes(
        gzip.compress(content[:600]) + gzip.compress(content[600:])
    )
    for name in ("two.nii.gz", "big.nii.gz", "members.nii.gz"):
        voxels, got_affine, digest = read_volume(tmp_path / name, "case_x")
        np.testing.assert_array_equal(voxels, hu)
        assert voxels.dtype == np.dtype(">i2" if name == "big.nii.gz" else "<i2")
        np.testing.assert_allclose(got_affine, affine)
        assert digest == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        assert not voxels.flags.writeable  # a view of the decompressed file
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(CaseError, match=r"case_x: cannot read .*empty\.nii\.gz"):
        read_volume(tmp_path / "empty.nii.gz", "case_x")


@pytest.mark.parametrize("axcodes", ["IPL", "RAS", "LPS", "SAR"])
def test_load_case_brings_any_orientation_to_the_kits_layout(tmp_path, axcodes):
    _case(tmp_path / "ref")
    reference = load_case(tmp_path / "ref", 3)
    folder = tmp_path / "kits" / "case_00003"
    folder.mkdir(parents=True)
    for name in ("imaging.nii.gz", "segmentation.nii.gz"):
        source = nib.load(tmp_path / "ref" / "case_00003" / name)
        nib.save(_stored_as(source, axcodes), folder / name)
    case = load_case(tmp_path / "kits", 3)
    np.testing.assert_array_equal(case.imaging, reference.imaging)
    np.testing.assert_array_equal(case.segmentation, reference.segmentation)
    np.testing.assert_allclose(case.affine, reference.affine, atol=1e-6)
    assert case.spacing == pytest.approx((2.5, 0.8, 0.7))
    assert case.reorientation.is_identity == (axcodes == "IPL")
    # the way back: the canonical labels on the file's own grid
    stored = np.asarray(nib.load(folder / "segmentation.nii.gz").dataobj)
    np.testing.assert_array_equal(case.reorientation.to_source(case.segmentation), stored)
    assert case.folder == folder


def test_segmentation_on_another_grid_is_refused_with_both_affines(tmp_path):
    folder = _case(tmp_path)
    seg = nib.load(folder / "segmentation.nii.gz")
    labels = np.asarray(seg.dataobj)
    # float noise in the affine (another converter) is the same grid
    noisy = seg.affine + 1e-6
    noisy[3] = [0, 0, 0, 1]
    nib.save(nib.Nifti1Image(labels, noisy), folder / "segmentation.nii.gz")
    assert load_case(tmp_path, 3).segmentation.sum() == labels.sum()
    # the same grid stored in another orientation is the same grid
    nib.save(_stored_as(seg, "RAS"), folder / "segmentation.nii.gz")
    load_case(tmp_path, 3)
    for change, what in [((0, 3, 1.0), "origin shifted 1 mm"), ((1, 1, -0.9), "rotation/zoom")]:
        affine = seg.affine.copy()
        affine[change[:2]] += change[2]
        nib.save(nib.Nifti1Image(labels, affine), folder / "segmentation.nii.gz")
        with pytest.raises(CaseError, match="case_00003: the segmentation's affine") as err:
            load_case(tmp_path, 3)
        assert what in str(err.value) and "imaging affine" in str(err.value)


def test_oblique_and_non_3d_volumes_are_refused(tmp_path):
    folder = _case(tmp_path)
    img = nib.load(folder / "imaging.nii.gz")
    turn = np.eye(4)
    turn[:2, :2] = [[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]]
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), turn @ img.affine), folder / "imaging.nii.gz")
    with pytest.raises(CaseError, match=r"case_00003: .*imaging\.nii\.gz: oblique"):
        load_case(tmp_path, 3)
    nib.save(nib.Nifti1Image(np.zeros((6, 10), np.int16), img.affine), folder / "imaging.nii.gz")
    with pytest.raises(CaseError, match=r"case_00003: .*2D image"):
        load_case(tmp_path, 3)


def test_case_folders_with_a_tag_and_duplicate_ids(tmp_path):
    _case(tmp_path, 3).rename(tmp_path / "case_00003_s153")
    _case(tmp_path, 7)
    (tmp_path / "case_00009.txt").write_text("a file, not a case")
    (tmp_path / "case_123").mkdir()  # not five digits
    assert list_cases(tmp_path) == [3, 7]
    assert case_folder(tmp_path, 3) == tmp_path / "case_00003_s153"
    assert case_folder(tmp_path, 7) == tmp_path / "case_00007"
    assert load_case(tmp_path, 3).segmentation is not None
    with pytest.raises(CaseError, match="no folder for case_00005"):
        case_folder(tmp_path, 5)
    _case(tmp_path, 3)
    with pytest.raises(CaseError, match="two folders for case_00003: case_00003 and case_00003_s"):
        list_cases(tmp_path)
    with pytest.raises(CaseError, match="two folders for case_00003"):
        case_folder(tmp_path, 3)


def test_no_hand_written_gzip_reader_is_left():
    """NIfTI is read by nibabel only: no zlib stream of our own anywhere in the suite."""
    found = subprocess.run(
        ["git", "grep", "-l", "decompress" + "obj"],  # split: this file must not match
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert found.stdout == "", found.stdout

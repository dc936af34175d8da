"""The prediction command line (train.predict): any orientation in, labels on the input's own
grid out, bad inputs, overlays."""

from __future__ import annotations

import json
import shutil

import cv2
import nibabel as nib
import numpy as np
import pytest
from conftest import run_module
from inference_runs import SIZE, make_run, reoriented, synthetic_ct, write_ct

from preprocess.kits import kits_affine, write_case
from preprocess.orientation import reorientation
from train import predict

ORIENTATIONS = {
    "kits19": ("I", "P", "L"),
    "ras": ("R", "A", "S"),
    "lps": ("L", "P", "S"),
    "slices_in_the_middle": ("A", "S", "R"),
    "slices_last_flipped": ("P", "L", "I"),
}


@pytest.fixture(scope="module")
def run2d(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run2d"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A KiTS19 case folder and a loose NIfTI file with a non-trivial header."""
    folder = tmp_path_factory.mktemp("inputs")
    hu, seg = synthetic_ct(n_slices=10, height=40, width=48)
    write_case(folder / "kits", 7, hu, seg, (3.0, 0.7, 0.75))
    affine = kits_affine((2.0, 0.9, 0.9))
    affine[:3, 3] = [120.0, -80.5, 33.0]
    img = nib.Nifti1Image(hu.astype(np.float32), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    nib.save(img, str(folder / "scan.nii.gz"))
    return folder


def _check_output(out_file, source_file):
    out, src = nib.load(str(out_file)), nib.load(str(source_file))
    assert out.shape == src.shape
    np.testing.assert_array_equal(out.affine, src.affine)
    assert out.get_data_dtype() == np.uint8
    assert out.header.get_sform(coded=True)[1] == src.header.get_sform(coded=True)[1]
    assert out.header.get_qform(coded=True)[1] == src.header.get_qform(coded=True)[1]
    assert out.header.get_xyzt_units() == src.header.get_xyzt_units()
    labels = np.asarray(out.dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}


def test_predict_command_writes_labels_on_the_input_grid(run2d, inputs, tmp_path):
    out = tmp_path / "preds"
    proc = run_module(
        "train.predict",
        "--run",
        run2d,
        "--input",
        inputs / "kits" / "case_00007",
        inputs / "scan.nii.gz",
        "--output",
        out,
        "--batch-size",
        "4",
    )
    _check_output(out / "case_00007.nii.gz", inputs / "kits" / "case_00007" / "imaging.nii.gz")
    _check_output(out / "scan_seg.nii.gz", inputs / "scan.nii.gz")
    assert "s per volume" in proc.stderr
    for part in ("read", "preprocess", "network", "resample+write"):
        assert part in proc.stderr
    assert "case_00007:" in proc.stderr
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_kits_folder_input_overlays_and_postprocess(run2d, inputs, tmp_path):
    out = tmp_path / "preds"
    code = predict.main(
        [
            "--run",
            str(run2d),
            "--input",
            str(inputs / "kits"),
            "--output",
            str(out),
            "--postprocess",
            "--overlay-slices",
            "auto",
            "--no-progress",
        ]
    )
    assert code == 0
    assert (out / "case_00007.nii.gz").is_file()
    pngs = sorted((out / "overlays").glob("case_00007_z*.png"))
    assert 1 <= len(pngs) <= 3
    image = cv2.imread(str(pngs[0]))
    assert image.shape == (40, 48, 3)
    code = predict.main(
        ["--run", str(run2d), "--input", str(inputs / "scan.nii.gz"), "--output", str(out)]
        + ["--overlay-slices", "0,9", "--no-progress"]
    )
    assert code == 0
    assert (out / "overlays" / "scan_seg_z0000.png").is_file()
    assert (out / "overlays" / "scan_seg_z0009.png").is_file()


def test_3d_model_predicts_on_the_input_grid(tmp_path, inputs):
    run = make_run(tmp_path / "run3d", "unet3d", (8, SIZE, SIZE, 3))
    code = predict.main(
        ["--run", str(run), "--input", str(inputs / "scan.nii.gz"), "--output", str(tmp_path)]
        + ["--overlap", "0.25", "--no-progress"]
    )
    assert code == 0
    _check_output(tmp_path / "scan_seg.nii.gz", inputs / "scan.nii.gz")


def _bad_inputs(folder):
    hu, _ = synthetic_ct(n_slices=6, height=16, width=16)
    affine = kits_affine((2.5, 0.8, 0.8))
    angle = np.deg2rad(10)
    oblique = affine.copy()
    rot = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    oblique[:3, :3] = rot @ affine[:3, :3]
    nan = hu.astype(np.float32)
    nan[2, 3, 4] = np.nan
    (folder / "notnifti.nii.gz").write_bytes(b"this is not a NIfTI file at all")
    rgb = np.zeros(hu.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    return {
        "not_nifti": (folder / "notnifti.nii.gz", "not a NIfTI file"),
        "2d": (write_ct(folder / "flat.nii.gz", hu[0]), "2D image"),
        "oblique": (write_ct(folder / "oblique.nii.gz", hu, oblique), "oblique orientation"),
        "complex": (
            write_ct(folder / "complex.nii.gz", hu.astype(np.complex64)),
            "not a real number type",
        ),
        "rgb": (write_ct(folder / "rgb.nii.gz", rgb), "not a real number type"),
        "nan": (write_ct(folder / "nan.nii.gz", nan), "NaN or infinite"),
        "missing": (folder / "nothing_here.nii.gz", "input not found"),
    }


@pytest.mark.parametrize(
    "problem", ["not_nifti", "2d", "oblique", "complex", "rgb", "nan", "missing"]
)
def test_bad_input_exits_2_naming_the_file(problem, run2d, tmp_path, capsys):
    path, message = _bad_inputs(tmp_path)[problem]
    out = tmp_path / "out"
    code = predict.main(
        ["--run", str(run2d), "--input", str(path), "--output", str(out), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert str(path) in err and message in err
    assert not list(out.glob("*.nii.gz"))


def test_mismatched_weights_exit_2_naming_the_file(run2d, inputs, tmp_path, capsys):
    other = tmp_path / "run"
    shutil.copytree(run2d, other)
    config = json.loads((other / "config.json").read_text())
    config["model_options"]["base_filters"] = 3
    (other / "config.json").write_text(json.dumps(config))
    code = predict.main(
        ["--run", str(other), "--input", str(inputs / "scan.nii.gz"), "--output", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert (
        f"{other / 'checkpoints' / 'best.weights.h5'}: weights do not match model 'unet2d'" in err
    )


def test_one_bad_volume_among_good_ones_still_writes_the_good_ones(run2d, inputs, tmp_path, capsys):
    hu, _ = synthetic_ct(n_slices=6, height=16, width=16)
    nan = hu.astype(np.float32)
    nan[0, 0, 0] = np.inf
    bad = write_ct(tmp_path / "inf.nii.gz", nan)
    out = tmp_path / "out"
    argv = ["--run", str(run2d), "--input", str(bad), str(inputs / "scan.nii.gz")]
    code = predict.main(argv + ["--output", str(out), "--no-progress"])
    assert code == 2
    assert (out / "scan_seg.nii.gz").is_file() and not (out / "inf_seg.nii.gz").exists()
    assert f"{bad}: 1 voxels are NaN or infinite" in capsys.readouterr().err


def test_output_name_clash_and_bad_options(run2d, inputs, tmp_path, capsys):
    scan = str(inputs / "scan.nii.gz")
    code = predict.main(["--run", str(run2d), "--input", scan, scan, "--output", str(tmp_path)])
    assert code == 2 and "would overwrite the prediction" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        predict.main(
            ["--run", str(run2d), "--input", scan, "--output", "x", "--overlay-slices", "a"]
        )
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        predict.main(["--input", scan, "--output", "x"])
    assert exc.value.code == 2 and "--run" in capsys.readouterr().err


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as exc:
        predict.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in ("--run", "--weights", "--model", "--overlay-slices", "--postprocess", "affine"):
        assert word in text


def test_every_orientation_gives_the_same_labels_each_on_its_own_grid(run2d, tmp_path):
    hu, _ = synthetic_ct(n_slices=6, height=40, width=48, seed=3)
    affine = kits_affine((2.0, 0.8, 0.9))
    affine[:3, 3] = [15.0, -40.0, 7.5]
    inputs = []
    for name, axcodes in ORIENTATIONS.items():
        array, moved = reoriented(hu, affine, axcodes)
        inputs.append(write_ct(tmp_path / "in" / f"{name}.nii.gz", array, moved))
    out = tmp_path / "out"
    argv = ["--run", str(run2d), "-i", *map(str, inputs), "-o", str(out), "--no-progress"]
    assert predict.main(argv) == 0
    canonical = []
    for source in inputs:
        result = out / source.name.replace(".nii.gz", "_seg.nii.gz")
        _check_output(result, source)
        img = nib.load(str(result))
        labels = np.asarray(img.dataobj)
        canonical.append(reorientation(img.affine, img.shape, str(result)).to_canonical(labels))
    reference = canonical[0]  # the KiTS19 layout: no reorientation at all
    assert len(np.unique(reference)) >= 2  # a test that can tell orientations apart
    assert not np.array_equal(reference, reference[:, :, ::-1])
    for labels in canonical[1:]:
        np.testing.assert_array_equal(labels, reference)


def test_one_slice_with_a_3d_model_is_padded_and_says_so(tmp_path, capsys):
    run = make_run(tmp_path / "run3d", "unet3d", (8, SIZE, SIZE, 3))
    hu, _ = synthetic_ct(n_slices=1, height=40, width=48)
    source = write_ct(tmp_path / "one.nii.gz", hu)
    code = predict.main(["--run", str(run), "-i", str(source), "-o", str(tmp_path / "out")])
    assert code == 0
    _check_output(tmp_path / "out" / "one_seg.nii.gz", source)
    err = capsys.readouterr().err
    assert f"{source}: 1 slice(s), fewer than the 3D model's window of 8: padded" in err


def test_slice_folders_and_an_output_that_is_a_file(run2d, tmp_path, capsys):
    hu, seg = synthetic_ct(n_slices=1, height=40, width=48)
    kits = tmp_path / "slices"
    (write_case(kits, 3, hu, seg, (1.0, 0.78, 0.78))).rename(kits / "case_00003_s153")
    out = tmp_path / "out"
    assert predict.main(["--run", str(run2d), "-i", str(kits), "-o", str(out)]) == 0
    assert (out / "case_00003_s153.nii.gz").is_file()
    capsys.readouterr()
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    code = predict.main(["--run", str(run2d), "-i", str(kits), "-o", str(a_file)])
    assert code == 2
    assert f"{a_file}: --output names an existing file" in capsys.readouterr().err
    assert a_file.read_text() == "not a folder"

"""Synthetic KiTS19-format data (preprocess.synthetic): format, determinism, CT plausibility,
domain randomisation."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import PYTHON, ROOT, run_env, run_module
from scipy import ndimage

from preprocess import synthetic
from preprocess.kits import CaseError, case_name, kits_affine, spacing_from_affine
from preprocess.synthetic.randomize import ASPECTS, PHASE_HU, PHASES, RandomizeConfig

SMALL_LABELS = ROOT / "tests" / "data" / "kits19_labels_small"
SMALL_IDS = [15, 61, 113]
ANALYTIC_IDS = list(range(200, 206))  # with seed 0: tumors in most, none in 201 and 205
ANALYTIC = {"first_id": 200, "n_cases": 6, "n_slices": 20, "size": 128, "seed": 0}


def _read(folder: Path, case_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    img = nib.load(folder / case_name(case_id) / "imaging.nii.gz")
    seg = nib.load(folder / case_name(case_id) / "segmentation.nii.gz")
    assert img.get_data_dtype() == np.int16
    assert seg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, seg.affine)
    return np.asarray(img.dataobj), np.asarray(seg.dataobj), img.affine


@pytest.fixture(scope="module")
def analytic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth_analytic")
    assert synthetic.generate(out, **ANALYTIC) == ANALYTIC_IDS
    return out


@pytest.fixture(scope="module")
def labels_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth_labels")
    assert synthetic.generate(out, labels_dir=SMALL_LABELS, seed=0) == SMALL_IDS
    return out


def _all_cases(analytic_dir: Path, labels_dir: Path) -> list[tuple[Path, int]]:
    return [(analytic_dir, c) for c in ANALYTIC_IDS] + [(labels_dir, c) for c in SMALL_IDS]


# ---- format -------------------------------------------------------------------------------------
def test_analytic_cases_format(analytic_dir: Path) -> None:
    with_tumor = []
    for case_id in ANALYTIC_IDS:
        ct, seg, affine = _read(analytic_dir, case_id)
        assert ct.shape == seg.shape == (20, 128, 128)
        assert set(np.unique(seg).tolist()) <= {0, 1, 2}
        assert (seg == 1).sum() > 500, "both kidneys are in the volume"
        sz, sy, sx = spacing_from_affine(affine)
        np.testing.assert_allclose(affine, kits_affine((sz, sy, sx)), rtol=1e-6)
        assert 1.0 <= sz <= 5.0 and sy == pytest.approx(sx)
        assert 0.6 * 512 <= sy * 128 <= 1.0 * 512  # a real scan's field of view, coarser pixels
        # the public API reproduces what generate() wrote
        rng = synthetic.case_rng(0, case_id)
        labels, spacing = synthetic.analytic_case(case_id, 20, 128, rng)
        np.testing.assert_array_equal(labels, seg)
        np.testing.assert_allclose(spacing, (sz, sy, sx), rtol=1e-6)
        with_tumor.append(bool((seg == 2).any()))
    assert sum(with_tumor) >= 3 and not all(with_tumor)


def test_label_maps_kept_exactly(labels_dir: Path) -> None:
    for case_id in SMALL_IDS:
        src = nib.load(SMALL_LABELS / f"{case_name(case_id)}_segmentation.nii.gz")
        ct, seg, affine = _read(labels_dir, case_id)
        np.testing.assert_array_equal(seg, np.asarray(src.dataobj))
        assert ct.shape == seg.shape
        spacing = spacing_from_affine(src.affine)
        np.testing.assert_allclose(spacing_from_affine(affine), spacing, rtol=1e-6)
        np.testing.assert_allclose(affine, kits_affine(spacing), rtol=1e-6)


def test_shrink_options_on_the_command_line(tmp_path: Path) -> None:
    run_module(
        "preprocess.synthetic",
        "--out", tmp_path, "--labels", SMALL_LABELS, "--cases", "61",
        "--max-slices", "10", "--size", "64", "--quiet",
    )  # fmt: skip
    ct, seg, affine = _read(tmp_path, 61)
    assert ct.shape == seg.shape == (10, 64, 64)
    src = nib.load(SMALL_LABELS / "case_00061_segmentation.nii.gz")
    sz, sy, sx = spacing_from_affine(src.affine)
    np.testing.assert_allclose(spacing_from_affine(affine), (sz, sy * 2, sx * 2), rtol=1e-5)
    assert (seg > 0).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_00061", "synthetic.json"]
    entry = json.loads((tmp_path / "synthetic.json").read_text())["cases"]["case_00061"]
    assert entry["source"] == "case_00061_segmentation.nii.gz" and entry["max_slices"] == 10
    assert entry["randomize"] == {"mode": "none"} and entry["style"] == {}


# ---- determinism --------------------------------------------------------------------------------
def test_case_independent_of_other_cases_and_deterministic(
    analytic_dir: Path, labels_dir: Path, tmp_path: Path
) -> None:
    # one case alone (and a different set) gives the same arrays as inside the larger run
    alone = tmp_path / "alone"
    ids = synthetic.generate(alone, **{**ANALYTIC, "n_cases": None}, cases=[207, 203])
    assert ids == [203, 207]
    for a, b in zip(_read(alone, 203)[:2], _read(analytic_dir, 203)[:2], strict=True):
        np.testing.assert_array_equal(a, b)
    synthetic.generate(alone, labels_dir=SMALL_LABELS, cases=[113], seed=0)
    for a, b in zip(_read(alone, 113)[:2], _read(labels_dir, 113)[:2], strict=True):
        np.testing.assert_array_equal(a, b)

    # another seed: other analytic anatomy; same label map with another CT
    other = tmp_path / "other"
    synthetic.generate(other, **{**ANALYTIC, "n_cases": 1, "first_id": 203, "seed": 1})
    assert not np.array_equal(_read(other, 203)[1], _read(analytic_dir, 203)[1])
    synthetic.generate(other, labels_dir=SMALL_LABELS, cases=[113], seed=1)
    ct1, seg1, _ = _read(other, 113)
    ct0, seg0, _ = _read(labels_dir, 113)
    np.testing.assert_array_equal(seg1, seg0)
    assert np.abs(ct1.astype(np.float32) - ct0).mean() > 5.0


def test_render_ct_api_is_deterministic() -> None:
    labels, spacing = synthetic.analytic_case(3, 12, 64, synthetic.case_rng(5, 3))
    a = synthetic.render_ct(labels, spacing, np.random.default_rng(11))
    b = synthetic.render_ct(labels, spacing, np.random.default_rng(11))
    c = synthetic.render_ct(labels, spacing, np.random.default_rng(12))
    assert a.dtype == np.float32 and a.shape == labels.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_skip_existing_and_overwrite(tmp_path: Path) -> None:
    kw = {"n_cases": 2, "n_slices": 6, "size": 48, "seed": 3}
    assert synthetic.generate(tmp_path, **kw) == [0, 1]
    img0 = tmp_path / "case_00000" / "imaging.nii.gz"
    img1 = tmp_path / "case_00001" / "imaging.nii.gz"
    stamp0, stamp1 = img0.stat().st_mtime_ns, img1.stat().st_mtime_ns
    before = img1.read_bytes()
    img1.unlink()  # an incomplete case is made again, a complete one is left alone
    synthetic.generate(tmp_path, **kw)
    assert img0.stat().st_mtime_ns == stamp0
    assert img1.read_bytes() == before
    synthetic.generate(tmp_path, **kw, overwrite=True)
    assert img0.stat().st_mtime_ns != stamp0 and img1.stat().st_mtime_ns != stamp1
    assert not list(tmp_path.rglob("*.tmp")), "no temporary files left behind"


# ---- CT plausibility ----------------------------------------------------------------------------
def _depth_mm(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """In-plane distance (mm) from each mask voxel to the mask's boundary."""
    out = np.zeros(mask.shape, np.float32)
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        out[k] = ndimage.distance_transform_edt(mask[k], sampling=spacing[1:])
    return out


def _best_threshold_dice(values: np.ndarray, target: np.ndarray) -> float:
    """Best Dice of 'HU >= t' or 'HU < t' against ``target``, over every threshold t."""
    order = np.argsort(values, kind="stable")
    hits = np.cumsum(target[order])  # tumor voxels among the i+1 lowest values
    n, total = len(values), int(target.sum())
    i = np.arange(1, n + 1)
    below = 2 * hits / (i + total)
    above = 2 * (total - hits[:-1]) / ((n - i[:-1]) + total)
    return float(max(below.max(), above.max(initial=0.0)))


def test_ct_looks_like_contrast_enhanced_abdomen(analytic_dir: Path, labels_dir: Path) -> None:
    n_tumor_cases = 0
    for folder, case_id in _all_cases(analytic_dir, labels_dir):
        ct, seg, affine = _read(folder, case_id)
        ct = ct.astype(np.float32)
        spacing = spacing_from_affine(affine)
        # air around the patient: image corners
        corners = np.concatenate(
            [ct[:, :6, :6], ct[:, :6, -6:], ct[:, -6:, :6], ct[:, -6:, -6:]], axis=None
        )
        assert abs(np.median(corners) + 1000) < 15, case_id
        # enhancing cortex brighter than the kidney's interior (medulla, sinus)
        depth = _depth_mm(seg > 0, spacing)
        kidney = seg == 1
        cortex = ct[kidney & (depth > 1.0) & (depth <= 4.0)]
        inner = ct[kidney & (depth > 10.0)]
        if len(inner) > 20:
            assert cortex.mean() > inner.mean() + 20, case_id
        assert 100 < cortex.mean() < 220, case_id
        # fat in the body, bone in the spine
        body = ct > -500
        assert np.percentile(ct[body], 5) < -60, case_id
        assert ct.max() > 400, case_id
        tumor = seg == 2
        if tumor.sum() < 50:
            continue
        n_tumor_cases += 1
        # heterogeneous tumor whose values other tissue shares: no threshold segments it
        lo, hi = np.percentile(ct[tumor], [10, 90])
        assert hi - lo > 25, case_id
        others = ct[body & ~tumor]
        assert ((others >= lo) & (others <= hi)).sum() > 5 * tumor.sum(), case_id
        assert _best_threshold_dice(ct[body], tumor[body]) < 0.5, case_id
    assert n_tumor_cases >= 4


# ---- domain randomisation -----------------------------------------------------------------------
# SHA-256 of the int16 CT arrays the renderer wrote before randomisation existed (ANALYTIC case
# 203 and label map 113, seed 0): --randomize none must keep existing datasets bit for bit.
NONE_SHA256 = {
    203: "216244dce1a20d667220ca07c431d9f515a24be252e1eee9a38886152c2bdf4d",
    113: "45dcf9ca7e7811ea34a9dc46f727eeb625b43f62742b0808553b4e7444928ee4",
}
FULL = RandomizeConfig("full")


@pytest.fixture(scope="module")
def randomized_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth_randomized")
    ids = synthetic.generate(out, labels_dir=SMALL_LABELS, seed=0, randomize=FULL)
    assert ids == SMALL_IDS
    return out


def test_randomize_none_reproduces_the_renderer(analytic_dir: Path, labels_dir: Path) -> None:
    for folder, case_id in ((analytic_dir, 203), (labels_dir, 113)):
        ct = np.ascontiguousarray(_read(folder, case_id)[0])
        assert hashlib.sha256(ct.tobytes()).hexdigest() == NONE_SHA256[case_id], case_id
    record = json.loads((labels_dir / "synthetic.json").read_text())
    assert sorted(record["cases"]) == [case_name(c) for c in SMALL_IDS]
    assert all(e["style"] == {} for e in record["cases"].values())


def test_randomize_changes_the_look_and_keeps_the_labels(
    randomized_dir: Path, labels_dir: Path
) -> None:
    record = json.loads((randomized_dir / "synthetic.json").read_text())["cases"]
    kidney_means = []
    for case_id in SMALL_IDS:
        src = np.asarray(
            nib.load(SMALL_LABELS / f"{case_name(case_id)}_segmentation.nii.gz").dataobj
        )
        ct, seg, _ = _read(randomized_dir, case_id)
        ct0, seg0, _ = _read(labels_dir, case_id)
        np.testing.assert_array_equal(seg, src)
        np.testing.assert_array_equal(seg, seg0)
        assert np.abs(ct.astype(np.float32) - ct0).mean() > 5.0, case_id
        kidney_means.append(float(ct[seg == 1].mean()))
        entry = record[case_name(case_id)]
        assert entry["randomize"]["mode"] == "full" and entry["seed"] == 0
        # the record is the style that made the case (drawn from (seed, case id) alone)
        assert entry["style"] == json.loads(json.dumps(synthetic.case_style(FULL, 0, case_id)))
    assert np.ptp(kidney_means) > 10.0, kidney_means  # cases differ in look, not just noise
    styles = [synthetic.case_style(FULL, 0, c) for c in range(40)]
    assert {s["phase"] for s in styles} == set(PHASES)
    assert {s["tumor_kind"] for s in styles} == {"hypo", "iso", "hyper"}


def test_style_is_deterministic_per_case_and_aspects_independent() -> None:
    assert synthetic.case_style(FULL, 3, 7) == synthetic.case_style(FULL, 3, 7)
    assert synthetic.case_style(FULL, 3, 7) != synthetic.case_style(FULL, 3, 8)
    assert synthetic.case_style(FULL, 3, 7) != synthetic.case_style(FULL, 4, 7)
    assert synthetic.case_style(RandomizeConfig(), 3, 7) == {}
    whole = synthetic.case_style(FULL, 3, 7)
    noise_only = synthetic.case_style(RandomizeConfig("full", aspects=("noise",)), 3, 7)
    assert noise_only and noise_only == {k: whole[k] for k in noise_only}
    with pytest.raises(CaseError, match="aspect"):
        RandomizeConfig("full", aspects=("colour",))
    with pytest.raises(CaseError, match="noise_hu"):
        RandomizeConfig("full", noise_hu=(20.0, 10.0))


def test_style_values_inside_their_ranges() -> None:
    cfg = RandomizeConfig("full", noise_hu=(8.0, 12.0), blur_mm=(0.5, 0.6))
    for case_id in range(200):
        style = synthetic.case_style(cfg, 1, case_id)
        ranges = PHASE_HU[style["phase"]]
        assert ranges["hu_cortex"][0] <= style["hu_cortex"] <= ranges["hu_cortex"][1]
        assert ranges["hu_aorta"][0] <= style["hu_aorta"] <= ranges["hu_aorta"][1]
        assert 8.0 <= style["noise_hu"] <= 12.0 and 0.5 <= style["blur_mm"] <= 0.6
        assert -130 <= style["hu_fat"] <= -70 and 30 <= style["hu_muscle"] <= 70
        if style["tumor_kind"] == "hypo":
            assert style["tumor_vs_kidney"] < -19


def _cortex_median(ct: np.ndarray, seg: np.ndarray, spacing: tuple[float, float, float]) -> float:
    depth = _depth_mm(seg > 0, spacing)
    return float(np.median(ct[(seg == 1) & (depth > 1.5) & (depth <= 3.5)]))


@pytest.mark.parametrize("phase", PHASES)
def test_rendered_kidney_follows_the_drawn_phase(phase: str) -> None:
    cfg = RandomizeConfig("full", aspects=("phase",), phases=(phase,))
    labels, spacing = synthetic.analytic_case(9, 16, 128, synthetic.case_rng(0, 9))
    for seed in (0, 1):
        style = synthetic.case_style(cfg, seed, 9)
        ct = synthetic.render_ct(labels, spacing, synthetic.case_rng(seed, 9), style)
        lo, hi = PHASE_HU[phase]["hu_cortex"]
        assert lo <= style["hu_cortex"] <= hi
        assert abs(_cortex_median(ct, labels, spacing) - style["hu_cortex"]) < 25, (phase, seed)


def test_rendered_noise_follows_the_drawn_level() -> None:
    labels, spacing = synthetic.analytic_case(4, 8, 128, synthetic.case_rng(0, 4))
    for level in (8.0, 35.0):
        cfg = RandomizeConfig("full", aspects=("noise",), noise_hu=(level, level))
        style = synthetic.case_style(cfg, 0, 4)
        ct = synthetic.render_ct(labels, spacing, synthetic.case_rng(0, 4), style)
        air = np.concatenate([ct[:, :8, :8], ct[:, :8, -8:]], axis=None)
        assert abs(air.mean() + 1000) < 5 and abs(air.std() / level - 1.0) < 0.25, level


def test_randomize_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_module(
        "preprocess.synthetic",
        "--out", tmp_path, "--n-cases", "1", "--slices", "4", "--size", "48", "--quiet",
        "--randomize", "full", "--randomize-aspects", "phase,noise", "--phases", "arterial",
        "--noise-hu", "5,6",
    )  # fmt: skip
    entry = json.loads((tmp_path / "synthetic.json").read_text())["cases"]["case_00000"]
    assert entry["randomize"]["aspects"] == ["phase", "noise"]
    assert entry["style"]["phase"] == "arterial" and 5 <= entry["style"]["noise_hu"] <= 6
    assert "hu_fat" not in entry["style"]
    for bad in (["--randomize", "most"], ["--randomize-aspects", "colour"], ["--noise-hu", "9"]):
        with pytest.raises(SystemExit) as exc:
            synthetic.main(["--out", str(tmp_path), *bad])
        assert exc.value.code == 2
        assert "error" in capsys.readouterr().err
    assert set(ASPECTS) >= {"phase", "tumor", "noise", "blur", "kernel"}


# ---- bad input ----------------------------------------------------------------------------------
def test_labels_folder_without_label_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no label maps here")
    with pytest.raises(CaseError, match="no label files"):
        synthetic.generate(tmp_path / "out", labels_dir=empty)
    assert synthetic.main(["--out", str(tmp_path / "out"), "--labels", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(empty) in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_label_values_outside_0_1_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad_dir = tmp_path / "labels"
    bad_dir.mkdir()
    seg = np.zeros((4, 32, 32), np.uint8)
    seg[1:3, 10:20, 5:12] = 1
    seg[2, 12:14, 6:8] = 3
    bad = bad_dir / "case_00007_segmentation.nii.gz"
    nib.save(nib.Nifti1Image(seg, kits_affine((3.0, 1.0, 1.0))), str(bad))
    with pytest.raises(CaseError, match="case_00007_segmentation.nii.gz"):
        synthetic.generate(tmp_path / "out", labels_dir=bad_dir)
    assert synthetic.main(["--out", str(tmp_path / "out"), "--labels", str(bad_dir)]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and str(bad) in err and "[3]" in err
    # KiTS-style folder layout is accepted too, and a missing requested case is named
    kits_style = tmp_path / "kits" / "case_00004"
    kits_style.mkdir(parents=True)
    seg[seg == 3] = 2
    nib.save(
        nib.Nifti1Image(seg, kits_affine((3.0, 1.0, 1.0))), str(kits_style / "segmentation.nii.gz")
    )
    assert synthetic.find_label_files(tmp_path / "kits") == {4: kits_style / "segmentation.nii.gz"}
    with pytest.raises(CaseError, match="case_00005"):
        synthetic.generate(tmp_path / "out2", labels_dir=tmp_path / "kits", cases=[4, 5])


def test_cli_help_and_option_errors(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        synthetic.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--labels", "--cases", "--n-cases", "--max-slices", "--size", "--slices",
                   "--first-id", "--seed", "--overwrite", "mpirun"):  # fmt: skip
        assert option in text, option
    with pytest.raises(SystemExit) as exc:
        synthetic.main(["--out", "x", "--labels", str(SMALL_LABELS), "--first-id", "3"])
    assert exc.value.code == 2


def test_no_tensorflow_import() -> None:
    code = "import sys, preprocess.synthetic; assert 'tensorflow' not in sys.modules"
    subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=run_env(), check=True, timeout=60)


def test_small_label_data_carries_credit_and_license() -> None:
    text = (SMALL_LABELS / "README.md").read_text()
    assert "License: CC BY-NC-SA 4.0." in text
    assert "Heller N. et al." in text
    for case_id in SMALL_IDS:
        path = SMALL_LABELS / f"{case_name(case_id)}_segmentation.nii.gz"
        assert path.stat().st_size < 50_000


# ---- MPI ----------------------------------------------------------------------------------------
@pytest.mark.mpi
def test_mpi_ranks_split_cases_identically(tmp_path: Path) -> None:
    args = ["--n-cases", "3", "--slices", "6", "--size", "48", "--seed", "4", "--quiet"]
    run_module("preprocess.synthetic", "--out", tmp_path / "mpi", *args, np_ranks=2)
    synthetic.generate(tmp_path / "serial", n_cases=3, n_slices=6, size=48, seed=4)
    for case_id in range(3):
        for a, b in zip(
            _read(tmp_path / "mpi", case_id)[:2],
            _read(tmp_path / "serial", case_id)[:2],
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)

"""Preprocessing to sharded HDF5 (preprocess.pipeline and the modules it drives: .config,
.samples, .claims, .shards, .manifest; .downsample, .blocks) incl. real MPI runs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from conftest import PYTHON, ROOT, preprocess_small, run_env, run_module, write_simple_kits

from preprocess.dataset_format import SHARD_FIELDS, balanced_class_weights, load_manifest
from preprocess.pipeline import PreprocessConfig
from preprocess.samples import block_starts, process_case
from preprocess.shards import plan_shards


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _shards(dataset: Path) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for path in sorted(dataset.glob("*/shard_*.h5")):
        with h5py.File(path) as h5:
            out[f"{path.parent.name}/{path.name}"] = {k: h5[k][()] for k in SHARD_FIELDS}
    return out


@pytest.mark.mpi
@pytest.mark.parametrize(
    "module,extra",
    [("preprocess.downsample", []), ("preprocess.blocks", ["--depth", "8", "--overlap", "3"])],
)
def test_mpi_two_ranks_match_single_process(simple_kits, tmp_path, module, extra):
    before = _tree_digest(simple_kits)
    single, double = tmp_path / "single", tmp_path / "double"
    args = ["--kits", simple_kits, "--shards", "2", "--image-size", "32", *extra]
    run_module(module, *args, "--out", single)
    run_module(module, *args, "--out", double, np_ranks=2)
    a, b = _shards(single), _shards(double)
    assert a.keys() == b.keys() and len(a) == 6  # 3 splits x 2 shards
    for name in a:
        for key in SHARD_FIELDS:
            np.testing.assert_array_equal(a[name][key], b[name][key], err_msg=f"{name}:{key}")
    ma, mb = load_manifest(single), load_manifest(double)
    for split in ("train", "val", "test"):
        counts = {s["n_samples"] for s in ma["splits"][split]["shards"]}
        assert len(counts) == 1, f"{split}: unequal shard sizes {counts}"
        assert [s["sha256"] for s in ma["splits"][split]["shards"]] == [
            s["sha256"] for s in mb["splits"][split]["shards"]
        ]
    assert _tree_digest(simple_kits) == before  # inputs untouched
    assert not (single / ".work").exists()


def test_manifest_records_parameters_counts_weights_and_sources(simple_kits, tmp_path):
    out = tmp_path / "ds"
    preprocess_small(simple_kits, out, "--hu-window", "-200", "300", shards=3)
    m = load_manifest(out)
    assert m["normalization"]["hu_min"] == -200 and m["normalization"]["hu_max"] == 300
    assert m["parameters"]["n_shards"] == 3 and m["suite_version"]
    assert sorted(m["source_cases"]) == [f"case_{c:05d}" for c in range(8)]
    data = _shards(out)
    for split, info in m["splits"].items():
        masks = np.concatenate(
            [
                data[f"{split}/{s['file']}"]["masks"][~data[f"{split}/{s['file']}"]["is_padding"]]
                for s in info["shards"]
            ]
        )
        assert len(masks) == info["n_real_samples"]
        counts = [int((masks == c).sum()) for c in range(3)]
        assert counts == info["class_voxel_counts"]
        # every stored sample has kidney or tumor (empty slices dropped)
        assert all(mask.max() > 0 for mask in masks)
    total = sum(m["splits"]["train"]["class_voxel_counts"])
    expected = [total / (3 * c) for c in m["splits"]["train"]["class_voxel_counts"]]
    np.testing.assert_allclose(m["class_weights_balanced"], expected)
    sample_ids = np.concatenate([d["sample_ids"][~d["is_padding"]] for d in data.values()])
    assert len(np.unique(sample_ids)) == len(sample_ids)


def test_keep_empty_keeps_all_slices(simple_kits, tmp_path):
    out = tmp_path / "ds"
    preprocess_small(
        simple_kits, out, "--keep-empty", "--cases", "0-3", "--split-ratio", "2", "1", "1", shards=1
    )
    m = load_manifest(out)
    assert sum(m["splits"][s]["n_real_samples"] for s in m["splits"]) == 4 * 24


def test_keep_empty_fraction_keeps_some_empty_samples_deterministically(tmp_path):
    from preprocess.kits import write_case

    kits = tmp_path / "kits"
    rng = np.random.default_rng(0)
    for c in range(3):  # 80 slices, kidney only in 30-44: most slices and blocks are empty
        seg = np.zeros((80, 32, 32), np.uint8)
        seg[30:45, 8:20, 8:20] = 1
        write_case(kits, c, rng.normal(0, 30, seg.shape) + 100.0 * seg, seg, (2.5, 1.0, 1.0))

    def kept(kind: str, fraction: float, seed: int = 42) -> list[set[int]]:
        cfg = PreprocessConfig(
            kind=kind, kits_dir=str(kits), out_dir="unused", image_size=16,
            keep_empty=fraction, block_depth=8, block_overlap=2, shuffle_seed=seed,
        )  # fmt: skip
        return [set(process_case(cfg, c)["slice_index"].tolist()) for c in range(3)]

    for kind in ("slices", "blocks"):
        none, half, every = (kept(kind, f) for f in (0.0, 0.5, 1.0))
        sizes = [sum(map(len, runs)) for runs in (none, half, every)]
        assert sizes[0] < sizes[1] < sizes[2], (kind, sizes)
        if kind == "slices":
            # every slice with kidney stays; the empty ones kept are a subset of all
            assert all(
                set(range(30, 45)) == s0 <= s_half for s0, s_half in zip(none, half, strict=True)
            )
        assert all(s_half <= s_all for s_half, s_all in zip(half, every, strict=True))
        assert kept(kind, 0.5) == half  # seeded: the same on every run and rank
        assert kept(kind, 0.5, seed=7) != half


def test_keep_empty_rejects_a_non_fraction(simple_kits, tmp_path):
    proc = run_module(
        "preprocess.downsample", "--kits", simple_kits, "--out", tmp_path / "ds",
        "--keep-empty", "1.5", check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "not a fraction" in proc.stderr
    assert not (tmp_path / "ds").exists()


def test_padding_gives_equal_shards_and_is_flagged():
    metas = {1: {"n_samples": 5}, 2: {"n_samples": 2}}
    plan = plan_shards([1, 2], metas, 3, seed=0)
    assert [len(p) for p in plan] == [3, 3, 3]
    flat = [s for p in plan for s in p]
    assert sum(pad for *_, pad in flat) == 2
    assert {(c, i) for c, i, pad in flat if not pad} == {(1, i) for i in range(5)} | {
        (2, 0),
        (2, 1),
    }


def test_block_starts_cover_range_with_overlap():
    assert block_starts(0, 71, 100, 32, 12) == [0, 20, 40]
    starts = block_starts(10, 80, 100, 32, 12)
    assert starts[0] == 10 and starts[-1] + 31 == 80
    assert all(b - a == 20 for a, b in zip(starts[:-2], starts[1:-1], strict=False))
    assert block_starts(40, 49, 100, 32, 12) == [29]  # short range widened around its centre
    assert block_starts(0, 5, 20, 32, 12) == [0]  # volume thinner than a block


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the case and the problem, non-zero exit, inputs untouched
# ---------------------------------------------------------------------------------------------


def _bad_kits(tmp_path: Path, problem: str) -> Path:
    kits = write_simple_kits(tmp_path / "kits", [0, 1, 2], n_slices=12, size=32)
    case = kits / "case_00001"
    seg = nib.load(case / "segmentation.nii.gz")
    img = nib.load(case / "imaging.nii.gz")
    if problem == "missing_imaging":
        (case / "imaging.nii.gz").unlink()
    elif problem == "missing_segmentation":
        (case / "segmentation.nii.gz").unlink()
    elif problem == "shape":
        arr = np.asarray(seg.dataobj)[:-1]
        nib.save(nib.Nifti1Image(arr, seg.affine), case / "segmentation.nii.gz")
    elif problem == "labels":
        arr = np.asarray(seg.dataobj).copy()
        arr[0, 0, 0] = 7
        nib.save(nib.Nifti1Image(arr, seg.affine), case / "segmentation.nii.gz")
    elif problem == "nan":
        arr = np.asarray(img.dataobj).astype(np.float32)
        arr[3, 4, 5] = np.nan
        nib.save(nib.Nifti1Image(arr, img.affine), case / "imaging.nii.gz")
    elif problem == "not_nifti":
        (case / "imaging.nii.gz").write_bytes(b"this is not a NIfTI file")
    elif problem == "shifted":  # same shape, labels 40 mm away from the CT
        affine = seg.affine.copy()
        affine[0, 3] += 40.0
        nib.save(nib.Nifti1Image(np.asarray(seg.dataobj), affine), case / "segmentation.nii.gz")
    elif problem == "oblique":
        turn = np.eye(4)
        turn[:2, :2] = [[np.cos(0.2), -np.sin(0.2)], [np.sin(0.2), np.cos(0.2)]]
        nib.save(
            nib.Nifti1Image(np.asarray(img.dataobj), turn @ img.affine), case / "imaging.nii.gz"
        )
    elif problem == "not_3d":
        nib.save(
            nib.Nifti1Image(np.asarray(img.dataobj)[..., None], img.affine), case / "imaging.nii.gz"
        )
    return kits


@pytest.mark.parametrize(
    "problem,message",
    [
        ("missing_imaging", "missing file"),
        ("missing_segmentation", "missing file"),
        ("shape", "shape mismatch"),
        ("labels", "labels outside {0,1,2}: [7]"),
        ("nan", "non-finite"),
        ("not_nifti", "cannot read"),
        ("shifted", "segmentation's affine differs from the imaging's (origin shifted 40 mm"),
        ("oblique", "oblique orientation"),
        ("not_3d", "4D image"),
    ],
)
@pytest.mark.parametrize("image_size", ["128", "32"])  # enlarged and shrunk
def test_bad_case_is_a_clear_error(tmp_path, problem, message, image_size):
    kits = _bad_kits(tmp_path, problem)
    before = _tree_digest(kits)
    proc = run_module(
        "preprocess.downsample",
        "--kits",
        kits,
        "--out",
        tmp_path / "out",
        "--shards",
        "1",
        "--image-size",
        image_size,
        check=False,
    )
    assert proc.returncode == 2
    assert "case_00001" in proc.stderr and message in proc.stderr, proc.stderr
    assert _tree_digest(kits) == before
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.mpi
def test_bad_case_under_mpi_stops_all_ranks(tmp_path):
    kits = _bad_kits(tmp_path, "labels")
    proc = run_module(
        "preprocess.blocks",
        "--kits",
        kits,
        "--out",
        tmp_path / "out",
        "--shards",
        "2",
        "--depth",
        "4",
        "--overlap",
        "1",
        np_ranks=2,
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "case_00001" in proc.stderr and "labels outside" in proc.stderr


def test_empty_after_filtering_is_an_error(tmp_path):
    from preprocess.kits import write_case

    for c in range(3):
        write_case(
            tmp_path / "kits", c, np.zeros((6, 16, 16)), np.zeros((6, 16, 16), np.uint8), (1, 1, 1)
        )
    proc = run_module(
        "preprocess.downsample", "--kits", tmp_path / "kits", "--out", tmp_path / "out", check=False
    )
    assert proc.returncode == 2 and "empty result after filtering" in proc.stderr


def test_output_folder_with_other_dataset_is_refused(simple_kits, tmp_path):
    out = tmp_path / "ds"
    run_module("preprocess.downsample", "--kits", simple_kits, "--out", out, "--image-size", "32")
    before = _tree_digest(out)
    again = run_module(
        "preprocess.downsample", "--kits", simple_kits, "--out", out, "--image-size", "32"
    )
    assert "nothing to do" in again.stdout
    proc = run_module(
        "preprocess.downsample",
        "--kits",
        simple_kits,
        "--out",
        out,
        "--image-size",
        "64",
        check=False,
    )
    assert proc.returncode == 2 and "different dataset" in proc.stderr
    assert "image_size" in proc.stderr
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    proc = run_module("preprocess.downsample", "--kits", simple_kits, "--out", other, check=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert _tree_digest(out) == before


# ---------------------------------------------------------------------------------------------
# Interrupted runs and verify
# ---------------------------------------------------------------------------------------------


@pytest.mark.mpi
def test_killed_rank_then_rerun_completes(tmp_path):
    kits = write_simple_kits(tmp_path / "kits", list(range(16)), n_slices=60, size=256)
    out = tmp_path / "ds"
    args = ["--kits", str(kits), "--out", str(out), "--shards", "2", "--quiet"]
    cmd = ["mpirun", "-np", "2", "--oversubscribe", PYTHON, "-m", "preprocess.downsample", *args]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.time() + 60
    cases_dir = out / ".work" / "cases"
    while time.time() < deadline and not (cases_dir.exists() and any(cases_dir.glob("*.json"))):
        time.sleep(0.02)
    assert cases_dir.exists(), "preprocessing never started"
    ranks = subprocess.run(
        ["pgrep", "-f", f"preprocess.downsample {' '.join(args)}"], capture_output=True, text=True
    ).stdout.split()
    victims = [int(p) for p in ranks if int(p) != proc.pid]
    assert victims, "no rank process found to kill"
    # Freeze every rank first, then kill one (a node lost): left running, the other rank would
    # take the cases nobody has claimed and could finish them all before mpirun notices. mpirun
    # then ends the job (OpenMPI continues stopped ranks before it terminates them).
    for pid in victims:
        os.kill(pid, signal.SIGSTOP)
    done_before = len(list(cases_dir.glob("*.json")))
    os.kill(victims[-1], signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not (out / "manifest.json").exists()
    assert 0 < done_before < 16, "the kill did not land mid-way"
    assert len(list(cases_dir.glob("*.json"))) < 16

    rerun = run_module("preprocess.downsample", *args[:-1], np_ranks=2)
    assert rerun.returncode == 0
    clean = tmp_path / "clean"
    run_module("preprocess.downsample", "--kits", kits, "--out", clean, "--shards", "2")
    assert [s["sha256"] for s in load_manifest(out)["splits"]["train"]["shards"]] == [
        s["sha256"] for s in load_manifest(clean)["splits"]["train"]["shards"]
    ]
    assert not list(out.rglob("*.tmp"))
    assert run_module("preprocess.verify", out).returncode == 0


def test_rerun_skips_good_shards_and_redoes_damaged_ones(simple_kits, tmp_path):
    out = tmp_path / "ds"
    args = [
        "--kits",
        simple_kits,
        "--out",
        out,
        "--shards",
        "2",
        "--image-size",
        "32",
        "--keep-work",
    ]
    run_module("preprocess.downsample", *args)
    manifest = load_manifest(out)
    (out / "manifest.json").unlink()  # as if the run died before its last step
    good, bad = out / "train" / "shard_00000.h5", out / "train" / "shard_00001.h5"
    good_mtime = good.stat().st_mtime_ns
    with open(bad, "r+b") as fh:
        fh.seek(4000)
        fh.write(b"\x00garbage\x00")
    time.sleep(0.01)
    run_module("preprocess.downsample", *args)
    assert good.stat().st_mtime_ns == good_mtime  # checksum matched: skipped
    assert load_manifest(out)["splits"] == manifest["splits"]  # damaged shard rewritten


def test_verify_catches_corrupted_and_missing_shards(simple_kits, tmp_path):
    out = tmp_path / "ds"
    preprocess_small(simple_kits, out)
    ok = run_module("preprocess.verify", out)
    assert "OK" in ok.stdout
    shard = out / "val" / "shard_00001.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = run_module("preprocess.verify", out, check=False)
    assert proc.returncode == 1 and "val/shard_00001.h5" in proc.stderr
    assert "SHA-256 mismatch" in proc.stderr
    shutil.copy(out / "train" / "shard_00000.h5", out / "train" / "shard_00009.h5")
    (out / "test" / "shard_00000.h5").unlink()
    proc = run_module("preprocess.verify", out, check=False)
    assert "train/shard_00009.h5: shard not listed" in proc.stderr
    assert "test/shard_00000.h5: missing" in proc.stderr
    proc = run_module("preprocess.verify", tmp_path / "nowhere", check=False)
    assert proc.returncode == 2 and "manifest.json" in proc.stderr


def test_help_explains_options():
    for module in ("preprocess.downsample", "preprocess.blocks", "preprocess.verify"):
        text = run_module(module, "--help").stdout
        assert "usage:" in text
    assert "--overlap" in run_module("preprocess.blocks", "--help").stdout


def test_balanced_weights_formula():
    np.testing.assert_allclose(balanced_class_weights([90, 9, 1]), [100 / 270, 100 / 27, 100 / 3])
    assert json.dumps(balanced_class_weights([5, 0, 5]))  # absent class -> 0, still serialisable


def test_ranks_claim_each_case_once_largest_first_and_stop_after_a_failure(tmp_path):
    from preprocess.claims import STOP, claim_cases, largest_first

    order = largest_first([3, 1, 2, 7], {3: 10, 1: 50, 2: 10, 7: 30})
    assert order == [1, 7, 2, 3]  # largest first, ties by id
    claims = tmp_path / "claims"
    claims.mkdir()
    # two ranks taking turns, as when each finishes a case before the other
    rank0, rank1 = claim_cases(order, claims), claim_cases(order, claims)
    taken = [next(rank0), next(rank1), next(rank1), next(rank0)]
    assert taken == [(0, 1), (1, 7), (2, 2), (3, 3)]
    assert list(rank0) == [] and list(rank1) == []
    # a new run in a fresh folder; a rank that fails leaves a stop file: no new claims
    claims2 = tmp_path / "claims2"
    claims2.mkdir()
    rank0 = claim_cases(order, claims2)
    assert next(rank0) == (0, 1)
    (claims2 / STOP).touch()
    assert list(claim_cases(order, claims2)) == [] and list(rank0) == []


def test_output_that_is_a_file_is_an_error(simple_kits, tmp_path):
    out = tmp_path / "taken.txt"
    out.write_text("not a dataset")
    proc = run_module(
        "preprocess.downsample", "--kits", simple_kits, "--output", out, "--image-size", "32",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and f"{out} is an existing file" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert out.read_text() == "not a dataset"


def test_tagged_case_folders_are_read_and_duplicate_ids_refused(simple_kits, tmp_path):
    tagged = tmp_path / "tagged"
    for c in (0, 1, 2, 3):
        shutil.copytree(simple_kits / f"case_{c:05d}", tagged / f"case_{c:05d}_s{10 + c}")
    plain = tmp_path / "plain"
    for c in (0, 1, 2, 3):
        shutil.copytree(simple_kits / f"case_{c:05d}", plain / f"case_{c:05d}")
    args = ["--image-size", "32", "--shards", "1", "--split-ratio", "2", "1", "1"]
    preprocess_small(tagged, tmp_path / "a", *args[2:], shards=1)
    preprocess_small(plain, tmp_path / "b", *args[2:], shards=1)
    digests = [
        [s["sha256"] for split in m["splits"].values() for s in split["shards"]]
        for m in (load_manifest(tmp_path / "a"), load_manifest(tmp_path / "b"))
    ]
    assert digests[0] == digests[1]
    shutil.copytree(plain / "case_00002", tagged / "case_00002")  # a second folder for id 2
    proc = run_module(
        "preprocess.downsample", "--kits", tagged, "--out", tmp_path / "c", *args, check=False
    )
    assert proc.returncode == 2
    assert "two folders for case_00002: case_00002 and case_00002_s12" in proc.stderr


def _stored_as(volume: np.ndarray, affine: np.ndarray, axcodes: str) -> nib.Nifti1Image:
    """The same voxels in the same world places, stored in the array layout ``axcodes``."""
    orient = nib.orientations
    transform = orient.ornt_transform(orient.io_orientation(affine), orient.axcodes2ornt(axcodes))
    data = orient.apply_orientation(volume, transform)
    return nib.Nifti1Image(data, affine @ orient.inv_ornt_aff(transform, volume.shape))


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "SAR"])
def test_a_case_in_another_orientation_gives_the_same_samples(simple_kits, tmp_path, axcodes):
    source = simple_kits / "case_00001"
    folder = tmp_path / "kits" / "case_00001"
    folder.mkdir(parents=True)
    for name in ("imaging.nii.gz", "segmentation.nii.gz"):
        img = nib.load(source / name)
        stored = _stored_as(np.asarray(img.dataobj), img.affine, tuple(axcodes))
        assert stored.shape != img.shape or axcodes == "SAR"
        nib.save(stored, folder / name)
    for kind in ("slices", "blocks"):
        cfg = {"kind": kind, "out_dir": "unused", "image_size": 32, "block_depth": 8}
        cfg |= {"block_overlap": 2, "keep_empty": 0.5}
        want = process_case(PreprocessConfig(kits_dir=str(simple_kits), **cfg), 1)
        got = process_case(PreprocessConfig(kits_dir=str(tmp_path / "kits"), **cfg), 1)
        for key in ("images", "masks", "slice_index", "counts"):
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{kind} {key}")
        assert got["source"]["spacing"] == want["source"]["spacing"]


def test_target_spacing_resamples_pads_and_is_recorded(simple_kits, tmp_path):
    # 64 px at 0.8 mm = 51.2 mm; at 1.6 mm per pixel 32 px, centred on a 48 px grid
    out = tmp_path / "ds"
    preprocess_small(simple_kits, out, "--image-size", "48", "--target-spacing", "1.6")
    m = load_manifest(out)
    assert m["target_spacing"] == 1.6 and m["parameters"]["target_spacing"] == 1.6
    assert m["identity"]["target_spacing"] == 1.6
    for shard in _shards(out).values():
        for key in ("images", "masks"):
            border = np.ones((48, 48), bool)
            border[8:40, 8:40] = False
            assert not shard[key][:, border].any(), key  # zero padding around the field of view
        assert shard["masks"][:, 8:40, 8:40].any()
    plain = preprocess_small(simple_kits, tmp_path / "plain")
    assert load_manifest(plain)["target_spacing"] is None


def test_command_line_defaults_are_the_config_defaults():
    from preprocess.config import build_parser, config_from_args

    for kind in ("slices", "blocks"):
        args = build_parser(kind, "prog", "").parse_args(["--kits", "k", "--out", "o"])
        assert config_from_args(kind, args) == PreprocessConfig(kind, "k", "o")
    args = build_parser("blocks", "prog", "").parse_args(
        ["--kits", "k", "--output", "o", "--hu-window", "-79", "304", "--compression", "lzf",
         "--depth", "16", "--target-spacing", "1.5", "--keep-empty"]
    )  # fmt: skip
    cfg = config_from_args("blocks", args)
    assert (cfg.hu_min, cfg.hu_max, cfg.compression, cfg.block_depth) == (-79, 304, "lzf", 16)
    assert cfg.target_spacing == 1.5 and cfg.keep_empty == 1.0 and cfg.out_dir == "o"


def test_preprocessing_never_imports_tensorflow():
    code = (
        "import sys, preprocess.pipeline, preprocess.geometry, preprocess.verify; "
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    )
    subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=run_env(), check=True, timeout=60)

"""Evaluation (train.evaluate): JC_w on the test split, whole volumes and real-CT slice folders,
result files, bad input."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
from conftest import write_simple_kits
from inference_runs import SIZE, make_run, synthetic_ct

from preprocess.dataset_format import load_manifest, manifest_sha256, read_shard, shard_paths
from preprocess.kits import write_case
from preprocess.pipeline import PreprocessConfig
from preprocess.pipeline import run as preprocess_run
from train import evaluate
from train.metrics import np_weighted_jaccard_from_confusion
from train.volume_eval import PER_CASE_COLUMNS

TEST_CASES = [6, 7]


# --------------------------------------------------------------------------------------------
# End to end on a small KiTS folder and its preprocessed dataset
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kits_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    kits = write_simple_kits(root / "kits", list(range(8)), n_slices=16, size=48)
    data = root / "data"
    cfg = PreprocessConfig(
        kind="slices",
        kits_dir=str(kits),
        out_dir=str(data),
        image_size=SIZE,
        n_shards=2,
        train_cases=[0, 1, 2, 3],
        val_cases=[4, 5],
        test_cases=TEST_CASES,
    )
    assert preprocess_run(cfg, quiet=True) == 0
    return kits, data


@pytest.fixture(scope="module")
def run2d(tmp_path_factory, kits_and_data):
    _, data = kits_and_data
    return make_run(
        tmp_path_factory.mktemp("run2d"),
        dataset_dir=str(data),
        manifest_sha256=manifest_sha256(data),
        class_weights=[0.5, 8.0, 60.0],
    )


def test_evaluate_writes_metrics_per_case_and_results(run2d, kits_and_data, tmp_path):
    kits, data = kits_and_data
    out = tmp_path / "eval"
    code = evaluate.main(
        ["--run", str(run2d), "--kits", str(kits), "--out", str(out), "--no-progress"]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    ds, vol = metrics["dataset"], metrics["volumes"]

    # the test split at model resolution, padding samples skipped, the run's class weights
    manifest = load_manifest(data)
    assert ds["source"] == "config.json" and ds["same_as_training_dataset"] is True
    assert ds["n_samples"] == manifest["splits"]["test"]["n_real_samples"]
    padding = sum(
        int(read_shard(p, ("is_padding",))["is_padding"].sum())
        for p in shard_paths(data, "test", manifest)
    )
    assert ds["n_padding_skipped"] == padding
    cm = np.asarray(ds["confusion_matrix"])
    assert cm.sum() == ds["n_samples"] * SIZE * SIZE
    assert ds["class_weights"] == [0.5, 8.0, 60.0]
    assert ds["weighted_jaccard"] == pytest.approx(
        np_weighted_jaccard_from_confusion(cm, [0.5, 8.0, 60.0])
    )
    assert set(ds["dice"]) == {"background", "kidney", "tumor"}

    # whole volumes: by default the dataset's test cases
    assert vol["cases"] == ["case_00006", "case_00007"] and vol["n_cases"] == 2
    assert vol["cases_source"].startswith("test split")
    with open(out / "per_case.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case"] for r in rows] == ["case_00006", "case_00007"]
    assert list(rows[0]) == list(PER_CASE_COLUMNS)
    kidney = [float(r["kidney_dice"]) for r in rows]
    assert vol["kidney_dice_mean"] == pytest.approx(np.mean(kidney), abs=1e-6)
    assert all(0.0 <= float(r["tumor_dice"]) <= 1.0 for r in rows)
    assert int(rows[0]["n_slices"]) == 16 and int(rows[0]["width"]) == 48

    md = (out / "results.md").read_text()
    assert "| Unet2D |" in md and "0.8633" in md and f"{ds['weighted_jaccard']:.4f}" in md
    assert str(data) in md and str(kits) in md and "synthetic" in md
    assert not list(out.glob(".*"))  # no temporary files left


def test_cases_option_save_predictions_and_explicit_data(run2d, kits_and_data, tmp_path):
    kits, data = kits_and_data
    out = tmp_path / "eval"
    argv = ["--run", str(run2d), "--kits", str(kits), "--cases", "1,3", "--data", str(data)]
    code = evaluate.main(argv + ["--out", str(out), "--save-predictions", "--postprocess"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["volumes"]["cases"] == ["case_00001", "case_00003"]
    assert metrics["volumes"]["postprocess"] == {"keep_largest_components": 2}
    assert metrics["dataset"]["source"] == "--data"
    assert (out / "predictions" / "case_00001.nii.gz").is_file()


def test_volumes_only_skips_the_recorded_dataset(run2d, kits_and_data, tmp_path, capsys):
    kits, data = kits_and_data
    out = tmp_path / "eval"
    argv = ["--run", str(run2d), "--kits", str(kits), "--cases", "6", "--volumes-only"]
    assert evaluate.main(argv + ["--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] is None and "--volumes-only" in metrics["dataset_note"]
    assert metrics["volumes"]["cases"] == ["case_00006"]
    code = evaluate.main(argv + ["--data", str(data), "--out", str(tmp_path / "other")])
    assert code == 2 and "exclude each other" in capsys.readouterr().err


def test_3d_model_on_a_block_dataset(kits_and_data, tmp_path):
    kits, _ = kits_and_data
    data = tmp_path / "blocks"
    cfg = PreprocessConfig(
        kind="blocks",
        kits_dir=str(kits),
        out_dir=str(data),
        image_size=SIZE,
        block_depth=8,
        block_overlap=2,
        n_shards=1,
        train_cases=[0, 1],
        val_cases=[2],
        test_cases=[7],
    )
    assert preprocess_run(cfg, quiet=True) == 0
    run = make_run(tmp_path / "run3d", "unet3d", (8, SIZE, SIZE, 3), dataset_dir=str(data))
    out = tmp_path / "eval"
    assert evaluate.main(["--run", str(run), "--kits", str(kits), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"]["kind"] == "blocks"
    assert np.asarray(metrics["dataset"]["confusion_matrix"]).sum() % (8 * SIZE * SIZE) == 0
    assert metrics["volumes"]["cases"] == ["case_00007"]


def test_without_dataset_the_test_cases_recorded_in_config_are_used(kits_and_data, tmp_path):
    kits, _ = kits_and_data
    run = make_run(tmp_path / "run", dataset_dir=str(tmp_path / "gone"))
    config = json.loads((run / "config.json").read_text())
    config["dataset"]["splits"] = {"train": [0], "val": [1], "test": [5]}
    (run / "config.json").write_text(json.dumps(config))
    out = tmp_path / "eval"
    assert evaluate.main(["--run", str(run), "--kits", str(kits), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] is None and "not found" in metrics["dataset_note"]
    assert metrics["volumes"]["cases"] == ["case_00005"]
    md = (out / "results.md").read_text()
    assert "| Unet2D | n/a | 0.8633 |" in md and "Not computed" in md


def test_bad_inputs_exit_2_with_a_clear_message(run2d, kits_and_data, tmp_path, capsys):
    kits, data = kits_and_data
    out = str(tmp_path / "eval")
    code = evaluate.main(["--run", str(run2d), "--kits", str(kits), "--cases", "99", "--out", out])
    assert code == 2 and "case_00099" in capsys.readouterr().err
    code = evaluate.main(["--run", str(run2d), "--data", str(tmp_path), "--out", out])
    assert code == 2 and f"{tmp_path}: no manifest.json" in capsys.readouterr().err
    bare = make_run(tmp_path / "bare")  # records no dataset
    code = evaluate.main(["--run", str(bare), "--out", out])
    assert code == 2 and "nothing to evaluate" in capsys.readouterr().err
    code = evaluate.main(["--run", str(tmp_path / "nope"), "--kits", str(kits), "--out", out])
    assert code == 2 and "nope: run folder not found" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in ("--run", "--kits", "--cases", "--data", "--out", "JC_w", "tumor Dice"):
        assert word in text


def _slice_folder(root):
    """Real-CT style: one-slice cases named case_XXXXX_sNNN, some empty, one in RAS order."""
    kits = root / "slices"
    for case_id, content in ((10, "tumor"), (11, "kidney"), (12, "empty"), (13, "empty")):
        hu, seg = synthetic_ct(n_slices=5, height=40, width=48, seed=case_id)
        z = {"tumor": 4, "kidney": 2, "empty": 0}[content]
        folder = write_case(kits, case_id, hu[z : z + 1], seg[z : z + 1], (1.0, 0.78, 0.78))
        folder.rename(kits / f"{folder.name}_s{100 + case_id}")
    return kits


def test_real_ct_slice_folder_headline_csv_and_worst_overlays(run2d, tmp_path):
    kits = _slice_folder(tmp_path)
    out = tmp_path / "eval"
    argv = ["--run", str(run2d), "--kits", str(kits), "--volumes-only", "--out", str(out)]
    assert evaluate.main(argv + ["--overlays", "3", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    vol = metrics["volumes"]
    assert vol["cases"] == [f"case_000{c}_s1{c}" for c in (10, 11, 12, 13)]
    with open(out / "per_case.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    head = vol["headline"]
    assert (head["n_kidney"], head["n_tumor"], head["n_empty"]) == (2, 1, 2)
    kidney = [float(r["kidney_dice"]) for r in rows if int(r["true_kidney_tumor_voxels"]) > 0]
    assert head["kidney_tumor_dice"] == pytest.approx(np.mean(kidney), abs=1e-6)
    assert head["tumor_dice"] == pytest.approx(float(rows[0]["tumor_dice"]), abs=1e-6)
    marked = [int(r["pred_kidney_tumor_voxels"]) > 50 for r in rows[2:]]
    assert head["empty_fp_rate"] == pytest.approx(sum(marked) / 2)
    assert [int(r["empty_slices"]) for r in rows] == [0, 0, 1, 1]
    pngs = sorted((out / "overlays").glob("case_*_z0000.png"))
    assert len(pngs) == 3
    assert cv2.imread(str(pngs[0])).shape == (40, 2 * 48 + 4, 3)
    assert "| kidney+tumor Dice |" in (out / "results.md").read_text()


def test_an_out_that_is_a_file_exits_2(run2d, kits_and_data, tmp_path, capsys):
    kits, _ = kits_and_data
    a_file = tmp_path / "metrics"
    a_file.write_text("keep me")
    argv = ["--run", str(run2d), "--kits", str(kits), "--cases", "6", "--out", str(a_file)]
    assert evaluate.main(argv) == 2
    assert f"{a_file}: --out names an existing file" in capsys.readouterr().err
    assert a_file.read_text() == "keep me"


def test_a_dataset_on_another_grid_than_the_model_is_refused(kits_and_data, tmp_path, capsys):
    _, data = kits_and_data
    run = make_run(tmp_path / "run", dataset_dir=str(data), target_spacing=1.5)
    code = evaluate.main(["--run", str(run), "--out", str(tmp_path / "eval")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{data}: slices on a grid of whole slices resized, the model's are on 1.5 mm" in err

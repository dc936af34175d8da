"""Evaluation (train.evaluate): KiTS19 per-case metrics, JC_w on the test split, result files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import write_simple_kits
from inference_runs import SIZE, make_run

from preprocess.dataset_format import load_manifest, manifest_sha256, read_shard, shard_paths
from preprocess.pipeline import PreprocessConfig
from preprocess.pipeline import run as preprocess_run
from train import evaluate
from train.losses import np_weighted_jaccard_from_confusion

TEST_CASES = [6, 7]


# --------------------------------------------------------------------------------------------
# KiTS19 metrics on hand-made cases
# --------------------------------------------------------------------------------------------


def _case():
    truth = np.zeros((2, 4, 5), np.uint8)
    truth[0, :2, :] = 1  # 10 kidney voxels
    truth[0, 0, :2] = 2  # 2 of them tumor
    return truth


def test_perfect_prediction_scores_one():
    truth = _case()
    assert evaluate.kits_case_metrics(truth, truth) == {"kidney_dice": 1.0, "tumor_dice": 1.0}


def test_empty_prediction_scores_zero():
    truth = _case()
    empty = np.zeros_like(truth)
    assert evaluate.kits_case_metrics(truth, empty) == {"kidney_dice": 0.0, "tumor_dice": 0.0}


def test_tumor_dice_convention_when_empty():
    truth = _case()
    truth[truth == 2] = 1  # no tumor in the truth
    assert evaluate.kits_case_metrics(truth, truth)["tumor_dice"] == 1.0  # both empty
    pred = truth.copy()
    pred[1, 3, 4] = 2  # one false tumor voxel
    assert evaluate.kits_case_metrics(truth, pred)["tumor_dice"] == 0.0  # only one empty


def test_known_overlap_matches_hand_computation():
    truth = _case()
    pred = np.zeros_like(truth)
    pred[0, 1:3, :] = 1  # 10 voxels predicted, 5 of them in the truth's kidney+tumor
    pred[0, 0, 0] = 2  # one tumor voxel right (TP 1), truth tumor has 2 (FN 1)
    pred[1, 0, 0] = 2  # and one wrong (FP 1)
    # kidney+tumor: truth 10 voxels, prediction 12, overlap 6 -> 2*6 / (10 + 12)
    # tumor: truth 2, prediction 2, overlap 1 -> 2*1 / (2 + 2)
    scores = evaluate.kits_case_metrics(truth, pred)
    assert scores["kidney_dice"] == pytest.approx(12 / 22)
    assert scores["tumor_dice"] == pytest.approx(0.5)


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
    assert list(rows[0]) == list(evaluate.PER_CASE_COLUMNS)
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

"""Case splits (preprocess.splits): the thesis's ranges, seeded proportional splits, and the
training recipe's split shared by scripts/train_weights.sh and scripts/compare_models.sh."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_module, write_simple_kits

from preprocess.splits import RESERVED_TEST, make_split, recipe_split


def test_splits_thesis_ranges_and_proportional():
    thesis, how = make_split(list(range(210)))
    assert "thesis" in how
    assert thesis["val"] == list(range(120, 140)) and thesis["test"] == list(range(200, 210))
    assert len(thesis["train"]) == 180
    few = [3, 8, 15, 40, 77, 90, 101, 150, 160, 199]  # no case of 200-209: proportional
    prop, how = make_split(few)
    assert "proportional" in how
    assert sorted(prop["train"] + prop["val"] + prop["test"]) == few
    assert len(prop["val"]) >= 1 and len(prop["test"]) >= 1
    assert make_split(few)[0] == prop  # seeded
    assert make_split(few, seed=7)[0] != prop


def test_recipe_split_keeps_real_validation_patients_out_of_training():
    labels = list(range(0, 210, 2))
    real = {"train": [0, 4, 8, 300], "val": list(range(2, 120, 4))}
    split = recipe_split(labels, real, real_ids=[0, 2, 4, 6, 10, 14])
    assert not set(split["train"]) & set(real["val"])
    assert not set(split["train"]) & set(RESERVED_TEST)
    assert set(split["val"]) | set(split["test"]) <= set(real["val"]) & set(labels)
    assert not set(split["val"]) & set(split["test"])
    assert len(split["val"]) == len(split["test"]) == 6
    assert split["real_train"] == [0, 4]  # only real cases present in the folder
    assert split["real_val"] == [2, 6, 10, 14]


def test_recipe_split_command(tmp_path: Path):
    labels = write_simple_kits(tmp_path / "labels", list(range(40)), n_slices=2, size=8)
    real = write_simple_kits(tmp_path / "real", [0, 1, 2, 3], n_slices=2, size=8)
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": [0, 1], "val": list(range(2, 24))}))
    args = ["--labels", str(labels), "--real-split", str(split_file), "--real-ct", str(real)]
    done = run_module("preprocess.splits", *args)
    assert done.returncode == 0, done.stderr
    train, val, test, real_train, real_val = done.stdout.split()
    assert val == "2,6,10,14,18,22" and test == "4,8,12,16,20"  # every 4th, offsets 0 and 2
    assert train == ",".join(map(str, [0, 1, *range(24, 40)]))
    assert real_train == "0,1" and real_val == "2,3"
    missing = run_module(
        "preprocess.splits",
        "--labels",
        str(tmp_path / "none"),
        "--real-split",
        str(split_file),
        check=False,
    )
    assert missing.returncode == 2 and "none" in missing.stderr

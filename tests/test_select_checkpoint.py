"""train.select_checkpoint: candidates scored on whole validation volumes, the best installed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_simple_kits
from inference_runs import SIZE, make_run

from train import select_checkpoint
from train.config import parse_args

VAL, TEST = [0, 1], [2, 3]


def _constant_weights(path, label: int) -> None:
    """A tiny Unet2D whose output is ``label`` everywhere (zero classifier kernel, one bias)."""
    import tf_keras as keras

    import models

    net = models.build("unet2d", (SIZE, SIZE, 3), 3, base_filters=2)
    head = [layer for layer in net.layers if isinstance(layer, keras.layers.Conv2D)][-1]
    kernel, bias = head.get_weights()
    assert bias.shape == (3,)
    bias = np.zeros(3, np.float32)
    bias[label] = 10.0
    head.set_weights([np.zeros_like(kernel), bias])
    path.parent.mkdir(parents=True, exist_ok=True)
    net.save_weights(str(path))


@pytest.fixture()
def run_and_kits(tmp_path):
    kits = write_simple_kits(tmp_path / "kits", VAL + TEST, n_slices=16, size=48)
    run = make_run(tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["dataset"]["splits"] = {"train": [9], "val": VAL, "test": TEST}
    train_args = parse_args(["--model", "unet2d", "--data", "d", "--out", "o"])
    config["train"] = train_args.resolve(is_3d=False).to_dict()
    config.update(n_params=1, lr_multiplier=1, effective_lr=4e-4)
    (run / "config.json").write_text(json.dumps(config))
    ckpt = run / "checkpoints"
    # the current best by the training monitor marks nothing; epoch 3 marks tumor (label > 0
    # as well) everywhere, epoch 7 kidney everywhere: on volumes with tumor, 3 scores highest
    _constant_weights(ckpt / "best.weights.h5", 0)
    (ckpt / "best.json").write_text(json.dumps({"epoch": 5, "monitor": "val_x", "value": 0.9}))
    _constant_weights(ckpt / "epochs" / "epoch_0003.weights.h5", 2)
    _constant_weights(ckpt / "epochs" / "epoch_0007.weights.h5", 1)
    summary = {"epochs_done": 7, "best_epoch": 5, "best_value": 0.9, "train_seconds": 1.0}
    (run / "summary.json").write_text(json.dumps(summary))
    return run, kits


def test_chooses_on_validation_volumes_and_installs_the_winner(run_and_kits, capsys):
    run, kits = run_and_kits
    ckpt = run / "checkpoints"
    assert select_checkpoint.main(["--run", str(run), "--kits", str(kits)]) == 0

    selection = json.loads((run / "selection.json").read_text())
    assert selection["cases"] == ["case_00000", "case_00001"]  # config.json's validation split
    scores = {c["epoch"]: c["kits_score"] for c in selection["candidates"]}
    assert set(scores) == {3, 5, 7}
    assert scores[5] == 0.0  # no kidney, no tumor found
    assert scores[3] > scores[7] > 0.0
    assert selection["chosen"]["epoch"] == 3
    # installed: the weights, best.json (with the replaced record), summary and basic_info
    assert (ckpt / "best.weights.h5").read_bytes() == (
        ckpt / "epochs" / "epoch_0003.weights.h5"
    ).read_bytes()
    best = json.loads((ckpt / "best.json").read_text())
    assert best["epoch"] == 3 and best["monitor"] == select_checkpoint.MONITOR
    assert best["value"] == pytest.approx(scores[3])
    assert best["replaced"]["epoch"] == 5
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_epoch"] == 3 and summary["train_seconds"] == 1.0
    info = (run / "basic_info.txt").read_text()
    assert f"best:             {select_checkpoint.MONITOR} = " in info
    assert "at epoch 3 (train.select_checkpoint on whole validation volumes" in info
    assert "chosen:" in capsys.readouterr().out

    # a second run (after more training, say) scores only what it has not scored before
    _constant_weights(ckpt / "epochs" / "epoch_0009.weights.h5", 1)
    assert select_checkpoint.main(["--run", str(run), "--kits", str(kits), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # best.weights.h5 is now epoch 3: the old best (epoch 5) is no longer a candidate
    assert out.count("scored before") == 2 and "epoch_0009.weights.h5 (epoch 9)\n" in out
    again = json.loads((run / "selection.json").read_text())
    rescored = {c["epoch"]: c["kits_score"] for c in again["candidates"]}
    assert rescored == {3: scores[3], 7: scores[7], 9: scores[7]}  # 9 is the same model as 7
    assert again["chosen"]["epoch"] == 3


def test_dry_run_installs_nothing(run_and_kits):
    run, kits = run_and_kits
    before = (run / "checkpoints" / "best.weights.h5").read_bytes()
    assert select_checkpoint.main(["--run", str(run), "--kits", str(kits), "--dry-run"]) == 0
    assert json.loads((run / "selection.json").read_text())["chosen"]["epoch"] == 3
    assert (run / "checkpoints" / "best.weights.h5").read_bytes() == before
    assert json.loads((run / "checkpoints" / "best.json").read_text())["epoch"] == 5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cases", "1-2"], "[2] are test cases"),
        (["--weights", "nowhere.weights.h5"], "nowhere.weights.h5: weights file not found"),
        (["--cases", "0,8"], "case_00008"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(run_and_kits, capsys, extra, message):
    run, kits = run_and_kits
    assert select_checkpoint.main(["--run", str(run), "--kits", str(kits), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (run / "selection.json").exists()
    assert json.loads((run / "checkpoints" / "best.json").read_text())["epoch"] == 5

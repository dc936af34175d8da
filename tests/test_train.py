"""Distributed training with real Horovod on CPU (train.train, train.data, train.checkpoint)."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import PYTHON, ROOT, preprocess_small, run_env, run_module, write_simple_kits

from preprocess.dataset_format import sha256_file, write_json_atomic

pytestmark = pytest.mark.mpi

TINY = [
    "--model",
    "unet2d",
    "--batch-size",
    "4",
    "--model-option",
    "base_filters=4",
    "--l2",
    "0",
    "--warmup-epochs",
    "1",
    "--workers",
    "1",
    "--threads",
    "1",
]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("train_data")
    kits = write_simple_kits(base / "kits", list(range(8)), n_slices=24, size=64)
    out = base / "slices32"
    preprocess_small(kits, out)
    return out


def _history(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "history.csv") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _train(launcher: list[str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [*launcher, PYTHON, "-m", "train.train", *map(str, args)]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=timeout
    )
    return proc


MPIRUN = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none"]
HOROVODRUN = ["horovodrun", "--gloo", "-np", "2", "-H", "localhost:2"]


@pytest.mark.parametrize("launcher", [MPIRUN, HOROVODRUN], ids=["mpirun", "horovodrun-gloo"])
def test_two_ranks_train_and_agree(tiny_dataset, tmp_path, launcher):
    run_dir = tmp_path / "run"
    proc = _train(
        [
            str(ROOT / ".venv" / "bin" / launcher[0])
            if launcher[0] == "horovodrun"
            else launcher[0],
            *launcher[1:],
        ],
        *TINY,
        "--data",
        tiny_dataset,
        "--out",
        run_dir,
        "--epochs",
        "4",
        "--record-samples",
        "--checkpoint-every",
        "2",
        "--lr",
        "3e-3",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = _history(run_dir)
    assert len(history) == 4
    assert history[-1]["loss"] < history[0]["loss"], history  # the loss falls
    summary = json.loads((run_dir / "summary.json").read_text())
    digests = summary["weights_digest_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]  # identical weights on both ranks
    samples = json.loads((run_dir / "samples.json").read_text())
    assert sorted(samples) == ["1", "2", "3", "4"]
    own = {}  # the ids in each rank's shard, and which of them are padding repeats
    for r in (0, 1):
        with h5py.File(tiny_dataset / "train" / f"shard_0000{r}.h5") as h5:
            ids, pad = h5["sample_ids"][()], h5["is_padding"][()]
        own[str(r)] = (set(ids.tolist()), set(ids[pad].tolist()))
    for epoch, ranks in samples.items():
        assert len(ranks["0"]) == len(ranks["1"]) > 0
        for r in ("0", "1"):
            assert set(ranks[r]) <= own[r][0], f"epoch {epoch}: rank {r} read outside its shard"
        shared = set(ranks["0"]) & set(ranks["1"])
        # only the padding repeats (a few samples of the other shard) may be seen by both
        assert shared <= own["0"][1] | own["1"][1], f"epoch {epoch}: ranks saw the same samples"
        assert len(shared) <= 2
    assert samples["1"]["0"] != samples["2"]["0"]  # reshuffled per epoch
    config = json.loads((run_dir / "config.json").read_text())
    assert config["n_ranks"] == 2 and config["versions"]["horovod"] == "0.28.1"
    assert config["dataset"]["manifest_sha256"] == sha256_file(tiny_dataset / "manifest.json")
    assert config["effective_lr"] == pytest.approx(6e-3)
    for name in (
        "basic_info.txt",
        "checkpoints/best.weights.h5",
        "checkpoints/latest.json",
        "checkpoints/latest.weights.h5",
    ):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "logs").rglob("events.out.tfevents.*"))
    # progress comes from rank 0 only: one line per epoch
    assert len(re.findall(r"epoch \d/4:", proc.stdout)) == 4


def test_only_rank_0_writes_files(tiny_dataset, tmp_path):
    """Rank 1 runs under strace; no file under the run folder may be opened for writing by it."""
    run_dir = tmp_path / "run"
    trace = tmp_path / "rank1.strace"
    args = [
        PYTHON,
        "-m",
        "train.train",
        *TINY,
        "--data",
        str(tiny_dataset),
        "--out",
        str(run_dir),
        "--epochs",
        "2",
        "--checkpoint-every",
        "1",
        "--record-samples",
    ]
    cmd = [
        "mpirun",
        "--oversubscribe",
        "-np",
        "1",
        *args,
        ":",
        "-np",
        "1",
        "strace",
        "-f",
        "-qq",
        "-e",
        "trace=openat,rename,renameat,renameat2,mkdir,unlink,link",
        "-o",
        str(trace),
        *args,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = trace.read_text().splitlines()
    assert any("train/shard_00001.h5" in ln for ln in lines), "rank 1 did not run under strace"
    writes = [
        ln
        for ln in lines
        if str(run_dir) in ln
        and (
            "O_WRONLY" in ln
            or "O_RDWR" in ln
            or "O_CREAT" in ln
            or "rename" in ln
            or "mkdir(" in ln
            or "unlink" in ln
            or "link(" in ln
        )
    ]
    assert writes == [], writes[:5]
    assert (run_dir / "checkpoints" / "latest.json").is_file()  # rank 0 did write


def test_resume_after_kill_continues_with_optimizer_state(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *TINY,
        "--data",
        str(tiny_dataset),
        "--out",
        str(run_dir),
        "--epochs",
        "6",
        "--checkpoint-every",
        "1",
        "--early-stop-patience",
        "0",
    ]
    cmd = [*MPIRUN, PYTHON, "-m", "train.train", *args]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    latest = run_dir / "checkpoints" / "latest.json"
    deadline = time.time() + 400
    record = None
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file():
            record = json.loads(latest.read_text())
            if record["epoch"] >= 2:
                break
        time.sleep(0.2)
    assert proc.poll() is None, "training ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the job hits its walltime
    proc.wait(timeout=60)
    # OpenMPI starts the ranks in process groups of their own: they die when they notice that
    # mpirun is gone, and a rank may still finish a checkpoint meanwhile. Read what survived
    # once none of them runs (under load, reading earlier missed a checkpoint written later).
    deadline = time.time() + 60
    pgrep = ["pgrep", "-f", "--", f"--out {run_dir}"]
    while (found := subprocess.run(pgrep, capture_output=True)).returncode == 0:
        assert time.time() < deadline, "ranks still running a minute after the kill"
        time.sleep(0.2)
    assert found.returncode == 1, found.stderr  # 1: no such process (2 would be a pgrep error)
    record = json.loads(latest.read_text())  # what survived the kill
    killed_at = record["epoch"]
    assert 2 <= killed_at < 6
    assert len(_history(run_dir)) >= killed_at

    # the resumed session changes a training option: config.json keeps the earlier one's
    resumed = _train(MPIRUN, *args, "--resume", "--plateau-factor", "0.5", "--keep-every", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    match = re.search(
        r"resuming .* at epoch (\d+) \(optimizer iterations (\d+), optimizer "
        r"state digest (\w+)\)",
        resumed.stdout,
    )
    assert match, resumed.stdout[-2000:]
    assert int(match.group(1)) == killed_at + 1
    assert int(match.group(2)) == record["optimizer_iterations"] > 0
    assert record["optimizer_digest"].startswith(match.group(3))
    final = json.loads(latest.read_text())
    assert final["epoch"] == 6
    steps = json.loads((run_dir / "config.json").read_text())["steps_per_epoch"]
    assert final["optimizer_iterations"] == 6 * steps  # the step counter carried over
    epochs = [int(row["epoch"]) for row in _history(run_dir)]
    assert epochs[-(6 - killed_at) :] == list(range(killed_at, 6))
    # --keep-every 2 kept the even epochs of the resumed session (for train.select_checkpoint)
    kept = sorted(p.name for p in (run_dir / "checkpoints" / "epochs").iterdir())
    assert kept == [f"epoch_{e:04d}.weights.h5" for e in range(killed_at + 1, 7) if e % 2 == 0]
    assert (run_dir / "checkpoints" / "epochs" / "epoch_0006.weights.h5").read_bytes() == (
        run_dir / "checkpoints" / "latest.weights.h5"
    ).read_bytes()

    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["plateau_factor"] == 0.5 and config["train"]["resume"]
    [earlier] = config["earlier_sessions"]
    assert earlier["epochs_done"] == killed_at
    assert earlier["train"]["plateau_factor"] == 0.95 and not earlier["train"]["resume"]
    info = (run_dir / "basic_info.txt").read_text()
    assert f"earlier session: until epoch {killed_at}, with plateau_factor 0.95 " in info

    # the killed session wrote no summary.json, but its time is counted (from its checkpoint)
    assert record["sessions"] == 1 and record["train_seconds"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sessions"] == 2 == final["sessions"]
    assert summary["train_seconds"] > final["train_seconds"] > record["train_seconds"]
    assert "over 2 sessions (resumed)" in info


def test_resume_without_checkpoint_and_rerun_without_resume_are_errors(tiny_dataset, tmp_path):
    proc = _train([], *TINY, "--data", tiny_dataset, "--out", tmp_path / "none", "--resume")
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr


def test_unequal_shards_fail_clearly_not_hang(tiny_dataset, tmp_path):
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(tiny_dataset, broken)
    shard = broken / "train" / "shard_00001.h5"
    with h5py.File(shard, "r") as h5:
        data = {k: h5[k][()] for k in h5}
    tmp = shard.with_suffix(".new")
    with h5py.File(tmp, "w") as h5:
        for key, value in data.items():
            h5.create_dataset(key, data=value[: len(value) // 2])
    os.replace(tmp, shard)
    manifest = json.loads((broken / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][1]
    entry["sha256"] = sha256_file(shard)
    entry["n_samples"] = len(data["images"]) // 2
    write_json_atomic(manifest, broken / "manifest.json")
    started = time.time()
    proc = _train(
        MPIRUN, *TINY, "--data", broken, "--out", tmp_path / "run", "--epochs", "1", timeout=180
    )
    assert proc.returncode != 0
    assert "ranks disagree on steps per epoch" in proc.stderr, proc.stderr[-2000:]
    assert time.time() - started < 180
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_more_ranks_than_shards_and_corrupt_shard_fail_clearly(tiny_dataset, tmp_path):
    proc = _train(
        ["mpirun", "-np", "3", "--oversubscribe"],
        *TINY,
        "--data",
        tiny_dataset,
        "--out",
        tmp_path / "run",
        "--epochs",
        "1",
        timeout=180,
    )
    assert proc.returncode != 0 and "3 ranks but the train split has only 2 shards" in proc.stderr

    import shutil

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_dataset, corrupt)
    shard = corrupt / "val" / "shard_00000.h5"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = _train([], *TINY, "--data", corrupt, "--out", tmp_path / "run2", "--epochs", "1")
    assert proc.returncode == 2 and "val/shard_00000.h5: SHA-256 differs" in proc.stderr


def test_amp_and_xla_paths_run_on_cpu(tiny_dataset, tmp_path):
    proc = _train(
        [],
        *TINY,
        "--data",
        tiny_dataset,
        "--out",
        tmp_path / "run",
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--amp",
        "--xla",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["devices"]["amp"] and config["devices"]["xla"]
    assert np.isfinite(_history(tmp_path / "run")[0]["loss"])


def test_help_lists_options():
    text = run_module("train.train", "--help").stdout
    for option in ("--resume", "--amp", "--xla", "--class-factors", "--tumor-factor", "--loss"):
        assert option in text
    assert "--mix-data" in text and "--mix-fraction" in text


@pytest.mark.parametrize(
    "extra",
    [
        ["--mix-data", "other"],
        ["--mix-fraction", "0.3"],
        ["--mix-data", "o", "--mix-fraction", "1"],
    ],
)
def test_mix_options_go_together_and_take_a_fraction(extra, capsys):
    from train.config import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(["--model", "unet2d", "--data", "d", "--out", "o", *extra])
    assert exc.value.code == 2 and "--mix-" in capsys.readouterr().err
    cfg = parse_args(["--model", "unet2d", "--data", "d", "--out", "o", "--mix-data", "m",
                      "--mix-fraction", "0.3"])  # fmt: skip
    assert (cfg.mix_data, cfg.mix_fraction) == ("m", 0.3)


def test_bn_momentum_option_sets_every_batchnorm_layer():
    import tf_keras as keras

    import models
    from train.config import build_parser
    from train.train import set_bn_momentum

    args = ["--model", "unet2d", "--data", "d", "--out", "o"]
    assert build_parser().parse_args([*args, "--bn-momentum", "0.9"]).bn_momentum == 0.9
    assert build_parser().parse_args(args).bn_momentum is None  # the layers' own default
    with pytest.raises(SystemExit):
        build_parser().parse_args([*args, "--bn-momentum", "1.0"])
    model = models.build("unet2d", (32, 32, 3), 3, base_filters=4)
    bn_layers = [layer for layer in model.layers if "BatchNormalization" in type(layer).__name__]
    assert bn_layers and all(layer.momentum == 0.99 for layer in bn_layers)
    assert set_bn_momentum(model, 0.9) == len(bn_layers)
    assert all(layer.momentum == 0.9 for layer in bn_layers)
    # a model nested inside another (e.g. a backbone) is reached as well
    outer_in = keras.Input((32, 32, 3))
    outer = keras.Model(outer_in, keras.layers.BatchNormalization()(model(outer_in)))
    assert set_bn_momentum(outer, 0.8) == len(bn_layers) + 1
    assert all(layer.momentum == 0.8 for layer in bn_layers)


def test_basic_info_names_what_each_earlier_session_changed():
    from train.config import parse_args
    from train.runtime import basic_info

    args = ["--model", "unet3d", "--data", "d", "--out", "o", "--batch-size", "1"]
    first = parse_args([*args, "--tumor-factor", "1"]).to_dict()
    second = {**first, "tumor_factor": 2.0, "resume": True, "time_limit": 600.0}
    third = {**second, "time_limit": 900.0}  # only a per-session option differs
    config = {
        "model": "unet3d", "n_params": 1, "input_shape": [32, 128, 128, 3],
        "model_options": {}, "n_ranks": 2, "lr_multiplier": 2, "effective_lr": 6e-4,
        "class_weights": [0.3, 30.0, 100.0], "versions": {},
        "dataset": {
            "dir": "d", "kind": "blocks", "image_size": 128, "block_depth": 32,
            "block_overlap": 12, "manifest_sha256": "0" * 64, "channels": 3,
            "normalization": {"hu_min": -512.0, "hu_max": 512.0},
        },
        "train": third,
        "earlier_sessions": [
            {"epochs_done": 5, "train": first},
            {"epochs_done": 9, "train": second},
        ],
    }  # fmt: skip
    lines = basic_info(config, {"sessions": 3}).splitlines()
    earlier = [line for line in lines if line.startswith("earlier session:")]
    assert earlier == [
        "earlier session: until epoch 5, with tumor_factor 1.0 (then changed)",
        "earlier session: until epoch 9, with the same options",
    ]


def _val_predictions_by_rank(run_dir: Path, dataset: Path, batch_size: int) -> np.ndarray:
    """Confusion matrix of the run's latest weights on every real val sample, predicted rank
    by rank in the batches validation used (same batch shapes, same floating-point sums)."""
    import models
    from train.metrics import np_confusion_matrix

    config = json.loads((run_dir / "config.json").read_text())
    model = models.build(
        config["model"],
        tuple(config["input_shape"]),
        config["n_classes"],
        **config["model_options"],
    )
    model.load_weights(str(run_dir / "checkpoints" / "latest.weights.h5"))
    cm = np.zeros((3, 3), np.int64)
    shards = sorted((dataset / "val").glob("shard_*.h5"))
    for rank in (0, 1):  # rank r reads shards r, r + 2, ...
        parts = []
        for shard in shards[rank::2]:
            with h5py.File(shard) as h5:
                real = ~h5["is_padding"][()]
                parts.append((h5["images"][()][real], h5["masks"][()][real]))
        images = np.concatenate([p[0] for p in parts])
        masks = np.concatenate([p[1] for p in parts])
        x = np.repeat((images.astype(np.float32) / 255.0)[..., None], 3, axis=-1)
        predicted = model.predict(x, batch_size=min(batch_size, len(x)), verbose=0).argmax(-1)
        cm += np_confusion_matrix(masks, predicted)
    return cm


def test_validation_metrics_pool_one_confusion_matrix_over_ranks(tiny_dataset, tmp_path):
    """On 2 ranks the monitored val scores are those of one confusion matrix over every real
    val sample of both ranks, the same as NumPy computes from the run's weights; Horovod's
    metric averaging does not touch them. In 4 shards the 14 val samples come with 2 padding
    repeats (left out), and the real ones do not fill whole batches of 4 on every rank (the
    partial last batch counts)."""
    from train.metrics import np_dice_per_class, np_weighted_jaccard_from_confusion

    dataset = tmp_path / "four_shards"
    preprocess_small(tiny_dataset.parent / "kits", dataset, shards=4)
    manifest = json.loads((dataset / "manifest.json").read_text())
    val = manifest["splits"]["val"]
    assert (val["n_samples"], val["n_real_samples"]) == (16, 14)
    run_dir = tmp_path / "run"
    proc = _train(MPIRUN, *TINY, "--data", dataset, "--out", run_dir, "--epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [row] = _history(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["validation_steps"] == 2
    cm = _val_predictions_by_rank(run_dir, dataset, batch_size=4)
    assert cm.sum() == 14 * 32 * 32
    weights = config["class_weights"]
    assert row["val_weighted_jaccard"] == pytest.approx(
        np_weighted_jaccard_from_confusion(cm, weights), abs=1e-6
    )
    dice = np_dice_per_class(cm)
    assert row["val_dice_kidney"] == pytest.approx(dice[1], abs=1e-6)
    assert row["val_dice_tumor"] == pytest.approx(dice[2], abs=1e-6)
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert best["value"] == pytest.approx(row["val_weighted_jaccard"], abs=1e-6)


@pytest.fixture(scope="module")
def second_dataset(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("mix_data")
    kits = write_simple_kits(base / "kits", list(range(8)), n_slices=20, size=64, seed=7)
    return preprocess_small(kits, base / "slices32")


def test_mix_data_gives_the_stated_fraction_per_epoch(tiny_dataset, second_dataset, tmp_path):
    run_dir = tmp_path / "run"
    proc = _train(
        MPIRUN,
        *TINY,
        "--data",
        tiny_dataset,
        "--out",
        run_dir,
        "--epochs",
        "2",
        "--record-samples",
        "--mix-data",
        second_dataset,
        "--mix-fraction",
        "0.25",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["mix_fraction"] == 0.25
    assert (run_dir / config["mix_dataset"]["dir"]).resolve() == second_dataset.resolve()
    assert config["mix_dataset"]["manifest_sha256"] == sha256_file(second_dataset / "manifest.json")
    per_epoch = config["steps_per_epoch"] * 4  # samples per rank
    samples = json.loads((run_dir / "samples.json").read_text())
    assert sorted(samples) == ["1", "2"]
    for r in (0, 1):
        with h5py.File(second_dataset / "train" / f"shard_0000{r}.h5") as h5:
            mix_own = set(h5["sample_ids"][()].tolist())
        for epoch in ("1", "2"):
            mixed, own = samples[epoch]["mix"][str(r)], samples[epoch][str(r)]
            assert len(mixed) + len(own) == per_epoch
            assert len(mixed) == round(0.25 * per_epoch)
            assert set(mixed) <= mix_own  # each rank reads its own shard of the second set
    assert samples["1"]["mix"]["0"] != samples["2"]["mix"]["0"]

    # a second dataset preprocessed differently is refused before training
    import shutil

    other = tmp_path / "other"
    shutil.copytree(second_dataset, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["normalization"]["hu_min"] = -79.0
    write_json_atomic(manifest, other / "manifest.json")
    args = ("--data", tiny_dataset, "--out", tmp_path / "run2", "--epochs", "1")
    proc = _train([], *TINY, *args, "--mix-data", other, "--mix-fraction", "0.5")
    assert proc.returncode == 2 and f"--mix-data {other}: normalization" in proc.stderr


def _h5_arrays(path: Path) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    with h5py.File(path) as h5:
        h5.visititems(
            lambda name, obj: (
                arrays.update({name: obj[()]}) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return arrays


def test_init_weights_fine_tunes_from_another_run(tiny_dataset, tmp_path):
    common = [*TINY, "--data", tiny_dataset, "--max-steps", "1", "--early-stop-patience", "0"]
    first = _train([], *common, "--out", tmp_path / "a", "--epochs", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    weights = tmp_path / "a" / "checkpoints" / "latest.weights.h5"
    # one step at a vanishing learning rate: the kernels stay those of run a
    tuned = _train(
        [], *common, "--out", tmp_path / "b", "--epochs", "1", "--lr", "1e-30",
        "--warmup-epochs", "0", "--init-weights", weights,
    )  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    start = _h5_arrays(weights)
    after = _h5_arrays(tmp_path / "b" / "checkpoints" / "latest.weights.h5")
    kernels = [name for name in start if "conv" in name and name.endswith("/vars/0")]
    assert kernels and start.keys() == after.keys()
    for name in kernels:
        np.testing.assert_allclose(after[name], start[name], atol=1e-6, err_msg=name)
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["init_weights_sha256"] == sha256_file(weights)
    assert config["train"]["init_weights"] == str(weights)

    wider = [a if a != "base_filters=4" else "base_filters=8" for a in common]
    misfit = _train([], *wider, "--out", tmp_path / "c", "--epochs", "1", "--init-weights", weights)
    assert misfit.returncode == 2 and f"--init-weights {weights}: does not fit" in misfit.stderr
    missing = _train([], *common, "--out", tmp_path / "d", "--init-weights", tmp_path / "no.h5")
    assert missing.returncode == 2 and "no.h5: file not found" in missing.stderr

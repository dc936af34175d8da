"""scripts/compare_models.sh (QUICK=1: all seven models, real mpirun) and train.compare."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

import models
from tests.conftest import PYTHON, ROOT, run_env, run_module, write_simple_kits
from train import compare

RUN_FILES = ("config.json", "basic_info.txt", "history.csv", "evaluation/metrics.json")
NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?( s| min| h \d\d min)?$")


def run_script(out: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**run_env(), "QUICK": "1", "OUT": str(out), "PY": PYTHON, **env}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "compare_models.sh")],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, (
        f"compare_models.sh exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
        f"stderr:\n{proc.stderr[-4000:]}"
    )
    return proc


def table_rows(markdown: str) -> dict[str, list[str]]:
    """Table rows by model registry name (the one in backquotes in the first cell)."""
    rows = {}
    for line in markdown.splitlines():
        match = re.match(r"^\| [^|]*\(`(\w+)`\) \|", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in line.strip("|").split("|")]
    return rows


def test_quick_comparison_trains_evaluates_and_tabulates_all_seven(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    volumes = write_simple_kits(tmp_path / "volumes", [7], n_slices=20, size=64)
    start = time.monotonic()
    run_script(out, REAL_VOLUMES=str(volumes))
    print(f"QUICK=1 comparison of seven models: {time.monotonic() - start:.0f} s")

    for name in models.MODEL_NAMES:
        run = out / name
        for file in RUN_FILES:
            assert (run / file).is_file(), f"{run / file} missing"
        config = json.loads((run / "config.json").read_text())
        assert config["model"] == name and config["n_ranks"] == 2
        assert len((run / "history.csv").read_text().splitlines()) == 1 + 2  # header + 2 epochs
        metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
        assert metrics["volumes"]["cases"] == ["case_00005"]  # the held-out synthetic case
        if name != "unet3d":  # real CT: single slices, 2D models only
            real = json.loads((run / "evaluation_real" / "metrics.json").read_text())
            assert real["volumes"]["n_cases"] == 10 and real["dataset"] is None
        volume = json.loads((run / "evaluation_volume" / "metrics.json").read_text())
        assert volume["volumes"]["cases"] == ["case_00007"] and volume["dataset"] is None
    assert (out / "unet3d" / "selection.json").is_file()
    assert not (out / "unet3d" / "evaluation_real").exists()

    rows = table_rows((out / "results.md").read_text())
    assert sorted(rows) == sorted(models.MODEL_NAMES)
    header = [c for c, _ in compare.COLUMNS]
    for name, cells in rows.items():
        assert len(cells) == len(header)
        by_column = dict(zip(header, cells, strict=True))
        numeric = ["Parameters", "Training samples", "CT slices seen", "Wall time", "Samples/s"]
        numeric += ["JC_w synthetic", "Kidney+tumor Dice synthetic", "JC_w thesis"]
        numeric += ["Kidney Dice real volume"]
        if name != "unet3d":
            numeric += ["Kidney+tumor Dice real"]
        for column in numeric:
            assert NUMBER.match(by_column[column]), f"{name}: {column} = {by_column[column]!r}"
        assert by_column["JC_w thesis"] == f"{models.spec(name).thesis_jc_w:.4f}"
    # 2 epochs x 2 steps x batch 4 x 2 ranks; a Unet3D block covers 8 slices
    assert rows["unet2d"][3] == rows["unet2d"][4] == "32"
    assert rows["unet3d"][3] == "8" and rows["unet3d"][4] == "64"

    # Started again with a budget of 48 CT slices: 3 epochs of 2 steps x batch 4 x 2 ranks for
    # Unet2D, which resumes; 2 epochs of 2 steps x 1 block of 8 slices x 2 ranks for Unet3D,
    # which it has already: neither trained nor evaluated again.
    again = run_script(out, MODELS="unet2d,unet3d", EPOCHS="", SAMPLES="48")
    assert "unet3d: 2 of 2 epochs trained already" in again.stdout
    assert f"{out / 'unet3d' / 'evaluation'} is up to date" in again.stdout
    history = (out / "unet2d" / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["0", "1", "2"]
    assert json.loads((out / "unet2d" / "config.json").read_text()).get("earlier_sessions")
    # what is evaluated is the best weights: evaluated anew only when epoch 3 replaced them
    best = (out / "unet2d" / "checkpoints" / "best.weights.h5").stat().st_mtime
    for folder in ("evaluation", "evaluation_real"):
        assert (out / "unet2d" / folder / "metrics.json").stat().st_mtime > best


def write_run(
    run: Path, *, block_depth: int | None = None, real: bool = True, volume: bool = False
) -> None:
    """A run folder with the files train.train and train.evaluate write, trimmed to what the
    table reads."""
    (run / "checkpoints").mkdir(parents=True)
    config = {
        "model": run.name,
        "model_options": {"l2": 1e-4, "width": 0.5},
        "n_params": 1234,
        "n_ranks": 2,
        "steps_per_epoch": 5,
        "train": {"batch_size": 4},
        "dataset": {"block_depth": block_depth},
    }
    (run / "config.json").write_text(json.dumps(config))
    latest = {"epoch": 3, "train_seconds": 60.0}
    (run / "checkpoints" / "latest.json").write_text(json.dumps(latest))
    metrics = {
        "thesis_jc_w": 0.8566,
        "dataset": {"weighted_jaccard": 0.5},
        "volumes": {
            "n_cases": 2,
            "kidney_dice_mean": 0.9,
            "headline": {"kidney_tumor_dice": 0.9, "tumor_dice": 0.4, "n_kidney": 2},
        },
    }
    (run / "evaluation").mkdir()
    (run / "evaluation" / "metrics.json").write_text(json.dumps(metrics))
    if real:
        # 4 slices, 1 with kidney: all background scores 0.75; this model 0.7 does not beat it
        _write_scores(
            run / "evaluation_real",
            n_cases=4,
            kidney_dice_mean=0.7,
            headline=0.6,
            empty_fp_rate=0.25,
        )
    if volume:
        # 1 volume with kidney: all background scores 0; this model 0.3 beats it
        _write_scores(run / "evaluation_volume", n_cases=1, kidney_dice_mean=0.3, headline=0.3)


def _write_scores(
    folder: Path,
    *,
    n_cases: int,
    kidney_dice_mean: float,
    headline: float,
    empty_fp_rate: float | None = None,
) -> None:
    """metrics.json of train.evaluate --volumes-only on real cases, one of them with kidney."""
    volumes = {
        "n_cases": n_cases,
        "kidney_dice_mean": kidney_dice_mean,
        "headline": {
            "kidney_tumor_dice": headline,
            "tumor_dice": None,
            "n_kidney": 1,
            "empty_fp_rate": empty_fp_rate,
        },
    }
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"dataset": None, "volumes": volumes}))


def test_table_counts_samples_slices_and_the_all_background_baseline(tmp_path: Path) -> None:
    write_run(tmp_path / "pspnet_s")
    write_run(tmp_path / "unet3d", block_depth=8, real=False, volume=True)
    out = tmp_path / "results.md"
    assert compare.main(["--runs", str(tmp_path), "--output", str(out)]) == 0
    text = out.read_text()
    rows = table_rows(text)
    assert sorted(rows) == ["pspnet_s", "unet3d"]
    # 3 epochs x 5 steps x batch 4 x 2 ranks = 120 samples in 60 s
    assert rows["pspnet_s"][1:8] == ["width=0.5", "1,234", "120", "120", "60 s", "2.00", "0.5000"]
    assert rows["pspnet_s"][10:] == ["0.6000", "-", "25 %", "-", "**no**", "0.8566"]
    assert rows["unet3d"][3:5] == ["120", "960"]
    assert rows["unet3d"][10:15] == ["-", "-", "-", "0.3000", "yes"]
    assert "all background scores a mean kidney+tumor Dice of 0.7500" in text
    assert "Not trained (no run folder with config.json): unet2d, pspnet_b" in text
    saved = json.loads(out.with_suffix(".json").read_text())
    by_model = {row["model"]: row for row in saved["rows"]}
    assert by_model["pspnet_s"]["beats_all_background_real"] is False
    assert by_model["unet3d"]["beats_all_background_real"] is True
    assert "Real volume: 1 whole CT volume(s)" in text


def test_table_command_fails_clearly_without_runs_or_on_a_broken_file(tmp_path: Path) -> None:
    proc = run_module("train.compare", "--runs", tmp_path, check=False)
    assert proc.returncode == 2 and f"{tmp_path}: no run folder" in proc.stderr
    (tmp_path / "unet2d").mkdir()
    (tmp_path / "unet2d" / "config.json").write_text("{not json")
    proc = run_module("train.compare", "--runs", tmp_path, check=False)
    assert proc.returncode == 2 and "unet2d/config.json: not readable JSON" in proc.stderr
    proc = run_module("train.compare", "--runs", tmp_path, "--models", "unet9", check=False)
    assert proc.returncode == 2 and "unknown models" in proc.stderr


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("REAL_CT", "absent", "REAL_CT folder {tmp}/absent not found"),
        ("LABELS", "absent", "label maps folder {tmp}/absent not found"),
        ("MODELS", "unet2d,unet9", "MODELS: unknown unet9"),
    ],
)
def test_script_refuses_bad_settings_before_writing(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    env = {**run_env(), "OUT": str(tmp_path / "runs"), "PY": PYTHON}
    env[variable] = str(tmp_path / value) if value == "absent" else value
    env.pop("QUICK", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "compare_models.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message.format(tmp=tmp_path) in proc.stderr
    assert os.listdir(tmp_path) == []

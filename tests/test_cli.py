"""The installed console commands (pyproject.toml's [project.scripts]) work from any directory.

`make setup` installs the suite into .venv (`pip install -e . --no-deps`); these tests run the
scripts it put in .venv/bin, from a working directory outside the checkout, with no PYTHONPATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT

BIN = Path(sys.executable).parent
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def outside_env() -> dict[str, str]:
    """The environment of a user's shell: no PYTHONPATH pointing at the checkout."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    for key in list(env):
        if key.startswith(("OMPI_COMM_WORLD", "PMIX_", "PMI_")):
            env.pop(key)
    return env


def run_command(name: str, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    script = BIN / name
    assert script.is_file(), f"{script} is missing: run `make setup` (pip install -e .)"
    proc = subprocess.run(
        [str(script), *map(str, args)],
        cwd=cwd,
        env=outside_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        f"{name} {' '.join(map(str, args))} exited {proc.returncode} in {cwd}\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    return proc


def test_the_expected_commands_are_declared() -> None:
    expected = {
        "kits-synthetic",
        "kits-preprocess-2d",
        "kits-preprocess-3d",
        "kits-verify",
        "kits-train",
        "kits-evaluate",
        "kits-predict",
        "kits-select-checkpoint",
    }
    assert expected <= set(SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_runs_from_another_directory(name: str, tmp_path: Path) -> None:
    proc = run_command(name, "--help", cwd=tmp_path)
    assert proc.stdout.startswith("usage:"), proc.stdout[:500]
    assert list(tmp_path.iterdir()) == [], "--help wrote files"


def test_python_m_works_from_another_directory(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "preprocess.verify", "--help"],
        cwd=tmp_path,
        env=outside_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage:")


def test_synthetic_case_then_preprocess_and_verify_from_another_directory(
    tmp_path: Path, simple_kits: Path
) -> None:
    # relative output paths land in the working directory, not in the checkout
    run_command(
        "kits-synthetic", "--out", "kits", "--n-cases", "1", "--slices", "8", "--size", "64",
        "--quiet", cwd=tmp_path,
    )  # fmt: skip
    case = tmp_path / "kits" / "case_00000"
    assert (case / "imaging.nii.gz").is_file() and (case / "segmentation.nii.gz").is_file()

    run_command(
        "kits-preprocess-2d", "--kits", simple_kits, "--out", "slices32", "--image-size", "32",
        "--shards", "1", cwd=tmp_path,
    )  # fmt: skip
    assert (tmp_path / "slices32" / "manifest.json").is_file()
    proc = run_command("kits-verify", "slices32", cwd=tmp_path)
    assert "slices32" in proc.stdout + proc.stderr

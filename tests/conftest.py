"""Shared fixtures: paths, environment for real MPI runs, and tiny KiTS19-format datasets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# Real MPI/Horovod runs as root (CI, containers) need OpenMPI's explicit consent.
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # mpirun in a test must not inherit a parent's MPI identity (e.g. pytest under mpirun)
    for key in list(env):
        if key.startswith(("OMPI_COMM_WORLD", "PMIX_", "PMI_")):
            env.pop(key)
    return env


def run_module(
    module: str, *args: str, np_ranks: int = 0, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` (under ``mpirun -np N`` when np_ranks > 0)."""
    cmd = [PYTHON, "-m", module, *map(str, args)]
    if np_ranks:
        cmd = ["mpirun", "-np", str(np_ranks), "--oversubscribe", *cmd]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
        )
    return proc


def preprocess_small(
    kits: Path, out: Path, *extra: str, shards: int = 2, np_ranks: int = 0
) -> Path:
    """``python -m preprocess.downsample`` of ``kits`` into ``out``: 32x32 slices in ``shards``
    shards per split, the tests' usual small dataset. Returns ``out``."""
    run_module(
        "preprocess.downsample",
        "--kits",
        kits,
        "--out",
        out,
        "--shards",
        str(shards),
        "--image-size",
        "32",
        *extra,
        np_ranks=np_ranks,
    )
    return out


def write_simple_kits(
    folder: Path, case_ids: list[int], n_slices: int = 24, size: int = 64, seed: int = 0
) -> Path:
    """Tiny KiTS19-format cases: a kidney box with a small tumor, in noisy HU."""
    from preprocess.kits import write_case

    rng = np.random.default_rng(seed)
    for c in case_ids:
        seg = np.zeros((n_slices, size, size), np.uint8)
        z0 = 4 + c % 3
        seg[z0 : n_slices - 4, size // 4 : size // 2, size // 5 : size // 2] = 1
        if c % 4 != 3:  # some cases without tumor
            seg[z0 + 2 : z0 + 6, size // 3 : size // 3 + 4, size // 4 : size // 4 + 4] = 2
        img = rng.normal(40, 30, seg.shape) + 120.0 * (seg == 1) - 40.0 * (seg == 2)
        write_case(folder, c, img, seg, (2.5, 0.8, 0.8))
    return folder


@pytest.fixture(scope="session")
def simple_kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_simple_kits(tmp_path_factory.mktemp("kits_simple"), list(range(8)))

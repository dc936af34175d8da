"""The machine a benchmark ran on: CPU, memory, OS, package versions, MPI, git, load."""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Versions reported in the machine section, by distribution name (read from package metadata,
# so that a benchmark that never imports TensorFlow does not pay seconds to learn its version).
PACKAGES = {
    "tensorflow": "tensorflow",
    "tf_keras": "tf-keras",
    "horovod": "horovod",
    "numpy": "numpy",
    "opencv": "opencv-python-headless",
    "h5py": "h5py",
    "nibabel": "nibabel",
    "mpi4py": "mpi4py",
    "scipy": "scipy",
}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def cpu_info() -> dict[str, Any]:
    """CPU model and the core counts the OS reports and this process may use."""
    model = None
    mhz = None
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "cpu MHz" and mhz is None:
            with contextlib.suppress(ValueError):
                mhz = float(value)
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "model": model or platform.processor() or None,
        "mhz": mhz,
        "os_cpu_count": os.cpu_count(),
        "affinity": affinity,
        "affinity_count": len(affinity) if affinity is not None else None,
    }


def memory_info() -> dict[str, Any]:
    """MemTotal and MemAvailable from /proc/meminfo, in GiB."""
    values: dict[str, float] = {}
    for line in _read("/proc/meminfo").splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            with contextlib.suppress(ValueError, IndexError):
                values[key] = round(int(rest.split()[0]) / 2**20, 2)  # kB -> GiB
    return {"total_gib": values.get("MemTotal"), "available_gib": values.get("MemAvailable")}


def os_info() -> dict[str, Any]:
    pretty = None
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            pretty = line.split("=", 1)[1].strip().strip('"')
    return {"name": pretty, "platform": platform.platform(), "kernel": platform.release()}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for key, dist in PACKAGES.items():
        try:
            versions[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[key] = None
    return versions


def mpi_version() -> str | None:
    """First line of ``mpirun --version`` (e.g. "mpirun (Open MPI) 4.1.4"), None without MPI."""
    if shutil.which("mpirun") is None:
        return None
    try:
        out = subprocess.run(
            ["mpirun", "--version"], capture_output=True, text=True, timeout=30, env=child_env()
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def git_info() -> dict[str, Any]:
    """HEAD's commit and whether the work tree differs from it (results of a dirty tree say so)."""

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: a busy machine explains noisy numbers."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """Everything about the machine and software a result depends on."""
    return {
        "hostname": platform.node(),
        "cpu": cpu_info(),
        "memory": memory_info(),
        "os": os_info(),
        "versions": package_versions(),
        "mpi": mpi_version(),
        "git": git_info(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "load_average_start": load_average(),
    }


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for commands run by a benchmark: the repository importable, Keras 2, quiet
    TensorFlow, OpenMPI allowed as root, and no MPI identity inherited from a parent run."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    for key in list(env):
        if key.startswith(("OMPI_COMM_WORLD", "PMIX_", "PMI_")):
            env.pop(key)
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("TF_USE_LEGACY_KERAS", "1")
    env.update(extra or {})
    return env

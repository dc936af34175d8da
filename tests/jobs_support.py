"""Helpers for the job-template tests (tests/test_jobs_pbs.py, tests/test_jobs_slurm.py).

Tiny datasets, a "submit directory" sandbox that looks like a checkout of the suite, the PBS Pro
job environment (no PBS server can be installed here: the script body runs under bash with the
variables PBS sets), and ``#PBS`` directive parsing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PYTHON, ROOT, run_env, run_module, write_simple_kits

JOBS = ROOT / "jobs"
PBS_TEMPLATES = ["train_unet3d.pbs", "train_unet2d.pbs", "preprocess.pbs", "evaluate.pbs"]
SLURM_TEMPLATES = [t.replace(".pbs", ".slurm") for t in PBS_TEMPLATES]
# The smallest training that still exercises the whole path (2 ranks, checkpoints, validation).
TINY_TRAIN = {
    "EPOCHS": "1",
    "BATCH": "2",
    "EXTRA_ARGS": "--model-option base_filters=4 --max-steps 2 --warmup-epochs 0 --workers 1",
}


def require_suite_modules(*modules: str) -> None:
    """Fail (not skip) with a clear message when a module the job templates run is missing."""
    missing = [m for m in modules if not (ROOT / (m.replace(".", "/") + ".py")).is_file()]
    if missing:
        pytest.fail(
            f"the job templates run {', '.join('python -m ' + m for m in missing)}, "
            f"which do(es) not exist in {ROOT}: these tests cannot pass without them"
        )


# --- data -------------------------------------------------------------------------------------
def make_kits(folder: Path, n_cases: int = 8) -> Path:
    """A tiny KiTS19-format folder: preprocess.synthetic if the suite has it, else simple boxes."""
    synthetic = ROOT / "preprocess" / "synthetic"
    if synthetic.with_suffix(".py").is_file() or (synthetic / "__main__.py").is_file():
        run_module(
            "preprocess.synthetic", "--n-cases", n_cases, "--slices", "24", "--size", "128",
            "--out", folder, "--seed", "0", "--quiet",
        )  # fmt: skip
    else:
        write_simple_kits(folder, list(range(n_cases)), n_slices=24, size=64)
    return folder


def make_dataset(kits: Path, out: Path, kind: str = "slices", shards: int = 2) -> Path:
    module = "preprocess.downsample" if kind == "slices" else "preprocess.blocks"
    extra = ["--depth", "8", "--overlap", "4"] if kind == "blocks" else []
    run_module(
        module, "--kits", kits, "--out", out, "--shards", shards, "--image-size", "32",
        *extra, "--quiet",
    )  # fmt: skip
    return out


_SHARED: dict[str, Path] = {}


def shared_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """KiTS19 cases and three datasets made from them, built once per test session:
    ``slices`` (2 shards), ``slices4`` (4 shards), ``blocks`` (2 shards, 8-slice blocks)."""
    if not _SHARED:
        base = tmp_path_factory.mktemp("job_data")
        kits = make_kits(base / "kits")
        _SHARED.update(
            kits=kits,
            slices=make_dataset(kits, base / "slices", "slices", 2),
            slices4=make_dataset(kits, base / "slices4", "slices", 4),
            blocks=make_dataset(kits, base / "blocks", "blocks", 2),
        )
    return dict(_SHARED)


def corrupt_shard(dataset: Path, dest: Path) -> Path:
    """A copy of ``dataset`` whose second train shard has bytes flipped (fails the checksum)."""
    shutil.copytree(dataset, dest)
    shard = sorted((dest / "train").glob("*.h5"))[-1]
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    shard.write_bytes(bytes(data))
    return dest


# --- sandbox: a submit directory holding the suite --------------------------------------------
def make_submit_dir(folder: Path) -> Path:
    """A folder that looks like a checkout with `make setup` done (symlinks into the repository):
    the templates must find jobs/common.sh, the code and .venv relative to it, as on a cluster."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("jobs", "preprocess", "models", "train", ".venv"):
        link = folder / name
        if not link.exists():
            link.symlink_to(ROOT / name)
    return folder


def job_env(**extra: str | Path) -> dict[str, str]:
    """The environment a batch job starts with: no scheduler identity, no PYTHONPATH (the
    template must set up the suite itself)."""
    env = run_env()
    env.pop("PYTHONPATH", None)
    for key in list(env):
        if key.startswith(("PBS_", "SLURM_", "SBATCH_", "SRUN_")) or key in (
            "SCRATCHDIR", "NCPUS", "CUDA_VISIBLE_DEVICES", "SUITE_DIR", "IMAGE", "RANKS",
        ):  # fmt: skip
            env.pop(key)
    env.update({k: str(v) for k, v in extra.items()})
    return env


# --- PBS Pro ----------------------------------------------------------------------------------
class PbsJob:
    """One PBS job: the template body run by bash the way PBS Pro runs it (a spooled copy of the
    script, started in $HOME, with PBS_JOBID, PBS_O_WORKDIR, PBS_NODEFILE, SCRATCHDIR, NCPUS)."""

    counter = 0

    def __init__(
        self,
        tmp: Path,
        template: str,
        submit_dir: Path,
        nodes: tuple[str, ...] = ("localhost", "localhost"),
        ncpus: int = 2,
        **env: str | Path,
    ):
        PbsJob.counter += 1
        self.job_id = f"{4000 + PbsJob.counter}.pbs-test"
        self.dir = tmp / f"pbs-{PbsJob.counter}"
        for sub in ("spool", "home", "scratch"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.scratch = self.dir / "scratch"
        self.script = self.dir / "spool" / f"{self.job_id}.SC"
        shutil.copy(JOBS / template, self.script)
        nodefile = self.dir / "spool" / "nodefile"
        nodefile.write_text("".join(f"{n}\n" for n in nodes))
        self.env = job_env(
            PBS_JOBID=self.job_id,
            PBS_JOBNAME=template,
            PBS_O_WORKDIR=submit_dir,
            PBS_NODEFILE=nodefile,
            PBS_ENVIRONMENT="PBS_BATCH",
            SCRATCHDIR=self.scratch,
            NCPUS=str(ncpus),
            HOME=self.dir / "home",
            **env,
        )

    def run(self, timeout: float = 600) -> subprocess.CompletedProcess:
        t0 = time.monotonic()
        proc = subprocess.run(
            ["bash", str(self.script)],
            cwd=self.dir / "home",
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # -j oe
            text=True,
            timeout=timeout,
        )
        proc.elapsed = time.monotonic() - t0  # type: ignore[attr-defined]
        return proc

    def start(self) -> subprocess.Popen:
        return subprocess.Popen(
            ["bash", str(self.script)],
            cwd=self.dir / "home",
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )


def wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float) -> list[str]:
    """Read ``proc``'s output until a line matches ``pattern``; returns the lines read."""
    import selectors

    lines: list[str] = []
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(timeout=1):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if re.search(pattern, line):
                return lines
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{''.join(lines)}")


def pbs_directives(path: Path) -> list[tuple[str, str]]:
    """(option, value) of each ``#PBS`` line of the header (before the first command)."""
    out = []
    for line in path.read_text().splitlines()[1:]:
        if line.startswith("#PBS"):
            parts = line[4:].split(None, 1)
            out.append((parts[0], parts[1].strip() if len(parts) > 1 else ""))
        elif line.strip() and not line.startswith("#"):
            break
    return out


def slurm_directives(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            out.append(line[len("#SBATCH") :].split("#")[0].strip())
        elif line.strip() and not line.startswith("#"):
            break
    return out


def read_json(path: Path):
    import json

    return json.loads(path.read_text())


__all__ = ["PYTHON", "ROOT"]

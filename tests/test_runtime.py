"""train.runtime: what a rank sets up before training (here: OpenMPI's waiting on CPU)."""

from __future__ import annotations

import re
import subprocess

from conftest import PYTHON, ROOT, run_env

from train.runtime import YIELD_WHEN_IDLE, cpu_mpi_environment

# Prints the value OpenMPI itself uses (a global of libmpi, loaded by Horovod) on each rank.
YIELD_PROBE = """
import ctypes, sys
from train.hvd_compat import hvd
if sys.argv[1] == "suite":
    from train.runtime import init_horovod
    init_horovod()
else:
    hvd.init()
flag = ctypes.c_bool.in_dll(ctypes.CDLL("libmpi.so.40"), "ompi_mpi_yield_when_idle")
print(f"rank {hvd.rank()} yield {int(flag.value)}", flush=True)
"""


def test_cpu_mpi_environment_sets_yield_and_keeps_a_given_value() -> None:
    env: dict[str, str] = {}
    cpu_mpi_environment(env)
    assert env == {YIELD_WHEN_IDLE: "1"}
    env = {YIELD_WHEN_IDLE: "0"}
    cpu_mpi_environment(env)
    assert env == {YIELD_WHEN_IDLE: "0"}


def _yield_flags(how: str, extra_env: dict[str, str]) -> list[str]:
    """Each rank's ompi_mpi_yield_when_idle under a real 2-rank mpirun (2 slots, so OpenMPI
    does not turn yielding on by itself as it does for more ranks than slots)."""
    env = run_env()
    env.pop(YIELD_WHEN_IDLE, None)
    env.update(extra_env)
    cmd = ["mpirun", "-np", "2", "--host", "localhost:2", PYTHON, "-c", YIELD_PROBE, how]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # searched, not split into lines: mpirun forwards each rank's output as it comes, and one
    # rank's text can land before the other's newline
    return sorted(re.findall(r"rank \d+ yield \d+", proc.stdout))


def test_cpu_ranks_make_openmpi_yield_while_waiting() -> None:
    # plain hvd.init(): OpenMPI busy-polls (the default this guards against)
    assert _yield_flags("plain", {}) == ["rank 0 yield 0", "rank 1 yield 0"]
    # the suite's init_horovod on a machine without a GPU: MPI_Init saw the setting
    assert _yield_flags("suite", {}) == ["rank 0 yield 1", "rank 1 yield 1"]
    # a value the user gave is kept
    flags = _yield_flags("suite", {YIELD_WHEN_IDLE: "0"})
    assert flags == ["rank 0 yield 0", "rank 1 yield 0"]

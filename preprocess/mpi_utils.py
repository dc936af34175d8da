"""A light MPI layer: mpi4py's COMM_WORLD under an MPI launcher, a serial stand-in otherwise.

mpi4py is imported only when the process was started by an MPI launcher (mpirun, srun), so a
plain ``python -m preprocess.X`` starts fast and needs no MPI runtime.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in _LAUNCHER_VARS)


class SerialComm:
    """The subset of mpi4py's communicator API the suite uses, for one process."""

    rank = 0
    size = 1

    def Get_rank(self) -> int:  # noqa: N802 - mirrors mpi4py
        return 0

    def Get_size(self) -> int:  # noqa: N802 - mirrors mpi4py
        return 1

    def barrier(self) -> None:
        return None

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def gather(self, obj: Any, root: int = 0) -> list[Any]:
        return [obj]


class Comm:
    """Wraps mpi4py's communicator (or SerialComm) with the rank/size shorthands."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.rank: int = raw.Get_rank()
        self.size: int = raw.Get_size()

    def barrier(self) -> None:
        self.raw.barrier()

    def bcast(self, obj: Any) -> Any:
        return self.raw.bcast(obj, root=0)

    def allgather(self, obj: Any) -> list[Any]:
        return self.raw.allgather(obj)

    def any_error(self, message: str | None) -> list[str]:
        """Collective: every rank learns every rank's error (so no rank waits on a dead peer)."""
        return [m for m in self.raw.allgather(message) if m]


def get_comm() -> Comm:
    if launched_by_mpi():
        from mpi4py import MPI

        return Comm(MPI.COMM_WORLD)
    return Comm(SerialComm())


def setup_logging(name: str, comm: Comm, quiet: bool = False) -> logging.Logger:
    """The logger ``name`` of this process: info from rank 0 to stdout (none with ``quiet``),
    errors from every rank to stderr, prefixed by the rank when there are several."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    if comm.rank == 0 and not quiet:
        info = logging.StreamHandler(sys.stdout)
        info.addFilter(lambda record: record.levelno < logging.ERROR)
        info.setFormatter(logging.Formatter(f"[{name} %(asctime)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(info)
    errors = logging.StreamHandler(sys.stderr)
    errors.setLevel(logging.ERROR)
    prefix = f"[rank {comm.rank}] " if comm.size > 1 else ""
    errors.setFormatter(logging.Formatter(f"error: {prefix}%(message)s"))
    logger.addHandler(errors)
    return logger

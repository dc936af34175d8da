"""A light MPI layer: mpi4py's COMM_WORLD under an MPI launcher, a serial stand-in otherwise.

mpi4py is imported only when the process was started by an MPI launcher (mpirun, srun), so a
plain ``python -m preprocess.X`` starts fast and needs no MPI runtime.
"""

from __future__ import annotations

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

    def allreduce(self, obj: Any, op: Any = None) -> Any:
        return obj

    def Abort(self, code: int = 1) -> None:  # noqa: N802 - mirrors mpi4py
        sys.exit(code)


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

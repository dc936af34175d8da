"""Worker of ``bench.preprocess``: the bare load of KiTS19 cases, split over MPI ranks; and the
peak memory of every rank of a preprocessing command.

    mpirun -np N python -m bench._load_worker --kits DIR --cases 1,2,3 --claims NEW_DIR
    mpirun -np N python -m bench._load_worker --peak-of preprocess.downsample -- ARGS...

The first form loads each case's ``imaging.nii.gz`` and ``segmentation.nii.gz`` with nibabel into
numpy (``np.asarray(img.dataobj)``, the files' own voxel types) and nothing else. The cases are
shared exactly as preprocessing shares them (``preprocess.claims.claim_cases``: each rank takes
the next unclaimed case, largest imaging file first), so the two are compared on the same way
of splitting the work. The second form runs the module in this process on every rank, then
reports each rank's peak resident memory. Rank 0 prints one result line (see
``bench.common.emit_result``), with ``peak_rss_mib_per_rank`` in both forms.
"""

from __future__ import annotations

import argparse
import os
import resource
import runpy
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from bench.common import emit_result
from preprocess.claims import claim_cases, largest_first
from preprocess.kits import IMAGING, SEGMENTATION, case_folder, parse_case_list
from preprocess.mpi_utils import Comm, get_comm


def load_case_arrays(kits: Path, case_id: int) -> int:
    """Load both files of a case into memory; returns the bytes held (keeps the work honest)."""
    folder = case_folder(kits, case_id)
    total = 0
    for name in (IMAGING, SEGMENTATION):
        arr = np.asarray(nib.load(str(folder / name)).dataobj)
        total += arr.nbytes
    return total


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _bare_load(args: argparse.Namespace, comm: Comm) -> int:
    sizes = {c: (case_folder(args.kits, c) / IMAGING).stat().st_size for c in args.cases}
    if comm.rank == 0:
        args.claims.mkdir(parents=True)
    comm.barrier()  # start together: the time is that of the slowest rank's loads only
    t0 = time.perf_counter()
    mine, loaded = [], 0
    for _, case_id in claim_cases(largest_first(args.cases, sizes), args.claims):
        mine.append(case_id)
        loaded += load_case_arrays(args.kits, case_id)
    seconds = time.perf_counter() - t0
    per_rank = comm.raw.gather((seconds, mine, loaded, peak_rss_mib()), root=0)
    if comm.rank == 0:
        emit_result(
            {
                "ranks": comm.size,
                "seconds": max(r[0] for r in per_rank),
                "seconds_per_rank": [r[0] for r in per_rank],
                "cases_per_rank": [r[1] for r in per_rank],
                "bytes_per_rank": [r[2] for r in per_rank],
                "peak_rss_mib_per_rank": [r[3] for r in per_rank],
                "pid": os.getpid(),
            }
        )
    return 0


def _peak_of(module: str, module_args: list[str], comm: Comm) -> int:
    """Run ``python -m module module_args`` in this process; report every rank's peak memory."""
    sys.argv = [module, *module_args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    per_rank = comm.raw.gather((code, peak_rss_mib()), root=0)
    if comm.rank == 0:
        emit_result(
            {
                "ranks": comm.size,
                "module": module,
                "exit_codes": [r[0] for r in per_rank],
                "peak_rss_mib_per_rank": [r[1] for r in per_rank],
            }
        )
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench._load_worker", description=__doc__)
    p.add_argument("--kits", type=Path)
    p.add_argument("--cases", type=parse_case_list)
    p.add_argument("--claims", type=Path, help="new folder for the case claims")
    p.add_argument("--peak-of", metavar="MODULE", help="run MODULE (args after --)")
    p.add_argument("module_args", nargs=argparse.REMAINDER, help="-- ARGS of MODULE")
    args = p.parse_args(argv)
    comm = get_comm()
    if args.peak_of:
        module_args = args.module_args[1:] if args.module_args[:1] == ["--"] else args.module_args
        return _peak_of(args.peak_of, module_args, comm)
    if args.kits is None or args.cases is None or args.claims is None:
        p.error("--kits, --cases and --claims are required without --peak-of")
    return _bare_load(args, comm)


if __name__ == "__main__":
    sys.exit(main())

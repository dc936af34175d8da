"""Worker of ``bench.preprocess``: the bare load of KiTS19 cases, split over MPI ranks.

    mpirun -np N python -m bench._load_worker --kits DIR --cases 1,2,3 --claims NEW_DIR

Each rank loads its cases' ``imaging.nii.gz`` and ``segmentation.nii.gz`` with nibabel into
numpy (``np.asarray(img.dataobj)``, the files' own voxel types) and nothing else. The cases are
shared exactly as preprocessing shares them (``preprocess.pipeline.claim_cases``: each rank
takes the next unclaimed case, largest imaging file first), so the two are compared on the same
way of splitting the work.
Rank 0 prints one result line (see ``bench.common.emit_result``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from bench.common import emit_result
from preprocess.kits import IMAGING, SEGMENTATION, case_name, parse_case_list
from preprocess.mpi_utils import get_comm

# the pipeline's own way of sharing cases: the two cannot drift
from preprocess.pipeline import claim_cases, largest_first


def load_case_arrays(kits: Path, case_id: int) -> int:
    """Load both files of a case into memory; returns the bytes held (keeps the work honest)."""
    folder = kits / case_name(case_id)
    total = 0
    for name in (IMAGING, SEGMENTATION):
        arr = np.asarray(nib.load(str(folder / name)).dataobj)
        total += arr.nbytes
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench._load_worker", description=__doc__)
    p.add_argument("--kits", type=Path, required=True)
    p.add_argument("--cases", type=parse_case_list, required=True)
    p.add_argument("--claims", type=Path, required=True, help="new folder for the case claims")
    args = p.parse_args(argv)

    comm = get_comm()
    sizes = {c: (args.kits / case_name(c) / IMAGING).stat().st_size for c in args.cases}
    if comm.rank == 0:
        args.claims.mkdir(parents=True)
    comm.barrier()  # start together: the time is that of the slowest rank's loads only
    t0 = time.perf_counter()
    mine, loaded = [], 0
    for _, case_id in claim_cases(largest_first(args.cases, sizes), args.claims):
        mine.append(case_id)
        loaded += load_case_arrays(args.kits, case_id)
    seconds = time.perf_counter() - t0
    per_rank = comm.raw.gather((seconds, mine, loaded), root=0)
    if comm.rank == 0:
        emit_result(
            {
                "ranks": comm.size,
                "seconds": max(s for s, _, _ in per_rank),
                "seconds_per_rank": [s for s, _, _ in per_rank],
                "cases_per_rank": [m for _, m, _ in per_rank],
                "bytes_per_rank": [b for _, _, b in per_rank],
                "pid": os.getpid(),
            }
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

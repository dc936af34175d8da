"""3D block set: KiTS19 cases -> blocks of 32 slices (12 overlapping) at 128x128 -> sharded HDF5.

Run alone or under ``mpirun -np K`` (ranks split the cases, then the shards)::

    python -m preprocess.blocks --kits data/kits19 --out data/blocks32
    mpirun -np 4 python -m preprocess.blocks --kits data/kits19 --out data/blocks32 --depth 32
"""

from __future__ import annotations

import sys

from preprocess import pipeline

DESCRIPTION = __doc__.split("\n\n")[0] + (
    " Blocks cover each case's contiguous range of slices with kidney or tumor (a shorter range "
    "is widened with neighbouring slices); consecutive blocks share --overlap slices and the "
    "last block ends at the range's last slice. Written as equal-size HDF5 shards with a "
    "manifest.json."
)


def main(argv: list[str] | None = None) -> int:
    """The command line (also the ``kits-preprocess-3d`` entry point); returns the exit status."""
    return pipeline.main("blocks", "python -m preprocess.blocks", DESCRIPTION, argv)


if __name__ == "__main__":
    sys.exit(main())

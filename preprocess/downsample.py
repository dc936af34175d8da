"""2D slice set: KiTS19 cases -> 128x128 slices with kidney or tumor -> sharded HDF5.

Run alone or under ``mpirun -np K`` (ranks split the cases, then the shards)::

    python -m preprocess.downsample --kits data/kits19 --out data/slices128
    mpirun -np 4 python -m preprocess.downsample --kits data/kits19 --out data/slices128
"""

from __future__ import annotations

import sys

from preprocess import pipeline

DESCRIPTION = __doc__.split("\n\n")[0] + (
    " Slices are resized with OpenCV (area averaging for CT; area fractions with small-component "
    "rescue for masks), slices without kidney or tumor are dropped, cases are split into "
    "train/val/test and written as equal-size HDF5 shards with a manifest.json."
)


def main(argv: list[str] | None = None) -> int:
    """The command line (also the ``kits-preprocess-2d`` entry point); returns the exit status."""
    return pipeline.main("slices", "python -m preprocess.downsample", DESCRIPTION, argv)


if __name__ == "__main__":
    sys.exit(main())

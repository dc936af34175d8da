"""Preprocessing: KiTS19 case folders -> sharded HDF5 datasets (no TensorFlow here).

Every module is runnable as ``python -m preprocess.NAME``; MPI ranks (mpi4py) split the cases.
"""

__version__ = "0.1.0"  # the suite's version; pyproject.toml carries the same (tests check)

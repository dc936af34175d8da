"""Check a dataset folder against its manifest.json.

Verifies that every shard listed exists, its SHA-256 matches, it holds the recorded number of
samples with the same count in every shard of a split, its arrays have the expected shapes,
dtypes and labels, and that no unlisted shard lies beside them. Exit status 0 when the dataset
is intact, 1 when a problem was found (each one printed), 2 when the folder is not a dataset.

    python -m preprocess.verify data/slices128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np

from preprocess.dataset_format import (
    SHARD_FIELDS,
    SPLITS,
    DatasetError,
    load_manifest,
    sha256_file,
)


def verify(dataset_dir: str | Path, check_content: bool = True) -> list[str]:
    """Return the list of problems found (empty when the dataset is intact)."""
    root = Path(dataset_dir)
    manifest = load_manifest(root)
    problems: list[str] = []
    size = manifest["image_size"]
    depth = manifest.get("block_depth")
    sample_shape = (depth, size, size) if manifest["kind"] == "blocks" else (size, size)
    for split in SPLITS:
        info = manifest["splits"].get(split)
        if info is None:
            problems.append(f"manifest: split {split!r} missing")
            continue
        listed = {s["file"] for s in info["shards"]}
        folder = root / split
        if folder.is_dir():
            extra = sorted(p.name for p in folder.glob("*.h5") if p.name not in listed)
            problems += [f"{split}/{name}: shard not listed in the manifest" for name in extra]
        counts = {s["n_samples"] for s in info["shards"]}
        if len(counts) > 1:
            problems.append(f"{split}: shards of unequal size in the manifest: {sorted(counts)}")
        for shard in info["shards"]:
            path = folder / shard["file"]
            where = f"{split}/{shard['file']}"
            if not path.is_file():
                problems.append(f"{where}: missing")
                continue
            digest = sha256_file(path)
            if digest != shard["sha256"]:
                problems.append(
                    f"{where}: SHA-256 mismatch (file {digest[:12]}..., "
                    f"manifest {shard['sha256'][:12]}...): corrupted or modified"
                )
                continue
            if check_content:
                problems += _check_shard(path, where, shard["n_samples"], sample_shape)
    return problems


def _check_shard(path: Path, where: str, n_expected: int, sample_shape: tuple) -> list[str]:
    problems = []
    try:
        with h5py.File(path, "r") as h5:
            for key in SHARD_FIELDS:
                if key not in h5:
                    problems.append(f"{where}: dataset {key!r} missing")
                elif len(h5[key]) != n_expected:
                    problems.append(
                        f"{where}: {key} has {len(h5[key])} samples, manifest says {n_expected}"
                    )
            if problems:
                return problems
            for key in ("images", "masks"):
                ds = h5[key]
                if ds.shape[1:] != sample_shape or ds.dtype != np.uint8:
                    problems.append(
                        f"{where}: {key} is {ds.dtype}{ds.shape}, expected "
                        f"uint8 (n, {', '.join(map(str, sample_shape))})"
                    )
            if not problems and int(h5["masks"][()].max(initial=0)) > 2:
                problems.append(f"{where}: masks hold labels outside {{0,1,2}}")
    except OSError as exc:
        problems.append(f"{where}: unreadable HDF5: {exc}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m preprocess.verify",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dataset", help="dataset folder holding manifest.json")
    parser.add_argument(
        "--quick", action="store_true", help="checksums and counts only, do not open the shards"
    )
    args = parser.parse_args(argv)
    try:
        problems = verify(args.dataset, check_content=not args.quick)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in problems:
        print(f"FAIL {args.dataset}: {p}", file=sys.stderr)
    if problems:
        print(f"{args.dataset}: {len(problems)} problem(s) found", file=sys.stderr)
        return 1
    manifest = load_manifest(args.dataset)
    n = {s: manifest["splits"][s]["n_samples"] for s in SPLITS}
    print(
        f"{args.dataset}: OK ({manifest['kind']}, train {n['train']}, val {n['val']}, "
        f"test {n['test']} samples; all shard checksums match)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

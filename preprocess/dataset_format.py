"""The on-disk dataset format shared by preprocessing (writer) and training (reader).

See ARCHITECTURE.md for the layout. In short: ``DIR/manifest.json`` plus
``DIR/{train,val,test}/shard_NNNNN.h5``; every shard of a split holds exactly the same number of
samples (``images``/``masks`` uint8, one sample per HDF5 chunk), so each MPI rank reads its own
shard(s) and all ranks take the same number of steps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from preprocess.kits import atomic_path, sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
SHARD_FIELDS = (
    "images",
    "masks",
    "case_ids",
    "slice_index",
    "sample_ids",
    "has_tumor",
    "is_padding",
)


class DatasetError(ValueError):
    """A dataset folder that is missing, inconsistent with its manifest, or corrupt."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.h5"


def write_json_atomic(obj: Any, path: Path) -> None:
    tmp = atomic_path(path)
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_shard(
    path: Path,
    arrays: dict[str, np.ndarray],
    attrs: dict[str, Any],
    compression: str | None = None,
) -> str:
    """Write one shard atomically (temp name, then rename) and return its SHA-256.

    Datasets are chunked one sample per chunk, for per-sample reads. ``track_times=False``
    keeps the bytes a function of the content alone, so identical content gives identical
    checksums whatever the number of ranks that wrote it.
    """
    n = len(arrays["images"])
    for key in SHARD_FIELDS:
        if key not in arrays or len(arrays[key]) != n:
            raise ValueError(f"shard {path}: field {key!r} missing or of wrong length")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    try:
        with h5py.File(tmp, "w", track_order=False) as h5:
            for key in SHARD_FIELDS:
                data = np.ascontiguousarray(arrays[key])
                chunks = (1, *data.shape[1:]) if data.ndim > 1 else None
                h5.create_dataset(
                    key,
                    data=data,
                    chunks=chunks,
                    compression=compression if data.ndim > 1 else None,
                    track_times=False,
                )
            for key, value in attrs.items():
                h5.attrs[key] = value
        digest = sha256_file(tmp)
        os.replace(tmp, path)
        return digest
    finally:
        tmp.unlink(missing_ok=True)


def read_shard(path: str | Path, fields: Sequence[str] = SHARD_FIELDS) -> dict[str, np.ndarray]:
    """Read whole fields of a shard into memory."""
    try:
        with h5py.File(path, "r") as h5:
            return {key: h5[key][()] for key in fields}
    except (OSError, KeyError) as exc:
        raise DatasetError(f"{path}: cannot read shard: {exc}") from exc


def load_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise DatasetError(f"{dataset_dir}: no {MANIFEST} (not a preprocessed dataset folder?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON: {exc}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{path}: format_version {manifest.get('format_version')} != {FORMAT_VERSION}"
        )
    return manifest


def manifest_sha256(dataset_dir: str | Path) -> str:
    return sha256_file(Path(dataset_dir) / MANIFEST)


def shard_paths(dataset_dir: str | Path, split: str, manifest: dict | None = None) -> list[Path]:
    manifest = manifest or load_manifest(dataset_dir)
    if split not in manifest["splits"]:
        raise DatasetError(f"{dataset_dir}: split {split!r} not in the manifest")
    return [Path(dataset_dir) / split / s["file"] for s in manifest["splits"][split]["shards"]]


def balanced_class_weights(voxel_counts: Sequence[int]) -> list[float]:
    """scikit-learn's 'balanced' weights: n_total / (n_classes * n_c) (0 for absent classes)."""
    counts = np.asarray(voxel_counts, dtype=np.float64)
    total = counts.sum()
    with np.errstate(divide="ignore"):
        weights = np.where(counts > 0, total / (len(counts) * counts), 0.0)
    return [float(w) for w in weights]


def class_weights(
    manifest: dict[str, Any], factors: Sequence[float] = (1.0, 1.0, 1.0)
) -> list[float]:
    """Training class weights: the manifest's balanced weights times per-class factors."""
    base = manifest["class_weights_balanced"]
    if len(factors) != len(base):
        raise ValueError(f"need {len(base)} class factors (bg,kidney,tumor), got {len(factors)}")
    return [float(b) * float(f) for b, f in zip(base, factors, strict=True)]


def tumor_fraction(manifest: dict[str, Any], split: str = "train") -> float:
    info = manifest["splits"][split]
    return info["n_tumor_samples"] / max(info["n_samples"], 1)

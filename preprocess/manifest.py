"""Phase 3 of preprocessing: the dataset's ``manifest.json``; and what an output folder holds.

The manifest is written last, by rank 0: a dataset is complete once it exists. Its
``identity`` (the options that determine the content, the cases and the split) tells a re-run
whether the folder already holds this dataset, an interrupted run of it, or something else.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from preprocess import __version__
from preprocess.config import PreprocessConfig
from preprocess.dataset_format import (
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    DatasetError,
    balanced_class_weights,
)
from preprocess.kits import CLASS_NAMES, N_CLASSES, case_name
from preprocess.samples import case_work_paths

WORK = ".work"


def output_state(out: Path, ident: dict[str, Any]) -> str:
    """'complete', 'resume' or 'new' for output folder ``out``; :class:`DatasetError` if it is
    a file or holds something else."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out {out} is an existing file, not a dataset folder")
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        try:
            existing = json.loads(manifest_path.read_text()).get("identity")
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{manifest_path}: unreadable manifest: {exc}") from exc
        if existing == ident:
            return "complete"
        diff = sorted(
            k for k in set(ident) | set(existing or {}) if (existing or {}).get(k) != ident.get(k)
        )
        raise DatasetError(
            f"{out} already holds a different dataset (options differ: {', '.join(diff)}); "
            "choose another --out or remove it"
        )
    params_path = out / WORK / "identity.json"
    if params_path.is_file():
        if json.loads(params_path.read_text()) == ident:
            return "resume"
        raise DatasetError(
            f"{out} holds an unfinished run with different options; choose another --out or "
            "remove it"
        )
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out} is not empty and holds no dataset of this suite")
    return "new"


def _split_entry(
    cfg: PreprocessConfig, cases: list[int], metas: dict[int, dict], entries: list[dict]
) -> dict[str, Any]:
    """A split's manifest entry: its cases, sample and class counts, and shards."""
    work = Path(cfg.out_dir) / WORK
    counts = np.zeros(N_CLASSES, np.int64)
    n_tumor = 0
    for c in cases:
        per_sample = np.load(case_work_paths(work, c)["counts"])
        if len(per_sample):
            counts += per_sample.sum(axis=0)
            n_tumor += int((per_sample[:, 2] > 0).sum())
    return {
        "cases": cases,
        "n_samples": sum(e["n_samples"] for e in entries),
        "n_real_samples": sum(metas[c]["n_samples"] for c in cases),
        "n_tumor_samples": n_tumor,
        "samples_per_shard": entries[0]["n_samples"] if entries else 0,
        "class_voxel_counts": [int(v) for v in counts],
        "shards": entries,
    }


def build_manifest(
    cfg: PreprocessConfig,
    plan: dict[str, Any],
    metas: dict[int, dict],
    shards: dict[tuple[str, int], dict],
) -> dict[str, Any]:
    """The manifest of a finished run (``shards``: entry of each written (split, index))."""
    splits: dict[str, Any] = {}
    for split in SPLITS:
        entries = [shards[(split, i)] for i in range(cfg.n_shards) if (split, i) in shards]
        splits[split] = _split_entry(cfg, plan["split"][split], metas, entries)
    return {
        "format_version": FORMAT_VERSION,
        "suite_version": __version__,
        "kind": cfg.kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "identity": plan["ident"],
        "parameters": asdict(cfg),
        "normalization": {
            "hu_min": cfg.hu_min,
            "hu_max": cfg.hu_max,
            "scale": "uint8",
            "formula": "round(255 * (clip(HU, hu_min, hu_max) - hu_min) / "
            "(hu_max - hu_min)); training divides by 255",
        },
        "image_size": cfg.image_size,
        # mm per pixel of the slices (then cropped or padded to image_size); null: each whole
        # slice resized to image_size
        "target_spacing": cfg.target_spacing,
        "block_depth": cfg.block_depth if cfg.kind == "blocks" else None,
        "block_overlap": cfg.block_overlap if cfg.kind == "blocks" else None,
        "channels": cfg.channels,
        "mask_method": cfg.mask_method,
        "class_names": list(CLASS_NAMES),
        "padding": "each shard holds ceil(T/N) samples; the remainder is filled with repeats of "
        "the first samples of the shuffled split, flagged is_padding",
        "split_method": plan["split_how"],
        "splits": splits,
        "class_weights_balanced": balanced_class_weights(splits["train"]["class_voxel_counts"]),
        "source_cases": {
            case_name(c): metas[c]["source"] | {"n_samples": metas[c]["n_samples"]}
            for c in plan["cases"]
        },
    }

"""Phase 2 of preprocessing: a split's samples -> equal-size HDF5 shards.

Samples are put in a seeded order, padded to a multiple of the shard count with repeats flagged
``is_padding``, and written one shard at a time (temp name + rename). A shard whose recorded
checksum still matches its plan is skipped on a re-run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from preprocess.config import PreprocessConfig
from preprocess.dataset_format import (
    FORMAT_VERSION,
    sha256_file,
    shard_name,
    write_json_atomic,
    write_shard,
)
from preprocess.samples import WORK_ARRAYS, case_work_paths

ShardPlan = list[tuple[int, int, bool]]  # (case id, index in the case, is padding) per sample


def digest(obj: Any) -> str:
    """SHA-256 of an object's JSON (sorted keys): the key of an identity or a plan."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def plan_shards(
    split_cases: list[int], metas: dict[int, dict], n_shards: int, seed: int
) -> list[ShardPlan]:
    """Assign a split's samples to shards: [(case_id, index in case, is_padding), ...] per shard.

    Samples are taken in canonical order (case id, then position), shuffled with ``seed`` so
    that each shard mixes cases, and padded to ``n_shards * ceil(T / n_shards)`` by repeating
    the first samples of the shuffled order (flagged as padding).
    """
    samples = [(c, i) for c in split_cases for i in range(metas[c]["n_samples"])]
    total = len(samples)
    if total == 0:
        return [[] for _ in range(n_shards)]
    order = np.random.default_rng(seed).permutation(total)
    per_shard = -(-total // n_shards)
    padded = [(*samples[j], False) for j in order]
    padded += [(*samples[order[k % total]], True) for k in range(per_shard * n_shards - total)]
    return [padded[s * per_shard : (s + 1) * per_shard] for s in range(n_shards)]


def build_shard_arrays(
    plan: ShardPlan, work: Path, id_base: dict[int, int]
) -> dict[str, np.ndarray]:
    """Gather a shard's samples from the per-case work files (memory-mapped)."""
    cache: dict[int, dict[str, np.ndarray]] = {}
    fields: dict[str, list] = {key: [] for key in ("images", "masks", "case_ids", "slice_index")}
    fields |= {"sample_ids": [], "has_tumor": [], "is_padding": []}
    for case_id, idx, pad in plan:
        if case_id not in cache:
            paths = case_work_paths(work, case_id)
            cache[case_id] = {key: np.load(paths[key], mmap_mode="r") for key in WORK_ARRAYS}
        arrays = cache[case_id]
        fields["images"].append(arrays["images"][idx])
        fields["masks"].append(arrays["masks"][idx])
        fields["case_ids"].append(case_id)
        fields["slice_index"].append(int(arrays["slice_index"][idx]))
        fields["sample_ids"].append(id_base[case_id] + idx)
        fields["has_tumor"].append(bool(arrays["counts"][idx][2] > 0))
        fields["is_padding"].append(pad)
    return {
        "images": np.stack(fields["images"]),
        "masks": np.stack(fields["masks"]),
        "case_ids": np.asarray(fields["case_ids"], np.int32),
        "slice_index": np.asarray(fields["slice_index"], np.int32),
        "sample_ids": np.asarray(fields["sample_ids"], np.int64),
        "has_tumor": np.asarray(fields["has_tumor"], bool),
        "is_padding": np.asarray(fields["is_padding"], bool),
    }


def write_one_shard(
    cfg: PreprocessConfig,
    work: Path,
    split: str,
    index: int,
    plan: ShardPlan,
    id_base: dict[int, int],
    ident_hash: str,
) -> dict[str, Any]:
    """Write shard ``index`` of ``split`` (unless a matching one is there); its manifest entry."""
    path = Path(cfg.out_dir) / split / shard_name(index)
    record = work / "shards" / f"{split}_{shard_name(index)}.json"
    key = digest({"identity": ident_hash, "plan": plan})
    if path.is_file() and record.is_file():
        rec = json.loads(record.read_text())
        if rec.get("key") == key and sha256_file(path) == rec.get("sha256"):
            return rec["entry"]
    arrays = build_shard_arrays(plan, work, id_base)
    attrs = {
        "split": split,
        "shard_index": index,
        "n_shards": cfg.n_shards,
        "kind": cfg.kind,
        "format_version": FORMAT_VERSION,
    }
    sha256 = write_shard(path, arrays, attrs, cfg.compression)
    entry = {
        "file": shard_name(index),
        "n_samples": len(plan),
        "n_padding": int(arrays["is_padding"].sum()),
        "n_tumor_samples": int(arrays["has_tumor"].sum()),
        "sha256": sha256,
    }
    record.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"key": key, "sha256": sha256, "entry": entry}, record)
    return entry

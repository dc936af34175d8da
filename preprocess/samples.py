"""Phase 1 of preprocessing: one case -> its samples (2D slices or 3D blocks) as work files.

A case is loaded in the canonical layout, its slices or blocks are selected (those with kidney
or tumor, plus a seeded fraction of the others), the span of slices holding them is windowed
and mapped to the model's grid (``preprocess.geometry``), and the samples go to
``OUT/.work/cases/`` (written atomically; the meta JSON, written last, marks the case done).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from preprocess.config import PreprocessConfig
from preprocess.dataset_format import write_json_atomic
from preprocess.geometry import masks_to_grid, slice_geometry, window_to_grid
from preprocess.kits import IMAGING, N_CLASSES, SEGMENTATION, case_name, load_case

WORK_ARRAYS = ("images", "masks", "slice_index", "counts")


def block_starts(first: int, last: int, n_slices: int, depth: int, overlap: int) -> list[int]:
    """Start slices of blocks covering [first, last] with ``depth`` slices, ``overlap`` shared.

    Blocks step by ``depth - overlap``; the last block is aligned to end at ``last`` so every
    slice of the range is covered. A range shorter than ``depth`` gets one block, centred on it
    and widened into the neighbouring slices (context) as far as the volume allows.
    """
    step = depth - overlap
    length = last - first + 1
    if length <= depth:
        start = first - (depth - length) // 2
        return [max(0, min(start, n_slices - depth))] if n_slices >= depth else [0]
    starts = list(range(first, last - depth + 2, step))
    if starts[-1] + depth - 1 < last:
        starts.append(last - depth + 1)
    return starts


@dataclass
class Selection:
    """What of a case becomes samples: kept slices (2D) or block starts (3D), and the span of
    slices ``lo:hi`` that holds them, the only part resized."""

    lo: int
    hi: int
    keep: np.ndarray | None = None  # slices kept (2D)
    starts: list[int] | None = None  # first slice of each block (3D)


def select_samples(cfg: PreprocessConfig, case_id: int, foreground: np.ndarray) -> Selection:
    """The slices or blocks of a case to keep, from its per-slice foreground (kidney or tumor)."""
    n_slices = len(foreground)
    # one draw per slice (or block start), seeded by the case: the same on any number of ranks
    keep_draw = np.random.default_rng([cfg.shuffle_seed, case_id]).random(n_slices)
    if cfg.kind == "slices":
        keep = np.flatnonzero(foreground | (keep_draw < cfg.keep_empty))
        # the span of kept slices is resized, then the kept ones picked at the small size; the
        # span rarely holds more than a few others
        lo, hi = (int(keep[0]), int(keep[-1]) + 1) if len(keep) else (0, 0)
        return Selection(lo, hi, keep=keep)
    if cfg.keep_empty > 0:
        first, last = 0, n_slices - 1
    elif foreground.any():
        fg = np.flatnonzero(foreground)
        first, last = int(fg[0]), int(fg[-1])
    else:
        first = last = -1
    depth = cfg.block_depth
    starts = [] if first < 0 else block_starts(first, last, n_slices, depth, cfg.block_overlap)
    if 0 < cfg.keep_empty < 1:
        # blocks over the whole volume; those without kidney or tumor kept by their draw
        starts = [
            s for s in starts if foreground[s : s + depth].any() or keep_draw[s] < cfg.keep_empty
        ]
    lo, hi = (min(starts), min(max(starts) + depth, n_slices)) if starts else (0, 0)
    return Selection(lo, hi, starts=starts)


def _cut_blocks(
    images: np.ndarray, masks: np.ndarray, selection: Selection, depth: int
) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of ``depth`` slices from the resized span; volumes thinner than a block are padded
    at the end with background."""
    starts, lo, hi = selection.starts or [], selection.lo, selection.hi
    size = images.shape[-1]
    image_blocks = np.zeros((len(starts), depth, size, size), np.uint8)
    mask_blocks = np.zeros((len(starts), depth, size, size), np.uint8)
    for b, start in enumerate(starts):
        part = slice(start - lo, min(start - lo + depth, hi - lo))
        n = part.stop - part.start
        image_blocks[b, :n] = images[part]
        mask_blocks[b, :n] = masks[part]
    return image_blocks, mask_blocks


def process_case(cfg: PreprocessConfig, case_id: int) -> dict[str, Any]:
    """Load one case and turn it into samples: returns arrays and per-sample metadata."""
    case = load_case(cfg.kits_dir, case_id)
    seg = case.segmentation
    assert seg is not None
    # axis=(1, 2), not a reshape: nibabel's arrays are Fortran-ordered and a reshape would copy
    selection = select_samples(cfg, case_id, (seg > 0).any(axis=(1, 2)))
    lo, hi = selection.lo, selection.hi
    geom = slice_geometry(seg.shape[1:], case.spacing[1:], cfg.target_spacing, cfg.image_size)
    # a view of the span is resized (no gather of a full-resolution copy)
    span_images = window_to_grid(case.imaging[lo:hi], cfg.hu_min, cfg.hu_max, geom)
    span_masks = masks_to_grid(seg[lo:hi], geom, cfg.mask_method)
    if selection.keep is not None:
        images, masks = span_images[selection.keep - lo], span_masks[selection.keep - lo]
        slice_index = selection.keep.astype(np.int32)
    else:
        images, masks = _cut_blocks(span_images, span_masks, selection, cfg.block_depth)
        slice_index = np.asarray(selection.starts, np.int32)
    flat = masks.reshape(len(masks), -1) if len(masks) else np.zeros((0, 1), np.uint8)
    counts = np.stack([(flat == c).sum(axis=1) for c in range(N_CLASSES)], axis=1)
    return {
        "images": images,
        "masks": masks,
        "slice_index": slice_index,
        "counts": counts.astype(np.int64),
        "source": {
            "n_slices": int(seg.shape[0]),
            "shape": list(seg.shape),
            "spacing": [round(s, 6) for s in case.spacing],
            "imaging_sha256": case.sha256[IMAGING],
            "segmentation_sha256": case.sha256[SEGMENTATION],
        },
    }


def _save_npy_atomic(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


def case_work_paths(work: Path, case_id: int) -> dict[str, Path]:
    """The work files of a case: one .npy per array of :data:`WORK_ARRAYS`, and its meta JSON."""
    base = work / "cases" / case_name(case_id)
    paths = {key: base.with_suffix(f".{key}.npy") for key in WORK_ARRAYS}
    return paths | {"meta": base.with_suffix(".json")}


def run_case(cfg: PreprocessConfig, case_id: int, work: Path, ident_hash: str) -> dict[str, Any]:
    """Phase 1 for one case, skipped if its work files of this identity are complete."""
    paths = case_work_paths(work, case_id)
    if paths["meta"].is_file():
        meta = json.loads(paths["meta"].read_text())
        if meta.get("identity") == ident_hash:
            return meta
    result = process_case(cfg, case_id)
    paths["meta"].parent.mkdir(parents=True, exist_ok=True)
    for key in WORK_ARRAYS:
        _save_npy_atomic(result[key], paths[key])
    meta = {
        "identity": ident_hash,
        "case_id": case_id,
        "n_samples": int(len(result["images"])),
        "source": result["source"],
    }
    write_json_atomic(meta, paths["meta"])
    return meta

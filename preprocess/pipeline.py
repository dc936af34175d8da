"""The preprocessing driver shared by ``preprocess.downsample`` (2D) and ``preprocess.blocks`` (3D).

KiTS19 folder -> dataset folder in three phases, each restartable:

1. per case (each rank takes the next unclaimed case, largest first): load and validate, window
   the HU values, resize slices and masks to ``image_size``, drop slices with no kidney and no
   tumor, cut 3D blocks; the result goes to ``OUT/.work/cases/`` (written atomically; a
   complete case is skipped on a re-run);
2. shards (ranks split the shards): every split's samples are put in a seeded order, padded to
   a multiple of the shard count and written as equal-size HDF5 shards (temp name + rename; a
   shard whose recorded checksum still matches is skipped on a re-run);
3. rank 0 writes ``manifest.json`` (the dataset is complete once it exists) and removes ``.work``.

The content of the output depends only on the inputs and options, never on the number of ranks.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from preprocess import __version__
from preprocess.dataset_format import (
    FORMAT_VERSION,
    MANIFEST,
    N_CLASSES,
    SPLITS,
    DatasetError,
    balanced_class_weights,
    sha256_file,
    shard_name,
    write_json_atomic,
    write_shard,
)
from preprocess.kits import (
    IMAGING,
    SEGMENTATION,
    CaseError,
    VolumeColumns,
    case_name,
    check_finite,
    list_cases,
    load_case,
    parse_case_list,
    spacing_from_affine,
)
from preprocess.mpi_utils import Comm, get_comm
from preprocess.resize import (
    MASK_METHODS,
    ColumnResizer,
    integer_factors,
    resize_masks,
    window_and_resize,
)
from preprocess.splits import DEFAULT_RATIO, SPLIT_MODES, make_split

WORK = ".work"
# Columns of a CT read at a time when streaming a case (rounded to whole blocks): 16 columns of
# an 834-slice KiTS19 case are 14 MB, and a group of 4 makes one output column.
STREAM_COLUMNS = 16


@dataclass
class PreprocessConfig:
    """Every option of a preprocessing run; all but the paths define the dataset's identity."""

    kind: str  # "slices" (2D) or "blocks" (3D)
    kits_dir: str
    out_dir: str
    image_size: int = 128
    hu_min: float = -512.0  # the thesis's window
    hu_max: float = 512.0
    mask_method: str = "area_rescue"
    # fraction of the samples without kidney or tumor kept (seeded per case); 0 drops them all
    # as the thesis did, 1 keeps every one. Whole-volume inference meets such slices, and a
    # model that never saw one marks kidney on them.
    keep_empty: float = 0.0
    block_depth: int = 32
    block_overlap: int = 12
    n_shards: int = 4
    channels: int = 3
    cases: list[int] | None = None
    split_mode: str = "auto"
    split_ratio: list[float] = field(default_factory=lambda: list(DEFAULT_RATIO))
    split_seed: int = 42
    train_cases: list[int] | None = None
    val_cases: list[int] | None = None
    test_cases: list[int] | None = None
    shuffle_seed: int = 42
    compression: str | None = None
    keep_work: bool = False

    def identity(self) -> dict[str, Any]:
        """The options that determine the dataset's content (paths and housekeeping excluded)."""
        ident = asdict(self)
        for key in ("kits_dir", "out_dir", "keep_work"):
            ident.pop(key)
        if self.kind == "slices":
            ident.pop("block_depth")
            ident.pop("block_overlap")
        return ident

    def validate(self) -> None:
        if self.kind not in ("slices", "blocks"):
            raise ValueError(f"kind must be 'slices' or 'blocks', not {self.kind!r}")
        if self.image_size < 8:
            raise ValueError(f"--image-size {self.image_size} is too small")
        if self.hu_max <= self.hu_min:
            raise ValueError(f"HU window [{self.hu_min}, {self.hu_max}] is empty")
        if self.mask_method not in MASK_METHODS:
            raise ValueError(f"--mask-method must be one of {MASK_METHODS}")
        if self.kind == "blocks" and not 0 <= self.block_overlap < self.block_depth:
            raise ValueError(
                f"--overlap {self.block_overlap} must be in [0, depth {self.block_depth})"
            )
        if self.n_shards < 1:
            raise ValueError("--shards must be >= 1")
        if not 0.0 <= self.keep_empty <= 1.0:
            raise ValueError(f"--keep-empty {self.keep_empty} must be a fraction in [0, 1]")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class Logger:
    """Progress and messages from rank 0 only; errors from every rank."""

    def __init__(self, comm: Comm, quiet: bool = False) -> None:
        self.comm = comm
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def info(self, msg: str) -> None:
        if self.comm.rank == 0 and not self.quiet:
            print(f"[preprocess {time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)

    def error(self, msg: str) -> None:
        prefix = f"[rank {self.comm.rank}] " if self.comm.size > 1 else ""
        print(f"error: {prefix}{msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Phase 1: one case -> work files
# --------------------------------------------------------------------------------------------


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


@dataclass
class ResizedSpan:
    """The selected span of a case, windowed and resized, and where it came from."""

    n_slices: int
    shape: tuple[int, ...]
    spacing: tuple[float, float, float]
    sha256: dict[str, str]
    selection: Selection
    images: np.ndarray  # (hi - lo, size, size) uint8
    masks: np.ndarray  # (hi - lo, size, size) uint8 labels


def _resize_in_memory(cfg: PreprocessConfig, case_id: int) -> ResizedSpan:
    """Load the whole case, then resize the span: any input, any size, any mask method."""
    case = load_case(cfg.kits_dir, case_id)
    seg = case.segmentation
    assert seg is not None
    # axis=(1, 2), not a reshape: nibabel's arrays are Fortran-ordered and a reshape would copy
    selection = select_samples(cfg, case_id, (seg > 0).any(axis=(1, 2)))
    lo, hi = selection.lo, selection.hi
    return ResizedSpan(
        n_slices=seg.shape[0],
        shape=seg.shape,
        spacing=case.spacing,
        sha256=case.sha256,
        selection=selection,
        # a view of the span is resized (no gather of a full-resolution copy)
        images=window_and_resize(case.imaging[lo:hi], cfg.hu_min, cfg.hu_max, cfg.image_size),
        masks=resize_masks(seg[lo:hi], cfg.image_size, cfg.mask_method),
    )


def _resize_streamed(cfg: PreprocessConfig, case_id: int) -> ResizedSpan | None:
    """The same result as :func:`_resize_in_memory`, reading each file a few columns at a time.

    A rank then holds a few columns instead of the whole CT and label map (peak memory for a
    KiTS19 case of 834 slices 207 MB instead of 973 MB), and fresh memory faulted in at once
    is what two ranks on one machine slowed each other down with (bench.preprocess). For the
    usual input: CT of any numeric type (scaled storage too), integer unscaled labels, shrunk
    by whole factors (512 -> 128), ``area_rescue`` masks; None otherwise, and the caller loads
    the case whole.
    """
    if cfg.mask_method != "area_rescue":
        return None
    name = case_name(case_id)
    folder = Path(cfg.kits_dir) / name
    with (
        VolumeColumns(folder / SEGMENTATION, name, STREAM_COLUMNS) as labels,
        VolumeColumns(folder / IMAGING, name, STREAM_COLUMNS) as imaging,
    ):
        shape = imaging.header.shape
        if (
            len(shape) != 3
            or labels.header.shape != shape
            or labels.header.scaled
            or labels.header.dtype.kind not in "iu"
            or imaging.header.dtype.kind not in "iuf"
            or integer_factors(shape[1], shape[2], cfg.image_size) is None
        ):
            return None  # the in-memory path says what is wrong, or handles it
        resizer = ColumnResizer(shape[0], shape[1], shape[2], cfg.image_size)
        # the chunks must hold whole blocks of columns
        labels.columns = imaging.columns = resizer.fx * max(1, STREAM_COLUMNS // resizer.fx)
        for first, chunk in labels:
            resizer.add_labels(first, chunk)
        if resizer.bad_labels:
            bad = sorted(resizer.bad_labels)[:10]
            where = f"{name} ({folder / SEGMENTATION})"
            raise CaseError(f"{where}: labels outside {{0,1,2}}: {bad}")
        selection = select_samples(cfg, case_id, resizer.foreground)
        lo, hi = selection.lo, selection.hi
        resizer.start_images(lo, hi)
        for first, chunk in imaging:
            values = imaging.header.to_values(chunk)
            check_finite(values, f"{name}: {folder / IMAGING}")
            resizer.add_images(first, values, cfg.hu_min, cfg.hu_max)
        assert labels.sha256 is not None and imaging.sha256 is not None
        return ResizedSpan(
            n_slices=shape[0],
            shape=shape,
            spacing=spacing_from_affine(imaging.header.affine),
            sha256={IMAGING: imaging.sha256, SEGMENTATION: labels.sha256},
            selection=selection,
            images=resizer.images(),
            masks=resizer.masks(lo, hi),
        )


def process_case(cfg: PreprocessConfig, case_id: int) -> dict[str, Any]:
    """Load one case and turn it into samples: returns arrays and per-sample metadata."""
    resized = _resize_streamed(cfg, case_id) or _resize_in_memory(cfg, case_id)
    selection = resized.selection
    lo, hi = selection.lo, selection.hi
    if selection.keep is not None:
        images = resized.images[selection.keep - lo]
        masks = resized.masks[selection.keep - lo]
        slice_index = selection.keep.astype(np.int32)
    else:
        starts = selection.starts or []
        size, depth = cfg.image_size, cfg.block_depth
        images = np.zeros((len(starts), depth, size, size), np.uint8)
        masks = np.zeros((len(starts), depth, size, size), np.uint8)
        for b, start in enumerate(starts):
            # volumes thinner than a block are padded at the end with background
            part = slice(start - lo, min(start - lo + depth, hi - lo))
            n = part.stop - part.start
            images[b, :n] = resized.images[part]
            masks[b, :n] = resized.masks[part]
        slice_index = np.asarray(starts, np.int32)
    flat = masks.reshape(len(masks), -1) if len(masks) else np.zeros((0, 1), np.uint8)
    counts = np.stack([(flat == c).sum(axis=1) for c in range(N_CLASSES)], axis=1)
    return {
        "images": images,
        "masks": masks,
        "slice_index": slice_index,
        "counts": counts.astype(np.int64),
        "source": {
            "n_slices": int(resized.n_slices),
            "shape": list(resized.shape),
            "spacing": [round(s, 6) for s in resized.spacing],
            "imaging_sha256": resized.sha256[IMAGING],
            "segmentation_sha256": resized.sha256[SEGMENTATION],
        },
    }


def _save_npy_atomic(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


def case_work_paths(work: Path, case_id: int) -> dict[str, Path]:
    base = work / "cases" / case_name(case_id)
    return {
        "images": base.with_suffix(".images.npy"),
        "masks": base.with_suffix(".masks.npy"),
        "slice_index": base.with_suffix(".slice_index.npy"),
        "counts": base.with_suffix(".counts.npy"),
        "meta": base.with_suffix(".json"),
    }


def run_case(cfg: PreprocessConfig, case_id: int, work: Path, ident_hash: str) -> dict[str, Any]:
    """Phase 1 for one case; the meta JSON, written last, marks the case complete."""
    paths = case_work_paths(work, case_id)
    if paths["meta"].is_file():
        meta = json.loads(paths["meta"].read_text())
        if meta.get("identity") == ident_hash:
            return meta
    result = process_case(cfg, case_id)
    paths["meta"].parent.mkdir(parents=True, exist_ok=True)
    for key in ("images", "masks", "slice_index", "counts"):
        _save_npy_atomic(result[key], paths[key])
    meta = {
        "identity": ident_hash,
        "case_id": case_id,
        "n_samples": int(len(result["images"])),
        "source": result["source"],
    }
    write_json_atomic(meta, paths["meta"])
    return meta


# --------------------------------------------------------------------------------------------
# Phase 2: samples -> equal-size shards
# --------------------------------------------------------------------------------------------


def plan_shards(
    split_cases: list[int], metas: dict[int, dict], n_shards: int, seed: int
) -> list[list[tuple[int, int, bool]]]:
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
    plan: list[tuple[int, int, bool]], work: Path, id_base: dict[int, int]
) -> dict[str, np.ndarray]:
    """Gather a shard's samples from the per-case work files (memory-mapped)."""
    cache: dict[int, dict[str, np.ndarray]] = {}

    def case_arrays(case_id: int) -> dict[str, np.ndarray]:
        if case_id not in cache:
            paths = case_work_paths(work, case_id)
            cache[case_id] = {
                key: np.load(paths[key], mmap_mode="r")
                for key in ("images", "masks", "slice_index", "counts")
            }
        return cache[case_id]

    images, masks, case_ids, slice_index, sample_ids, has_tumor, is_padding = ([] for _ in range(7))
    for case_id, idx, pad in plan:
        arr = case_arrays(case_id)
        images.append(arr["images"][idx])
        masks.append(arr["masks"][idx])
        case_ids.append(case_id)
        slice_index.append(int(arr["slice_index"][idx]))
        sample_ids.append(id_base[case_id] + idx)
        has_tumor.append(bool(arr["counts"][idx][2] > 0))
        is_padding.append(pad)
    return {
        "images": np.stack(images),
        "masks": np.stack(masks),
        "case_ids": np.asarray(case_ids, np.int32),
        "slice_index": np.asarray(slice_index, np.int32),
        "sample_ids": np.asarray(sample_ids, np.int64),
        "has_tumor": np.asarray(has_tumor, bool),
        "is_padding": np.asarray(is_padding, bool),
    }


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _check_output_folder(cfg: PreprocessConfig, ident: dict[str, Any]) -> str:
    """'complete', 'resume' or 'new'; raises if the folder holds something else."""
    out = Path(cfg.out_dir)
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
            f"remove it"
        )
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out} is not empty and holds no dataset of this suite")
    return "new"


def largest_first(cases: list[int], sizes: dict[int, int]) -> list[int]:
    """The order ranks take cases in: largest imaging file first (ties by id), so that the
    last cases, when one rank may finish before the other, are the small ones."""
    return sorted(cases, key=lambda c: (-sizes[c], c))


STOP = "stop"  # in the claims folder: a rank failed, the others take no new case


def claim_cases(order: list[int], claims: Path) -> Iterator[tuple[int, int]]:
    """(position, case id) of each case in ``order`` that this rank is the first to claim.

    Every rank walks the same order and claims a case by creating a file named after it in
    ``claims`` (O_EXCL: exactly one rank succeeds, also on a shared filesystem across nodes).
    A rank takes its next case when it is done with the last, so ranks finish together however
    long each case takes (a split fixed in advance by file size left one rank idle for up to a
    second of 7 at the end; bench.preprocess). Stops early once a ``stop`` file appears.
    """
    for position, case_id in enumerate(order):
        if (claims / STOP).exists():
            return
        try:
            fd = os.open(claims / str(case_id), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue
        os.close(fd)
        yield position, case_id


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of returning it to the kernel.

    Every case allocates a few hundred MB (the decompressed CT and label map). By default glibc
    maps blocks that large fresh from the kernel and unmaps them when freed, so each case pays
    again for page faults that zero the memory: a quarter of the wall time on these machines
    (bench.preprocess; 5 of 18 s were system time). With mmap off and trimming only above
    2 GB, freed blocks stay in the heap and the next case reuses them. No-op without glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def run(cfg: PreprocessConfig, comm: Comm | None = None, quiet: bool = False) -> int:
    """Run the whole pipeline on every rank of ``comm``; returns the process exit code."""
    comm = comm or get_comm()
    log = Logger(comm, quiet)
    keep_freed_memory()
    if comm.size > 1:
        # One OpenCV thread per rank: ranks already fill the cores, and OpenCV's own pool on
        # top of them would only make the ranks compete.
        cv2.setNumThreads(1)
    out = Path(cfg.out_dir)
    work = out / WORK

    # --- set-up on rank 0, shared with every rank (an error stops all ranks together) -------
    plan: dict[str, Any] | None = None
    err = None
    if comm.rank == 0:
        try:
            cfg.validate()
            cases = list_cases(cfg.kits_dir, cfg.cases)
            explicit = None
            if cfg.train_cases or cfg.val_cases or cfg.test_cases:
                explicit = {
                    "train": cfg.train_cases or [],
                    "val": cfg.val_cases or [],
                    "test": cfg.test_cases or [],
                }
            split, how = make_split(
                cases, cfg.split_mode, cfg.split_ratio, cfg.split_seed, explicit
            )
            sizes = {}
            for c in cases:
                folder = Path(cfg.kits_dir) / case_name(c)
                for fname in (IMAGING, SEGMENTATION):
                    if not (folder / fname).is_file():
                        raise CaseError(f"{case_name(c)}: missing file {folder / fname}")
                sizes[c] = (folder / IMAGING).stat().st_size
            ident = {
                **cfg.identity(),
                "source_cases": cases,
                "split": split,
                "format_version": FORMAT_VERSION,
            }
            state = _check_output_folder(cfg, ident)
            if state != "complete":
                work.mkdir(parents=True, exist_ok=True)
                write_json_atomic(ident, work / "identity.json")
            plan = {
                "cases": cases,
                "split": split,
                "split_how": how,
                "ident": ident,
                "state": state,
                "order": largest_first(cases, sizes),
                "sizes": sizes,
            }
            if state != "complete":
                # a folder of its own for this run's claims (one of an interrupted run is stale)
                shutil.rmtree(work / "claims", ignore_errors=True)
                plan["claims"] = str(work / "claims" / uuid.uuid4().hex)
                Path(plan["claims"]).mkdir(parents=True)
        except (CaseError, DatasetError, ValueError, OSError) as exc:
            err = str(exc)
    err, plan = comm.bcast((err, plan))
    if err:
        if comm.rank == 0:
            log.error(err)
        return 2
    assert plan is not None
    if plan["state"] == "complete":
        log.info(f"{out} already holds this dataset (manifest present); nothing to do")
        return 0
    if plan["state"] == "resume" and comm.rank == 0:
        # temp files of an interrupted run are never complete: drop them
        for stale in out.rglob(".*.tmp"):
            stale.unlink(missing_ok=True)
    comm.barrier()
    ident_hash = _digest(plan["ident"])
    log.info(
        f"{cfg.kind}: {len(plan['cases'])} cases from {cfg.kits_dir} -> {out} on {comm.size} "
        f"rank(s); split {how_counts(plan['split'])} ({plan['split_how']})"
        + (" [resuming]" if plan["state"] == "resume" else "")
    )

    # --- phase 1: cases ------------------------------------------------------------------
    order, sizes, claims = plan["order"], plan["sizes"], Path(plan["claims"])
    total_bytes = sum(sizes.values())
    started_bytes = np.cumsum([sizes[c] for c in order])
    metas: dict[int, dict] = {}
    err = None
    t_cases = time.perf_counter()
    for position, case_id in claim_cases(order, claims):
        try:
            metas[case_id] = run_case(cfg, case_id, work, ident_hash)
        except (CaseError, OSError, ValueError) as exc:
            err = str(exc) if case_name(case_id) in str(exc) else f"{case_name(case_id)}: {exc}"
            (claims / STOP).touch()
            break
        if comm.rank == 0:
            # by bytes: cases come largest first, so counting cases would overstate the rest
            done = started_bytes[position] / total_bytes
            eta = (time.perf_counter() - t_cases) * (1 - done) / done
            log.info(
                f"case {case_name(case_id)} ({position + 1}/{len(order)} started, "
                f"{metas[case_id]['n_samples']} samples, eta {eta:.0f}s)"
            )
    # every case is done by some rank (none skipped unless one failed): all ranks gather them
    errors = comm.any_error(err)
    if errors:
        for e in [err] if err else []:
            log.error(e)
        return 2
    all_metas: dict[int, dict] = {}
    for part in comm.allgather(metas):
        all_metas.update(part)

    # --- checks on the result, same on every rank ----------------------------------------
    empty_cases = [c for c in plan["cases"] if all_metas[c]["n_samples"] == 0]
    if empty_cases:
        log.info(
            "no kidney or tumor (no samples) in: "
            + ", ".join(case_name(c) for c in empty_cases[:20])
        )
    problem = None
    total = sum(m["n_samples"] for m in all_metas.values())
    if total == 0:
        problem = (
            "empty result after filtering: no slice of any case has kidney or tumor "
            "(use --keep-empty to keep them)"
        )
    elif not sum(all_metas[c]["n_samples"] for c in plan["split"]["train"]):
        problem = "empty result after filtering: the train split has no samples"
    if problem:
        if comm.rank == 0:
            log.error(problem)
        return 2

    # --- phase 2: shards -----------------------------------------------------------------
    id_base, next_id = {}, 0
    for c in plan["cases"]:
        id_base[c] = next_id
        next_id += all_metas[c]["n_samples"]
    jobs = []
    split_plans = {}
    for s_idx, split in enumerate(SPLITS):
        cases = plan["split"][split]
        n_split = sum(all_metas[c]["n_samples"] for c in cases)
        if n_split == 0:
            continue
        split_plans[split] = plan_shards(cases, all_metas, cfg.n_shards, cfg.shuffle_seed + s_idx)
        jobs += [(split, i) for i in range(cfg.n_shards)]
    results = {}
    err = None
    for j, (split, i) in enumerate(jobs):
        if j % comm.size != comm.rank:
            continue
        try:
            results[(split, i)] = _write_one_shard(
                cfg, work, split, i, split_plans[split][i], id_base, ident_hash
            )
        except (OSError, ValueError) as exc:
            err = f"writing {split}/{shard_name(i)}: {exc}"
            break
        if comm.rank == 0:
            log.info(f"shard {split}/{shard_name(i)} ({results[(split, i)]['n_samples']} samples)")
    errors = comm.any_error(err)
    if errors:
        if err:
            log.error(err)
        return 2
    gathered: dict = {}
    for part in comm.allgather(results):
        gathered.update(part)

    # --- phase 3: manifest (rank 0) -------------------------------------------------------
    if comm.rank == 0:
        manifest = _manifest(cfg, plan, all_metas, split_plans, gathered)
        write_json_atomic(manifest, out / MANIFEST)
        if not cfg.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        n_train = manifest["splits"]["train"]["n_samples"]
        log.info(
            f"done: {out / MANIFEST} ({n_train} training samples in {cfg.n_shards} shards, "
            f"class weights {[round(w, 3) for w in manifest['class_weights_balanced']]})"
        )
    comm.barrier()
    return 0


def how_counts(split: dict[str, list[int]]) -> str:
    return "/".join(f"{name} {len(split[name])}" for name in SPLITS)


def _write_one_shard(
    cfg: PreprocessConfig,
    work: Path,
    split: str,
    index: int,
    plan: list[tuple[int, int, bool]],
    id_base: dict[int, int],
    ident_hash: str,
) -> dict[str, Any]:
    path = Path(cfg.out_dir) / split / shard_name(index)
    record = work / "shards" / f"{split}_{shard_name(index)}.json"
    key = _digest({"identity": ident_hash, "plan": plan})
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
    digest = write_shard(path, arrays, attrs, cfg.compression)
    entry = {
        "file": shard_name(index),
        "n_samples": len(plan),
        "n_padding": int(arrays["is_padding"].sum()),
        "n_tumor_samples": int(arrays["has_tumor"].sum()),
        "sha256": digest,
    }
    record.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"key": key, "sha256": digest, "entry": entry}, record)
    return entry


def _manifest(
    cfg: PreprocessConfig,
    plan: dict[str, Any],
    metas: dict[int, dict],
    split_plans: dict[str, list],
    shards: dict,
) -> dict[str, Any]:
    work = Path(cfg.out_dir) / WORK
    splits: dict[str, Any] = {}
    for split in SPLITS:
        cases = plan["split"][split]
        counts = np.zeros(N_CLASSES, np.int64)
        n_tumor = 0
        for c in cases:
            per_sample = np.load(case_work_paths(work, c)["counts"])
            if len(per_sample):
                counts += per_sample.sum(axis=0)
                n_tumor += int((per_sample[:, 2] > 0).sum())
        entries = [shards[(split, i)] for i in range(cfg.n_shards)] if split in split_plans else []
        splits[split] = {
            "cases": cases,
            "n_samples": sum(e["n_samples"] for e in entries),
            "n_real_samples": sum(metas[c]["n_samples"] for c in cases),
            "n_tumor_samples": n_tumor,
            "samples_per_shard": entries[0]["n_samples"] if entries else 0,
            "class_voxel_counts": [int(v) for v in counts],
            "shards": entries,
        }
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
        "block_depth": cfg.block_depth if cfg.kind == "blocks" else None,
        "block_overlap": cfg.block_overlap if cfg.kind == "blocks" else None,
        "channels": cfg.channels,
        "mask_method": cfg.mask_method,
        "class_names": ["background", "kidney", "tumor"],
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


# --------------------------------------------------------------------------------------------
# Command line, shared by preprocess.downsample and preprocess.blocks
# --------------------------------------------------------------------------------------------


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1]")
    return value


def build_parser(kind: str, prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--kits",
        required=True,
        metavar="KITS_DIR",
        help="KiTS19 folder of case_XXXXX/{imaging,segmentation}.nii.gz (read only)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DATASET_DIR",
        help="output dataset folder (new, or an interrupted run of the same options)",
    )
    p.add_argument("--image-size", type=int, default=128, help="output slice side in pixels")
    p.add_argument(
        "--hu-window",
        type=float,
        nargs=2,
        default=(-512.0, 512.0),
        metavar=("MIN", "MAX"),
        help="HU window clipped and scaled to 0..255",
    )
    p.add_argument(
        "--mask-method",
        choices=MASK_METHODS,
        default="area_rescue",
        help="how label masks are resized (area_rescue keeps every small tumor)",
    )
    p.add_argument(
        "--keep-empty",
        type=_fraction,
        nargs="?",
        const=1.0,
        default=0.0,
        metavar="FRACTION",
        help="keep this fraction of the slices (3D: blocks) without kidney or tumor, drawn "
        "per case with --shuffle-seed; alone it keeps them all (default: all dropped, as "
        "in the thesis). Models for whole-volume inference need some, e.g. 0.3",
    )
    if kind == "blocks":
        p.add_argument("--depth", type=int, default=32, help="slices per 3D block")
        p.add_argument(
            "--overlap", type=int, default=12, help="slices shared by consecutive blocks"
        )
    p.add_argument(
        "--shards",
        type=int,
        default=4,
        help="HDF5 shards per split (train with a number of ranks dividing it)",
    )
    p.add_argument(
        "--channels",
        type=int,
        default=3,
        help="model input channels (the stored single channel is repeated)",
    )
    p.add_argument(
        "--cases",
        type=parse_case_list,
        default=None,
        help="subset of case ids, e.g. 0-99,150 (default: all in KITS_DIR)",
    )
    p.add_argument(
        "--split",
        choices=SPLIT_MODES,
        default="auto",
        help="auto: thesis ranges (train 0-119,140-199 / val 120-139 / test 200-209) "
        "if cases exist in each, else proportional",
    )
    p.add_argument(
        "--split-ratio",
        type=float,
        nargs=3,
        default=DEFAULT_RATIO,
        metavar=("TRAIN", "VAL", "TEST"),
        help="proportions for proportional split",
    )
    p.add_argument("--split-seed", type=int, default=42)
    p.add_argument(
        "--train-cases",
        type=parse_case_list,
        default=None,
        help="explicit train case ids (with --val-cases/--test-cases)",
    )
    p.add_argument("--val-cases", type=parse_case_list, default=None)
    p.add_argument("--test-cases", type=parse_case_list, default=None)
    p.add_argument(
        "--shuffle-seed", type=int, default=42, help="seed of the sample order across shards"
    )
    p.add_argument(
        "--compression",
        choices=("none", "lzf", "gzip"),
        default="none",
        help="HDF5 compression of image and mask chunks",
    )
    p.add_argument(
        "--keep-work",
        action="store_true",
        help="keep the per-case intermediate files in DATASET_DIR/.work",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def config_from_args(kind: str, args: argparse.Namespace) -> PreprocessConfig:
    return PreprocessConfig(
        kind=kind,
        kits_dir=str(args.kits),
        out_dir=str(args.out),
        image_size=args.image_size,
        hu_min=float(args.hu_window[0]),
        hu_max=float(args.hu_window[1]),
        mask_method=args.mask_method,
        keep_empty=args.keep_empty,
        block_depth=getattr(args, "depth", 32),
        block_overlap=getattr(args, "overlap", 12),
        n_shards=args.shards,
        channels=args.channels,
        cases=args.cases,
        split_mode=args.split,
        split_ratio=list(args.split_ratio),
        split_seed=args.split_seed,
        train_cases=args.train_cases,
        val_cases=args.val_cases,
        test_cases=args.test_cases,
        shuffle_seed=args.shuffle_seed,
        compression=None if args.compression == "none" else args.compression,
        keep_work=args.keep_work,
    )


def main(kind: str, prog: str, description: str, argv: list[str] | None = None) -> int:
    args = build_parser(kind, prog, description).parse_args(argv)
    return run(config_from_args(kind, args), quiet=args.quiet)

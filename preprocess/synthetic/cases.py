"""Writing a synthetic dataset: case selection, rendering on MPI ranks, the record of options.

Every case draws from its own generator seeded with ``(seed, case_id)`` (its style from
``(seed, case_id, STYLE_STREAM)``), and the per-slice noise from ``(noise seed, slice)``, so a
case is bit-identical however many cases are generated, in what order, and on how many MPI
ranks. ``synthetic.json`` beside the cases says how each case was made.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from preprocess import __version__
from preprocess.dataset_format import write_json_atomic
from preprocess.kits import IMAGING, SEGMENTATION, CaseError, case_name, write_case
from preprocess.mpi_utils import get_comm
from preprocess.synthetic.analytic import analytic_case
from preprocess.synthetic.labels import find_label_files, load_label_map
from preprocess.synthetic.randomize import RandomizeConfig, draw_style, style_rng
from preprocess.synthetic.render import render_ct

DEFAULT_ANALYTIC_CASES = 12
DEFAULT_SLICES = 64
DEFAULT_SIZE = 512
RECORD = "synthetic.json"
_INTERNAL = "internal error: "


def case_rng(seed: int, case_id: int) -> np.random.Generator:
    """The generator of one case: depends only on (seed, case_id)."""
    return np.random.default_rng([int(seed), int(case_id)])


def case_style(randomize: RandomizeConfig, seed: int, case_id: int) -> dict[str, Any]:
    """The style of one case (empty without randomisation): depends only on (seed, case_id)."""
    return draw_style(randomize, style_rng(seed, case_id))


def _complete(out_dir: Path, case_id: int) -> bool:
    folder = out_dir / case_name(case_id)
    return (folder / IMAGING).is_file() and (folder / SEGMENTATION).is_file()


def _select_ids(
    labels_dir: str | Path | None,
    cases: Sequence[int] | None,
    n_cases: int | None,
    first_id: int,
    n_slices: int,
    size: int | None,
) -> tuple[list[int], dict[int, Path]]:
    """The case ids to make and, with label maps, each id's label file."""
    files: dict[int, Path] = {}
    if labels_dir is not None:
        files = find_label_files(labels_dir)
        if cases is not None:
            missing = sorted(set(cases) - set(files))
            if missing:
                names = ", ".join(case_name(c) for c in missing[:10])
                raise CaseError(f"{labels_dir}: no label file for requested cases: {names}")
            ids = sorted(set(int(c) for c in cases))
        else:
            ids = list(files)
    else:
        if size is not None and size < 16:
            raise CaseError(f"size must be >= 16 for analytic cases, got {size}")
        if n_slices < 1:
            raise CaseError(f"n_slices must be >= 1, got {n_slices}")
        if cases is not None:
            ids = sorted(set(int(c) for c in cases))
        else:
            count = DEFAULT_ANALYTIC_CASES if n_cases is None else n_cases
            ids = list(range(first_id, first_id + count))
            n_cases = None
    if n_cases is not None:
        ids = ids[:n_cases]
    if any(c < 0 or c > 99999 for c in ids):
        raise CaseError("case ids must be in 0..99999")
    return ids, files


def generate(
    out_dir: str | Path,
    *,
    labels_dir: str | Path | None = None,
    cases: Sequence[int] | None = None,
    n_cases: int | None = None,
    first_id: int = 0,
    n_slices: int = DEFAULT_SLICES,
    size: int | None = None,
    max_slices: int | None = None,
    seed: int = 0,
    randomize: RandomizeConfig | None = None,
    overwrite: bool = False,
    verbose: bool = False,
) -> list[int]:
    """Write a synthetic KiTS19-format dataset; returns the sorted case ids of the dataset.

    With ``labels_dir``: one case per label map (``cases`` selects ids, ``n_cases`` keeps the
    first N); ``max_slices`` and ``size`` optionally shrink them. Without: analytic cases
    ``cases`` or ``first_id .. first_id + n_cases - 1`` (default 12) of ``n_slices`` slices and
    ``size`` x ``size`` pixels (default 512). ``randomize`` draws a style per case (default:
    none, the renderer's own look). Cases whose two files exist are skipped unless
    ``overwrite``. Under an MPI launcher the ranks share the cases; every rank returns the same
    list once all cases are written, and an error on any rank raises on all of them.
    """
    out = Path(out_dir)
    randomize = randomize or RandomizeConfig()
    _check_options(seed, n_cases, max_slices, size)
    ids, files = _select_ids(labels_dir, cases, n_cases, first_id, n_slices, size)
    pending = [c for c in ids if overwrite or not _complete(out, c)]
    recipe = _Recipe(
        files if labels_dir is not None else None, n_slices, size, max_slices, seed, randomize
    )

    _load_record(out)  # an unreadable record stops every rank before any work
    comm = get_comm()
    mine = ids[comm.rank :: comm.size]  # round robin: neighbouring (similar-size) cases spread
    t_start = time.perf_counter()
    error = _make_cases(out, mine, recipe, overwrite, verbose, comm)
    _raise_on_any_rank(comm, error)
    if comm.rank == 0:
        source = {c: files[c].name if files else "analytic" for c in ids}
        _record(out, ids, pending, source, seed, randomize, size, max_slices, n_slices)
    if comm.size > 1:
        comm.barrier()
    if verbose and comm.rank == 0:
        print(
            f"{len(ids)} cases in {out} ({comm.size} rank(s), "
            f"{time.perf_counter() - t_start:.1f}s)",
            flush=True,
        )
    return ids


def _check_options(
    seed: int, n_cases: int | None, max_slices: int | None, size: int | None
) -> None:
    """Reject bad counts and sizes up front, before any rank starts work."""
    if seed < 0:
        raise CaseError(f"seed must be >= 0, got {seed}")
    for name, value in (("n_cases", n_cases), ("max_slices", max_slices), ("size", size)):
        if value is not None and value < 1:
            raise CaseError(f"{name} must be >= 1, got {value}")


@dataclass(frozen=True)
class _Recipe:
    """How every case of a run is made, so a rank needs only the case id to make one."""

    files: dict[int, Path] | None  # the label file of each case id; None: analytic cases
    n_slices: int
    size: int | None
    max_slices: int | None
    seed: int
    randomize: RandomizeConfig

    def make(self, case_id: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
        """CT, label map and spacing of one case, all drawn from the case's own generator."""
        rng = case_rng(self.seed, case_id)
        if self.files is not None:
            labels, spacing = load_label_map(
                self.files[case_id], case_id, self.max_slices, self.size
            )
        else:
            labels, spacing = analytic_case(case_id, self.n_slices, self.size or DEFAULT_SIZE, rng)
        ct = render_ct(labels, spacing, rng, case_style(self.randomize, self.seed, case_id))
        return ct, labels, spacing


def _make_cases(
    out: Path, mine: list[int], recipe: _Recipe, overwrite: bool, verbose: bool, comm: Any
) -> str | None:
    """Write this rank's cases; returns the error to share with the other ranks, or None.

    A single process raises at once. Under MPI the error is returned instead, since a rank that
    raised alone would leave the others waiting for it forever; rank 0 reports progress.
    """
    where = " on rank 0" if comm.size > 1 else ""
    try:
        for i, case_id in enumerate(mine):
            name = case_name(case_id)
            if not overwrite and _complete(out, case_id):
                if verbose and comm.rank == 0:
                    print(f"[{i + 1}/{len(mine)}{where}] {name}: exists, skipped", flush=True)
                continue
            t0 = time.perf_counter()
            ct, labels, spacing = recipe.make(case_id)
            t1 = time.perf_counter()
            write_case(out, case_id, ct, labels, spacing)
            if verbose and comm.rank == 0:
                print(
                    f"[{i + 1}/{len(mine)}{where}] {name}: {labels.shape} spacing "
                    f"{tuple(round(s, 3) for s in spacing)} tumor={bool((labels == 2).any())} "
                    f"render {t1 - t0:.1f}s write {time.perf_counter() - t1:.1f}s",
                    flush=True,
                )
    except CaseError as exc:
        if comm.size == 1:
            raise
        return str(exc)
    except Exception as exc:  # any failure must reach the other ranks, or they would hang
        if comm.size == 1:
            raise
        return f"{_INTERNAL}{type(exc).__name__}: {exc}"
    return None


def _raise_on_any_rank(comm: Any, error: str | None) -> None:
    if comm.size == 1:
        return
    errors = comm.any_error(error)
    if any(e.startswith(_INTERNAL) for e in errors):
        raise RuntimeError("; ".join(errors))
    if errors:
        raise CaseError("; ".join(errors))
    comm.barrier()


def _load_record(out: Path) -> dict[str, Any]:
    path = out / RECORD
    if not path.is_file():
        return {"generator": "preprocess.synthetic", "cases": {}}
    try:
        record = json.loads(path.read_text())
        if not isinstance(record.get("cases"), dict):
            raise ValueError("no 'cases' mapping")
    except (OSError, ValueError, AttributeError) as exc:
        raise CaseError(f"{path}: unreadable record of an earlier run ({exc})") from exc
    return record


def _record(
    out: Path,
    ids: list[int],
    pending: list[int],
    source: dict[int, str],
    seed: int,
    randomize: RandomizeConfig,
    size: int | None,
    max_slices: int | None,
    n_slices: int,
) -> None:
    """Add the cases made by this run to ``synthetic.json`` (cases skipped because they exist
    keep the entry of the run that made them; one without an entry gets this run's)."""
    record = _load_record(out)
    record["suite_version"] = __version__
    entries = record.setdefault("cases", {})
    for case_id in ids:
        name = case_name(case_id)
        if case_id not in pending and name in entries:
            continue
        entry: dict[str, Any] = {"source": source[case_id], "seed": seed, "size": size}
        if source[case_id] == "analytic":
            entry["slices"] = n_slices
        else:
            entry["max_slices"] = max_slices
        entry["randomize"] = randomize.to_dict()
        entry["style"] = case_style(randomize, seed, case_id)
        entries[name] = entry
    record["cases"] = dict(sorted(entries.items()))
    write_json_atomic(record, out / RECORD)

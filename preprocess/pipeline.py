"""The preprocessing driver shared by ``preprocess.downsample`` (2D) and ``preprocess.blocks`` (3D).

KiTS19 folder -> dataset folder in three phases, each restartable:

1. cases (``preprocess.samples``; each rank takes the next unclaimed case, largest first,
   ``preprocess.claims``): load in the canonical layout, window, map to the model's grid,
   select slices or blocks; results go to ``OUT/.work/cases/``, a complete case is skipped on
   a re-run;
2. shards (``preprocess.shards``; ranks split the shards): equal-size HDF5 shards per split;
3. rank 0 writes ``manifest.json`` (``preprocess.manifest``; the dataset is complete once it
   exists) and removes ``.work``.

The content of the output depends only on the inputs and options, never on the number of ranks.
Set-up and every phase end with a collective check, so an error on one rank stops all of them
with exit status 2 instead of leaving the others waiting.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

import cv2

from preprocess.claims import STOP, claim_cases, largest_first
from preprocess.config import PreprocessConfig, build_parser, config_from_args
from preprocess.dataset_format import (
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    DatasetError,
    shard_name,
    write_json_atomic,
)
from preprocess.kits import IMAGING, SEGMENTATION, CaseError, case_folder, case_name, list_cases
from preprocess.manifest import WORK, build_manifest, output_state
from preprocess.mpi_utils import Comm, get_comm, setup_logging
from preprocess.samples import run_case
from preprocess.shards import digest, plan_shards, write_one_shard
from preprocess.splits import make_split

__all__ = ["PreprocessConfig", "main", "run"]


def _explicit_split(cfg: PreprocessConfig) -> dict[str, list[int]] | None:
    if not (cfg.train_cases or cfg.val_cases or cfg.test_cases):
        return None
    return {
        "train": cfg.train_cases or [],
        "val": cfg.val_cases or [],
        "test": cfg.test_cases or [],
    }


def _plan(cfg: PreprocessConfig) -> dict[str, Any]:
    """Rank 0's set-up: cases, split, identity, the output folder's state, the claims folder.
    Raises CaseError, DatasetError, ValueError or OSError for bad input."""
    cfg.validate()
    cases = list_cases(cfg.kits_dir, cfg.cases)
    split, how = make_split(
        cases, cfg.split_mode, cfg.split_ratio, cfg.split_seed, _explicit_split(cfg)
    )
    sizes = {}
    for c in cases:
        folder = case_folder(cfg.kits_dir, c)
        for fname in (IMAGING, SEGMENTATION):
            if not (folder / fname).is_file():
                raise CaseError(f"{case_name(c)}: missing file {folder / fname}")
        sizes[c] = (folder / IMAGING).stat().st_size
    ident = {**cfg.identity(), "source_cases": cases, "split": split}
    ident["format_version"] = FORMAT_VERSION
    out = Path(cfg.out_dir)
    state = output_state(out, ident)
    plan = {"cases": cases, "split": split, "split_how": how, "ident": ident, "state": state}
    plan["order"] = largest_first(cases, sizes)
    if state != "complete":
        work = out / WORK
        work.mkdir(parents=True, exist_ok=True)
        write_json_atomic(ident, work / "identity.json")
        # a folder of its own for this run's claims (one of an interrupted run is stale)
        shutil.rmtree(work / "claims", ignore_errors=True)
        plan["claims"] = str(work / "claims" / uuid.uuid4().hex)
        Path(plan["claims"]).mkdir(parents=True)
    return plan


def _run_cases(
    cfg: PreprocessConfig, comm: Comm, plan: dict[str, Any], log: logging.Logger
) -> dict[int, dict] | None:
    """Phase 1 on every rank; every case's meta (gathered from all ranks), None after an error
    (logged)."""
    work, claims = Path(cfg.out_dir) / WORK, Path(plan["claims"])
    ident_hash = digest(plan["ident"])
    metas: dict[int, dict] = {}
    err = None
    for position, case_id in claim_cases(plan["order"], claims):
        try:
            metas[case_id] = run_case(cfg, case_id, work, ident_hash)
        except (CaseError, OSError, ValueError) as exc:
            name = case_name(case_id)
            err = str(exc) if name in str(exc) else f"{name}: {exc}"
            (claims / STOP).touch()
            break
        log.info(
            f"case {case_name(case_id)} ({position + 1}/{len(plan['order'])} started, "
            f"{metas[case_id]['n_samples']} samples)"
        )
    if comm.any_error(err):
        if err:
            log.error(err)
        return None
    all_metas: dict[int, dict] = {}
    for part in comm.allgather(metas):
        all_metas.update(part)
    return all_metas


def _result_problem(plan: dict[str, Any], metas: dict[int, dict], log: logging.Logger) -> str:
    """What makes the samples unusable ('' if nothing); the same on every rank."""
    empty_cases = [c for c in plan["cases"] if metas[c]["n_samples"] == 0]
    if empty_cases:
        names = ", ".join(case_name(c) for c in empty_cases[:20])
        log.info(f"no kidney or tumor (no samples) in: {names}")
    if sum(m["n_samples"] for m in metas.values()) == 0:
        return (
            "empty result after filtering: no slice of any case has kidney or tumor "
            "(use --keep-empty to keep them)"
        )
    if not sum(metas[c]["n_samples"] for c in plan["split"]["train"]):
        return "empty result after filtering: the train split has no samples"
    return ""


def _write_shards(
    cfg: PreprocessConfig,
    comm: Comm,
    plan: dict[str, Any],
    metas: dict[int, dict],
    log: logging.Logger,
) -> dict[tuple[str, int], dict] | None:
    """Phase 2: ranks take every size-th shard; all entries (gathered), None after an error."""
    id_base, next_id = {}, 0
    for c in plan["cases"]:
        id_base[c] = next_id
        next_id += metas[c]["n_samples"]
    jobs = []
    for s_idx, split in enumerate(SPLITS):
        cases = plan["split"][split]
        if sum(metas[c]["n_samples"] for c in cases) == 0:
            continue
        shard_plans = plan_shards(cases, metas, cfg.n_shards, cfg.shuffle_seed + s_idx)
        jobs += [(split, i, shard_plan) for i, shard_plan in enumerate(shard_plans)]
    work, ident_hash = Path(cfg.out_dir) / WORK, digest(plan["ident"])
    results, err = {}, None
    for split, i, shard_plan in jobs[comm.rank :: comm.size]:
        try:
            entry = write_one_shard(cfg, work, split, i, shard_plan, id_base, ident_hash)
        except (OSError, ValueError) as exc:
            err = f"writing {split}/{shard_name(i)}: {exc}"
            break
        results[(split, i)] = entry
        log.info(f"shard {split}/{shard_name(i)} ({entry['n_samples']} samples)")
    if comm.any_error(err):
        if err:
            log.error(err)
        return None
    gathered: dict[tuple[str, int], dict] = {}
    for part in comm.allgather(results):
        gathered.update(part)
    return gathered


def _start(cfg: PreprocessConfig, comm: Comm, log: logging.Logger) -> dict[str, Any] | None:
    """Set-up on rank 0, shared with every rank; None after an error (logged on rank 0)."""
    plan, err = None, None
    if comm.rank == 0:
        try:
            plan = _plan(cfg)
        except (CaseError, DatasetError, ValueError, OSError) as exc:
            err = str(exc)
    err, plan = comm.bcast((err, plan))
    if err:
        if comm.rank == 0:
            log.error(err)
        return None
    if plan["state"] == "resume" and comm.rank == 0:
        # temp files of an interrupted run are never complete: drop them
        for stale in Path(cfg.out_dir).rglob(".*.tmp"):
            stale.unlink(missing_ok=True)
    comm.barrier()
    return plan


def run(cfg: PreprocessConfig, comm: Comm | None = None, quiet: bool = False) -> int:
    """Run the whole pipeline on every rank of ``comm``; returns the process exit code."""
    comm = comm or get_comm()
    log = setup_logging("preprocess", comm, quiet)
    if comm.size > 1:
        # One OpenCV thread per rank: ranks already fill the cores, and OpenCV's own pool on
        # top of them would only make the ranks compete.
        cv2.setNumThreads(1)
    out = Path(cfg.out_dir)
    plan = _start(cfg, comm, log)
    if plan is None:
        return 2
    if plan["state"] == "complete":
        log.info(f"{out} already holds this dataset (manifest present); nothing to do")
        return 0
    counts = "/".join(f"{name} {len(plan['split'][name])}" for name in SPLITS)
    log.info(
        f"{cfg.kind}: {len(plan['cases'])} cases from {cfg.kits_dir} -> {out} on {comm.size} "
        f"rank(s); split {counts} ({plan['split_how']})"
        + (" [resuming]" if plan["state"] == "resume" else "")
    )
    metas = _run_cases(cfg, comm, plan, log)
    if metas is None:
        return 2
    problem = _result_problem(plan, metas, log)
    if problem:
        if comm.rank == 0:
            log.error(problem)
        return 2
    shards = _write_shards(cfg, comm, plan, metas, log)
    if shards is None:
        return 2
    if comm.rank == 0:
        manifest = build_manifest(cfg, plan, metas, shards)
        write_json_atomic(manifest, out / MANIFEST)
        if not cfg.keep_work:
            shutil.rmtree(out / WORK, ignore_errors=True)
        n_train = manifest["splits"]["train"]["n_samples"]
        weights = [round(w, 3) for w in manifest["class_weights_balanced"]]
        log.info(
            f"done: {out / MANIFEST} ({n_train} training samples in {cfg.n_shards} shards, "
            f"class weights {weights})"
        )
    comm.barrier()
    return 0


def main(kind: str, prog: str, description: str, argv: list[str] | None = None) -> int:
    """The command line of ``preprocess.downsample`` / ``preprocess.blocks``."""
    args = build_parser(kind, prog, description).parse_args(argv)
    return run(config_from_args(kind, args), quiet=args.quiet)

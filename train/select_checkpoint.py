"""Choose a run's best checkpoint on whole validation volumes and install it as its best weights.

    python -m train.select_checkpoint --run RUN_DIR --kits KITS_DIR [--cases 120-125]
                                      [--weights FILE ...] [--postprocess] [--dry-run]

Why, beside training's own choice: training monitors the validation JC_w pooled over the
preprocessed validation samples (one confusion matrix per epoch, ``train.metrics``), which sees
only the samples preprocessing kept (by default slices or blocks that hold kidney) at model
resolution. This scores each candidate on the validation cases' whole volumes at original
resolution, every slice included, so false positives outside the kidney range count, with the
KiTS19 score (the mean of the kidney+tumor Dice and the tumor Dice, as ``train.evaluate``),
and installs the highest.

Candidates: the ``--weights`` files, else the epochs the run kept (``train.train --keep-every
K``: ``checkpoints/epochs/epoch_NNNN.weights.h5``) with its current ``best.weights.h5`` and
``latest.weights.h5``. Cases: ``--cases``, else the validation split recorded in config.json.
The run's test cases are refused: choosing on them would leak into the result reported on them.

Scores are remembered in ``selection.json`` by the weights file's SHA-256: run again after
more training (or with ``--dry-run`` while it trains), only new candidates are scored.

Writes ``RUN_DIR/selection.json`` (every candidate's scores) and, unless ``--dry-run``,
``checkpoints/best.weights.h5`` (the winner, hard-linked or copied), ``best.json``, the
``best_*`` fields of ``summary.json`` and ``basic_info.txt``, each atomically. A later
``train.train --resume`` goes back to choosing by its ``--monitor``; run this again after it.

Exit codes: 0 done; 2 bad input (named in the message); 1 other.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from preprocess.dataset_format import DatasetError, sha256_file, write_json_atomic
from preprocess.kits import N_CLASSES, CaseError, list_cases, parse_case_list
from train.checkpoint import link_atomic
from train.evaluate import class_weights_for, evaluate_volumes, write_text_atomic
from train.inference import (
    InferenceError,
    checked_preprocessing,
    instantiate,
    load_weights,
    resolve_model_source,
)
from train.runtime import basic_info

MONITOR = "val_volumes_kits_score"
SCORES = ("kidney_dice_mean", "tumor_dice_mean", "kits_score")
_EPOCH_IN_NAME = re.compile(r"epoch_(\d+)")


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def default_candidates(run_dir: Path) -> list[tuple[Path, int | None]]:
    """(weights file, epoch) of the kept epochs, the current best and the latest, one per epoch."""
    ckpt = run_dir / "checkpoints"
    found: dict[int | None, Path] = {}
    for path in sorted((ckpt / "epochs").glob("epoch_*.weights.h5")):
        found[candidate_epoch(path, run_dir)] = path
    for name in ("best", "latest"):
        path = ckpt / f"{name}.weights.h5"
        if path.is_file():  # an epoch already kept is not scored twice
            found.setdefault(candidate_epoch(path, run_dir), path)
    ordered = sorted(found.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
    return [(path, epoch) for epoch, path in ordered]


def candidate_epoch(path: Path, run_dir: Path | None = None) -> int | None:
    """The epoch a weights file holds: from its name (epoch_NNNN), else best/latest.json."""
    match = _EPOCH_IN_NAME.search(path.name)
    if match:
        return int(match.group(1))
    if run_dir is not None and path.parent == run_dir / "checkpoints":
        stem = path.name.removesuffix(".weights.h5")
        record = _read_json(path.parent / f"{stem}.json")
        if record and "epoch" in record:
            return int(record["epoch"])
    return None


def choose_cases(args: argparse.Namespace, config: dict[str, Any]) -> list[int]:
    splits = (config.get("dataset") or {}).get("splits") or {}
    if args.cases:
        try:
            cases = parse_case_list(args.cases)
        except ValueError as exc:
            raise InferenceError(f"--cases {args.cases!r}: {exc}") from exc
    elif splits.get("val"):
        cases = [int(c) for c in splits["val"]]
    else:
        raise InferenceError(
            f"{args.run}: config.json records no validation split; name the cases with --cases"
        )
    leaked = sorted(set(cases) & {int(c) for c in splits.get("test", [])})
    if leaked:
        raise InferenceError(
            f"--cases: {leaked} are test cases of {args.run}; choose on validation cases, "
            "or the test result is no longer held out"
        )
    return cases


def earlier_scores(run_dir: Path, cases: list[str], postprocess: Any) -> dict[str, dict]:
    """Candidates scored by an earlier selection on the same cases and post-processing."""
    earlier = _read_json(run_dir / "selection.json")
    if not earlier or earlier.get("cases") != cases or earlier.get("postprocess") != postprocess:
        return {}
    return {c["sha256"]: c for c in earlier.get("candidates", []) if c.get("sha256")}


def install_best(run_dir: Path, chosen: dict[str, Any], selection: dict[str, Any]) -> None:
    """The chosen weights become ``best.weights.h5``; best.json, summary and basic_info say so."""
    ckpt = run_dir / "checkpoints"
    best = ckpt / "best.weights.h5"
    source = run_dir / chosen["weights"]
    if source.resolve() != best.resolve():
        link_atomic(source, best)
    replaced = _read_json(ckpt / "best.json")
    write_json_atomic(
        {
            "epoch": chosen["epoch"],
            "monitor": MONITOR,
            "value": chosen["kits_score"],
            "selected_by": "train.select_checkpoint",
            "cases": selection["cases"],
            "postprocess": selection["postprocess"],
            "replaced": replaced,
        },
        ckpt / "best.json",
    )
    summary = _read_json(run_dir / "summary.json")
    if summary is not None:
        summary.update(
            best_epoch=chosen["epoch"],
            best_value=chosen["kits_score"],
            best_monitor=MONITOR,
            best_selected_by=(
                f"train.select_checkpoint on whole validation volumes {selection['cases_text']}"
                f", {len(selection['candidates'])} candidates (selection.json)"
            ),
        )
        write_json_atomic(summary, run_dir / "summary.json")
        config = json.loads((run_dir / "config.json").read_text())
        write_text_atomic(basic_info(config, summary), run_dir / "basic_info.txt")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.select_checkpoint",
        description=(__doc__ or "").split("\n\n")[2].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="training run folder")
    p.add_argument(
        "--kits",
        required=True,
        metavar="KITS_DIR",
        help="KiTS19 folder holding the validation cases (imaging + segmentation)",
    )
    p.add_argument(
        "--cases",
        metavar="LIST",
        help="validation case ids such as 120-125 (default: the validation split in "
        "config.json; the run's test cases are refused)",
    )
    p.add_argument(
        "--weights",
        nargs="+",
        metavar="FILE",
        help="candidate weights files (default: checkpoints/epochs/*, best and latest)",
    )
    p.add_argument(
        "--postprocess",
        action="store_true",
        help="keep only the kidney+tumor components with the most kidney before scoring "
        "(as you will predict)",
    )
    p.add_argument("--components", type=int, default=2, help="components kept by --postprocess")
    p.add_argument("--batch-size", type=int, default=None, help="see train.evaluate")
    p.add_argument(
        "--dry-run", action="store_true", help="score and write selection.json, install nothing"
    )
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    run_dir = Path(args.run)
    config, _, config_path = resolve_model_source(run_dir)
    checked_preprocessing(config, config_path)
    if args.weights:
        candidates = [(Path(w), candidate_epoch(Path(w), run_dir)) for w in args.weights]
    else:
        candidates = default_candidates(run_dir)
    if not candidates:
        raise InferenceError(f"{run_dir}: no checkpoints to choose from")
    for path, _ in candidates:
        if not path.is_file():
            raise InferenceError(f"{path}: weights file not found")
    cases = list_cases(Path(args.kits), choose_cases(args, config))  # CaseError if missing
    class_weights, _ = class_weights_for(config, None, int(config.get("n_classes", N_CLASSES)))
    postprocess = args.components if args.postprocess else None

    case_names = [f"case_{c:05d}" for c in cases]
    postprocess_record = {"keep_largest_components": postprocess} if postprocess else None
    known = earlier_scores(run_dir, case_names, postprocess_record)

    loaded = None
    scored: list[dict[str, Any]] = []
    for i, (path, epoch) in enumerate(candidates):
        sha256 = sha256_file(path)
        head = f"[{i + 1}/{len(candidates)}] {path} (epoch {epoch})"
        scores = {k: known[sha256][k] for k in SCORES} if sha256 in known else None
        if scores is not None:
            print(f"{head}: scored before, KiTS score {scores['kits_score']:.4f}", flush=True)
        else:
            print(head, flush=True)
            if loaded is None:
                loaded = instantiate(config, path, config_path)
            else:
                load_weights(loaded.model, path, loaded.name)
            summary, _ = evaluate_volumes(
                loaded,
                Path(args.kits),
                cases,
                class_weights,
                args.batch_size,
                postprocess=postprocess,
            )
            scores = {k: summary[k] for k in SCORES}
        # relative to the run folder, so the shipped selection.json names no machine's path
        weights = os.path.relpath(path.resolve(), run_dir.resolve())
        scored.append({"weights": weights, "epoch": epoch, "sha256": sha256, **scores})
    # ties go to the later epoch (more training, same validation score)
    chosen = max(scored, key=lambda c: (c["kits_score"], c["epoch"] or 0))
    selection = {
        "monitor": MONITOR,
        "rule": "highest mean of kidney+tumor Dice and tumor Dice over the validation volumes",
        "cases": case_names,
        "cases_text": args.cases or "(config.json validation split)",
        "postprocess": postprocess_record,
        "candidates": scored,
        "chosen": chosen,
        "installed": not args.dry_run,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(selection, run_dir / "selection.json")
    if not args.dry_run:
        install_best(run_dir, chosen, selection)
    print(
        f"chosen: {chosen['weights']} (epoch {chosen['epoch']}): KiTS score "
        f"{chosen['kits_score']:.4f} (kidney+tumor Dice {chosen['kidney_dice_mean']:.4f}, "
        f"tumor Dice {chosen['tumor_dice_mean']:.4f})"
        + ("" if args.dry_run else f"; installed as {run_dir / 'checkpoints/best.weights.h5'}"),
        flush=True,
    )
    return selection


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (InferenceError, CaseError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The thesis's comparison as a table: one row per model's run folder (scripts/compare_models.sh).

    python -m train.compare --runs compare_runs                 # Markdown on stdout
    python -m train.compare --runs compare_runs --output compare_runs/results.md

Per model, from RUNS/MODEL/:
- ``config.json``: parameters as trained, model options, batch, ranks, steps per epoch, block
  depth; ``checkpoints/latest.json`` (else ``summary.json``): epochs and seconds trained. Training
  samples = epochs x steps per epoch x batch x ranks; for Unet3D a sample is a block, and the
  CT slices it covers are counted too, since only slices compare across 2D and 3D models;
- ``evaluation/metrics.json`` (held-out synthetic cases): JC_w pooled over the test split at model
  resolution with the run's class weights (the thesis's metric), and over whole volumes the mean
  kidney+tumor Dice of the cases with kidney and the mean tumor Dice of the cases with tumor;
- ``evaluation_real/metrics.json`` (real CT slices, when present): the same two Dice figures, the
  share of empty slices given more than 50 false-positive pixels, and whether the model beats
  predicting all background: the mean kidney+tumor Dice over every slice against the share of
  slices without kidney (all background scores 1 on those, 0 elsewhere);
- ``evaluation_volume/metrics.json`` (whole real CT volumes with kidney masks, when present): the
  mean kidney+tumor Dice, the real-CT check of a model that needs whole volumes (Unet3D); it
  decides "beats all background" where no real slices were scored.

The thesis's JC_w (Tables 5.1 and 5.2) stands beside ours; below the table, both rankings.
Reads JSON only: no TensorFlow. Exit status 2 when no run folder of the models is found.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import models
from preprocess.dataset_format import write_json_atomic
from preprocess.kits import atomic_path

MISSING = "-"
COLUMNS = (
    ("Model", "---"),
    ("Options", "---"),
    ("Parameters", "---:"),
    ("Training samples", "---:"),
    ("CT slices seen", "---:"),
    ("Wall time", "---:"),
    ("Samples/s", "---:"),
    ("JC_w synthetic", "---:"),
    ("Kidney+tumor Dice synthetic", "---:"),
    ("Tumor Dice synthetic", "---:"),
    ("Kidney+tumor Dice real", "---:"),
    ("Tumor Dice real", "---:"),
    ("Empty slices marked (real)", "---:"),
    ("Kidney Dice real volume", "---:"),
    ("Beats all-background (real)", ":---:"),
    ("JC_w thesis", "---:"),
)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from None


def training_figures(run: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Epochs, samples, CT slices and seconds trained, from the latest checkpoint (it is written
    every epoch, so an interrupted run counts too), else from summary.json."""
    latest = _read_json(run / "checkpoints" / "latest.json") or {}
    summary = _read_json(run / "summary.json") or {}
    epochs = latest.get("epoch", summary.get("epochs_done"))
    seconds = latest.get("train_seconds", summary.get("train_seconds"))
    train = config.get("train", {})
    per_epoch = config["steps_per_epoch"] * train["batch_size"] * config["n_ranks"]
    samples = None if epochs is None else int(epochs) * per_epoch
    depth = config.get("dataset", {}).get("block_depth") or 1
    return {
        "epochs": epochs,
        "samples": samples,
        "slices": None if samples is None else samples * int(depth),
        "seconds": seconds,
        "samples_per_second": samples / seconds if samples and seconds else None,
    }


def _training_figures_of(run: Path, config: dict[str, Any]) -> dict[str, Any]:
    try:
        return training_figures(run, config)
    except KeyError as exc:
        raise ValueError(f"{run / 'config.json'}: no {exc} (not written by train.train?)") from None


def evaluation_figures(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """JC_w at model resolution and the whole-volume Dice headline of one metrics.json."""
    if metrics is None:
        return {}
    volumes = metrics.get("volumes") or {}
    head = volumes.get("headline") or {}
    dataset = metrics.get("dataset") or {}
    figures: dict[str, Any] = {
        "jc_w": dataset.get("weighted_jaccard"),
        "kidney_tumor_dice": head.get("kidney_tumor_dice"),
        "tumor_dice": head.get("tumor_dice"),
        "empty_fp_rate": head.get("empty_fp_rate"),
        "kidney_dice_mean": volumes.get("kidney_dice_mean"),
        "n_cases": volumes.get("n_cases"),
        "n_kidney": head.get("n_kidney"),
    }
    if figures["n_cases"]:
        # all background: Dice 1 on a case without kidney (both empty), 0 on one with kidney
        figures["all_background_dice"] = 1.0 - figures["n_kidney"] / figures["n_cases"]
    return figures


def model_row(run: Path, name: str) -> dict[str, Any] | None:
    """Everything the table shows of one model; None when the run folder has no config.json."""
    config = _read_json(run / "config.json")
    if config is None:
        return None
    spec = models.spec(name)
    options = {k: v for k, v in (config.get("model_options") or {}).items() if k != "l2"}
    synthetic = _read_json(run / "evaluation" / "metrics.json")
    real = evaluation_figures(_read_json(run / "evaluation_real" / "metrics.json"))
    volume = evaluation_figures(_read_json(run / "evaluation_volume" / "metrics.json"))
    beats = None
    for scored in (real, volume):
        if scored.get("kidney_dice_mean") is not None and "all_background_dice" in scored:
            beats = scored["kidney_dice_mean"] > scored["all_background_dice"]
            break
    return {
        "model": name,
        "thesis_name": spec.thesis_name,
        "options": options,
        "parameters": config.get("n_params"),
        **_training_figures_of(run, config),
        "synthetic": evaluation_figures(synthetic),
        "real": real,
        "real_volume": volume,
        "beats_all_background_real": beats,
        "thesis_jc_w": (synthetic or {}).get("thesis_jc_w", spec.thesis_jc_w),
    }


def _num(value: float | int | None, digits: int = 4) -> str:
    if value is None:
        return MISSING
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _percent(share: float | None) -> str:
    return MISSING if share is None else f"{100 * share:.0f} %"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    minutes = int(round(seconds / 60))
    if seconds < 600:
        return f"{seconds:.0f} s"
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def table_cells(row: dict[str, Any]) -> list[str]:
    syn, real, beats = row["synthetic"], row["real"], row["beats_all_background_real"]
    options = ", ".join(f"{k}={v}" for k, v in sorted(row["options"].items())) or "thesis width"
    return [
        f"{row['thesis_name']} (`{row['model']}`)",
        options,
        _num(row["parameters"]),
        _num(row["samples"]),
        _num(row["slices"]),
        _duration(row["seconds"]),
        _num(row["samples_per_second"], 2),
        _num(syn.get("jc_w")),
        _num(syn.get("kidney_tumor_dice")),
        _num(syn.get("tumor_dice")),
        _num(real.get("kidney_tumor_dice")),
        _num(real.get("tumor_dice")),
        _percent(real.get("empty_fp_rate")),
        _num(row["real_volume"].get("kidney_tumor_dice")),
        MISSING if beats is None else ("yes" if beats else "**no**"),
        _num(row["thesis_jc_w"]),
    ]


def ranking_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Both orders by JC_w, best first, so that agreement with the thesis is read at a glance."""
    ours = sorted(
        (r for r in rows if r["synthetic"].get("jc_w") is not None),
        key=lambda r: -r["synthetic"]["jc_w"],
    )
    thesis = sorted(
        (r for r in rows if r["thesis_jc_w"] is not None), key=lambda r: -r["thesis_jc_w"]
    )
    return [
        "Ranking by JC_w, best first: ours (held-out synthetic) "
        + (" > ".join(r["thesis_name"] for r in ours) or MISSING)
        + "; the thesis's "
        + (" > ".join(r["thesis_name"] for r in thesis) or MISSING)
        + ".",
    ]


def markdown(rows: list[dict[str, Any]], missing: list[str]) -> str:
    lines = [
        "| " + " | ".join(name for name, _ in COLUMNS) + " |",
        "| " + " | ".join(align for _, align in COLUMNS) + " |",
    ]
    lines += ["| " + " | ".join(table_cells(row)) + " |" for row in rows]
    lines += [""] + ranking_lines(rows)
    real = next((r["real"] for r in rows if r["real"].get("n_cases")), None)
    if real:
        lines.append(
            f"Real CT: {real['n_cases']} slices, {real['n_kidney']} with kidney; predicting all "
            f"background scores a mean kidney+tumor Dice of {real['all_background_dice']:.4f} "
            "over all of them (the figure a model must beat), 0 over those with kidney."
        )
    volume = next((r["real_volume"] for r in rows if r["real_volume"].get("n_cases")), None)
    if volume:
        lines.append(
            f"Real volume: {volume['n_cases']} whole CT volume(s) never trained on, scored after "
            "post-processing; all background scores 0 on a volume with kidney."
        )
    if missing:
        lines.append("Not trained (no run folder with config.json): " + ", ".join(missing) + ".")
    return "\n".join(lines) + "\n"


def collect(runs: Path, names: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    rows, missing = [], []
    for name in names:
        row = model_row(runs / name, name)
        if row is None:
            missing.append(name)
        else:
            rows.append(row)
    return rows, missing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runs", required=True, type=Path, help="folder of run folders RUNS/MODEL/")
    p.add_argument(
        "--models",
        default=",".join(models.MODEL_NAMES),
        help="comma-separated models, in table order (default: all seven)",
    )
    p.add_argument("--output", type=Path, help="write the Markdown table here (and OUTPUT .json)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in models.MODEL_NAMES]
    if unknown:
        p.error(f"unknown models {unknown}; known: {', '.join(models.MODEL_NAMES)}")
    try:
        rows, missing = collect(args.runs, names)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: {args.runs}: no run folder of {', '.join(names)}", file=sys.stderr)
        return 2
    rendered = markdown(rows, missing)
    if args.output is None:
        sys.stdout.write(rendered)
        return 0
    tmp = atomic_path(args.output)
    try:
        tmp.write_text(rendered)
        os.replace(tmp, args.output)
    finally:
        tmp.unlink(missing_ok=True)
    write_json_atomic({"rows": rows, "not_trained": missing}, args.output.with_suffix(".json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

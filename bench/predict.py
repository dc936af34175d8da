"""Benchmark: inference time per CT volume, and how much of it the network takes.

Volumes: synthetic CTs of real KiTS19 geometry (``preprocess.synthetic`` around real label maps;
generation not timed). Models: each of --models at full size with random initial weights, in a
temporary run folder laid out as ARCHITECTURE.md describes (config.json + checkpoint, made with
``tests/inference_runs.make_run``), loaded with ``train.inference.load_model``.

Each volume goes through ``train.predict.predict_job``, what ``python -m train.predict`` runs per
input, which reports its time split: read (NIfTI to HU array), preprocess (window, resize),
network (the model's forward passes, 3D windows blended), resample+write (probabilities back to
the original grid, argmax, NIfTI written). The wall time around the call is measured too; the
network's share is network seconds / wall seconds. The model is loaded and its prediction
function traced on a dummy volume first (recorded, not part of the per-volume times): those
costs are once per process, not per volume.

Target: >= 80 % of a volume's wall time in the network, for each model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file, bench/ would shadow the train package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Keras 2, before TensorFlow is imported

from bench import common  # noqa: E402
from preprocess.kits import parse_case_list  # noqa: E402

NAME = "predict"
DEFAULT_MODELS = ("unet2d", "unet3d")
DEFAULT_CASES = [12, 6]  # 89 slices at 5 mm and 157 slices at 3 mm, 512x512
QUICK_CASES = [61, 113]  # two of the small committed maps (29 and 40 slices, 128x128)
QUICK_OPTIONS = {"base_filters": 2}
NETWORK_SHARE_TARGET = 0.8


def build_parser() -> argparse.ArgumentParser:
    p = common.base_parser(NAME, __doc__)
    p.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help="models, comma-separated (default unet2d,unet3d)",
    )
    p.add_argument(
        "--labels",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"KiTS19 label maps (default {common.SHARED_LABELS} if present, else the small "
        "committed ones; --quick: the small ones)",
    )
    p.add_argument(
        "--cases",
        type=parse_case_list,
        default=None,
        metavar="LIST",
        help=f"case ids (default {','.join(map(str, DEFAULT_CASES))} with the shared maps; "
        f"--quick or the small maps: {','.join(map(str, QUICK_CASES))}; other folders: the "
        "first two)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="slices (2D) or windows (3D) per batch (default: train.predict's, 32 and 2)",
    )
    return p


def model_shape(name: str, quick: bool) -> tuple[tuple[int, ...], dict[str, Any]]:
    """Input shape and options: the model's full size, or a tiny one for --quick."""
    import models

    if not quick:
        return tuple(models.default_input_shape(name)), {}
    side = max(32, models.required_stride(name))
    shape = (8, side, side, 3) if models.is_3d(name) else (side, side, 3)
    return shape, QUICK_OPTIONS if name in ("unet2d", "unet3d") else {"width": 0.125}


def warm_up(loaded: Any, batch_size: int | None) -> float:
    """Trace the prediction function for full and partial batches on a dummy volume; seconds."""
    import numpy as np

    from train.inference import default_batch_size, preprocessing_params, segment_volume

    prep = preprocessing_params(loaded.config)
    is_3d = prep.block_depth is not None
    batch = batch_size or default_batch_size(is_3d)
    # 2D: one full batch and one partial one; 3D: windows at 0, depth/2 and depth (overlap 0.5)
    n_slices = 2 * prep.block_depth if is_3d else batch + 1
    volume = np.random.default_rng(0).normal(0, 300, (n_slices, 64, 64)).astype(np.float32)
    with common.Stopwatch() as sw:
        segment_volume(loaded.model, volume, (1.0, 1.0), loaded.config, batch_size)
    return sw.seconds


def bench_model(
    name: str, quick: bool, kits: Path, cases: list[int], batch_size: int | None, tmp: Path
) -> dict[str, Any]:
    from preprocess.kits import IMAGING, case_folder, case_name
    from tests.inference_runs import make_run
    from train.inference import DEFAULT_OVERLAP, default_batch_size, load_model
    from train.predict import TIMING_KEYS, Job, predict_job

    shape, options = model_shape(name, quick)
    run_dir = make_run(tmp / f"run-{name}", name, shape, options)
    with common.Stopwatch() as load:
        loaded = load_model(run_dir)
    trace_seconds = warm_up(loaded, batch_size)
    print(
        f"  {name}: {loaded.model.count_params():,} parameters, input {list(shape)}; load "
        f"{load.seconds:.1f} s, first prediction (tracing) {trace_seconds:.1f} s",
        flush=True,
    )
    volumes = []
    for c in cases:
        job = Job(
            case_folder(kits, c) / IMAGING, tmp / "out" / f"{case_name(c)}.nii.gz", case_name(c)
        )
        with common.Stopwatch() as wall:
            times = predict_job(
                loaded, job, batch_size, DEFAULT_OVERLAP, None, False, tmp / "overlays", False
            )
        row: dict[str, Any] = {"case": case_name(c), "wall_seconds": wall.seconds}
        row.update({k: times[k] for k in TIMING_KEYS})
        row["unaccounted"] = wall.seconds - sum(times[k] for k in TIMING_KEYS)
        row["network_share"] = times["network"] / wall.seconds
        volumes.append(row)
        split = ", ".join(f"{k} {times[k]:.2f}" for k in TIMING_KEYS)
        print(
            f"  {name} {case_name(c)}: {wall.seconds:7.2f} s ({split}); network "
            f"{100 * row['network_share']:.0f} %",
            flush=True,
        )
    total = sum(v["wall_seconds"] for v in volumes)
    shares = {f"{k}_share": sum(v[k] for v in volumes) / total for k in TIMING_KEYS}
    return {
        "input_shape": list(shape),
        "options": options,
        "n_params": int(loaded.model.count_params()),
        "batch_size": batch_size or default_batch_size(len(shape) == 4),
        "overlap": DEFAULT_OVERLAP if len(shape) == 4 else None,
        "load_seconds": load.seconds,
        "first_prediction_seconds": trace_seconds,
        "seconds_per_volume": total / len(volumes),
        "slices_per_s": sum(r["shape"][0] for r in common.case_table(kits, cases)) / total,
        "network_share": shares["network_share"],
        "shares": shares,
        "volumes": volumes,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = common.BenchRun(NAME, args)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    labels = args.labels or (common.SMALL_LABELS if args.quick else common.default_labels_dir())
    n_cases = None
    cases = args.cases
    if cases is None:
        if labels == common.SHARED_LABELS:
            cases = DEFAULT_CASES
        elif labels == common.SMALL_LABELS:
            cases = QUICK_CASES
        else:  # another folder of label maps: its first two cases
            n_cases = 2
    if labels == common.SMALL_LABELS:
        run.note("small committed label maps (128x128, <= 40 slices): not the real geometry")

    import tensorflow as tf

    measurements: dict[str, Any] = {"models": {}}
    with common.work_folder(args.cache) as cache, tempfile.TemporaryDirectory() as tmp:
        print(f"generating synthetic cases from {labels} in {cache} (not timed) ...", flush=True)
        kits, ids, _ = common.make_kits(cache, labels_dir=labels, cases=cases, n_cases=n_cases)
        measurements["cases"] = common.case_table(kits, ids)
        for name in names:
            measurements["models"][name] = bench_model(
                name, args.quick, kits, ids, args.batch_size, Path(tmp)
            )
    targets = [
        common.Target(
            f"network_share_{name}",
            f"models.{name}.network_share",
            ">=",
            NETWORK_SHARE_TARGET,
            "",
            f"{name}: network seconds / wall seconds per volume (read, preprocess, "
            "resample+write are the rest)",
        )
        for name in names
    ]
    info = [
        common.Info(f"seconds_per_volume_{name}", f"models.{name}.seconds_per_volume", "s")
        for name in names
    ]
    parameters = {
        "models": names,
        "labels": Path(labels).name,  # the folder's name: results name no machine's path
        "cases": ids,
        "batch_size": args.batch_size,
        "tensorflow_threads": {
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
            "note": "0 = TensorFlow's default (all cores)",
        },
        "weights": "random initialisation (tests/inference_runs.make_run)",
        "postprocess": False,
        "overlays": False,
    }
    run.finish(parameters, measurements, targets, info)
    return 0


if __name__ == "__main__":
    common.run_main(main)

"""Segment CT volumes with a trained model: NIfTI in, uint8 label NIfTI (0/1/2) out.

    python -m train.predict --run RUN_DIR --input CASE_DIR [more ...] --output DIR
    python -m train.predict --weights FILE --model NAME --input scan.nii.gz --output DIR

Each input is a KiTS19 case folder (``case_XXXXX/`` with ``imaging.nii.gz``), a folder of such
case folders, or a NIfTI file. The prediction is written on the input's exact grid (same shape,
affine and header, voxel type uint8) as ``DIR/case_XXXXX.nii.gz`` for case folders and
``.../<folder>/imaging.nii.gz`` files, else ``DIR/<input stem>_seg.nii.gz``; files are written
under a temporary name and renamed, so a crash never leaves half a file.

Exit codes: 0 all volumes written; 2 bad input (not a NIfTI, not 3D, oblique or non-axial
orientation, non-numeric voxel type, NaN/inf values, weights that do not fit the model, ...),
the message names the file; 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from preprocess.kits import CASE_RE, IMAGING
from train.inference import (
    DEFAULT_OVERLAP,
    InferenceError,
    LoadedModel,
    TextProgress,
    check_ct_header,
    check_inference_args,
    format_seconds,
    keep_largest_components,
    labels_to_original,
    load_model,
    predict_volume,
    preprocessing_params,
    read_ct,
    write_labels,
    write_overlays,
)

EXIT_BAD_INPUT = 2
TIMING_KEYS = ("read", "preprocess", "network", "resample+write")


@dataclass(frozen=True)
class Job:
    """One input volume and where its prediction goes."""

    source: Path  # the NIfTI file
    output: Path  # DIR/<name>.nii.gz
    stem: str  # name without suffix, also used for overlay PNGs


def _nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def output_stem(source: Path) -> str:
    """``case_00123`` for ``case_00123/imaging.nii.gz`` (any ``<folder>/imaging.nii.gz``
    gives the folder's name), else ``<file stem>_seg``."""
    if source.name == IMAGING and source.parent.name not in ("", "."):
        return source.resolve().parent.name
    return f"{_nifti_stem(source)}_seg"


def resolve_inputs(inputs: list[str], output_dir: Path) -> list[Job]:
    """Expand ``--input`` arguments into jobs; InferenceError for missing paths or clashes."""
    sources: list[Path] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            if (path / IMAGING).is_file():
                sources.append(path / IMAGING)
                continue
            cases = sorted(
                p / IMAGING
                for p in path.iterdir()
                if p.is_dir() and CASE_RE.match(p.name) and (p / IMAGING).is_file()
            )
            if not cases:
                raise InferenceError(
                    f"{path}: folder holds neither {IMAGING} nor case_XXXXX/{IMAGING} folders"
                )
            sources.extend(cases)
        elif path.is_file():
            sources.append(path)
        else:
            raise InferenceError(f"{path}: input not found")
    jobs: list[Job] = []
    seen: dict[Path, Path] = {}
    for source in sources:
        stem = output_stem(source)
        output = output_dir / f"{stem}.nii.gz"
        if output in seen:
            raise InferenceError(
                f"{source}: its output {output} would overwrite the prediction of {seen[output]}"
            )
        if output.resolve() == source.resolve():
            raise InferenceError(f"{source}: the output would overwrite the input itself")
        seen[output] = source
        jobs.append(Job(source, output, stem))
    return jobs


def parse_overlay_slices(text: str | None) -> list[int] | None | bool:
    """``--overlay-slices``: None/absent -> False (no overlays), 'auto' -> None (pick the three
    slices with most predicted kidney+tumor), 'N,M,...' -> those slice numbers (0-based)."""
    if text is None:
        return False
    if text.strip().lower() == "auto":
        return None
    if not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", text):
        raise argparse.ArgumentTypeError(
            f"expected 'auto' or slice numbers like 10,40; got {text!r}"
        )
    return sorted({int(v) for v in text.split(",")})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.predict",
        description=(
            "Segment kidney and tumor in CT volumes with a trained model.\n\n"
            "Inputs: KiTS19 case folders (case_XXXXX/imaging.nii.gz), folders of case folders,\n"
            "or NIfTI files; CT in HU, array (slices, H, W), axial (the affine maps array axis 0\n"
            "to world z, not oblique). Outputs: uint8 NIfTI label maps (0 background, 1 kidney,\n"
            "2 tumor) with the input's shape, affine and header, as DIR/case_XXXXX.nii.gz or\n"
            "DIR/<input stem>_seg.nii.gz. The preprocessing (HU window, resizing, channels) is\n"
            "read from the run's config.json, so it is exactly what training used."
        ),
        epilog=(
            "Examples:\n"
            "  python -m train.predict --run runs/unet2d --input data/kits19/case_00200 "
            "--output preds\n"
            "  python -m train.predict --weights model_weights/unet3d.weights.h5 --model unet3d "
            "--input scan.nii.gz --output preds --postprocess --overlay-slices auto\n\n"
            "Exit codes: 0 success; 2 bad input (message names the file); 1 unexpected error."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("model (a run folder, or a weights file and a model name)")
    src.add_argument(
        "--run",
        metavar="RUN_DIR",
        help="training run folder: config.json and checkpoints/best.weights.h5 "
        "(latest.weights.h5 if there is no best)",
    )
    src.add_argument(
        "--weights",
        metavar="FILE",
        help="Keras .weights.h5 file; with --run it replaces the run's checkpoint. Without "
        "--run, config.json is looked for beside FILE or in its parent folder; if there is "
        "none, the thesis's preprocessing (HU -512..512, 128x128, 3 channels) and the model's "
        "default options are assumed",
    )
    src.add_argument("--model", metavar="NAME", help="model name (e.g. unet2d, unet3d)")
    io = p.add_argument_group("input and output")
    io.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="case folder(s) (case_XXXXX/imaging.nii.gz), folder(s) of case folders, or NIfTI "
        "file(s)",
    )
    io.add_argument("--output", required=True, metavar="DIR", help="folder for the predictions")
    opt = p.add_argument_group("inference options")
    opt.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="slices per batch for 2D models (default 32), blocks per batch for 3D models "
        "(default 2)",
    )
    opt.add_argument(
        "--overlap",
        type=float,
        default=DEFAULT_OVERLAP,
        help="3D models: overlap of consecutive sliding windows as a fraction of the block "
        "depth (default %(default)s); overlapping predictions are blended with Gaussian "
        "weights (sigma = 0.125 x depth)",
    )
    opt.add_argument(
        "--postprocess",
        action="store_true",
        help="keep only the largest 3D connected components of kidney+tumor (see "
        "--components), removing small islands",
    )
    opt.add_argument(
        "--components",
        type=int,
        default=2,
        help="components kept by --postprocess (default %(default)s: two kidneys)",
    )
    opt.add_argument(
        "--overlay-slices",
        metavar="auto|N,M,...",
        help="also write PNG overlays (CT in grey, kidney red, tumor yellow) to DIR/overlays/: "
        "'auto' picks the 3 slices with most kidney+tumor predicted, or give 0-based slice "
        "numbers",
    )
    opt.add_argument(
        "--no-progress", action="store_true", help="no progress bar on stderr (timings still)"
    )
    return p


def _error(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def predict_job(
    loaded: LoadedModel,
    job: Job,
    batch_size: int | None,
    overlap: float,
    postprocess: int | None,
    overlay: list[int] | None | bool,
    overlay_dir: Path,
    progress: bool,
) -> dict[str, float]:
    """Predict one volume and write it (and its overlays); returns the time split in seconds."""
    times = dict.fromkeys(TIMING_KEYS, 0.0)
    t0 = time.perf_counter()
    hu, img = read_ct(job.source)
    times["read"] = time.perf_counter() - t0
    bar = TextProgress(f"  {job.stem}") if progress else None
    probs = predict_volume(loaded.model, hu, loaded.config, batch_size, overlap, bar, times)
    t1 = time.perf_counter()
    labels = labels_to_original(probs, hu.shape)
    if postprocess:
        labels = keep_largest_components(labels, postprocess)
    write_labels(labels, img, job.output)
    if overlay is not False:
        prep = preprocessing_params(loaded.config)
        write_overlays(hu, labels, overlay_dir, job.stem, overlay, (prep.hu_min, prep.hu_max))
    times["resample+write"] = time.perf_counter() - t1
    return times


def _timing_line(times: dict[str, float]) -> str:
    return ", ".join(f"{k} {format_seconds(times[k])}" for k in TIMING_KEYS)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_inference_args(parser, args)
    try:
        overlay = parse_overlay_slices(args.overlay_slices)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--overlay-slices: {exc}")

    output_dir = Path(args.output)
    try:
        jobs = resolve_inputs(args.input, output_dir)
    except InferenceError as exc:
        _error(str(exc))
        return EXIT_BAD_INPUT
    # Header checks of every input before the (slow) model load: a typo in the tenth file
    # should not be found after nine volumes.
    problems = []
    for job in jobs:
        try:
            check_ct_header(job.source)
        except InferenceError as exc:
            problems.append(str(exc))
    if problems:
        for msg in problems:
            _error(msg)
        return EXIT_BAD_INPUT
    try:
        loaded = load_model(args.run, args.weights, args.model)
    except InferenceError as exc:
        _error(str(exc))
        return EXIT_BAD_INPUT
    where = loaded.config_path or "no config.json: thesis defaults"
    print(f"model {loaded.name} from {loaded.weights_path} ({where})", flush=True)

    output_dir.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    totals = dict.fromkeys(TIMING_KEYS, 0.0)
    n_done = 0
    t_all = time.perf_counter()
    for job in jobs:
        t0 = time.perf_counter()
        try:
            times = predict_job(
                loaded,
                job,
                args.batch_size,
                args.overlap,
                args.components if args.postprocess else None,
                overlay,
                output_dir / "overlays",
                not args.no_progress,
            )
        except InferenceError as exc:  # bad voxel data: report, go on with the others
            _error(str(exc))
            failed.append(str(job.source))
            continue
        seconds = time.perf_counter() - t0
        n_done += 1
        for key in TIMING_KEYS:
            totals[key] += times[key]
        print(
            f"{job.stem}: {job.output}  {format_seconds(seconds)} s ({_timing_line(times)})",
            flush=True,
        )
    elapsed = time.perf_counter() - t_all
    if n_done:
        mean = {k: v / n_done for k, v in totals.items()}
        print(
            f"{n_done} volume(s) in {format_seconds(elapsed)} s, "
            f"{format_seconds(elapsed / n_done)} s per volume (mean: {_timing_line(mean)})",
            flush=True,
        )
    if failed:
        _error(f"{len(failed)} of {len(jobs)} input(s) failed: {', '.join(failed)}")
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())

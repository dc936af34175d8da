"""Segment CT volumes with a trained model: NIfTI in, uint8 label NIfTI (0/1/2) out.

    python -m train.predict --run RUN_DIR --input CASE_DIR [more ...] --output DIR
    python -m train.predict --weights FILE --model NAME -i scan.nii.gz -o DIR

Each input is a KiTS19 case folder (``case_XXXXX/`` or ``case_XXXXX_<suffix>/`` with
``imaging.nii.gz``), a folder of such case folders, or a NIfTI file, in any axis-aligned
orientation (RAS, LPS, KiTS19's, slices on any array axis). The prediction is written on the
input's exact grid (same array order, shape, affine and header, voxel type uint8) as
``DIR/<case folder>.nii.gz`` for case folders and ``.../<folder>/imaging.nii.gz`` files, else
``DIR/<input stem>_seg.nii.gz``; files are written under a temporary name and renamed, so a
crash never leaves half a file.

Exit codes: 0 all volumes written; 2 bad input (not a NIfTI, not 3D, oblique orientation,
non-numeric voxel type, NaN/inf values, weights that do not fit the model, an output that is a
file, ...), the message names the file; 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from preprocess.kits import IMAGING, CaseError, case_folders
from train.inference import (
    LoadedModel,
    add_inference_options,
    add_model_arguments,
    check_inference_args,
    check_output_dir,
    configure_logging,
    format_seconds,
    load_model,
    preprocessing_params,
    progress_bar,
    segment_volume,
)
from train.overlays import write_overlays
from train.postprocess import keep_largest_components
from train.volumes import InferenceError, open_ct, read_ct, write_labels

log = logging.getLogger("train.predict")

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
            try:
                folders = case_folders(path)
            except CaseError as exc:
                raise InferenceError(str(exc)) from exc
            cases = [f / IMAGING for _, f in sorted(folders.items()) if (f / IMAGING).is_file()]
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
            "or NIfTI files; CT in HU in any axis-aligned orientation (RAS, LPS, KiTS19's; the\n"
            "affine says which; oblique volumes are refused). Outputs: uint8 NIfTI label maps\n"
            "(0 background, 1 kidney, 2 tumor) with the input's array order, shape, affine and\n"
            "header, as DIR/<case folder>.nii.gz or DIR/<input stem>_seg.nii.gz. The\n"
            "preprocessing (HU window, resizing or in-plane spacing, channels) is read from the\n"
            "run's config.json, so it is exactly what training used."
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
    add_model_arguments(p)
    io = p.add_argument_group("input and output")
    io.add_argument(
        "-i",
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="case folder(s) (case_XXXXX/imaging.nii.gz), folder(s) of case folders, or NIfTI "
        "file(s)",
    )
    io.add_argument(
        "-o", "--output", required=True, metavar="DIR", help="folder for the predictions"
    )
    opt = add_inference_options(p)
    opt.add_argument(
        "--overlay-slices",
        metavar="auto|N,M,...",
        help="also write PNG overlays (CT in grey, kidney red, tumor yellow) to DIR/overlays/: "
        "'auto' picks the 3 slices with most kidney+tumor predicted, or give 0-based axial "
        "slice numbers in KiTS19's order (whatever the input's orientation)",
    )
    return p


def _error(msg: str) -> None:
    log.error("error: %s", msg)


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
    volume = read_ct(job.source)
    times["read"] = time.perf_counter() - t0
    labels = segment_volume(
        loaded.model,
        volume.hu,
        volume.spacing_yx,
        loaded.config,
        batch_size,
        overlap,
        progress_bar(f"  {job.stem}", progress),
        times,
        name=str(job.source),
    )
    t1 = time.perf_counter()
    if postprocess:
        labels = keep_largest_components(labels, postprocess)
    write_labels(labels, volume.image, volume.reorientation, job.output)
    if overlay is not False:
        prep = preprocessing_params(loaded.config)
        window = (prep.hu_min, prep.hu_max)
        write_overlays(volume.hu, labels, overlay_dir, job.stem, overlay, window)
    times["resample+write"] = times.pop("resample") + time.perf_counter() - t1
    return times


def _timing_line(times: dict[str, float]) -> str:
    return ", ".join(f"{k} {format_seconds(times[k])}" for k in TIMING_KEYS)


def header_problems(jobs: list[Job]) -> list[str]:
    """Header check of every input, before the (slow) model load: a typo in the tenth file
    should not be found after nine volumes."""
    problems = []
    for job in jobs:
        try:
            open_ct(job.source)
        except InferenceError as exc:
            problems.append(str(exc))
    return problems


def predict_all(
    loaded: LoadedModel, jobs: list[Job], args: argparse.Namespace, overlay: list[int] | None | bool
) -> list[str]:
    """Predict every job, logging each one's times and the mean; returns the failed inputs."""
    output_dir = Path(args.output)
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
        log.info(
            "%s: %s  %s s (%s)", job.stem, job.output, format_seconds(seconds), _timing_line(times)
        )
    if n_done:
        elapsed = time.perf_counter() - t_all
        log.info(
            "%d volume(s) in %s s, %s s per volume (mean: %s)",
            n_done,
            format_seconds(elapsed),
            format_seconds(elapsed / n_done),
            _timing_line({k: v / n_done for k, v in totals.items()}),
        )
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_inference_args(parser, args)
    try:
        overlay = parse_overlay_slices(args.overlay_slices)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--overlay-slices: {exc}")
    configure_logging()
    try:
        check_output_dir(Path(args.output), "--output")
        jobs = resolve_inputs(args.input, Path(args.output))
        problems = header_problems(jobs)
        for msg in problems:
            _error(msg)
        if problems:
            return EXIT_BAD_INPUT
        loaded = load_model(args.run, args.weights, args.model)
    except InferenceError as exc:
        _error(str(exc))
        return EXIT_BAD_INPUT
    where = loaded.config_path or "no config.json: thesis defaults"
    log.info("model %s from %s (%s)", loaded.name, loaded.weights_path, where)
    failed = predict_all(loaded, jobs, args, overlay)
    if failed:
        _error(f"{len(failed)} of {len(jobs)} input(s) failed: {', '.join(failed)}")
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())

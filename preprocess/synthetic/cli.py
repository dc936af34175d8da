"""Command line of the renderer: ``python -m preprocess.synthetic``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from preprocess.kits import CaseError, parse_case_list
from preprocess.mpi_utils import get_comm
from preprocess.synthetic.cases import (
    DEFAULT_ANALYTIC_CASES,
    DEFAULT_SIZE,
    DEFAULT_SLICES,
    RECORD,
    generate,
)
from preprocess.synthetic.randomize import ASPECTS, MODES, PHASES, RandomizeConfig


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _case_list(text: str) -> list[int]:
    try:
        ids = parse_case_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if not ids:
        raise argparse.ArgumentTypeError(f"no case ids in {text!r}")
    return ids


DESCRIPTION = (
    "Write a synthetic KiTS19-format dataset: OUT/case_XXXXX/imaging.nii.gz (int16 HU,\n"
    "(slices, H, W), KiTS19 affine with the case's spacing) and segmentation.nii.gz\n"
    "(uint8: 0 background, 1 kidney, 2 tumor).\n\n"
    "Anatomy source:\n"
    "  --labels DIR  real KiTS19 label maps (case_XXXXX_segmentation.nii.gz files, or\n"
    "                case_XXXXX/segmentation.nii.gz folders). Each output keeps its label\n"
    "                map exactly (same case id, shape, spacing from the file's affine)\n"
    "                unless --max-slices/--size shrink it, and gets a CT rendered around\n"
    "                its kidneys.\n"
    "  (none)        analytic cases: two bean-shaped kidneys with cortex, medulla and\n"
    "                sinus; tumors of 3-45 mm radius in ~80% of cases; geometry, slice\n"
    "                spacing (1-5 mm) and field of view (512 px at 0.6-1.0 mm) vary.\n\n"
    "The CT is a portal/nephrographic-phase abdomen: air -1000, fat ~-100, muscle\n"
    "40-60, liver 100-130, kidney cortex 150-200 over a darker medulla, bone (cortex\n"
    "700-1200, cancellous 200-300), bowel with gas, heterogeneous tumors (~35-130 HU,\n"
    "necrotic cores, enhancing rims), blur, a smooth gain field and noise (10-20 HU).\n\n"
    "Each case is seeded from (--seed, case id): identical whichever cases are generated\n"
    "and however many MPI ranks share the work (mpirun -np N python -m\n"
    "preprocess.synthetic ...; ranks take cases round robin, rank 0 prints progress).\n"
    "Existing complete cases (both files) are skipped unless --overwrite; files are\n"
    "written atomically, so an interrupted run can simply be restarted.\n\n"
    "Domain randomisation (--randomize full): every case draws its own contrast phase\n"
    "(unenhanced to excretory), tissue HU, tumor look relative to the kidney (hypo-,\n"
    "iso-, hyper-enhancing), noise level and grain, blur, slice profile, reconstruction\n"
    "kernel, bias field, habitus and bowel content, seeded from (--seed, case id); the\n"
    "anatomy and labels stay those of --randomize none, which is the look above.\n"
    f"{RECORD} beside the cases records each case's source, options and drawn style."
)
EPILOG = (
    "examples:\n"
    "  python -m preprocess.synthetic --out data/synth --n-cases 12\n"
    "  python -m preprocess.synthetic --out data/test --first-id 200 --n-cases 10\n"
    "  python -m preprocess.synthetic --out data/kits_synth \\\n"
    "      --labels kits19/data --cases 0-9,12 --randomize full\n"
    "  python -m preprocess.synthetic --out data/small --labels DIR --n-cases 3 \\\n"
    "      --max-slices 32 --size 128\n\n"
    "exit status: 0 success, 2 bad input (message 'error: ...' on stderr)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m preprocess.synthetic",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument(
        "--labels",
        type=Path,
        metavar="DIR",
        help="folder of real KiTS19 label maps to render CTs around (default: analytic cases)",
    )
    parser.add_argument(
        "--cases",
        type=_case_list,
        metavar="LIST",
        help="case ids, e.g. '0-9,12' (with --labels: a subset of the label maps, all must "
        "exist; without: the analytic case ids to make, instead of --first-id/--n-cases)",
    )
    parser.add_argument(
        "--n-cases",
        type=_positive_int,
        metavar="N",
        help=f"with --labels: only the first N (of --cases or of all maps); without: make N "
        f"analytic cases (default {DEFAULT_ANALYTIC_CASES})",
    )
    parser.add_argument(
        "--first-id",
        type=int,
        metavar="ID",
        help="analytic only: id of the first case (default 0), e.g. 200 for a test split",
    )
    parser.add_argument(
        "--slices",
        type=_positive_int,
        metavar="N",
        help=f"analytic only: slices per case (default {DEFAULT_SLICES})",
    )
    parser.add_argument(
        "--size",
        type=int,
        metavar="PX",
        help=f"in-plane size. Analytic: size x size pixels (default {DEFAULT_SIZE}; the field "
        "of view stays that of a 512 px scan, pixels get coarser). With --labels: resize the "
        "label maps to PX x PX (nearest neighbour; spacing scaled to match), for small tests; "
        "default: keep the original size",
    )
    parser.add_argument(
        "--max-slices",
        type=_positive_int,
        metavar="N",
        help="with --labels: crop each case to at most N slices centred on the kidneys "
        "(default: keep all)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed (>= 0, default 0); same seed, same data"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="regenerate cases that already exist"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    _add_randomize_options(parser)
    return parser


def _names(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        unknown = sorted(set(names) - set(allowed))
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}, got {text!r}")
        return names

    return parse


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}") from exc
    if not 0 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 0 <= LOW <= HIGH, got {text!r}")
    return lo, hi


def _add_randomize_options(parser: argparse.ArgumentParser) -> None:
    default = RandomizeConfig()
    group = parser.add_argument_group("domain randomisation (per case, from --seed and case id)")
    group.add_argument(
        "--randomize",
        choices=MODES,
        default=default.mode,
        help="none: the portal-phase look above, bit-identical to earlier datasets; full: draw "
        "the aspects of --randomize-aspects per case (default none)",
    )
    group.add_argument(
        "--randomize-aspects",
        type=_names(ASPECTS),
        default=default.aspects,
        metavar="LIST",
        help=f"what --randomize full draws (default all: {','.join(ASPECTS)})",
    )
    group.add_argument(
        "--phases",
        type=_names(PHASES),
        default=default.phases,
        metavar="LIST",
        help="contrast phases drawn from, each entry equally likely (repeat one to weight it; "
        f"default {','.join(default.phases)})",
    )
    group.add_argument(
        "--noise-hu",
        type=_range,
        default=default.noise_hu,
        metavar="LOW,HIGH",
        help="range of the noise standard deviation in HU (default {:g},{:g})".format(
            *default.noise_hu
        ),
    )
    group.add_argument(
        "--blur-mm",
        type=_range,
        default=default.blur_mm,
        metavar="LOW,HIGH",
        help="range of the in-plane blur sigma in mm (default {:g},{:g})".format(*default.blur_mm),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.labels is not None:
        for opt, value in (("--first-id", args.first_id), ("--slices", args.slices)):
            if value is not None:
                parser.error(f"{opt} applies to analytic cases only (not with --labels)")
    elif args.max_slices is not None:
        parser.error("--max-slices applies with --labels only (use --slices)")
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    if args.size is not None and args.size < (1 if args.labels else 16):
        parser.error("--size too small")
    try:
        generate(
            args.out,
            labels_dir=args.labels,
            cases=args.cases,
            n_cases=args.n_cases,
            first_id=args.first_id or 0,
            n_slices=args.slices or DEFAULT_SLICES,
            size=args.size,
            max_slices=args.max_slices,
            seed=args.seed,
            randomize=RandomizeConfig(
                args.randomize, args.randomize_aspects, args.phases, args.noise_hu, args.blur_mm
            ),
            overwrite=args.overwrite,
            verbose=not args.quiet,
        )
    except CaseError as exc:
        if get_comm().rank == 0:  # every rank raises the same error; say it once
            print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

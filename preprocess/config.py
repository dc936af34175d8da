"""The options of a preprocessing run: one dataclass, from which the command line is generated.

Each :class:`PreprocessConfig` field carries its command-line flag, help text and parsing in its
metadata, so a default is written once (the field's) and shows in ``--help``, the manifest's
``parameters`` and the dataset identity alike.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from preprocess.kits import parse_case_list
from preprocess.resize import MASK_METHODS
from preprocess.splits import DEFAULT_RATIO, SPLIT_MODES

KINDS = ("slices", "blocks")
COMPRESSIONS = ("none", "lzf", "gzip")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1]")
    return value


def _compression(text: str) -> str | None:
    if text not in COMPRESSIONS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(COMPRESSIONS)}")
    return None if text == "none" else text


def _option(flags: str | tuple[str, ...], help: str, **argparse_kwargs: Any) -> dict[str, Any]:
    """Field metadata: the command-line flag(s), help, and further ``add_argument`` keywords;
    ``kinds`` limits the option to some dataset kinds."""
    flags = (flags,) if isinstance(flags, str) else flags
    return {"flags": flags, "help": help, **argparse_kwargs}


@dataclass
class PreprocessConfig:
    """Every option of a preprocessing run; all but the paths define the dataset's identity."""

    kind: str  # "slices" (2D) or "blocks" (3D): chosen by the command, not an option
    kits_dir: str = field(
        metadata=_option(
            "--kits",
            "KiTS19 folder of case_XXXXX/{imaging,segmentation}.nii.gz (read only)",
            required=True,
            metavar="KITS_DIR",
        )
    )
    out_dir: str = field(
        metadata=_option(
            ("--out", "--output"),
            "output dataset folder (new, or an interrupted run of the same options)",
            required=True,
            metavar="DATASET_DIR",
        )
    )
    image_size: int = field(
        default=128, metadata=_option("--image-size", "output slice side in pixels", type=int)
    )
    # set together with hu_max by --hu-window (see _add_hu_window)
    hu_min: float = -512.0  # the thesis's window
    hu_max: float = 512.0
    target_spacing: float | None = field(
        default=None,
        metadata=_option(
            "--target-spacing",
            "resample slices to this in-plane spacing (mm per pixel) from each case's own, "
            "then centre-crop or zero-pad to --image-size (default: each whole slice resized "
            "to --image-size, as in the thesis)",
            type=float,
            metavar="MM",
        ),
    )
    mask_method: str = field(
        default="area_rescue",
        metadata=_option(
            "--mask-method",
            "how label masks are resized (area_rescue keeps every small tumor)",
            choices=MASK_METHODS,
        ),
    )
    # Whole-volume inference meets slices without kidney, and a model that never saw one marks
    # kidney on them: a fraction of them can be kept.
    keep_empty: float = field(
        default=0.0,
        metadata=_option(
            "--keep-empty",
            "keep this fraction of the slices (3D: blocks) without kidney or tumor, drawn "
            "per case with --shuffle-seed; alone it keeps them all (default: all dropped, as "
            "in the thesis). Models for whole-volume inference need some, e.g. 0.3",
            type=_fraction,
            nargs="?",
            const=1.0,
            metavar="FRACTION",
        ),
    )
    block_depth: int = field(
        default=32,
        metadata=_option("--depth", "slices per 3D block", type=int, kinds=("blocks",)),
    )
    block_overlap: int = field(
        default=12,
        metadata=_option(
            "--overlap", "slices shared by consecutive blocks", type=int, kinds=("blocks",)
        ),
    )
    n_shards: int = field(
        default=4,
        metadata=_option(
            "--shards", "HDF5 shards per split (train with a number of ranks dividing it)", type=int
        ),
    )
    channels: int = field(
        default=3,
        metadata=_option(
            "--channels", "model input channels (the stored single channel is repeated)", type=int
        ),
    )
    cases: list[int] | None = field(
        default=None,
        metadata=_option(
            "--cases",
            "subset of case ids, e.g. 0-99,150 (default: all in KITS_DIR)",
            type=parse_case_list,
        ),
    )
    split_mode: str = field(
        default="auto",
        metadata=_option(
            "--split",
            "auto: thesis ranges (train 0-119,140-199 / val 120-139 / test 200-209) if cases "
            "exist in each, else proportional",
            choices=SPLIT_MODES,
        ),
    )
    split_ratio: list[float] = field(
        default_factory=lambda: list(DEFAULT_RATIO),
        metadata=_option(
            "--split-ratio",
            "proportions for proportional split",
            type=float,
            nargs=3,
            metavar=("TRAIN", "VAL", "TEST"),
        ),
    )
    split_seed: int = field(
        default=42, metadata=_option("--split-seed", "seed of the proportional split", type=int)
    )
    train_cases: list[int] | None = field(
        default=None,
        metadata=_option(
            "--train-cases",
            "explicit train case ids (with --val-cases/--test-cases)",
            type=parse_case_list,
        ),
    )
    val_cases: list[int] | None = field(
        default=None,
        metadata=_option("--val-cases", "explicit validation case ids", type=parse_case_list),
    )
    test_cases: list[int] | None = field(
        default=None,
        metadata=_option("--test-cases", "explicit test case ids", type=parse_case_list),
    )
    shuffle_seed: int = field(
        default=42,
        metadata=_option("--shuffle-seed", "seed of the sample order across shards", type=int),
    )
    compression: str | None = field(
        default=None,
        metadata=_option(
            "--compression",
            f"HDF5 compression of image and mask chunks ({', '.join(COMPRESSIONS)})",
            type=_compression,
        ),
    )
    keep_work: bool = field(
        default=False,
        metadata=_option(
            "--keep-work",
            "keep the per-case intermediate files in DATASET_DIR/.work",
            action="store_true",
        ),
    )

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
        """Raise ValueError naming the option that is out of range."""
        if self.kind not in KINDS:
            raise ValueError(f"kind must be 'slices' or 'blocks', not {self.kind!r}")
        if self.image_size < 8:
            raise ValueError(f"--image-size {self.image_size} is too small")
        if self.hu_max <= self.hu_min:
            raise ValueError(f"HU window [{self.hu_min}, {self.hu_max}] is empty")
        if self.target_spacing is not None and not self.target_spacing > 0:
            raise ValueError(f"--target-spacing {self.target_spacing} must be positive (mm)")
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


def _add_hu_window(parser: argparse.ArgumentParser) -> None:
    defaults = {f.name: f.default for f in fields(PreprocessConfig)}
    parser.add_argument(
        "--hu-window",
        type=float,
        nargs=2,
        default=(defaults["hu_min"], defaults["hu_max"]),
        metavar=("MIN", "MAX"),
        help="HU window clipped and scaled to 0..255 (default: %(default)s)",
    )


def build_parser(kind: str, prog: str, description: str) -> argparse.ArgumentParser:
    """The command line of ``kind`` ("slices" or "blocks"), generated from the config's fields."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for f in fields(PreprocessConfig):
        if f.name == "hu_min":
            _add_hu_window(parser)
        options = dict(f.metadata)
        if not options or kind not in options.pop("kinds", KINDS):
            continue
        flags = options.pop("flags")
        if "required" not in options:
            has_factory = f.default_factory is not MISSING
            options["default"] = f.default_factory() if has_factory else f.default
            if options["default"] not in (None, False) and "default" not in options["help"]:
                options["help"] += " (default: %(default)s)"
        parser.add_argument(*flags, dest=f.name, **options)
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def config_from_args(kind: str, args: argparse.Namespace) -> PreprocessConfig:
    """The config of parsed ``args`` (options of the other kind keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in fields(PreprocessConfig) if f.name in args}
    values["hu_min"], values["hu_max"] = (float(v) for v in args.hu_window)
    values["kits_dir"], values["out_dir"] = str(args.kits_dir), str(args.out_dir)
    if values.get("split_ratio") is not None:
        values["split_ratio"] = list(values["split_ratio"])
    return PreprocessConfig(kind=kind, **values)

"""The training run's options: one dataclass, from which the command line is made.

Every option is defined once, as a field of :class:`TrainConfig`: its default, its type and its
help text (``field(metadata=option(...))``). :func:`build_parser` generates the argparse options
from the fields (``--batch-size`` for ``batch_size``; a bool field gets ``--x`` and ``--no-x``),
and ``config.json`` records every field (:meth:`TrainConfig.to_dict`). Options whose default
depends on the model being 2D or 3D default to None and are filled by :meth:`TrainConfig.resolve`
from :data:`DEFAULTS_2D_3D`.

Defaults follow the thesis's shipped runs: Adam, lr 4e-4 for 2D and 1e-4 for 3D, batch 64 (2D) /
4 (3D) per rank, 35 epochs, 3 warm-up epochs, ReduceLROnPlateau patience 3 factor 0.95, L2 1e-4,
checkpoint every 6 epochs, seed 42 + rank, weighted Dice loss, tumor samples counted 4x for 3D
blocks.
"""

from __future__ import annotations

import argparse
import ast
import types
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any, get_type_hints

from models import MODEL_NAMES
from train.augment import INTENSITY_PRESETS, PROBABILITIES, intensity_config
from train.losses import LOSSES

# option -> (default for 2D models, default for 3D models), for options left at None
DEFAULTS_2D_3D: dict[str, tuple[Any, Any]] = {
    "batch_size": (64, 4),
    "lr": (4e-4, 1e-4),
    "tumor_factor": (1.0, 4.0),
}


def option(
    help: str,
    *,
    flag: str | None = None,
    type: Callable[[str], Any] | None = None,
    choices: Sequence[Any] | None = None,
    metavar: str | None = None,
) -> dict[str, Any]:
    """Field metadata for the command line: help text, and what argparse cannot infer.

    ``flag`` replaces the option's name (default ``--`` + the field name with dashes); ``type``
    parses the text (default: the field's type, for int, float and str).
    """
    return {"help": help, "flag": flag, "type": type, "choices": choices, "metavar": metavar}


def _key_values(text: str) -> dict[str, Any]:
    """'base_filters=16,dropout=0.1' -> {'base_filters': 16, 'dropout': 0.1}."""
    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def _intensity_probabilities(text: str) -> dict[str, float]:
    values = _key_values(text)
    try:
        intensity_config("none", values)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return values


def _factors(text: str) -> tuple[float, float, float]:
    parts = [float(v) for v in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("--class-factors takes bg,kidney,tumor (3 numbers)")
    return parts[0], parts[1], parts[2]


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"--mix-fraction must be in (0, 1), not {text}")
    return value


def _momentum(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"--bn-momentum must be in [0, 1), not {text}")
    return value


@dataclass
class TrainConfig:
    model: str = field(metadata=option("network to train", choices=MODEL_NAMES))
    data: str = field(
        metadata=option(
            "preprocessed dataset folder (manifest.json + shards)", metavar="DATASET_DIR"
        )
    )
    out: str = field(metadata=option("run folder (created)", metavar="RUN_DIR"))
    mix_data: str | None = field(
        default=None,
        metadata=option(
            "a second dataset preprocessed like --data (same kind, image size, channels, HU "
            "window): --mix-fraction of every training epoch comes from its train split; "
            "validation stays on --data",
            metavar="DATASET_DIR",
        ),
    )
    mix_fraction: float = field(
        default=0.0,
        metadata=option(
            "share (0 < F < 1) of every training epoch drawn from --mix-data",
            type=_fraction,
            metavar="F",
        ),
    )
    epochs: int = field(default=35, metadata=option("epochs to train (in all sessions)"))
    batch_size: int | None = field(default=None, metadata=option("samples per rank per step"))
    lr: float | None = field(
        default=None, metadata=option("base learning rate per rank (see --scale-lr)")
    )
    scale_lr: bool = field(
        default=True,
        metadata=option("multiply the learning rate by the number of ranks (Horovod's rule)"),
    )
    warmup_epochs: int = field(
        default=3, metadata=option("epochs of linear learning-rate warm-up (Horovod's)")
    )
    plateau_patience: int = field(
        default=3,
        metadata=option("epochs without improvement of --monitor before the lr is reduced"),
    )
    plateau_factor: float = field(
        default=0.95, metadata=option("factor of each learning-rate reduction")
    )
    min_lr: float = field(default=1e-7, metadata=option("lower bound of the learning rate"))
    early_stop_patience: int = field(
        default=10,
        metadata=option("epochs without improvement of --monitor before stopping (0: never)"),
    )
    monitor: str = field(
        default="val_weighted_jaccard",
        metadata=option(
            "metric for best checkpoint, plateau and early stopping (maximised unless it is a loss)"
        ),
    )
    loss: str = field(
        default="weighted_dice", metadata=option("training loss", choices=sorted(LOSSES))
    )
    loss_params: dict[str, float] = field(
        default_factory=dict,
        metadata=option(
            "parameters of the loss, e.g. alpha=0.7,beta=0.3 for tversky",
            type=_key_values,
            metavar="K=V,...",
        ),
    )
    class_factors: tuple[float, float, float] = field(
        default=(1.0, 1.0, 1.0),
        metadata=option(
            "multiply the dataset's balanced class weights by these",
            type=_factors,
            metavar="BG,KIDNEY,TUMOR",
        ),
    )
    tumor_factor: float | None = field(
        default=None,
        metadata=option("tumor samples count this many times per epoch"),
    )
    l2: float = field(default=1e-4, metadata=option("L2 weight regularisation"))
    bn_momentum: float | None = field(
        default=None,
        metadata=option(
            "momentum of every BatchNormalization layer's moving mean and variance (default: "
            "Keras's 0.99). Validation and inference use those moving statistics; after only a "
            "few hundred steps (short CPU runs) 0.99 leaves them near their initial values and "
            "validation far below training, 0.9 follows the weights within tens of steps",
            type=_momentum,
            metavar="M",
        ),
    )
    model_options: dict[str, Any] = field(
        default_factory=dict,
        metadata=option(
            "passed to models.build, e.g. base_filters=16",
            flag="--model-option",
            type=_key_values,
            metavar="K=V,...",
        ),
    )
    augment: bool = field(
        default=True,
        metadata=option("geometric augmentation per sample (flip, rotation, zoom, shift)"),
    )
    intensity_augment: str = field(
        default="none",
        metadata=option(
            "per-sample intensity augmentation of the training images (noise, blur, "
            "brightness, contrast, low resolution, gamma): nnunet = nnU-Net's probabilities "
            "and ranges, strong = more often and wider (for synthetic CT meant for real scans)",
            choices=list(INTENSITY_PRESETS),
        ),
    )
    intensity_p: dict[str, float] = field(
        default_factory=dict,
        metadata=option(
            "override the preset's probability per sample of some transforms, e.g. "
            "noise=0.3,gamma=0 (names: " + ",".join(n[:-2] for n in PROBABILITIES) + ")",
            type=_intensity_probabilities,
            metavar="NAME=P,...",
        ),
    )
    checkpoint_every: int = field(
        default=6,
        metadata=option("save the latest checkpoint every k epochs (and at the end)"),
    )
    keep_every: int = field(
        default=0,
        metadata=option(
            "also keep the weights of every K-th epoch (of those checkpointed) in "
            "checkpoints/epochs/, for choosing among them on whole validation volumes with "
            "train.select_checkpoint (0: keep only the latest and the best)",
            metavar="K",
        ),
    )
    seed: int = field(default=42, metadata=option("seeds are seed + rank"))
    amp: bool = field(default=False, metadata=option("mixed precision (float16, loss scaling)"))
    xla: bool = field(default=False, metadata=option("compile the train step with XLA"))
    workers: int = field(default=2, metadata=option("augmentation threads per rank"))
    threads: int = field(
        default=0,
        metadata=option("TensorFlow intra-op threads per rank (0: TensorFlow decides)"),
    )
    max_steps: int = field(
        default=0,
        metadata=option("cap training steps per epoch (for demos and tests; 0: full epochs)"),
    )
    stop_at: float | None = field(
        default=None,
        metadata=option(
            "stop once --monitor reaches VALUE (e.g. a demo's target)", metavar="VALUE"
        ),
    )
    time_limit: float = field(
        default=0.0,
        metadata=option(
            "stop after the first epoch that ends past this many seconds of training, saving "
            "a checkpoint: set it below the job's walltime so a resubmitted job resumes from "
            "there (0: no limit)",
            metavar="SECONDS",
        ),
    )
    deadline: float = field(
        default=0.0,
        metadata=option(
            "the time (seconds since 1970) training must be done by, e.g. the job's walltime "
            "end minus the time copying results back takes: after each epoch, training stops "
            "with a checkpoint unless the next epoch, as long as the longest so far, ends "
            "before it (0: none)",
            metavar="UNIX_TIME",
        ),
    )
    require_gpu: bool = field(
        default=False,
        metadata=option(
            "stop at start-up (exit 2) when TensorFlow sees no GPU, instead of training on "
            "the CPU (what a job that asked for GPUs wants)"
        ),
    )
    resume: bool = field(
        default=False,
        metadata=option("continue RUN_DIR from its latest checkpoint (weights, optimizer, epoch)"),
    )
    init_weights: str = field(
        default="",
        metadata=option(
            "start from these weights (a .weights.h5 of the same model and options, e.g. "
            "model_weights/unet3d/checkpoints/best.weights.h5) instead of a random "
            "initialisation: fine-tuning on new data; the optimizer starts afresh. Ignored "
            "with --resume, which continues from the run's own checkpoint",
            metavar="WEIGHTS_H5",
        ),
    )
    record_samples: bool = field(
        default=False,
        metadata=option("rank 0 writes samples.json: the sample ids each rank trained on"),
    )
    check_sha256: bool = field(
        default=True,
        metadata=option("check each shard's SHA-256 against the manifest at start-up"),
    )
    verbose: int = field(
        default=1, metadata=option("0 quiet, 1 per epoch, 2 per step", choices=(0, 1, 2))
    )

    def resolve(self, is_3d: bool) -> TrainConfig:
        """Fill the 2D/3D-dependent defaults (:data:`DEFAULTS_2D_3D`) left at None."""
        for name, (default_2d, default_3d) in DEFAULTS_2D_3D.items():
            if getattr(self, name) is None:
                setattr(self, name, default_3d if is_3d else default_2d)
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class_factors"] = list(self.class_factors)
        return d


def _value_type(f: Field, hints: dict[str, Any]) -> Any:
    """int, float or str for ``x: int``, ``x: float | None`` ...; None for other types."""
    hint = hints[f.name]
    if isinstance(hint, types.UnionType):
        args = [a for a in hint.__args__ if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
    return hint if hint in (int, float, str) else None


def _default_text(f: Field) -> str:
    if f.name in DEFAULTS_2D_3D:
        default_2d, default_3d = DEFAULTS_2D_3D[f.name]
        return f" (default: {default_2d} for 2D, {default_3d} for 3D models)"
    if f.default is MISSING or f.default is None:
        return ""
    if isinstance(f.default, tuple):
        return f" (default: {','.join(map(str, f.default))})"
    return f" (default: {f.default})"


def add_option(parser: argparse.ArgumentParser, f: Field, hints: dict[str, Any]) -> None:
    """The argparse option of one TrainConfig field."""
    meta = f.metadata
    flag = meta.get("flag") or "--" + f.name.replace("_", "-")
    required = f.default is MISSING and f.default_factory is MISSING
    if hints[f.name] is bool:
        parser.add_argument(
            flag,
            dest=f.name,
            action=argparse.BooleanOptionalAction,
            default=f.default,
            help=meta["help"] + f" (default: {'on' if f.default else 'off'})",
        )
        return
    kwargs: dict[str, Any] = {
        "dest": f.name,
        "type": meta.get("type") or _value_type(f, hints),
        "help": meta["help"] + _default_text(f),
    }
    if required:
        kwargs["required"] = True
    else:
        kwargs["default"] = f.default if f.default_factory is MISSING else f.default_factory()
    for key in ("choices", "metavar"):
        if meta.get(key) is not None:
            kwargs[key] = meta[key]
    if kwargs["type"] is None:
        raise TypeError(f"TrainConfig.{f.name}: give option(type=...) for its command line")
    parser.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The command line of train.train, one option per TrainConfig field."""
    p = argparse.ArgumentParser(
        prog="python -m train.train",
        description="Distributed (Horovod) training of a kidney/tumor segmentation model on a "
        "sharded dataset made by preprocess.downsample (2D) or preprocess.blocks (3D). Run "
        "under horovodrun -np N, mpirun -np N or srun; each rank reads its own shards. Rank 0 "
        "writes the run folder: config.json, basic_info.txt, checkpoints/, logs/ (TensorBoard), "
        "history.csv.",
    )
    hints = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        add_option(p, f, hints)
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.mix_data is None) != (args.mix_fraction == 0.0):
        parser.error("--mix-data and --mix-fraction go together")
    return TrainConfig(**vars(args))

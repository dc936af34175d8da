"""The training run's options: one small config object, built from the command line.

Defaults follow the thesis's shipped runs (../shared/notes/seed-code.md): Adam, lr 4e-4 for 2D
and 1e-4 for 3D, batch 64 (2D) / 4 (3D) per rank, 35 epochs, 3 warm-up epochs,
ReduceLROnPlateau patience 3 factor 0.95, L2 1e-4, checkpoint every 6 epochs, seed 42 + rank,
weighted Dice loss, tumor samples counted 4x for 3D blocks.
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import asdict, dataclass, field
from typing import Any

from models import MODEL_NAMES
from train.losses import LOSSES


@dataclass
class TrainConfig:
    model: str
    data: str
    out: str
    epochs: int = 35
    batch_size: int | None = None  # per rank; None -> 64 (2D) or 4 (3D)
    lr: float | None = None  # base, per rank; None -> 4e-4 (2D) or 1e-4 (3D)
    scale_lr: bool = True  # multiply by the number of ranks (Horovod's rule)
    warmup_epochs: int = 3
    plateau_patience: int = 3
    plateau_factor: float = 0.95
    min_lr: float = 1e-7
    early_stop_patience: int = 10  # 0 disables early stopping
    monitor: str = "val_weighted_jaccard"
    loss: str = "weighted_dice"
    loss_params: dict[str, float] = field(default_factory=dict)
    class_factors: tuple[float, float, float] = (1.0, 1.0, 1.0)
    tumor_factor: float | None = None  # None -> 1 (2D) or 4 (3D), as the thesis
    l2: float = 1e-4
    bn_momentum: float | None = None  # None: the layers' own (Keras: 0.99)
    model_options: dict[str, Any] = field(default_factory=dict)
    augment: bool = True
    checkpoint_every: int = 6
    keep_every: int = 0  # also keep every k-th epoch's weights (checkpoints/epochs/); 0: none
    seed: int = 42
    amp: bool = False
    xla: bool = False
    workers: int = 2
    threads: int = 0  # TensorFlow intra-op threads per rank; 0 = TensorFlow's default
    max_steps: int = 0  # cap on training steps per epoch (demos, tests); 0 = whole epoch
    stop_at: float | None = None  # stop once the monitored metric reaches this value
    time_limit: float = 0.0  # seconds; stop (with a checkpoint) after the epoch that passes it
    resume: bool = False
    record_samples: bool = False
    check_sha256: bool = True
    verbose: int = 1

    def resolve(self, is_3d: bool) -> TrainConfig:
        """Fill the 2D/3D-dependent defaults."""
        if self.batch_size is None:
            self.batch_size = 4 if is_3d else 64
        if self.lr is None:
            self.lr = 1e-4 if is_3d else 4e-4
        if self.tumor_factor is None:
            self.tumor_factor = 4.0 if is_3d else 1.0
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class_factors"] = list(self.class_factors)
        return d


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


def _factors(text: str) -> tuple[float, float, float]:
    parts = [float(v) for v in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("--class-factors takes bg,kidney,tumor (3 numbers)")
    return parts[0], parts[1], parts[2]


def _momentum(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"--bn-momentum must be in [0, 1), not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.train",
        description="Distributed (Horovod) training of a kidney/tumor segmentation model on a "
        "sharded dataset made by preprocess.downsample (2D) or preprocess.blocks (3D). Run "
        "under horovodrun -np N, mpirun -np N or srun; each rank reads its own shards. Rank 0 "
        "writes the run folder: config.json, basic_info.txt, checkpoints/, logs/ (TensorBoard), "
        "history.csv.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, choices=MODEL_NAMES)
    p.add_argument(
        "--data",
        required=True,
        metavar="DATASET_DIR",
        help="preprocessed dataset folder (manifest.json + shards)",
    )
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (created)")
    p.add_argument("--epochs", type=int, default=35)
    p.add_argument(
        "--batch-size", type=int, default=None, help="per rank (default 64 for 2D, 4 for 3D models)"
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="base learning rate per rank (default 4e-4 2D, 1e-4 3D)",
    )
    p.add_argument(
        "--no-scale-lr",
        dest="scale_lr",
        action="store_false",
        help="do not multiply the learning rate by the number of ranks",
    )
    p.add_argument("--warmup-epochs", type=int, default=3)
    p.add_argument("--plateau-patience", type=int, default=3)
    p.add_argument("--plateau-factor", type=float, default=0.95)
    p.add_argument("--min-lr", type=float, default=1e-7)
    p.add_argument(
        "--early-stop-patience",
        type=int,
        default=10,
        help="epochs without improvement of --monitor before stopping (0: never)",
    )
    p.add_argument(
        "--monitor",
        default="val_weighted_jaccard",
        help="metric for best checkpoint, plateau and early stopping (maximised "
        "unless it is a loss)",
    )
    p.add_argument("--loss", default="weighted_dice", choices=sorted(LOSSES))
    p.add_argument(
        "--loss-params",
        type=_key_values,
        default={},
        metavar="K=V,...",
        help="e.g. alpha=0.7,beta=0.3 for tversky",
    )
    p.add_argument(
        "--class-factors",
        type=_factors,
        default=(1.0, 1.0, 1.0),
        metavar="BG,KIDNEY,TUMOR",
        help="multiply the dataset's balanced class weights by these",
    )
    p.add_argument(
        "--tumor-factor",
        type=float,
        default=None,
        help="tumor samples count this many times per epoch (default 1 for 2D, 4 for 3D)",
    )
    p.add_argument("--l2", type=float, default=1e-4, help="L2 weight regularisation")
    p.add_argument(
        "--bn-momentum",
        type=_momentum,
        default=None,
        metavar="M",
        help="momentum of every BatchNormalization layer's moving mean and variance (default: "
        "Keras's 0.99). Validation and inference use those moving statistics; after only a "
        "few hundred steps (short CPU runs) 0.99 leaves them near their initial values and "
        "validation far below training, 0.9 follows the weights within tens of steps",
    )
    p.add_argument(
        "--model-option",
        dest="model_options",
        type=_key_values,
        default={},
        metavar="K=V,...",
        help="passed to models.build, e.g. base_filters=16",
    )
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=6,
        help="save the latest checkpoint every k epochs (and at the end)",
    )
    p.add_argument(
        "--keep-every",
        type=int,
        default=0,
        metavar="K",
        help="also keep the weights of every K-th epoch (of those checkpointed) in "
        "checkpoints/epochs/, for choosing among them on whole validation volumes with "
        "train.select_checkpoint (0: keep only the latest and the best)",
    )
    p.add_argument("--seed", type=int, default=42, help="seeds are seed + rank")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16, loss scaling)")
    p.add_argument("--xla", action="store_true", help="compile the train step with XLA")
    p.add_argument("--workers", type=int, default=2, help="augmentation threads per rank")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="TensorFlow intra-op threads per rank (0: TensorFlow decides)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=0,
        help="cap training steps per epoch (for demos and tests; 0: full epochs)",
    )
    p.add_argument(
        "--stop-at",
        type=float,
        default=None,
        metavar="VALUE",
        help="stop once --monitor reaches VALUE (e.g. a demo's target)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="stop after the first epoch that ends past this many seconds of "
        "training, saving a checkpoint: set it below the job's walltime so a "
        "resubmitted job resumes from there (0: no limit)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue RUN_DIR from its latest checkpoint (weights, optimizer, epoch)",
    )
    p.add_argument(
        "--record-samples",
        action="store_true",
        help="rank 0 writes samples.json: the sample ids each rank trained on",
    )
    p.add_argument(
        "--no-check-sha256",
        dest="check_sha256",
        action="store_false",
        help="skip checking each shard's SHA-256 against the manifest at start-up",
    )
    p.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return TrainConfig(**vars(args))

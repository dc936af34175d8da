"""Inference core shared by ``train.predict``, ``train.evaluate`` and ``train.select_checkpoint``.

From a trained model to a label volume on a CT's canonical grid:

1. :func:`load_model` rebuilds the network from a run folder's ``config.json`` (or from a bare
   weights file plus a model name) and loads its weights, with an error naming the file and the
   model when they do not match.
2. :func:`segment_volume` replays training's preprocessing from ``config.json`` (HU window,
   whole-slice resize or fixed in-plane spacing: ``train.model_grid``), runs the network (2D:
   batches of slices; 3D: ``train.sliding_window``) and brings the class probabilities back to
   the slices' own grid, where it takes the argmax.

Reading and writing volumes in any orientation is ``train.volumes``; post-processing and
overlays are ``train.postprocess`` and ``train.overlays``. TensorFlow is imported only when a
model is built, so validating inputs and ``--help`` are fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from preprocess.config import PreprocessConfig
from preprocess.kits import CLASS_NAMES, N_CLASSES
from train.model_grid import grid_geometry, labels_from_grid, to_model_grid
from train.sliding_window import DEFAULT_OVERLAP, Progress, predict_windows
from train.volumes import InferenceError

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Keras 2, before TensorFlow is imported

if TYPE_CHECKING:  # pragma: no cover - typing only; keeps TensorFlow out of import time
    import tf_keras

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
CHECKPOINTS = "checkpoints"
WEIGHT_FILES = ("best.weights.h5", "latest.weights.h5")  # preference order in a run folder
# Preprocessing's own defaults (the thesis's), for a bare weights file without a config.json.
_PREPROCESS_DEFAULTS = {f.name: f.default for f in fields(PreprocessConfig)}
DEFAULT_NORMALIZATION = {
    "hu_min": float(_PREPROCESS_DEFAULTS["hu_min"]),
    "hu_max": float(_PREPROCESS_DEFAULTS["hu_max"]),
    "scale": "uint8",
}
DEFAULT_IMAGE_SIZE = int(_PREPROCESS_DEFAULTS["image_size"])
DEFAULT_CHANNELS = int(_PREPROCESS_DEFAULTS["channels"])


# --------------------------------------------------------------------------------------------
# Configuration and model loading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """What the model input needs, as recorded in config.json (see ARCHITECTURE.md)."""

    hu_min: float
    hu_max: float
    image_size: int
    channels: int
    block_depth: int | None  # slices per 3D block; None for 2D models
    target_spacing: float | None  # mm per pixel on the model grid; None: whole-slice resize


def default_config(model_name: str) -> dict[str, Any]:
    """A config.json-like dict for a bare weights file: the model's default input shape and the
    thesis's preprocessing (HU window [-512, 512], 128x128, 3 channels)."""
    import models

    shape = list(models.default_input_shape(model_name))
    return {
        "model": model_name,
        "model_options": {},
        "input_shape": shape,
        "n_classes": N_CLASSES,
        "class_names": list(CLASS_NAMES),
        "class_weights": None,
        "dataset": {
            "dir": None,
            "kind": "blocks" if models.is_3d(model_name) else "slices",
            "image_size": shape[-2],
            "block_depth": shape[0] if models.is_3d(model_name) else None,
            "channels": shape[-1],
            "normalization": dict(DEFAULT_NORMALIZATION),
            "target_spacing": None,
        },
        "defaults_used": True,
    }


def read_config(path: str | Path) -> dict[str, Any]:
    """Read a run's config.json; InferenceError naming the file if unreadable or incomplete."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InferenceError(f"{path}: cannot read run configuration: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model"), str):
        raise InferenceError(f"{path}: not a run config.json (no 'model' entry)")
    if config.get("input_shape") is None:
        raise InferenceError(f"{path}: no 'input_shape' entry")
    return config


def preprocessing_params(config: Mapping[str, Any]) -> Preprocessing:
    """The preprocessing recorded in ``config`` (config.json layout), checked for consistency.

    ``dataset.normalization`` gives the HU window, ``dataset.image_size`` and
    ``dataset.channels`` the slice size and channel count, ``dataset.target_spacing`` the
    in-plane spacing of the model grid (None: the thesis's whole-slice resize); missing entries
    fall back to ``input_shape`` and then to the thesis's defaults.
    """
    dataset = config.get("dataset") or {}
    norm = dataset.get("normalization") or DEFAULT_NORMALIZATION
    shape = list(config.get("input_shape") or [])
    is_3d = len(shape) == 4
    size = dataset.get("image_size") or (shape[-2] if len(shape) >= 3 else DEFAULT_IMAGE_SIZE)
    channels = dataset.get("channels") or (shape[-1] if shape else DEFAULT_CHANNELS)
    depth = None
    if is_3d:
        depth = shape[0] or dataset.get("block_depth")
        if not depth:
            raise ValueError("3D model without a block depth in input_shape or dataset")
    if shape and (shape[-3] not in (None, size) or shape[-2] not in (None, size)):
        raise ValueError(f"input_shape {shape} does not match image_size {size}")
    if shape and shape[-1] != channels:
        raise ValueError(f"input_shape {shape} does not match {channels} channels")
    hu_min, hu_max = float(norm["hu_min"]), float(norm["hu_max"])
    if not hu_max > hu_min:
        raise ValueError(f"empty HU window [{hu_min}, {hu_max}]")
    target = dataset.get("target_spacing")
    if target is not None and not float(target) > 0:
        raise ValueError(f"target_spacing {target} is not a positive number of mm")
    return Preprocessing(
        hu_min,
        hu_max,
        int(size),
        int(channels),
        int(depth) if depth else None,
        None if target is None else float(target),
    )


def checked_preprocessing(config: Mapping[str, Any], config_path: Path | None) -> Preprocessing:
    """:func:`preprocessing_params`, with problems raised as InferenceError naming the file."""
    try:
        return preprocessing_params(config)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        where = config_path or "default configuration"
        raise InferenceError(f"{where}: inconsistent preprocessing entries: {exc}") from exc


def is_3d_config(config: Mapping[str, Any]) -> bool:
    """True when ``config`` describes a 3D (block) model: a 4-D input shape."""
    return len(config["input_shape"]) == 4


@dataclass
class LoadedModel:
    """A model ready for inference, with where it came from."""

    model: tf_keras.Model
    config: dict[str, Any]
    weights_path: Path
    config_path: Path | None  # None: defaults were used (bare weights file)

    @property
    def name(self) -> str:
        return str(self.config["model"])

    @property
    def is_3d(self) -> bool:
        return is_3d_config(self.config)


def find_run_weights(run_dir: str | Path) -> Path:
    """``RUN_DIR/checkpoints/best.weights.h5``, else ``latest.weights.h5``."""
    folder = Path(run_dir) / CHECKPOINTS
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise InferenceError(f"{run_dir}: no {' or '.join(WEIGHT_FILES)} in {folder}")


def find_config_for_weights(weights: str | Path) -> Path | None:
    """config.json beside a weights file or in its parent (``RUN/checkpoints/x.h5``), or None."""
    weights = Path(weights)
    for folder in (weights.parent, weights.parent.parent):
        if (folder / CONFIG_NAME).is_file():
            return folder / CONFIG_NAME
    return None


def resolve_model_source(
    run_dir: str | Path | None = None,
    weights: str | Path | None = None,
    model_name: str | None = None,
) -> tuple[dict[str, Any], Path, Path | None]:
    """Work out (config, weights file, config path) from ``--run`` / ``--weights`` / ``--model``.

    ``run_dir``: its config.json and best (else latest) checkpoint; ``weights`` overrides the
    checkpoint. ``weights`` alone needs ``model_name``; its config.json is looked for beside the
    file and in its parent, else :func:`default_config` applies. Raises InferenceError.
    """
    if run_dir is None and weights is None:
        raise InferenceError("give a run folder (--run) or a weights file (--weights)")
    if run_dir is not None:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise InferenceError(f"{run_dir}: run folder not found")
        config_path: Path | None = run_dir / CONFIG_NAME
        if not config_path.is_file():
            raise InferenceError(f"{run_dir}: no {CONFIG_NAME} (not a training run folder?)")
        weights_path = Path(weights) if weights is not None else find_run_weights(run_dir)
    else:
        weights_path = Path(weights)
        config_path = find_config_for_weights(weights_path)
        if config_path is None and model_name is None:
            raise InferenceError(
                f"{weights_path}: no {CONFIG_NAME} beside it or in its parent; "
                "name the model with --model"
            )
    if not weights_path.is_file():
        raise InferenceError(f"{weights_path}: weights file not found")
    if config_path is not None:
        config = read_config(config_path)
        if model_name is not None and model_name != config["model"]:
            raise InferenceError(
                f"{config_path}: configured for model {config['model']!r}, "
                f"not {model_name!r} as requested with --model"
            )
    else:
        try:
            config = default_config(str(model_name))
        except ValueError as exc:  # unknown model name
            raise InferenceError(str(exc)) from exc
    return config, weights_path, config_path


def build_model(config: Mapping[str, Any]) -> tf_keras.Model:
    """Build the network described by ``config`` (weights not loaded)."""
    import models

    try:
        return models.build(
            config["model"],
            tuple(config["input_shape"]),
            int(config.get("n_classes", N_CLASSES)),
            **(config.get("model_options") or {}),
        )
    except (ValueError, TypeError) as exc:
        raise InferenceError(f"cannot build model {config['model']!r}: {exc}") from exc


def load_weights(model: tf_keras.Model, weights_path: Path, model_name: str) -> None:
    """``model.load_weights``; a mismatch (other model, other options) becomes InferenceError."""
    try:
        model.load_weights(str(weights_path))
    except Exception as exc:  # Keras raises ValueError, OSError, KeyError... for wrong files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, OSError):  # h5py could not open it at all
            raise InferenceError(
                f"{weights_path}: not a readable Keras HDF5 weights file: {first}"
            ) from exc
        raise InferenceError(
            f"{weights_path}: weights do not match model {model_name!r} "
            f"(input {model.input_shape[1:]}, {model.count_params():,} parameters): {first}"
        ) from exc


def load_model(
    run_dir: str | Path | None = None,
    weights: str | Path | None = None,
    model_name: str | None = None,
) -> LoadedModel:
    """Build the model of a run folder (or of ``weights`` + ``model_name``) and load its weights.

    See :func:`resolve_model_source` for how the files are found. Raises InferenceError naming
    the file when something is missing or the weights do not fit the model.
    """
    return instantiate(*resolve_model_source(run_dir, weights, model_name))


def instantiate(
    config: dict[str, Any], weights_path: Path, config_path: Path | None = None
) -> LoadedModel:
    """Check ``config``'s preprocessing entries, build its model and load ``weights_path``.

    The second half of :func:`load_model`, for callers that look at the configuration (and
    check their other inputs) before paying for the model build.
    """
    checked_preprocessing(config, config_path)
    model = build_model(config)
    load_weights(model, weights_path, config["model"])
    return LoadedModel(model, config, weights_path, config_path)


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------


def default_batch_size(is_3d: bool) -> int:
    """Slices per batch for 2D models (cheap per sample), blocks per batch for 3D models."""
    return 2 if is_3d else 32


def _run_network(
    model: Any,
    x: np.ndarray,
    prep: Preprocessing,
    batch_size: int,
    overlap: float,
    progress: Progress | None,
    name: str,
) -> np.ndarray:
    """(S, size, size) model input -> (S, size, size, C) float32 class probabilities."""

    def predict(batch: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict_on_batch(batch), np.float32)

    if prep.block_depth is not None:
        if x.shape[0] < prep.block_depth:
            log.info(
                "%s: %d slice(s), fewer than the 3D model's window of %d: padded with %d empty "
                "slice(s) for the prediction, which keeps only the %d real one(s)",
                name,
                x.shape[0],
                prep.block_depth,
                prep.block_depth - x.shape[0],
                x.shape[0],
            )
        return predict_windows(
            predict, x, prep.block_depth, prep.channels, overlap, batch_size, progress
        )
    outputs = []
    for start in range(0, x.shape[0], batch_size):
        batch = x[start : start + batch_size]
        outputs.append(predict(np.repeat(batch[..., None], prep.channels, axis=-1)))
        if progress:
            progress(min(start + batch_size, x.shape[0]), x.shape[0])
    return np.concatenate(outputs, axis=0)


def segment_volume(
    model: Any,
    hu: np.ndarray,
    spacing_yx: tuple[float, float] | None,
    config: Mapping[str, Any],
    batch_size: int | None = None,
    overlap: float = DEFAULT_OVERLAP,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
    name: str = "volume",
) -> np.ndarray:
    """(S, H, W) uint8 labels of a canonical (S, H, W) HU volume, on the same grid.

    ``spacing_yx`` (mm) is needed when the run resampled slices to a fixed spacing
    (``dataset.target_spacing``). ``model`` is anything with Keras's ``predict_on_batch``.
    ``progress(done, total)`` is called after each batch (slices or windows); ``timings`` (if
    given) receives ``preprocess``, ``network`` and ``resample`` seconds.
    """
    prep = preprocessing_params(config)
    if prep.target_spacing is not None and spacing_yx is None:
        raise ValueError(f"{name}: the run resamples to {prep.target_spacing} mm; spacing needed")
    batch_size = batch_size or default_batch_size(prep.block_depth is not None)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    geom = grid_geometry(hu.shape[1:], spacing_yx, prep.target_spacing, prep.image_size)
    x = to_model_grid(hu, geom, prep.hu_min, prep.hu_max)
    t1 = time.perf_counter()
    probs = _run_network(model, x, prep, batch_size, overlap, progress, name)
    t2 = time.perf_counter()
    labels = labels_from_grid(probs, geom)
    if timings is not None:
        for key, seconds in (
            ("preprocess", t1 - t0),
            ("network", t2 - t1),
            ("resample", time.perf_counter() - t2),
        ):
            timings[key] = timings.get(key, 0.0) + seconds
    return labels


# --------------------------------------------------------------------------------------------
# Shared by the command lines
# --------------------------------------------------------------------------------------------


def progress_bar(label: str, enabled: bool = True) -> Progress | None:
    """A tqdm progress callback on stderr, or None when disabled or stderr is no terminal
    (batch jobs' logs stay free of bar redraws)."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar: Any = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=label, leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


_CLI_HANDLER = "train-inference-cli"


def configure_logging() -> None:
    """Messages of the ``train`` loggers on the current stderr, one line each, INFO and up.

    Idempotent: a second call (another command run in the same process, as tests do) replaces
    the handler instead of doubling every line.
    """
    logger = logging.getLogger("train")
    for handler in [h for h in logger.handlers if h.get_name() == _CLI_HANDLER]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_CLI_HANDLER)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--run`` / ``--weights`` / ``--model``: where the model comes from (predict, evaluate)."""
    src = parser.add_argument_group("model (a run folder, or a weights file and a model name)")
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


def add_inference_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The options of running a model on volumes (predict, evaluate); returns their group."""
    opt = parser.add_argument_group("inference options")
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
        help="keep only the 3D connected components of kidney+tumor with the most kidney "
        "(see --components), removing islands and false positives away from the kidneys",
    )
    opt.add_argument(
        "--components",
        type=int,
        default=2,
        help="components kept by --postprocess (default %(default)s: two kidneys)",
    )
    opt.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (there is one only when stderr is a terminal)",
    )
    return opt


def check_inference_args(parser: Any, args: Any) -> None:
    """The command-line checks shared by train.predict and train.evaluate (parser.error exits)."""
    if args.run is None and args.weights is None:
        parser.error("give --run RUN_DIR, or --weights FILE (with --model NAME)")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if not 0.0 <= args.overlap < 1.0:
        parser.error("--overlap must be in [0, 1)")
    if args.components < 1:
        parser.error("--components must be >= 1")


def check_output_dir(path: Path, option: str) -> None:
    """An output folder must be a folder: an existing file there is refused (InferenceError)."""
    if path.exists() and not path.is_dir():
        raise InferenceError(f"{path}: {option} names an existing file, not a folder")


def format_seconds(t: float) -> str:
    """Seconds with a precision that suits their size (for timing lines)."""
    return f"{t:.2f}" if t < 10 else f"{t:.1f}" if t < 100 else f"{math.floor(t)}"

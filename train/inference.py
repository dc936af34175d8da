"""Inference core shared by ``train.predict`` and ``train.evaluate`` (no command line here).

From a trained model to a label volume on the CT's own grid:

1. :func:`load_model` rebuilds the network from a run folder's ``config.json`` (or from a bare
   weights file plus a model name) and loads its weights, with an error naming the file and the
   model when they do not match.
2. :func:`preprocess_volume` turns HU into the model input exactly as training saw it
   (``window_to_uint8`` -> ``resize_images`` -> ``/ 255`` -> channels repeated).
3. :func:`predict_volume` runs the network: 2D models on batches of slices, 3D models as a
   sliding window along the slice axis with Gaussian-weighted blending of overlapping blocks.
4. :func:`labels_to_original` upsamples the class probabilities to the original in-plane size and
   takes the argmax (uint8 labels 0/1/2); :func:`keep_largest_components` optionally removes
   small islands.

:func:`read_ct` / :func:`check_ct_header` validate an input NIfTI (3D, axial KiTS19-like
orientation, numeric dtype, finite values) and :func:`write_labels` writes a prediction on the
input's exact grid. Every problem with the user's input raises :class:`InferenceError`, whose
message names the file; the command lines turn it into exit code 2.

TensorFlow is imported only when a model is built, so validating inputs and ``--help`` are fast.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import nibabel as nib
import numpy as np
from scipy import ndimage

from preprocess.kits import atomic_path, save_nifti_atomic
from preprocess.resize import window_and_resize, window_to_uint8

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Keras 2, before TensorFlow is imported

if TYPE_CHECKING:  # pragma: no cover - typing only; keeps TensorFlow out of import time
    import tf_keras

CONFIG_NAME = "config.json"
CHECKPOINTS = "checkpoints"
WEIGHT_FILES = ("best.weights.h5", "latest.weights.h5")  # preference order in a run folder
#: The thesis's preprocessing, used when a bare weights file comes without a config.json.
DEFAULT_NORMALIZATION = {"hu_min": -512.0, "hu_max": 512.0, "scale": "uint8"}
DEFAULT_IMAGE_SIZE = 128
DEFAULT_CHANNELS = 3
#: Default overlap of consecutive 3D windows, as a fraction of the block depth (MLPerf: 0.5).
DEFAULT_OVERLAP = 0.5
#: Gaussian sigma as a fraction of the block depth (MLPerf's KiTS19 3D U-Net reference: 0.125).
GAUSSIAN_SIGMA_SCALE = 0.125
#: How far (in direction cosines) an affine may be from a signed permutation before it counts as
#: oblique. 0.01 is about 0.6 degrees: rounding noise in headers passes, a real tilt does not.
AFFINE_TOLERANCE = 1e-2
#: Slices resampled per OpenCV call in labels_to_original (bounds memory at full resolution).
_RESAMPLE_CHUNK = 16

Progress = Callable[[int, int], None]


class InferenceError(ValueError):
    """Unusable input (volume, weights, run folder); the message names the file and the problem."""


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


def default_config(model_name: str) -> dict[str, Any]:
    """A config.json-like dict for a bare weights file: the model's default input shape and the
    thesis's preprocessing (HU window [-512, 512], 128x128, 3 channels)."""
    import models

    shape = list(models.default_input_shape(model_name))
    return {
        "model": model_name,
        "model_options": {},
        "input_shape": shape,
        "n_classes": 3,
        "class_names": ["background", "kidney", "tumor"],
        "class_weights": None,
        "dataset": {
            "dir": None,
            "kind": "blocks" if models.is_3d(model_name) else "slices",
            "image_size": shape[-2],
            "block_depth": shape[0] if models.is_3d(model_name) else None,
            "channels": shape[-1],
            "normalization": dict(DEFAULT_NORMALIZATION),
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
    ``dataset.channels`` the slice size and channel count; missing entries fall back to
    ``input_shape`` and then to the thesis's defaults.
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
    return Preprocessing(hu_min, hu_max, int(size), int(channels), int(depth) if depth else None)


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
            int(config.get("n_classes", 3)),
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
# Preprocessing and prediction at model resolution
# --------------------------------------------------------------------------------------------


def _scaled_slices(hu: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """(S, H, W) HU -> (S, size, size) float32 in [0, 1], one channel, exactly as training.

    Training stored ``window_and_resize(hu)`` (= ``resize_images(window_to_uint8(hu))``,
    rounded uint8) and divided by 255; the same function and rounding are used here.
    """
    hu = np.asanyarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"expected a (slices, H, W) volume, got shape {hu.shape}")
    small = window_and_resize(hu, prep.hu_min, prep.hu_max, prep.image_size)
    return small.astype(np.float32) / np.float32(255.0)


def _with_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """Repeat a single-channel array to ``channels`` identical channels (last axis)."""
    return np.repeat(x[..., None], channels, axis=-1)


def preprocess_volume(hu: np.ndarray, config: Mapping[str, Any]) -> np.ndarray:
    """(S, H, W) HU -> (S, size, size, channels) float32 model input, exactly as in training.

    ``window_to_uint8`` (clip to the HU window, scale to 0..255) -> ``resize_images`` (area
    averaging, rounding to uint8) -> ``/ 255`` -> the one channel repeated ``channels`` times.
    """
    prep = preprocessing_params(config)
    return _with_channels(_scaled_slices(hu, prep), prep.channels)


def gaussian_weights(depth: int, sigma_scale: float = GAUSSIAN_SIGMA_SCALE) -> np.ndarray:
    """Blending weights along the slice axis of a 3D block: a Gaussian centred on the block.

    ``w[i] = exp(-(i - (depth - 1) / 2)^2 / (2 sigma^2))`` with ``sigma = sigma_scale * depth``
    (0.125 as in MLPerf's KiTS19 3D U-Net reference), maximum 1 at the centre, symmetric, and
    positive everywhere so every slice of a block counts a little. Predictions near a block's
    edges see less context and are less reliable, hence the lower weight there. (MLPerf builds
    a 3D kernel as the cube root of the product of three such Gaussians; along one axis we use
    the plain Gaussian with the given sigma.)
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    sigma = sigma_scale * depth
    z = np.arange(depth, dtype=np.float64) - (depth - 1) / 2.0
    w = np.exp(-(z**2) / (2.0 * sigma**2))
    return (w / w.max()).astype(np.float32)


def window_starts(n_slices: int, depth: int, overlap: float = DEFAULT_OVERLAP) -> list[int]:
    """First slices of the windows of ``depth`` slices covering ``n_slices`` slices.

    Consecutive windows share ``round(overlap * depth)`` slices (at least one slice of step);
    the last window is moved back to end exactly at the last slice, so every slice is covered
    and no window reaches past the volume. A volume thinner than one window gets one window at
    0 (the caller pads it).
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if n_slices <= depth:
        return [0]
    step = max(1, depth - int(round(overlap * depth)))
    starts = list(range(0, n_slices - depth + 1, step))
    if starts[-1] + depth < n_slices:
        starts.append(n_slices - depth)
    return starts


def blend_windows(
    window_probs: Sequence[np.ndarray] | np.ndarray,
    starts: Sequence[int],
    n_slices: int,
    weights: np.ndarray,
) -> np.ndarray:
    """Weighted average of overlapping block predictions along the slice axis.

    ``window_probs[k]`` (depth, h, w, C) covers slices ``starts[k] .. starts[k] + depth - 1``
    (parts past ``n_slices``, i.e. padding, are dropped). Each slice gets
    ``sum_k w[z - s_k] p_k[z - s_k] / sum_k w[z - s_k]``: a convex combination, so class
    probabilities still sum to 1.
    """
    acc = np.zeros((n_slices, *np.shape(window_probs[0])[1:]), np.float32)
    norm = np.zeros(n_slices, np.float32)
    for probs, start in zip(window_probs, starts, strict=True):
        _accumulate(acc, norm, probs, start, weights)
    return _normalise(acc, norm)


def _accumulate(
    acc: np.ndarray, norm: np.ndarray, probs: np.ndarray, start: int, weights: np.ndarray
) -> None:
    """Add one window's weighted prediction (the part inside the volume) to the running sums."""
    n = min(len(weights), acc.shape[0] - start)
    w = weights[:n]
    acc[start : start + n] += np.asarray(probs[:n], np.float32) * w[:, None, None, None]
    norm[start : start + n] += w


def _normalise(acc: np.ndarray, norm: np.ndarray) -> np.ndarray:
    if np.any(norm <= 0):
        raise ValueError("some slices are covered by no window")
    acc /= norm[:, None, None, None]
    return acc


def default_batch_size(is_3d: bool) -> int:
    """Slices per batch for 2D models (cheap per sample), blocks per batch for 3D models."""
    return 2 if is_3d else 32


def predict_volume(
    model: tf_keras.Model,
    volume_hu: np.ndarray,
    config: Mapping[str, Any],
    batch_size: int | None = None,
    overlap: float = DEFAULT_OVERLAP,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
) -> np.ndarray:
    """Class probabilities (slices, size, size, n_classes) float32 of a (slices, H, W) HU volume.

    2D models run on batches of ``batch_size`` slices (batching across slices keeps the
    CPU/GPU busy). 3D models run a sliding window of the model's block depth along the slice
    axis, consecutive windows overlapping by ``overlap`` of the depth, blended with
    :func:`gaussian_weights`; a volume thinner than a block is padded at the end with zeros
    (the HU window's minimum, as training padded short blocks) and cropped back.

    ``progress(done, total)`` is called after each batch (units: slices or windows).
    ``timings`` (if given) receives ``preprocess`` and ``network`` seconds.
    """
    prep = preprocessing_params(config)
    is_3d = prep.block_depth is not None
    batch_size = batch_size or default_batch_size(is_3d)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    x = _scaled_slices(volume_hu, prep)  # (S, s, s), channels added per batch (saves memory)
    t1 = time.perf_counter()
    n_slices = x.shape[0]

    if not is_3d:
        outputs = []
        for start in range(0, n_slices, batch_size):
            batch = _with_channels(x[start : start + batch_size], prep.channels)
            outputs.append(np.asarray(model.predict_on_batch(batch), np.float32))
            if progress:
                progress(min(start + batch_size, n_slices), n_slices)
        probs = np.concatenate(outputs, axis=0)
    else:
        depth = prep.block_depth
        assert depth is not None
        if n_slices < depth:  # pad at the end, like the training blocks of thin volumes
            x = np.concatenate([x, np.zeros((depth - n_slices, *x.shape[1:]), np.float32)])
        starts = window_starts(n_slices, depth, overlap)
        weights = gaussian_weights(depth)
        acc: np.ndarray | None = None
        norm = np.zeros(n_slices, np.float32)
        for i in range(0, len(starts), batch_size):
            chunk = starts[i : i + batch_size]
            batch = np.stack([_with_channels(x[s : s + depth], prep.channels) for s in chunk])
            out = np.asarray(model.predict_on_batch(batch), np.float32)
            if acc is None:  # blended as the windows come: memory of one volume, not of all
                acc = np.zeros((n_slices, *out.shape[2:]), np.float32)
            for window, start in zip(out, chunk, strict=True):
                _accumulate(acc, norm, window, start, weights)
            if progress:
                progress(min(i + batch_size, len(starts)), len(starts))
        assert acc is not None
        probs = _normalise(acc, norm)
    if timings is not None:
        timings["preprocess"] = timings.get("preprocess", 0.0) + (t1 - t0)
        timings["network"] = timings.get("network", 0.0) + (time.perf_counter() - t1)
    return probs


# --------------------------------------------------------------------------------------------
# Back to the original grid, post-processing
# --------------------------------------------------------------------------------------------


def labels_to_original(probs: np.ndarray, original_shape: Sequence[int]) -> np.ndarray:
    """(S, s, s, C) probabilities -> (S, H, W) uint8 labels on the original in-plane grid.

    The probabilities (not the labels) are upsampled with bilinear interpolation
    (``cv2.INTER_LINEAR``), so class boundaries fall between pixels where the classes cross,
    then the argmax is taken (ties go to the lower class, background first). Works in chunks of
    slices: a whole 512x512 probability volume in float32 would need gigabytes.
    """
    n_slices, height, width = (int(v) for v in original_shape)
    if probs.ndim != 4 or probs.shape[0] != n_slices:
        raise ValueError(f"probabilities {probs.shape} do not fit a volume of {n_slices} slices")
    n_classes = probs.shape[-1]
    if probs.shape[1:3] == (height, width):
        return np.argmax(probs, axis=-1).astype(np.uint8)
    out = np.empty((n_slices, height, width), np.uint8)
    # OpenCV resizes at most 512 channels at once: chunk * n_classes must stay below that
    chunk = max(1, min(_RESAMPLE_CHUNK, 512 // n_classes))
    for start in range(0, n_slices, chunk):
        part = probs[start : start + chunk]  # (k, s, s, C)
        k = part.shape[0]
        stack = np.ascontiguousarray(
            np.moveaxis(part, 0, 2).reshape(*part.shape[1:3], k * n_classes)
        )
        big = cv2.resize(stack, (width, height), interpolation=cv2.INTER_LINEAR)
        big = big.reshape(height, width, k, n_classes)
        out[start : start + k] = np.moveaxis(np.argmax(big, axis=-1), 2, 0)
    return out


def keep_largest_components(labels: np.ndarray, n: int = 2, min_voxels: int = 0) -> np.ndarray:
    """Keep the ``n`` largest 3D connected components of kidney+tumor (label > 0).

    Two by default: two kidneys. Everything outside them becomes background; labels inside keep
    their value (kidney or tumor). Connectivity is 26 (faces, edges and corners), so a
    structure touching itself diagonally between slices stays one component. Components
    smaller than ``min_voxels`` are dropped even among the ``n`` largest (for patients with one
    kidney the second-largest component may itself be an island).
    """
    labels = np.asarray(labels)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    foreground = labels > 0
    components, count = ndimage.label(foreground, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return labels.astype(np.uint8, copy=True)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    # largest first; stable sort so equal sizes keep the lower component id (deterministic)
    order = np.argsort(-sizes[1:], kind="stable") + 1
    keep = [int(c) for c in order[:n] if sizes[c] > 0 and sizes[c] >= min_voxels]
    mask = np.isin(components, keep)
    return np.where(mask, labels, 0).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Input CT files: validation, reading, writing predictions
# --------------------------------------------------------------------------------------------


def check_affine(affine: np.ndarray, where: str, tol: float = AFFINE_TOLERANCE) -> None:
    """Reject affines that are not KiTS19-like: oblique, or with array axis 0 not along world z.

    The model was trained on axial slices taken along array axis 0. The rotation part of the
    affine (columns divided by the voxel spacings) must be a signed permutation within ``tol``
    (otherwise the volume is oblique), and column 0 must point along world z (otherwise array
    axis 0 is not the slice axis: a sagittal or coronal stack, or a transposed array).
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise InferenceError(f"{where}: affine is not a finite 4x4 matrix")
    rot = a[:3, :3]
    spacing = np.sqrt((rot**2).sum(axis=0))
    if np.any(spacing <= 1e-8):
        raise InferenceError(f"{where}: affine has a zero voxel spacing: {spacing.tolist()}")
    cosines = rot / spacing
    dominant = np.argmax(np.abs(cosines), axis=0)  # world axis of each array axis
    oblique = len(set(dominant.tolist())) != 3 or any(
        np.abs(np.abs(cosines[dominant[j], j]) - 1.0) > tol
        or np.abs(np.delete(cosines[:, j], dominant[j])).max() > tol
        for j in range(3)
    )
    if oblique:
        raise InferenceError(
            f"{where}: oblique orientation (affine rotation is not axis-aligned within {tol}); "
            "resample the volume to an axial grid first"
        )
    if dominant[0] != 2:
        world = "xyz"[int(dominant[0])]
        raise InferenceError(
            f"{where}: array axis 0 runs along world {world}, not z: not an axial stack in the "
            "KiTS19 layout (slices first, array (z, y, x)); reorient it first"
        )


def check_ct_header(path: str | Path) -> nib.Nifti1Image:
    """Open a CT NIfTI lazily and validate it without reading its voxels.

    Checks: readable as NIfTI-1/2, three dimensions (none empty), a real numeric voxel type
    (not complex, bool or RGB), a KiTS19-like axial affine (:func:`check_affine`). Returns the
    (lazy) image; raises InferenceError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises ImageFileError, OSError, EOFError, ...
        raise InferenceError(f"{path}: not a NIfTI file ({exc})") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InferenceError(f"{path}: not a NIfTI file (read as {type(img).__name__})")
    shape = img.shape
    if len(shape) != 3:
        raise InferenceError(
            f"{path}: {len(shape)}D image of shape {shape}; expected a 3D CT volume (slices, H, W)"
        )
    if min(shape) < 1:
        raise InferenceError(f"{path}: empty volume of shape {shape}")
    dtype = img.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "iuf":
        raise InferenceError(
            f"{path}: voxel type {dtype} is not a real number type "
            "(complex, bool, RGB and structured types are not CT intensities)"
        )
    check_affine(img.affine, str(path))
    return img


def read_ct(path: str | Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Validated (S, H, W) float32 HU array and its NIfTI image (header and affine).

    Header checks as :func:`check_ct_header`, plus finite values (no NaN or inf).
    """
    img = check_ct_header(path)
    try:
        hu = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # truncated or corrupt data section
        raise InferenceError(f"{path}: cannot read voxel data: {exc}") from exc
    if not np.all(np.isfinite(hu)):
        bad = int(np.count_nonzero(~np.isfinite(hu)))
        raise InferenceError(f"{path}: {bad} voxels are NaN or infinite")
    return hu, img


def label_header(source: nib.Nifti1Image) -> nib.Nifti1Header:
    """The input's header made fit for a label map: uint8, no intensity scaling, cal 0..2.

    Keeping the input header (qform/sform codes, units, pixdim, descrip) means viewers and the
    KiTS19 evaluation see the prediction on exactly the CT's grid.
    """
    hdr = source.header.copy()
    hdr.set_data_dtype(np.uint8)
    hdr.set_slope_inter(1.0, 0.0)
    hdr["cal_min"], hdr["cal_max"] = 0, 2
    return hdr


def write_labels(labels: np.ndarray, source: nib.Nifti1Image, path: str | Path) -> None:
    """Write a uint8 label volume atomically with ``source``'s shape, affine and header."""
    labels = np.asarray(labels)
    if labels.shape != source.shape:
        raise ValueError(f"labels {labels.shape} do not match the input shape {source.shape}")
    save_nifti_atomic(
        labels.astype(np.uint8, copy=False), source.affine, Path(path), header=label_header(source)
    )


# --------------------------------------------------------------------------------------------
# Small helpers for the command lines: progress bar, overlays
# --------------------------------------------------------------------------------------------


class TextProgress:
    """A minimal progress bar on stderr (no tqdm dependency).

    On a terminal it redraws one line (at most 10 times a second); in a log file (batch jobs)
    it writes one line per quarter, so logs stay short.
    """

    def __init__(self, label: str, stream: Any = None, width: int = 30) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self._last_draw = 0.0
        self._last_quarter = -1

    def __call__(self, done: int, total: int) -> None:
        frac = done / total if total else 1.0
        now = time.perf_counter()
        if self.tty:
            if done < total and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            filled = int(round(frac * self.width))
            bar = "#" * filled + "-" * (self.width - filled)
            end = "\n" if done >= total else ""
            self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {now - self.t0:5.1f}s{end}")
        else:
            quarter = int(frac * 4)
            if quarter == self._last_quarter:
                return
            self._last_quarter = quarter
            self.stream.write(f"{self.label} {done}/{total} ({frac:4.0%}) {now - self.t0:.1f}s\n")
        self.stream.flush()


#: Overlay colours (BGR for OpenCV): kidney red, tumor yellow.
OVERLAY_COLOURS = {1: (40, 40, 230), 2: (0, 220, 255)}
OVERLAY_ALPHA = 0.45


def pick_overlay_slices(labels: np.ndarray, n: int = 3) -> list[int]:
    """The ``n`` slices with the most kidney+tumor predicted (the middle slice if none)."""
    per_slice = (labels > 0).reshape(labels.shape[0], -1).sum(axis=1)
    if per_slice.max(initial=0) == 0:
        return [labels.shape[0] // 2]
    order = np.argsort(-per_slice, kind="stable")
    return sorted(int(i) for i in order[:n] if per_slice[i] > 0)


def render_overlay(hu_slice: np.ndarray, label_slice: np.ndarray, hu_min: float, hu_max: float):
    """(H, W) HU and labels -> (H, W, 3) uint8 BGR image: grey CT with coloured labels blended."""
    grey = np.clip(np.rint(window_to_uint8(hu_slice, hu_min, hu_max)), 0, 255).astype(np.uint8)
    image = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR).astype(np.float32)
    for label, colour in OVERLAY_COLOURS.items():
        where = label_slice == label
        image[where] = (1 - OVERLAY_ALPHA) * image[where] + OVERLAY_ALPHA * np.float32(colour)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def write_overlays(
    hu: np.ndarray,
    labels: np.ndarray,
    out_dir: str | Path,
    stem: str,
    slices: Sequence[int] | None,
    hu_window: tuple[float, float],
) -> list[Path]:
    """PNG overlays ``out_dir/<stem>_zNNNN.png`` of the given slices (None: automatic pick).

    Written atomically (temporary name, then rename). Slice numbers outside the volume raise
    InferenceError.
    """
    chosen = pick_overlay_slices(labels) if slices is None else list(slices)
    bad = [s for s in chosen if not 0 <= s < labels.shape[0]]
    if bad:
        raise InferenceError(
            f"{stem}: overlay slices {bad} outside the volume (0..{labels.shape[0] - 1})"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for s in chosen:
        png = render_overlay(hu[s], labels[s], *hu_window)
        path = out_dir / f"{stem}_z{s:04d}.png"
        ok, encoded = cv2.imencode(".png", png)
        if not ok:
            raise OSError(f"{path}: PNG encoding failed")
        tmp = atomic_path(path)
        try:
            tmp.write_bytes(encoded.tobytes())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(path)
    return written


def format_seconds(t: float) -> str:
    """Seconds with a precision that suits their size (for timing lines)."""
    return f"{t:.2f}" if t < 10 else f"{t:.1f}" if t < 100 else f"{math.floor(t)}"


__all__ = [
    "AFFINE_TOLERANCE",
    "DEFAULT_OVERLAP",
    "GAUSSIAN_SIGMA_SCALE",
    "InferenceError",
    "LoadedModel",
    "Preprocessing",
    "TextProgress",
    "blend_windows",
    "build_model",
    "check_affine",
    "checked_preprocessing",
    "check_ct_header",
    "default_batch_size",
    "default_config",
    "find_config_for_weights",
    "find_run_weights",
    "gaussian_weights",
    "instantiate",
    "is_3d_config",
    "keep_largest_components",
    "label_header",
    "labels_to_original",
    "load_model",
    "load_weights",
    "pick_overlay_slices",
    "predict_volume",
    "preprocess_volume",
    "preprocessing_params",
    "read_config",
    "read_ct",
    "render_overlay",
    "resolve_model_source",
    "window_starts",
    "write_labels",
    "write_overlays",
]


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

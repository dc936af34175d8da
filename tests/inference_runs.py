"""Helpers for the inference tests: tiny trained-looking run folders and CT NIfTI files.

A run folder follows the ARCHITECTURE.md contract (``config.json`` plus
``checkpoints/best.weights.h5``) but holds a tiny, randomly initialised model from
``models.build`` (a few filters, 32x32 slices) so that tests stay fast on two CPU cores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from preprocess.kits import kits_affine  # noqa: E402

SIZE = 32  # model resolution of the tiny runs
HU_WINDOW = (-512.0, 512.0)


def run_config(
    model: str,
    input_shape: tuple[int, ...],
    model_options: dict[str, Any],
    class_weights: list[float] | None = None,
    dataset_dir: str | None = None,
    manifest_sha256: str | None = None,
    target_spacing: float | None = None,
) -> dict[str, Any]:
    """A config.json as train.train writes it (only what inference reads is filled in)."""
    is_3d = len(input_shape) == 4
    return {
        "model": model,
        "model_options": model_options,
        "input_shape": list(input_shape),
        "n_classes": 3,
        "class_names": ["background", "kidney", "tumor"],
        "class_weights": class_weights if class_weights is not None else [0.4, 10.0, 100.0],
        "dataset": {
            "dir": dataset_dir,
            "manifest_sha256": manifest_sha256,
            "kind": "blocks" if is_3d else "slices",
            "image_size": input_shape[-2],
            "block_depth": input_shape[0] if is_3d else None,
            "block_overlap": None,
            "channels": input_shape[-1],
            "normalization": {"hu_min": HU_WINDOW[0], "hu_max": HU_WINDOW[1], "scale": "uint8"},
            "mask_method": "area_rescue",
            "target_spacing": target_spacing,
        },
        "train": {},
        "n_ranks": 1,
        "versions": {"suite": "test"},
    }


def make_run(
    folder: Path,
    model: str = "unet2d",
    input_shape: tuple[int, ...] = (SIZE, SIZE, 3),
    model_options: dict[str, Any] | None = None,
    checkpoint: str = "best.weights.h5",
    seed: int = 0,
    **config_kw: Any,
) -> Path:
    """A run folder with a tiny ``models.build`` model's weights and its config.json."""
    import tf_keras as keras

    import models

    model_options = {"base_filters": 2} if model_options is None else model_options
    keras.utils.set_random_seed(seed)
    net = models.build(model, input_shape, 3, **model_options)
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    net.save_weights(str(folder / "checkpoints" / checkpoint))
    config = run_config(model, input_shape, model_options, **config_kw)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def synthetic_ct(
    n_slices: int = 12, height: int = 40, width: int = 48, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(HU int16, labels uint8): a bright kidney box with a darker tumor inside, noisy."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((n_slices, height, width), np.uint8)
    seg[2 : n_slices - 2, height // 4 : height // 2, width // 5 : width // 2] = 1
    seg[4:7, height // 3 : height // 3 + 4, width // 4 : width // 4 + 5] = 2
    hu = rng.normal(40, 30, seg.shape) + 120.0 * (seg == 1) - 40.0 * (seg == 2)
    return np.rint(hu).astype(np.int16), seg


def write_ct(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write an array as NIfTI (KiTS19 affine by default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = kits_affine((2.5, 0.8, 0.8)) if affine is None else affine
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def reoriented(
    array: np.ndarray, affine: np.ndarray, axcodes: tuple[str, str, str]
) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels in the same world places, stored with array axes along ``axcodes``
    (e.g. ("R", "A", "S")): what another converter would have written."""
    from nibabel import orientations as ornt

    transform = ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt(axcodes))
    moved = ornt.apply_orientation(array, transform)
    return np.ascontiguousarray(moved), affine @ ornt.inv_ornt_aff(transform, array.shape)

"""CT volumes in and label volumes out: checks, the canonical layout, writing on the input's grid.

Inference works on the suite's canonical layout (KiTS19's: array (slices, rows, columns), see
``preprocess.orientation``). A CT in any axis-aligned orientation (RAS, LPS, KiTS19's, slices on
any array axis) is brought to that layout on reading, and the labels go back to the input's own
array order, shape, affine and header on writing, so viewers overlay them on the CT as given.
Every problem with the user's input raises :class:`InferenceError`, whose message names the
file; the command lines turn it into exit status 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from preprocess.kits import save_nifti_atomic
from preprocess.orientation import OrientationError, Reorientation, reorientation


class InferenceError(ValueError):
    """Unusable input (volume, weights, run folder); the message names the file and the problem."""


@dataclass(frozen=True)
class CtVolume:
    """A validated CT: HU in the canonical layout, and how to map labels back to the file's grid."""

    path: Path
    image: nib.Nifti1Image  # the file as given: header and affine for the written labels
    reorientation: Reorientation
    hu: np.ndarray  # float32 (slices, rows, columns), canonical layout

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Canonical (slice, row, column) spacing in mm."""
        return self.reorientation.canonical_spacing

    @property
    def spacing_yx(self) -> tuple[float, float]:
        """In-plane (row, column) spacing of the canonical slices in mm."""
        return self.spacing[1], self.spacing[2]


def open_ct(path: str | Path) -> tuple[nib.Nifti1Image, Reorientation]:
    """Open a CT NIfTI lazily and validate its header without reading its voxels.

    Checks: readable as NIfTI-1/2, three non-empty dimensions, a real numeric voxel type (not
    complex, bool or RGB), an axis-aligned affine (oblique volumes need resampling, which is
    not ours to choose). Returns the lazy image and its :class:`Reorientation`.
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
        raise InferenceError(f"{path}: {len(shape)}D image of shape {shape}; expected a 3D CT")
    if min(shape) < 1:
        raise InferenceError(f"{path}: empty volume of shape {shape}")
    dtype = img.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "iuf":
        raise InferenceError(
            f"{path}: voxel type {dtype} is not a real number type "
            "(complex, bool, RGB and structured types are not CT intensities)"
        )
    try:
        return img, reorientation(img.affine, shape, str(path))
    except OrientationError as exc:
        raise InferenceError(str(exc)) from exc


def read_ct(path: str | Path) -> CtVolume:
    """The validated CT of ``path`` (header checks as :func:`open_ct`, plus finite values)."""
    img, orient = open_ct(path)
    try:
        hu = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # truncated or corrupt data section
        raise InferenceError(f"{path}: cannot read voxel data: {exc}") from exc
    if not np.all(np.isfinite(hu)):
        bad = int(np.count_nonzero(~np.isfinite(hu)))
        raise InferenceError(f"{path}: {bad} voxels are NaN or infinite")
    return CtVolume(Path(path), img, orient, orient.to_canonical(hu))


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


def write_labels(
    labels: np.ndarray, source: nib.Nifti1Image, orient: Reorientation, path: str | Path
) -> None:
    """Write canonical ``labels`` atomically on ``source``'s own grid, affine and header."""
    on_source = np.asarray(orient.to_source(np.asarray(labels)))
    if on_source.shape != source.shape:
        raise ValueError(f"labels {labels.shape} do not fit the input's shape {source.shape}")
    save_nifti_atomic(
        np.ascontiguousarray(on_source, dtype=np.uint8),
        source.affine,
        Path(path),
        header=label_header(source),
    )

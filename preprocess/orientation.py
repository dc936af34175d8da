"""Bringing NIfTI volumes in any axis-aligned orientation to the suite's canonical one, and back.

The suite works on KiTS19's layout: array axes (slices, rows, columns) whose affine columns
point to world inferior, posterior and left (``KITS_AXCODES``; see ``preprocess.kits.kits_affine``).
Scanners' converters mostly write RAS or LPS arrays (x, y, z) instead. :class:`Reorientation`
holds nibabel's orientation transform between a file's own array and the canonical one, so
readers bring every volume to the canonical layout and prediction writes labels back on the
input's own grid, shape and affine. Oblique volumes (a rotation that is no signed permutation
within ``AFFINE_TOLERANCE``) are refused: they need resampling, not reordering.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel import orientations as ornt_tools

# The affine of a unit-spaced array (z, y, x) in KiTS19's convention.
KITS_DIRECTIONS = np.array(
    [[0.0, 0.0, -1.0, 0.0], [0.0, -1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)
KITS_AXCODES: tuple[str, str, str] = tuple(ornt_tools.aff2axcodes(KITS_DIRECTIONS))
# Largest off-axis direction cosine still taken as axis-aligned (about 0.6 degrees).
AFFINE_TOLERANCE = 1e-2


class OrientationError(ValueError):
    """An affine that cannot be brought to the canonical layout; the message names the file."""


def check_axis_aligned(affine: np.ndarray, where: str, tol: float = AFFINE_TOLERANCE) -> None:
    """Raise :class:`OrientationError` unless ``affine`` is finite, 4x4, non-degenerate and its
    rotation is a signed permutation within ``tol``."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise OrientationError(f"{where}: affine is not a finite 4x4 matrix")
    rot = a[:3, :3]
    spacing = np.sqrt((rot**2).sum(axis=0))
    if np.any(spacing <= 1e-8):
        raise OrientationError(f"{where}: affine has a zero voxel spacing: {spacing.tolist()}")
    cosines = rot / spacing
    dominant = np.argmax(np.abs(cosines), axis=0)
    oblique = len(set(dominant.tolist())) != 3 or any(
        abs(abs(cosines[dominant[j], j]) - 1.0) > tol
        or np.abs(np.delete(cosines[:, j], dominant[j])).max() > tol
        for j in range(3)
    )
    if oblique:
        raise OrientationError(
            f"{where}: oblique orientation (affine rotation is not axis-aligned within {tol}); "
            "resample the volume to an axis-aligned grid first"
        )


@dataclass(frozen=True)
class Reorientation:
    """The transform between a volume's own array and the canonical (KiTS19) layout."""

    source_shape: tuple[int, int, int]
    source_affine: np.ndarray
    to_canonical_ornt: np.ndarray  # nibabel ornt: source array -> canonical array

    @property
    def is_identity(self) -> bool:
        identity = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
        return bool(np.array_equal(self.to_canonical_ornt, identity))

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        order = self.to_canonical_ornt[:, 0].astype(int)
        shape = [0, 0, 0]
        for src_axis, dst_axis in enumerate(order):
            shape[dst_axis] = self.source_shape[src_axis]
        return tuple(shape)  # type: ignore[return-value]

    @property
    def canonical_affine(self) -> np.ndarray:
        """The affine of the canonical array: the same voxels in the same world places."""
        inverse = ornt_tools.inv_ornt_aff(self.to_canonical_ornt, self.source_shape)
        return np.asarray(self.source_affine, dtype=np.float64) @ inverse

    @property
    def canonical_spacing(self) -> tuple[float, float, float]:
        rot = self.canonical_affine[:3, :3]
        return tuple(float(v) for v in np.sqrt((rot**2).sum(axis=0)))  # type: ignore[return-value]

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """``array`` (source layout; extra trailing axes such as classes kept) as canonical."""
        if self.is_identity:
            return array
        return ornt_tools.apply_orientation(array, self.to_canonical_ornt)

    def to_source(self, array: np.ndarray) -> np.ndarray:
        """``array`` (canonical layout; extra trailing axes kept) back on the source grid."""
        if self.is_identity:
            return array
        back = ornt_tools.ornt_transform(
            ornt_tools.axcodes2ornt(KITS_AXCODES), ornt_tools.io_orientation(self.source_affine)
        )
        return ornt_tools.apply_orientation(array, back)


def reorientation(
    affine: np.ndarray, shape: tuple[int, ...], where: str, tol: float = AFFINE_TOLERANCE
) -> Reorientation:
    """The :class:`Reorientation` of a 3D volume of ``shape`` with ``affine``.

    Raises :class:`OrientationError` naming ``where`` for non-3D shapes and oblique affines.
    """
    if len(shape) != 3:
        raise OrientationError(
            f"{where}: {len(shape)}D image of shape {tuple(shape)}; expected a 3D volume"
        )
    check_axis_aligned(affine, where, tol)
    source = ornt_tools.io_orientation(np.asarray(affine, dtype=np.float64))
    transform = ornt_tools.ornt_transform(source, ornt_tools.axcodes2ornt(KITS_AXCODES))
    return Reorientation(
        source_shape=tuple(int(n) for n in shape),  # type: ignore[arg-type]
        source_affine=np.asarray(affine, dtype=np.float64),
        to_canonical_ornt=transform,
    )

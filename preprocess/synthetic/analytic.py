"""Analytic anatomy: KiTS19-format label maps of two bean-shaped kidneys with tumors."""

from __future__ import annotations

import numpy as np

from preprocess.kits import CaseError, case_name
from preprocess.synthetic.fields import RIGHT, uniform

_Z_SPACINGS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 3.0, 4.0, 5.0, 5.0)  # 3 and 5 mm dominate KiTS19


def _kidney_axes(side: float, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Unit axes (long, medial, anterior) in (z, y, x) for a kidney on ``side`` of the midline.

    The upper pole is tilted medially and posteriorly and the hilum turned anteromedially, as in
    the body (lower poles lie more lateral and anterior).
    """
    tilt_cor, tilt_sag = np.radians(uniform(rng, 8, 20)), np.radians(uniform(rng, 5, 15))
    turn = np.radians(uniform(rng, 20, 40))
    long_ax = np.array([1.0, -np.tan(tilt_sag), side * np.tan(tilt_cor)])
    long_ax /= np.linalg.norm(long_ax)
    medial0, anterior0 = np.array([0.0, 0.0, -side]), np.array([0.0, -1.0, 0.0])
    medial = np.cos(turn) * medial0 + np.sin(turn) * anterior0
    medial -= medial.dot(long_ax) * long_ax
    medial /= np.linalg.norm(medial)
    anterior = np.cross(long_ax, medial)
    if anterior.dot(anterior0) < 0:
        anterior = -anterior
    return long_ax, medial, anterior


def _grid(
    centre: np.ndarray, radius: float, shape: tuple[int, ...], spacing: np.ndarray
) -> tuple[tuple[slice, ...], list[np.ndarray]] | None:
    """Index box around a point (mm) and the broadcastable coordinate offsets (mm) inside it."""
    lo = np.maximum(np.floor((centre - radius) / spacing).astype(int), 0)
    hi = np.minimum(np.ceil((centre + radius) / spacing).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    coords = []
    for axis in range(3):
        c = (np.arange(lo[axis], hi[axis]) * spacing[axis] - centre[axis]).astype(np.float32)
        view = [1, 1, 1]
        view[axis] = -1
        coords.append(c.reshape(view))
    return box, coords


# one kidney: centre (mm), half axes (long, medial, anterior; mm) and unit axes ((z, y, x) each)
_Kidney = tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]


def analytic_case(
    case_id: int, n_slices: int, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Analytic KiTS19 label map (uint8 (n_slices, size, size)) and its spacing (sz, sy, sx).

    Two bean-shaped kidneys (ellipsoids with a medial hilum notch, tilted and turned as in the
    body, right one lower) near the middle of the volume, and 0-2 tumors (none in ~20% of cases)
    of 3-45 mm radius, exophytic or endophytic, lobulated. The field of view is that of a
    512-pixel scan at 0.6-1.0 mm, so smaller ``size`` means coarser pixels, not a smaller
    patient; slice spacing is 1-5 mm. ``case_id`` only names the case in messages; the variation
    comes from ``rng`` (seed it from (seed, case_id)).
    """
    if n_slices < 1 or size < 16:
        raise CaseError(f"{case_name(case_id)}: need n_slices >= 1 and size >= 16")
    fov = 512 * uniform(rng, 0.6, 1.0)
    sxy = fov / size
    sz = float(rng.choice(_Z_SPACINGS))
    spacing = np.array([sz, sxy, sxy])
    labels = np.zeros((n_slices, size, size), np.uint8)
    extent_z = (n_slices - 1) * sz
    mid_x = fov / 2 + uniform(rng, -0.03, 0.03) * fov
    kidney_y = fov / 2 + uniform(rng, 0.06, 0.13) * fov
    centre_z = extent_z / 2 + uniform(rng, -0.15, 0.15) * min(extent_z, 150.0)
    kidneys = [
        _add_kidney(labels, spacing, side, (centre_z, kidney_y, mid_x), fov, rng)
        for side in (RIGHT, -RIGHT)
    ]
    n_tumors = 0 if rng.random() < 0.2 else (1 if rng.random() < 0.8 else 2)
    for _ in range(n_tumors):
        _add_tumor(labels, spacing, kidneys[int(rng.integers(2))], extent_z, rng)
    return labels, (sz, sxy, sxy)


def _add_kidney(
    labels: np.ndarray,
    spacing: np.ndarray,
    side: float,
    body: tuple[float, float, float],
    fov: float,
    rng: np.random.Generator,
) -> _Kidney:
    """Draw the kidney on ``side`` of the midline into ``labels`` (1) and return its pose.

    ``body`` is the (z, y, x) point in mm the kidneys sit around: mid-volume height, the depth of
    the kidneys and the midline. The pose is returned even when the kidney lies outside the
    volume, since a tumor placed on it can still reach in.
    """
    centre_z, kidney_y, mid_x = body
    half = np.array(
        [uniform(rng, 48, 62), uniform(rng, 24, 31), uniform(rng, 20, 26)]
    )  # long, med, ant
    lateral = uniform(rng, 45, 60) + 0.05 * (fov - 300)
    lower = uniform(rng, 5, 20) if side == RIGHT else 0.0  # the liver pushes the right one down
    centre = np.array(
        [
            centre_z + lower + uniform(rng, -8, 8),
            kidney_y + uniform(rng, -8, 8),
            mid_x + side * lateral,
        ]
    )
    axes = _kidney_axes(side, rng)
    notch = (uniform(rng, 0.35, 0.5), uniform(rng, 0.25, 0.35))
    grid = _grid(centre, float(half.max()) + 2.0, labels.shape, spacing)
    if grid is not None:
        box, (dz, dy, dx) = grid
        q = [a[0] * dz + a[1] * dy + a[2] * dx for a in axes]
        inside = (q[0] / half[0]) ** 2 + (q[1] / half[1]) ** 2 + (q[2] / half[2]) ** 2 <= 1
        hilum = (
            (q[1] > notch[0] * half[1])
            & (np.abs(q[0]) < notch[1] * half[0])
            & (np.abs(q[2]) < 0.55 * half[2])
        )
        labels[box][inside & ~hilum] = 1
    return centre, half, axes


def _add_tumor(
    labels: np.ndarray,
    spacing: np.ndarray,
    kidney: _Kidney,
    extent_z: float,
    rng: np.random.Generator,
) -> None:
    """Draw one lobulated tumor (2) on the surface of ``kidney`` into ``labels``.

    A main ball and up to two overlapping satellites; a tumor smaller than a voxel still marks
    the voxel that holds its centre, so every drawn tumor shows in the labels.
    """
    radius = float(np.exp(uniform(rng, np.log(3.0), np.log(45.0))))
    exophytic = rng.random() < 0.5
    centre = _tumor_centre(kidney, radius, exophytic, extent_z, rng)
    balls = [(centre, radius)]
    for _lobe in range(int(rng.integers(0, 3))):
        v = rng.standard_normal(3)
        v /= np.linalg.norm(v)
        balls.append((centre + v * 0.5 * radius, radius * uniform(rng, 0.4, 0.7)))
    for c, r in balls:
        grid = _grid(c, r, labels.shape, spacing)
        if grid is None:
            continue
        box, (dz, dy, dx) = grid
        labels[box][dz**2 + dy**2 + dx**2 <= r * r] = 2
    idx = np.rint(centre / spacing).astype(int)
    if np.all((idx >= 0) & (idx < np.array(labels.shape))):
        labels[tuple(idx)] = 2


def _tumor_centre(
    kidney: _Kidney, radius: float, exophytic: bool, extent_z: float, rng: np.random.Generator
) -> np.ndarray:
    """Centre (mm) of a tumor on the kidney surface, pushed out (exophytic) or in (endophytic).

    Points are redrawn until the centre lies within the middle 80% of the volume's height, so the
    tumor is seen; after 100 tries the last one stands. Endophytic centres stay inside the
    kidney's short half axes.
    """
    centre_k, half, axes = kidney
    for _attempt in range(100):
        d = rng.standard_normal(3)
        d /= np.sqrt(((d / half) ** 2).sum())  # on the ellipsoid, local coordinates
        normal = d / half**2
        normal /= np.linalg.norm(normal)
        shift = uniform(rng, 0.0, 0.6) * radius if exophytic else -uniform(rng, 0.3, 1.0) * radius
        shift = max(shift, -0.8 * float(half[1:].min()))
        local = d + shift * normal
        centre = centre_k + sum(local[i] * axes[i] for i in range(3))
        if 0.1 * extent_z <= centre[0] <= 0.9 * extent_z or extent_z == 0:
            break
    return centre

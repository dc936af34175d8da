"""Synthetic KiTS19-format CT cases: real or analytic kidney label maps with a CT rendered around.

The KiTS19 CT images are not available on every machine (and may not be redistributed), so
tests, benchmarks and demos need data with the same format and similar statistics. This module
writes ``OUT/case_XXXXX/imaging.nii.gz`` (int16 HU) and ``segmentation.nii.gz`` (uint8 0/1/2)
through :func:`preprocess.kits.write_case`, from one of two anatomy sources:

* ``--labels DIR``: real KiTS19 label maps. Each output keeps its label map exactly (same case
  id, shape and spacing) and gets a CT rendered around its kidneys.
* no ``--labels``: analytic anatomy (:func:`analytic_case`): two rotated, bean-shaped ellipsoid
  kidneys and, in most cases, tumors from a few mm to several cm.

Either way :func:`render_ct` builds the rest of the abdomen around the labelled kidneys (body
outline with skin, subcutaneous fat and muscle wall; spine with discs, canal and processes;
psoas and back muscles; aorta and IVC; liver with vessels, gallbladder, spleen, lung bases,
ribs; bowel with wall, fluid, stool and gas) and then blurs it, adds a smooth gain (bias) field
and noise. Values follow a contrast-enhanced portal/nephrographic-phase abdominal CT; tumor
intensities deliberately overlap medulla, muscle, bowel and liver so that no HU threshold
segments a tumor.

Orientation (KiTS19 arrays are (slices, rows, columns)): rows grow towards the patient's back,
slices towards the feet, and the patient's right lies towards column 0 (see ``RIGHT``).

Every case draws from its own generator seeded with ``(seed, case_id)``, and the per-slice noise
from ``(noise seed, slice)``, so a case is bit-identical however many cases are generated, in
what order, and on how many MPI ranks.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from preprocess.kits import (
    CASE_RE,
    IMAGING,
    SEGMENTATION,
    CaseError,
    case_name,
    parse_case_list,
    read_volume,
    spacing_from_affine,
    validate_labels,
    write_case,
)
from preprocess.mpi_utils import get_comm
from preprocess.resize import resize_masks

# Patient right is towards column 0 of a KiTS19 array. The affine's sign would say otherwise,
# but the label maps decide it: in 64% of the 156 two-kidney KiTS19 label maps available here
# the kidney at low column indices reaches lower (median 6 mm), and in most people the right
# kidney is the lower one (the liver sits above it). Slices grow towards the feet: the kidneys'
# distance from the midline grows with the slice index in 92% of the cases checked (the lower
# poles diverge). Rows grow towards the back (the kidneys lie in the posterior half).
RIGHT = -1.0

AIR = -1000.0
FLAT_RE = CASE_RE.pattern[:-1] + r"_segmentation\.nii\.gz$"  # case_XXXXX_segmentation.nii.gz
_Z_SPACINGS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 3.0, 4.0, 5.0, 5.0)  # 3 and 5 mm dominate KiTS19
DEFAULT_ANALYTIC_CASES = 12
DEFAULT_SLICES = 64
DEFAULT_SIZE = 512
_INTERNAL = "internal error: "


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise CaseError(f"spacing must be three positive numbers (sz, sy, sx), got {spacing!r}")
    return sp  # type: ignore[return-value]


def _dist_mm(mask: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Euclidean distance (mm) from each True pixel to the nearest False pixel (0 outside).

    OpenCV's 5x5-mask distance transform is an order of magnitude faster than scipy's exact one
    and accurate to a few percent, plenty for tissue layers a few mm thick. In-plane spacing is
    treated as isotropic (the geometric mean), which KiTS19 scans are.
    """
    d = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5)
    d *= np.float32(spacing_mm)
    return d


class _SmoothField:
    """A random field, smooth on the scale ``cell_mm``, evaluated one slice at a time.

    Unit normal values on a coarse grid (cell_mm apart) are interpolated: Catmull-Rom along z,
    bicubic in-plane (cv2.resize). Only the coarse grid is stored, so a field for a 1000-slice
    case costs a few MB, and a slice costs one small weighted sum and one resize. Values are
    roughly N(0, 0.65..1); callers use them as textures or threshold them into blobs.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        shape: tuple[int, int, int],
        spacing: tuple[float, float, float],
        cell_mm: float,
    ) -> None:
        nz, h, w = shape
        sz, sy, sx = spacing
        self.z_scale = sz / cell_mm
        gz = int(np.floor((nz - 1) * self.z_scale + 1.0)) + 4  # neighbours for Catmull-Rom
        gy = max(2, int(np.ceil(h * sy / cell_mm)) + 1)
        gx = max(2, int(np.ceil(w * sx / cell_mm)) + 1)
        self.grid = rng.standard_normal((gz, gy, gx), dtype=np.float32)
        self.size = (w, h)

    def slice(self, k: int) -> np.ndarray:
        u = k * self.z_scale + 1.0
        i = int(np.floor(u))
        t = u - i
        t2, t3 = t * t, t * t * t
        w = (
            0.5 * (-t3 + 2 * t2 - t),
            0.5 * (3 * t3 - 5 * t2 + 2),
            0.5 * (-3 * t3 + 4 * t2 + t),
            0.5 * (t3 - t2),
        )
        g = self.grid
        plane = (w[0] * g[i - 1] + w[1] * g[i] + w[2] * g[i + 1] + w[3] * g[i + 2]).astype(
            np.float32
        )
        # Bicubic straight to full size is slow for large factors (cv2: ~3 ms for 10 -> 512):
        # bicubic to 1/8 size, then bilinear, which is smooth at the scale of these fields.
        w_out, h_out = self.size
        if plane.shape[1] * 8 < w_out and plane.shape[0] * 8 < h_out:
            mid = (max(w_out // 8, 2), max(h_out // 8, 2))
            plane = cv2.resize(plane, mid, interpolation=cv2.INTER_CUBIC)
        return cv2.resize(plane, self.size, interpolation=cv2.INTER_LINEAR)


def _fit_line(
    z: np.ndarray, v: np.ndarray, max_slope: float, default: float
) -> tuple[float, float]:
    """Robust-ish line v = a + b z with |b| <= max_slope (anatomy drifts slowly along the body)."""
    if len(z) == 0:
        return default, 0.0
    if len(z) < 3 or np.ptp(z) < 1e-6:
        return float(np.median(v)), 0.0
    slope = float(np.clip(np.polyfit(z, v, 1)[0], -max_slope, max_slope))
    return float(np.median(v - slope * z)), slope


def _longest_zero_run(hist: np.ndarray) -> tuple[int, int]:
    """(start, length) of the longest run of zeros in a 1-D array (length 0 if none)."""
    zero = np.concatenate(([0], (hist == 0).astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(zero))
    if len(edges) == 0:
        return 0, 0
    starts, ends = edges[0::2], edges[1::2]
    j = int(np.argmax(ends - starts))
    return int(starts[j]), int(ends[j] - starts[j])


class _Renderer:
    """Draws one case: per-case geometry from the kidney labels, then slice-by-slice rendering.

    Coordinates are millimetres from pixel (0, 0): x = column * sx, y = row * sy (growing
    posteriorly), z = slice * sz (growing inferiorly).
    """

    def __init__(
        self, labels: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator
    ) -> None:
        self.labels = labels
        self.shape = labels.shape
        nz, h, w = labels.shape
        self.sz, self.sy, self.sx = spacing
        self.s_xy = float(np.sqrt(self.sy * self.sx))
        self.xs = np.arange(w, dtype=np.float32) * np.float32(self.sx)
        self.ys = np.arange(h, dtype=np.float32) * np.float32(self.sy)
        self.zmm = np.arange(nz, dtype=np.float64) * self.sz
        self.has_kidney = (labels > 0).any(axis=(1, 2))
        self._draw_tissue(rng)
        self._infer_geometry(rng)
        self._draw_organs(rng)
        self._make_fields(rng)
        self.noise_seed = int(rng.integers(2**62))
        self._cache_k: int | None = None
        self._tiles: list[np.ndarray] | None = None
        self._cache: dict[int, np.ndarray] = {}

    # ---- per-case parameters ------------------------------------------------------------------
    def _draw_tissue(self, rng: np.random.Generator) -> None:
        """Tissue HU values of this 'patient' and 'scan' (ranges: portal/nephrographic phase)."""
        self.hu_fat = _u(rng, -115, -85)
        self.hu_visc_fat = self.hu_fat + _u(rng, -5, 15)
        self.hu_skin = _u(rng, 10, 40)
        self.hu_muscle = _u(rng, 42, 60)
        self.hu_liver = _u(rng, 100, 130)
        self.hu_liver_vessel = self.hu_liver + _u(rng, 35, 65)
        self.hu_spleen = _u(rng, 105, 125)
        self.hu_gall = _u(rng, 0, 20)
        self.hu_aorta = _u(rng, 140, 190)
        self.hu_ivc = _u(rng, 120, 160)
        self.hu_cortical = _u(rng, 700, 1200)
        self.hu_cancellous = _u(rng, 200, 300)
        self.hu_posterior_bone = _u(rng, 450, 750)  # thin bone: cortex and marrow mixed
        self.hu_disc = _u(rng, 70, 100)
        self.hu_csf = _u(rng, 5, 30)
        self.hu_lung = _u(rng, -880, -820)
        self.hu_bowel_wall = _u(rng, 40, 75)
        self.hu_bowel_fluid = _u(rng, 5, 25)
        if rng.random() < 0.25:  # positive oral contrast: bright bowel content, another distractor
            self.hu_bowel_fluid = _u(rng, 180, 350)
        self.hu_stool = _u(rng, -40, 10)
        self.bowel_cover = _u(rng, 0.25, 0.6)  # threshold on the bowel field: less = more bowel
        self.gas_level = _u(rng, 0.5, 1.3)  # threshold on the gas field: more = less gas
        # kidney, nephrographic phase: bright cortex, darker medulla, sinus fat and urine
        self.hu_cortex = _u(rng, 150, 200)
        self.hu_medulla = min(_u(rng, 80, 120), self.hu_cortex - 45)
        self.cortex_mm = _u(rng, 4.0, 7.0)
        self.sinus_mm = _u(rng, 11.0, 16.0)
        self.perirenal_mm = _u(rng, 3.0, 9.0)
        # tumor: heterogeneous, enhancing rim, necrotic core; type varies between patients
        kind = rng.random()
        self.hu_tumor = _u(rng, 35, 55) if kind < 0.25 else _u(rng, 60, 100)
        self.tumor_tex = _u(rng, 8, 18)
        self.tumor_rim = _u(rng, 10, 30)
        self.tumor_rim_mm = _u(rng, 1.5, 3.5)
        # necrosis where a smooth field is high, deep inside; a third of tumors have none
        self.necrosis_thr = _u(rng, 0.25, 0.9) if rng.random() < 0.67 else np.inf
        self.hu_necrosis = _u(rng, 10, 35)
        self.necrosis_depth_mm = _u(rng, 3, 6)
        # scanner: resolution, slice profile, noise, gain non-uniformity
        self.blur_mm = _u(rng, 0.45, 0.85)
        self.z_mix = _u(rng, 0.05, 0.15)
        self.noise_hu = _u(rng, 10, 20)
        self.bias_hu = _u(rng, 5, 12)

    def _infer_geometry(self, rng: np.random.Generator) -> None:
        """Midline, spine and body outline per slice, fitted around the labelled kidneys."""
        nz, h, w = self.shape
        sx, sy = self.sx, self.sy
        step = max(1, int(2.0 // min(sx, sy)))  # kidney positions at ~2 mm sampling suffice
        kz, ky, kx = np.nonzero(self.labels[:, ::step, ::step])
        x = kx.astype(np.float64) * step * sx
        y = ky.astype(np.float64) * step * sy
        z = kz.astype(np.float64) * self.sz
        centre_x, centre_y = w * sx / 2.0, h * sy / 2.0

        # Midline: the gap between the two kidneys; per slice, the midpoint of the kidneys'
        # centroids (a straight line fitted over z: the lumbar spine is nearly straight).
        if len(kz) == 0:  # no kidney at all: a patient centred in the field of view
            split = centre_x
            x, y, z = np.array([centre_x]), np.array([centre_y + 0.1 * h * sy]), np.array([0.0])
            kz = np.array([nz // 2])
        else:
            hist = np.bincount(kx, minlength=(w + step - 1) // step)
            nzc = np.flatnonzero(hist)
            lo, hi = int(nzc[0]), int(nzc[-1])
            start, length = _longest_zero_run(hist[lo : hi + 1])
            if length * step * sx >= 8.0:
                split = (lo + start + length / 2.0) * step * sx
            else:  # one kidney (nephrectomy) or a horseshoe kidney
                cx = float(x.mean())
                side = np.sign(cx - centre_x)
                split = cx - side * 70.0 if abs(cx - centre_x) > 35.0 else cx
        right = (x - split) * RIGHT > 0
        sums = np.stack([np.bincount(kz[sel], x[sel], minlength=nz) for sel in (right, ~right)])
        counts = np.stack([np.bincount(kz[sel], minlength=nz) for sel in (right, ~right)])
        both = (counts > 0).all(axis=0)
        mids = (sums[0, both] / counts[0, both] + sums[1, both] / counts[1, both]) / 2.0
        # Lines are followed over the kidneys' z-range only and held constant beyond it, so a
        # long scan (chest to pelvis) does not drift the patient out of the field of view.
        z_held = np.clip(self.zmm, z.min(), z.max())
        a0, b0 = _fit_line(self.zmm[both], mids, 0.08, split)
        self.mid = a0 + b0 * z_held + _u(rng, -2.0, 2.0)

        # Spine: the vertebral body lies a little anterior of the kidneys' centre line.
        ysum = np.bincount(kz, y, minlength=nz)
        ycount = np.bincount(kz, minlength=nz).astype(np.float64)
        has = ycount > 0
        a1, b1 = _fit_line(self.zmm[has], ysum[has] / ycount[has], 0.15, float(y.mean()))
        self.spine_y = a1 + b1 * z_held - _u(rng, 4.0, 14.0)

        # Kidney landmarks for placing the organs along z.
        zr = z[right] if right.any() else z
        zl = z[~right] if (~right).any() else z
        self.z_right = float(zr.mean())
        self.z_left = float(zl.mean())
        self.z_kidney = float(z.mean())
        self.z_top = float(z.min())
        self.z_bottom = float(z.max())

        # Body: a superellipse (flatter at the back) whose back edge lies behind the spine and
        # the kidneys, widened until it holds every kidney voxel with room for fat and muscle,
        # and kept inside the field of view when the kidneys allow (air must surround the
        # patient, as on a real scan).
        self.fat_mm = _u(rng, 8.0, 30.0)
        self.wall_mm = _u(rng, 7.0, 13.0)
        self.skin_mm = _u(rng, 1.5, 2.5)
        self.p_front, self.p_back = _u(rng, 2.0, 2.4), _u(rng, 2.6, 3.4)
        kz_idx = np.asarray(kz)
        margin = 1.2 * self.fat_mm + self.wall_mm + 6.0
        rel_post = y - self.spine_y[kz_idx]
        back = max(_u(rng, 70.0, 90.0), float(rel_post.max()) + margin + 20.0)
        self.y_back = self.spine_y + back
        self.cx = self.mid + _u(rng, -6.0, 6.0)
        period, phase = _u(rng, 250.0, 400.0), _u(rng, 0.0, 2 * np.pi)
        self.body_scale = 1.0 + 0.035 * np.sin(2 * np.pi * self.zmm / period + phase)
        # Half depth: scanners centre the patient, so the body's centre sits near the middle
        # of the field of view (+-20 mm), within the range of slim to obese abdomens.
        b = float(np.clip(self.y_back.mean() - h * sy / 2.0 + _u(rng, -20.0, 20.0), 95.0, 175.0))
        a = b * _u(rng, 1.2, 1.45)
        a_fov = 0.97 * min(self.cx.min(), w * sx - self.cx.max()) / 1.035
        b_fov = 0.97 * (self.y_back.min() - 0.01 * h * sy) / 2.0 / 1.035
        a, b = min(a, max(a_fov, 60.0)), min(b, max(b_fov, 50.0))
        if len(x) > 60000:  # containment is checked on a subsample: a few % of margin suffices
            pick = np.linspace(0, len(x) - 1, 60000).astype(np.int64)
            x, y, kz_idx = x[pick], y[pick], kz_idx[pick]
        s = self.body_scale[kz_idx]
        yb = self.y_back[kz_idx]
        # Depth first: anterior kidney points within 90% of the reduced half-depth (the back
        # margin above already holds the posterior ones) ...
        b = max(b, (margin + 20.0) / 0.965)
        for _ in range(100):
            cy = yb - b * s
            front = y < cy
            if not front.any() or (np.abs(y - cy)[front] / (b * s - margin)[front]).max() <= 0.9:
                break
            b *= 1.03
        # ... then the width that holds every point at its depth.
        cy = yb - b * s
        pw = np.where(y > cy, self.p_back, self.p_front)
        ratio = np.minimum(np.abs(y - cy) / (b * s - margin), 0.95)
        half_width = np.abs(x - self.cx[kz_idx]) / (1.0 - ratio**pw) ** (1.0 / pw)
        a = max(a, float(((margin + half_width) / s).max()) * 1.01)
        self.a = a * self.body_scale
        self.b = b * self.body_scale
        self.cy = self.y_back - self.b

    def _draw_organs(self, rng: np.random.Generator) -> None:
        """Sizes and z-ranges of the organs, relative to the kidneys."""
        self.vb_w, self.vb_ap = _u(rng, 19.0, 24.0), _u(rng, 14.0, 18.0)
        self.vb_cortex_mm = _u(rng, 1.2, 2.0)
        self.vert_period = _u(rng, 28.0, 34.0)
        self.vert_phase = _u(rng, 0.0, self.vert_period)
        self.disc_frac = _u(rng, 0.22, 0.30)
        self.canal_r = _u(rng, 7.5, 10.0)
        self.arch_mm = _u(rng, 4.0, 6.0)
        self.spinous_len = _u(rng, 28.0, 40.0)
        self.spinous_r = _u(rng, 3.0, 4.5)
        self.transverse_len = _u(rng, 28.0, 38.0)
        self.transverse_dy = _u(rng, -6.0, 4.0)
        self.aorta_r = _u(rng, 9.0, 13.0)
        self.aorta_dx = _u(rng, 8.0, 18.0)
        self.ivc_dx = _u(rng, 20.0, 30.0)
        self.z_bifurcation = self.z_kidney + _u(rng, 60.0, 100.0)
        self.z_psoas = self.z_top + _u(rng, -10.0, 20.0)
        self.liver_tip = self.z_right + _u(rng, 0.0, 35.0)
        self.liver_height = _u(rng, 150.0, 200.0)
        self.gallbladder = rng.random() < 0.6
        self.gall_z = self.liver_tip - _u(rng, 20.0, 60.0)
        self.gall_r = _u(rng, 10.0, 18.0)
        self.spleen_tip = self.z_left + _u(rng, -10.0, 25.0)
        self.spleen_height = _u(rng, 90.0, 130.0)
        self.spleen_angle = _u(rng, 0.4, 0.9)
        self.lung_start = self.liver_tip - self.liver_height + _u(rng, 25.0, 50.0)
        self.rib_start = (self.z_top + self.z_kidney) / 2.0 + _u(rng, -10.0, 20.0)
        self.rib_period = _u(rng, 20.0, 30.0)
        self.rib_phase = _u(rng, 0.0, 1.0)

    def _make_fields(self, rng: np.random.Generator) -> None:
        shape, sp = self.shape, (self.sz, self.sy, self.sx)
        self.f_tex = _SmoothField(rng, shape, sp, _u(rng, 3.0, 5.0))
        self.f_shape = _SmoothField(rng, shape, sp, 40.0)
        self.f_bowel = _SmoothField(rng, shape, sp, _u(rng, 20.0, 30.0))
        self.f_content = _SmoothField(rng, shape, sp, 9.0)
        self.f_gas = _SmoothField(rng, shape, sp, 20.0)
        self.f_vessel = _SmoothField(rng, shape, sp, 10.0)
        self.f_kidney = _SmoothField(rng, shape, sp, 6.0)
        self.f_tumor = _SmoothField(rng, shape, sp, _u(rng, 5.0, 9.0))
        self.f_necrosis = _SmoothField(rng, shape, sp, _u(rng, 7.0, 12.0))
        self.f_bias = _SmoothField(rng, shape, sp, 150.0)

    def _field(self, field: _SmoothField, k: int) -> np.ndarray:
        """``field`` at slice k, computed once per slice (several organs share a field)."""
        if self._cache_k != k:
            self._cache_k, self._cache = k, {}
        key = id(field)
        if key not in self._cache:
            self._cache[key] = field.slice(k)
        return self._cache[key]

    # ---- painting helpers ---------------------------------------------------------------------
    def _box(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice] | None:
        h, w = self.shape[1:]
        c0, c1 = max(int(x0 / self.sx), 0), min(int(x1 / self.sx) + 2, w)
        r0, r1 = max(int(y0 / self.sy), 0), min(int(y1 / self.sy) + 2, h)
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def _ellipse(
        self, cx: float, cy: float, ax: float, ay: float, angle: float = 0.0, p: float = 2.0
    ) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Bounding box and mask of a (rotated super-)ellipse; computed inside the box only."""
        if ax <= 0 or ay <= 0:
            return None
        r = max(ax, ay)
        box = self._box(cx - r, cx + r, cy - r, cy + r)
        if box is None:
            return None
        dx = (self.xs[box[1]] - cx)[None, :]
        dy = (self.ys[box[0]] - cy)[:, None]
        if angle:
            ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
            dx, dy = dx * ca + dy * sa, dy * ca - dx * sa
        if p == 2.0:
            m = (dx / ax) ** 2 + (dy / ay) ** 2 <= 1.0
        else:
            m = np.abs(dx / ax) ** p + np.abs(dy / ay) ** p <= 1.0
        return box, m

    def _capsule(
        self, x0: float, y0: float, x1: float, y1: float, rad: float
    ) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Bounding box and mask of the points within ``rad`` of a segment (processes, bars)."""
        box = self._box(min(x0, x1) - rad, max(x0, x1) + rad, min(y0, y1) - rad, max(y0, y1) + rad)
        if box is None:
            return None
        px = (self.xs[box[1]] - x0)[None, :]
        py = (self.ys[box[0]] - y0)[:, None]
        vx, vy = x1 - x0, y1 - y0
        t = np.clip((px * vx + py * vy) / max(vx * vx + vy * vy, 1e-6), 0.0, 1.0)
        return box, (px - t * vx) ** 2 + (py - t * vy) ** 2 <= rad * rad

    @staticmethod
    def _paint(
        img: np.ndarray,
        shape: tuple[tuple[slice, slice], np.ndarray] | None,
        value: float,
        where: np.ndarray | None = None,
        tex: np.ndarray | None = None,
        amp: float = 0.0,
    ) -> None:
        if shape is None:
            return
        box, m = shape
        if where is not None:
            m = m & where[box]
        view = img[box]
        if tex is not None and amp:
            np.copyto(view, value + amp * tex[box], where=m)
        else:
            view[m] = value

    # ---- one slice ----------------------------------------------------------------------------
    def clean_slice(self, k: int) -> np.ndarray:
        """The noise-free, unblurred slice k (float32 HU)."""
        h, w = self.shape[1:]
        z = self.zmm[k]
        tex = self._field(self.f_tex, k)
        cx, cy, a, b = self.cx[k], self.cy[k], self.a[k], self.b[k]
        body = np.empty((h, w), bool)
        split = int(np.clip(np.ceil(cy / self.sy), 0, h))  # rows behind the centre: flatter back
        ax = np.abs((self.xs - cx) / a)
        ay = np.abs((self.ys - cy) / b)
        for rows, p in ((slice(0, split), self.p_front), (slice(split, h), self.p_back)):
            body[rows] = (ay[rows, None] ** p + ax[None, :] ** p) <= 1.0
        img = np.full((h, w), AIR, np.float32)
        if not body.any():
            return img
        depth = _dist_mm(body, self.s_xy)
        # Subcutaneous fat is thicker in front and varies smoothly around the body.
        dy_n = ((self.ys - cy) / b)[:, None]
        fat = self.fat_mm * (1.0 - 0.3 * dy_n) * (1.0 + 0.25 * self._field(self.f_shape, k))
        fat = np.maximum(fat, 3.0)
        inner_fat = fat + self.skin_mm
        cavity = depth >= inner_fat + self.wall_mm
        under_fat = depth >= inner_fat
        # np.copyto(where=) and scalar mask assignment avoid the gather of img[m] = v[m]
        np.copyto(img, self.hu_fat + 8.0 * tex, where=body)
        img[body & (depth < self.skin_mm)] = self.hu_skin
        np.copyto(img, self.hu_muscle + 4.0 * tex, where=under_fat & ~cavity)
        np.copyto(img, self.hu_visc_fat + 8.0 * tex, where=cavity)

        mid, sy_ = self.mid[k], self.spine_y[k]
        a_in = max(a - self.fat_mm - self.wall_mm, 20.0)
        b_in = max(b - self.fat_mm - self.wall_mm, 20.0)
        self._bowel(img, k, cavity, sy_, cy, b)
        self._lungs(img, z, cavity, cx, cy, a_in, b_in, tex)
        self._liver_spleen(img, k, z, cavity, cx, cy, a_in, b_in, sy_, tex)
        self._vessels(img, z, mid, sy_)
        self._muscles(img, z, mid, sy_, under_fat, tex)
        self._spine(img, z, mid, sy_, tex)
        self._ribs(img, z, cx, cy, a, b)
        if self.has_kidney[k]:
            self._kidneys(img, k, tex)
        return img

    def _bowel(
        self, img: np.ndarray, k: int, cavity: np.ndarray, spine_y: float, cy: float, b: float
    ) -> None:
        """Loops of bowel: smooth blobs in the anterior cavity with wall, fluid, stool and gas."""
        h = self.shape[1]
        row_cut = int(np.clip((spine_y - 5.0) / self.sy, 0, h))  # bowel stays anterior of spine
        if row_cut == 0:
            return
        f = self._field(self.f_bowel, k)[:row_cut]
        region = cavity[:row_cut] & (f > self.bowel_cover)
        if not region.any():
            return
        view = img[:row_cut]
        lumen = region & (f > self.bowel_cover + 0.12)
        view[region & ~lumen] = self.hu_bowel_wall
        content = self._field(self.f_content, k)[:row_cut]
        fluid = lumen & (content < 0.1)
        view[fluid] = self.hu_bowel_fluid
        stool = lumen & ~fluid
        np.copyto(view, self.hu_stool + 35.0 * content, where=stool)
        # Gas rises: pockets mostly in the anterior (non-dependent) part of the loops.
        anterior = ((cy - self.ys[:row_cut]) / b)[:, None]
        gas = lumen & (self._field(self.f_gas, k)[:row_cut] + 0.6 * anterior > self.gas_level)
        view[gas] = AIR + 10.0

    def _lungs(
        self,
        img: np.ndarray,
        z: float,
        cavity: np.ndarray,
        cx: float,
        cy: float,
        a_in: float,
        b_in: float,
        tex: np.ndarray,
    ) -> None:
        """Lung bases in the posterior costophrenic recesses, above the diaphragm level."""
        if z >= self.lung_start:
            return
        g = min((self.lung_start - z) / 60.0, 1.0) ** 0.5
        for side in (RIGHT, -RIGHT):
            shape = self._ellipse(
                cx + side * a_in * 0.55, cy + b_in * 0.35, a_in * 0.42 * g, b_in * 0.5 * g
            )
            self._paint(img, shape, self.hu_lung, cavity, tex, 15.0)

    def _liver_spleen(
        self,
        img: np.ndarray,
        k: int,
        z: float,
        cavity: np.ndarray,
        cx: float,
        cy: float,
        a_in: float,
        b_in: float,
        spine_y: float,
        tex: np.ndarray,
    ) -> None:
        # Liver: right upper abdomen, from the dome down to its tip near the right kidney;
        # widest in its upper part, reaching across the midline there.
        u = (self.liver_tip - z) / self.liver_height
        if 0.0 < u < 1.0:
            if u < 0.6:
                g = (u / 0.6) ** 0.6
            elif u < 0.85:
                g = 1.0
            else:
                g = 1.0 - 0.6 * ((u - 0.85) / 0.15) ** 2
            shape = self._ellipse(
                cx + RIGHT * a_in * (0.55 - 0.25 * g),
                cy - 0.05 * b_in,
                a_in * (0.3 + 0.55 * g),
                b_in * (0.45 + 0.45 * g),
                p=2.4,
            )
            if shape is not None:
                box, m = shape
                m = m & cavity[box]
                view = img[box]
                np.copyto(view, self.hu_liver + 5.0 * tex[box], where=m)
                # portal-phase vessels: thin bright tubes where a smooth field crosses zero
                vessel = m & (np.abs(self._field(self.f_vessel, k)[box]) < 0.05)
                view[vessel] = self.hu_liver_vessel
                if self.gallbladder and abs(z - self.gall_z) < 2.2 * self.gall_r:
                    gz = 1.0 - ((z - self.gall_z) / (2.2 * self.gall_r)) ** 2
                    gb = self._ellipse(
                        cx + RIGHT * a_in * 0.25,
                        cy - 0.5 * b_in,
                        self.gall_r * gz**0.5,
                        self.gall_r * 1.3 * gz**0.5,
                    )
                    if gb is not None:
                        liver = np.zeros(cavity.shape, bool)
                        liver[box] = m
                        self._paint(img, gb, self.hu_gall, liver)
        # Spleen: left posterolateral, upper abdomen, long axis along the body wall.
        u = (self.spleen_tip - z) / self.spleen_height
        if 0.0 < u < 1.0:
            g = np.sin(np.pi * u) ** 0.5
            shape = self._ellipse(
                cx - RIGHT * a_in * 0.72,
                spine_y - 5.0,
                a_in * 0.17 * g,
                b_in * 0.45 * g,
                angle=-RIGHT * self.spleen_angle,
            )
            self._paint(img, shape, self.hu_spleen, cavity, tex, 4.0)

    def _vessels(self, img: np.ndarray, z: float, mid: float, spine_y: float) -> None:
        """Aorta (left of the midline) and IVC (right), splitting into the iliacs below."""
        front = spine_y - self.vb_ap
        below = z - self.z_bifurcation
        ay = front - self.aorta_r - 3.0
        if below < 0:
            self._paint(
                img,
                self._ellipse(mid - RIGHT * self.aorta_dx, ay, self.aorta_r, self.aorta_r),
                self.hu_aorta,
            )
            shape = self._ellipse(mid + RIGHT * self.ivc_dx, front - 10.0, 14.0, 9.0)
            self._paint(img, shape, self.hu_ivc)
            return
        spread = min(10.0 + 0.3 * below, 60.0)
        r = 0.62 * self.aorta_r
        for side in (RIGHT, -RIGHT):
            self._paint(img, self._ellipse(mid + side * spread, ay, r, r), self.hu_aorta)
            shape = self._ellipse(mid + side * (spread + 4.0), ay + 2 * r + 2.0, r * 1.1, r * 0.9)
            self._paint(img, shape, self.hu_ivc)

    def _muscles(
        self,
        img: np.ndarray,
        z: float,
        mid: float,
        spine_y: float,
        under_fat: np.ndarray,
        tex: np.ndarray,
    ) -> None:
        """Psoas (growing towards the pelvis), quadratus lumborum and the back muscles."""
        hu = self.hu_muscle
        canal_y = spine_y + self.vb_ap + self.canal_r + 1.5
        for side in (RIGHT, -RIGHT):
            back = self._ellipse(mid + side * 28.0, canal_y + self.canal_r + 18.0, 24.0, 21.0)
            self._paint(img, back, hu, under_fat, tex, 4.0)
            ql = self._ellipse(mid + side * (self.vb_w + 38.0), canal_y + 6.0, 17.0, 9.0, p=2.2)
            self._paint(img, ql, hu, under_fat, tex, 4.0)
            r = float(np.clip(6.0 + 0.16 * (z - self.z_psoas), 0.0, 25.0))
            if r > 1.0:
                shape = self._ellipse(
                    mid + side * (self.vb_w + 0.7 * r + 2.0),
                    spine_y - 0.2 * self.vb_ap + 0.1 * r,
                    0.9 * r,
                    1.1 * r,
                )
                self._paint(img, shape, hu, None, tex, 4.0)

    def _spine(
        self, img: np.ndarray, z: float, mid: float, spine_y: float, tex: np.ndarray
    ) -> None:
        """Vertebral body (cortical shell, cancellous core) or disc, canal, arch, processes."""
        lp = ((z + self.vert_phase) % self.vert_period) / self.vert_period
        canal_y = spine_y + self.vb_ap + self.canal_r + 1.5
        body = self._ellipse(mid, spine_y, self.vb_w, self.vb_ap, p=2.4)
        if lp < self.disc_frac:
            self._paint(img, body, self.hu_disc, None, tex, 5.0)
        else:
            self._paint(img, body, self.hu_cortical)
            into = (lp - self.disc_frac) * self.vert_period
            endplate = into < 1.2 or (1.0 - lp) * self.vert_period < 1.2
            if not endplate:
                c = self.vb_cortex_mm
                core = self._ellipse(mid, spine_y, self.vb_w - c, self.vb_ap - c, p=2.4)
                self._paint(img, core, self.hu_cancellous, None, tex, 25.0)
            arch = self._ellipse(mid, canal_y, self.canal_r + self.arch_mm, self.canal_r + 1.5)
            if arch is not None:
                box, m = arch
                m = m & (self.ys[box[0]] > canal_y - 0.4 * self.canal_r)[:, None]
                self._paint(img, (box, m), self.hu_posterior_bone)
            if lp < 0.85:
                top = canal_y + self.canal_r
                spinous = self._capsule(mid, top, mid, top + self.spinous_len, self.spinous_r)
                self._paint(img, spinous, self.hu_posterior_bone)
            if 0.5 < lp < 0.72:
                for side in (RIGHT, -RIGHT):
                    tp = self._capsule(
                        mid + side * (self.canal_r + 2.0),
                        canal_y - 2.0,
                        mid + side * self.transverse_len,
                        canal_y + self.transverse_dy,
                        2.8,
                    )
                    self._paint(img, tp, self.hu_posterior_bone)
        canal = self._ellipse(mid, canal_y, self.canal_r, self.canal_r)
        self._paint(img, canal, self.hu_csf)

    def _ribs(
        self,
        img: np.ndarray,
        z: float,
        cx: float,
        cy: float,
        a: float,
        b: float,
    ) -> None:
        """Lower ribs: small bone rings in the muscle wall, drifting around the body with z
        (ribs run obliquely, so their cross-sections move from slice to slice)."""
        if z >= self.rib_start:
            return
        t = self.fat_mm + self.skin_mm + self.wall_mm / 2.0
        ra, rb = a - t, b - t
        if ra <= 10 or rb <= 10:
            return
        # more ribs (further forward) appear the higher the slice lies above the lowest one
        n_ribs = min(1 + int((self.rib_start - z) / 25.0), 5)
        for side, phase in ((RIGHT, self.rib_phase), (-RIGHT, self.rib_phase + 0.37)):
            shift = ((z / self.rib_period + phase) % 1.0) * 0.36
            for j in range(n_ribs):
                theta = 0.5 + shift + 0.36 * j  # radians from the back, at most ~2 (lateral)
                e = 2.0 / (self.p_back if np.cos(theta) > 0 else self.p_front)
                x = cx + side * ra * abs(np.sin(theta)) ** e
                y = cy + rb * np.sign(np.cos(theta)) * abs(np.cos(theta)) ** e
                self._paint(img, self._ellipse(x, y, 4.5, 4.5), self.hu_posterior_bone)
                self._paint(img, self._ellipse(x, y, 2.5, 2.5), self.hu_cancellous)

    def _kidneys(self, img: np.ndarray, k: int, tex: np.ndarray) -> None:
        """Perirenal fat, then cortex / medulla / sinus from the depth below the kidney surface,
        then the tumor: textured, with an enhancing rim and low necrotic regions."""
        lab = self.labels[k]
        rows = np.flatnonzero(lab.any(axis=1))
        cols = np.flatnonzero(lab.any(axis=0))
        pad = int(np.ceil((self.perirenal_mm * 1.4 + 3.0) / min(self.sx, self.sy))) + 2
        h, w = lab.shape
        box = (
            slice(max(rows[0] - pad, 0), min(rows[-1] + pad + 1, h)),
            slice(max(cols[0] - pad, 0), min(cols[-1] + pad + 1, w)),
        )
        crop = lab[box]
        view = img[box]
        t = tex[box]
        fk = self._field(self.f_kidney, k)[box]
        organ = crop > 0
        outside = _dist_mm(~organ, self.s_xy)
        fat = (~organ) & (
            outside <= self.perirenal_mm * (1.0 + 0.4 * self._field(self.f_shape, k)[box])
        )
        np.copyto(view, self.hu_fat + 8.0 * t, where=fat)
        depth = _dist_mm(organ, self.s_xy)
        kidney = crop == 1
        cortex = kidney & (depth < self.cortex_mm * (1.0 + 0.35 * fk))
        medulla = kidney & ~cortex
        np.copyto(view, self.hu_cortex + 6.0 * t, where=cortex)
        np.copyto(view, self.hu_medulla + 6.0 * t, where=medulla)
        # Renal sinus: deep and on the midline side of each kidney's centroid (the hilum).
        x = self.xs[box[1]]
        mid = self.mid[k]
        col_mass = kidney.sum(axis=0).astype(np.float64)
        is_right = (x - mid) * RIGHT > 0
        centre = np.empty_like(x)
        for sel in (is_right, ~is_right):
            mass = col_mass[sel].sum()
            centre[sel] = (col_mass[sel] * x[sel]).sum() / mass if mass else mid
        medial = ((x - centre) * (mid - centre) > 0)[None, :]
        sinus = medulla & medial & (depth > self.sinus_mm)
        if sinus.any():
            mix = np.clip(0.5 + fk[sinus], 0.0, 1.0)  # fat vs urine in the collecting system
            view[sinus] = mix * (self.hu_fat + 30.0) + (1.0 - mix) * 10.0
        tumor = crop == 2
        if tumor.any():
            dt = _dist_mm(tumor, self.s_xy)[tumor]
            ft = self._field(self.f_tumor, k)[box][tumor]
            val = self.hu_tumor + self.tumor_tex * ft
            val += self.tumor_rim * np.clip(1.0 - dt / self.tumor_rim_mm, 0.0, 1.0)
            fn = self._field(self.f_necrosis, k)[box][tumor]
            nec = np.clip((fn - self.necrosis_thr) / 0.25, 0.0, 1.0)
            nec *= np.clip((dt - self.necrosis_depth_mm) / 2.0, 0.0, 1.0)
            view[tumor] = val * (1.0 - nec) + self.hu_necrosis * nec

    # ---- scanner effects ----------------------------------------------------------------------
    def blurred_slice(self, k: int) -> np.ndarray:
        img = self.clean_slice(k)
        sx_px, sy_px = self.blur_mm / self.sx, self.blur_mm / self.sy
        if max(sx_px, sy_px) >= 0.3:  # below that the kernel is a no-op at this pixel size
            img = cv2.GaussianBlur(
                img, (0, 0), sigmaX=sx_px, sigmaY=sy_px, borderType=cv2.BORDER_REPLICATE
            )
        return img

    def finish_slice(self, img: np.ndarray, k: int) -> np.ndarray:
        """Gain non-uniformity (scales attenuation relative to air) and correlated noise."""
        gain = self.f_bias.slice(k) * np.float32(self.bias_hu / 1000.0)
        img += gain * (img - np.float32(AIR))
        img += self._noise(k)
        return img

    def _noise(self, k: int) -> np.ndarray:
        """Noise for slice k: a random cyclic shift and flip of one of a few noise tiles.

        Drawing 262k normals costs ~5 ms per 512x512 slice, more than drawing the anatomy;
        tiles drawn once per case, shifted by a per-slice generator seeded with (noise seed,
        k), give the same statistics for ~0.5 ms and keep every slice reproducible on its own.
        """
        if self._tiles is None:
            rng = np.random.default_rng([self.noise_seed, 2**31])
            sigma = 0.6  # pixels: CT noise is spatially correlated by the reconstruction kernel
            ksize = 2 * int(np.ceil(3 * sigma)) + 1
            kern = cv2.getGaussianKernel(ksize, sigma).ravel()
            scale = np.float32(self.noise_hu / float((kern**2).sum()))
            h, w = self.shape[1:]
            pad = ksize // 2
            tiles = []
            for _ in range(min(8, self.shape[0])):
                raw = rng.standard_normal((h, w), dtype=np.float32)
                # blurred with wrap-around so that cyclic shifts leave no seam
                wrapped = np.pad(raw, pad, mode="wrap")
                blurred = cv2.GaussianBlur(wrapped, (ksize, ksize), sigma)[pad:-pad, pad:-pad]
                tiles.append(np.ascontiguousarray(blurred * scale))
            self._tiles = tiles
        rng = np.random.default_rng([self.noise_seed, k])
        tile = self._tiles[int(rng.integers(len(self._tiles)))]
        dy, dx = (int(v) for v in rng.integers(0, tile.shape))
        out = np.roll(tile, (dy, dx), axis=(0, 1))
        flip = int(rng.integers(4))
        if flip & 1:
            out = out[::-1]
        if flip & 2:
            out = out[:, ::-1]
        return out

    def render(self) -> np.ndarray:
        """The whole volume, one slice at a time: a 1 MB slice stays in cache through the
        dozens of passes that draw it, which is much faster than whole-volume array passes.
        Neighbouring slices are mixed a little (slice profile / partial volume along z)."""
        nz = self.shape[0]
        out = np.empty(self.shape, np.float32)
        wz = np.float32(self.z_mix)
        prev, cur = None, self.blurred_slice(0)
        for k in range(nz):
            nxt = self.blurred_slice(k + 1) if k + 1 < nz else None
            before = prev if prev is not None else cur
            after = nxt if nxt is not None else cur
            mixed = before + after
            mixed *= wz
            mixed += (1 - 2 * wz) * cur
            out[k] = self.finish_slice(mixed, k)
            prev, cur = cur, nxt
        return out


# ---- public API ---------------------------------------------------------------------------------
def render_ct(labels: np.ndarray, spacing: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """A contrast-enhanced abdominal CT (float32 HU, same shape) around a KiTS19 label map.

    ``labels`` is (slices, H, W) with 0 background, 1 kidney, 2 tumor; ``spacing`` is
    (sz, sy, sx) in mm. The body, spine, organs and bowel are placed from the kidneys' positions;
    the result is deterministic for a given ``rng`` state.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3 or min(labels.shape) == 0:
        raise CaseError(f"labels must be a non-empty 3-D array (slices, H, W), got {labels.shape}")
    labels = validate_labels(labels, "labels")
    return _Renderer(np.ascontiguousarray(labels), _check_spacing(spacing), rng).render()


def _kidney_axes(side: float, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Unit axes (long, medial, anterior) in (z, y, x) for a kidney on ``side`` of the midline.

    The upper pole is tilted medially and posteriorly and the hilum turned anteromedially, as in
    the body (lower poles lie more lateral and anterior).
    """
    tilt_cor, tilt_sag = np.radians(_u(rng, 8, 20)), np.radians(_u(rng, 5, 15))
    turn = np.radians(_u(rng, 20, 40))
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
    centre: np.ndarray, radius: float, shape: tuple[int, int, int], spacing: np.ndarray
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
    fov = 512 * _u(rng, 0.6, 1.0)
    sxy = fov / size
    sz = float(rng.choice(_Z_SPACINGS))
    shape = (n_slices, size, size)
    spacing = np.array([sz, sxy, sxy])
    labels = np.zeros(shape, np.uint8)
    extent_z = (n_slices - 1) * sz
    mid_x = fov / 2 + _u(rng, -0.03, 0.03) * fov
    kidney_y = fov / 2 + _u(rng, 0.06, 0.13) * fov
    centre_z = extent_z / 2 + _u(rng, -0.15, 0.15) * min(extent_z, 150.0)
    kidneys = []
    for side in (RIGHT, -RIGHT):
        half = np.array([_u(rng, 48, 62), _u(rng, 24, 31), _u(rng, 20, 26)])  # long, med, ant
        lateral = _u(rng, 45, 60) + 0.05 * (fov - 300)
        lower = _u(rng, 5, 20) if side == RIGHT else 0.0  # the liver pushes the right one down
        centre = np.array(
            [
                centre_z + lower + _u(rng, -8, 8),
                kidney_y + _u(rng, -8, 8),
                mid_x + side * lateral,
            ]
        )
        axes = _kidney_axes(side, rng)
        notch = (_u(rng, 0.35, 0.5), _u(rng, 0.25, 0.35))
        grid = _grid(centre, float(half.max()) + 2.0, shape, spacing)
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
        kidneys.append((centre, half, axes))

    n_tumors = 0 if rng.random() < 0.2 else (1 if rng.random() < 0.8 else 2)
    for _ in range(n_tumors):
        centre_k, half, axes = kidneys[int(rng.integers(2))]
        radius = float(np.exp(_u(rng, np.log(3.0), np.log(45.0))))
        exophytic = rng.random() < 0.5
        # a point on the kidney surface, retried until the tumor centre lies in the volume
        for _attempt in range(100):
            d = rng.standard_normal(3)
            d /= np.sqrt(((d / half) ** 2).sum())  # on the ellipsoid, local coordinates
            normal = d / half**2
            normal /= np.linalg.norm(normal)
            shift = _u(rng, 0.0, 0.6) * radius if exophytic else -_u(rng, 0.3, 1.0) * radius
            shift = max(shift, -0.8 * float(half[1:].min()))
            local = d + shift * normal
            centre = centre_k + sum(local[i] * axes[i] for i in range(3))
            if 0.1 * extent_z <= centre[0] <= 0.9 * extent_z or extent_z == 0:
                break
        # lobulated: a main ball and up to two overlapping satellites
        balls = [(centre, radius)]
        for _lobe in range(int(rng.integers(0, 3))):
            v = rng.standard_normal(3)
            v /= np.linalg.norm(v)
            balls.append((centre + v * 0.5 * radius, radius * _u(rng, 0.4, 0.7)))
        for c, r in balls:
            grid = _grid(c, r, shape, spacing)
            if grid is None:
                continue
            box, (dz, dy, dx) = grid
            labels[box][dz**2 + dy**2 + dx**2 <= r * r] = 2
        # a tumor smaller than a voxel still marks the voxel that holds its centre
        idx = np.rint(centre / spacing).astype(int)
        if np.all((idx >= 0) & (idx < np.array(shape))):
            labels[tuple(idx)] = 2
    return labels, (sz, sxy, sxy)


# ---- label-map input ----------------------------------------------------------------------------
def find_label_files(labels_dir: str | Path) -> dict[int, Path]:
    """Case id -> label file, from ``case_XXXXX_segmentation.nii.gz`` files or KiTS19-style
    ``case_XXXXX/segmentation.nii.gz`` folders (the flat file wins if both exist)."""
    folder = Path(labels_dir)
    if not folder.is_dir():
        raise CaseError(f"{folder}: labels folder not found")
    flat = re.compile(FLAT_RE)
    found: dict[int, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_dir() and (m := CASE_RE.match(p.name)) and (p / SEGMENTATION).is_file():
            found.setdefault(int(m.group(1)), p / SEGMENTATION)
    for p in sorted(folder.iterdir()):
        if p.is_file() and (m := flat.match(p.name)):
            found[int(m.group(1))] = p
    if not found:
        raise CaseError(
            f"{folder}: no label files (expected case_XXXXX_segmentation.nii.gz files "
            f"or case_XXXXX/{SEGMENTATION} folders)"
        )
    return dict(sorted(found.items()))


def _json_spacing(path: Path, case_id: int) -> tuple[float, float, float] | None:
    """Spacing from a kits.json beside the label files (KiTS19 clinical metadata), if any."""
    meta = path.parent / "kits.json"
    if not meta.is_file():
        meta = path.parent.parent / "kits.json"
    try:
        for entry in json.loads(meta.read_text()):
            if entry.get("case_id") == case_name(case_id):
                v = entry["voxel_spacing"]
                return float(v["z_spacing"]), float(v["y_spacing"]), float(v["x_spacing"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def load_label_map(
    path: str | Path,
    case_id: int,
    max_slices: int | None = None,
    size: int | None = None,
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A validated label map (uint8 (slices, H, W)) and its spacing (sz, sy, sx) from the affine.

    ``max_slices`` crops to at most that many slices centred on the kidneys; ``size`` resizes
    in-plane to size x size (nearest neighbour) and scales the spacing to match.
    """
    path = Path(path)
    raw, affine, _ = read_volume(path, case_name(case_id))
    if raw.ndim != 3:
        raise CaseError(f"{path}: label map is {raw.ndim}-D, expected 3-D (slices, H, W)")
    if raw.dtype.kind == "f" and not np.all(np.isfinite(raw)):
        raise CaseError(f"{path}: label map contains non-finite values")
    if raw.dtype.kind in "ub" and raw.size and int(raw.max()) <= 2:
        labels = raw.astype(np.uint8, copy=False)  # fast path: np.unique sorts 10^8 voxels
    else:
        labels = validate_labels(raw, str(path))
    spacing = spacing_from_affine(affine)
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        spacing = _json_spacing(path, case_id)
        if spacing is None:
            raise CaseError(f"{path}: degenerate affine and no spacing in kits.json")
    if max_slices is not None and labels.shape[0] > max_slices:
        occupied = np.flatnonzero(labels.any(axis=(1, 2)))
        centre = (occupied[0] + occupied[-1]) // 2 if len(occupied) else labels.shape[0] // 2
        start = int(np.clip(centre - max_slices // 2, 0, labels.shape[0] - max_slices))
        labels = labels[start : start + max_slices]
    if size is not None and labels.shape[1:] != (size, size):
        h, w = labels.shape[1:]
        labels = resize_masks(labels, size, method="nearest")
        spacing = (spacing[0], spacing[1] * h / size, spacing[2] * w / size)
    return np.ascontiguousarray(labels, dtype=np.uint8), tuple(float(s) for s in spacing)


# ---- dataset generation -------------------------------------------------------------------------
def case_rng(seed: int, case_id: int) -> np.random.Generator:
    """The generator of one case: depends only on (seed, case_id)."""
    return np.random.default_rng([int(seed), int(case_id)])


def _complete(out_dir: Path, case_id: int) -> bool:
    folder = out_dir / case_name(case_id)
    return (folder / IMAGING).is_file() and (folder / SEGMENTATION).is_file()


def generate(
    out_dir: str | Path,
    *,
    labels_dir: str | Path | None = None,
    cases: Sequence[int] | None = None,
    n_cases: int | None = None,
    first_id: int = 0,
    n_slices: int = DEFAULT_SLICES,
    size: int | None = None,
    max_slices: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    verbose: bool = False,
) -> list[int]:
    """Write a synthetic KiTS19-format dataset; returns the sorted case ids of the dataset.

    With ``labels_dir``: one case per label map (``cases`` selects ids, ``n_cases`` keeps the
    first N); ``max_slices`` and ``size`` optionally shrink them. Without: analytic cases
    ``cases`` or ``first_id .. first_id + n_cases - 1`` (default 12) of ``n_slices`` slices and
    ``size`` x ``size`` pixels (default 512). Cases whose two files exist are skipped unless
    ``overwrite``. Under an MPI launcher the ranks share the cases; every rank returns the same
    list once all cases are written, and an error on any rank raises on all of them.
    """
    out = Path(out_dir)
    if seed < 0:
        raise CaseError(f"seed must be >= 0, got {seed}")
    for name, value in (("n_cases", n_cases), ("max_slices", max_slices), ("size", size)):
        if value is not None and value < 1:
            raise CaseError(f"{name} must be >= 1, got {value}")
    if labels_dir is not None:
        files = find_label_files(labels_dir)
        if cases is not None:
            missing = sorted(set(cases) - set(files))
            if missing:
                names = ", ".join(case_name(c) for c in missing[:10])
                raise CaseError(f"{labels_dir}: no label file for requested cases: {names}")
            ids = sorted(set(int(c) for c in cases))
        else:
            ids = list(files)
    else:
        files = {}
        if size is not None and size < 16:
            raise CaseError(f"size must be >= 16 for analytic cases, got {size}")
        if n_slices < 1:
            raise CaseError(f"n_slices must be >= 1, got {n_slices}")
        if cases is not None:
            ids = sorted(set(int(c) for c in cases))
        else:
            count = DEFAULT_ANALYTIC_CASES if n_cases is None else n_cases
            ids = list(range(first_id, first_id + count))
            n_cases = None
    if n_cases is not None:
        ids = ids[:n_cases]
    if any(c < 0 or c > 99999 for c in ids):
        raise CaseError("case ids must be in 0..99999")

    comm = get_comm()
    mine = ids[comm.rank :: comm.size]  # round robin: neighbouring (similar-size) cases spread
    error = None
    t_start = time.perf_counter()
    where = " on rank 0" if comm.size > 1 else ""
    try:
        for i, case_id in enumerate(mine):
            name = case_name(case_id)
            if not overwrite and _complete(out, case_id):
                if verbose and comm.rank == 0:
                    print(f"[{i + 1}/{len(mine)}{where}] {name}: exists, skipped", flush=True)
                continue
            t0 = time.perf_counter()
            rng = case_rng(seed, case_id)
            if labels_dir is not None:
                labels, spacing = load_label_map(files[case_id], case_id, max_slices, size)
            else:
                labels, spacing = analytic_case(case_id, n_slices, size or DEFAULT_SIZE, rng)
            ct = render_ct(labels, spacing, rng)
            t1 = time.perf_counter()
            write_case(out, case_id, ct, labels, spacing)
            if verbose and comm.rank == 0:
                print(
                    f"[{i + 1}/{len(mine)}{where}] {name}: {labels.shape} spacing "
                    f"{tuple(round(s, 3) for s in spacing)} tumor={bool((labels == 2).any())} "
                    f"render {t1 - t0:.1f}s write {time.perf_counter() - t1:.1f}s",
                    flush=True,
                )
    except CaseError as exc:
        error = str(exc)
        if comm.size == 1:
            raise
    except Exception as exc:  # any failure must reach the other ranks, or they would hang
        if comm.size == 1:
            raise
        error = f"{_INTERNAL}{type(exc).__name__}: {exc}"
    if comm.size > 1:
        errors = comm.any_error(error)
        if any(e.startswith(_INTERNAL) for e in errors):
            raise RuntimeError("; ".join(errors))
        if errors:
            raise CaseError("; ".join(errors))
        comm.barrier()
    if verbose and comm.rank == 0:
        print(
            f"{len(ids)} cases in {out} ({comm.size} rank(s), "
            f"{time.perf_counter() - t_start:.1f}s)",
            flush=True,
        )
    return ids


# ---- command line -------------------------------------------------------------------------------
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m preprocess.synthetic",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
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
            "written atomically, so an interrupted run can simply be restarted."
        ),
        epilog=(
            "examples:\n"
            "  python -m preprocess.synthetic --out data/synth --n-cases 12\n"
            "  python -m preprocess.synthetic --out data/test --first-id 200 --n-cases 10\n"
            "  python -m preprocess.synthetic --out data/kits_synth \\\n"
            "      --labels /work/shared/data/kits19-labels --cases 0-9,12\n"
            "  python -m preprocess.synthetic --out /tmp/small --labels DIR --n-cases 3 \\\n"
            "      --max-slices 32 --size 128\n\n"
            "exit status: 0 success, 2 bad input (message 'error: ...' on stderr)"
        ),
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
    return parser


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

"""Anatomy of one case around its labelled kidneys: midline, spine, body outline, organ sizes.

Coordinates are millimetres from pixel (0, 0): x = column * sx, y = row * sy (growing
posteriorly), z = slice * sz (growing inferiorly).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from preprocess.synthetic.fields import RIGHT, SmoothField, fit_line, longest_zero_run, uniform


class Anatomy:
    """Mixin of the renderer: per-case geometry, organ sizes and the smooth random fields."""

    labels: np.ndarray
    shape: tuple[int, int, int]
    sz: float
    sy: float
    sx: float
    zmm: np.ndarray
    _cache_k: int | None
    _cache: dict[int, np.ndarray]

    _pick: Any  # Appearance._pick

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
            start, length = longest_zero_run(hist[lo : hi + 1])
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
        a0, b0 = fit_line(self.zmm[both], mids, 0.08, split)
        self.mid = a0 + b0 * z_held + uniform(rng, -2.0, 2.0)

        # Spine: the vertebral body lies a little anterior of the kidneys' centre line.
        ysum = np.bincount(kz, y, minlength=nz)
        ycount = np.bincount(kz, minlength=nz).astype(np.float64)
        has = ycount > 0
        a1, b1 = fit_line(self.zmm[has], ysum[has] / ycount[has], 0.15, float(y.mean()))
        self.spine_y = a1 + b1 * z_held - uniform(rng, 4.0, 14.0)

        # Kidney landmarks for placing the organs along z.
        zr = z[right] if right.any() else z
        zl = z[~right] if (~right).any() else z
        self.z_right = float(zr.mean())
        self.z_left = float(zl.mean())
        self.z_kidney = float(z.mean())
        self.z_top = float(z.min())
        self.z_bottom = float(z.max())
        self._fit_body(rng, x, y, np.asarray(kz))

    def _fit_body(
        self, rng: np.random.Generator, x: np.ndarray, y: np.ndarray, kz_idx: np.ndarray
    ) -> None:
        """Body: a superellipse (flatter at the back) whose back edge lies behind the spine and
        the kidneys (points x, y in mm on slices kz_idx), widened until it holds every kidney
        voxel with room for fat and muscle, and kept inside the field of view when the kidneys
        allow (air must surround the patient, as on a real scan)."""
        _, h, w = self.shape
        sx, sy = self.sx, self.sy
        self.fat_mm = self._pick("fat_mm", uniform(rng, 8.0, 30.0))
        self.wall_mm = self._pick("wall_mm", uniform(rng, 7.0, 13.0))
        self.skin_mm = uniform(rng, 1.5, 2.5)
        self.p_front, self.p_back = uniform(rng, 2.0, 2.4), uniform(rng, 2.6, 3.4)
        margin = 1.2 * self.fat_mm + self.wall_mm + 6.0
        rel_post = y - self.spine_y[kz_idx]
        back = max(uniform(rng, 70.0, 90.0), float(rel_post.max()) + margin + 20.0)
        self.y_back = self.spine_y + back
        self.cx = self.mid + uniform(rng, -6.0, 6.0)
        period, phase = uniform(rng, 250.0, 400.0), uniform(rng, 0.0, 2 * np.pi)
        self.body_scale = 1.0 + 0.035 * np.sin(2 * np.pi * self.zmm / period + phase)
        # Half depth: scanners centre the patient, so the body's centre sits near the middle
        # of the field of view (+-20 mm), within the range of slim to obese abdomens.
        b = float(
            np.clip(self.y_back.mean() - h * sy / 2.0 + uniform(rng, -20.0, 20.0), 95.0, 175.0)
        )
        a = b * self._pick("body_aspect", uniform(rng, 1.2, 1.45))
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
        self.vb_w, self.vb_ap = uniform(rng, 19.0, 24.0), uniform(rng, 14.0, 18.0)
        self.vb_cortex_mm = uniform(rng, 1.2, 2.0)
        self.vert_period = uniform(rng, 28.0, 34.0)
        self.vert_phase = uniform(rng, 0.0, self.vert_period)
        self.disc_frac = uniform(rng, 0.22, 0.30)
        self.canal_r = uniform(rng, 7.5, 10.0)
        self.arch_mm = uniform(rng, 4.0, 6.0)
        self.spinous_len = uniform(rng, 28.0, 40.0)
        self.spinous_r = uniform(rng, 3.0, 4.5)
        self.transverse_len = uniform(rng, 28.0, 38.0)
        self.transverse_dy = uniform(rng, -6.0, 4.0)
        self.aorta_r = uniform(rng, 9.0, 13.0)
        self.aorta_dx = uniform(rng, 8.0, 18.0)
        self.ivc_dx = uniform(rng, 20.0, 30.0)
        self.z_bifurcation = self.z_kidney + uniform(rng, 60.0, 100.0)
        self.z_psoas = self.z_top + uniform(rng, -10.0, 20.0)
        self.liver_tip = self.z_right + uniform(rng, 0.0, 35.0)
        self.liver_height = self._pick("liver_height", uniform(rng, 150.0, 200.0))
        self.gallbladder = self._pick("gallbladder", rng.random() < 0.6)
        self.gall_z = self.liver_tip - uniform(rng, 20.0, 60.0)
        self.gall_r = uniform(rng, 10.0, 18.0)
        self.spleen_tip = self.z_left + uniform(rng, -10.0, 25.0)
        self.spleen_height = self._pick("spleen_height", uniform(rng, 90.0, 130.0))
        self.spleen_angle = uniform(rng, 0.4, 0.9)
        self.lung_start = self.liver_tip - self.liver_height + uniform(rng, 25.0, 50.0)
        self.rib_start = (self.z_top + self.z_kidney) / 2.0 + uniform(rng, -10.0, 20.0)
        self.rib_period = uniform(rng, 20.0, 30.0)
        self.rib_phase = uniform(rng, 0.0, 1.0)

    def _make_fields(self, rng: np.random.Generator) -> None:
        shape, sp = self.shape, (self.sz, self.sy, self.sx)
        self.f_tex = SmoothField(rng, shape, sp, uniform(rng, 3.0, 5.0))
        self.f_shape = SmoothField(rng, shape, sp, 40.0)
        self.f_bowel = SmoothField(rng, shape, sp, uniform(rng, 20.0, 30.0))
        self.f_content = SmoothField(rng, shape, sp, 9.0)
        self.f_gas = SmoothField(rng, shape, sp, 20.0)
        self.f_vessel = SmoothField(rng, shape, sp, 10.0)
        self.f_kidney = SmoothField(rng, shape, sp, 6.0)
        self.f_tumor = SmoothField(rng, shape, sp, uniform(rng, 5.0, 9.0))
        self.f_necrosis = SmoothField(rng, shape, sp, uniform(rng, 7.0, 12.0))
        self.f_bias = SmoothField(rng, shape, sp, 150.0)

    def _field(self, field: SmoothField, k: int) -> np.ndarray:
        """``field`` at slice k, computed once per slice (several organs share a field)."""
        if self._cache_k != k:
            self._cache_k, self._cache = k, {}
        key = id(field)
        if key not in self._cache:
            self._cache[key] = field.slice(k)
        return self._cache[key]

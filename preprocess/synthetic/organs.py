"""Painting one clean slice: body wall, bowel, lungs, liver, spleen, vessels, muscles, spine,
ribs and the kidneys with their tumors, at the case's geometry and intensities (float32 HU,
before any scanner effect)."""

from __future__ import annotations

from typing import Any

import numpy as np

from preprocess.synthetic.fields import AIR, RIGHT, dist_mm


class OrganPainter:
    """Mixin of the renderer: the slice painter (geometry from Anatomy, HU from Appearance)."""

    # Everything else it reads (geometry, organ sizes, HU) is set by Anatomy and Appearance.
    shape: tuple[int, int, int]
    sy: float
    sx: float
    s_xy: float
    xs: np.ndarray
    ys: np.ndarray
    zmm: np.ndarray
    labels: np.ndarray
    has_kidney: np.ndarray
    _field: Any

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
        if self.table_hu:
            self._table(img, k)
        if not body.any():
            return img
        depth = dist_mm(body, self.s_xy)
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

    def _table(self, img: np.ndarray, k: int) -> None:
        """The patient table below the back: two thin curved plates (the body covers them)."""
        half = 220.0
        dx = np.clip((self.xs - self.cx[k]) / half, -1.0, 1.0)
        top = self.y_back[k] + self.table_gap_mm - self.table_sag_mm * dx**2
        for offset, thick in ((0.0, 3.0), (self.table_depth_mm, 2.0)):
            dy = self.ys[:, None] - (top + offset)[None, :]
            plate = (dy >= 0) & (dy < max(thick, self.sy)) & (np.abs(dx) < 1.0)[None, :]
            img[plate] = self.table_hu

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
        outside = dist_mm(~organ, self.s_xy)
        fat = (~organ) & (
            outside <= self.perirenal_mm * (1.0 + 0.4 * self._field(self.f_shape, k)[box])
        )
        np.copyto(view, self.hu_fat + 8.0 * t, where=fat)
        depth = dist_mm(organ, self.s_xy)
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
            view[sinus] = mix * (self.hu_fat + 30.0) + (1.0 - mix) * self.hu_urine
        tumor = crop == 2
        if tumor.any():
            dt = dist_mm(tumor, self.s_xy)[tumor]
            ft = self._field(self.f_tumor, k)[box][tumor]
            val = self.hu_tumor + self.tumor_tex * ft
            val += self.tumor_rim * np.clip(1.0 - dt / self.tumor_rim_mm, 0.0, 1.0)
            fn = self._field(self.f_necrosis, k)[box][tumor]
            nec = np.clip((fn - self.necrosis_thr) / 0.25, 0.0, 1.0)
            nec *= np.clip((dt - self.necrosis_depth_mm) / 2.0, 0.0, 1.0)
            view[tumor] = val * (1.0 - nec) + self.hu_necrosis * nec

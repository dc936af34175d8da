"""Intensities of one case: tissue HU, tumor appearance and scanner settings.

The renderer's own look is a contrast-enhanced portal/nephrographic-phase abdominal CT; a style
(:mod:`preprocess.synthetic.randomize`) overrides any of these values per case. Tumor HU follow
the kidney in a style (``tumor_vs_kidney``), so a hypo-enhancing tumor stays darker than the
kidney in every phase.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from preprocess.kits import CaseError
from preprocess.synthetic.fields import uniform

# Style keys that describe a case without being a renderer attribute.
DESCRIPTIVE_KEYS = ("phase", "tumor_kind", "tumor_vs_kidney")
# Attributes read while the geometry is drawn (taken from the style at that point).
GEOMETRY_KEYS = ("fat_mm", "wall_mm", "body_aspect", "gallbladder", "liver_height", "spleen_height")


class Appearance:
    """Mixin of the renderer: draws the case's intensities and applies a style over them."""

    _style: Mapping[str, Any]

    def _pick(self, name: str, drawn: Any) -> Any:
        """The style's value of ``name`` if it has one, else the value drawn (always drawn, so
        the case's main generator advances the same way with and without a style)."""
        return self._style.get(name, drawn)

    def _draw_tissue(self, rng: np.random.Generator) -> None:
        """Tissue HU values of this 'patient' and 'scan' (ranges: portal/nephrographic phase)."""
        self.hu_fat = uniform(rng, -115, -85)
        self.hu_visc_fat = self.hu_fat + uniform(rng, -5, 15)
        self.hu_skin = uniform(rng, 10, 40)
        self.hu_muscle = uniform(rng, 42, 60)
        self.hu_liver = uniform(rng, 100, 130)
        self.hu_liver_vessel = self.hu_liver + uniform(rng, 35, 65)
        self.hu_spleen = uniform(rng, 105, 125)
        self.hu_gall = uniform(rng, 0, 20)
        self.hu_aorta = uniform(rng, 140, 190)
        self.hu_ivc = uniform(rng, 120, 160)
        self.hu_cortical = uniform(rng, 700, 1200)
        self.hu_cancellous = uniform(rng, 200, 300)
        self.hu_posterior_bone = uniform(rng, 450, 750)  # thin bone: cortex and marrow mixed
        self.hu_disc = uniform(rng, 70, 100)
        self.hu_csf = uniform(rng, 5, 30)
        self.hu_lung = uniform(rng, -880, -820)
        self.hu_bowel_wall = uniform(rng, 40, 75)
        self.hu_bowel_fluid = uniform(rng, 5, 25)
        if rng.random() < 0.25:  # positive oral contrast: bright bowel content, another distractor
            self.hu_bowel_fluid = uniform(rng, 180, 350)
        self.hu_stool = uniform(rng, -40, 10)
        self.bowel_cover = uniform(
            rng, 0.25, 0.6
        )  # threshold on the bowel field: less = more bowel
        self.gas_level = uniform(rng, 0.5, 1.3)  # threshold on the gas field: more = less gas
        # kidney, nephrographic phase: bright cortex, darker medulla, sinus fat and urine
        self.hu_cortex = uniform(rng, 150, 200)
        self.hu_medulla = min(uniform(rng, 80, 120), self.hu_cortex - 45)
        self.cortex_mm = uniform(rng, 4.0, 7.0)
        self.sinus_mm = uniform(rng, 11.0, 16.0)
        self.perirenal_mm = uniform(rng, 3.0, 9.0)
        # tumor: heterogeneous, enhancing rim, necrotic core; type varies between patients
        kind = rng.random()
        self.hu_tumor = uniform(rng, 35, 55) if kind < 0.25 else uniform(rng, 60, 100)
        self.tumor_tex = uniform(rng, 8, 18)
        self.tumor_rim = uniform(rng, 10, 30)
        self.tumor_rim_mm = uniform(rng, 1.5, 3.5)
        # necrosis where a smooth field is high, deep inside; a third of tumors have none
        self.necrosis_thr = uniform(rng, 0.25, 0.9) if rng.random() < 0.67 else np.inf
        self.hu_necrosis = uniform(rng, 10, 35)
        self.necrosis_depth_mm = uniform(rng, 3, 6)
        # scanner: resolution, slice profile, noise, gain non-uniformity
        self.blur_mm = uniform(rng, 0.45, 0.85)
        self.z_mix = uniform(rng, 0.05, 0.15)
        self.noise_hu = uniform(rng, 10, 20)
        self.bias_hu = uniform(rng, 5, 12)

        # unsharp masking of the reconstruction kernel (0: the scanner's own), noise grain and
        # unopacified urine in the collecting system
        self.kernel_amount = 0.0
        self.kernel_sigma_px = 1.0
        self.noise_corr_px = 0.6
        self.hu_urine = 10.0
        # no patient table (0 HU: none); a style may add one below the patient's back
        self.table_hu = 0.0
        self.table_gap_mm = 10.0
        self.table_sag_mm = 20.0
        self.table_depth_mm = 25.0

    def _apply_style(self) -> None:
        """Override the drawn intensities with the style's; the tumor follows the kidney."""
        for key, value in self._style.items():
            if key in DESCRIPTIVE_KEYS or key in GEOMETRY_KEYS:
                continue
            if not hasattr(self, key):
                raise CaseError(f"style: unknown renderer parameter {key!r}")
            setattr(self, key, float(value))
        if "tumor_vs_kidney" in self._style:
            # The tumor/kidney difference comes from enhancement: small on an unenhanced scan
            # (kidney ~30 HU), full once the kidney enhances by 100 HU or more.
            kidney = (self.hu_cortex + self.hu_medulla) / 2.0
            scale = float(np.clip((kidney - 30.0) / 100.0, 0.25, 1.0))
            delta = scale * float(self._style["tumor_vs_kidney"])
            self.hu_tumor = max(kidney + delta, 15.0)
        self.hu_necrosis = min(self.hu_necrosis, self.hu_tumor - 10.0)

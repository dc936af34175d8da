"""Domain randomisation: per-case scan and patient parameters that override the renderer's.

A model trained on one renderer's look learns that look, not kidneys. With ``--randomize full``
every case draws its own contrast phase (unenhanced, arterial, nephrographic/portal, excretory),
tissue HU, tumor appearance relative to the kidney (hypo-, iso- or hyper-enhancing), noise level
and texture, blur, slice profile, reconstruction kernel, bias field, body habitus and bowel
content. The draws come from a generator of their own, seeded with (seed, case id, STYLE_STREAM),
so the anatomy drawn from the case's main generator is the same with or without randomisation,
and ``none`` leaves the renderer exactly as it is.

A style is a flat dict of renderer attributes (plus a few descriptive keys such as ``phase``),
JSON-serialisable, recorded per case in the dataset's ``synthetic.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from preprocess.kits import CaseError
from preprocess.synthetic.fields import uniform

STYLE_STREAM = 1  # third seed word of the style generator: independent of the anatomy's stream
MODES = ("none", "full")
PHASES = ("unenhanced", "arterial", "nephrographic", "excretory")
# KiTS19 scans are mostly late arterial or nephrographic: those weigh twice by default
DEFAULT_PHASES = (
    "unenhanced",
    "arterial",
    "arterial",
    "nephrographic",
    "nephrographic",
    "excretory",
)
ASPECTS = ("phase", "tumor", "tissue", "organs", "body", "noise", "blur", "kernel")
NO_NECROSIS = 99.0  # a necrosis threshold the smooth field never reaches

# HU ranges per contrast phase: kidney cortex and medulla, excreted urine in the collecting
# system, liver, spleen, aorta, IVC, and liver vessels relative to the parenchyma. From typical
# published values for abdominal CT (unenhanced kidney ~30 HU, corticomedullary cortex 150-250,
# homogeneous nephrogram 120-200, dense urine in the excretory phase).
PHASE_HU: dict[str, dict[str, tuple[float, float]]] = {
    "unenhanced": {
        "hu_cortex": (25, 45), "medulla_drop": (0, 10), "hu_urine": (0, 20),
        "hu_liver": (45, 70), "hu_spleen": (38, 55), "hu_aorta": (30, 50), "hu_ivc": (30, 50),
        "vessel_gain": (-15, -5),
    },
    "arterial": {
        "hu_cortex": (150, 260), "medulla_drop": (60, 150), "hu_urine": (0, 20),
        "hu_liver": (60, 90), "hu_spleen": (90, 150), "hu_aorta": (200, 400), "hu_ivc": (70, 120),
        "vessel_gain": (10, 40),
    },
    "nephrographic": {
        "hu_cortex": (120, 200), "medulla_drop": (0, 45), "hu_urine": (5, 25),
        "hu_liver": (95, 135), "hu_spleen": (100, 130), "hu_aorta": (130, 190),
        "hu_ivc": (110, 160), "vessel_gain": (30, 65),
    },
    "excretory": {
        "hu_cortex": (90, 150), "medulla_drop": (-10, 20), "hu_urine": (300, 1000),
        "hu_liver": (80, 110), "hu_spleen": (80, 110), "hu_aorta": (90, 140), "hu_ivc": (90, 140),
        "vessel_gain": (10, 30),
    },
}  # fmt: skip


@dataclass(frozen=True)
class RandomizeConfig:
    """What is drawn per case (``mode`` none: nothing, the renderer's own portal-phase look)."""

    mode: str = "none"
    aspects: tuple[str, ...] = ASPECTS
    phases: tuple[str, ...] = DEFAULT_PHASES  # drawn with equal weight each (repeats weigh)
    noise_hu: tuple[float, float] = (5.0, 40.0)  # noise standard deviation
    blur_mm: tuple[float, float] = (0.3, 1.6)  # Gaussian sigma of the in-plane resolution

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CaseError(f"randomize mode must be one of {MODES}, got {self.mode!r}")
        for name, values, allowed in (
            ("aspect", self.aspects, ASPECTS),
            ("phase", self.phases, PHASES),
        ):
            unknown = sorted(set(values) - set(allowed))
            if unknown:
                raise CaseError(f"unknown {name}(s) {unknown}; choose from {list(allowed)}")
        if not self.phases:
            raise CaseError("at least one contrast phase is needed")
        for name in ("noise_hu", "blur_mm"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise CaseError(f"{name} range must be 0 <= low <= high, got ({lo}, {hi})")

    @property
    def enabled(self) -> bool:
        return self.mode != "none" and bool(self.aspects)

    def to_dict(self) -> dict[str, Any]:
        if not self.enabled:
            return {"mode": "none"}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def style_rng(seed: int, case_id: int) -> np.random.Generator:
    """The generator of one case's style: depends only on (seed, case_id)."""
    return np.random.default_rng([int(seed), int(case_id), STYLE_STREAM])


def draw_style(cfg: RandomizeConfig, rng: np.random.Generator) -> dict[str, Any]:
    """One case's overrides of renderer attributes; empty when randomisation is off.

    Every aspect draws from ``rng`` whether enabled or not, so switching one aspect off leaves
    the values the others draw unchanged.
    """
    if not cfg.enabled:
        return {}
    parts = {
        "phase": _phase(cfg, rng),
        "tumor": _tumor(rng),
        "tissue": _tissue(rng),
        "organs": _organs(rng),
        "body": _body(rng),
        "noise": _noise(cfg, rng),
        "blur": _blur(cfg, rng),
        "kernel": _kernel(rng),
    }
    style: dict[str, Any] = {}
    for aspect in ASPECTS:
        if aspect in cfg.aspects:
            style.update(parts[aspect])
    return style


def _phase(cfg: RandomizeConfig, rng: np.random.Generator) -> dict[str, Any]:
    phase = str(cfg.phases[int(rng.integers(len(cfg.phases)))])
    r = {k: uniform(rng, *v) for k, v in PHASE_HU[phase].items()}
    cortex = r["hu_cortex"]
    return {
        "phase": phase,
        "hu_cortex": cortex,
        "hu_medulla": cortex - r["medulla_drop"],
        "hu_urine": r["hu_urine"],
        "hu_liver": r["hu_liver"],
        "hu_liver_vessel": r["hu_liver"] + r["vessel_gain"],
        "hu_spleen": r["hu_spleen"],
        "hu_aorta": r["hu_aorta"],
        "hu_ivc": r["hu_ivc"],
    }


def _tumor(rng: np.random.Generator) -> dict[str, Any]:
    """Tumor mean relative to the kidney's (applied by the renderer once the kidney HU are set):
    most renal tumors enhance less than the parenchyma, some as much, clear-cell ones more."""
    kind = str(rng.choice(["hypo", "iso", "hyper"], p=[0.6, 0.2, 0.2]))
    lo, hi = {"hypo": (-90.0, -20.0), "iso": (-15.0, 15.0), "hyper": (10.0, 70.0)}[kind]
    return {
        "tumor_kind": kind,
        "tumor_vs_kidney": uniform(rng, lo, hi),
        "tumor_tex": uniform(rng, 5, 35),
        "tumor_rim": uniform(rng, -10, 40),  # negative: a darker pseudocapsule
        "tumor_rim_mm": uniform(rng, 1.0, 4.0),
        "necrosis_thr": uniform(rng, 0.1, 0.9) if rng.random() < 0.75 else NO_NECROSIS,
        "hu_necrosis": uniform(rng, 0, 35),
        "necrosis_depth_mm": uniform(rng, 2, 7),
    }


def _tissue(rng: np.random.Generator) -> dict[str, Any]:
    fat = uniform(rng, -130, -70)
    return {
        "hu_fat": fat,
        "hu_visc_fat": fat + uniform(rng, -10, 20),
        "hu_skin": uniform(rng, 0, 50),
        "hu_muscle": uniform(rng, 30, 70),
        "hu_cortical": uniform(rng, 400, 1300),
        "hu_cancellous": uniform(rng, 100, 350),
        "hu_posterior_bone": uniform(rng, 300, 800),
        "hu_disc": uniform(rng, 60, 110),
        "hu_csf": uniform(rng, 0, 30),
        "hu_lung": uniform(rng, -920, -780),
        "hu_gall": uniform(rng, -5, 30),
    }


def _organs(rng: np.random.Generator) -> dict[str, Any]:
    """Bowel amount, wall, content (water, stool, positive oral contrast), gas; organ sizes."""
    oral = rng.random() < 0.35
    fluid = uniform(rng, 150, 600) if oral else uniform(rng, -5, 30)
    return {
        "hu_bowel_wall": uniform(rng, 25, 100),
        "hu_bowel_fluid": fluid,
        "hu_stool": uniform(rng, -60, 20),
        "bowel_cover": uniform(rng, 0.1, 0.8),
        "gas_level": uniform(rng, 0.3, 1.8),
        "gallbladder": bool(rng.random() < 0.6),
        "liver_height": uniform(rng, 120, 230),
        "spleen_height": uniform(rng, 70, 150),
    }


def _body(rng: np.random.Generator) -> dict[str, Any]:
    """Habitus: thin to obese (subcutaneous fat), muscle wall, round to wide abdomen; and the
    patient table under the back, in the field of view on most scans."""
    table = rng.random() < 0.7
    return {
        "fat_mm": uniform(rng, 3, 45),
        "wall_mm": uniform(rng, 5, 16),
        "body_aspect": uniform(rng, 1.1, 1.6),
        "table_hu": uniform(rng, 150, 600) if table else 0.0,
        "table_gap_mm": uniform(rng, 2, 30),
        "table_sag_mm": uniform(rng, 5, 40),
        "table_depth_mm": uniform(rng, 15, 45),
    }


def _noise(cfg: RandomizeConfig, rng: np.random.Generator) -> dict[str, Any]:
    """Noise level and grain (correlation length: sharp kernels give fine, soft ones coarse)."""
    return {
        "noise_hu": uniform(rng, *cfg.noise_hu),
        "noise_corr_px": uniform(rng, 0.35, 1.6),
        "bias_hu": uniform(rng, 0, 25),
    }


def _blur(cfg: RandomizeConfig, rng: np.random.Generator) -> dict[str, Any]:
    """In-plane resolution and the slice profile (share of each neighbour slice mixed in)."""
    return {"blur_mm": uniform(rng, *cfg.blur_mm), "z_mix": uniform(rng, 0.0, 0.3)}


def _kernel(rng: np.random.Generator) -> dict[str, Any]:
    """Reconstruction kernel as unsharp masking: amount > 0 sharpens (bone/lung kernels, noise
    amplified), amount < 0 smooths (soft-tissue kernels, iterative reconstruction)."""
    sharp = rng.random() < 0.5
    return {
        "kernel_amount": uniform(rng, 0.2, 1.2) if sharp else uniform(rng, -0.7, 0.0),
        "kernel_sigma_px": uniform(rng, 0.8, 2.0),
    }

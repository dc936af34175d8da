"""The renderer: a CT volume (float32 HU) around a KiTS19 label map, from one generator."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from preprocess.kits import CaseError, validate_labels
from preprocess.synthetic.anatomy import Anatomy
from preprocess.synthetic.appearance import Appearance
from preprocess.synthetic.organs import OrganPainter
from preprocess.synthetic.scanner import Scanner


class Renderer(Appearance, Anatomy, OrganPainter, Scanner):
    """Draws one case: per-case intensities and geometry, then slice-by-slice rendering.

    The draws from ``rng`` happen in a fixed order whatever the style; the style only replaces
    values after they are drawn, so a case's anatomy does not depend on its style.
    """

    def __init__(
        self,
        labels: np.ndarray,
        spacing: tuple[float, float, float],
        rng: np.random.Generator,
        style: Mapping[str, Any] | None = None,
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
        self._style = dict(style or {})
        self._draw_tissue(rng)
        if self._style:
            self._apply_style()
        self._infer_geometry(rng)
        self._draw_organs(rng)
        self._make_fields(rng)
        self.noise_seed = int(rng.integers(2**62))
        self._cache_k: int | None = None
        self._tiles: list[np.ndarray] | None = None
        self._cache: dict[int, np.ndarray] = {}


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise CaseError(f"spacing must be three positive numbers (sz, sy, sx), got {spacing!r}")
    return sp  # type: ignore[return-value]


def render_ct(
    labels: np.ndarray,
    spacing: Sequence[float],
    rng: np.random.Generator,
    style: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """An abdominal CT (float32 HU, same shape) around a KiTS19 label map.

    ``labels`` is (slices, H, W) with 0 background, 1 kidney, 2 tumor; ``spacing`` is
    (sz, sy, sx) in mm. The body, spine, organs and bowel are placed from the kidneys' positions;
    the result is deterministic for a given ``rng`` state. Without ``style`` the CT is a
    portal/nephrographic-phase scan; a style (:func:`preprocess.synthetic.randomize.draw_style`)
    replaces the phase, tissue HU, tumor look, noise, blur, kernel and habitus.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3 or min(labels.shape) == 0:
        raise CaseError(f"labels must be a non-empty 3-D array (slices, H, W), got {labels.shape}")
    labels = validate_labels(labels, "labels")
    return Renderer(np.ascontiguousarray(labels), _check_spacing(spacing), rng, style).render()

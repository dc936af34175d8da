"""Post-processing of predicted label volumes: keep the kidney+tumor components of the kidneys."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def keep_largest_components(labels: np.ndarray, n: int = 2, min_voxels: int = 0) -> np.ndarray:
    """Keep the ``n`` 3D connected components of kidney+tumor (label > 0) with the most kidney.

    Two by default: two kidneys. Components are ranked by their kidney voxels (label 1), then
    by size: a renal tumor grows from a kidney and lies in its component, while a large false
    positive elsewhere (bladder, bowel or stomach content marked as tumor) holds little or no
    kidney, however large it is. Everything outside the kept components becomes background;
    labels inside keep their value. Connectivity is 26 (faces, edges and corners), so a
    structure touching itself diagonally between slices stays one component. Components
    smaller than ``min_voxels`` are dropped even among the ``n`` kept (for patients with one
    kidney the second component may itself be an island).
    """
    labels = np.asarray(labels)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    components, count = ndimage.label(labels > 0, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return labels.astype(np.uint8, copy=True)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    kidney = np.bincount(components.ravel(), weights=labels.ravel() == 1, minlength=len(sizes))
    # most kidney first, then largest; lexsort's last key is the primary one, and its stable
    # order keeps the lower component id among ties (deterministic)
    order = np.lexsort((-sizes[1:], -kidney[1:])) + 1
    keep = [int(c) for c in order[:n] if sizes[c] > 0 and sizes[c] >= min_voxels]
    return np.where(np.isin(components, keep), labels, 0).astype(np.uint8)

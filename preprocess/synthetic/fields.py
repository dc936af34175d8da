"""Building blocks of the renderer: constants, uniform draws, distances and smooth random fields.

Orientation (KiTS19 arrays are (slices, rows, columns)): rows grow towards the patient's back,
slices towards the feet, and the patient's right lies towards column 0 (see ``RIGHT``).
"""

from __future__ import annotations

import cv2
import numpy as np

# Patient right is towards column 0 of a KiTS19 array. The affine's sign would say otherwise,
# but the label maps decide it: in 64% of the 156 two-kidney KiTS19 label maps available here
# the kidney at low column indices reaches lower (median 6 mm), and in most people the right
# kidney is the lower one (the liver sits above it). Slices grow towards the feet: the kidneys'
# distance from the midline grows with the slice index in 92% of the cases checked (the lower
# poles diverge). Rows grow towards the back (the kidneys lie in the posterior half).
RIGHT = -1.0

AIR = -1000.0


def uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def dist_mm(mask: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Euclidean distance (mm) from each True pixel to the nearest False pixel (0 outside).

    OpenCV's 5x5-mask distance transform is an order of magnitude faster than scipy's exact one
    and accurate to a few percent, plenty for tissue layers a few mm thick. In-plane spacing is
    treated as isotropic (the geometric mean), which KiTS19 scans are.
    """
    d = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5)
    d *= np.float32(spacing_mm)
    return d


class SmoothField:
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


def fit_line(z: np.ndarray, v: np.ndarray, max_slope: float, default: float) -> tuple[float, float]:
    """Robust-ish line v = a + b z with |b| <= max_slope (anatomy drifts slowly along the body)."""
    if len(z) == 0:
        return default, 0.0
    if len(z) < 3 or np.ptp(z) < 1e-6:
        return float(np.median(v)), 0.0
    slope = float(np.clip(np.polyfit(z, v, 1)[0], -max_slope, max_slope))
    return float(np.median(v - slope * z)), slope


def longest_zero_run(hist: np.ndarray) -> tuple[int, int]:
    """(start, length) of the longest run of zeros in a 1-D array (length 0 if none)."""
    zero = np.concatenate(([0], (hist == 0).astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(zero))
    if len(edges) == 0:
        return 0, 0
    starts, ends = edges[0::2], edges[1::2]
    j = int(np.argmax(ends - starts))
    return int(starts[j]), int(ends[j] - starts[j])

"""Per-sample geometric augmentation of image and mask, on the CPU, with OpenCV.

The thesis's transforms: horizontal flip, rotation within +-5 degrees, zoom within +-5 %, shift
within +-10 px. One affine matrix per sample combines them; the image is resampled bilinearly and
the mask with nearest neighbour (labels must stay labels). A 3D block gets one transform for all
its slices (the anatomy must stay continuous along z) and every block gets its own, unlike the
thesis's generator, which drew one transform per batch.

No TensorFlow here: this runs in worker threads (OpenCV releases the GIL).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = True
    rotation_deg: float = 5.0
    zoom: float = 0.05
    shift_px: float = 10.0

    @property
    def enabled(self) -> bool:
        return self.flip or self.rotation_deg > 0 or self.zoom > 0 or self.shift_px > 0


def random_affine(
    rng: np.random.Generator, size: tuple[int, int], cfg: AugmentConfig
) -> np.ndarray:
    """A 2x3 matrix: flip, rotation and zoom about the centre, then shift (pixels)."""
    h, w = size
    angle = rng.uniform(-cfg.rotation_deg, cfg.rotation_deg) if cfg.rotation_deg > 0 else 0.0
    scale = 1.0 + (rng.uniform(-cfg.zoom, cfg.zoom) if cfg.zoom > 0 else 0.0)
    shift = rng.uniform(-cfg.shift_px, cfg.shift_px, size=2) if cfg.shift_px > 0 else np.zeros(2)
    flip = cfg.flip and rng.random() < 0.5
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, scale)
    if flip:  # x -> (w - 1) - x, applied before the rotation
        matrix = matrix @ np.array([[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    matrix[:, 2] += shift
    return matrix


def _warp_pair(
    image: np.ndarray, mask: np.ndarray, matrix: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Warp (H, W[, C<=4]) image bilinearly and mask with nearest neighbour; outside -> 0."""
    h, w = image.shape[:2]
    common = {"dsize": (w, h), "borderMode": cv2.BORDER_CONSTANT, "borderValue": 0}
    return (
        cv2.warpAffine(image, matrix, flags=cv2.INTER_LINEAR, **common),
        cv2.warpAffine(mask, matrix, flags=cv2.INTER_NEAREST, **common),
    )


def apply_affine(
    image: np.ndarray, mask: np.ndarray, matrix: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Warp an (H, W) or (D, H, W) uint8 image and mask with one 2x3 matrix.

    Pixels that come from outside the image get 0 (air after windowing; background label).
    """
    if image.ndim == 2:
        return _warp_pair(image, mask, matrix)
    # A block: slices as channels, in groups of 4 (OpenCV's warp handles up to 4 channels).
    img = np.empty_like(image)
    msk = np.empty_like(mask)
    for start in range(0, image.shape[0], 4):
        stop = min(start + 4, image.shape[0])
        out_i, out_m = _warp_pair(
            np.ascontiguousarray(np.moveaxis(image[start:stop], 0, -1)),
            np.ascontiguousarray(np.moveaxis(mask[start:stop], 0, -1)),
            matrix,
        )
        if out_i.ndim == 2:  # OpenCV drops a channel axis of length 1
            out_i, out_m = out_i[..., None], out_m[..., None]
        img[start:stop] = np.moveaxis(out_i, -1, 0)
        msk[start:stop] = np.moveaxis(out_m, -1, 0)
    return img, msk


def augment_batch(
    images: np.ndarray, masks: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Augment each sample of a batch (N, [D,] H, W) with its own random transform."""
    out_i = np.empty_like(images)
    out_m = np.empty_like(masks)
    size = images.shape[-2:]
    for k in range(len(images)):
        matrix = random_affine(rng, size, cfg)
        out_i[k], out_m[k] = apply_affine(images[k], masks[k], matrix)
    return out_i, out_m

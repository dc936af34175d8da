"""Per-sample augmentation of image and mask, on the CPU, with NumPy and OpenCV.

Geometric: the thesis's transforms, horizontal flip, rotation within +-5 degrees, zoom within
+-5 %, shift within +-10 px. One affine matrix per sample combines them; the image is resampled
bilinearly and the mask with nearest neighbour (labels must stay labels). A 3D block gets one
transform for all its slices (the anatomy must stay continuous along z) and every block gets its
own, unlike the thesis's generator, which drew one transform per batch.

Intensity (optional, ``IntensityConfig``): nnU-Net's per-sample transforms, each with its own
probability and range: Gaussian noise, Gaussian blur, multiplicative brightness, contrast,
simulated low resolution (nearest-neighbour down-, cubic up-sampling), gamma (also on the
inverted image). They act on the image as floats in [0, 1] (the stored uint8 / 255, the scale the
model sees), so ranges carry over to any HU window; the result is rounded back to uint8, the
dataset's own resolution, so the feed is unchanged. The mask is never touched. A block gets one
draw of each parameter for all its slices, as for the geometry.

No TensorFlow here: this runs in worker threads (OpenCV releases the GIL).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import cv2
import numpy as np


@dataclass(frozen=True)
class IntensityConfig:
    """Probabilities (per sample) and ranges of the intensity transforms; all off by default.

    ``noise_sigma`` and the ranges are on the [0, 1] image: noise sigma 0.05 is about 50 HU in
    the thesis's 1024 HU window and 19 HU in nnU-Net's KiTS19 window [-79, 304].
    """

    noise_p: float = 0.0
    noise_sigma: tuple[float, float] = (0.0, 0.05)
    blur_p: float = 0.0
    blur_sigma_px: tuple[float, float] = (0.5, 1.0)
    brightness_p: float = 0.0
    brightness: tuple[float, float] = (0.75, 1.25)
    contrast_p: float = 0.0
    contrast: tuple[float, float] = (0.75, 1.25)
    lowres_p: float = 0.0
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    gamma_inverted_p: float = 0.0
    gamma_p: float = 0.0
    gamma: tuple[float, float] = (0.7, 1.5)

    def __post_init__(self) -> None:
        for name in PROBABILITIES:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def enabled(self) -> bool:
        return any(getattr(self, name) > 0 for name in PROBABILITIES)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


PROBABILITIES = tuple(f.name for f in fields(IntensityConfig) if f.name.endswith("_p"))
# nnU-Net's default 2D/3D training transforms (probabilities per sample, ranges as there; the
# noise variance 0-0.1 of its z-scored images is about sigma 0-0.05 on a [0, 1] image).
INTENSITY_PRESETS: dict[str, IntensityConfig] = {
    "none": IntensityConfig(),
    "nnunet": IntensityConfig(
        noise_p=0.1, blur_p=0.2, brightness_p=0.15, contrast_p=0.15, lowres_p=0.25,
        gamma_inverted_p=0.1, gamma_p=0.3,
    ),
    # for training on synthetic CT meant for real scans: every transform more often and wider
    "strong": IntensityConfig(
        noise_p=0.3, noise_sigma=(0.0, 0.08), blur_p=0.3, blur_sigma_px=(0.5, 1.5),
        brightness_p=0.3, brightness=(0.7, 1.3), contrast_p=0.3, contrast=(0.65, 1.5),
        lowres_p=0.3, lowres_zoom=(0.4, 1.0), gamma_inverted_p=0.15, gamma_p=0.3,
    ),
}  # fmt: skip


def intensity_config(preset: str, probabilities: dict[str, float] | None = None) -> IntensityConfig:
    """A preset of ``INTENSITY_PRESETS`` with some probabilities replaced, e.g. {"noise_p": 0.3}
    (names with or without the ``_p``)."""
    if preset not in INTENSITY_PRESETS:
        raise ValueError(
            f"unknown intensity preset {preset!r}; choose from {list(INTENSITY_PRESETS)}"
        )
    changes = {}
    for name, value in (probabilities or {}).items():
        key = name if name.endswith("_p") else f"{name}_p"
        if key not in PROBABILITIES:
            raise ValueError(f"unknown intensity transform {name!r}; choose from {PROBABILITIES}")
        changes[key] = float(value)
    return replace(INTENSITY_PRESETS[preset], **changes)


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = True
    rotation_deg: float = 5.0
    zoom: float = 0.05
    shift_px: float = 10.0
    intensity: IntensityConfig = field(default_factory=IntensityConfig)

    @property
    def geometric(self) -> bool:
        return self.flip or self.rotation_deg > 0 or self.zoom > 0 or self.shift_px > 0

    @property
    def enabled(self) -> bool:
        return self.geometric or self.intensity.enabled


def augment_config(
    geometric: bool, intensity: str = "none", probabilities: dict[str, float] | None = None
) -> AugmentConfig | None:
    """The run's augmentation from its options (None: nothing to do)."""
    base = AugmentConfig() if geometric else AugmentConfig(False, 0.0, 0.0, 0.0)
    cfg = replace(base, intensity=intensity_config(intensity, probabilities))
    return cfg if cfg.enabled else None


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


def _slices(image: np.ndarray, op: Any) -> np.ndarray:
    """Apply an in-plane OpenCV operation to an (H, W) image or each slice of a (D, H, W) block."""
    if image.ndim == 2:
        return op(image)
    return np.stack([op(s) for s in image])


def _gamma(x: np.ndarray, rng: np.random.Generator, limits: tuple[float, float]) -> np.ndarray:
    """nnU-Net's gamma: on the image rescaled to [0, 1], half the draws below 1 and half above,
    then the original mean and standard deviation restored."""
    lo, hi = limits
    g = rng.uniform(lo, 1.0) if rng.random() < 0.5 and lo < 1.0 else rng.uniform(max(lo, 1.0), hi)
    mean, std = x.mean(), x.std()
    x_min, span = x.min(), np.ptp(x)
    out = ((x - x_min) / (span + 1e-7)) ** np.float32(g) * span + x_min
    return (out - out.mean()) / (out.std() + 1e-7) * std + mean


def augment_intensity(
    image: np.ndarray, rng: np.random.Generator, cfg: IntensityConfig
) -> np.ndarray:
    """One sample's intensity augmentation: (H, W) or (D, H, W) uint8 in, same shape uint8 out.

    Each transform is drawn with its probability, in nnU-Net's order; the image is float in
    [0, 1] throughout and clipped to it at the end.
    """
    x = image.astype(np.float32) * np.float32(1.0 / 255.0)
    if rng.random() < cfg.noise_p:
        sigma = rng.uniform(*cfg.noise_sigma)
        x = x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(sigma)
    if rng.random() < cfg.blur_p:
        s = float(rng.uniform(*cfg.blur_sigma_px))
        x = _slices(x, lambda a: cv2.GaussianBlur(a, (0, 0), s, borderType=cv2.BORDER_REFLECT))
    if rng.random() < cfg.brightness_p:
        x = x * np.float32(rng.uniform(*cfg.brightness))
    if rng.random() < cfg.contrast_p:
        mean, lo, hi = x.mean(), x.min(), x.max()  # contrast about the mean, range kept
        x = np.clip((x - mean) * np.float32(rng.uniform(*cfg.contrast)) + mean, lo, hi)
    if rng.random() < cfg.lowres_p:
        h, w = x.shape[-2:]
        zoom = rng.uniform(*cfg.lowres_zoom)
        small = (max(1, round(w * zoom)), max(1, round(h * zoom)))
        x = _slices(
            x,
            lambda a: cv2.resize(
                cv2.resize(a, small, interpolation=cv2.INTER_NEAREST),
                (w, h),
                interpolation=cv2.INTER_CUBIC,
            ),
        )
    if rng.random() < cfg.gamma_inverted_p:
        x = 1.0 - _gamma(1.0 - x, rng, cfg.gamma)
    if rng.random() < cfg.gamma_p:
        x = _gamma(x, rng, cfg.gamma)
    return np.rint(np.clip(x, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


def augment_batch(
    images: np.ndarray, masks: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Augment each sample of a batch (N, [D,] H, W) with its own random transforms.

    Draws come from ``rng`` sample by sample (geometry, then intensity); a transform that is
    switched off draws nothing, so the geometric draws of a run without intensity augmentation
    are those of earlier versions.
    """
    out_i = np.empty_like(images)
    out_m = np.empty_like(masks)
    size = images.shape[-2:]
    for k in range(len(images)):
        if cfg.geometric:
            matrix = random_affine(rng, size, cfg)
            out_i[k], out_m[k] = apply_affine(images[k], masks[k], matrix)
        else:
            out_i[k], out_m[k] = images[k], masks[k]
        if cfg.intensity.enabled:
            out_i[k] = augment_intensity(out_i[k], rng, cfg.intensity)
    return out_i, out_m

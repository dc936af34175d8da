"""Scanner effects of the renderer: resolution blur, slice profile, reconstruction kernel,
gain non-uniformity and correlated noise; and the slice-by-slice rendering loop."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from preprocess.synthetic.fields import AIR, SmoothField


class Scanner:
    """Mixin of the renderer: turns clean slices into a scanned volume."""

    shape: tuple[int, int, int]
    sy: float
    sx: float
    blur_mm: float
    z_mix: float
    noise_hu: float
    noise_corr_px: float
    bias_hu: float
    kernel_amount: float
    kernel_sigma_px: float
    noise_seed: int
    f_bias: SmoothField
    _tiles: list[np.ndarray] | None

    clean_slice: Any  # OrganPainter.clean_slice

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
        if self.kernel_amount:
            img = self._reconstruction_kernel(img)
        return img

    def _reconstruction_kernel(self, img: np.ndarray) -> np.ndarray:
        """Unsharp masking of the noisy slice: a sharp kernel raises edges and noise alike, a
        soft one (negative amount) smooths both, as the kernels of a scanner do."""
        soft = cv2.GaussianBlur(
            img, (0, 0), sigmaX=self.kernel_sigma_px, borderType=cv2.BORDER_REPLICATE
        )
        amount = np.float32(self.kernel_amount)
        return img + amount * (img - soft)

    def _noise(self, k: int) -> np.ndarray:
        """Noise for slice k: a random cyclic shift and flip of one of a few noise tiles.

        Drawing 262k normals costs ~5 ms per 512x512 slice, more than drawing the anatomy;
        tiles drawn once per case, shifted by a per-slice generator seeded with (noise seed,
        k), give the same statistics for ~0.5 ms and keep every slice reproducible on its own.
        """
        if self._tiles is None:
            rng = np.random.default_rng([self.noise_seed, 2**31])
            sigma = self.noise_corr_px  # CT noise is spatially correlated by the kernel
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

"""Per-sample augmentation (train.augment)."""

import time
from dataclasses import replace

import cv2
import numpy as np
import pytest

from train.augment import (
    INTENSITY_PRESETS,
    PROBABILITIES,
    AugmentConfig,
    IntensityConfig,
    apply_affine,
    augment_batch,
    augment_config,
    augment_intensity,
    intensity_config,
    random_affine,
)
from train.config import parse_args


def _sample(rng: np.random.Generator, shape=(32, 32)):
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    mask = np.zeros(shape, np.uint8)
    mask[..., 8:20, 6:14] = 1
    mask[..., 10:13, 8:11] = 2
    return img, mask


def test_identity_config_leaves_sample_unchanged():
    rng = np.random.default_rng(0)
    img, mask = _sample(rng)
    matrix = random_affine(rng, img.shape, AugmentConfig(False, 0.0, 0.0, 0.0))
    out_i, out_m = apply_affine(img, mask, matrix)
    np.testing.assert_array_equal(out_i, img)
    np.testing.assert_array_equal(out_m, mask)


def test_flip_alone_mirrors_columns():
    rng = np.random.default_rng(1)
    img, mask = _sample(rng)
    cfg = AugmentConfig(True, 0.0, 0.0, 0.0)
    for _ in range(20):  # flip is drawn with probability 1/2
        matrix = random_affine(rng, img.shape, cfg)
        out_i, out_m = apply_affine(img, mask, matrix)
        if matrix[0, 0] < 0:
            np.testing.assert_array_equal(out_i, img[:, ::-1])
            np.testing.assert_array_equal(out_m, mask[:, ::-1])
            return
    pytest.fail("no flip drawn in 20 tries")


def test_ranges_and_masks_stay_labels():
    rng = np.random.default_rng(2)
    cfg = AugmentConfig()
    for _ in range(200):
        m = random_affine(rng, (128, 128), cfg)
        linear = m[:, :2]
        scale = np.sqrt(abs(np.linalg.det(linear)))
        angle = np.degrees(np.arctan2(abs(linear[1, 0]), abs(linear[0, 0])))
        assert 0.95 - 1e-9 <= scale <= 1.05 + 1e-9
        assert angle <= 5.0 + 1e-6
    img, mask = _sample(rng, (64, 64))
    out_i, out_m = augment_batch(img[None], mask[None], rng, cfg)
    assert set(np.unique(out_m)) <= {0, 1, 2}
    assert out_i.dtype == np.uint8 and out_i.shape == (1, 64, 64)


def test_block_gets_one_transform_for_all_slices_and_blocks_differ():
    rng = np.random.default_rng(3)
    block_img, block_mask = _sample(rng, (2, 9, 32, 32))
    out_i, out_m = augment_batch(block_img, block_mask, np.random.default_rng(7), AugmentConfig())
    # replay the same draws: every slice of block k must use block k's matrix
    replay = np.random.default_rng(7)
    for k in range(2):
        matrix = random_affine(replay, (32, 32), AugmentConfig())
        for z in range(9):
            ref = cv2.warpAffine(block_mask[k, z], matrix, (32, 32), flags=cv2.INTER_NEAREST)
            np.testing.assert_array_equal(out_m[k, z], ref)
    assert not np.array_equal(out_m[0], out_m[1])  # the two identical blocks moved differently


# ---- intensity augmentation ---------------------------------------------------------------------
ONLY = {name: 0.0 for name in PROBABILITIES}


def _only(name: str, **ranges) -> IntensityConfig:
    """Exactly one transform, always applied."""
    return replace(IntensityConfig(), **{**ONLY, f"{name}_p": 1.0}, **ranges)


def _ct_like(rng: np.random.Generator, shape=(64, 64)) -> np.ndarray:
    """A smooth image over most of the range: structure for blur/low-res to act on."""
    yy, xx = np.mgrid[: shape[-2], : shape[-1]]
    img = 128 + 80 * np.sin(xx / 5.0) * np.cos(yy / 7.0) + rng.normal(0, 5, shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_noise_raises_variance_and_is_deterministic():
    flat = np.full((64, 64), 100, np.uint8)
    cfg = _only("noise", noise_sigma=(0.02, 0.04))
    a = augment_intensity(flat, np.random.default_rng(5), cfg)
    b = augment_intensity(flat, np.random.default_rng(5), cfg)
    c = augment_intensity(flat, np.random.default_rng(6), cfg)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert 0.02 * 255 * 0.8 < a.astype(np.float32).std() < 0.04 * 255 * 1.2
    assert abs(a.astype(np.float32).mean() - 100) < 1.0


def test_gamma_keeps_range_order_and_statistics():
    rng = np.random.default_rng(1)
    img = _ct_like(rng)
    for name in ("gamma", "gamma_inverted"):
        changed = 0
        for seed in range(10):
            out = augment_intensity(img, np.random.default_rng(seed), _only(name))
            assert out.dtype == np.uint8 and out.shape == img.shape
            x, y = img.astype(np.float32).ravel(), out.astype(np.float32).ravel()
            order = np.argsort(x, kind="stable")
            assert (np.diff(y[order]) >= -1).all(), name  # monotone up to rounding
            assert abs(y.mean() - x.mean()) < 3 and abs(y.std() - x.std()) < 3  # stats kept
            changed += not np.array_equal(out, img)
        assert changed >= 8, name


def test_brightness_and_contrast():
    rng = np.random.default_rng(2)
    img = _ct_like(rng)
    x = img.astype(np.float32)
    out = augment_intensity(img, np.random.default_rng(0), _only("brightness")).astype(np.float32)
    inside = (x > 20) & (out < 250)
    ratio = out[inside] / x[inside]
    assert 0.75 - 0.05 < np.median(ratio) < 1.25 + 0.05 and np.ptp(ratio[x[inside] > 100]) < 0.03
    for seed in range(5):
        cfg = _only("contrast")
        out = augment_intensity(img, np.random.default_rng(seed), cfg).astype(np.float32)
        assert abs(out.mean() - x.mean()) < 3  # about the mean
        assert out.min() >= x.min() and out.max() <= x.max()  # range kept


def test_blur_and_low_resolution_keep_shape_and_mean():
    rng = np.random.default_rng(3)
    img = _ct_like(rng)
    x = img.astype(np.float32)
    high_pass = x - cv2.GaussianBlur(x, (0, 0), 2.0)
    for name in ("blur", "lowres"):
        out = augment_intensity(img, np.random.default_rng(4), _only(name))
        assert out.shape == img.shape and out.dtype == np.uint8
        y = out.astype(np.float32)
        assert abs(y.mean() - x.mean()) < 3, name
        assert not np.array_equal(out, img), name
        if name == "blur":  # fine detail (the noise) is what blurring takes away
            assert (y - cv2.GaussianBlur(y, (0, 0), 2.0)).std() < high_pass.std(), name
    odd = _ct_like(rng, (37, 50))  # any size comes back at its own size
    out = augment_intensity(odd, np.random.default_rng(0), _only("lowres", lowres_zoom=(0.5, 0.5)))
    assert out.shape == (37, 50)


def test_block_gets_one_intensity_draw_and_masks_are_untouched():
    rng = np.random.default_rng(4)
    img, mask = _sample(rng, (3, 4, 32, 32))
    img[:] = img[0, 0]  # every slice of every block alike
    cfg = AugmentConfig(False, 0.0, 0.0, 0.0, INTENSITY_PRESETS["strong"])
    out_i, out_m = augment_batch(img, mask, np.random.default_rng(9), cfg)
    np.testing.assert_array_equal(out_m, mask)
    for k in range(3):
        for z in range(1, 4):  # noise differs per voxel; compare what the draws share
            assert abs(float(out_i[k, z].mean()) - float(out_i[k, 0].mean())) < 2
    again = augment_batch(img, mask, np.random.default_rng(9), cfg)[0]
    np.testing.assert_array_equal(out_i, again)


def test_none_preset_leaves_geometric_augmentation_as_it_was():
    rng = np.random.default_rng(5)
    img, mask = _sample(rng, (4, 32, 32))
    plain = augment_batch(img, mask, np.random.default_rng(1), AugmentConfig())
    same = augment_batch(img, mask, np.random.default_rng(1), augment_config(True, "none"))
    for a, b in zip(plain, same, strict=True):
        np.testing.assert_array_equal(a, b)
    assert augment_config(False, "none") is None
    only_intensity = augment_config(False, "nnunet", {"noise": 1.0})
    assert not only_intensity.geometric and only_intensity.intensity.noise_p == 1.0
    assert only_intensity.intensity.gamma_p == INTENSITY_PRESETS["nnunet"].gamma_p
    with pytest.raises(ValueError, match="colour"):
        intensity_config("nnunet", {"colour": 0.5})
    with pytest.raises(ValueError, match="noise_p"):
        intensity_config("nnunet", {"noise_p": 1.5})
    with pytest.raises(ValueError, match="preset"):
        intensity_config("heavy")


def test_training_options_reach_the_augmentation():
    cfg = parse_args(
        ["--model", "unet2d", "--data", "d", "--out", "o", "--intensity-augment", "nnunet",
         "--intensity-p", "noise=0.5,gamma_p=0"]
    )  # fmt: skip
    assert cfg.to_dict()["intensity_augment"] == "nnunet"
    assert cfg.to_dict()["intensity_p"] == {"noise": 0.5, "gamma_p": 0}
    aug = augment_config(cfg.augment, cfg.intensity_augment, cfg.intensity_p)
    assert aug.geometric and aug.intensity.noise_p == 0.5 and aug.intensity.gamma_p == 0.0
    assert (
        parse_args(["--model", "unet2d", "--data", "d", "--out", "o"]).intensity_augment == "none"
    )
    with pytest.raises(SystemExit):
        parse_args(["--model", "unet2d", "--data", "d", "--out", "o", "--intensity-p", "hue=1"])


def test_intensity_augmentation_is_cheap_next_to_a_training_step():
    """A batch of 16 128x128 slices with every transform on costs a few ms (a CPU training
    step of Unet2D takes about a second)."""
    rng = np.random.default_rng(6)
    img = np.stack([_ct_like(rng, (128, 128)) for _ in range(16)])
    mask = np.zeros_like(img)
    every = replace(INTENSITY_PRESETS["strong"], **{name: 1.0 for name in PROBABILITIES})
    cfg = AugmentConfig(intensity=every)
    augment_batch(img, mask, np.random.default_rng(0), cfg)  # warm-up
    start = time.perf_counter()
    for seed in range(5):
        augment_batch(img, mask, np.random.default_rng(seed), cfg)
    per_batch = (time.perf_counter() - start) / 5
    print(f"geometric + every intensity transform: {per_batch * 1000:.1f} ms per batch of 16")
    assert per_batch < 0.25

"""Per-sample augmentation (train.augment)."""

import cv2
import numpy as np
import pytest

from train.augment import AugmentConfig, apply_affine, augment_batch, random_affine


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

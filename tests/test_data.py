"""Data feeding (train.data): shard assignment, epoch plans, batch sources."""

import numpy as np
import pytest
from conftest import preprocess_small

from train.augment import AugmentConfig
from train.data import (
    BatchSource,
    DataError,
    EpochPlan,
    RankShards,
    build_feed,
    check_mix_compatible,
    oversampled_length,
    rank_shard_indices,
)


def test_rank_shard_indices_and_errors():
    assert rank_shard_indices(8, 1, 4, "train") == [1, 5]
    with pytest.raises(DataError, match="3 ranks but the train split has only 2 shards"):
        rank_shard_indices(2, 0, 3, "train")
    with pytest.raises(DataError, match="cannot share evenly"):
        rank_shard_indices(6, 0, 4, "train")


def test_epoch_plan_oversamples_tumor_and_reshuffles_per_rank_and_epoch():
    has_tumor = np.zeros(100, bool)
    has_tumor[:10] = True
    length = oversampled_length(100, 0.1, 4.0)
    assert length == 130
    plan = EpochPlan(100, has_tumor, length, 4.0, seed=1, rank=0)
    order = plan.indices(0)
    assert len(order) == 130
    assert np.isin(order, np.arange(10)).sum() == 40  # each tumor sample 4 times
    assert set(order.tolist()) == set(range(100))
    np.testing.assert_array_equal(order, plan.indices(0))  # deterministic
    assert not np.array_equal(order, plan.indices(1))
    other = EpochPlan(100, has_tumor, length, 4.0, seed=1, rank=1)
    assert not np.array_equal(order, other.indices(0))
    flat = EpochPlan(100, has_tumor, 100, 1.0, seed=1, rank=0, shuffle=False)
    np.testing.assert_array_equal(flat.indices(5), np.arange(100))


def _shards(n=12, size=16):
    rng = np.random.default_rng(0)
    return RankShards(
        images=rng.integers(0, 256, (n, size, size), dtype=np.uint8),
        masks=rng.integers(0, 3, (n, size, size), dtype=np.uint8),
        sample_ids=np.arange(100, 100 + n),
        has_tumor=np.arange(n) % 3 == 0,
        is_padding=np.zeros(n, bool),
        files=[],
    )


def test_batch_source_is_deterministic_and_prefetch_keeps_order():
    shards = _shards()
    plan = EpochPlan(len(shards), shards.has_tumor, 12, 1.0, seed=3, rank=0)
    source = BatchSource(shards, plan, 4, AugmentConfig(), seed=3, rank=0, workers=2, prefetch=3)
    batches = list(source.batches(0, 2))
    assert len(batches) == 2 * source.steps_per_epoch == 6
    again = [source.make_batch(e, s) for e in range(2) for s in range(3)]
    for (a_i, a_m), (b_i, b_m) in zip(batches, again, strict=True):
        np.testing.assert_array_equal(a_i, b_i)
        np.testing.assert_array_equal(a_m, b_m)
    plain = BatchSource(shards, plan, 4, None, seed=3, rank=0)
    images, masks = plain.make_batch(0, 0)
    np.testing.assert_array_equal(images, shards.images[plan.indices(0)[:4]])
    assert not np.array_equal(batches[0][0], images)  # augmentation changed the batch


def test_make_dataset_gives_model_inputs(simple_kits, tmp_path):
    from train.data import make_dataset

    out = tmp_path / "ds"
    preprocess_small(simple_kits, out)
    feed = build_feed(
        out, rank=1, size=2, batch_size=4, tumor_factor=2.0, augment=AugmentConfig(), seed=0
    )
    assert all("shard_00001.h5" in f for f in feed.train.shards.files)
    x, y = next(iter(make_dataset(feed.train, 0, channels=3, n_classes=3)))
    assert x.shape == (4, 32, 32, 3) and y.shape == (4, 32, 32, 3)
    assert float(x.numpy().min()) >= 0.0 and float(x.numpy().max()) <= 1.0
    np.testing.assert_allclose(y.numpy().sum(-1), 1.0)
    np.testing.assert_array_equal(x.numpy()[..., 0], x.numpy()[..., 2])
    with pytest.raises(DataError, match="exceeds"):
        build_feed(out, rank=0, size=2, batch_size=10_000, tumor_factor=1.0, augment=None, seed=0)


def test_validation_reads_every_real_sample_once_with_a_partial_last_batch(simple_kits, tmp_path):
    import h5py

    out = preprocess_small(simple_kits, tmp_path / "ds", shards=4)  # 14 val samples: 2 padding
    padding = 0
    for rank in (0, 1):
        feed = build_feed(out, rank, 2, batch_size=4, tumor_factor=1.0, augment=None, seed=0)
        real = []
        for shard in (rank, rank + 2):
            with h5py.File(out / "val" / f"shard_0000{shard}.h5") as h5:
                real += h5["sample_ids"][()][~h5["is_padding"][()]].tolist()
                padding += int(h5["is_padding"][()].sum())
        val = feed.val
        assert val.steps_per_epoch == -(-len(real) // val.batch_size)
        batches = list(val.batches(0, 1))
        assert sum(len(images) for images, _ in batches) == len(real)
        assert not val.shards.is_padding.any()
        np.testing.assert_array_equal(np.sort(val.shards.sample_ids), np.sort(real))
    assert padding == 2


def test_mixed_epochs_draw_the_stated_fraction(simple_kits, tmp_path):
    from preprocess.dataset_format import load_manifest

    out = preprocess_small(simple_kits, tmp_path / "ds")
    feed = build_feed(
        out, 0, 2, 4, 1.0, None, seed=0, mix_dir=out, mix_fraction=0.25, check_sha256=False
    )
    source = feed.train
    length = source.steps_per_epoch * 4
    assert source.plan.epoch_length == length  # whole batches only
    orders = [source.plan.indices(epoch) for epoch in range(3)]
    for order in orders:
        assert source.shards.from_mix[order].sum() == round(0.25 * length)
    assert not np.array_equal(orders[0], orders[1])
    # the validation split stays on --data
    assert not feed.val.shards.from_mix.any()
    manifest = load_manifest(out)
    other = {**manifest, "image_size": 64}
    with pytest.raises(DataError, match="--mix-data elsewhere: image_size 64 differs"):
        check_mix_compatible(manifest, other, "elsewhere")
    with pytest.raises(DataError, match="strictly between 0 and 1"):
        build_feed(out, 0, 2, 4, 1.0, None, seed=0, mix_dir=out, mix_fraction=1.0)

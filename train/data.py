"""Data feeding for distributed training: each rank reads its own shards, no rank waits.

- ``RankShards``: the rank's shards of a split, loaded into memory once (a shard is a few
  hundred MB at most), with their checksums checked against the manifest.
- ``EpochPlan``: the rank's sample order for an epoch, reshuffled per rank per epoch, with tumor
  samples oversampled; the epoch length comes from the manifest, so it is the same on every rank.
- ``BatchSource``: batches built ahead of time by a thread pool (OpenCV releases the GIL), each
  sample with its own augmentation, deterministic for (seed, rank, epoch, batch).
- ``make_dataset``: the tf.data wrapper that turns uint8 batches into model inputs (x / 255,
  repeated to the model's channels; one-hot masks) in TensorFlow's own threads.

Only the train split is augmented; validation is read as stored.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from preprocess.dataset_format import (
    DatasetError,
    load_manifest,
    read_shard,
    sha256_file,
    shard_paths,
)
from train.augment import AugmentConfig, augment_batch


class DataError(DatasetError):
    """The dataset cannot feed this run (shard/rank mismatch, checksum, too few samples)."""


def rank_shard_indices(n_shards: int, rank: int, size: int, split: str) -> list[int]:
    """Shards read by ``rank``: rank, rank + size, ...; the count must divide evenly."""
    if size > n_shards:
        raise DataError(
            f"{size} ranks but the {split} split has only {n_shards} shards: every rank needs "
            f"its own shard (re-run preprocessing with --shards {size} or a multiple of it)"
        )
    if n_shards % size:
        raise DataError(
            f"the {split} split has {n_shards} shards, which {size} ranks cannot share evenly "
            f"(use a number of ranks that divides {n_shards})"
        )
    return list(range(rank, n_shards, size))


@dataclass
class RankShards:
    """One rank's part of a split, in memory."""

    images: np.ndarray  # uint8 (n, [D,] H, W)
    masks: np.ndarray  # uint8, same shape
    sample_ids: np.ndarray
    has_tumor: np.ndarray
    files: list[str]

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def load(
        cls,
        dataset_dir: str | Path,
        split: str,
        rank: int,
        size: int,
        manifest: dict[str, Any] | None = None,
        check_sha256: bool = True,
    ) -> RankShards:
        manifest = manifest or load_manifest(dataset_dir)
        paths = shard_paths(dataset_dir, split, manifest)
        entries = manifest["splits"][split]["shards"]
        if not paths:
            raise DataError(f"{dataset_dir}: the {split} split is empty")
        parts = []
        for index in rank_shard_indices(len(paths), rank, size, split):
            path = paths[index]
            if not path.is_file():
                raise DataError(f"{path}: shard listed in the manifest is missing")
            if check_sha256 and sha256_file(path) != entries[index]["sha256"]:
                raise DataError(
                    f"{path}: SHA-256 differs from the manifest (corrupted or modified shard); "
                    f"run python -m preprocess.verify {dataset_dir}"
                )
            parts.append(read_shard(path, ("images", "masks", "sample_ids", "has_tumor")))
        return cls(
            images=np.concatenate([p["images"] for p in parts]),
            masks=np.concatenate([p["masks"] for p in parts]),
            sample_ids=np.concatenate([p["sample_ids"] for p in parts]),
            has_tumor=np.concatenate([p["has_tumor"] for p in parts]),
            files=[str(paths[i]) for i in rank_shard_indices(len(paths), rank, size, split)],
        )


def oversampled_length(n_samples: int, tumor_fraction: float, factor: float) -> int:
    """Epoch length with tumor samples counted ``factor`` times (the thesis's duplication)."""
    return int(round(n_samples * (1.0 + (factor - 1.0) * tumor_fraction)))


class EpochPlan:
    """Which of the rank's samples make up each epoch, in which order."""

    def __init__(
        self,
        n_samples: int,
        has_tumor: np.ndarray,
        epoch_length: int,
        tumor_factor: float,
        seed: int,
        rank: int,
        shuffle: bool = True,
    ) -> None:
        self.n_samples = n_samples
        self.has_tumor = has_tumor
        self.epoch_length = epoch_length
        self.tumor_factor = tumor_factor
        self.seed = seed
        self.rank = rank
        self.shuffle = shuffle

    def indices(self, epoch: int) -> np.ndarray:
        base = np.arange(self.n_samples)
        if not self.shuffle:
            return base[: self.epoch_length]
        rng = np.random.default_rng([self.seed, self.rank, epoch, 0xDA7A])
        pool = [base]
        extra = self.tumor_factor - 1.0
        tumor = np.flatnonzero(self.has_tumor)
        if extra > 0 and len(tumor):
            whole, frac = int(extra), extra - int(extra)
            pool += [tumor] * whole
            if frac > 0:
                pool.append(rng.choice(tumor, size=int(round(frac * len(tumor))), replace=False))
        pool = np.concatenate(pool)
        reps = -(-self.epoch_length // len(pool))
        order = np.concatenate([rng.permutation(pool) for _ in range(reps)])
        return order[: self.epoch_length]


class BatchSource:
    """Yields (images, masks) uint8 batches for epochs [first_epoch, last_epoch), prefetched."""

    def __init__(
        self,
        shards: RankShards,
        plan: EpochPlan,
        batch_size: int,
        augment: AugmentConfig | None,
        seed: int,
        rank: int,
        workers: int = 2,
        prefetch: int = 8,
    ) -> None:
        self.shards = shards
        self.plan = plan
        self.batch_size = batch_size
        self.augment = augment if augment and augment.enabled else None
        self.seed = seed
        self.rank = rank
        self.workers = max(1, workers)
        self.prefetch = max(1, prefetch)
        self.steps_per_epoch = plan.epoch_length // batch_size
        self.recorder: Any = None  # train.callbacks.ProducedIds, when sample ids are recorded

    def limit_steps(self, max_steps: int) -> None:
        if max_steps > 0:
            self.steps_per_epoch = min(self.steps_per_epoch, max_steps)

    def produced_ids(self, epoch: int) -> list[int]:
        return self.recorder.pop(epoch) if self.recorder is not None else []

    def batch_indices(self, epoch: int, step: int) -> np.ndarray:
        order = self.plan.indices(epoch)
        return order[step * self.batch_size : (step + 1) * self.batch_size]

    def epoch_sample_ids(self, epoch: int) -> np.ndarray:
        order = self.plan.indices(epoch)[: self.steps_per_epoch * self.batch_size]
        return self.shards.sample_ids[order]

    def make_batch(
        self, epoch: int, step: int, order: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        if order is None:
            order = self.plan.indices(epoch)
        idx = order[step * self.batch_size : (step + 1) * self.batch_size]
        images = self.shards.images[idx]
        masks = self.shards.masks[idx]
        if self.recorder is not None:
            self.recorder.add(epoch, step, self.shards.sample_ids[idx])
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.rank, epoch, step])
            images, masks = augment_batch(images, masks, rng, self.augment)
        return images, masks

    def batches(self, first_epoch: int, last_epoch: int | None = None) -> Iterator[tuple]:
        """Batches of consecutive epochs (forever when last_epoch is None), in order."""

        def jobs():
            epoch = first_epoch
            while last_epoch is None or epoch < last_epoch:
                order = self.plan.indices(epoch)
                for step in range(self.steps_per_epoch):
                    yield epoch, step, order
                epoch += 1

        with ThreadPoolExecutor(self.workers, thread_name_prefix="batches") as pool:
            pending: deque = deque()
            for epoch, step, order in jobs():
                pending.append(pool.submit(self.make_batch, epoch, step, order))
                if len(pending) >= self.prefetch:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()


def make_dataset(
    source: BatchSource,
    first_epoch: int,
    channels: int,
    n_classes: int,
    last_epoch: int | None = None,
) -> Any:
    """tf.data pipeline: uint8 batches -> (float32 x in [0, 1] with ``channels``, one-hot y)."""
    import tensorflow as tf

    sample_shape = source.shards.images.shape[1:]
    spec = tf.TensorSpec((None, *sample_shape), tf.uint8)

    def to_model_input(images, masks):
        x = tf.cast(images, tf.float32) / 255.0
        x = tf.repeat(x[..., None], channels, axis=-1)
        y = tf.one_hot(tf.cast(masks, tf.int32), n_classes, dtype=tf.float32)
        return x, y

    ds = tf.data.Dataset.from_generator(
        lambda: source.batches(first_epoch, last_epoch), output_signature=(spec, spec)
    )
    ds = ds.map(to_model_input, num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = 0
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


@dataclass
class Feed:
    """Everything training needs from the data, for one rank."""

    train: BatchSource
    val: BatchSource
    manifest: dict[str, Any]
    sample_shape: tuple[int, ...]


def build_feed(
    dataset_dir: str | Path,
    rank: int,
    size: int,
    batch_size: int,
    tumor_factor: float,
    augment: AugmentConfig | None,
    seed: int,
    workers: int = 2,
    check_sha256: bool = True,
) -> Feed:
    """Load this rank's train and val shards and set up their batch sources."""
    manifest = load_manifest(dataset_dir)
    train = RankShards.load(dataset_dir, "train", rank, size, manifest, check_sha256)
    val = RankShards.load(dataset_dir, "val", rank, size, manifest, check_sha256)
    info = manifest["splits"]["train"]
    tumor_fraction = info["n_tumor_samples"] / max(info["n_real_samples"], 1)
    # From the samples this rank actually holds: unequal shards then show up as unequal steps,
    # which the ranks compare before training (train.runtime.agree_on_steps).
    epoch_length = oversampled_length(len(train), tumor_fraction, tumor_factor)
    if epoch_length < batch_size:
        raise DataError(
            f"batch size {batch_size} exceeds the {epoch_length} training samples per rank "
            f"({size} ranks); lower --batch-size or use fewer ranks"
        )
    train_plan = EpochPlan(len(train), train.has_tumor, epoch_length, tumor_factor, seed, rank)
    val_batch = min(batch_size, len(val))
    val_plan = EpochPlan(len(val), val.has_tumor, len(val), 1.0, seed, rank, shuffle=False)
    return Feed(
        train=BatchSource(train, train_plan, batch_size, augment, seed, rank, workers),
        val=BatchSource(val, val_plan, val_batch, None, seed, rank, workers=1),
        manifest=manifest,
        sample_shape=tuple(train.images.shape[1:]),
    )


def steps_summary(feed: Feed) -> dict[str, int]:
    return {
        "train_samples_local": len(feed.train.shards),
        "train_steps": feed.train.steps_per_epoch,
        "val_samples_local": len(feed.val.shards),
        "val_steps": feed.val.steps_per_epoch,
        "epoch_length": feed.train.plan.epoch_length,
    }

"""Data feeding for distributed training: each rank reads its own shards, no rank waits.

- ``RankShards``: the rank's shards of a split, loaded into memory once (a shard is a few
  hundred MB at most), with their checksums checked against the manifest.
- ``EpochPlan``: the rank's sample order for an epoch, reshuffled per rank per epoch, with tumor
  samples oversampled; the epoch length comes from the manifest, so it is the same on every rank.
  ``MixedPlan`` draws a set fraction of each epoch from a second dataset (``--mix-data``).
- ``BatchSource``: batches built ahead of time by a thread pool (OpenCV releases the GIL), each
  sample with its own augmentation, deterministic for (seed, rank, epoch, batch).
- ``make_dataset``: the tf.data wrapper that turns uint8 batches into model inputs (x / 255,
  repeated to the model's channels; one-hot masks) in TensorFlow's own threads.

Only the train split is augmented. Validation reads every real sample of the rank's val shards
once, as stored: the padding repeats that make shards equal are left out, and the last batch may
be smaller, so the validation confusion matrix counts each real sample exactly once. Ranks may
then run different numbers of validation steps; nothing collective happens during validation.
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


FIELDS = ("images", "masks", "sample_ids", "has_tumor", "is_padding")


@dataclass
class RankShards:
    """One rank's part of a split, in memory."""

    images: np.ndarray  # uint8 (n, [D,] H, W)
    masks: np.ndarray  # uint8, same shape
    sample_ids: np.ndarray
    has_tumor: np.ndarray
    is_padding: np.ndarray
    files: list[str]
    from_mix: np.ndarray | None = None  # True for samples of the --mix-data dataset

    def __len__(self) -> int:
        return len(self.images)

    def __post_init__(self) -> None:
        if self.from_mix is None:
            self.from_mix = np.zeros(len(self.images), bool)

    def subset(self, index: np.ndarray) -> RankShards:
        """The samples at ``index`` (a copy)."""
        return RankShards(
            images=self.images[index],
            masks=self.masks[index],
            sample_ids=self.sample_ids[index],
            has_tumor=self.has_tumor[index],
            is_padding=self.is_padding[index],
            files=self.files,
            from_mix=self.from_mix[index],
        )

    @classmethod
    def concatenate(cls, first: RankShards, second: RankShards) -> RankShards:
        """``first``'s samples, then ``second``'s, which are flagged ``from_mix``."""
        return cls(
            images=np.concatenate([first.images, second.images]),
            masks=np.concatenate([first.masks, second.masks]),
            sample_ids=np.concatenate([first.sample_ids, second.sample_ids]),
            has_tumor=np.concatenate([first.has_tumor, second.has_tumor]),
            is_padding=np.concatenate([first.is_padding, second.is_padding]),
            files=first.files + second.files,
            from_mix=np.concatenate([first.from_mix, np.ones(len(second), bool)]),
        )

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
            parts.append(read_shard(path, FIELDS))
        return cls(
            **{field: np.concatenate([p[field] for p in parts]) for field in FIELDS},
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


class MixedPlan:
    """An epoch of ``epoch_length`` samples of which ``mix.epoch_length`` come from a second
    dataset: ``main``'s and ``mix``'s orders for the epoch, shuffled together.

    Indices of ``mix``'s samples are offset by ``offset`` (where they start in the combined
    ``RankShards``).
    """

    def __init__(self, main: EpochPlan, mix: EpochPlan, offset: int, seed: int, rank: int) -> None:
        self.main = main
        self.mix = mix
        self.offset = offset
        self.seed = seed
        self.rank = rank
        self.epoch_length = main.epoch_length + mix.epoch_length

    def indices(self, epoch: int) -> np.ndarray:
        order = np.concatenate([self.main.indices(epoch), self.offset + self.mix.indices(epoch)])
        return np.random.default_rng([self.seed, self.rank, epoch, 0x313C]).permutation(order)


class BatchSource:
    """Yields (images, masks) uint8 batches for epochs [first_epoch, last_epoch), prefetched.

    ``drop_remainder`` (training) keeps whole batches only; without it (validation) the last
    batch holds the rest of the epoch.
    """

    def __init__(
        self,
        shards: RankShards,
        plan: EpochPlan | MixedPlan,
        batch_size: int,
        augment: AugmentConfig | None,
        seed: int,
        rank: int,
        workers: int = 2,
        prefetch: int = 8,
        drop_remainder: bool = True,
    ) -> None:
        self.shards = shards
        self.plan = plan
        self.batch_size = batch_size
        self.augment = augment if augment and augment.enabled else None
        self.seed = seed
        self.rank = rank
        self.workers = max(1, workers)
        self.prefetch = max(1, prefetch)
        if drop_remainder:
            self.steps_per_epoch = plan.epoch_length // batch_size
        else:
            self.steps_per_epoch = -(-plan.epoch_length // batch_size)
        self.recorder: Any = None  # train.callbacks.ProducedIds, when sample ids are recorded

    def limit_steps(self, max_steps: int) -> None:
        if max_steps > 0:
            self.steps_per_epoch = min(self.steps_per_epoch, max_steps)

    def produced_ids(self, epoch: int) -> tuple[list[int], list[int]]:
        """Ids of the samples produced for ``epoch``: from the dataset, from the mixed one."""
        return self.recorder.pop(epoch) if self.recorder is not None else ([], [])

    def make_batch(
        self, epoch: int, step: int, order: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        if order is None:
            order = self.plan.indices(epoch)
        idx = order[step * self.batch_size : (step + 1) * self.batch_size]
        images = self.shards.images[idx]
        masks = self.shards.masks[idx]
        if self.recorder is not None:
            self.recorder.add(epoch, step, self.shards.sample_ids[idx], self.shards.from_mix[idx])
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
    mix_manifest: dict[str, Any] | None = None


#: Manifest entries a mixed-in dataset must share with the main one (same model input).
MIX_MUST_MATCH = ("kind", "image_size", "block_depth", "channels", "normalization")


def check_mix_compatible(
    manifest: dict[str, Any], mix_manifest: dict[str, Any], mix_dir: str | Path
) -> None:
    """The second dataset must give the model the same input as the first; DataError if not."""
    for key in MIX_MUST_MATCH:
        if manifest.get(key) != mix_manifest.get(key):
            raise DataError(
                f"--mix-data {mix_dir}: {key} {mix_manifest.get(key)!r} differs from --data's "
                f"{manifest.get(key)!r} (both datasets must be preprocessed alike)"
            )


def _tumor_fraction(manifest: dict[str, Any]) -> float:
    info = manifest["splits"]["train"]
    return info["n_tumor_samples"] / max(info["n_real_samples"], 1)


def _train_plan(
    shards: RankShards,
    manifest: dict[str, Any],
    tumor_factor: float,
    seed: int,
    rank: int,
    batch_size: int,
    size: int,
) -> EpochPlan:
    # From the samples this rank actually holds: unequal shards then show up as unequal steps,
    # which the ranks compare before training.
    epoch_length = oversampled_length(len(shards), _tumor_fraction(manifest), tumor_factor)
    if epoch_length < batch_size:
        raise DataError(
            f"batch size {batch_size} exceeds the {epoch_length} training samples per rank "
            f"({size} ranks); lower --batch-size or use fewer ranks"
        )
    return EpochPlan(len(shards), shards.has_tumor, epoch_length, tumor_factor, seed, rank)


def _mixed_train(
    train: RankShards,
    plan: EpochPlan,
    mix: RankShards,
    mix_fraction: float,
    tumor_factor: float,
    batch_size: int,
) -> tuple[RankShards, MixedPlan]:
    """Whole batches of the epoch's length, ``mix_fraction`` of them (rounded) from ``mix``."""
    if not 0.0 < mix_fraction < 1.0:
        raise DataError(f"--mix-fraction must lie strictly between 0 and 1; got {mix_fraction}")
    epoch_length = plan.epoch_length // batch_size * batch_size
    n_mix = int(round(mix_fraction * epoch_length))
    if not 0 < n_mix < epoch_length:
        raise DataError(
            f"--mix-fraction {mix_fraction} of an epoch of {epoch_length} samples per rank "
            f"leaves one of the two datasets without a sample; choose a fraction nearer 0.5"
        )
    main = EpochPlan(
        len(train), train.has_tumor, epoch_length - n_mix, tumor_factor, plan.seed, plan.rank
    )
    # the second dataset's own order: a seed of its own, so it does not repeat the first's
    mix_plan = EpochPlan(len(mix), mix.has_tumor, n_mix, tumor_factor, plan.seed + 1, plan.rank)
    combined = RankShards.concatenate(train, mix)
    return combined, MixedPlan(main, mix_plan, len(train), plan.seed, plan.rank)


def _val_source(
    dataset_dir: str | Path,
    manifest: dict[str, Any],
    rank: int,
    size: int,
    batch_size: int,
    seed: int,
    check_sha256: bool,
) -> BatchSource:
    """This rank's real validation samples (padding left out), each once, the last batch partial."""
    val = RankShards.load(dataset_dir, "val", rank, size, manifest, check_sha256)
    val = val.subset(np.flatnonzero(~val.is_padding))
    if len(val) == 0:
        raise DataError(
            f"{dataset_dir}: the val shards of rank {rank} hold only padding (fewer real "
            f"validation samples than shards); re-run preprocessing with fewer --shards"
        )
    plan = EpochPlan(len(val), val.has_tumor, len(val), 1.0, seed, rank, shuffle=False)
    return BatchSource(
        val, plan, min(batch_size, len(val)), None, seed, rank, workers=1, drop_remainder=False
    )


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
    mix_dir: str | Path | None = None,
    mix_fraction: float = 0.0,
) -> Feed:
    """Load this rank's train and val shards and set up their batch sources.

    With ``mix_dir``, ``mix_fraction`` of every training epoch comes from that dataset's train
    split (read by the ranks as ``dataset_dir``'s is); validation stays on ``dataset_dir``.
    """
    manifest = load_manifest(dataset_dir)
    train = RankShards.load(dataset_dir, "train", rank, size, manifest, check_sha256)
    plan: EpochPlan | MixedPlan = _train_plan(
        train, manifest, tumor_factor, seed, rank, batch_size, size
    )
    mix_manifest = None
    if mix_dir is not None:
        mix_manifest = load_manifest(mix_dir)
        check_mix_compatible(manifest, mix_manifest, mix_dir)
        try:
            mix = RankShards.load(mix_dir, "train", rank, size, mix_manifest, check_sha256)
        except DataError as exc:
            raise DataError(f"--mix-data {mix_dir}: {exc}") from exc
        train, plan = _mixed_train(train, plan, mix, mix_fraction, tumor_factor, batch_size)
    return Feed(
        train=BatchSource(train, plan, batch_size, augment, seed, rank, workers),
        val=_val_source(dataset_dir, manifest, rank, size, batch_size, seed, check_sha256),
        manifest=manifest,
        sample_shape=tuple(train.images.shape[1:]),
        mix_manifest=mix_manifest,
    )

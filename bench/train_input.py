"""Benchmark parts (b)-(d) of ``bench.train``: the input pipeline, the thesis's
ImageDataGenerator beside it, and epoch time against compute time (see bench/train.py)."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

QUICK_OPTIONS = {"base_filters": 4}  # unet2d/unet3d; other models shrink with width
IDG_REFERENCE_SPS = 280.0  # what the thesis's ImageDataGenerator is expected to manage
# ImageDataGenerator settings of the thesis, the same transforms as train.augment's defaults
IDG_ARGS = {
    "horizontal_flip": True,
    "rotation_range": 5,
    "zoom_range": 0.05,
    "width_shift_range": 10,
    "height_shift_range": 10,
}


def pipeline_source(
    dataset: Path, batch_size: int, workers: int, augment: bool = True
) -> tuple[Any, Any]:
    """(BatchSource, RankShards) over the dataset's train shard, as train.data.build_feed
    makes them (one rank, tumor factor 1 as for 2D models)."""
    from preprocess.dataset_format import load_manifest
    from train.augment import AugmentConfig
    from train.data import BatchSource, EpochPlan, RankShards

    manifest = load_manifest(dataset)
    shards = RankShards.load(dataset, "train", 0, 1, manifest)
    plan = EpochPlan(len(shards), shards.has_tumor, len(shards), 1.0, seed=42, rank=0)
    source = BatchSource(
        shards, plan, batch_size, AugmentConfig() if augment else None, 42, 0, workers
    )
    return source, shards


def _rate(iterator: Iterator[Any], batch_size: int, warmup: int, batches: int) -> dict[str, Any]:
    """Samples per second over ``batches`` batches of an iterator, after ``warmup`` batches."""
    for _ in range(warmup):
        next(iterator)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - t0
    return {
        "samples_per_s": batches * batch_size / seconds,
        "seconds": seconds,
        "batches": batches,
        "warmup_batches": warmup,
    }


def run_pipeline(dataset: Path, batches: int) -> dict[str, Any]:
    from preprocess.kits import N_CLASSES
    from train.data import make_dataset

    batch, workers = 64, 2
    source, shards = pipeline_source(dataset, batch, workers)
    gen = source.batches(0)
    raw = _rate(gen, batch, warmup=10, batches=batches)
    gen.close()  # stops the thread pool before the next measurement
    print(f"  (b) BatchSource.batches: {raw['samples_per_s']:8.0f} samples/s", flush=True)
    source, _ = pipeline_source(dataset, batch, workers)
    ds = make_dataset(source, 0, channels=3, n_classes=N_CLASSES)
    it = iter(ds)
    tfdata = _rate(it, batch, warmup=10, batches=batches)
    del it, ds  # let the generator's workers go before the next measurement
    gc.collect()
    print(f"  (b) make_dataset (tf.data): {tfdata['samples_per_s']:8.0f} samples/s", flush=True)
    return {
        "dataset": str(dataset),
        "shard_samples": len(shards),
        "sample_shape": list(shards.images.shape[1:]),
        "batch_size": batch,
        "workers": workers,
        "augmentation": "flip, rotation +-5 deg, zoom +-5 %, shift +-10 px (train.augment)",
        "raw_uint8": raw,
        "tf_data": tfdata,
    }


def run_keras_idg(dataset: Path, batches: int) -> dict[str, Any]:
    """The thesis's generator pair over in-memory float arrays, one thread."""
    import numpy as np
    from tf_keras.preprocessing.image import ImageDataGenerator

    batch = 64
    _, shards = pipeline_source(dataset, batch, 1, augment=False)
    n = min(len(shards), 4 * batch)
    images = np.repeat((shards.images[:n].astype(np.float32) / 255.0)[..., None], 3, axis=-1)
    masks = np.eye(3, dtype=np.float32)[shards.masks[:n]]
    seed = 1  # the same seed makes both generators draw the same order and transforms
    it_img = ImageDataGenerator(**IDG_ARGS).flow(images, batch_size=batch, seed=seed)
    it_msk = ImageDataGenerator(**IDG_ARGS).flow(masks, batch_size=batch, seed=seed)

    def pairs():
        while True:  # alternate strictly: each flow reseeds numpy before its batch
            yield next(it_img), next(it_msk)

    rate = _rate(pairs(), batch, warmup=1, batches=batches)
    print(f"  (c) ImageDataGenerator: {rate['samples_per_s']:8.0f} samples/s", flush=True)
    return {
        "batch_size": batch,
        "settings": IDG_ARGS,
        "arrays": "image float32 128x128x3, mask one-hot float32 128x128x3, in memory",
        "threads": 1,
        "reference_samples_per_s": IDG_REFERENCE_SPS,
        **rate,
    }


def epoch_timer() -> Any:
    """A Keras callback collecting each epoch's wall time (measured from here, not in train/)."""
    import tf_keras as keras

    class EpochTimes(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []
            self._t0 = 0.0

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.seconds.append(time.perf_counter() - self._t0)

    return EpochTimes()


def run_epoch(dataset: Path, steps: int, batch: int, quick: bool) -> dict[str, Any]:
    """Second-epoch wall time fed by make_dataset vs fed one in-memory batch (same model)."""
    import numpy as np
    import tensorflow as tf
    import tf_keras as keras

    import models
    from train.data import make_dataset
    from train.losses import get_loss
    from train.metrics import get_metrics
    from train.runtime import set_seeds

    workers = 2
    source, shards = pipeline_source(dataset, batch, workers)
    source.limit_steps(steps)
    shape = (*shards.images.shape[1:], 3)
    options = {"l2": 1e-4, **(QUICK_OPTIONS if quick else {})}
    set_seeds(42)
    model = models.build("unet2d", shape, 3, **options)
    weights = [0.35, 12.0, 180.0]
    model.compile(
        optimizer=keras.optimizers.Adam(4e-4),
        loss=get_loss("weighted_dice", class_weights=weights),
        metrics=get_metrics(weights),
    )
    # one real augmented batch, turned into model input as make_dataset does, kept in memory
    images, masks = source.make_batch(0, 0)
    x = np.repeat((images.astype(np.float32) / 255.0)[..., None], 3, axis=-1)
    y = np.eye(3, dtype=np.float32)[masks]
    in_memory = tf.data.Dataset.from_tensors((x, y)).repeat()
    results = {}
    for label, ds in (
        ("in_memory", in_memory),
        ("pipeline", make_dataset(source, 0, 3, 3)),
    ):
        timer = epoch_timer()
        model.fit(ds, steps_per_epoch=steps, epochs=2, callbacks=[timer], verbose=0)
        results[label] = {"epoch_seconds": timer.seconds, "timed_epoch_seconds": timer.seconds[1]}
        print(f"  (d) epoch 2 fed {label:<9}: {timer.seconds[1]:8.2f} s", flush=True)
    ratio = results["pipeline"]["timed_epoch_seconds"] / results["in_memory"]["timed_epoch_seconds"]
    return {
        "model": "unet2d",
        "input_shape": list(shape),
        "options": options,
        "batch_size": batch,
        "steps_per_epoch": steps,
        "workers": workers,
        "tensorflow_threads": "default",
        "in_memory": results["in_memory"],
        "pipeline": results["pipeline"],
        "ratio": ratio,
        "compute_samples_per_s": steps * batch / results["in_memory"]["timed_epoch_seconds"],
        "method": "model.fit(epochs=2); the second epoch is timed by a callback; in_memory "
        "repeats one batch from tf.data.Dataset.from_tensors",
    }

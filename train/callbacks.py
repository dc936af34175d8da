"""Keras callbacks of a training run: checkpoints (rank 0), resume state, progress, sample log."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras

from preprocess.dataset_format import write_json_atomic
from train import checkpoint
from train.metrics import ConfusionMatrix, confusion_scores


def maximise(monitor: str) -> bool:
    return "loss" not in monitor


class CheckpointCallback(keras.callbacks.Callback):
    """Rank 0: best weights by ``monitor``; latest checkpoint every k epochs and at the end."""

    def __init__(
        self,
        run_dir: Path,
        monitor: str,
        every: int,
        last_epoch: int,
        state_callbacks: dict[str, Any],
        best: dict[str, Any] | None = None,
        seconds_before: float = 0.0,
        session: int = 1,
        keep_every: int = 0,
    ) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.keep_every = keep_every
        # Training time and session count go into every checkpoint, so that a session killed
        # at its walltime (the usual end of a cluster job) still counts in the run's record.
        self.seconds_before = seconds_before
        self.session = session
        self.t0 = time.perf_counter()
        self.monitor = monitor
        self.every = max(1, every)
        self.last_epoch = last_epoch
        self.state_callbacks = state_callbacks
        self.best_value = best.get("value") if best else None
        self.best_epoch = best.get("epoch") if best else None
        self.sign = 1.0 if maximise(monitor) else -1.0
        self.last_saved: int | None = None
        self.last_done: int | None = None

    def callback_states(self) -> dict[str, Any]:
        states = {}
        for name, cb in self.state_callbacks.items():
            states[name] = {
                k: _plain(getattr(cb, k))
                for k in ("wait", "best", "cooldown_counter")
                if hasattr(cb, k)
            }
        return states

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.t0 = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        value = logs.get(self.monitor)
        if (
            value is not None
            and math.isfinite(value)
            and (self.best_value is None or self.sign * (value - self.best_value) > 0)
        ):
            self.best_value, self.best_epoch = float(value), epoch + 1
            checkpoint.save_best(self.model, self.run_dir, epoch, self.monitor, float(value))
        self.last_done = epoch
        if (epoch + 1) % self.every == 0 or epoch + 1 >= self.last_epoch:
            self.save(epoch)

    def on_train_end(self, logs: dict | None = None) -> None:
        # early stopping ends between checkpoints: keep the final state too
        if self.last_done is not None and self.last_saved != self.last_done:
            self.save(self.last_done)

    def save(self, epoch: int) -> None:
        lr = float(keras.backend.get_value(self.model.optimizer.learning_rate))
        checkpoint.save_latest(
            self.model,
            self.run_dir,
            epoch,
            {
                "learning_rate": lr,
                "callbacks": self.callback_states(),
                "best": {"epoch": self.best_epoch, "value": self.best_value},
                "train_seconds": self.seconds_before + time.perf_counter() - self.t0,
                "sessions": self.session,
            },
            keep_every=self.keep_every,
        )
        self.last_saved = epoch


class AverageNonTrainable(keras.callbacks.Callback):
    """All ranks: average BatchNorm moving statistics across ranks after each training epoch.

    Horovod averages gradients, so trainable weights stay identical, but each rank updates its
    BatchNorm moving mean and variance from its own batches. Averaging them makes the saved
    model's statistics those of all the data, and the ranks' weights identical. It happens when
    validation begins (so every rank validates the model that is saved), or at the epoch's end
    when there is no validation.
    """

    def __init__(self, hvd_tf: Any) -> None:
        super().__init__()
        self.hvd_tf = hvd_tf
        self.averaged = False

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.averaged = False

    def on_test_begin(self, logs: dict | None = None) -> None:
        self.average()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not self.averaged:
            self.average()

    def average(self) -> None:
        self.averaged = True
        variables = self.model.non_trainable_variables
        if self.hvd_tf.size() == 1 or not variables:
            return
        for var in variables:
            var.assign(
                self.hvd_tf.allreduce(var, op=self.hvd_tf.Average, name=f"bn_avg_{var.name}")
            )


class PooledValidation(keras.callbacks.Callback):
    """All ranks: validation scores of the confusion matrix summed over the epoch and the ranks.

    The model's ``train.metrics.ConfusionMatrix`` holds, when validation ends, this rank's
    matrix of the whole validation epoch; it is summed over the ranks (allreduce) and the scores
    of the sum replace the ``val_`` entries of that metric in the epoch's logs. Place it after
    Horovod's MetricAverageCallback (whose per-rank average it overrides) and before every
    callback that reads the logs (plateau, early stopping, checkpoints, CSV, TensorBoard).
    ``confusion`` keeps the last pooled matrix.
    """

    def __init__(self, hvd_tf: Any) -> None:
        super().__init__()
        self.hvd_tf = hvd_tf
        self.scores: dict[str, float] | None = None
        self.confusion: np.ndarray | None = None

    def on_test_end(self, logs: dict | None = None) -> None:
        [metric] = [m for m in self.model.metrics if isinstance(m, ConfusionMatrix)]
        total = tf.convert_to_tensor(metric.confusion)
        if self.hvd_tf.size() > 1:
            total = self.hvd_tf.allreduce(total, op=self.hvd_tf.Sum, name="val_confusion")
        self.confusion = np.asarray(total)
        scores = confusion_scores(total, metric.class_weights)
        self.scores = {f"val_{name}": float(value) for name, value in scores.items()}

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.scores is not None and logs is not None:
            logs.update(self.scores)
        self.scores = None


class StopCondition(keras.callbacks.Callback):
    """All ranks: stop at a target metric value, past a time limit, or before a deadline.

    ``deadline`` (Unix time, e.g. a cluster job's walltime end minus its copy-back time): after
    each epoch, training stops unless one more epoch as long as the longest so far ends before
    it. An epoch is timed from the end of the previous one, so validation, checkpoint writing
    and logging count too; the first epoch counts only until a second one is timed, as it also
    holds the one-time tracing of the train and validation steps. Every rank sees the same
    averaged metrics and rank 0's clock decides (broadcast), so the ranks stop together (a rank
    that stopped alone would leave the others waiting). The checkpoint callback saves the last
    epoch when training stops.
    """

    def __init__(
        self,
        hvd_tf: Any,
        monitor: str,
        target: float | None,
        time_limit: float,
        log: Any,
        deadline: float = 0.0,
    ) -> None:
        super().__init__()
        self.hvd_tf = hvd_tf
        self.monitor = monitor
        self.target = target
        self.time_limit = time_limit
        self.deadline = deadline
        self.log = log
        self.sign = 1.0 if maximise(monitor) else -1.0
        self.reason: str | None = None
        self.epoch_seconds: list[float] = []

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.t0 = time.perf_counter()
        self.epoch_t0 = self.t0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if self.target is not None and value is not None and self.sign * (value - self.target) >= 0:
            self.reason = f"{self.monitor} {value:.4f} reached the target {self.target}"
        now = time.perf_counter()
        self.epoch_seconds.append(now - self.epoch_t0)
        self.epoch_t0 = now
        longest = max(self.epoch_seconds[1:] or self.epoch_seconds)
        elapsed, left, longest = self.hvd_tf.broadcast_object(
            (now - self.t0, self.deadline - time.time(), longest), root_rank=0
        )
        if self.time_limit > 0 and elapsed > self.time_limit:
            self.reason = f"time limit {self.time_limit:.0f}s passed ({elapsed:.0f}s)"
        if self.deadline > 0 and left < longest:
            self.reason = (
                f"the deadline is {left:.0f}s away, less than an epoch takes ({longest:.0f}s)"
            )
        if self.reason:
            self.log.info(f"stopping after epoch {epoch + 1}: {self.reason}")
            self.model.stop_training = True


class RestoreStateCallback(keras.callbacks.Callback):
    """On resume: put back plateau/early-stopping counters after their on_train_begin reset."""

    def __init__(
        self, state_callbacks: dict[str, Any], states: dict[str, Any], learning_rate: float | None
    ) -> None:
        super().__init__()
        self.state_callbacks = state_callbacks
        self.states = states
        self.learning_rate = learning_rate

    def on_train_begin(self, logs: dict | None = None) -> None:
        for name, state in self.states.items():
            cb = self.state_callbacks.get(name)
            for key, value in state.items():
                if cb is not None:
                    setattr(cb, key, value)
        if self.learning_rate is not None:
            keras.backend.set_value(self.model.optimizer.learning_rate, self.learning_rate)


class ProgressLog(keras.callbacks.Callback):
    """Rank 0: one line per epoch with the metrics, the time and the throughput."""

    def __init__(self, log: Any, samples_per_epoch: int, epochs: int) -> None:
        super().__init__()
        self.log = log
        self.samples = samples_per_epoch
        self.epochs = epochs
        self.epoch_seconds: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.t0 = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        seconds = time.perf_counter() - self.t0
        self.epoch_seconds.append(seconds)
        logs = logs or {}
        keys = (
            "loss",
            "weighted_jaccard",
            "val_loss",
            "val_weighted_jaccard",
            "val_dice_kidney",
            "val_dice_tumor",
        )
        shown = " ".join(f"{k} {logs[k]:.4f}" for k in keys if k in logs)
        lr = float(keras.backend.get_value(self.model.optimizer.learning_rate))
        self.log.info(
            f"epoch {epoch + 1}/{self.epochs}: {shown} lr {lr:.2e} "
            f"({seconds:.1f}s, {self.samples / seconds:.1f} samples/s all ranks)"
        )


class SampleRecorder(keras.callbacks.Callback):
    """All ranks: gather the ids of the samples each rank trained on; rank 0 writes them.

    The ids are those the rank's batch source actually produced for the epoch, so the record
    shows what each rank saw, not what it was meant to see. ``samples.json``: ``{epoch: {rank:
    ids}}``, and with ``--mix-data`` also ``{epoch: {"mix": {rank: ids}}}`` for the samples
    drawn from the second dataset (ids are unique within a dataset, not across two).
    """

    def __init__(self, hvd: Any, source: Any, run_dir: Path) -> None:
        super().__init__()
        self.hvd = hvd
        self.source = source
        self.run_dir = run_dir
        self.record: dict[str, Any] = {}
        path = run_dir / "samples.json"
        if hvd.rank() == 0 and path.is_file():
            self.record = json.loads(path.read_text())

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        gathered = self.hvd.allgather_object(self.source.produced_ids(epoch))
        if self.hvd.rank() == 0:
            entry: dict[str, Any] = {str(r): ids for r, (ids, _) in enumerate(gathered)}
            if any(mixed for _, mixed in gathered):
                entry["mix"] = {str(r): mixed for r, (_, mixed) in enumerate(gathered)}
            self.record[str(epoch + 1)] = entry
            write_json_atomic(self.record, self.run_dir / "samples.json")


class ProducedIds:
    """Thread-safe record of the sample ids a BatchSource produced, per epoch."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_epoch: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}

    def add(self, epoch: int, step: int, ids: np.ndarray, from_mix: np.ndarray) -> None:
        with self.lock:
            self.by_epoch.setdefault(epoch, {})[step] = (ids, from_mix)

    def pop(self, epoch: int) -> tuple[list[int], list[int]]:
        """The epoch's ids in production order: those of the dataset, those of the mixed one."""
        with self.lock:
            steps = self.by_epoch.pop(epoch, {})
        own: list[int] = []
        mixed: list[int] = []
        for step in sorted(steps):
            ids, from_mix = steps[step]
            own += [int(i) for i in ids[~from_mix]]
            mixed += [int(i) for i in ids[from_mix]]
        return own, mixed


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    return value

"""Keras callbacks of a training run: checkpoints (rank 0), resume state, progress, sample log."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import tf_keras as keras

from preprocess.dataset_format import write_json_atomic
from train import checkpoint


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
    """All ranks: average BatchNorm moving statistics across ranks at the end of each epoch.

    Horovod averages gradients, so trainable weights stay identical, but each rank updates its
    BatchNorm moving mean and variance from its own batches. Averaging them makes the saved
    model's statistics those of all the data, and the ranks' weights identical.
    """

    def __init__(self, hvd_tf: Any) -> None:
        super().__init__()
        self.hvd_tf = hvd_tf

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        variables = self.model.non_trainable_variables
        if self.hvd_tf.size() == 1 or not variables:
            return
        for var in variables:
            var.assign(
                self.hvd_tf.allreduce(var, op=self.hvd_tf.Average, name=f"bn_avg_{var.name}")
            )


class StopCondition(keras.callbacks.Callback):
    """All ranks: stop at a target metric value or past a time limit.

    Every rank sees the same averaged metrics and the wall time is broadcast from rank 0, so the
    ranks stop together (a rank that stopped alone would leave the others waiting).
    """

    def __init__(
        self, hvd_tf: Any, monitor: str, target: float | None, time_limit: float, log: Any
    ) -> None:
        super().__init__()
        self.hvd_tf = hvd_tf
        self.monitor = monitor
        self.target = target
        self.time_limit = time_limit
        self.log = log
        self.sign = 1.0 if maximise(monitor) else -1.0
        self.reason: str | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.t0 = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if self.target is not None and value is not None and self.sign * (value - self.target) >= 0:
            self.reason = f"{self.monitor} {value:.4f} reached the target {self.target}"
        elapsed = self.hvd_tf.broadcast_object(time.perf_counter() - self.t0, root_rank=0)
        if self.time_limit > 0 and elapsed > self.time_limit:
            self.reason = f"time limit {self.time_limit:.0f}s passed ({elapsed:.0f}s)"
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
    shows what each rank saw, not what it was meant to see.
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
        mine = self.source.produced_ids(epoch)
        gathered = self.hvd.allgather_object(mine)
        if self.hvd.rank() == 0:
            self.record[str(epoch + 1)] = {str(r): ids for r, ids in enumerate(gathered)}
            write_json_atomic(self.record, self.run_dir / "samples.json")


class ProducedIds:
    """Thread-safe record of the sample ids a BatchSource produced, per epoch."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_epoch: dict[int, dict[int, list[int]]] = {}

    def add(self, epoch: int, step: int, ids: np.ndarray) -> None:
        with self.lock:
            self.by_epoch.setdefault(epoch, {})[step] = [int(i) for i in ids]

    def pop(self, epoch: int) -> list[int]:
        with self.lock:
            steps = self.by_epoch.pop(epoch, {})
        return [i for step in sorted(steps) for i in steps[step]]


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    return value

"""Checkpoints that survive a job killed at its walltime: weights, optimizer state, epoch.

Layout in ``RUN_DIR/checkpoints/``:

- ``epoch_NNNN.weights.h5`` and ``epoch_NNNN.optimizer.npz``, written under temporary names and
  renamed when complete;
- ``latest.json``: the commit point, written (atomically) only after both files are in place;
  it names them and records the epoch, learning rate, callback states and the optimizer state's
  digest; older epoch files are removed after it is written;
- ``latest.weights.h5``: a copy of the latest weights under a stable name, for users;
- ``best.weights.h5`` and ``best.json``: the best epoch by the monitored metric (or, after
  ``train.select_checkpoint``, by the whole validation volumes);
- ``epochs/epoch_NNNN.weights.h5``: with ``--keep-every K``, the weights of every K-th epoch,
  kept (hard links, no extra space while the epoch is also the latest).

Only rank 0 writes and reads these; the other ranks receive the state by broadcast, so a
multi-node job whose nodes do not share the run folder resumes correctly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from preprocess.dataset_format import write_json_atomic


def _tmp(path: Path) -> Path:
    # Keras picks the weights format from the suffix: keep it on the temporary name.
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def save_weights_atomic(model: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        model.save_weights(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def optimizer_arrays(optimizer: Any) -> list[np.ndarray]:
    return [np.asarray(v.numpy()) for v in optimizer.variables]


def state_digest(arrays: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def build_optimizer(model: Any) -> None:
    """Create the optimizer's slot variables now (Keras makes them lazily at the first step)."""
    optimizer = model.optimizer
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    inner.build(model.trainable_variables)


def link_atomic(source: Path, target: Path) -> None:
    """``target`` becomes a hard link to ``source`` (a copy where links are not supported)."""
    tmp = _tmp(target)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def save_latest(
    model: Any, run_dir: Path, epoch: int, extra: dict[str, Any], keep_every: int = 0
) -> dict[str, Any]:
    """Write the checkpoint of a finished ``epoch`` (0-based) and return its record.

    With ``keep_every`` k > 0, an epoch divisible by k also keeps its weights in
    ``checkpoints/epochs/`` after later checkpoints supersede it.
    """
    ckpt = run_dir / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    stem = f"epoch_{epoch + 1:04d}"
    weights = ckpt / f"{stem}.weights.h5"
    opt_file = ckpt / f"{stem}.optimizer.npz"
    save_weights_atomic(model, weights)
    arrays = optimizer_arrays(model.optimizer)
    tmp = _tmp(opt_file)
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, *arrays)
        os.replace(tmp, opt_file)
    finally:
        tmp.unlink(missing_ok=True)
    record = {
        "epoch": epoch + 1,  # epochs completed; training resumes at this (0-based) epoch
        "weights": weights.name,
        "optimizer": opt_file.name,
        "optimizer_digest": state_digest(arrays),
        "optimizer_iterations": int(model.optimizer.iterations.numpy()),
        **extra,
    }
    write_json_atomic(record, ckpt / "latest.json")
    # the stable-name copy for users, then drop superseded epoch files
    link_atomic(weights, ckpt / "latest.weights.h5")
    if keep_every > 0 and (epoch + 1) % keep_every == 0:
        (ckpt / "epochs").mkdir(exist_ok=True)
        link_atomic(weights, ckpt / "epochs" / weights.name)
    for old in ckpt.glob("epoch_*"):
        if not old.name.startswith(stem):
            old.unlink(missing_ok=True)
    return record


def load_latest(model: Any, run_dir: Path) -> dict[str, Any] | None:
    """Restore weights and optimizer state from ``latest.json``; None when there is none."""
    ckpt = run_dir / "checkpoints"
    path = ckpt / "latest.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    model.load_weights(str(ckpt / record["weights"]))
    build_optimizer(model)
    with np.load(ckpt / record["optimizer"]) as npz:
        arrays = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    variables = model.optimizer.variables
    if len(arrays) != len(variables):
        raise ValueError(
            f"{ckpt / record['optimizer']}: {len(arrays)} optimizer arrays, the "
            f"optimizer has {len(variables)} variables"
        )
    for var, value in zip(variables, arrays, strict=True):
        var.assign(value)
    if state_digest(optimizer_arrays(model.optimizer)) != record["optimizer_digest"]:
        raise ValueError(f"{ckpt}: optimizer state differs from its recorded digest")
    return record


def save_best(model: Any, run_dir: Path, epoch: int, monitor: str, value: float) -> None:
    ckpt = run_dir / "checkpoints"
    save_weights_atomic(model, ckpt / "best.weights.h5")
    write_json_atomic({"epoch": epoch + 1, "monitor": monitor, "value": value}, ckpt / "best.json")

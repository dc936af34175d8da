"""Run-time set-up shared by the training entry point: Horovod, devices, seeds, logging, run folder.

Follows NVIDIA's TensorFlow examples: one GPU per local rank (memory growth on), mixed precision
through the Keras policy, XLA through ``jit_compile``; rank 0 alone logs and writes files.
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import numpy as np

from preprocess import __version__
from preprocess.dataset_format import write_json_atomic


class RunError(RuntimeError):
    """A problem that stops the run before training starts (exit status 2)."""


class RankLog:
    """Progress from rank 0 only; warnings and errors from any rank, prefixed with it."""

    def __init__(self, rank: int, size: int, verbose: int = 1) -> None:
        self.rank = rank
        self.size = size
        self.verbose = verbose
        self.t0 = time.perf_counter()

    def info(self, msg: str) -> None:
        if self.rank == 0 and self.verbose:
            print(f"[train {time.perf_counter() - self.t0:8.1f}s] {msg}", flush=True)

    def error(self, msg: str) -> None:
        prefix = f"[rank {self.rank}/{self.size}] " if self.size > 1 else ""
        print(f"error: {prefix}{msg}", file=sys.stderr, flush=True)


# OpenMPI's MCA parameter, read from the environment by MPI_Init
YIELD_WHEN_IDLE = "OMPI_MCA_mpi_yield_when_idle"


def init_horovod() -> Any:
    """hvd.init() and pin this rank to one GPU (its local rank), as NVIDIA's examples do.

    Without a GPU, OpenMPI is told to yield the core while it waits (unless the environment
    already says otherwise); see :func:`cpu_mpi_environment`.
    """
    import tensorflow as tf

    from train.hvd_compat import hvd

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        cpu_mpi_environment(os.environ)
    hvd.init()
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
    return hvd


def cpu_mpi_environment(environ: MutableMapping[str, str]) -> None:
    """Ask OpenMPI to yield the core while it waits, when ranks train on CPU.

    Why: OpenMPI busy-polls while a call waits, and Horovod's background thread waits in MPI
    for its peers every cycle, milliseconds apart. When every core runs a TensorFlow compute
    thread, as with one rank of one thread per core, that polling takes the core from a
    compute thread and each rank needs far more CPU time per sample than a lone rank (figures
    in bench/README.md). OpenMPI yields by itself only when it sees more ranks than slots.
    GPU ranks keep the default: their cores are mostly free and polling is what keeps latency
    low. Must run before MPI_Init (hvd.init); a value already in the environment is
    kept.
    """
    environ.setdefault(YIELD_WHEN_IDLE, "1")


def configure_tensorflow(threads: int, amp: bool, xla: bool) -> dict[str, Any]:
    """Threads, mixed precision and XLA; returns what was applied (for config.json)."""
    import tensorflow as tf
    import tf_keras as keras

    if threads > 0:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, threads))
    if amp:
        # float16 compute, float32 variables; Keras wraps the optimizer in a LossScaleOptimizer
        keras.mixed_precision.set_global_policy("mixed_float16")
    if xla:
        # Auto-clustering, as NVIDIA's TF2 examples do: XLA compiles what it can and leaves the
        # rest to TensorFlow (jit_compile=True would fail on ops without an XLA kernel, such as
        # the nearest-neighbour upsampling gradient on CPU).
        tf.config.optimizer.set_jit(True)
    return {
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "threads": threads,
        "amp": amp,
        "xla": xla,
    }


def set_seeds(seed: int) -> None:
    import tensorflow as tf

    random.seed(seed)
    np.random.seed(seed % 2**32)
    tf.random.set_seed(seed)


def versions() -> dict[str, str]:
    import horovod
    import tensorflow as tf
    import tf_keras

    return {
        "suite": __version__,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "tf_keras": tf_keras.__version__,
        "horovod": horovod.__version__,
        "numpy": np.__version__,
    }


def write_run_config(run_dir: Path, config: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config, run_dir / "config.json")


def check_resume_compatible(run_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """A resumed run must train the same model on the same data; returns the run's config."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise RunError(f"--resume: {path} not found (nothing to resume)")
    old = json.loads(path.read_text())
    for key in ("model", "input_shape", "model_options"):
        if old.get(key) != config.get(key):
            raise RunError(
                f"--resume: {run_dir} was trained with {key}={old.get(key)!r}, "
                f"this run asks for {config.get(key)!r}"
            )
    if old["dataset"]["manifest_sha256"] != config["dataset"]["manifest_sha256"]:
        raise RunError(
            f"--resume: {run_dir} was trained on a different dataset (manifest checksum differs)"
        )
    return old


def record_resumed_session(
    old: dict[str, Any], config: dict[str, Any], resumed_at_epoch: int
) -> dict[str, Any]:
    """``config`` for a resumed session, keeping the training options of the sessions before.

    A resumed session may change training options (loss, tumor factor, patience, ...), not the
    model or the data (:func:`check_resume_compatible`). config.json then describes the latest
    session, and ``earlier_sessions`` lists each earlier one's options with the number of
    epochs done when it ended, so the run's whole recipe stays on record. ``old`` is the run's
    config.json as :func:`check_resume_compatible` read it (read once: the file is rewritten
    right after).
    """
    earlier = [
        *old.get("earlier_sessions", []),
        {"epochs_done": resumed_at_epoch, "train": old["train"]},
    ]
    return {**config, "earlier_sessions": earlier}


def _changed_options(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The options of ``before`` that ``after`` changed, or "the same options"."""
    # what does not change what is learned (when and how much is saved, logged or run)
    ignore = {"resume", "time_limit", "deadline", "require_gpu", "stop_at", "out", "data"}
    ignore |= {"verbose"}
    ignore |= {"checkpoint_every", "keep_every", "record_samples", "check_sha256"}
    keys = sorted(k for k in before.keys() | after.keys() if k not in ignore)
    changed = [f"{k} {before.get(k)!r}" for k in keys if before.get(k) != after.get(k)]
    return f"{', '.join(changed)} (then changed)" if changed else "the same options"


def basic_info(config: dict[str, Any], summary: dict[str, Any]) -> str:
    """The readable summary the thesis shipped beside its weights."""
    t = config["train"]
    ds = config["dataset"]
    augmentation = (
        "flip, rotate +-5 deg, zoom +-5 %, shift +-10 px per sample" if t["augment"] else "none"
    )
    if t.get("intensity_augment", "none") != "none":
        augmentation += f"; intensity: {t['intensity_augment']} {t.get('intensity_p') or ''}"
    mix = config.get("mix_dataset")
    mixed = (
        [
            f"mixed in:         {mix['dir']} ({mix['kind']}), {t['mix_fraction']} of every "
            f"training epoch, manifest sha256 {mix['manifest_sha256']}"
        ]
        if mix
        else []
    )
    lines = [
        f"model:            {config['model']}  ({config['n_params']:,} parameters, input "
        f"{config['input_shape']})",
        f"model options:    {config['model_options']}",
        f"dataset:          {ds['dir']} ({ds['kind']}, {ds['image_size']}x{ds['image_size']}"
        + (
            f", blocks of {ds['block_depth']} overlap {ds['block_overlap']}"
            if ds["block_depth"]
            else ""
        )
        + ")",
        f"                  manifest sha256 {ds['manifest_sha256']}",
        f"                  {summary.get('n_train', '?')} training samples, "
        f"{summary.get('n_val', '?')} validation samples",
        *mixed,
        f"normalisation:    HU [{ds['normalization']['hu_min']}, {ds['normalization']['hu_max']}]"
        f" -> [0, 1], {ds['channels']} channels",
        f"ranks:            {config['n_ranks']}  (batch {t['batch_size']} per rank, global "
        f"{t['batch_size'] * config['n_ranks']})",
        f"optimizer:        Adam, lr {t['lr']} x {config['lr_multiplier']} ranks = "
        f"{config['effective_lr']}, warm-up {t['warmup_epochs']} epochs, ReduceLROnPlateau "
        f"(patience {t['plateau_patience']}, factor {t['plateau_factor']})",
        f"loss:             {t['loss']} {t['loss_params'] or ''}".rstrip(),
        f"class weights:    {[round(w, 4) for w in config['class_weights']]} (balanced x "
        f"factors {t['class_factors']})",
        f"tumor factor:     {t['tumor_factor']}",
        f"augmentation:     {augmentation.rstrip()}",
        f"epochs:           {summary.get('epochs_done', 0)} of {t['epochs']}"
        + (
            f" (stopped early at {summary['stopped_epoch']})"
            if summary.get("stopped_epoch")
            else ""
        ),
        f"best:             {summary.get('best_monitor') or t['monitor']} = "
        f"{summary.get('best_value')} at epoch {summary.get('best_epoch')}"
        + (f" ({summary['best_selected_by']})" if summary.get("best_selected_by") else ""),
        f"training time:    {summary.get('train_seconds', 0):.0f} s"
        + (
            f" over {summary['sessions']} sessions (resumed)"
            if summary.get("sessions", 1) > 1
            else ""
        ),
        f"versions:         {config['versions']}",
        f"seed:             {t['seed']} (+ rank)",
    ]
    sessions = config.get("earlier_sessions", [])
    for i, session in enumerate(sessions):
        later = sessions[i + 1]["train"] if i + 1 < len(sessions) else t
        lines.append(
            f"earlier session: until epoch {session['epochs_done']}, with "
            f"{_changed_options(session['train'], later)}"
        )
    if summary.get("note"):
        lines.append(f"note:             {summary['note']}")
    return "\n".join(lines) + "\n"


def environ_summary() -> dict[str, str]:
    keys = (
        "OMPI_COMM_WORLD_SIZE",
        "SLURM_JOB_ID",
        "PBS_JOBID",
        "CUDA_VISIBLE_DEVICES",
        "HOROVOD_GLOO_RENDEZVOUS_ADDR",
    )
    return {k: os.environ[k] for k in keys if k in os.environ}

"""Distributed training entry point: ``python -m train.train --model NAME --data DIR --out RUN``.

Run it under ``horovodrun -np N``, ``mpirun -np N`` or ``srun``; see ``--help``. The steps:
set up Horovod and the devices, load this rank's shards, agree across ranks on the steps per
epoch, build and compile the model with a Horovod DistributedOptimizer, restore the latest
checkpoint on ``--resume``, train, and leave the run folder described in ARCHITECTURE.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


def _stop_on_any_error(log: Any, error: str | None) -> bool:
    """Collective: True on every rank when any rank failed (each logs its own error).

    Every rank learns every rank's start-up error, so none is left waiting for a peer.
    """
    from train.hvd_compat import hvd_tf

    if error:
        log.error(error)
    return any(hvd_tf.allgather_object(error))


def set_bn_momentum(model: Any, momentum: float) -> int:
    """Set the moving-statistics momentum of every BatchNormalization layer; returns how many.

    A training choice rather than architecture (it changes no weight), so it is applied here,
    before compile, instead of being an option of every model builder.
    """
    import tf_keras as keras  # TensorFlow is imported only once training starts, as in run()

    changed = 0
    # submodules, not layers: a backbone nested as a Model of its own is reached too
    for layer in model.submodules:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum
            changed += 1
    return changed


def run(cfg: Any) -> int:
    """Train according to ``cfg`` (a train.config.TrainConfig); returns the exit status."""
    from train import checkpoint
    from train.hvd_compat import hvd, hvd_tf
    from train.runtime import RankLog, RunError, init_horovod

    init_horovod()
    rank, size = hvd.rank(), hvd.size()
    log = RankLog(rank, size, cfg.verbose)
    run_dir = Path(cfg.out)

    error, started = None, None
    try:
        started = start_up(cfg, rank, size, run_dir)
    except (RunError, ValueError, OSError) as exc:  # DataError, DatasetError: ValueErrors
        error = str(exc)
    if _stop_on_any_error(log, error):
        return 2
    assert started is not None
    feed, device_info = started
    if not ranks_agree_on_steps(feed, cfg.data, log):
        return 2

    config = run_config(cfg, feed, size, device_info)
    model = build_and_compile(cfg, config, rank)
    resumed, error = None, None
    if rank == 0:
        try:
            resumed, config = restore_or_start(cfg, model, run_dir, config)
        except (RunError, ValueError, OSError) as exc:
            error = str(exc)
    if _stop_on_any_error(log, error):
        return 2
    resumed = share_start_state(model, resumed, run_dir, log)
    initial_epoch = resumed["epoch"] if resumed else 0
    if initial_epoch >= cfg.epochs:
        log.info(f"{run_dir} has already trained {initial_epoch} of {cfg.epochs} epochs")
        return 0
    log.info(
        f"{cfg.model} ({config['n_params']:,} params, input {config['input_shape']}) on "
        f"{size} rank(s); {len(feed.train.shards)} train / {len(feed.val.shards)} val "
        f"samples per rank; {feed.train.steps_per_epoch} steps x batch {cfg.batch_size} "
        f"per rank; lr {config['effective_lr']:.2e}; loss {cfg.loss}; class weights "
        f"{[round(w, 3) for w in config['class_weights']]}; amp={cfg.amp} xla={cfg.xla}"
    )
    session = TrainingSession(cfg, feed, run_dir, resumed, rank, size, log)
    callbacks = session.callbacks(config["effective_lr"])
    history, seconds = fit(cfg, model, feed, config, initial_epoch, callbacks)
    # every rank's final weights, compared by digest: Horovod keeps them identical
    digests = hvd_tf.allgather_object(checkpoint.state_digest(model.get_weights()))
    if rank == 0:
        epochs_done = initial_epoch + len(history.history.get("loss", []))
        session.write_summary(config, epochs_done, seconds, digests)
    return 0


def start_up(cfg: Any, rank: int, size: int, run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Checks on every rank, then this rank's data feed; raises on bad input (exit status 2)."""
    import models
    from train.augment import augment_config
    from train.data import build_feed
    from train.devices import require_gpu
    from train.runtime import RunError, configure_tensorflow

    if cfg.model not in models.MODEL_NAMES:
        raise RunError(f"unknown model {cfg.model!r}; choose from {models.MODEL_NAMES}")
    cfg.resolve(models.is_3d(cfg.model))
    device_info = configure_tensorflow(cfg.threads, cfg.amp, cfg.xla)
    if cfg.require_gpu:
        require_gpu()
    if cfg.resume and not (run_dir / "checkpoints" / "latest.json").is_file():
        raise RunError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    if not cfg.resume and rank == 0 and (run_dir / "checkpoints" / "latest.json").is_file():
        raise RunError(
            f"{run_dir} already holds a run with checkpoints; pass --resume to "
            f"continue it or choose another --out"
        )
    feed = build_feed(
        cfg.data,
        rank,
        size,
        cfg.batch_size,
        cfg.tumor_factor,
        augment_config(cfg.augment, cfg.intensity_augment, cfg.intensity_p),
        cfg.seed,
        cfg.workers,
        cfg.check_sha256,
        mix_dir=cfg.mix_data,
        mix_fraction=cfg.mix_fraction,
    )
    feed.train.limit_steps(cfg.max_steps)
    kind = feed.manifest["kind"]
    if models.is_3d(cfg.model) != (kind == "blocks"):
        wanted = "3D block" if models.is_3d(cfg.model) else "2D slice"
        raise RunError(f"model {cfg.model} needs a {wanted} dataset; {cfg.data} holds {kind}")
    return feed, device_info


def ranks_agree_on_steps(feed: Any, data: str, log: Any) -> bool:
    """Collective: every rank runs the same training steps (unequal ones would hang the
    allreduce). Validation steps may differ: a rank validates its real samples, no collective."""
    from train.hvd_compat import hvd_tf

    steps = hvd_tf.allgather_object((feed.train.steps_per_epoch, len(feed.train.shards)))
    if len(set(steps)) == 1:
        return True
    table = ", ".join(f"rank {r}: {t} train steps ({n} samples)" for r, (t, n) in enumerate(steps))
    log.error(
        f"ranks disagree on steps per epoch ({table}); the shards of {data} do not hold equal "
        f"sample counts (re-run preprocessing, or check with python -m preprocess.verify)"
    )
    return False


def dataset_record(data_dir: str, manifest: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """config.json's description of a dataset (``dataset``, ``mix_dataset``).

    The folder is stored relative to the run folder, so a run folder that is copied or shipped
    names no path of the machine it was made on and still finds its dataset beside it.
    """
    from preprocess.dataset_format import manifest_sha256

    return {
        "dir": os.path.relpath(Path(data_dir).resolve(), Path(run_dir).resolve()),
        "manifest_sha256": manifest_sha256(data_dir),
        "kind": manifest["kind"],
        "image_size": manifest["image_size"],
        "block_depth": manifest.get("block_depth"),
        "block_overlap": manifest.get("block_overlap"),
        "channels": int(manifest["channels"]),
        "normalization": manifest["normalization"],
        "mask_method": manifest.get("mask_method"),
        "target_spacing": manifest.get("target_spacing"),
        "splits": {s: manifest["splits"][s]["cases"] for s in manifest["splits"]},
    }


def run_config(cfg: Any, feed: Any, size: int, device_info: dict[str, Any]) -> dict[str, Any]:
    """The run's config.json (ARCHITECTURE.md), without the parameter count."""
    from preprocess.dataset_format import class_weights
    from train.metrics import CLASS_NAMES
    from train.runtime import environ_summary, versions

    manifest = feed.manifest
    lr_multiplier = size if cfg.scale_lr else 1
    config = {
        "model": cfg.model,
        "model_options": {"l2": cfg.l2, **cfg.model_options},
        "input_shape": [*feed.sample_shape, int(manifest["channels"])],
        "n_classes": len(CLASS_NAMES),
        "class_names": list(CLASS_NAMES),
        "class_weights": class_weights(manifest, cfg.class_factors),
        "dataset": dataset_record(cfg.data, manifest, cfg.out),
        "train": cfg.to_dict(),
        "n_ranks": size,
        "lr_multiplier": lr_multiplier,
        "effective_lr": cfg.lr * lr_multiplier,
        "steps_per_epoch": feed.train.steps_per_epoch,
        "validation_steps": feed.val.steps_per_epoch,
        "devices": device_info,
        "environment": environ_summary(),
        "versions": versions(),
    }
    if cfg.mix_data is not None:
        config["mix_dataset"] = dataset_record(cfg.mix_data, feed.mix_manifest, cfg.out)
    return config


def build_and_compile(cfg: Any, config: dict[str, Any], rank: int) -> Any:
    """The model, compiled with Horovod's optimizer; same initial weights on every rank."""
    import tf_keras as keras

    import models
    from train import checkpoint
    from train.hvd_compat import hvd
    from train.losses import get_loss
    from train.metrics import get_metrics
    from train.runtime import set_seeds

    set_seeds(cfg.seed)
    model = models.build(
        cfg.model, tuple(config["input_shape"]), config["n_classes"], **config["model_options"]
    )
    if cfg.bn_momentum is not None:
        set_bn_momentum(model, cfg.bn_momentum)
    config["n_params"] = int(model.count_params())
    set_seeds(cfg.seed + rank)  # per-rank seeds for everything after the initial weights
    weights = config["class_weights"]
    optimizer = hvd.DistributedOptimizer(keras.optimizers.Adam(config["effective_lr"]))
    model.compile(
        optimizer=optimizer,
        loss=get_loss(cfg.loss, class_weights=weights, **cfg.loss_params),
        metrics=get_metrics(weights),
    )
    checkpoint.build_optimizer(model)
    return model


def restore_or_start(
    cfg: Any, model: Any, run_dir: Path, config: dict[str, Any]
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Rank 0: load the latest checkpoint on --resume; write config.json. Raises RunError."""
    from train import checkpoint
    from train.runtime import check_resume_compatible, record_resumed_session, write_run_config

    resumed = None
    if cfg.resume:
        old_config = check_resume_compatible(run_dir, config)
        resumed = checkpoint.load_latest(model, run_dir)
        config = record_resumed_session(old_config, config, resumed["epoch"])
    elif cfg.init_weights:
        config["init_weights_sha256"] = load_init_weights(model, Path(cfg.init_weights))
    write_run_config(run_dir, config)
    return resumed, config


def load_init_weights(model: Any, path: Path) -> str:
    """Rank 0: load the weights to fine-tune from; their SHA-256 (recorded in config.json).

    Raises RunError when the file is missing or does not fit the model (another model or
    other model options): Keras's own message names the layer that differs.
    """
    from preprocess.kits import sha256_file
    from train.runtime import RunError

    if not path.is_file():
        raise RunError(f"--init-weights {path}: file not found")
    try:
        model.load_weights(str(path))
    except (ValueError, OSError) as exc:
        raise RunError(f"--init-weights {path}: does not fit this model ({exc})") from None
    return sha256_file(path)


def share_start_state(
    model: Any, resumed: dict[str, Any] | None, run_dir: Path, log: Any
) -> dict[str, Any] | None:
    """Collective: every rank gets rank 0's weights, optimizer state and resume record."""
    from train.hvd_compat import hvd_tf

    resumed = hvd_tf.broadcast_object(resumed, root_rank=0)
    hvd_tf.broadcast_variables(model.variables, root_rank=0)
    hvd_tf.broadcast_variables(model.optimizer.variables, root_rank=0)
    if resumed:
        log.info(
            f"resuming {run_dir} at epoch {resumed['epoch'] + 1} (optimizer iterations "
            f"{resumed['optimizer_iterations']}, optimizer state digest "
            f"{resumed['optimizer_digest'][:16]})"
        )
    return resumed


class TrainingSession:
    """The callbacks of one training session, and rank 0's summary of it at the end."""

    def __init__(
        self,
        cfg: Any,
        feed: Any,
        run_dir: Path,
        resumed: dict[str, Any] | None,
        rank: int,
        size: int,
        log: Any,
    ) -> None:
        self.cfg, self.feed, self.run_dir, self.resumed = cfg, feed, run_dir, resumed
        self.rank, self.size, self.log = rank, size, log
        self.checkpoints: Any = None
        self.seconds_before, self.sessions_before = 0.0, 0
        if rank == 0 and resumed:
            # from the checkpoint (it counts sessions killed after it); older checkpoints lack
            # these, and then summary.json has what the sessions that ended cleanly recorded
            summary_path = run_dir / "summary.json"
            before = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
            self.seconds_before = resumed.get("train_seconds", before.get("train_seconds", 0.0))
            self.sessions_before = resumed.get("sessions", before.get("sessions", 1))

    def callbacks(self, effective_lr: float) -> list[Any]:
        """In order: Horovod's, then pooled validation, so that every later callback (plateau,
        early stopping, stop condition, checkpoints, logs) reads the same global numbers."""
        import tf_keras as keras

        from train import callbacks as cbs
        from train.hvd_compat import hvd, hvd_tf

        cfg = self.cfg
        callbacks: list[Any] = [
            hvd.callbacks.BroadcastGlobalVariablesCallback(0),
            hvd.callbacks.MetricAverageCallback(),
            cbs.PooledValidation(hvd_tf),
        ]
        if cfg.warmup_epochs > 0:
            callbacks.append(
                hvd.callbacks.LearningRateWarmupCallback(
                    initial_lr=effective_lr,
                    warmup_epochs=cfg.warmup_epochs,
                    momentum_correction=False,
                    steps_per_epoch=self.feed.train.steps_per_epoch,
                    verbose=0,
                )
            )
        callbacks.append(cbs.AverageNonTrainable(hvd_tf))
        mode = "max" if cbs.maximise(cfg.monitor) else "min"
        plateau = keras.callbacks.ReduceLROnPlateau(
            monitor=cfg.monitor,
            mode=mode,
            factor=cfg.plateau_factor,
            patience=cfg.plateau_patience,
            min_lr=cfg.min_lr,
        )
        callbacks.append(plateau)
        state_cbs: dict[str, Any] = {"plateau": plateau}
        if cfg.early_stop_patience > 0:
            stopper = keras.callbacks.EarlyStopping(
                monitor=cfg.monitor, mode=mode, patience=cfg.early_stop_patience
            )
            callbacks.append(stopper)
            state_cbs["early_stopping"] = stopper
        if cfg.stop_at is not None or cfg.time_limit > 0 or cfg.deadline > 0:
            callbacks.append(
                cbs.StopCondition(
                    hvd_tf,
                    cfg.monitor,
                    cfg.stop_at,
                    cfg.time_limit,
                    self.log,
                    deadline=cfg.deadline,
                )
            )
        if self.resumed:
            callbacks.append(
                cbs.RestoreStateCallback(
                    state_cbs, self.resumed.get("callbacks", {}), self.resumed.get("learning_rate")
                )
            )
        if cfg.record_samples:
            self.feed.train.recorder = cbs.ProducedIds()
            callbacks.append(cbs.SampleRecorder(hvd_tf, self.feed.train, self.run_dir))
        if self.rank == 0:
            callbacks += self.rank0_callbacks(state_cbs)
        return callbacks

    def rank0_callbacks(self, state_cbs: dict[str, Any]) -> list[Any]:
        """Checkpoints, history.csv, TensorBoard and the progress log."""
        import tf_keras as keras

        from train import callbacks as cbs

        cfg, run_dir = self.cfg, self.run_dir
        self.checkpoints = cbs.CheckpointCallback(
            run_dir,
            cfg.monitor,
            cfg.checkpoint_every,
            cfg.epochs,
            state_cbs,
            self.resumed.get("best") if self.resumed else None,
            seconds_before=self.seconds_before,
            session=self.sessions_before + 1,
            keep_every=cfg.keep_every,
        )
        samples_per_epoch = self.feed.train.steps_per_epoch * cfg.batch_size * self.size
        return [
            self.checkpoints,
            keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=bool(self.resumed)),
            keras.callbacks.TensorBoard(
                log_dir=str(run_dir / "logs"),
                update_freq="epoch",
                profile_batch=0,
                write_graph=False,
            ),
            cbs.ProgressLog(self.log, samples_per_epoch, cfg.epochs),
        ]

    def write_summary(
        self, config: dict[str, Any], epochs_done: int, seconds: float, digests: list[str]
    ) -> None:
        """Rank 0: summary.json and basic_info.txt, and the closing log line."""
        from preprocess.dataset_format import write_json_atomic
        from preprocess.kits import atomic_path
        from train.runtime import basic_info

        cfg, ckpt, manifest = self.cfg, self.checkpoints, self.feed.manifest
        summary = {
            "n_train": manifest["splits"]["train"]["n_samples"],
            "n_val": manifest["splits"]["val"]["n_samples"],
            "epochs_done": epochs_done,
            "stopped_epoch": epochs_done if epochs_done < cfg.epochs else None,
            "best_value": ckpt.best_value,
            "best_epoch": ckpt.best_epoch,
            "train_seconds": self.seconds_before + seconds,
            "sessions": self.sessions_before + 1,
            "note": os.environ.get("KITS_RUN_NOTE", ""),
            "weights_digest_per_rank": digests,
        }
        write_json_atomic(summary, self.run_dir / "summary.json")
        info_path = self.run_dir / "basic_info.txt"
        tmp = atomic_path(info_path)
        tmp.write_text(basic_info(config, summary))
        os.replace(tmp, info_path)
        best = (
            f"{cfg.monitor} {ckpt.best_value:.4f} at epoch {ckpt.best_epoch}"
            if ckpt.best_value is not None
            else "no validation metric"
        )
        self.log.info(
            f"done: {epochs_done} epochs in {seconds:.0f}s; best {best}; run folder {self.run_dir}"
        )


def fit(
    cfg: Any,
    model: Any,
    feed: Any,
    config: dict[str, Any],
    initial_epoch: int,
    callbacks: list[Any],
) -> tuple[Any, float]:
    """model.fit over the rank's batch sources; returns the history and the seconds it took."""
    from train.data import make_dataset

    channels, n_classes = config["input_shape"][-1], config["n_classes"]
    t0 = time.perf_counter()
    history = model.fit(
        make_dataset(feed.train, initial_epoch, channels, n_classes),
        steps_per_epoch=feed.train.steps_per_epoch,
        epochs=cfg.epochs,
        initial_epoch=initial_epoch,
        validation_data=make_dataset(feed.val, 0, channels, n_classes),
        validation_steps=feed.val.steps_per_epoch,
        callbacks=callbacks,
        verbose=0,
    )
    return history, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    from train.config import parse_args

    cfg = parse_args(argv)
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())

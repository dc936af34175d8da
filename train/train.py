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
    import tf_keras as keras

    import models
    from preprocess.dataset_format import DatasetError, class_weights, manifest_sha256
    from train import callbacks as cbs
    from train import checkpoint
    from train.augment import AugmentConfig
    from train.data import DataError, build_feed, make_dataset
    from train.hvd_compat import hvd, hvd_tf
    from train.losses import get_loss, get_metrics
    from train.runtime import (
        RankLog,
        RunError,
        basic_info,
        check_resume_compatible,
        configure_tensorflow,
        environ_summary,
        init_horovod,
        record_resumed_session,
        set_seeds,
        versions,
        write_run_config,
    )

    init_horovod()
    rank, size = hvd.rank(), hvd.size()
    log = RankLog(rank, size, cfg.verbose)
    run_dir = Path(cfg.out)

    # --- start-up checks, on every rank; any failure stops all ranks with exit status 2 -----
    error = None
    feed = None
    try:
        if cfg.model not in models.MODEL_NAMES:
            raise RunError(f"unknown model {cfg.model!r}; choose from {models.MODEL_NAMES}")
        cfg.resolve(models.is_3d(cfg.model))
        device_info = configure_tensorflow(cfg.threads, cfg.amp, cfg.xla)
        if cfg.resume and not (run_dir / "checkpoints" / "latest.json").is_file():
            raise RunError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
        if not cfg.resume and rank == 0 and (run_dir / "checkpoints" / "latest.json").is_file():
            raise RunError(
                f"{run_dir} already holds a run with checkpoints; pass --resume to "
                f"continue it or choose another --out"
            )
        augment = AugmentConfig() if cfg.augment else None
        feed = build_feed(
            cfg.data,
            rank,
            size,
            cfg.batch_size,
            cfg.tumor_factor,
            augment,
            cfg.seed,
            cfg.workers,
            cfg.check_sha256,
        )
        feed.train.limit_steps(cfg.max_steps)
        kind = feed.manifest["kind"]
        if models.is_3d(cfg.model) != (kind == "blocks"):
            wanted = "3D block" if models.is_3d(cfg.model) else "2D slice"
            raise RunError(f"model {cfg.model} needs a {wanted} dataset; {cfg.data} holds {kind}")
    except (DataError, DatasetError, RunError, ValueError, OSError) as exc:
        error = str(exc)
    if _stop_on_any_error(log, error):
        return 2
    assert feed is not None

    # --- ranks agree on the steps per epoch (unequal shards would hang the allreduce) ------
    steps = hvd_tf.allgather_object(
        (feed.train.steps_per_epoch, feed.val.steps_per_epoch, len(feed.train.shards))
    )
    if len(set(steps)) > 1:
        table = ", ".join(
            f"rank {r}: {t} train / {v} val steps ({n} samples)"
            for r, (t, v, n) in enumerate(steps)
        )
        log.error(
            f"ranks disagree on steps per epoch ({table}); the shards of {cfg.data} do "
            f"not hold equal sample counts (re-run preprocessing, or check with "
            f"python -m preprocess.verify)"
        )
        return 2

    manifest = feed.manifest
    weights = class_weights(manifest, cfg.class_factors)
    channels = int(manifest["channels"])
    input_shape = (*feed.sample_shape, channels)
    model_options = {"l2": cfg.l2, **cfg.model_options}
    lr_multiplier = size if cfg.scale_lr else 1
    effective_lr = cfg.lr * lr_multiplier
    config = {
        "model": cfg.model,
        "model_options": model_options,
        "input_shape": list(input_shape),
        "n_classes": 3,
        "class_names": ["background", "kidney", "tumor"],
        "class_weights": weights,
        "dataset": {
            "dir": str(Path(cfg.data).resolve()),
            "manifest_sha256": manifest_sha256(cfg.data),
            "kind": manifest["kind"],
            "image_size": manifest["image_size"],
            "block_depth": manifest.get("block_depth"),
            "block_overlap": manifest.get("block_overlap"),
            "channels": channels,
            "normalization": manifest["normalization"],
            "mask_method": manifest.get("mask_method"),
            "splits": {s: manifest["splits"][s]["cases"] for s in manifest["splits"]},
        },
        "train": cfg.to_dict(),
        "n_ranks": size,
        "lr_multiplier": lr_multiplier,
        "effective_lr": effective_lr,
        "steps_per_epoch": feed.train.steps_per_epoch,
        "validation_steps": feed.val.steps_per_epoch,
        "devices": device_info,
        "environment": environ_summary(),
        "versions": versions(),
    }

    # --- model: same initial weights on every rank (seed), then per-rank seeds for the rest --
    set_seeds(cfg.seed)
    model = models.build(cfg.model, input_shape, 3, **model_options)
    if cfg.amp:  # softmax and loss in float32, as mixed-precision training needs
        outputs = keras.layers.Activation("linear", dtype="float32", name="float32_output")(
            model.output
        )
        model = keras.Model(model.input, outputs, name=model.name)
    if cfg.bn_momentum is not None:
        set_bn_momentum(model, cfg.bn_momentum)
    config["n_params"] = int(model.count_params())
    set_seeds(cfg.seed + rank)
    optimizer = hvd.DistributedOptimizer(keras.optimizers.Adam(learning_rate=effective_lr))
    model.compile(
        optimizer=optimizer,
        loss=get_loss(cfg.loss, class_weights=weights, **cfg.loss_params),
        metrics=get_metrics(weights),
    )
    checkpoint.build_optimizer(model)

    # --- resume (rank 0 reads, everyone receives by broadcast) -------------------------------
    resumed: dict[str, Any] | None = None
    error = None
    if rank == 0:
        try:
            if cfg.resume:
                old_config = check_resume_compatible(run_dir, config)
                resumed = checkpoint.load_latest(model, run_dir)
                config = record_resumed_session(old_config, config, resumed["epoch"])
            write_run_config(run_dir, config)
        except (RunError, ValueError, OSError) as exc:
            error = str(exc)
    if _stop_on_any_error(log, error):
        return 2
    resumed = hvd_tf.broadcast_object(resumed, root_rank=0)
    hvd_tf.broadcast_variables(model.variables, root_rank=0)
    hvd_tf.broadcast_variables(model.optimizer.variables, root_rank=0)
    initial_epoch = resumed["epoch"] if resumed else 0
    if resumed:
        log.info(
            f"resuming {run_dir} at epoch {initial_epoch + 1} (optimizer iterations "
            f"{resumed['optimizer_iterations']}, optimizer state digest "
            f"{resumed['optimizer_digest'][:16]})"
        )
    if initial_epoch >= cfg.epochs:
        log.info(f"{run_dir} has already trained {initial_epoch} of {cfg.epochs} epochs")
        return 0

    log.info(
        f"{cfg.model} ({config['n_params']:,} params, input {list(input_shape)}) on "
        f"{size} rank(s); {len(feed.train.shards)} train / {len(feed.val.shards)} val "
        f"samples per rank; {feed.train.steps_per_epoch} steps x batch {cfg.batch_size} "
        f"per rank; lr {effective_lr:.2e}; loss {cfg.loss}; class weights "
        f"{[round(w, 3) for w in weights]}; amp={cfg.amp} xla={cfg.xla}"
    )

    # --- callbacks: averaging first, so every later callback sees the same numbers --------
    monitor_mode = "max" if cbs.maximise(cfg.monitor) else "min"
    plateau = keras.callbacks.ReduceLROnPlateau(
        monitor=cfg.monitor,
        mode=monitor_mode,
        factor=cfg.plateau_factor,
        patience=cfg.plateau_patience,
        min_lr=cfg.min_lr,
    )
    state_cbs: dict[str, Any] = {"plateau": plateau}
    callbacks: list[Any] = [
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),
        hvd.callbacks.MetricAverageCallback(),
    ]
    if cfg.warmup_epochs > 0:
        callbacks.append(
            hvd.callbacks.LearningRateWarmupCallback(
                initial_lr=effective_lr,
                warmup_epochs=cfg.warmup_epochs,
                momentum_correction=False,
                steps_per_epoch=feed.train.steps_per_epoch,
                verbose=0,
            )
        )
    callbacks.append(cbs.AverageNonTrainable(hvd_tf))
    callbacks.append(plateau)
    if cfg.early_stop_patience > 0:
        stopper = keras.callbacks.EarlyStopping(
            monitor=cfg.monitor, mode=monitor_mode, patience=cfg.early_stop_patience
        )
        callbacks.append(stopper)
        state_cbs["early_stopping"] = stopper
    if cfg.stop_at is not None or cfg.time_limit > 0:
        callbacks.append(cbs.StopCondition(hvd_tf, cfg.monitor, cfg.stop_at, cfg.time_limit, log))
    if resumed:
        callbacks.append(
            cbs.RestoreStateCallback(
                state_cbs, resumed.get("callbacks", {}), resumed.get("learning_rate")
            )
        )
    if cfg.record_samples:
        feed.train.recorder = cbs.ProducedIds()
        callbacks.append(cbs.SampleRecorder(hvd_tf, feed.train, run_dir))
    progress = None
    seconds_before, sessions_before = 0.0, 0
    if rank == 0 and resumed:
        # from the checkpoint (it counts sessions killed after it); older checkpoints lack
        # these, and then summary.json has what the sessions that ended cleanly recorded
        summary_path = run_dir / "summary.json"
        before = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        seconds_before = resumed.get("train_seconds", before.get("train_seconds", 0.0))
        sessions_before = resumed.get("sessions", before.get("sessions", 1))
    if rank == 0:
        ckpt_cb = cbs.CheckpointCallback(
            run_dir,
            cfg.monitor,
            cfg.checkpoint_every,
            cfg.epochs,
            state_cbs,
            resumed.get("best") if resumed else None,
            seconds_before=seconds_before,
            session=sessions_before + 1,
            keep_every=cfg.keep_every,
        )
        progress = cbs.ProgressLog(
            log, feed.train.steps_per_epoch * cfg.batch_size * size, cfg.epochs
        )
        callbacks += [
            ckpt_cb,
            keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=bool(resumed)),
            keras.callbacks.TensorBoard(
                log_dir=str(run_dir / "logs"),
                update_freq="epoch",
                profile_batch=0,
                write_graph=False,
            ),
            progress,
        ]

    train_ds = make_dataset(feed.train, initial_epoch, channels, 3)
    val_ds = make_dataset(feed.val, 0, channels, 3)
    t0 = time.perf_counter()
    history = model.fit(
        train_ds,
        steps_per_epoch=feed.train.steps_per_epoch,
        epochs=cfg.epochs,
        initial_epoch=initial_epoch,
        validation_data=val_ds,
        validation_steps=feed.val.steps_per_epoch,
        callbacks=callbacks,
        verbose=0,
    )
    seconds = time.perf_counter() - t0
    # every rank's final weights, compared by digest: Horovod keeps them identical
    digests = hvd_tf.allgather_object(checkpoint.state_digest(model.get_weights()))

    if rank == 0:
        epochs_done = initial_epoch + len(history.history.get("loss", []))
        summary = {
            "n_train": manifest["splits"]["train"]["n_samples"],
            "n_val": manifest["splits"]["val"]["n_samples"],
            "epochs_done": epochs_done,
            "stopped_epoch": epochs_done if epochs_done < cfg.epochs else None,
            "best_value": ckpt_cb.best_value,
            "best_epoch": ckpt_cb.best_epoch,
            "train_seconds": seconds_before + seconds,
            "sessions": sessions_before + 1,
            "note": os.environ.get("KITS_RUN_NOTE", ""),
            "weights_digest_per_rank": digests,
        }
        from preprocess.dataset_format import write_json_atomic

        write_json_atomic(summary, run_dir / "summary.json")
        info = basic_info(config, summary)
        tmp = run_dir / ".basic_info.txt.tmp"
        tmp.write_text(info)
        os.replace(tmp, run_dir / "basic_info.txt")
        best = (
            f"{cfg.monitor} {ckpt_cb.best_value:.4f} at epoch {ckpt_cb.best_epoch}"
            if ckpt_cb.best_value is not None
            else "no validation metric"
        )
        log.info(f"done: {epochs_done} epochs in {seconds:.0f}s; best {best}; run folder {run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from train.config import parse_args

    cfg = parse_args(argv)
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())

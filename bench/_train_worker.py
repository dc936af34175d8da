"""Worker of ``bench.train``: training steps per second with real Horovod, on every rank.

    mpirun -np N --bind-to core python -m bench._train_worker --spec JSON

For each model of the spec: build it as ``train.train`` does (same seeds, Adam wrapped in
Horovod's DistributedOptimizer, the weighted Dice loss and the same metrics, variables
broadcast from rank 0), run ``warmup`` steps on a fixed in-memory batch (graph tracing and
first allocations), then time ``steps`` calls of ``train_on_batch``; each call ends with the
metrics back on the host, so the time covers the whole step including the gradient allreduce.
Ranks start the timed steps together. Rank 0 prints one result line with every rank's times.

The same worker runs for 1 and 2 ranks, so the two differ only in the number of ranks.
With ``"independent": true`` every rank trains its own copy (plain Adam, no allreduce): the
limit of running two ranks side by side (shared caches, memory bandwidth, the host's cores),
which no gradient exchange can beat. Horovod is still started, as in a real run, so its
background thread and MPI's waiting are in this figure too (they were what held both figures
down until train.runtime made MPI yield the core on CPU).
The spec (JSON): {"models": [{"name", "input_shape", "options", "batch_size"}], "steps",
"warmup", "threads", "seed", "lr", "independent"}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402

from bench.common import emit_result  # noqa: E402

# Class weights of the order the real dataset gives (background, kidney, tumor); they only
# scale the loss, so their exact values do not change the cost of a step.
CLASS_WEIGHTS = [0.35, 12.0, 180.0]


def one_model(spec: dict[str, Any], entry: dict[str, Any], hvd: Any, hvd_tf: Any) -> dict:
    """Time one model on this rank; returns every rank's numbers (on every rank)."""
    import tf_keras as keras

    import models
    from train.losses import get_loss
    from train.metrics import get_metrics
    from train.runtime import set_seeds

    rank = hvd.rank()
    shape = tuple(entry["input_shape"])
    batch = int(entry["batch_size"])
    set_seeds(spec["seed"])  # same initial weights on every rank, as train.train
    model = models.build(entry["name"], shape, 3, **entry["options"])
    set_seeds(spec["seed"] + rank)
    optimizer = keras.optimizers.Adam(learning_rate=spec["lr"])
    if not spec.get("independent"):
        optimizer = hvd.DistributedOptimizer(optimizer)
    model.compile(
        optimizer=optimizer,
        loss=get_loss("weighted_dice", class_weights=CLASS_WEIGHTS),
        metrics=get_metrics(CLASS_WEIGHTS),
    )
    if not spec.get("independent"):
        hvd_tf.broadcast_variables(model.variables, root_rank=0)
    rng = np.random.default_rng([spec["seed"], rank])
    x = rng.random((batch, *shape), dtype=np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, size=(batch, *shape[:-1]))]

    warmup = []
    for _ in range(spec["warmup"]):
        t0 = time.perf_counter()
        model.train_on_batch(x, y)
        warmup.append(time.perf_counter() - t0)
    hvd_tf.allgather_object(None)  # a barrier: the timed steps start together
    steps = []
    cpu_start = time.process_time()
    t_start = time.perf_counter()
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        model.train_on_batch(x, y)
        steps.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - t_start
    # CPU seconds of all the process's threads: with 1 compute thread, cpu / elapsed well
    # below 1 means the rank waited (for a core taken by other work, or for its peer)
    cpu = time.process_time() - cpu_start
    mine = {
        "elapsed": elapsed,
        "cpu_seconds": cpu,
        "cpu_utilisation": cpu / elapsed,
        "steps": steps,
        "warmup": warmup,
        "affinity": sorted(os.sched_getaffinity(0)),
        # peak resident memory of the process so far (Linux reports KiB): two ranks need twice
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    per_rank = hvd_tf.allgather_object(mine)
    n_params = int(model.count_params())
    del model, optimizer
    keras.backend.clear_session()  # free the graph and weights before the next model
    gc.collect()
    slowest = max(r["elapsed"] for r in per_rank)
    size = hvd.size()
    return {
        "name": entry["name"],
        "input_shape": list(shape),
        "options": entry["options"],
        "batch_size_per_rank": batch,
        "n_params": n_params,
        "ranks": size,
        "steps": spec["steps"],
        "warmup_steps": spec["warmup"],
        # global throughput: every rank's samples over the slowest rank's time
        "samples_per_s": size * batch * spec["steps"] / slowest,
        "elapsed_seconds": slowest,
        "per_rank": per_rank,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench._train_worker", description=__doc__)
    p.add_argument("--spec", required=True, help="JSON, see the module docstring")
    spec = json.loads(p.parse_args(argv).spec)

    from train.hvd_compat import hvd, hvd_tf
    from train.runtime import configure_tensorflow, init_horovod

    init_horovod()
    devices = configure_tensorflow(int(spec["threads"]), False, False)
    results = [one_model(spec, entry, hvd, hvd_tf) for entry in spec["models"]]
    if hvd.rank() == 0:
        import tensorflow as tf

        emit_result(
            {
                "ranks": hvd.size(),
                "devices": devices,
                "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
                "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
                "models": results,
            }
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: training throughput, scaling over ranks, and the input pipeline.

(a) scaling: training samples per second of each model (--models) with 1 rank and with 2 ranks,
    one TensorFlow thread per rank, real Horovod (``bench/_train_worker.py`` under
    ``mpirun -np N``; the same worker for both, so they differ only in the number of ranks).
    Steady state: warm-up steps first, then the timed steps on a fixed in-memory batch, so the
    input pipeline and validation are not in the numbers. Scaling efficiency =
    sps(2 ranks) / (2 x sps(1 rank)). Batch per rank: 64 for 2D models (train.train's), 1 for
    Unet3D (train.train uses 4, but on CPU a full-size rank peaks at ~8 GB with batch 1 and
    ~11 GB with 2; two ranks are only started if the 1-rank peak says they fit in memory).
    Each model runs in its own processes; 2 independent ranks (Horovod started, no allreduce)
    give the ceiling for two side by side without the gradient exchange (--no-ceiling skips
    them).
    CPU seconds per sample and per-rank CPU utilisation are recorded beside the wall times:
    they tell "the ranks waited" (busy machine, allreduce) from "each step got dearer".
(b) input pipeline alone: ``train.data.BatchSource`` over a real shard of 128x128 slices (made
    by preprocess.synthetic + the downsample pipeline), with augmentation, batch 64, 2 workers:
    raw uint8 batches, and through ``make_dataset`` (tf.data, float32 x, one-hot y).
(c) the thesis's way, side by side: tf_keras ImageDataGenerator with the same augmentations on
    in-memory float arrays (image 128x128x3, one-hot mask 128x128x3, one generator each with a
    shared seed), one thread.
(d) epoch time against compute time: one epoch (1 rank, in-process, TensorFlow's default
    threads) fed by the real pipeline (make_dataset) against the same number of steps fed a
    batch already in memory; both through ``model.fit`` with 2 epochs, the second one timed.

Targets: scaling efficiency >= 0.9 per model; pipeline >= 1000 samples/s (raw and tf.data);
epoch time / compute time <= 1.1.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file, bench/ would shadow the train package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Keras 2, before TensorFlow is imported

from bench import common, machine  # noqa: E402
from bench.train_input import (  # noqa: E402
    IDG_REFERENCE_SPS,
    QUICK_OPTIONS,
    run_epoch,
    run_keras_idg,
    run_pipeline,
)

NAME = "train"
PARTS = ("scaling", "pipeline", "keras_idg", "epoch")
DEFAULT_MODELS = ("unet2d", "unet3d")


def build_parser() -> argparse.ArgumentParser:
    p = common.base_parser(NAME, __doc__)
    p.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (default: all)",
    )
    p.add_argument(
        "--models",
        default=None,
        help="models for (a), comma-separated (default unet2d,unet3d; --quick unet2d, as "
        "starting and tracing the models is most of a quick run's time)",
    )
    p.add_argument(
        "--batch-size",
        type=_batch_sizes,
        default={},
        metavar="B|MODEL=B,...",
        help="(a) batch per rank, for every model or per model, e.g. unet3d=2 (default 64 for "
        "2D models, as train.train; 1 for 3D models instead of train.train's 4: a full-size "
        "Unet3D rank peaks at ~8 GB with batch 1 and ~11 GB with 2 on CPU, and two ranks must "
        "fit in memory; --quick 8 and 2)",
    )
    p.add_argument(
        "--model-options",
        type=_key_values,
        default={},
        metavar="K=V,...",
        help="(a) extra options for models.build, for every model, e.g. base_filters=16",
    )
    p.add_argument("--steps", type=int, default=None, help="(a) timed steps (default 3; --quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="(a) untimed steps first (default 1)")
    p.add_argument(
        "--threads", type=int, default=1, help="(a) TensorFlow threads per rank (default 1)"
    )
    p.add_argument(
        "--bind",
        choices=("none", "core"),
        default="none",
        help="(a) mpirun --bind-to (default none: with one thread per rank both settings "
        "measured the same here, and each mpirun binding its rank 0 to core 0 puts it on a "
        "busy core whenever other work runs there)",
    )
    p.add_argument(
        "--compare-bind",
        action="store_true",
        help="(a) also measure with the other --bind-to setting (recorded, no target)",
    )
    p.add_argument(
        "--ceiling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="(a) also run 2 independent ranks (no allreduce): the machine's own limit for "
        "two side by side, to tell hardware from communication (default on; --quick off)",
    )
    p.add_argument(
        "--pipeline-batches",
        type=int,
        default=None,
        help="(b) timed batches (default 100; --quick 10)",
    )
    p.add_argument(
        "--idg-batches", type=int, default=None, help="(c) timed batches (default 20; --quick 3)"
    )
    p.add_argument(
        "--epoch-steps",
        type=int,
        default=None,
        help="(d) steps per epoch (default 4; --quick 2); unet2d, batch 64 (--quick 8)",
    )
    return p


def _key_values(text: str) -> dict[str, Any]:
    """'base_filters=16,width=0.5' -> {'base_filters': 16, 'width': 0.5}."""
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def _batch_sizes(text: str) -> dict[str, int]:
    """'16' -> {'*': 16}; 'unet2d=64,unet3d=2' -> per model."""
    if "=" not in text:
        return {"*": int(text)}
    return {k: int(v) for k, v in _key_values(text).items()}


# --------------------------------------------------------------------------------------------
# (a) scaling over ranks
# --------------------------------------------------------------------------------------------


def model_entry(
    name: str, quick: bool, batch_sizes: dict[str, int], extra_options: dict[str, Any]
) -> dict[str, Any]:
    """Input shape, options and batch of a model as benchmarked (full size unless quick)."""
    import models

    is_3d = models.is_3d(name)
    shape = list(models.default_input_shape(name))
    options: dict[str, Any] = {"l2": 1e-4}  # train.train's default
    if quick:
        stride = models.required_stride(name)
        side = max(32, stride)
        shape = [8, side, side, 3] if is_3d else [side, side, 3]
        options.update(QUICK_OPTIONS if name in ("unet2d", "unet3d") else {"width": 0.125})
    options.update(extra_options)
    default_batch = (2 if quick else 1) if is_3d else (8 if quick else 64)
    return {
        "name": name,
        "input_shape": shape,
        "options": options,
        "batch_size": batch_sizes.get(name, batch_sizes.get("*", default_batch)),
    }


def _cpu_per_sample(result: dict[str, Any]) -> float:
    """CPU seconds (all ranks, all threads) per trained sample in the timed steps."""
    samples = result["ranks"] * result["batch_size_per_rank"] * result["steps"]
    return sum(r["cpu_seconds"] for r in result["per_rank"]) / samples


def _launch(spec: dict[str, Any], n: int, bind: str, independent: bool) -> dict[str, Any]:
    """One worker run under mpirun: {"threads": ..., "models": {name: result}}."""
    worker_spec = json.dumps({**spec, "independent": independent})
    cmd = common.mpirun_cmd(n, bind, "bench._train_worker", "--spec", worker_spec)
    seconds, proc = common.run_timed(cmd)
    raw = common.parse_result(proc.stdout)
    label = "2 independent ranks" if independent else f"{n} rank(s)"
    for m in raw["models"]:
        print(
            f"  (a) {m['name']:<8} {label}, --bind-to {bind}: "
            f"{m['samples_per_s']:8.2f} samples/s ({seconds:.0f} s with start-up)",
            flush=True,
        )
    threads = {"intra_op": raw["intra_op_threads"], "inter_op": raw["inter_op_threads"]}
    return {"threads": threads, "models": {m["name"]: m for m in raw["models"]}}


def _check_memory(one_rank: dict[str, Any], n_ranks: int) -> None:
    """Refuse to start ``n_ranks`` ranks that would not fit in memory (BenchError).

    The 1-rank run measured the peak resident memory of a rank; running out of memory would
    not only lose this benchmark but might get other processes on the machine killed.
    """
    peak = max(m["per_rank"][0]["peak_rss_gib"] for m in one_rank["models"].values())
    need = n_ranks * peak * 1.1  # 10 % for the parent, MPI and the page cache's minimum
    available = machine.memory_info()["available_gib"]
    if available is not None and available < need:
        raise common.BenchError(
            f"{n_ranks} ranks need about {need:.1f} GiB ({peak:.1f} GiB peak per rank with 1 "
            f"rank) but only {available:.1f} GiB are available; not started (lower "
            f"--batch-size)"
        )


def _model_summary(one: dict, two: dict, independent: dict | None) -> dict[str, Any]:
    """Samples/s, efficiency and the evidence behind it for one model."""
    sps1, sps2 = one["samples_per_s"], two["samples_per_s"]
    out = {
        "input_shape": one["input_shape"],
        "options": one["options"],
        "n_params": one["n_params"],
        "batch_size_per_rank": one["batch_size_per_rank"],
        "samples_per_s_1rank": sps1,
        "samples_per_s_2ranks": sps2,
        "efficiency": sps2 / (2 * sps1),
        "step_seconds_1rank": common.summarize(one["per_rank"][0]["steps"]),
        "step_seconds_2ranks": common.summarize(
            [max(s) for s in zip(*(r["steps"] for r in two["per_rank"]), strict=True)]
        ),
        "warmup_seconds_1rank": one["per_rank"][0]["warmup"],
        "peak_rss_gib_per_rank": max(r["peak_rss_gib"] for r in two["per_rank"]),
        # CPU seconds per sample: equal for 1 and 2 ranks when the work per sample is
        # unchanged; utilisation well below 1 means the ranks waited
        "cpu_seconds_per_sample_1rank": _cpu_per_sample(one),
        "cpu_seconds_per_sample_2ranks": _cpu_per_sample(two),
        "cpu_utilisation_1rank": [r["cpu_utilisation"] for r in one["per_rank"]],
        "cpu_utilisation_2ranks": [r["cpu_utilisation"] for r in two["per_rank"]],
        "affinity_1rank": [r["affinity"] for r in one["per_rank"]],
        "affinity_2ranks": [r["affinity"] for r in two["per_rank"]],
    }
    if independent is not None:
        sps_ind = independent["samples_per_s"]
        out["samples_per_s_2independent"] = sps_ind
        # the best two ranks can do on this machine, with no communication at all
        out["ceiling_efficiency"] = sps_ind / (2 * sps1)
        # what the allreduce and the synchronisation leave of that ceiling
        out["efficiency_vs_ceiling"] = sps2 / sps_ind
    return out


def run_scaling(args: argparse.Namespace, run: common.BenchRun) -> dict[str, Any]:
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    entries = [model_entry(n, args.quick, args.batch_size, args.model_options) for n in names]
    spec = {
        "steps": args.steps or (2 if args.quick else 3),
        "warmup": 1 if args.warmup is None else args.warmup,
        "threads": args.threads,
        "seed": 42,
        "lr": 4e-4,
    }
    ceiling = (not args.quick) if args.ceiling is None else args.ceiling
    binds = [args.bind] + (
        [{"core": "none", "none": "core"}[args.bind]] if args.compare_bind else []
    )
    # Full runs start each model in its own processes, so one that fails (say, out of memory)
    # leaves the others' numbers; quick runs share them, the start-up is most of their time.
    groups = [entries] if args.quick else [[e] for e in entries]
    runs = [(1, False), (2, False)] + ([(2, True)] if ceiling else [])
    by_bind: dict[str, Any] = {}
    for bind in binds:
        models_out: dict[str, Any] = {}
        threads = {"intra_op": args.threads, "inter_op": args.threads}
        for group in groups:
            group_names = [e["name"] for e in group]
            try:
                raw = {}
                for n, ind in runs:
                    if n > 1:
                        _check_memory(raw[(1, False)], n)
                    raw[(n, ind)] = _launch({**spec, "models": group}, n, bind, ind)
            except common.BenchError as exc:
                first = str(exc).splitlines()[0]
                run.note(f"(a) {', '.join(group_names)} with --bind-to {bind} failed: {first}")
                for name in group_names:
                    models_out[name] = {"error": str(exc)[-3000:]}
                continue
            threads = raw[(1, False)]["threads"]
            for name in group_names:
                models_out[name] = _model_summary(
                    raw[(1, False)]["models"][name],
                    raw[(2, False)]["models"][name],
                    raw[(2, True)]["models"][name] if ceiling else None,
                )
        by_bind[bind] = {"bind_to": bind, "threads_per_rank": threads, "models": models_out}
    result = dict(by_bind[args.bind])
    result.update(
        {
            "steps": spec["steps"],
            "warmup_steps": spec["warmup"],
            "method": "bench/_train_worker.py under mpirun -np 1 and -np 2: train_on_batch on a "
            "fixed in-memory batch with Horovod's DistributedOptimizer; samples/s = ranks x "
            "batch x steps / slowest rank's time",
        }
    )
    if args.compare_bind:
        other = binds[1]
        result["other_bind"] = by_bind[other]
        run.note(f"(a) also measured with --bind-to {other}: see scaling.other_bind")
    return result


# --------------------------------------------------------------------------------------------
# (b), (c), (d): in this process
# --------------------------------------------------------------------------------------------


def record_scaling(
    args: argparse.Namespace,
    run: common.BenchRun,
    measurements: dict[str, Any],
    targets: list[common.Target],
    info: list[common.Info],
) -> None:
    """Part (a): training throughput with 1 and 2 ranks, its targets and figures."""
    print("(a) training throughput, 1 and 2 ranks ...", flush=True)
    measurements["scaling"] = run_scaling(args, run)
    for name in measurements["scaling"]["models"]:
        targets.append(
            common.Target(
                f"scaling_efficiency_{name}",
                f"scaling.models.{name}.efficiency",
                ">=",
                0.9,
                "",
                f"{name}: samples/s with 2 ranks / (2 x with 1 rank), 1 thread per rank",
            )
        )
        if "ceiling_efficiency" in measurements["scaling"]["models"][name]:
            info.append(
                common.Info(
                    f"{name}_ceiling_efficiency",
                    f"scaling.models.{name}.ceiling_efficiency",
                    "",
                    "2 independent ranks (no allreduce) / (2 x 1 rank): the machine's limit",
                )
            )
        for n in ("1rank", "2ranks"):
            info.append(
                common.Info(
                    f"{name}_samples_per_s_{n}",
                    f"scaling.models.{name}.samples_per_s_{n}",
                    "samples/s",
                )
            )


def record_local_parts(
    args: argparse.Namespace,
    parts: list[str],
    measurements: dict[str, Any],
    targets: list[common.Target],
    info: list[common.Info],
) -> None:
    """Parts (b)-(d) on one generated slice dataset: input pipeline, the thesis's
    ImageDataGenerator, epoch time against compute time."""
    local = [p for p in parts if p != "scaling"]
    if local:
        with common.work_folder(args.cache) as cache:
            n_cases, n_slices = (8, 48) if args.quick else (16, 64)
            dataset = common.make_slice_dataset(
                cache, n_cases=n_cases, n_slices=n_slices, size=128, image_size=128
            )
            if "pipeline" in parts:
                print("(b) input pipeline ...", flush=True)
                measurements["pipeline"] = run_pipeline(
                    dataset, args.pipeline_batches or (10 if args.quick else 100)
                )
                for key, label in (("raw_uint8", "BatchSource"), ("tf_data", "make_dataset")):
                    targets.append(
                        common.Target(
                            f"pipeline_{key}",
                            f"pipeline.{key}.samples_per_s",
                            ">=",
                            1000.0,
                            "samples/s",
                            f"{label}: 128x128 slices with augmentation, batch 64, 2 workers",
                        )
                    )
            if "keras_idg" in parts:
                print("(c) the thesis's ImageDataGenerator ...", flush=True)
                measurements["keras_idg"] = run_keras_idg(
                    dataset, args.idg_batches or (3 if args.quick else 20)
                )
                info.append(
                    common.Info(
                        "keras_idg_samples_per_s",
                        "keras_idg.samples_per_s",
                        "samples/s",
                        f"the thesis's ImageDataGenerator, one thread (about "
                        f"{IDG_REFERENCE_SPS:.0f} expected)",
                    )
                )
                if "pipeline" in measurements:
                    measurements["pipeline"]["speedup_over_keras_idg"] = (
                        measurements["pipeline"]["tf_data"]["samples_per_s"]
                        / measurements["keras_idg"]["samples_per_s"]
                    )
                    info.append(
                        common.Info(
                            "pipeline_speedup_over_keras_idg",
                            "pipeline.speedup_over_keras_idg",
                            "x",
                            "make_dataset samples/s / ImageDataGenerator samples/s",
                        )
                    )
            if "epoch" in parts:
                print("(d) epoch time vs compute time ...", flush=True)
                measurements["epoch"] = run_epoch(
                    dataset,
                    args.epoch_steps or (2 if args.quick else 4),
                    8 if args.quick else 64,
                    args.quick,
                )
                targets.append(
                    common.Target(
                        "epoch_vs_compute",
                        "epoch.ratio",
                        "<=",
                        1.1,
                        "x",
                        "epoch fed by make_dataset / same steps fed an in-memory batch (unet2d)",
                    )
                )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        build_parser().error(f"--parts: unknown {unknown}; choose from {PARTS}")
    if args.models is None:
        args.models = "unet2d" if args.quick else ",".join(DEFAULT_MODELS)
    from models import MODEL_NAMES  # cheap: TensorFlow is imported when a model is built

    unknown = sorted({m.strip() for m in args.models.split(",") if m.strip()} - set(MODEL_NAMES))
    if unknown:
        build_parser().error(f"--models: unknown {unknown}; choose from {list(MODEL_NAMES)}")
    run = common.BenchRun(NAME, args)
    measurements: dict[str, Any] = {}
    targets: list[common.Target] = []
    info: list[common.Info] = []

    if "scaling" in parts:
        record_scaling(args, run, measurements, targets, info)
    record_local_parts(args, parts, measurements, targets, info)
    parameters = {
        "parts": parts,
        "models": args.models,
        "batch_size": args.batch_size or "default",
        "model_options": args.model_options,
        "threads_per_rank": args.threads,
        "bind": args.bind,
        "compare_bind": args.compare_bind,
        "ceiling": args.ceiling if args.ceiling is not None else not args.quick,
    }
    run.finish(parameters, measurements, targets, info)
    return 0


if __name__ == "__main__":
    common.run_main(main)

"""Benchmark: loading and preprocessing KiTS19 cases, one rank against two.

On synthetic cases of real KiTS19 geometry (CTs rendered by ``preprocess.synthetic`` around real
label maps: real slice counts, spacings and 512x512 slices; generation is not timed), measures

(a) the bare load: every case's imaging.nii.gz and segmentation.nii.gz read with nibabel into
    numpy, nothing else (``bench/_load_worker.py``), with 1 and 2 ranks sharing the cases as the
    pipeline does (each rank takes the next unclaimed case, largest first);
(b) ``python -m preprocess.downsample`` (2D slices) end to end, with 1 and 2 ranks;
(c) ``python -m preprocess.blocks`` (3D blocks) end to end, with 1 and 2 ranks (--no-blocks
    skips it).

Every command is started the same way (``mpirun -np N --bind-to BIND python -m ...``) and timed
as a whole, start-up included, so the ratios compare like with like; the bare load's in-process
time is recorded beside it. The page cache is warm for every measurement: all files are loaded
once before the first one. Each measurement is repeated (--repeats) and the fastest run counts
(the one least disturbed by other work); all runs are in the JSON. The peak resident memory of
every rank is measured in one more, untimed, run of each command (``bench._load_worker
--peak-of``).

Targets: preprocessing (2D, 1 rank) at most 1.3x the bare load per case; 2 ranks at least 1.6x
faster than 1.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file, bench/ would shadow the preprocess package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench import common  # noqa: E402
from preprocess.kits import parse_case_list  # noqa: E402

NAME = "preprocess"
# The first 16 real cases: 64 to 611 slices, 1 to 5 mm. Enough work that the fixed start-up of
# mpirun and Python (~0.6 s per command) does not hide the ranks' scaling, as it did with six
# cases; about a minute per repeat on two cores.
DEFAULT_CASES = list(range(16))
RANKS = (1, 2)
TARGETS = [
    common.Target(
        "downsample_1rank_vs_bare_load",
        "downsample.ratio_to_bare_load_1rank",
        "<=",
        1.3,
        "x",
        "preprocess.downsample (1 rank) seconds per case / bare nibabel load seconds per case",
    ),
    common.Target(
        "downsample_speedup_2ranks",
        "downsample.speedup_2ranks",
        ">=",
        1.6,
        "x",
        "preprocess.downsample wall time with 1 rank / with 2 ranks",
    ),
]


def build_parser() -> argparse.ArgumentParser:
    p = common.base_parser(NAME, __doc__)
    p.add_argument(
        "--labels",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"KiTS19 label maps (default {common.SHARED_LABELS} if present, else the small "
        f"committed ones in {common.SMALL_LABELS.relative_to(common.ROOT)}; --quick: the "
        "small ones)",
    )
    p.add_argument(
        "--cases",
        type=parse_case_list,
        default=None,
        metavar="LIST",
        help="case ids, e.g. 2,4,6 (default with the shared maps: "
        f"{','.join(map(str, DEFAULT_CASES))}; else all)",
    )
    p.add_argument(
        "--max-slices",
        type=int,
        default=None,
        help="crop cases to at most N slices (default: keep the real slice counts)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs of every measurement, the fastest counts (default 5: a 2-rank run takes "
        "7 s, and on a VM one run in three is disturbed; --quick 1)",
    )
    p.add_argument(
        "--bind",
        choices=("none", "core"),
        default="none",
        help="mpirun --bind-to for every command (default none: one rank may use both cores, "
        "as a plain run does)",
    )
    p.add_argument(
        "--no-blocks", dest="blocks", action="store_false", help="skip preprocess.blocks"
    )
    return p


def _commands(variant: str, kits: Path, cases: list[int], out: Path) -> tuple[str, list[str]]:
    case_list = ",".join(map(str, cases))
    if variant == "bare_load":
        args = ["--kits", str(kits), "--cases", case_list, "--claims", str(out / "claims")]
        return "bench._load_worker", args
    module = {"downsample": "preprocess.downsample", "blocks": "preprocess.blocks"}[variant]
    return module, ["--kits", str(kits), "--out", str(out), "--cases", case_list, "--quiet"]


def measure_peak_memory(
    kits: Path, cases: list[int], variants: list[str], bind: str, scratch: Path
) -> dict[str, Any]:
    """Peak resident memory (MiB) of every rank, per variant and rank count, from one run each."""
    peaks: dict[str, Any] = {}
    for variant in variants:
        for n in RANKS:
            out = scratch / f"peak-{variant}-{n}"
            module, args = _commands(variant, kits, cases, out)
            if variant != "bare_load":
                module, args = "bench._load_worker", ["--peak-of", module, "--", *args]
            _, proc = common.run_timed(common.mpirun_cmd(n, bind, module, *args))
            per_rank = common.parse_result(proc.stdout)["peak_rss_mib_per_rank"]
            peaks.setdefault(variant, {})[f"rank{n}"] = {
                "peak_rss_mib_per_rank": [round(v, 1) for v in per_rank],
                "peak_rss_mib": round(max(per_rank), 1),
            }
            shutil.rmtree(out, ignore_errors=True)
            print(f"  peak memory {variant:<10} {n} rank(s): {max(per_rank):.0f} MiB", flush=True)
    return peaks


def measure(
    kits: Path, cases: list[int], variants: list[str], repeats: int, bind: str, scratch: Path
) -> dict[str, Any]:
    """Wall seconds of every (variant, ranks), ``repeats`` times, interleaved so that a burst of
    other work on the machine spreads over the variants instead of hitting one."""
    walls: dict[tuple[str, int], list[float]] = {(v, n): [] for v in variants for n in RANKS}
    inner: dict[int, list[float]] = {n: [] for n in RANKS}
    load_info: dict[int, Any] = {}
    for r in range(repeats):
        for variant in variants:
            for n in RANKS:
                out = scratch / f"{variant}-{n}-{r}"
                module, args = _commands(variant, kits, cases, out)
                seconds, proc = common.run_timed(common.mpirun_cmd(n, bind, module, *args))
                walls[(variant, n)].append(seconds)
                if variant == "bare_load":
                    info = common.parse_result(proc.stdout)
                    inner[n].append(info["seconds"])
                    load_info[n] = info
                shutil.rmtree(out, ignore_errors=True)
                print(
                    f"  [{r + 1}/{repeats}] {variant:<10} {n} rank(s): {seconds:7.2f} s",
                    flush=True,
                )
    n_cases = len(cases)
    result: dict[str, Any] = {}
    for variant in variants:
        part: dict[str, Any] = {}
        for n in RANKS:
            stats = common.summarize(walls[(variant, n)])
            part[f"rank{n}"] = {
                "seconds": stats["min"],
                "seconds_per_case": stats["min"] / n_cases,
                "runs": stats,
            }
            if variant == "bare_load":
                in_process = common.summarize(inner[n])["min"]
                part[f"rank{n}"]["in_process_seconds"] = in_process
                # mpirun, interpreter and imports: paid once per command, whatever the cases
                part[f"rank{n}"]["startup_seconds"] = stats["min"] - in_process
                part[f"rank{n}"]["cases_per_rank"] = load_info[n]["cases_per_rank"]
                part[f"rank{n}"]["seconds_per_rank"] = load_info[n]["seconds_per_rank"]
        part["speedup_2ranks"] = part["rank1"]["seconds"] / part["rank2"]["seconds"]
        result[variant] = part
    base = result["bare_load"]
    for variant in variants:
        if variant != "bare_load":
            for n in RANKS:
                result[variant][f"ratio_to_bare_load_{n}rank"] = (
                    result[variant][f"rank{n}"]["seconds"] / base[f"rank{n}"]["seconds"]
                )
    return result


def _headline_info(blocks: bool) -> list[common.Info]:
    """The numbers without a target shown beside the targets."""
    info = [
        common.Info("bare_load_per_case_1rank", "bare_load.rank1.seconds_per_case", "s"),
        common.Info("downsample_per_case_1rank", "downsample.rank1.seconds_per_case", "s"),
        common.Info("downsample_per_case_2ranks", "downsample.rank2.seconds_per_case", "s"),
        common.Info("bare_load_speedup_2ranks", "bare_load.speedup_2ranks", "x"),
        common.Info("bare_load_peak_mib_1rank", "bare_load.rank1.peak_rss_mib", "MiB"),
        common.Info("downsample_peak_mib_per_rank_1rank", "downsample.rank1.peak_rss_mib", "MiB"),
        common.Info("downsample_peak_mib_per_rank_2ranks", "downsample.rank2.peak_rss_mib", "MiB"),
        common.Info(
            "ideal_speedup_2ranks",
            "ideal_speedup_2ranks_by_file_size",
            "x",
            "total bytes / the busiest rank's bytes, as the bare load shared the cases",
        ),
    ]
    if blocks:
        info += [
            common.Info("blocks_1rank_vs_bare_load", "blocks.ratio_to_bare_load_1rank", "x"),
            common.Info("blocks_speedup_2ranks", "blocks.speedup_2ranks", "x"),
        ]
    return info


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = common.BenchRun(NAME, args)
    repeats = args.repeats or (1 if args.quick else 5)
    labels = args.labels or (common.SMALL_LABELS if args.quick else common.default_labels_dir())
    cases = args.cases
    if cases is None and labels == common.SHARED_LABELS:
        cases = DEFAULT_CASES
    if labels == common.SMALL_LABELS:
        run.note("small committed label maps (128x128, <= 40 slices): not the real KiTS19 geometry")
    variants = ["bare_load", "downsample"] + (["blocks"] if args.blocks else [])

    with common.work_folder(args.cache) as cache, tempfile.TemporaryDirectory() as tmp:
        print(f"generating synthetic cases from {labels} in {cache} (not timed) ...", flush=True)
        kits, ids, gen_seconds = common.make_kits(
            cache, labels_dir=labels, cases=cases, max_slices=args.max_slices
        )
        table = common.case_table(kits, ids)
        print(
            f"{len(ids)} cases, {sum(r['shape'][0] for r in table)} slices, "
            f"{sum(r['imaging_bytes'] for r in table) / 2**20:.0f} MB of imaging.nii.gz",
            flush=True,
        )
        # Warm the page cache (and the disk's) once, so every measurement sees the same state.
        from bench._load_worker import load_case_arrays

        with common.Stopwatch() as warm:
            for c in ids:
                load_case_arrays(kits, c)
        print(f"page cache warmed: {warm.seconds:.1f} s for one load of every case", flush=True)
        results = measure(kits, ids, variants, repeats, args.bind, Path(tmp))
        peaks = measure_peak_memory(kits, ids, variants, args.bind, Path(tmp))
        for variant, per_n in peaks.items():
            for n_key, peak in per_n.items():
                results[variant][n_key] |= peak

    total_bytes = sum(r["imaging_bytes"] for r in table)
    max_rank_bytes = max(
        sum(r["imaging_bytes"] for r in table if r["id"] in part)
        for part in results["bare_load"]["rank2"]["cases_per_rank"]
    )
    measurements = {
        "cases": table,
        "n_cases": len(ids),
        "total_slices": sum(r["shape"][0] for r in table),
        "total_imaging_mib": round(total_bytes / 2**20, 1),
        "generation_seconds": round(gen_seconds, 2),
        "page_cache": "warm: every file loaded once before the measurements",
        "warmup_load_seconds": warm.seconds,
        # what the split the bare load made allows at best: total work / the busiest rank's work
        "ideal_speedup_2ranks_by_file_size": total_bytes / max_rank_bytes,
        **results,
    }
    parameters = {
        "labels": Path(labels).name,  # the folder's name: results name no machine's path
        "cases": ids,
        "max_slices": args.max_slices,
        "repeats": repeats,
        "statistic": "minimum over repeats (wall time of the whole command)",
        "launcher": f"mpirun -np N --bind-to {args.bind}",
        "bind": args.bind,
        "ranks": list(RANKS),
        "variants": variants,
        "downsample_options": "defaults (--image-size 128, --shards 4, HU -512..512)",
        "seed": 0,
    }
    run.finish(parameters, measurements, TARGETS, _headline_info(args.blocks))
    return 0


if __name__ == "__main__":
    common.run_main(main)

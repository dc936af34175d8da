"""What the benchmarks share: machine description, result files, targets, timing, launching, data.

Every benchmark writes one JSON file (atomically) with this layout::

    {"benchmark", "format_version", "quick", "started", "finished", "wall_seconds",
     "parameters": {...}, "machine": {...}, "measurements": {...},
     "targets": [{"name", "metric", "op", "threshold", "unit", "description", "measured", "met"}],
     "all_targets_met", "info": [{"name", "metric", "unit", "description", "value"}],
     "notes": [...]}

``met`` is computed from ``measured`` (looked up in ``measurements`` by the target's dotted
``metric`` path), never written by hand; a missing or non-finite measurement is not met.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import math
import numbers
import operator
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.machine import child_env, load_average, machine_info

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
FORMAT_VERSION = 1
# Real KiTS19 label maps (the data/ folder of a KiTS19 clone, relative to the working directory,
# or $KITS19_LABELS) and the three small ones committed for tests.
SHARED_LABELS = Path(os.environ.get("KITS19_LABELS", "kits19/data"))
SMALL_LABELS = ROOT / "tests" / "data" / "kits19_labels_small"
# Marks the one line of JSON a worker process prints for its parent (other output is ignored).
RESULT_MARKER = "BENCH_RESULT "


class BenchError(RuntimeError):
    """A benchmark step failed (a command exited non-zero, a worker printed no result, ...)."""


def run_main(main: Callable[[], int]) -> None:
    """A benchmark script's entry point: exit with ``main()``'s code, or 1 and the message of a
    :class:`BenchError` (a clear failure, not a traceback)."""
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


# --------------------------------------------------------------------------------------------
# Targets and result files
# --------------------------------------------------------------------------------------------

_OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge}


def lookup(tree: dict[str, Any], dotted: str) -> Any:
    """``tree["a"]["b"]`` for ``"a.b"``; None when a key is missing."""
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def is_number(value: Any) -> bool:
    """A finite real number (Python or numpy), not a bool."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, (bool, *np_bool_types()))
        and math.isfinite(float(value))
    )


def np_bool_types() -> tuple[type, ...]:
    """numpy's bool type if numpy is loaded (it is not a Python bool, but not a number either)."""
    np = sys.modules.get("numpy")
    return (np.bool_,) if np is not None else ()


@dataclass(frozen=True)
class Target:
    """A goal for one measurement: ``measured op threshold`` (op is "<=" or ">=")."""

    name: str
    metric: str  # dotted path into the measurements
    op: str
    threshold: float
    unit: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"target {self.name}: op must be one of {sorted(_OPS)}")

    def evaluate(self, measurements: dict[str, Any]) -> dict[str, Any]:
        value = lookup(measurements, self.metric)
        met = is_number(value) and _OPS[self.op](float(value), self.threshold)
        measured = float(value) if is_number(value) else None
        return {**asdict(self), "measured": measured, "met": bool(met)}


@dataclass(frozen=True)
class Info:
    """A headline number without a target (shown in reports beside the targets)."""

    name: str
    metric: str  # dotted path into the measurements
    unit: str = ""
    description: str = ""

    def evaluate(self, measurements: dict[str, Any]) -> dict[str, Any]:
        value = lookup(measurements, self.metric)
        return {**asdict(self), "value": float(value) if is_number(value) else None}


def _jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays, tuples and paths converted, NaN/inf -> None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and not isinstance(obj, str):  # numpy scalar or array
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json_atomic(obj: Any, path: Path) -> None:
    """The suite's atomic JSON writer, after NaN/inf and numpy values are made JSON-safe."""
    from preprocess.dataset_format import write_json_atomic as write_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(_jsonable(obj), Path(path))


def default_out(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


class BenchRun:
    """One benchmark run: records the start (time, machine, load), then writes the result file."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        self.args = args
        self.out = Path(args.out) if args.out else default_out(name)
        self.t0 = time.perf_counter()
        self.started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        self.machine = machine_info()
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        """A remark that belongs in the result (method, caveat, skipped part)."""
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    def finish(
        self,
        parameters: dict[str, Any],
        measurements: dict[str, Any],
        targets: Sequence[Target],
        info: Sequence[Info] = (),
    ) -> dict[str, Any]:
        """Evaluate the targets, write the result file atomically and print the summary."""
        machine = dict(self.machine)
        machine["load_average_end"] = load_average()
        evaluated = [t.evaluate(measurements) for t in targets]
        result = {
            "benchmark": self.name,
            "format_version": FORMAT_VERSION,
            "quick": bool(self.args.quick),
            "started": self.started,
            "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "wall_seconds": round(time.perf_counter() - self.t0, 2),
            "parameters": parameters,
            "machine": machine,
            "measurements": measurements,
            "targets": evaluated,
            "all_targets_met": all(t["met"] for t in evaluated),
            "info": [i.evaluate(measurements) for i in info],
            "notes": self.notes,
        }
        write_json_atomic(result, self.out)
        print()
        print(format_targets(result))
        print(f"\nwritten: {self.out}")
        return result


def format_number(value: Any, unit: str = "") -> str:
    if not is_number(value):
        return "n/a"
    v = float(value)
    text = f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return f"{text} {unit}".strip()


def format_targets(result: dict[str, Any]) -> str:
    """Readable lines: one per target, measured against the goal, and whether it was met."""
    lines = [f"{result['benchmark']}: targets" + (" (quick mode)" if result.get("quick") else "")]
    if not result["targets"]:
        lines.append("  (none)")
    for t in result["targets"]:
        goal = f"{t['op']} {format_number(t['threshold'], t['unit'])}"
        mark = "MET " if t["met"] else "MISS"
        lines.append(
            f"  [{mark}] {t['name']:<40} {format_number(t['measured'], t['unit']):>14}"
            f"  (target {goal})"
        )
    for i in result.get("info", []):
        lines.append(f"  [info] {i['name']:<40} {format_number(i['value'], i['unit']):>14}")
    load = result["machine"].get("load_average_start")
    if load and load[0] > 0.5 * (result["machine"]["cpu"]["os_cpu_count"] or 1):
        lines.append(f"  warning: load average {load[0]} at the start: the machine was busy")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line and timing
# --------------------------------------------------------------------------------------------


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The options every benchmark has: --quick, --out, --cache."""
    p = argparse.ArgumentParser(
        prog=f"python -m bench.{name}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes for tests and smoke checks (numbers are not meaningful)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"result file (default: bench/results/{name}.json)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep generated input data here and reuse it on later runs (default: a "
        "temporary folder, removed at the end)",
    )
    return p


@contextlib.contextmanager
def work_folder(cache: Path | None) -> Iterator[Path]:
    """The cache folder if one was given, else a temporary one removed afterwards."""
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        yield cache
        return
    with tempfile.TemporaryDirectory(prefix="kits-bench-") as tmp:
        yield Path(tmp)


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """min (the headline: least disturbed by other work), median, mean, max and the values."""
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0, "min": None, "median": None, "mean": None, "max": None, "values": []}
    return {
        "n": len(vals),
        "min": min(vals),
        "median": statistics.median(vals),
        "mean": statistics.fmean(vals),
        "max": max(vals),
        "values": vals,
    }


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds`` (perf_counter, wall time)."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.seconds = float("nan")
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


# --------------------------------------------------------------------------------------------
# Child processes: plain and under mpirun
# --------------------------------------------------------------------------------------------


def mpirun_cmd(n_ranks: int, bind: str, module: str, *args: Any) -> list[str]:
    """``mpirun -np N --bind-to BIND python -m module args``.

    No ``--oversubscribe``: more ranks than cores would make every number meaningless, so
    mpirun's refusal is the right outcome.
    """
    return [
        "mpirun",
        "-np",
        str(n_ranks),
        "--bind-to",
        bind,
        sys.executable,
        "-m",
        module,
        *map(str, args),
    ]


def python_cmd(module: str, *args: Any) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def run_timed(
    cmd: Sequence[str], timeout: float = 3600, env: dict[str, str] | None = None
) -> tuple[float, subprocess.CompletedProcess]:
    """Run a command from the repository root; (wall seconds, process). BenchError on failure."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            list(cmd),
            cwd=ROOT,
            env=env or child_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{' '.join(cmd)}: no result after {timeout:.0f}s") from exc
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout (end)\n{proc.stdout[-2000:]}"
            f"\n--- stderr (end)\n{proc.stderr[-3000:]}"
        )
    return seconds, proc


def emit_result(obj: Any) -> None:
    """For worker processes: print the result line the parent looks for."""
    print(RESULT_MARKER + json.dumps(_jsonable(obj)), flush=True)


def parse_result(stdout: str) -> Any:
    """The object a worker printed with :func:`emit_result` (the last one)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    raise BenchError(f"worker printed no result line; output ends with:\n{stdout[-2000:]}")


# --------------------------------------------------------------------------------------------
# Input data (generated, not timed)
# --------------------------------------------------------------------------------------------


def default_labels_dir() -> Path:
    """The real KiTS19 label maps if this machine has them, else the committed small ones."""
    return SHARED_LABELS if SHARED_LABELS.is_dir() else SMALL_LABELS


def _digest(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_jsonable(params), sort_keys=True).encode()).hexdigest()[:12]


def make_kits(
    cache: Path,
    *,
    labels_dir: Path | None = None,
    cases: Sequence[int] | None = None,
    n_cases: int | None = None,
    n_slices: int | None = None,
    size: int | None = None,
    max_slices: int | None = None,
    seed: int = 0,
) -> tuple[Path, list[int], float]:
    """A synthetic KiTS19 folder from ``preprocess.synthetic`` (real label maps if
    ``labels_dir``, else analytic cases); (folder, case ids, seconds spent generating).

    The folder's name is a digest of the options, so a cache folder can hold several and a
    later run reuses complete cases (the generator skips them).
    """
    from preprocess.synthetic.cases import DEFAULT_SLICES, generate

    params = {
        "labels": str(Path(labels_dir).resolve()) if labels_dir else None,
        "cases": list(cases) if cases is not None else None,
        "n_cases": n_cases,
        "n_slices": n_slices,
        "size": size,
        "max_slices": max_slices,
        "seed": seed,
    }
    folder = cache / f"kits-{_digest(params)}"
    t0 = time.perf_counter()
    ids = generate(
        folder,
        labels_dir=labels_dir,
        cases=cases,
        n_cases=n_cases,
        n_slices=n_slices or DEFAULT_SLICES,
        size=size,
        max_slices=max_slices,
        seed=seed,
    )
    return folder, ids, time.perf_counter() - t0


def case_table(kits_dir: Path, cases: Sequence[int]) -> list[dict[str, Any]]:
    """Shape, spacing and file sizes of each case (from the NIfTI headers, no voxel data)."""
    import nibabel as nib

    from preprocess.kits import IMAGING, SEGMENTATION, case_folder, case_name, spacing_from_affine

    rows = []
    for c in cases:
        folder = case_folder(kits_dir, c)
        img = nib.load(str(folder / IMAGING))
        rows.append(
            {
                "id": int(c),
                "case": case_name(c),
                "shape": list(img.shape),
                "spacing_mm": [round(s, 4) for s in spacing_from_affine(img.affine)],
                "imaging_bytes": (folder / IMAGING).stat().st_size,
                "segmentation_bytes": (folder / SEGMENTATION).stat().st_size,
                "voxels": int(math.prod(img.shape)),
            }
        )
    return rows


def make_slice_dataset(
    cache: Path,
    *,
    n_cases: int,
    n_slices: int,
    size: int,
    image_size: int,
    n_shards: int = 1,
    seed: int = 0,
) -> Path:
    """A 2D slice dataset (``preprocess.downsample``'s pipeline) of analytic synthetic cases.

    Cases are rendered at ``size`` pixels (field of view of a 512 px scan) and resized to
    ``image_size``; rendering at 128 px keeps this quick and yields the same kind of shard.
    Reused when the cache already holds it (the pipeline recognises a complete dataset).
    """
    from preprocess.pipeline import PreprocessConfig, run

    kits, _, _ = make_kits(cache, n_cases=n_cases, n_slices=n_slices, size=size, seed=seed)
    out = cache / f"slices-{_digest({'kits': kits.name, 'image': image_size, 'shards': n_shards})}"
    cfg = PreprocessConfig(
        kind="slices",
        kits_dir=str(kits),
        out_dir=str(out),
        image_size=image_size,
        n_shards=n_shards,
    )
    if run(cfg, quiet=True) != 0:
        raise BenchError(f"preprocessing {kits} into {out} failed (see the messages above)")
    return out

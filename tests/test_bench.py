"""The benchmarks (bench/) in --quick mode: each writes one well-formed JSON result.

No timing assertions: the numbers of a quick run on a shared machine mean nothing. What is
checked is the file's contract: the machine section, numeric measurements, and target flags
that agree with the measured values.
"""

from __future__ import annotations

import json
import math
import operator
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import PYTHON, ROOT, run_env, run_module

from bench import report
from bench.common import lookup

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

OPS = {"<=": operator.le, ">=": operator.ge}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated inputs shared by the benchmarks of this module."""
    return tmp_path_factory.mktemp("bench_cache")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench_results")


def _run(name: str, out: Path, cache: Path, *extra: str) -> dict[str, Any]:
    proc = run_module(
        f"bench.{name}", "--quick", "--out", out, "--cache", cache, *extra, timeout=900
    )
    assert "targets" in proc.stdout  # the readable summary is printed
    assert not list(out.parent.glob("*.tmp")), "temporary file left behind"
    return json.loads(out.read_text())


def _numbers(node: Any) -> list[float]:
    """Every number in a JSON tree."""
    if isinstance(node, dict):
        return [v for x in node.values() for v in _numbers(x)]
    if isinstance(node, list):
        return [v for x in node for v in _numbers(x)]
    if isinstance(node, int | float) and not isinstance(node, bool):
        return [float(node)]
    return []


def check_result(result: dict[str, Any], name: str, n_targets: int) -> None:
    assert result["benchmark"] == name
    assert result["quick"] is True
    assert result["format_version"] == 1
    machine = result["machine"]
    cpu = machine["cpu"]
    assert cpu["model"] and isinstance(cpu["os_cpu_count"], int) and cpu["os_cpu_count"] >= 1
    assert 1 <= cpu["affinity_count"] <= cpu["os_cpu_count"]
    assert machine["memory"]["total_gib"] > 0
    assert machine["os"]["name"] or machine["os"]["platform"]
    for package in ("python", "tensorflow", "horovod", "numpy", "opencv", "h5py"):
        assert machine["versions"][package], package
    assert machine["date"] and "commit" in machine["git"]
    assert len(machine["load_average_start"]) == 3
    assert isinstance(result["parameters"], dict) and result["parameters"]

    numbers = _numbers(result["measurements"])
    assert numbers and all(math.isfinite(v) for v in numbers)
    assert len(result["targets"]) == n_targets
    for target in result["targets"]:
        measured = target["measured"]
        assert isinstance(measured, int | float) and math.isfinite(measured), target
        assert lookup(result["measurements"], target["metric"]) == measured
        assert target["met"] is OPS[target["op"]](measured, target["threshold"]), target
    assert result["all_targets_met"] is all(t["met"] for t in result["targets"])
    for item in result["info"]:
        assert isinstance(item["value"], int | float), item


def test_preprocess(results: Path, cache: Path) -> None:
    result = _run("preprocess", results / "preprocess.json", cache)
    check_result(result, "preprocess", 2)
    m = result["measurements"]
    for variant in ("bare_load", "downsample", "blocks"):
        for ranks in ("rank1", "rank2"):
            assert m[variant][ranks]["seconds"] > 0
            assert m[variant][ranks]["seconds_per_case"] * m["n_cases"] == pytest.approx(
                m[variant][ranks]["seconds"]
            )
        assert m[variant]["speedup_2ranks"] == pytest.approx(
            m[variant]["rank1"]["seconds"] / m[variant]["rank2"]["seconds"]
        )
    # the bare load splits the cases over the ranks, every case exactly once
    split = m["bare_load"]["rank2"]["cases_per_rank"]
    assert len(split) == 2 and sorted(split[0] + split[1]) == result["parameters"]["cases"]
    assert m["downsample"]["ratio_to_bare_load_1rank"] == pytest.approx(
        m["downsample"]["rank1"]["seconds"] / m["bare_load"]["rank1"]["seconds"]
    )


def test_train(results: Path, cache: Path) -> None:
    result = _run("train", results / "train.json", cache)
    # scaling of unet2d (quick mode's one model), pipeline raw and tf.data (2), epoch ratio
    check_result(result, "train", 4)
    m = result["measurements"]
    for name in ("unet2d",):
        model = m["scaling"]["models"][name]
        assert model["efficiency"] == pytest.approx(
            model["samples_per_s_2ranks"] / (2 * model["samples_per_s_1rank"])
        )
        assert model["affinity_2ranks"] and len(model["affinity_2ranks"]) == 2
    assert m["scaling"]["threads_per_rank"]["intra_op"] == 1
    assert m["pipeline"]["raw_uint8"]["samples_per_s"] > 0
    assert m["pipeline"]["tf_data"]["samples_per_s"] > 0
    assert m["keras_idg"]["samples_per_s"] > 0
    assert m["epoch"]["ratio"] == pytest.approx(
        m["epoch"]["pipeline"]["timed_epoch_seconds"]
        / m["epoch"]["in_memory"]["timed_epoch_seconds"]
    )


def test_predict(results: Path, cache: Path) -> None:
    result = _run("predict", results / "predict.json", cache)
    check_result(result, "predict", 2)
    for model in result["measurements"]["models"].values():
        assert len(model["volumes"]) == 2
        for volume in model["volumes"]:
            assert 0 < volume["network_share"] <= 1
            assert volume["network"] <= volume["wall_seconds"]


def test_report_and_script(results: Path, tmp_path: Path) -> None:
    """The report renders whatever results exist (the tests above ran first), and the
    make bench script parses."""
    files = sorted(results.glob("*.json"))
    assert files, "the benchmark tests above wrote no results"
    out = tmp_path / "table.md"
    assert report.main([*map(str, files), "--output", str(out)]) == 0
    table = out.read_text()
    n_targets = sum(len(json.loads(f.read_text())["targets"]) for f in files)
    assert table.count("| yes |") + table.count("| **no** |") == n_targets
    assert report.main([*map(str, files), "--format", "text", "--output", str(out)]) == 0
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "bench.sh")], check=True)


@pytest.mark.parametrize("name", ["preprocess", "train", "predict", "report"])
def test_help(name: str) -> None:
    """--help as a module and as a file (bench/train.py must not shadow the train package)."""
    for cmd in ([PYTHON, "-m", f"bench.{name}"], [PYTHON, str(ROOT / "bench" / f"{name}.py")]):
        proc = subprocess.run(
            [*cmd, "--help"], cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr


def test_targets_and_json(tmp_path: Path) -> None:
    """``met`` follows the measured value; result files hold plain, strict JSON."""
    import numpy as np

    from bench.common import Target, write_json_atomic

    at_least = Target("speed", "a.b", ">=", 0.9)
    at_most = Target("ratio", "a.c", "<=", 1.5)
    m = {"a": {"b": np.float32(0.95), "c": 1.6}}
    assert at_least.evaluate(m)["met"] is True and at_most.evaluate(m)["met"] is False
    m = {"a": {"b": 0.85, "c": 1.5}}
    assert at_least.evaluate(m)["met"] is False and at_most.evaluate(m)["met"] is True
    for missing in ({}, {"a": {"b": float("nan")}}, {"a": {"b": None}}):
        evaluated = at_least.evaluate(missing)
        assert evaluated["met"] is False and evaluated["measured"] is None
    out = tmp_path / "r.json"
    write_json_atomic({"x": np.float32(1.5), "y": float("inf"), "z": (np.int64(2),)}, out)
    assert json.loads(out.read_text()) == {"x": 1.5, "y": None, "z": [2]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_two_ranks_refused_without_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks are not started when the 1-rank peak says they would not fit."""
    from bench import common, machine
    from bench import train as bench_train

    one_rank = {"models": {"unet3d": {"per_rank": [{"peak_rss_gib": 8.0}]}}}
    monkeypatch.setattr(machine, "memory_info", lambda: {"available_gib": 16.0})
    with pytest.raises(common.BenchError, match="not started"):
        bench_train._check_memory(one_rank, 2)
    monkeypatch.setattr(machine, "memory_info", lambda: {"available_gib": 20.0})
    bench_train._check_memory(one_rank, 2)

"""PBS Pro job templates (jobs/*.pbs): directives, and the bodies run as PBS Pro runs them.

No PBS server can be installed here (stack.md), so the ``#PBS`` header is parsed and checked
against Metacentrum's PBS Pro syntax, and the body runs under bash with the variables PBS sets
(PBS_JOBID, PBS_O_WORKDIR, PBS_NODEFILE listing localhost twice, SCRATCHDIR, NCPUS): real
`mpirun` ranks, real training, staging into the scratch folder and back to the submit directory.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import PYTHON, run_env
from jobs_support import (
    JOBS,
    PBS_TEMPLATES,
    ROOT,
    TINY_TRAIN,
    PbsJob,
    corrupt_shard,
    make_submit_dir,
    pbs_directives,
    read_json,
    require_suite_modules,
    shared_data,
    wait_for_line,
)

pytestmark = pytest.mark.mpi

# Variables a user sets (qsub -v ...), each with a ${VAR:-default} line at the top of the template.
TRAIN_VARIABLES = ["MODEL", "DATA", "RUN_DIR", "EPOCHS", "BATCH", "RANKS", "EXTRA_ARGS", "IMAGE"]
USER_VARIABLES = {
    "train_unet2d.pbs": TRAIN_VARIABLES,
    "train_unet3d.pbs": TRAIN_VARIABLES,
    "preprocess.pbs": ["MODE", "KITS", "DATA", "SHARDS", "RANKS", "EXTRA_ARGS", "IMAGE"],
    "evaluate.pbs": ["RUN_DIR", "KITS", "EVAL_DIR", "DATA", "EXTRA_ARGS", "IMAGE"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shared_data(tmp_path_factory)


@pytest.fixture(scope="module")
def submit_dir(tmp_path_factory) -> Path:
    return make_submit_dir(tmp_path_factory.mktemp("pbs_submit"))


def scratch_leftovers(job: PbsJob) -> list[str]:
    return sorted(p.name for p in job.scratch.iterdir()) if job.scratch.exists() else []


def assert_failed_fast(proc, *needles: str) -> None:
    out = proc.stdout
    assert proc.returncode == 2, f"exit {proc.returncode}, expected 2:\n{out}"
    for needle in needles:
        assert needle in out, f"{needle!r} not in the job output:\n{out}"
    assert "[kits] ERROR:" in out
    assert "run: " not in out, f"something was launched despite the bad input:\n{out}"
    assert proc.elapsed < 60, f"bad input took {proc.elapsed:.0f} s to report"


# --- directives -------------------------------------------------------------------------------
@pytest.mark.parametrize("template", PBS_TEMPLATES)
def test_pbs_directives_follow_metacentrum_pbs_pro_syntax(template):
    path = JOBS / template
    text = path.read_text()
    assert text.startswith("#!/bin/bash\n")
    directives = pbs_directives(path)
    opts = [o for o, _ in directives]
    values = dict(directives)
    resources = [v for o, v in directives if o == "-l"]

    assert "-N" in opts and re.fullmatch(r"[A-Za-z][\w.-]{0,14}", values["-N"]), values.get("-N")
    # Metacentrum routes jobs asking for GPUs by themselves; -q gpu would cap the walltime at 24 h
    assert values.get("-q") != "gpu"
    assert values.get("-j") == "oe"

    selects = [r for r in resources if r.startswith("select=")]
    assert len(selects) == 1, resources
    chunk = selects[0][len("select=") :]
    count, _, spec = chunk.partition(":")
    assert count.isdigit() and int(count) >= 1
    res = dict(item.split("=", 1) for item in spec.split(":"))
    assert res["ncpus"].isdigit() and int(res["ncpus"]) >= 1
    assert re.fullmatch(r"\d+gb", res["mem"]), res
    assert re.fullmatch(r"\d+gb", res["scratch_local"]), res
    assert set(res) <= {"ncpus", "ngpus", "mem", "scratch_local", "mpiprocs", "gpu_mem"}, res
    if template.startswith(("train", "evaluate")):
        assert int(res["ngpus"]) >= 1
    else:
        assert int(res.get("ngpus", "0")) == 0

    walltimes = [r[len("walltime=") :] for r in resources if r.startswith("walltime=")]
    assert len(walltimes) == 1 and re.fullmatch(r"\d{2}:[0-5]\d:[0-5]\d", walltimes[0])
    for r in resources:  # nothing else; no Torque-only syntax
        assert r.split("=")[0] in ("select", "walltime", "place"), f"unexpected -l {r}"
    for torque in ("nodes=", "ppn=", "-l mem=", "-l ncpus=", "#PBS -l vmem"):
        assert torque not in text.replace("# ", "#"), f"Torque-style {torque!r} in {template}"

    # everything a user changes is a ${VAR:-default} at the top, before common.sh is sourced
    head = text.split("source ")[0]
    for var in USER_VARIABLES[template]:
        assert re.search(rf'^{var}="\$\{{{var}:-[^}}]*\}}"', head, re.M), f"{var} not at the top"
    assert 'source "$SUITE_DIR/jobs/common.sh"' in text


def test_job_scripts_are_valid_bash_and_shellcheck_clean():
    scripts = sorted(JOBS.glob("*.pbs")) + sorted(JOBS.glob("*.slurm")) + [
        JOBS / "common.sh", JOBS / "chain.sh", ROOT / "containers" / "build.sh",
        *sorted((ROOT / "scripts").glob("*.sh")),
    ]  # fmt: skip
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"
    # make setup installs shellcheck (scripts/setup.sh): its absence is a set-up failure
    assert shutil.which("shellcheck"), "shellcheck missing: run make setup"
    proc = subprocess.run(
        ["shellcheck", "-x", *map(str, scripts)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- bad input: clear message, exit 2, nothing launched ---------------------------------------
def test_train_without_data_path_stops_the_chain(tmp_path, submit_dir, data):
    """Bad input: exit 2 at once; the jobs chained after it (afterany) stop at once too,
    instead of failing the same way one after the other."""
    run_dir = tmp_path / "run"
    proc = PbsJob(tmp_path, "train_unet2d.pbs", submit_dir, RUN_DIR=run_dir).run()
    assert_failed_fast(proc, "DATA is not set", "qsub -v DATA=")
    assert not (run_dir / "config.json").exists()
    assert (run_dir / ".kits-chain-stopped").is_file()
    proc = PbsJob(tmp_path, "train_unet2d.pbs", submit_dir, RUN_DIR=run_dir,
                  DATA=data["slices"]).run()  # fmt: skip
    assert_failed_fast(proc, "an earlier job of this run failed", "exited with status 2")


def test_train_with_corrupt_dataset_stops_before_training_and_cleans_scratch(
    tmp_path, submit_dir, data
):
    bad = corrupt_shard(data["slices"], tmp_path / "corrupt")
    # Metacentrum's clean_scratch, when present, is what cleans the scratch folder
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "clean_scratch.called"
    (bin_dir / "clean_scratch").write_text(
        f'#!/bin/sh\necho "$SCRATCHDIR" > {marker}\nrm -rf "$SCRATCHDIR"/*\n'
    )
    (bin_dir / "clean_scratch").chmod(0o755)
    job = PbsJob(tmp_path, "train_unet2d.pbs", submit_dir, DATA=bad, RUN_DIR=tmp_path / "run")
    job.env["PATH"] = f"{bin_dir}:{job.env['PATH']}"
    proc = job.run()
    assert_failed_fast(proc, "failed verification", "SHA-256 mismatch", str(bad))
    assert marker.read_text().strip() == str(job.scratch)
    assert scratch_leftovers(job) == []
    assert not (tmp_path / "run" / "config.json").exists()


def test_two_node_allocation_stages_on_every_node(tmp_path, submit_dir, data):
    """select=2:...:mpiprocs=1: a second host in PBS_NODEFILE (this machine under its own name,
    so that mpirun reaches it without ssh) gets its own copy of the dataset, removed at the end."""
    host = socket.gethostname()
    job = PbsJob(tmp_path, "train_unet2d.pbs", submit_dir, nodes=("localhost", host),
                 DATA=corrupt_shard(data["slices"], tmp_path / "corrupt"),
                 RUN_DIR=tmp_path / "run")  # fmt: skip
    proc = job.run()
    assert_failed_fast(proc, f"to the scratch of {host}", "failed verification")
    assert "on localhost " + host in proc.stdout
    assert scratch_leftovers(job) == []


def test_more_ranks_than_shards(tmp_path, submit_dir, data):
    # select=1:...:mpiprocs=3 -> PBS_NODEFILE lists the host three times -> 3 ranks, 2 shards
    job = PbsJob(tmp_path, "train_unet2d.pbs", submit_dir, nodes=("localhost",) * 3,
                 DATA=data["slices"], RUN_DIR=tmp_path / "run")  # fmt: skip
    assert_failed_fast(job.run(), "3 ranks but", "only 2 train shard")


def test_ranks_must_divide_shards(tmp_path, submit_dir, data):
    job = PbsJob(tmp_path, "train_unet2d.pbs", submit_dir, DATA=data["slices4"], RANKS="3",
                 RUN_DIR=tmp_path / "run")  # fmt: skip
    assert_failed_fast(job.run(), "4 train shards cannot be split evenly over 3 ranks", "1,2,4")


@pytest.mark.parametrize(
    "nodes, ncpus, env, expect",
    [
        (("localhost",), 4, {}, "4 ranks but"),  # CPU-only node: one rank per CPU
        (("localhost",), 8, {"CUDA_VISIBLE_DEVICES": "0,1,2"}, "3 ranks but"),  # one per GPU
    ],
    ids=["cpu-only-ranks=ncpus", "gpu-node-ranks=gpus"],
)
def test_rank_count_follows_the_allocation(tmp_path, submit_dir, data, nodes, ncpus, env, expect):
    job = PbsJob(tmp_path, "train_unet2d.pbs", submit_dir, nodes=nodes, ncpus=ncpus,
                 DATA=data["slices"], RUN_DIR=tmp_path / "run", **env)  # fmt: skip
    assert_failed_fast(job.run(), expect)


def test_wrong_dataset_kind_and_not_a_dataset(tmp_path, submit_dir, data):
    # each its own run folder: a failed training job stops the chain of its run folder
    proc = PbsJob(tmp_path, "train_unet3d.pbs", submit_dir, DATA=data["slices"],
                  RUN_DIR=tmp_path / "run3d").run()  # fmt: skip
    assert_failed_fast(proc, "MODEL=unet3d needs a 'blocks' dataset")
    proc = PbsJob(tmp_path, "train_unet2d.pbs", submit_dir, DATA=data["kits"],
                  RUN_DIR=tmp_path / "run2d").run()  # fmt: skip
    assert_failed_fast(proc, "is not a dataset of this suite")


def test_other_templates_reject_missing_paths(tmp_path, submit_dir, data):
    assert_failed_fast(PbsJob(tmp_path, "preprocess.pbs", submit_dir).run(), "KITS is not set")
    proc = PbsJob(tmp_path, "preprocess.pbs", submit_dir, KITS=data["kits"]).run()
    assert_failed_fast(proc, "DATA is not set")
    assert_failed_fast(PbsJob(tmp_path, "evaluate.pbs", submit_dir).run(), "RUN_DIR is not set")
    proc = PbsJob(tmp_path, "evaluate.pbs", submit_dir, RUN_DIR=tmp_path, KITS=data["kits"]).run()
    assert_failed_fast(proc, "holds no config.json")


def test_gpu_job_without_usable_gpus_stops_before_staging(tmp_path, submit_dir, data):
    """The scheduler gave 2 GPUs (CUDA_VISIBLE_DEVICES) but TensorFlow sees none: exit 2 with
    the reason, before any data is copied or training started."""
    job = PbsJob(tmp_path, "train_unet2d.pbs", submit_dir, DATA=data["slices"],
                 RUN_DIR=tmp_path / "run", CUDA_VISIBLE_DEVICES="0,1")  # fmt: skip
    proc = job.run()
    assert_failed_fast(proc, "asked for 2 GPU(s)", "TensorFlow", "sees none", ".venv is for CPU")
    assert "copying" not in proc.stdout and "staging" not in proc.stdout
    assert scratch_leftovers(job) == []
    # train.train itself refuses too
    proc = subprocess.run(
        [PYTHON, "-m", "train.train", "--model", "unet2d", "--data", str(data["slices"]),
         "--out", str(tmp_path / "run2"), "--require-gpu"],
        env=run_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        "GPUs were required (--require-gpu) but TensorFlow sees none" in proc.stdout + proc.stderr
    )
    assert not (tmp_path / "run2" / "checkpoints").exists()


def test_modules_are_loaded_first(tmp_path, submit_dir):
    """MODULES="a b": `module add a`, `module add b` before anything else; a node without
    environment modules is reported (exit 2). The `module` command here is a shell function
    passed in the environment, as Environment Modules and Lmod define it."""
    record = tmp_path / "module.log"
    job = PbsJob(tmp_path, "train_unet2d.pbs", submit_dir, RUN_DIR=tmp_path / "run",
                 MODULES="openmpi/4.1.6-gcc-10.2.1 cuda/12.5")  # fmt: skip
    job.env["BASH_FUNC_module%%"] = f'() {{ echo "$*" >> {record}; }}'
    proc = job.run()
    assert_failed_fast(proc, "DATA is not set")  # the modules came first
    assert record.read_text().splitlines() == ["add openmpi/4.1.6-gcc-10.2.1", "add cuda/12.5"]
    assert "modules: openmpi/4.1.6-gcc-10.2.1 cuda/12.5" in proc.stdout

    job = PbsJob(tmp_path, "train_unet2d.pbs", submit_dir, RUN_DIR=tmp_path / "run2",
                 MODULES="openmpi")  # fmt: skip
    job.env["MODULESHOME"] = str(tmp_path / "none")
    proc = job.run()
    assert_failed_fast(proc, "MODULES=openmpi is set but this node has no 'module' command")


def test_image_without_singularity_is_reported(tmp_path, submit_dir, data):
    job = PbsJob(tmp_path, "train_unet2d.pbs", submit_dir, DATA=data["slices"],
                 IMAGE=tmp_path / "kits.sif", RUN_DIR=tmp_path / "run")  # fmt: skip
    job.env["PATH"] = "/usr/bin:/bin"  # no singularity/apptainer here anyway
    assert_failed_fast(job.run(), "neither singularity nor apptainer")


# --- real runs --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, submit_dir, data):
    """train_unet2d.pbs twice in the same submit directory: 1 epoch, then resubmitted with
    EPOCHS=2 (what a chained job after the walltime does)."""
    require_suite_modules("train.train")
    tmp = tmp_path_factory.mktemp("pbs_train")
    first = PbsJob(tmp, "train_unet2d.pbs", submit_dir, DATA=data["slices"], **TINY_TRAIN)
    p1 = first.run()
    assert p1.returncode == 0, p1.stdout[-6000:]
    run_dir = submit_dir / "runs" / "unet2d"
    after_first = read_json(run_dir / "checkpoints" / "latest.json")
    second = PbsJob(tmp, "train_unet2d.pbs", submit_dir, DATA=data["slices"],
                    **{**TINY_TRAIN, "EPOCHS": "2"})  # fmt: skip
    p2 = second.run()
    assert p2.returncode == 0, p2.stdout[-6000:]
    return {"run_dir": run_dir, "jobs": (first, second), "procs": (p1, p2), "first": after_first}


def test_pbs_training_runs_two_ranks_in_scratch_and_copies_back(trained, data):
    (job, _), (proc, _) = trained["jobs"], trained["procs"]
    out, run_dir = proc.stdout, trained["run_dir"]
    assert "mpirun -np 2 " in out and "--host localhost:2" in out
    assert f"--data {job.scratch}/" in out and f"--out {job.scratch}/" in out  # ran in scratch
    assert "--resume" not in out
    assert "copying results back" in out
    config = read_json(run_dir / "config.json")
    assert config["n_ranks"] == 2 and config["model"] == "unet2d"
    assert config["model_options"].get("base_filters") == 4
    assert (run_dir / "checkpoints" / "latest.weights.h5").stat().st_size > 0
    assert trained["first"]["epoch"] == 1
    assert scratch_leftovers(job) == [], "scratch not cleaned"


def test_pbs_resubmitted_training_resumes(trained):
    _, job = trained["jobs"]
    _, proc = trained["procs"]
    run_dir = trained["run_dir"]
    assert "checkpoint of epoch 1 found" in proc.stdout and "--resume" in proc.stdout
    assert read_json(run_dir / "checkpoints" / "latest.json")["epoch"] == 2
    with open(run_dir / "history.csv") as fh:
        epochs = [int(float(row["epoch"])) for row in csv.DictReader(fh)]
    assert len(epochs) == 2 and epochs[-1] in (1, 2), epochs  # epoch 1 kept, epoch 2 appended
    assert scratch_leftovers(job) == []


def test_pbs_evaluate_writes_metrics(tmp_path, trained, submit_dir, data):
    require_suite_modules("train.evaluate")
    job = PbsJob(tmp_path, "evaluate.pbs", submit_dir, RUN_DIR="runs/unet2d", KITS=data["kits"],
                 DATA=data["slices"], EXTRA_ARGS="--no-progress")  # fmt: skip
    proc = job.run()
    assert proc.returncode == 0, proc.stdout[-6000:]
    eval_dir = trained["run_dir"] / "eval"
    metrics = read_json(eval_dir / "metrics.json")
    assert metrics and (eval_dir / "per_case.csv").is_file()
    assert "mpirun" not in proc.stdout  # one process
    assert scratch_leftovers(job) == []


def test_pbs_train_unet3d(tmp_path, submit_dir, data):
    require_suite_modules("train.train")
    run_dir = tmp_path / "run3d"
    job = PbsJob(tmp_path, "train_unet3d.pbs", submit_dir, DATA=data["blocks"], RUN_DIR=run_dir,
                 **TINY_TRAIN)  # fmt: skip
    proc = job.run()
    assert proc.returncode == 0, proc.stdout[-6000:]
    config = read_json(run_dir / "config.json")
    assert config["model"] == "unet3d" and config["n_ranks"] == 2
    assert config["input_shape"][:3] == [8, 32, 32]
    assert (run_dir / "checkpoints" / "latest.weights.h5").is_file()
    assert scratch_leftovers(job) == []


def test_pbs_preprocess_writes_a_verified_dataset(tmp_path, submit_dir, data):
    job = PbsJob(tmp_path, "preprocess.pbs", submit_dir, KITS=data["kits"],
                 DATA="datasets/slices32", SHARDS="2",
                 EXTRA_ARGS="--image-size 32 --quiet")  # fmt: skip
    proc = job.run()
    assert proc.returncode == 0, proc.stdout[-6000:]
    out = submit_dir / "datasets" / "slices32"
    manifest = read_json(out / "manifest.json")
    assert len(manifest["splits"]["train"]["shards"]) == 2 and manifest["image_size"] == 32
    assert "mpirun -np 2 " in proc.stdout and f"--kits {job.scratch}/" in proc.stdout
    assert f"{job.scratch}/" in proc.stdout and ": OK (slices" in proc.stdout  # verified
    assert scratch_leftovers(job) == []


def test_walltime_signal_copies_partial_results_back(tmp_path, submit_dir, data):
    """SIGTERM (walltime, qdel) during training: ranks stopped, results copied back, scratch
    cleaned, exit 143."""
    require_suite_modules("train.train")
    run_dir = tmp_path / "run"
    job = PbsJob(tmp_path, "train_unet2d.pbs", submit_dir, DATA=data["slices"], RUN_DIR=run_dir,
                 EPOCHS="1000", BATCH="2",
                 EXTRA_ARGS="--model-option base_filters=4 --workers 1")  # fmt: skip
    proc = job.start()
    try:
        lines = wait_for_line(proc, r"^\[train ", timeout=300)  # train.train is running
        os.kill(proc.pid, signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines) + rest
    assert proc.returncode == 143, out[-4000:]
    assert "received SIGTERM" in out and "copying results back" in out
    assert (run_dir / "config.json").is_file()
    assert scratch_leftovers(job) == []
    leftover = [
        p for p in Path("/proc").iterdir()
        if p.name.isdigit() and str(job.scratch) in _cmdline(p)
    ]  # fmt: skip
    assert not leftover, "ranks still running after the job ended"


def _cmdline(p: Path) -> str:
    try:
        return (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# --- walltime: a chain that stops by itself, is killed, and resumes ---------------------------
def _latest(run_dir: Path) -> dict:
    return read_json(run_dir / "checkpoints" / "latest.json")


def _assert_complete_checkpoint(run_dir: Path) -> int:
    """The permanent folder's checkpoint is complete: latest.json names files that are there
    and readable (HDF5 weights, optimizer arrays); returns its epoch."""
    import h5py
    import numpy as np

    latest = _latest(run_dir)
    with h5py.File(run_dir / "checkpoints" / latest["weights"], "r") as fh:
        assert len(fh.keys()) > 0
    with np.load(run_dir / "checkpoints" / latest["optimizer"]) as npz:
        assert len(npz.files) > 0
    return int(latest["epoch"])


def test_walltime_chain_stops_in_time_survives_kill_and_resumes(tmp_path, submit_dir, data):
    """Job 1 has a walltime leaving room for a few epochs: it stops by itself before the
    walltime, its checkpoint in the permanent run folder. Job 2 gets SIGTERM mid-epoch and SIGKILL
    10 s later (what PBS does at the walltime). Job 3 resumes from the last complete checkpoint
    the permanent folder holds."""
    require_suite_modules("train.train")
    run_dir = tmp_path / "run"
    common = dict(DATA=data["slices"], RUN_DIR=run_dir, EPOCHS="1000", BATCH="2",
                  SYNC_INTERVAL="1", STOP_MARGIN="40",
                  EXTRA_ARGS="--model-option base_filters=4 --max-steps 3 --warmup-epochs 0 "
                  "--workers 1 --no-check-sha256 --early-stop-patience 0")  # fmt: skip
    walltime = 90  # start-up, a first epoch that traces the steps, then epochs of a few seconds
    first = PbsJob(tmp_path, "train_unet2d.pbs", submit_dir, PBS_WALLTIME="00:01:30", **common)
    proc = first.run(timeout=walltime + 60)
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:]
    assert proc.elapsed < walltime, f"job 1 ran {proc.elapsed:.0f}s past its {walltime}s walltime"
    assert "training must stop by" in out and "--deadline " in out
    stop = re.search(r"stopping after epoch (\d+): the deadline is", out)
    assert stop, out[-4000:]
    assert _assert_complete_checkpoint(run_dir) == int(stop.group(1))
    assert scratch_leftovers(first) == []

    second = PbsJob(tmp_path, "train_unet2d.pbs", submit_dir, **common)
    job = second.start()
    try:
        start = _assert_complete_checkpoint(run_dir)
        lines = wait_for_line(job, r"checkpoint of epoch \d+ copied to", timeout=240)
        synced = _latest(run_dir)["epoch"]
        assert synced > start, "job 2 did not continue the run"
        os.killpg(job.pid, signal.SIGTERM)  # PBS signals every process of the job
        try:
            rest, _ = job.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            rest, _ = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    out2 = "".join(lines) + rest
    assert "--resume" in out2 and "received SIGTERM" in out2, out2[-4000:]
    killed_at = _assert_complete_checkpoint(run_dir)
    assert killed_at >= synced

    third = PbsJob(tmp_path, "train_unet2d.pbs", submit_dir,
                   **{**common, "EPOCHS": str(killed_at + 1)})  # fmt: skip
    proc = third.run()
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert f"checkpoint of epoch {killed_at} found" in proc.stdout and "--resume" in proc.stdout
    assert _assert_complete_checkpoint(run_dir) == killed_at + 1
    with open(run_dir / "history.csv") as fh:
        assert len(list(csv.DictReader(fh))) >= killed_at

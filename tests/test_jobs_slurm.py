"""SLURM job templates (jobs/*.slurm) on a real single-node SLURM cluster started for the session.

tests/slurm_cluster.py starts munged, slurmctld and slurmd (Debian's slurm-wlm) with a private
configuration (SLURM_CONF in a temporary folder); the node declares 16 CPUs, 64 GB and two GRES
GPUs (character devices), so the templates are submitted exactly as a user would, and SLURM hands
the jobs CUDA_VISIBLE_DEVICES=0,1 (TensorFlow finds no real GPU and runs on the CPU). Accounting
is off: job states and exit codes come from `scontrol show job`. The daemons are stopped by PID
at the end of the session, also when a test fails.
"""

from __future__ import annotations

import atexit
import re
import subprocess
from pathlib import Path

import pytest
from jobs_support import (
    JOBS,
    PYTHON,
    SLURM_TEMPLATES,
    TINY_TRAIN,
    job_env,
    make_submit_dir,
    read_json,
    require_suite_modules,
    shared_data,
    slurm_directives,
)
from slurm_cluster import ClusterUnavailable, SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.mpi]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except ClusterUnavailable as exc:
        pytest.skip(f"cannot run a SLURM cluster on this machine: {exc}")
    atexit.register(c.stop)  # also if the session is interrupted before the teardown
    yield c
    c.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shared_data(tmp_path_factory)


@pytest.fixture(scope="module")
def submit_dir(tmp_path_factory) -> Path:
    return make_submit_dir(tmp_path_factory.mktemp("slurm_submit"))


def export(**env) -> str:
    """sbatch --export=ALL,K=V,... (values must not contain commas)."""
    for k, v in env.items():
        assert "," not in str(v), f"{k}={v}: sbatch --export cannot carry commas"
    return "--export=" + ",".join(["ALL", *(f"{k}={v}" for k, v in env.items())])


def log_of(submit_dir: Path, info: dict) -> str:
    path = Path(info["StdOut"])
    assert path.parent == submit_dir, path
    return path.read_text()


def assert_job(info: dict, state: str, exit_code: str, log: str) -> None:
    assert (info["JobState"], info["ExitCode"]) == (state, exit_code), (
        f"job {info['JobId']}: {info['JobState']} {info['ExitCode']}, expected {state} "
        f"{exit_code}\n--- log ---\n{log[-6000:]}"
    )


# --- the cluster itself -----------------------------------------------------------------------
def test_two_ranks_under_srun_see_size_2(cluster, tmp_path):
    """srun --mpi=pmix (and mpirun inside sbatch) start 2 MPI ranks that see each other."""
    script = tmp_path / "hello.slurm"
    hello = (  # one write per line, so the two ranks' lines do not interleave
        "import sys; from mpi4py import MPI; c = MPI.COMM_WORLD; "
        "sys.stdout.write(f'HELLO {c.rank} {c.size}\\n'); sys.stdout.flush()"
    )
    script.write_text(
        "#!/bin/bash\n#SBATCH --ntasks=2\n#SBATCH --output=%x-%j.out\n"
        "export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1\n"
        f'srun --mpi=pmix {PYTHON} -c "{hello}" | sed s/^/srun:/\n'
        f'mpirun -np 2 {PYTHON} -c "{hello}" | sed s/^/mpirun:/\n'
    )
    info = cluster.wait(cluster.sbatch(script, cwd=tmp_path, env=job_env()), timeout=120)
    log = log_of(tmp_path, info)
    assert_job(info, "COMPLETED", "0:0", log)
    for launcher in ("srun", "mpirun"):
        assert sorted(line for line in log.splitlines() if line.startswith(launcher)) == [
            f"{launcher}:HELLO 0 2",
            f"{launcher}:HELLO 1 2",
        ], log


@pytest.mark.parametrize("template", SLURM_TEMPLATES)
def test_slurm_templates_are_accepted_by_sbatch(cluster, submit_dir, template):
    """The #SBATCH header as written is valid and schedulable (sbatch --test-only)."""
    directives = slurm_directives(JOBS / template)
    assert any(d.startswith("--time=") for d in directives)
    assert any(d.startswith("--output=") for d in directives)
    # the batch shell gets USR1 before the time limit (the trap stops and copies back), and a
    # requeued job appends to its log
    signal = [d for d in directives if d.startswith("--signal=")]
    assert len(signal) == 1 and re.fullmatch(r"--signal=B:USR1@\d+", signal[0]), signal
    assert "--open-mode=append" in directives
    if template.startswith("train"):
        assert "--gres=gpu:2" in directives and "--ntasks-per-node=2" in directives
    proc = subprocess.run(
        ["sbatch", "--test-only", str(JOBS / template)],
        cwd=submit_dir,
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "to start at" in proc.stderr, proc.stderr


# SLURM releases print `srun --mpi=list` differently; the choice is pmix, else pmi2, else none
# (the template then starts the ranks with mpirun inside the allocation).
MPI_LISTS = {
    "slurm-22.05": "MPI plugin types are...\n\tnone\n\tcray_shasta\n\tpmi2\n\tpmix\n"
    "specific pmix plugin versions available: pmix_v4\n",
    "slurm-20.11": "srun: MPI types are...\nsrun: none\nsrun: pmix_v3\nsrun: pmi2\nsrun: pmix\n",
    "pmi2-only": "MPI plugin types are...\n\tnone\n\tcray_shasta\n\tpmi2\n",
    "none": "MPI plugin types are...\n\tnone\n",
}


def choose_plugin(listing: str) -> str:
    script = f'source "{JOBS}/cluster.sh"; kits_choose_srun_mpi'
    proc = subprocess.run(["bash", "-c", script], input=listing, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize(
    "listing, plugin",
    [("slurm-22.05", "pmix"), ("slurm-20.11", "pmix"), ("pmi2-only", "pmi2"), ("none", "none")],
)
def test_srun_mpi_plugin_choice(listing, plugin):
    assert choose_plugin(MPI_LISTS[listing]) == plugin


def test_srun_mpi_plugin_choice_on_this_cluster(cluster):
    """The real `srun --mpi=list` of Debian's SLURM (which has pmix) gives pmix."""
    proc = subprocess.run(["srun", "--mpi=list"], env=cluster.env(), capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert choose_plugin(proc.stdout + proc.stderr) == "pmix", proc.stdout + proc.stderr


# --- bad input fails the job at once, with the reason in the log ------------------------------
def test_slurm_job_without_data_fails_with_message(cluster, submit_dir, tmp_path):
    job = cluster.sbatch(JOBS / "train_unet2d.slurm", export(RUN_DIR=tmp_path / "run"),
                         cwd=submit_dir, env=job_env())  # fmt: skip
    info = cluster.wait(job, timeout=120)
    log = log_of(submit_dir, info)
    assert_job(info, "FAILED", "2:0", log)
    assert "DATA is not set" in log and "srun" not in log.split("ERROR")[0]
    # the run's chain is stopped, and a job submitted after the failure (not one of that
    # chain: SLURM reports its submission time) goes ahead
    assert (tmp_path / "run" / ".kits-chain-stopped").is_file()
    job = cluster.sbatch(JOBS / "train_unet2d.slurm", export(RUN_DIR=tmp_path / "run"),
                         cwd=submit_dir, env=job_env())  # fmt: skip
    log = log_of(submit_dir, cluster.wait(job, timeout=120))
    assert "submitted after the failure" in log and "DATA is not set" in log


def test_slurm_more_ranks_than_shards_fails_before_launch(cluster, submit_dir, data):
    job = cluster.sbatch(
        JOBS / "train_unet2d.slurm", "--ntasks-per-node=4", export(DATA=data["slices"]),
        cwd=submit_dir, env=job_env(),
    )  # fmt: skip
    info = cluster.wait(job, timeout=120)
    log = log_of(submit_dir, info)
    assert_job(info, "FAILED", "2:0", log)
    assert "4 ranks but" in log and "only 2 train shard" in log and "run: srun" not in log


# --- training chain and evaluation ------------------------------------------------------------
def test_slurm_training_chain_then_evaluation(cluster, submit_dir, data, tmp_path):
    """jobs/chain.sh submits two training jobs (the second afterany the first, finding the run
    complete), then evaluate.slurm runs after them on a CPU-only allocation (--gres=none)."""
    require_suite_modules("train.train", "train.evaluate")
    run_dir = tmp_path / "run"
    stage = tmp_path / "node_scratch"
    # THREADS_PER_RANK=1: the node declares 16 CPUs, this machine may have 2; REQUIRE_GPU=0:
    # the node's GRES GPUs are character devices, TensorFlow sees none (CPU run on purpose)
    env = export(DATA=data["slices"], RUN_DIR=run_dir, STAGE_DIR=stage, THREADS_PER_RANK=1,
                 REQUIRE_GPU=0, **TINY_TRAIN)  # fmt: skip
    chain = subprocess.run(
        [str(JOBS / "chain.sh"), "2", str(JOBS / "train_unet2d.slurm"), env],
        cwd=submit_dir, env=cluster.env(job_env()), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert chain.returncode == 0, chain.stderr
    first, second = chain.stdout.split()
    assert cluster.job_info(second)["Dependency"].startswith(f"afterany:{first}")
    evaluation = cluster.sbatch(
        JOBS / "evaluate.slurm", f"--dependency=afterok:{second}", "--gres=none",
        export(RUN_DIR=run_dir, KITS=data["kits"], DATA=data["slices"], EXTRA_ARGS="--no-progress"),
        cwd=submit_dir, env=job_env(),
    )  # fmt: skip

    info1 = cluster.wait(first, timeout=600)
    log1 = log_of(submit_dir, info1)
    assert_job(info1, "COMPLETED", "0:0", log1)
    assert "srun --mpi=list: using pmix" in log1
    assert "run: srun --mpi=pmix" in log1 and "--ntasks=2" in log1
    assert "training must stop by" in log1 and "--deadline " in log1  # squeue's end time
    assert "2 rank(s), 2 GPU(s)/node" in log1  # GRES gave CUDA_VISIBLE_DEVICES=0,1
    assert f"--out {stage}/" in log1 and "copying results back" in log1
    assert "--resume" not in log1

    info2 = cluster.wait(second, timeout=600)
    log2 = log_of(submit_dir, info2)
    assert_job(info2, "COMPLETED", "0:0", log2)
    # the first job trained every epoch: the chained one finds that out before staging anything
    assert "has trained 1 of 1 epochs: nothing to do" in log2 and "run: srun" not in log2

    config = read_json(run_dir / "config.json")
    assert config["n_ranks"] == 2 and config["model"] == "unet2d"
    assert read_json(run_dir / "checkpoints" / "latest.json")["epoch"] >= 1
    assert (run_dir / "checkpoints" / "latest.weights.h5").stat().st_size > 0
    assert list(stage.iterdir()) == [], "node scratch not cleaned"

    info3 = cluster.wait(evaluation, timeout=600)
    log3 = log_of(submit_dir, info3)
    assert_job(info3, "COMPLETED", "0:0", log3)
    assert "0 GPU(s)/node" in log3
    assert read_json(run_dir / "eval" / "metrics.json")
    assert (run_dir / "eval" / "per_case.csv").is_file()

"""A two-node PBS job on this machine: preprocessing, training and evaluation (jobs/*.pbs).

The node file lists two node names, 127.0.0.2 and 127.0.0.3: both are this machine (loopback),
but OpenMPI does not take them for the local host, so it starts its daemon on each through its
``plm_rsh_agent``, as it would with ssh on a cluster. The agent here runs the daemon on this
machine, and for the second node in a private mount namespace whose job scratch folder
(SCRATCHDIR) is that node's own folder: every node has its own scratch, as with Metacentrum's
``scratch_local``, and only the permanent folders (the test's tmp folder) are shared. Real
``mpirun``, real ranks (one per node), real training; no scheduler exists here (see
tests/test_jobs_pbs.py), so the job body runs under bash with the variables PBS sets.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from jobs_support import (
    TINY_TRAIN,
    PbsJob,
    make_submit_dir,
    read_json,
    require_suite_modules,
    shared_data,
)

pytestmark = pytest.mark.mpi

HEAD, OTHER = "127.0.0.2", "127.0.0.3"

AGENT = """#!/bin/bash
# OpenMPI's plm_rsh_agent: "agent HOST COMMAND..." runs COMMAND on HOST. Here HOST is this
# machine; every node but the head gets its own scratch folder mounted over the job's SCRATCHDIR.
host="$1"
shift
if [ "$host" = {head} ]; then
    exec /bin/sh -c "$*"
fi
mkdir -p "{nodes}/$host"
userns=""
[ "$(id -u)" = 0 ] || userns=--map-root-user  # a mount namespace of one's own needs root or this
exec unshare --mount $userns /bin/sh -c 'mount --bind "$0" "$1" && exec /bin/sh -c "$2"' \\
    "{nodes}/$host" "$SCRATCHDIR" "$*"
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> dict[str, Path | dict[str, str]]:
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to give the second node its own scratch")
    base = tmp_path_factory.mktemp("two_nodes")
    nodes = base / "node_scratch"
    agent = base / "agent.sh"
    agent.write_text(AGENT.format(head=HEAD, nodes=nodes))
    agent.chmod(0o755)
    env = {
        "OMPI_MCA_plm_rsh_agent": str(agent),
        # both "nodes" are reached over loopback, which OpenMPI leaves out by default
        "OMPI_MCA_oob_tcp_if_include": "lo",
        "OMPI_MCA_btl_tcp_if_include": "lo",
    }
    return {"base": base, "nodes": nodes, "env": env, "submit": make_submit_dir(base / "submit")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shared_data(tmp_path_factory)


def two_node_job(cluster, template: str, **env) -> PbsJob:
    job = PbsJob(cluster["base"], template, cluster["submit"], nodes=(HEAD, OTHER), ncpus=1,
                 **cluster["env"], **env)  # fmt: skip
    return job


def shard_checksums(dataset: Path) -> dict[str, str]:
    return {
        str(p.relative_to(dataset)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(dataset.rglob("*.h5"))
    }


def assert_scratch_cleaned(cluster, job: PbsJob) -> None:
    assert list(job.scratch.iterdir()) == [], "head node scratch not cleaned"
    other = cluster["nodes"] / OTHER
    assert not other.exists() or list(other.iterdir()) == [], "second node scratch not cleaned"


def test_two_nodes_preprocess_train_evaluate(cluster, data):
    require_suite_modules("train.train", "train.evaluate")
    dataset = cluster["base"] / "dataset"
    run_dir = cluster["base"] / "run"

    # --- preprocessing: one rank per node, each writing shards into its own scratch --------
    job = two_node_job(cluster, "preprocess.pbs", KITS=data["kits"], DATA=dataset, SHARDS="2",
                       EXTRA_ARGS="--image-size 32 --quiet")  # fmt: skip
    proc = job.run()
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:]
    assert f"on {HEAD} {OTHER}:" in out and "2 rank(s)" in out
    assert f"--hostfile {job.dir}/spool/nodefile" in out
    assert f"to the scratch of {OTHER}" in out and f"copying results back from {OTHER}" in out
    # the same dataset as one process on one node makes, byte for byte
    assert shard_checksums(dataset) == shard_checksums(data["slices"])
    assert len(shard_checksums(dataset)) == 6  # train, val, test x 2 shards
    assert (
        read_json(dataset / "manifest.json")["splits"]
        == read_json(data["slices"] / "manifest.json")["splits"]
    )
    assert not (dataset / ".work").exists(), "the shared claims/work folder was left behind"
    assert_scratch_cleaned(cluster, job)

    # --- training: 2 ranks, one per node; the run folder comes back from the head node -----
    job = two_node_job(cluster, "train_unet2d.pbs", DATA=dataset, RUN_DIR=run_dir, **TINY_TRAIN)
    proc = job.run()
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:]
    assert "mpirun -np 2 " in out and "--hostfile" in out and " -x PYTHONPATH" in out
    config = read_json(run_dir / "config.json")
    assert config["n_ranks"] == 2
    summary = read_json(run_dir / "summary.json")
    assert len(set(summary["weights_digest_per_rank"])) == 1  # both nodes end identical
    assert read_json(run_dir / "checkpoints" / "latest.json")["epoch"] == 1
    assert_scratch_cleaned(cluster, job)

    # --- evaluation -------------------------------------------------------------------------
    job = two_node_job(cluster, "evaluate.pbs", RUN_DIR=run_dir, KITS=data["kits"], DATA=dataset,
                       EXTRA_ARGS="--no-progress")  # fmt: skip
    proc = job.run()
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert read_json(run_dir / "eval" / "metrics.json")
    assert (run_dir / "eval" / "per_case.csv").is_file()
    assert_scratch_cleaned(cluster, job)

"""A real, private, single-node SLURM cluster for the job-template tests.

Starts Debian's ``munged``, ``slurmctld`` and ``slurmd`` (slurm-wlm 22.05) in the foreground as
child processes, with everything private to one temporary folder: the munge key and socket,
``slurm.conf`` (found by clients through ``SLURM_CONF``), free TCP ports, state, spool, logs and
PID files. ``/etc/slurm`` and ``/etc/munge`` are not touched, so it can run beside a system
SLURM or another test session. ``stop()`` ends exactly the processes it started, by PID.

Used by tests/test_jobs_slurm.py as a session fixture; also usable by hand while developing::

    python -m tests.slurm_cluster      # starts it, prints the SLURM_CONF to export, Ctrl-C stops
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = {
    "munged": "/usr/sbin/munged",
    "slurmctld": "/usr/sbin/slurmctld",
    "slurmd": "/usr/sbin/slurmd",
}
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "srun", "scancel")
NODE = "localhost"


class ClusterUnavailable(RuntimeError):
    """This machine cannot run the daemons (the reason is the message)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str, fallback: str | None = None) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    if fallback and os.access(fallback, os.X_OK):
        return fallback
    return None


@dataclass
class SlurmCluster:
    base: Path
    # Declared resources. With SlurmdParameters=config_overrides they may exceed the machine's,
    # so job templates asking for a real cluster's node (8 CPUs, 32 GB, 2 GPUs) are scheduled
    # here unchanged; nothing is enforced (no cgroups).
    cpus: int = 16
    memory_mb: int = 65536
    gpus: int = 2
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    munge_dir: Path | None = None

    @property
    def conf(self) -> Path:
        return self.base / "slurm.conf"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment for SLURM clients (sbatch, squeue, ...) talking to this cluster."""
        env = dict(os.environ)
        for key in list(env):  # never inherit an enclosing job's identity
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")):
                env.pop(key)
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra or {})
        return env

    # --- start ---------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> SlurmCluster:
        paths = {name: _which(name, path) for name, path in DAEMONS.items()}
        missing = [n for n, p in paths.items() if p is None]
        missing += [c for c in CLIENTS if _which(c) is None]
        if missing:
            raise ClusterUnavailable(
                f"SLURM/munge not installed (missing {', '.join(missing)}); "
                "`make setup` installs slurm-wlm and munge"
            )
        if os.geteuid() != 0:
            raise ClusterUnavailable(
                "starting munged (as the munge user) and slurmd needs root on this machine"
            )
        try:
            self._start_munge(paths["munged"])
            self._write_conf()
            self._spawn("slurmctld", [paths["slurmctld"], "-D", "-f", str(self.conf)])
            self._wait_for(
                lambda: self._ok(["scontrol", "ping"], "UP"), timeout, "slurmctld to answer ping"
            )
            self._spawn("slurmd", [paths["slurmd"], "-D", "-f", str(self.conf), "-N", NODE])
            self._wait_for(self._node_idle, timeout, f"node {NODE} to become idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self, munged: str) -> None:
        import pwd

        try:
            munge_user = pwd.getpwnam("munge")
        except KeyError as exc:
            raise ClusterUnavailable("no 'munge' user (munge package not set up)") from exc
        # munged refuses sockets/keys in folders others can write or it cannot reach: its own
        # folder under /tmp (pytest's tmp folders are root-only, the munge user cannot enter).
        self.munge_dir = Path(tempfile.mkdtemp(prefix="kits-munge-"))
        os.chmod(self.munge_dir, 0o755)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        for p in (self.munge_dir, key):
            os.chown(p, munge_user.pw_uid, munge_user.pw_gid)
        self._spawn(
            "munged",
            [
                munged,
                "--foreground",
                f"--socket={self.socket}",
                f"--key-file={key}",
                f"--pid-file={self.munge_dir / 'munged.pid'}",
                f"--log-file={self.munge_dir / 'munged.log'}",
                f"--seed-file={self.munge_dir / 'munged.seed'}",
            ],
            user=munge_user.pw_uid,
            group=munge_user.pw_gid,
        )
        self._wait_for(lambda: Path(self.socket).exists(), 20, "munged to create its socket")

    @property
    def socket(self) -> str:
        assert self.munge_dir is not None
        return str(self.munge_dir / "munge.socket")

    def _fake_gpus(self) -> list[str]:
        """Character devices standing in for GPUs (GRES scheduling only: CUDA_VISIBLE_DEVICES)."""
        import stat

        files = []
        (self.base / "dev").mkdir(exist_ok=True)
        for i in range(self.gpus):
            dev = self.base / "dev" / f"nvidia{i}"
            if not dev.exists():
                try:  # same major/minor as /dev/null
                    os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
                except OSError:  # no CAP_MKNOD (some containers): existing character devices
                    return ["/dev/null", "/dev/zero", "/dev/full", "/dev/random"][: self.gpus]
            files.append(str(dev))
        return files

    def _write_conf(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        b = self.base
        gres_node = ""
        if self.gpus:
            gres_node = f" Gres=gpu:{self.gpus}"
            (b / "gres.conf").write_text(
                "".join(f"NodeName={NODE} Name=gpu File={f}\n" for f in self._fake_gpus())
            )
        self.conf.write_text(
            f"""# private test cluster (tests/slurm_cluster.py)
ClusterName=kitstest
SlurmctldHost={NODE}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdParameters=config_overrides
GresTypes=gpu
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
MpiDefault=pmix
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SchedulerType=sched/backfill
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool
SlurmctldPidFile={b}/slurmctld.pid
SlurmdPidFile={b}/slurmd.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
KillWait=5
MinJobAge=3600
InactiveLimit=0
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb}{gres_node} \
State=UNKNOWN
PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        )

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        log = open(self.base / f"{name}.stdout", "ab")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True, **kw
        )
        log.close()
        time.sleep(0.2)
        if self.procs[name].poll() is not None:
            raise ClusterUnavailable(
                f"{name} exited at start (code {self.procs[name].returncode}): {self.tail(name)}"
            )

    def _wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterUnavailable(
                        f"{name} died (code {proc.returncode}) while waiting for {what}: "
                        f"{self.tail(name)}"
                    )
            if predicate():
                return
            time.sleep(0.5)
        raise ClusterUnavailable(f"timed out after {timeout:.0f} s waiting for {what}")

    def _ok(self, cmd: list[str], expect: str) -> bool:
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=30)
        return proc.returncode == 0 and expect in proc.stdout

    def _node_idle(self) -> bool:
        proc = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env(), capture_output=True, text=True
        )
        return proc.returncode == 0 and f"{NODE} idle" in proc.stdout

    def tail(self, name: str, n: int = 2000) -> str:
        texts = []
        for f in (
            self.base / f"{name}.stdout",
            self.base / "log" / f"{name}.log",
            (self.munge_dir / "munged.log") if self.munge_dir and name == "munged" else None,
        ):
            if f is not None and f.is_file():
                texts.append(f.read_text(errors="replace")[-n:])
        return "\n".join(texts).strip() or "(no output)"

    # --- stop ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Terminate the daemons this object started (by PID), slurmd first."""
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            self.munge_dir = None

    # --- jobs ----------------------------------------------------------------------------
    def sbatch(
        self, script: str | Path, *args: str, cwd: Path, env: dict[str, str] | None = None
    ) -> str:
        """Submit ``script`` from ``cwd``; returns the job id."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *args, str(script)],
            cwd=cwd,
            env=self.env(env),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise AssertionError(f"sbatch {script} failed: {proc.stderr or proc.stdout}")
        return proc.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (accounting is off: no sacct)."""
        proc = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise AssertionError(f"scontrol show job {job_id}: {proc.stderr}")
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def wait(self, job_id: str, timeout: float = 300) -> dict[str, str]:
        """Wait until the job has ended; returns its final job record."""
        deadline = time.monotonic() + timeout
        ended = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
        ended |= {"PREEMPTED", "BOOT_FAIL", "DEADLINE"}
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in ended:
                return info
            time.sleep(1)
        subprocess.run(["scancel", job_id], env=self.env(), capture_output=True)
        raise AssertionError(f"job {job_id} did not end within {timeout:.0f} s: {info}")


def main() -> None:
    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    base = Path(tempfile.mkdtemp(prefix="kits-slurm-"))
    cluster = SlurmCluster(base).start()
    print(f"cluster up: export SLURM_CONF={cluster.conf}   (Ctrl-C stops it)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

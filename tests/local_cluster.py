"""A real one-node Slurm on loopback and a real Docker engine, started for the tests and stopped after them.

Both need root and the Debian packages that `.ci/run` installs (slurm-wlm, munge, docker.io, debootstrap).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

SLURM_CONF = """\
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
MpiDefault=none
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def missing_tools(*names: str) -> list[str]:
    return [name for name in names if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


class LocalSlurm:
    """slurmctld and slurmd in the foreground, with their state in `folder`; munged if it is not running."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.processes: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}

    def start(self) -> "LocalSlurm":
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        (self.folder / "slurm.conf").write_text(SLURM_CONF.format(d=self.folder))
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            Path("/run/munge").mkdir(exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            if not Path("/etc/munge/munge.key").exists():
                subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/mungekey", "--create"], check=True)
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
            self.started_munged = True
        for command in (["/usr/sbin/slurmctld", "-D", "-i"], ["/usr/sbin/slurmd", "-D", "-N", "localhost"]):
            log = open(self.folder / (Path(command[0]).name + ".out"), "wb")
            self.processes.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if state.stdout.strip() == "idle":
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"local Slurm did not come up: {state.stdout} {state.stderr}; see {self.folder}")

    def run(self, *command: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout)

    def wait_idle(self, timeout: float = 900) -> None:
        """Until no job is pending or running."""
        deadline = time.monotonic() + timeout
        while subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True).stdout.strip():
            if time.monotonic() > deadline:
                raise TimeoutError("jobs still queued")
            time.sleep(0.5)

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        if getattr(self, "started_munged", False):
            subprocess.run(["pkill", "-x", "munged"])


class LocalDocker:
    """dockerd without networking of its own (no iptables, no bridge), if no engine is running already."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.process: subprocess.Popen | None = None

    def start(self) -> "LocalDocker":
        if subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
            return self
        log = open(self.folder / "dockerd.log", "wb")
        self.process = subprocess.Popen(["dockerd", "--iptables=false", "--ip-masq=false", "--bridge=none"],
                                        stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"dockerd did not start; see {self.folder / 'dockerd.log'}")
            time.sleep(0.5)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=60)

"""A real one-node Slurm on loopback and a real Docker engine, started for the tests and stopped after them.

Both need root and the Debian packages that `.ci/run` installs (slurm-wlm, munge, docker.io, debootstrap).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_IMAGE = "attention-map:test"

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


class ImageBuild:
    """The image of docker/Dockerfile on a Debian base built here (no registry is reachable), in a thread of its own:
    the build waits on the network and the disk for minutes, which the tests that run meanwhile use. `wait()`
    returns the finished `docker build` (its return code and output)."""

    def __init__(self, folder: Path):
        self.folder, self.engine = folder, LocalDocker(folder)
        self.error: BaseException | None = None
        self.build: subprocess.CompletedProcess | None = None
        self.thread = threading.Thread(target=self._run, name="docker-image-build", daemon=True)

    def start(self) -> "ImageBuild":
        self.thread.start()
        return self

    def wait(self) -> subprocess.CompletedProcess:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.build

    def _run(self) -> None:
        try:
            self.engine.start()
            self.build = self._build()
        except BaseException as error:   # noqa: BLE001  (raised again by wait(), in the test that needs the image)
            self.error = error

    def _build(self) -> subprocess.CompletedProcess:
        base = "attention-map-test-base:bookworm"
        if subprocess.run(["docker", "image", "inspect", base], capture_output=True).returncode != 0:
            rootfs = self.folder / "rootfs"
            subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                            "bookworm", str(rootfs), "http://deb.debian.org/debian"], check=True, capture_output=True)
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            subprocess.run(["docker", "import", "-", base], stdin=tar.stdout, check=True, capture_output=True)
            tar.wait()
            shutil.rmtree(rootfs)
        build_args, server = _local_package_index()
        host_ca = Path(os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
                       or "/etc/ssl/certs/ca-certificates.crt")
        context_ca = REPO / "docker" / "certs" / "test-host.crt"     # pip in the build trusts what pip here trusts
        if host_ca.is_file():
            context_ca.write_bytes(host_ca.read_bytes())
        try:
            build = subprocess.run(["docker", "build", "--network", "host", "-f", "docker/Dockerfile",
                                    "--build-arg", f"BASE_IMAGE={base}", *build_args, "-t", TEST_IMAGE, "."],
                                   cwd=REPO, capture_output=True, text=True, timeout=1800)
        finally:
            context_ca.unlink(missing_ok=True)
            if server is not None:
                server.terminate()
        # The compiler stage is not needed once built: its layers go at once, the image after its test.
        subprocess.run(["docker", "builder", "prune", "--all", "--force"], capture_output=True)
        subprocess.run(["docker", "image", "prune", "--force"], capture_output=True)
        return build

    def remove(self) -> None:
        """The image and the engine, after the test."""
        subprocess.run(["docker", "image", "rm", "--force", TEST_IMAGE], capture_output=True)
        subprocess.run(["docker", "system", "prune", "--force"], capture_output=True)
        self.engine.stop()


def docker_root() -> str:
    root = subprocess.run(["docker", "info", "--format", "{{.DockerRootDir}}"], capture_output=True, text=True)
    return root.stdout.strip() or "/"


def _local_package_index():
    """pip's file:// indexes on this machine (where the pinned torch lies), served over HTTP for the build."""
    urls = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.extra-index-url"], capture_output=True,
                          text=True)
    folders = [Path(u[len("file://"):]) for u in urls.stdout.split() if u.startswith("file://")]
    if not folders:
        return [], None
    root = Path(os.path.commonpath([str(f.parent) for f in folders]))
    port = 18000 + os.getpid() % 1000
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory",
                               str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    index = " ".join(f"http://127.0.0.1:{port}/{f.relative_to(root).as_posix()}" for f in folders)
    return ["--build-arg", f"PIP_EXTRA_INDEX_URL={index}", "--build-arg", "PIP_TRUSTED_HOST=127.0.0.1"], server

"""A real one-node Slurm on loopback and a real Docker engine, started for the tests and stopped after them, and the
project's Docker image built on that engine.

They need root and the Debian packages that `.ci/run` installs (slurm-wlm, munge, docker.io, debootstrap).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

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
# sbatch --wait sleeps 2, 8, then 32 s between polls where MinJobAge (300 by default) allows; at 6 it polls every 2 s
MinJobAge=6
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def missing_tools(*names: str) -> list[str]:
    return [name for name in names if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def unmet(*tools: str) -> list[str]:
    """What stops the tests that run `tools`: those not installed, and not being root."""
    missing = missing_tools(*tools)
    return ([f"{', '.join(missing)} not installed"] if missing else []) + (["not root"] if os.geteuid() != 0 else [])


def require(*tools: str) -> None:
    """Skip the test, saying why, where a tool or root is missing; under CI=true fail it instead."""
    import pytest

    problems = unmet(*tools)
    if problems:
        message = f"{'; '.join(problems)} (scripts/install_system_tools.sh installs them, as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


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
    """The image of docker/Dockerfile on a Debian base made here with debootstrap (no registry is reachable), built in
    a thread on a LocalDocker engine: the build spends minutes in pip and on the disk, during which the tests go on.

    The base stands in for the Dockerfile's default, a PyTorch image: it carries the pinned torch and torchvision (with
    what they require) in its system site, taken from this machine's install, which the build then uses rather than
    installing them again (the Dockerfile's venv sees the system site). On a machine whose Python is not the base's,
    the base has no torch and the build installs it from the index."""

    BASE = f"attention-map-test-base:bookworm-torch{metadata.version('torch')}"
    PYTHON = (3, 11)        # Debian bookworm's python3
    SITE = "usr/local/lib/python{}.{}/dist-packages".format(*PYTHON)   # where Debian's python3 finds system packages
    PREINSTALLED = ("torch", "torchvision")
    TAG = "attention-map:test"

    def __init__(self, folder: Path):
        self.folder = folder
        self.engine = LocalDocker(folder)
        self.error: str | None = None
        self._child: subprocess.Popen | None = None      # debootstrap, then docker build: what stop() kills
        self._stopping = False
        self._lock = threading.Lock()       # a step starts before stop() or not at all
        self._thread = threading.Thread(target=self._run, daemon=True)

    @classmethod
    def base_carries_torch(cls) -> bool:
        return sys.version_info[:2] == cls.PYTHON       # the installed wheels are built for this Python

    def start(self) -> "ImageBuild":
        self._thread.start()
        return self

    def wait(self) -> str:
        """The image's tag once it is built; AssertionError with the build's last output if it failed."""
        while self._thread.is_alive():      # in steps: a Ctrl-C that reaches the build's thread still stops the tests
            self._thread.join(timeout=1)
        assert self.error is None, self.error
        return self.TAG

    def stop(self) -> None:
        """Stop a build still running, remove the image and stop the engine if it was started here."""
        with self._lock:
            self._stopping = True
            if self._child is not None and self._child.poll() is None:
                os.killpg(self._child.pid, signal.SIGKILL)      # debootstrap's own children too
        self._thread.join()
        subprocess.run(["docker", "image", "rm", "--force", self.TAG], capture_output=True)
        subprocess.run(["docker", "system", "prune", "--force"], capture_output=True)
        self.engine.stop()

    def _run(self) -> None:
        try:
            self.engine.start()
            self._base()
            self._image()
        except Exception as error:       # the test that waits for the image reports it
            self.error = f"building the Docker image failed: {type(error).__name__}: {error}"

    def _step(self, command: list[str]) -> tuple[int, str]:
        """Run one long step of the build (unless stop() was called), its output kept; returns its exit status and
        output."""
        with self._lock:
            if self._stopping:
                return -1, "stopped"
            self._child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True, start_new_session=True)
        output, _ = self._child.communicate(timeout=1800)
        return self._child.returncode, output

    def _base(self) -> None:
        if subprocess.run(["docker", "image", "inspect", self.BASE], capture_output=True).returncode == 0:
            return
        rootfs = self.folder / "rootfs"
        status, output = self._step(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                                     "bookworm", str(rootfs), "http://deb.debian.org/debian"])
        if status != 0:
            raise RuntimeError(f"debootstrap exited {status}: {output[-3000:]}")
        if self.base_carries_torch():
            _copy_installed(self.PREINSTALLED, rootfs / self.SITE)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", self.BASE], stdin=tar.stdout, check=True, capture_output=True)
        tar.wait()
        shutil.rmtree(rootfs)

    def _image(self) -> None:
        build_args, server = _local_package_index()
        host_ca = Path(os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
                       or "/etc/ssl/certs/ca-certificates.crt")
        context_ca = REPO / "docker" / "certs" / "test-host.crt"     # pip in the build trusts what pip here trusts
        if host_ca.is_file():
            context_ca.write_bytes(host_ca.read_bytes())
        try:
            status, output = self._step(["docker", "build", "--network", "host", "-f", "docker/Dockerfile", "--build-arg",
                                         f"BASE_IMAGE={self.BASE}", *build_args, "-t", self.TAG, "."])
        finally:
            context_ca.unlink(missing_ok=True)
            if server is not None:
                server.terminate()
        # The compiler stage is not needed once built: its layers go at once, the image after the tests, so that
        # the tests after these find the disk as they left it (the image holds the CUDA PyTorch stack, GBs).
        subprocess.run(["docker", "builder", "prune", "--all", "--force"], capture_output=True)
        subprocess.run(["docker", "image", "prune", "--force"], capture_output=True)
        if status != 0:
            free = shutil.disk_usage(_docker_root()).free / 2**30
            self.error = f"docker build exited {status}; {free:.1f} GiB free now\n{output[-6000:]}"


def _copy_installed(names: tuple[str, ...], site: Path) -> None:
    """The installed distributions `names` and every one they require (with the extras they ask for), hard-linked
    (else copied) into the site-packages folder `site`: PyTorch's CUDA build is GBs, which pip would unpack again."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    wanted, done = [(name, frozenset()) for name in names], set()
    while wanted:
        name, extras = wanted.pop()
        if (canonicalize_name(name), extras) in done:
            continue
        done.add((canonicalize_name(name), extras))
        dist = metadata.distribution(name)
        for requirement in map(Requirement, dist.requires or []):
            if requirement.marker is None or any(requirement.marker.evaluate({"extra": extra})
                                                 for extra in ("", *extras)):
                wanted.append((requirement.name, frozenset(requirement.extras)))
        for file in dist.files or []:
            source = Path(dist.locate_file(file))
            if file.parts[0] == ".." or not source.is_file():     # scripts outside the site, files never written
                continue
            target = site / file
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                try:
                    os.link(source, target)
                except OSError:
                    shutil.copy2(source, target)


def _docker_root() -> str:
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

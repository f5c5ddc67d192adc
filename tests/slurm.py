"""A real SLURM cluster on this machine, started by the tests (issue #21).

`start_slurm` writes a one-node slurm.conf into a fresh folder (the node is this host, at 127.0.0.1, with the CPUs
and memory `slurmd -C` reports), starts its own `munged` (a generated key, its socket in that folder), `slurmctld`
and `slurmd` in the foreground as child processes, waits until `sinfo` shows the node idle, and stops all three
(and every job still queued) when the block ends. Nothing outside the folder is written, and nothing listens on
anything but 127.0.0.1 (the two SLURM ports are picked free on 127.0.0.1; munged talks over its unix socket).

`tests/conftest.py` exposes it as the session fixture `slurm`; `slurm_dask_cluster` (conftest) gives a test a
dask-jobqueue `SLURMCluster` whose single-threaded workers run as SLURM batch jobs, and `run_znn` runs a `znn`
command against it in a fresh interpreter::

    def test_train_on_slurm(tmp_path, slurm_dask_cluster):
        cluster = slurm_dask_cluster(jobs=2)             # 2 batch jobs, one worker each, both joined
        run_znn(["train", str(job), "--replicas", "2"], cluster.address, cwd=tmp_path)  # adds --scheduler

The packages are Debian's `slurm-wlm` and `munge`; `.ci/install-slurm` installs them (as root, with apt-get) when
`slurmctld` is missing. The fixture runs that script once if the binaries are absent (not with
ZNN_TEST_SLURM_INSTALL=0), and skips with its reason only when they still are.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.shared import ROOT

INSTALL_SCRIPT = ROOT / ".ci" / "install-slurm"
SBIN_PATH = os.pathsep.join(["/usr/local/sbin", "/usr/sbin", "/sbin"])
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sinfo", "squeue", "sbatch", "scancel", "scontrol")
# What the single-threaded workers need besides the submitter's environment (sbatch exports all of it).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "ZNN_FFTW_PLANNER": "FFTW_ESTIMATE"}


class SlurmUnavailable(Exception):
    """The SLURM or MUNGE binaries are missing and could not be installed: the reason to skip with."""


def _search_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), SBIN_PATH])


def find_binaries() -> dict[str, str]:
    """Full paths of the daemons and clients; raises SlurmUnavailable naming the ones missing."""
    found = {name: shutil.which(name, path=_search_path()) for name in (*DAEMONS, *CLIENTS)}
    missing = sorted(name for name, path in found.items() if path is None)
    if missing:
        raise SlurmUnavailable(f"not installed: {', '.join(missing)}")
    return {name: str(path) for name, path in found.items()}


def ensure_binaries(install: bool = True) -> dict[str, str]:
    """find_binaries, running `.ci/install-slurm` once first if something is missing (and `install`)."""
    try:
        return find_binaries()
    except SlurmUnavailable as missing:
        if not install or os.environ.get("ZNN_TEST_SLURM_INSTALL") == "0" or not INSTALL_SCRIPT.exists():
            raise
        try:
            done = subprocess.run(["bash", str(INSTALL_SCRIPT)], stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"{missing}; .ci/install-slurm did not finish in 900 s") from None
        try:
            return find_binaries()
        except SlurmUnavailable:
            tail = " ".join((done.stdout + done.stderr).split()[-40:])
            raise SlurmUnavailable(f"{missing}, and .ci/install-slurm could not install them "
                                   f"(exit {done.returncode}): {tail}") from None


def _free_ports(count: int) -> list[int]:
    """``count`` different ports free on 127.0.0.1 (all bound at once, then released)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def _node_hardware(slurmd: str) -> dict[str, str]:
    """`slurmd -C`'s node line as keys (CPUs, Boards, SocketsPerBoard, ..., RealMemory): what the node offers."""
    out = subprocess.run([slurmd, "-C"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
                         check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("NodeName="))
    keys = dict(item.split("=", 1) for item in line.split())
    keys.pop("NodeName")
    return keys


def slurm_conf(root: Path, node: str, hardware: dict[str, str], ports: tuple[int, int]) -> str:
    """A one-node slurm.conf: everything under ``root``, no cgroups, no accounting, root runs everything."""
    hw = " ".join(f"{key}={value}" for key, value in hardware.items())
    return "\n".join([
        "ClusterName=znn-test",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={ports[0]}",
        f"SlurmdPort={ports[1]}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root / 'munge' / 'munge.socket'}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool' / 'slurmd-%n'}",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run' / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SwitchType=switch/none",
        "MpiDefault=none",
        "MailProg=/bin/true",
        # one core and its memory per job: two 1-core jobs share the node (select/linear would give each the node)
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "SchedulerType=sched/backfill",
        "ReturnToService=2",
        # fast turnaround for tests: jobs leave squeue soon after they end, cancelled jobs are killed at once
        "MinJobAge=5",
        "KillWait=2",
        "InactiveLimit=0",
        "SlurmdTimeout=60",
        "SlurmctldTimeout=60",
        "MessageTimeout=20",
        f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={node} {hw} State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


@dataclass
class Slurm:
    """A running SLURM cluster of one node: ``env`` is what clients (sinfo, sbatch, dask-jobqueue) need."""

    root: Path
    conf: Path
    env: dict[str, str]
    node: str
    cpus: int
    memory_mb: int
    binaries: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def run(self, name: str, *args: str, timeout: float = 30) -> str:
        """Run a SLURM client (``sinfo``, ``squeue``, ...) against this cluster; its stdout."""
        done = subprocess.run([self.binaries[name], *args], env=self.env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise RuntimeError(f"{name} {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def sinfo(self) -> str:
        """One line per node: name, partition, state, CPUs, memory."""
        return self.run("sinfo", "-h", "-N", "-o", "%N %P %T cpus=%c memory=%mMB").strip()

    def squeue(self) -> list[str]:
        """The queued and running jobs: id, name, state, CPUs, memory, node."""
        out = self.run("squeue", "-h", "-o", "%i %j %T cpus=%C mem=%m %N")
        return [line for line in out.splitlines() if line.strip()]

    def wait_idle(self, timeout: float = 60) -> str:
        """Wait until the node is idle (every job gone from it); its sinfo line."""
        deadline, state = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                state = self.run("sinfo", "-h", "-N", "-o", "%T", timeout=10).strip()
                if state == "idle":
                    return self.sinfo()
            time.sleep(0.2)
        raise TimeoutError(f"node {self.node} not idle after {timeout} s (state {state!r})\n{self.logs()}")

    def cancel_all(self, timeout: float = 30) -> None:
        """scancel every job and wait until squeue is empty."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            jobs = self.run("squeue", "-h", "-o", "%i").split()
            if jobs:
                self.run("scancel", "--full", *jobs)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                if not self.run("squeue", "-h", "-o", "%i").split():
                    return
            time.sleep(0.2)

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.logs()}")

    def logs(self, lines: int = 15) -> str:
        """The last lines of every daemon's log (for error messages)."""
        parts = []
        for path in sorted((self.root / "log").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):  # whatever is left in its process group
        os.killpg(proc.pid, signal.SIGKILL)


def _kill_strays(markers: Sequence[str]) -> list[int]:
    """SIGKILL every process whose environment holds one of ``markers`` (slurmstepd and job processes left
    behind: the daemons' environment, or the submitter's that sbatch hands its jobs); their pids."""
    wanted, killed = {marker.encode() for marker in markers}, []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if wanted & set(environ.split(b"\0")):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed


@contextlib.contextmanager
def start_slurm(timeout: float = 60, install: bool = True) -> Iterator[Slurm]:
    """munged, slurmctld and slurmd of a one-node cluster on 127.0.0.1, stopped (with all jobs) on exit.

    Raises SlurmUnavailable when the binaries are missing (after trying `.ci/install-slurm` if ``install``)."""
    binaries = ensure_binaries(install)
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurmd must run as root to start jobs (SlurmUser=root); the tests run as "
                               f"uid {os.geteuid()}")
    node = socket.gethostname().split(".")[0]
    hardware = _node_hardware(binaries["slurmd"])
    root = Path(tempfile.mkdtemp(prefix="znn-slurm-"))  # short: munged's unix socket path must fit 108 bytes
    for sub in ("munge", "state", "spool", "run", "log"):
        (root / sub).mkdir(mode=0o700)
    conf = root / "slurm.conf"
    ctld_port, slurmd_port = _free_ports(2)
    conf.write_text(slurm_conf(root, node, hardware, (ctld_port, slurmd_port)))
    env = {**os.environ, "SLURM_CONF": str(conf), "ZNN_TEST_SLURM": str(root),
           "PATH": os.pathsep.join([os.environ.get("PATH", ""), SBIN_PATH])}
    for name in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SQUEUE_", "SINFO_")) and k != "SLURM_CONF"]:
        del env[name]  # a test run inside a SLURM job must not hand its job's settings to these clients
    slurm = Slurm(root, conf, env, node, int(hardware["CPUs"]), int(hardware["RealMemory"]), binaries)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)

    def spawn(name: str, *args: str) -> None:
        log = (root / "log" / f"{name}.out").open("wb")
        slurm.procs[name] = subprocess.Popen([binaries[name], *args], env=env, stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    try:
        munge = root / "munge"
        spawn("munged", "--foreground", "--force", f"--socket={munge / 'munge.socket'}", f"--key-file={key}",
              f"--pid-file={munge / 'munged.pid'}", f"--log-file={root / 'log' / 'munged.log'}",
              f"--seed-file={munge / 'munged.seed'}", "--num-threads=2")
        _wait_for(lambda: (munge / "munge.socket").exists(), timeout, "munged socket", slurm)
        spawn("slurmctld", "-D", "-i", "-f", str(conf))  # -i: ignore (absent) saved state
        spawn("slurmd", "-D", "-f", str(conf), "-N", node)
        print(f"SLURM: {slurm.wait_idle(timeout)} (conf {conf})", file=sys.stderr)
        yield slurm
    finally:
        if slurm.procs.get("slurmctld") is not None and slurm.procs["slurmctld"].poll() is None:
            slurm.cancel_all(timeout=15)
        for name in reversed(list(slurm.procs)):
            _stop(slurm.procs[name])
        strays = _kill_strays([f"ZNN_TEST_SLURM={root}", f"SLURM_CONF={conf}"])
        if strays:
            print(f"SLURM: killed {len(strays)} leftover job process(es): {strays}", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)


def _wait_for(ready: Any, timeout: float, what: str, slurm: Slurm) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        slurm._check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout} s\n{slurm.logs()}")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ dask-jobqueue
def jobqueue_settings(slurm: Slurm, log_dir: Path, jobs: int = 2) -> dict[str, Any]:
    """dask configuration ``jobqueue.slurm`` for single-threaded workers, one per batch job, on 127.0.0.1.

    Each job asks for one core and an equal share of the node's memory (whole GiB: dask-jobqueue rounds
    ``--mem`` up to GiB, and a job asking for more than the node has would wait forever)."""
    share_mib = slurm.memory_mb // max(jobs, 1)
    memory = f"{share_mib // 1024}GiB" if share_mib >= 1024 else f"{share_mib}MiB"
    exports = " ".join(f"{k}={v}" for k, v in {**WORKER_ENV, "PYTHONPATH": str(ROOT)}.items())
    return {
        "name": "znn-worker",
        "cores": 1,
        "processes": 1,
        "memory": memory,
        "walltime": "00:10:00",
        "queue": None,
        "account": None,
        "python": sys.executable,
        "interface": "lo",  # workers listen on 127.0.0.1
        "death-timeout": 30,  # a worker whose scheduler is gone exits (its job ends)
        "local-directory": str(log_dir),
        "log-directory": str(log_dir),
        "job-extra-directives": [f"--chdir={log_dir}"],
        "job-script-prologue": [f"export {exports}"],
        "worker-extra-args": ["--nthreads", "1", "--no-dashboard"],
        "scheduler-options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"},
    }


def wait_for_jobs(slurm: Slurm, count: int, timeout: float = 60) -> list[str]:
    """Wait until ``count`` jobs are RUNNING; the squeue lines."""
    deadline, jobs = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        jobs = slurm.squeue()
        if sum(" RUNNING " in line for line in jobs) >= count:
            return jobs
        time.sleep(0.2)
    raise TimeoutError(f"{count} SLURM jobs not running after {timeout} s: {jobs}\n{slurm.logs()}")


def run_znn(args: Sequence[str], scheduler: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m znn.cli ARGS --scheduler SCHEDULER`` in a fresh interpreter (this checkout's znn), in ``cwd``.

    For the SLURM cluster's address (``slurm_dask_cluster(...).scheduler_address``) the command's blocks or
    replicas run in the SLURM jobs' workers; raises on a non-zero exit, with the command's output."""
    env = {**os.environ, **WORKER_ENV, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "znn.cli", *args, "--scheduler", scheduler]
    done = subprocess.run(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode:
        raise AssertionError(f"{' '.join(command)} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


@dataclass
class SlurmDask:
    """A dask-jobqueue SLURMCluster on the test's SLURM, its workers joined: pass ``address`` to ``--scheduler``."""

    cluster: Any  # dask_jobqueue.SLURMCluster
    client: Any  # distributed.Client
    address: str
    jobs: list[str]  # the squeue lines of its batch jobs, once running
    sinfo: str  # the node's sinfo line then

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close(timeout=10)
        self.cluster.close(timeout=30)


def start_slurm_dask(slurm: Slurm, log_dir: Path, jobs: int = 2, timeout: float = 60,
                     **overrides: Any) -> SlurmDask:
    """Submit ``jobs`` worker jobs through dask-jobqueue and wait until they run and their workers joined.

    ``overrides`` replace `jobqueue_settings` as SLURMCluster keywords (``walltime="01:00:00"``, ``memory="4GiB"``).

    Needs SLURM_CONF=slurm.conf in this process's environment (dask-jobqueue runs sbatch and scancel with it)."""
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    if os.environ.get("SLURM_CONF") != str(slurm.conf):
        raise RuntimeError(f"set SLURM_CONF={slurm.conf} first (monkeypatch.setenv)")
    log_dir.mkdir(parents=True, exist_ok=True)
    # keyword arguments, not a dask.config.set around the constructor: the jobs are made later, at scale()
    settings = jobqueue_settings(slurm, log_dir, jobs)
    kwargs = {**{key.replace("-", "_"): value for key, value in settings.items()}, **overrides}
    cluster = SLURMCluster(job_name=kwargs.pop("name"), **kwargs)  # cores=1, processes=1, memory=..., python=...
    client = None
    try:
        client = Client(cluster, timeout=f"{timeout}s")
        cluster.scale(jobs=jobs)
        running = wait_for_jobs(slurm, jobs, timeout)
        try:
            client.wait_for_workers(jobs, timeout=timeout)
        except TimeoutError:
            logs = "\n".join(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:])
                             for path in sorted(log_dir.glob("*.err")))
            raise TimeoutError(f"{jobs} workers did not join in {timeout} s: {running}\n{logs}") from None
        return SlurmDask(cluster, client, cluster.scheduler_address, running, slurm.sinfo())
    except BaseException:
        if client is not None:
            client.close()
        cluster.close()
        raise

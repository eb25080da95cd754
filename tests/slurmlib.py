"""A one-node SLURM cluster on localhost for the tests: munged, slurmctld and slurmd from Debian's
`slurm-wlm` and `munge` packages, each run in the foreground as a child of the test, with their
configuration, state, sockets and logs in one temporary folder and ports picked free."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "srun")
KILL_WAIT = 60  # seconds between SIGTERM and SIGKILL when SLURM ends a job: covers a step and a save

# One node with the machine's 2 CPUs; no cgroups (proctrack/linuxproc, task/none) so it runs in a
# container; the builtin scheduler looking at the queue every 2 s instead of every 60 s.
SLURM_CONF = """\
ClusterName=llavatest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/run/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=debug
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait={kill_wait}
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def missing_binaries() -> list[str]:
    return [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seconds(duration: str) -> int:
    """SLURM's [days-]hours:minutes:seconds."""
    days, _, hms = duration.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


class LocalSlurm:
    def __init__(self, cpus: int = 2):
        # munged wants its socket's folder and every parent searchable by all: not pytest's 0700 tmp.
        self.root = Path(tempfile.mkdtemp(prefix="llava-slurm-"))
        self.root.chmod(0o755)
        for sub in ("run", "state", "spool", "log", "munge"):
            (self.root / sub).mkdir(mode=0o755)
        (self.root / "munge").chmod(0o700)
        self.conf = self.root / "slurm.conf"
        self.conf.write_text(SLURM_CONF.format(root=self.root, ctld_port=free_port(), slurmd_port=free_port(),
                                               kill_wait=KILL_WAIT, cpus=cpus))
        self.procs: dict[str, subprocess.Popen] = {}
        self.jobs: list[int] = []

    # ------------------------------------------------------------------ daemons

    def start(self, timeout: float = 60) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._daemon("munged", "-F", f"--socket={self.root}/run/munge.socket", f"--key-file={key}",
                     f"--log-file={self.root}/log/munged.log", f"--pid-file={self.root}/run/munged.pid",
                     f"--seed-file={self.root}/munge/munged.seed")
        self._wait(lambda: (self.root / "run" / "munge.socket").exists(), "munged's socket", timeout)
        self._daemon("slurmctld", "-D", "-f", str(self.conf))
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, "slurmctld", timeout)
        self._daemon("slurmd", "-D", "-N", "localhost", "-f", str(self.conf))
        self._wait(lambda: "State=IDLE" in self.scontrol("show", "node", "localhost"), "node localhost idle", timeout)

    def _daemon(self, name: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen([name, *args], env=self.env(), stdout=log, stderr=subprocess.STDOUT)

    def _wait(self, condition, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            dead = [name for name, proc in self.procs.items() if proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else "timed out"
                raise AssertionError(f"the local SLURM cluster did not start ({why} waiting for {what}):\n"
                                     + self.logs())
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel the jobs still there, wait for them to end, stop the daemons, remove the folder."""
        try:
            if self.jobs and "slurmctld" in self.procs:
                self.run("scancel", *map(str, self.jobs), check=False)
                deadline = time.monotonic() + KILL_WAIT + 30
                while self.scontrol("show", "node", "localhost", check=False).find("State=IDLE") < 0:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
        finally:
            for name in reversed(list(self.procs)):
                proc = self.procs[name]
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            shutil.rmtree(self.root, ignore_errors=True)

    def logs(self, lines: int = 30) -> str:
        parts = []
        for path in sorted((self.root / "log").iterdir()):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    # ------------------------------------------------------------------ clients

    def env(self, **extra: str) -> dict[str, str]:
        """This environment plus `extra`, without SLURM_ variables of an outer job, pointed at this cluster."""
        merged = {**os.environ, **extra}
        return {**{k: v for k, v in merged.items() if not k.startswith("SLURM_")}, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, env: dict | None = None, cwd: Path | None = None):
        proc = subprocess.run(cmd, env=env or self.env(), cwd=cwd, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def scontrol(self, *args: str, check: bool = True) -> str:
        return self.run("scontrol", *args, check=check).stdout

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str]) -> int:
        job_id = int(self.run("sbatch", "--parsable", *args, cwd=cwd, env=env).stdout.strip().split(";")[0])
        self.jobs.append(job_id)
        return job_id

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, RunTime, ExitCode, ...)."""
        text = self.scontrol("show", "job", "--oneliner", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", text))

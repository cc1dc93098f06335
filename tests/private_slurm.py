"""A private single-node Slurm for the tests: munged, slurmctld and slurmd from Debian's packages
(.ci/setup installs them as root), everything under one directory: config, state, spool, logs,
pid files, munge key and socket. A system munged or Slurm, if any, is never touched.

Each daemon runs in the foreground in a session of its own; its pid is recorded in `pids`, and
stop() cancels the jobs, ends the daemons by those pids, and then any slurmstepd that our slurmd
started (it carries our SLURM_CONF), so that nothing is left behind.

    python tests/private_slurm.py start DIR     # prints `export SLURM_CONF=...`
    python tests/private_slurm.py stop DIR
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scancel", "squeue", "sinfo")


def unavailable() -> str | None:
    """Why a private Slurm cannot run here, or None if it can."""
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root (slurmd runs jobs as their user); CI runs as root"
    missing = [p for p in DAEMONS + CLIENTS if shutil.which(p) is None
               and not os.path.exists(f"/usr/sbin/{p}")]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} missing); .ci/setup installs Debian's slurmctld, "
                f"slurmd, slurm-client and munge when it runs as root")
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateSlurm:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.node = socket.gethostname().split(".")[0]
        self.procs: dict[str, int] = {}

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def _client_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    # -- start ---------------------------------------------------------------------------------
    def _write_config(self) -> None:
        for d in ("etc", "state", "spool", "log", "run", "munge"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o400)
        # At least 4 CPUs whatever the machine has (config_overrides: slurmd takes the configured ones), so that
        # two session jobs of two tasks can run at once, as on a real cluster.
        cpus = max(4, os.cpu_count() or 1)
        self.conf.write_text(f"""\
ClusterName=zpipetest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/run/slurmctld.pid
SlurmdPidFile={self.root}/run/slurmd.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SchedulerType=sched/backfill
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=30
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def _daemon(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=self._client_env())
        log.close()
        self.procs[name] = proc.pid
        (self.root / "pids").write_text(json.dumps(self.procs))

    def start(self, timeout: float = 60.0) -> "PrivateSlurm":
        self._write_config()
        m = self.root / "munge"
        self._daemon("munged", [_exe("munged"), "-F", "--force", f"--socket={self.munge_socket}",
                                f"--key-file={m}/munge.key", f"--pid-file={m}/munged.pid",
                                f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"])
        self._wait(lambda: self.munge_socket.exists(), 10, "munged made no socket")
        self._daemon("slurmctld", [_exe("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        self._daemon("slurmd", [_exe("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)])

        def idle() -> bool:
            res = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                                 env=self._client_env(), timeout=10)
            return res.returncode == 0 and res.stdout.strip() == "idle"

        try:
            self._wait(idle, timeout, "the node did not become idle")
        except Exception:
            self.stop()
            raise
        return self

    def _wait(self, probe, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, pid in self.procs.items():
                if not _alive(pid):
                    raise RuntimeError(f"private Slurm: {name} exited; its log: {self.log(name)[-2000:]}")
            if probe():
                return
            time.sleep(0.3)
        raise RuntimeError(f"private Slurm: {what} within {timeout:g} s; slurmctld log: "
                           f"{self.log('slurmctld')[-1500:]}\nslurmd log: {self.log('slurmd')[-1500:]}")

    def log(self, name: str) -> str:
        texts = []
        for p in (self.root / "log" / f"{name}.out", self.root / "log" / f"{name}.log"):
            if p.exists():
                texts.append(p.read_text(errors="replace"))
        return "\n".join(texts)

    # -- use -------------------------------------------------------------------------------------
    def run(self, *argv: str, timeout: float = 60, cwd=None) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), capture_output=True, text=True, env=self._client_env(), timeout=timeout,
                              cwd=cwd)

    def job_state(self, job: str) -> str:
        """The job's state as squeue knows it while it is there, then `sacct`-less: from scontrol, else GONE."""
        res = self.run("scontrol", "show", "job", "-o", job, timeout=20)
        for field in res.stdout.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "GONE"

    # -- stop ------------------------------------------------------------------------------------
    def stepds(self) -> list[int]:
        """The slurmstepd processes our slurmd started (their environment holds our SLURM_CONF)."""
        mine = f"SLURM_CONF={self.conf}".encode()
        found = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/comm", "rb") as f:
                    if f.read().strip() != b"slurmstepd":
                        continue
                with open(f"/proc/{d}/environ", "rb") as f:
                    if mine in f.read().split(b"\0"):
                        found.append(int(d))
            except OSError:
                continue
        return found

    def stop(self, timeout: float = 45.0) -> list[str]:
        """Cancel every job, end the daemons by their pids; what had to be killed (empty when clean)."""
        if not self.procs and (self.root / "pids").exists():
            self.procs = json.loads((self.root / "pids").read_text())
        killed = []
        if self.procs.get("slurmctld") and _alive(self.procs["slurmctld"]):
            try:
                self.run("scancel", "--full", "--partition=debug", timeout=20)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    res = self.run("squeue", "-h", "-o", "%i", timeout=20)
                    if res.returncode != 0 or not res.stdout.strip():
                        break
                    time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.procs.get(name)
            if pid and _alive(pid):
                os.kill(pid, signal.SIGTERM)
                if not _wait_gone(pid, 15):
                    killed.append(f"{name} ({pid})")
                    os.kill(pid, signal.SIGKILL)
                    _wait_gone(pid, 5)
        for pid in self.stepds():
            killed.append(f"slurmstepd ({pid})")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs = {}
        return killed


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:  # reap it if it is our child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit("usage: private_slurm.py start|stop DIR")
    s = PrivateSlurm(Path(sys.argv[2]))
    if sys.argv[1] == "start":
        why = unavailable()
        if why:
            sys.exit(f"private Slurm: {why}")
        s.start()
        print(f"export SLURM_CONF={s.conf}")
    else:
        left = s.stop()
        print(f"stopped; had to kill: {', '.join(left)}" if left else "stopped")

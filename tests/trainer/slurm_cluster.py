"""A real Slurm cluster on this host for the tests: munged, slurmctld and two slurmd emulating nodes n1 and
n2 (both NodeAddr=127.0.0.1, distinct ports), from a generated slurm.conf in a scratch folder.

Nothing system-wide is used or changed: munged runs with its own key and socket, the daemons listen on free
ports, and client commands find the cluster through the SLURM_CONF variable (`SlurmCluster.env()`). Every
daemon is started in the foreground by us and stopped by its pid in `stop()`.

Needs root (slurmd runs jobs as their user and munged runs as the `munge` user) and the Debian packages
slurmctld, slurmd, slurm-client and munge (`bash scripts/setup.sh --with-cluster` installs them).
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "srun", "scancel")
NODES = ("n1", "n2")
CPUS_PER_NODE = 2


def missing_reason() -> str | None:
    """Why this host cannot run the cluster, or None when it can."""
    missing = [name for name in BINARIES if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]
    if missing:
        return (f"Slurm/munge binaries not installed ({', '.join(missing)}): run `bash scripts/setup.sh "
                "--with-cluster` (Debian packages slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        return "starting munged and slurmd needs root (the CI runs as root)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no `munge` user (install the Debian package munge)"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def slurm_conf(root: Path, munge_socket: Path, ctld_port: int, node_ports: dict[str, int]) -> str:
    """The configuration shown to work on this machine (../shared/environment.md): no cgroups, linuxproc
    process tracking, no accounting; per-node spool, pid and log files through %n."""
    host = socket.gethostname()
    nodes = "\n".join(f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} "
                      f"CPUs={CPUS_PER_NODE} State=UNKNOWN" for name, port in node_ports.items())
    return f"""\
ClusterName=hashmoe-test
# Job ids (and so the trainer's MASTER_PORT = 15000 + id mod 15000) differ between clusters run side by side.
FirstJobId={secrets.randbelow(900_000) + 1000}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
SrunPortRange=60001-60100
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
{nodes}
PartitionName=debug Nodes={','.join(node_ports)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


class SlurmCluster:
    def __init__(self):
        self.processes: dict[str, subprocess.Popen] = {}
        self.root = Path(tempfile.mkdtemp(prefix="hashmoe-slurm-"))
        # munged refuses keys and sockets in folders others may write to, and runs as `munge`, which cannot
        # enter pytest's root-only tmp folders: give it a folder of its own.
        self.munge_dir = Path(tempfile.mkdtemp(prefix="hashmoe-munge-"))
        self.munge_socket = self.munge_dir / "munge.socket"
        self.conf = self.root / "slurm.conf"

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    # ---- start ----------------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> SlurmCluster:
        try:
            self._start_munge()
            for name in ("state", "spool", "run", "log", *(f"spool/{n}" for n in NODES)):
                (self.root / name).mkdir(parents=True, exist_ok=True)
            ctld_port, *node_ports = _free_ports(1 + len(NODES))
            self.conf.write_text(slurm_conf(self.root, self.munge_socket, ctld_port, dict(zip(NODES, node_ports))))
            self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            for node in NODES:
                self._spawn(f"slurmd-{node}", [_binary("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
            self.wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        key = self.munge_dir / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        for path in (self.munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        self.munge_dir.chmod(0o755)  # clients (root) connect to the socket inside
        self._spawn("munged", [_binary("munged"), "-F", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={self.munge_dir / 'munged.pid'}",
                               f"--log-file={self.munge_dir / 'munged.log'}",
                               f"--seed-file={self.munge_dir / 'munged.seed'}"], user=munge.pw_uid,
                    group=munge.pw_gid)
        deadline = time.time() + 10
        while time.time() < deadline:
            encode = subprocess.run([_binary("munge"), "-n", "-S", str(self.munge_socket)], capture_output=True)
            if encode.returncode == 0:
                decode = subprocess.run([_binary("unmunge"), "-S", str(self.munge_socket)], input=encode.stdout,
                                        capture_output=True)
                if decode.returncode == 0:
                    return
            self._check_alive()
            time.sleep(0.1)
        raise RuntimeError(f"munged did not answer on {self.munge_socket}\n{self.log('munged')}")

    def _spawn(self, name: str, command: list[str], user: int | None = None, group: int | None = None) -> None:
        with open(self.root / f"{name}.stdout", "wb") as log:  # the daemon keeps its own copy of the descriptor
            self.processes[name] = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, user=user, group=group,
                extra_groups=[] if user is not None else None, start_new_session=True)

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}\n{self.log(name)}")

    def wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        states = ""
        while time.time() < deadline:
            self._check_alive()
            result = subprocess.run(["sinfo", "--noheader", "--Node", "-o", "%N %t"], capture_output=True,
                                    text=True, env=self.env())
            states = result.stdout + result.stderr
            idle = {line.split()[0] for line in result.stdout.splitlines() if line.split()[1:] == ["idle"]}
            if idle >= set(NODES):
                return
            time.sleep(0.2)
        raise RuntimeError(f"nodes not idle after {timeout:.0f} s: {states}\n{self.log('slurmctld')}")

    # ---- use ------------------------------------------------------------------------------------------
    def scontrol(self, *args: str) -> str:
        result = subprocess.run(["scontrol", *args], capture_output=True, text=True, env=self.env(), timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)}: {result.stderr}")
        return result.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, NodeList, ExitCode, ...)."""
        text = self.scontrol("show", "job", "--oneliner", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for_state(self, job_id: str, states: set[str], timeout: float = 120.0) -> dict[str, str]:
        deadline = time.time() + timeout
        job: dict[str, str] = {}
        while time.time() < deadline:
            job = self.job(job_id)
            if job.get("JobState") in states:
                return job
            if job.get("JobState") in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}:
                raise RuntimeError(f"job {job_id} ended {job.get('JobState')}: {job}")
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f} s: {job}")

    def _cancel_jobs(self, timeout: float = 20.0) -> None:
        def queued() -> list[str]:
            result = subprocess.run(["squeue", "--noheader", "-o", "%i"], capture_output=True, text=True,
                                    env=self.env(), timeout=30)
            return result.stdout.split()

        jobs = queued()
        if jobs:
            subprocess.run(["scancel", "--full", *jobs], env=self.env(), capture_output=True, timeout=30)
        deadline = time.time() + timeout
        while jobs and time.time() < deadline:
            time.sleep(0.2)
            jobs = queued()

    def log(self, name: str) -> str:
        paths = {"munged": self.munge_dir / "munged.log", "slurmctld": self.root / "log" / "slurmctld.log"}
        path = paths.get(name, self.root / "log" / f"{name}.log")
        parts = [p.read_text(errors="replace")[-4000:] for p in (path, self.root / f"{name}.stdout") if p.is_file()]
        return "\n".join(parts)

    # ---- stop -----------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel what is still queued or running, then stop every daemon we started, by pid: slurmd first,
        then slurmctld, then munged."""
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            self._cancel_jobs()
        for name in sorted(self.processes, key=lambda n: ("slurmd" not in n, n == "munged")):
            process = self.processes[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=5)
        self.processes.clear()
        shutil.rmtree(self.munge_dir, ignore_errors=True)
        shutil.rmtree(self.root, ignore_errors=True)

"""Inside a Slurm job: the rendezvous every rank derives alike, and the requeue after a preemption checkpoint.
Used by trainer.parallel.distributed (srun ranks) and trainer.run.loop (requeue); `hashmoe slurm` (trainer.cluster.slurm) submits
the job. See trainer/cluster/slurm.py for the whole picture.

    MASTER_ADDR  the NodeAddr of the first host of the allocation (`scontrol show hostnames
                 $SLURM_JOB_NODELIST`, then `scontrol show node`): node names need not resolve in DNS
    MASTER_PORT  15000 + job id mod 15000 (below Linux's ephemeral range; jobs sharing a node differ)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

PORT_BASE, PORT_SPAN = 15000, 15000


def master_port(job_id: str) -> int:
    return PORT_BASE + int(job_id) % PORT_SPAN


def rendezvous(environ=os.environ, run=subprocess.run) -> tuple[str, int]:
    """(MASTER_ADDR, MASTER_PORT) for the job in `environ`. Without scontrol (e.g. inside a container) the
    first host name is used as it is; export MASTER_ADDR in the job script if it does not resolve."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or ""
    job_id = environ.get("SLURM_JOB_ID", "0")
    first = first_host(nodelist, run)
    return node_address(first, run), master_port(job_id if job_id.isdigit() else "0")


def first_host(nodelist: str, run=subprocess.run) -> str:
    if not nodelist:
        return "127.0.0.1"
    try:
        result = run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
        hosts = result.stdout.split() if result.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        hosts = []
    if hosts:
        return hosts[0]
    # No scontrol: expand the simple forms ourselves ("n1", "n[1-4]", "a,b", "gpu[07,09-12]").
    match = re.match(r"^([^\[,]+)(?:\[([^\]]+)\])?", nodelist)
    prefix, ranges = match.group(1), match.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def node_address(host: str, run=subprocess.run) -> str:
    """The NodeAddr Slurm knows the host by (emulated or multi-homed nodes), else the host name."""
    try:
        result = run(["scontrol", "show", "node", "--oneliner", host], capture_output=True, text=True,
                     timeout=60)
    except (OSError, subprocess.SubprocessError):
        return host
    match = re.search(r"\bNodeAddr=(\S+)", result.stdout) if result.returncode == 0 else None
    return match.group(1) if match else host


def requeue_job(job_id: str, run=subprocess.run) -> bool:
    """Put the job back in the queue (rank 0, after the preemption checkpoint). Slurm then ends the running
    job; the requeued one starts after Slurm's requeue delay and resumes from the checkpoint."""
    print(f"hashmoe: requeueing Slurm job {job_id} (scontrol requeue)", flush=True)
    try:
        result = run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        print(f"hashmoe: warning: could not requeue job {job_id} ({err}); the checkpoint is saved, resubmit "
              "the job to continue", file=sys.stderr, flush=True)
        return False
    if result.returncode != 0:
        print(f"hashmoe: warning: `scontrol requeue {job_id}` failed ({result.stderr.strip()}); the checkpoint "
              "is saved, resubmit the job to continue (only batch jobs submitted with --requeue can be "
              "requeued)", file=sys.stderr, flush=True)
        return False
    return True

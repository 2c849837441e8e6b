"""Process environment, resolved once at start-up: who am I (rank, world size, local rank), where is the
rendezvous, and which backend. Works with no launcher (one process), torchrun, the deepspeed launcher,
`hashmoe launch`, mpirun (OpenMPI variables) and srun (Slurm variables; the rendezvous is derived from the
allocation by trainer.parallel.slurm_env.rendezvous)."""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass

import torch


@dataclass
class ProcessEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str
    slurm_job_id: str | None = None  # set inside a Slurm job: preemption (SIGUSR1) requeues it
    cpus_per_task: int | None = None  # Slurm's --cpus-per-task: the threads each rank may use
    rendezvous: str = ""  # MASTER_ADDR:MASTER_PORT

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def mpi4py_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("mpi4py") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_env(environ=os.environ) -> ProcessEnv:
    """Fill RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from whichever launcher started us."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in environ else environ.get("HASHMOE_LAUNCHER", "env")
    elif "OMPI_COMM_WORLD_RANK" in environ and environ is os.environ and mpi4py_available():
        # DeepSpeed's own MPI discovery (deepspeed.comm.mpi_discovery): rank, world size and local rank from MPI,
        # and the rendezvous host from rank 0's address shared over MPI, so ranks on several hosts need no
        # MASTER_ADDR. The same path `deepspeed --launcher openmpi` relies on.
        from deepspeed.comm.comm import mpi_discovery

        launcher = "mpirun, mpi4py"
        mpi_discovery(distributed_port=int(environ.get("MASTER_PORT", "29500")), verbose=False)
        environ.setdefault("LOCAL_WORLD_SIZE", environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1"))
    elif "OMPI_COMM_WORLD_RANK" in environ:  # without mpi4py: OpenMPI's own variables
        launcher = "mpirun"
        environ["RANK"] = environ["OMPI_COMM_WORLD_RANK"]
        environ["WORLD_SIZE"] = environ["OMPI_COMM_WORLD_SIZE"]
        environ["LOCAL_RANK"] = environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
        environ.setdefault("LOCAL_WORLD_SIZE", environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1"))
        if "MASTER_ADDR" not in environ and environ["WORLD_SIZE"] != environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1"):
            from trainer.errors import UserError

            raise UserError("MASTER_ADDR", "mpirun started ranks on several hosts, and the rendezvous host is unset "
                            "(127.0.0.1 would split the job)", "Install mpi4py (DeepSpeed then finds it), or export "
                            "it to every rank: mpirun -x MASTER_ADDR=<first host> -x MASTER_PORT=29500 ...")
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ and "SLURM_STEP_ID" in environ:
        launcher = "srun"
        environ["RANK"] = environ["SLURM_PROCID"]
        environ["WORLD_SIZE"] = environ["SLURM_NTASKS"]
        environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
        environ.setdefault("LOCAL_WORLD_SIZE", environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
        if "MASTER_ADDR" not in environ or "MASTER_PORT" not in environ:
            from trainer.parallel.slurm_env import rendezvous

            addr, port = rendezvous(environ)
            environ.setdefault("MASTER_ADDR", addr)
            environ.setdefault("MASTER_PORT", str(port))
    else:
        launcher = "none"
        environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        environ.setdefault("MASTER_ADDR", "127.0.0.1")
        environ.setdefault("MASTER_PORT", str(free_port()))
    environ.setdefault("LOCAL_RANK", "0")
    environ.setdefault("MASTER_ADDR", "127.0.0.1")
    environ.setdefault("MASTER_PORT", "29500")
    if environ["MASTER_ADDR"] in ("127.0.0.1", "localhost"):
        environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo off this host's non-loopback interfaces
    world_size = int(environ["WORLD_SIZE"])
    local_world = int(environ.get("LOCAL_WORLD_SIZE", world_size))
    cpus = environ.get("SLURM_CPUS_PER_TASK", "")
    return ProcessEnv(int(environ["RANK"]), world_size, int(environ["LOCAL_RANK"]), local_world, launcher,
                      slurm_job_id=environ.get("SLURM_JOB_ID") or None,
                      cpus_per_task=int(cpus) if cpus.isdigit() else None,
                      rendezvous=f"{environ['MASTER_ADDR']}:{environ['MASTER_PORT']}")


def cpu_threads(env: ProcessEnv, environ=os.environ) -> int:
    """Threads for this rank's CPU ops: OMP_NUM_THREADS where the user or the launcher (torchrun) set it, else
    the cores Slurm gave the task, else this host's cores shared between its local ranks, so that ranks, or
    runs side by side with OMP_NUM_THREADS=1, do not oversubscribe the cores (two 2-thread runs on 2 cores
    stalled each other 50x)."""
    requested = environ.get("OMP_NUM_THREADS", "").strip()
    if requested:
        if not requested.isdigit() or int(requested) < 1:
            from trainer.errors import UserError

            raise UserError("OMP_NUM_THREADS", f"must be a positive number of threads, got {requested!r}",
                            "Set OMP_NUM_THREADS=1 (or more), or unset it to share the cores between the ranks.")
        return int(requested)
    return env.cpus_per_task or max(1, (os.cpu_count() or 1) // max(1, env.local_world_size))


STORE_ENV = "HASHMOE_STORE"  # "launcher": `hashmoe launch` hosts the rendezvous store, no rank does
RENDEZVOUS_TIMEOUT_S = 1800  # how long the ranks wait for each other at start-up (torch's default; not a collective's)


def init_distributed(env: ProcessEnv, collective_timeout_s: float) -> str:
    """Start the process group, then DeepSpeed's view of it; gloo on CPU, NCCL on GPU. Returns the backend.

    The rendezvous store is made here rather than by env://, which would give it the collective timeout: ranks
    that start a few seconds apart (imports on a busy node) must still meet when the timeout is short. Under
    `hashmoe launch` the launcher hosts the store (trainer.run.faults reads the ranks' fault reports from it);
    torchrun's agent hosts its own, reached through env://."""
    import datetime

    import deepspeed
    import deepspeed.ops
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        # DeepSpeed would JIT-compile its shared-memory CPU collective (~1-2 min) at every start.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        torch.set_num_threads(cpu_threads(env))
    else:
        torch.cuda.set_device(env.local_rank)
    backend = "nccl" if use_cuda else "gloo"
    timeout = datetime.timedelta(seconds=collective_timeout_s)
    if not dist.is_initialized():
        # a bound device lets NCCL split communicators; torch 2.6.0 < v < 2.7.1 hang with it (as DeepSpeed knows)
        from packaging.version import Version

        bind = use_cuda and env.world_size > 1 and not Version("2.6.0") < Version(torch.__version__) < Version("2.7.1")
        options = {"device_id": torch.device("cuda", env.local_rank)} if bind else {}
        if env.launcher == "torchrun":
            dist.init_process_group(backend, init_method="env://", timeout=timeout, **options)
        else:
            host, port = env.rendezvous.rsplit(":", 1)
            hosts_store = env.rank == 0 and os.environ.get(STORE_ENV) != "launcher"
            store = dist.TCPStore(host, int(port), env.world_size, is_master=hosts_store,
                                  timeout=datetime.timedelta(seconds=max(RENDEZVOUS_TIMEOUT_S, collective_timeout_s)))
            dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout,
                                    **options)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    return backend


@contextlib.contextmanager
def groups_inherit_timeout():
    """Within: every new process group gets the default group's timeout. torch's new_group() does not inherit
    it (a group made without one gets gloo's 30 minutes or NCCL's 10), and DeepSpeed makes its expert,
    expert-data-parallel and data-parallel groups with new_group(ranks) alone, inside deepspeed.initialize."""
    import torch.distributed as dist

    timeout = group_timeout()
    original = dist.new_group

    def new_group(*args, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = timeout
        return original(*args, **kwargs)

    dist.new_group = new_group
    try:
        yield
    finally:
        dist.new_group = original


def group_timeout(group=None):
    """The timeout a process group's collectives run under (the default group's without `group`)."""
    import torch.distributed as dist

    group = group or dist.group.WORLD
    return group._get_backend(collective_device()).options._timeout


def on_rank0(work, poll_s: float = 1.0):
    """Run `work()` on rank 0 and hand its result to every rank; a UserError there is raised on every rank
    (printed once, by rank 0), so no rank waits for a peer that gave up. The others wait in a small all-reduce
    every `poll_s`, never in one long collective: rank 0's work (verifying a checkpoint of many GB, a slow file
    system) may outlast the collective timeout, while a rank 0 that stopped is still found by it."""
    import threading

    import torch.distributed as dist

    from trainer.errors import UserError

    if not dist.is_initialized():
        return work()
    is_main, world_size = dist.get_rank() == 0, dist.get_world_size()
    outcome = {}
    if is_main:
        def run():
            try:
                outcome["result"] = work()
            except UserError as err:
                outcome["error"] = (err.key, err.problem, err.fix)
            except BaseException as err:  # noqa: BLE001 - re-raised below, after the others heard of it
                outcome["crash"] = err

        worker = threading.Thread(target=run, name="hashmoe-rank0-work", daemon=True)
        worker.start()
    while True:
        done = torch.zeros(1, device=collective_device())
        if is_main:
            worker.join(poll_s)
            done += float(not worker.is_alive())
        if world_size > 1:
            dist.all_reduce(done, op=dist.ReduceOp.MAX)
        if done.item():
            break
    crash = outcome.pop("crash", None)
    box = [(outcome.get("result"), outcome.get("error"), crash is not None)]
    if world_size > 1:
        dist.broadcast_object_list(box, src=0)
    result, error, crashed = box[0]
    if crash is not None:
        raise crash
    if crashed:  # not all_ranks: rank 0 is on its way out and will not meet the others at a barrier
        raise UserError("rank 0", "failed (its traceback is above)", "See rank 0's error")
    if error is not None:
        raise UserError(*error, all_ranks=True)
    return result


def collective_device() -> torch.device:
    """Where a tensor must live to be all-reduced: the rank's GPU under NCCL, the CPU under gloo."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shutdown_distributed(together: bool = True) -> None:
    """Leave the process group before the interpreter exits. A rank whose gloo groups are torn down by the
    interpreter's exit while a peer still talks to them can abort (SIGABRT, "terminate called without an active
    exception"); `together`: wait for every rank first (False when the others may not arrive: a local error)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if together:
        dist.barrier()
    dist.destroy_process_group()


def tool_command(name: str) -> str:
    """How to call a console script of this environment from the user's shell: bare when this environment's
    bin/ is first on PATH (activated), else its path (.venv/bin/tensorboard)."""
    import shutil
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / name
    if not script.exists() or shutil.which(name) == str(script):
        return name
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)

"""`hashmoe slurm`: check a run against the requested allocation, render slurm/hashmoe.sbatch, submit it.

In the job, `srun` starts one rank per task (one per GPU, or `--ntasks-per-node` on CPU); every rank runs
`hashmoe train` on a snapshot of the resolved config and resumes from the run folder's latest checkpoint.
Rank, world size and local rank come from srun's variables (trainer.parallel.distributed.resolve_env); the
rendezvous is derived by trainer.parallel.slurm_env, identically on every rank:

    MASTER_ADDR  the NodeAddr of the first host of the allocation (`scontrol show hostnames
                 $SLURM_JOB_NODELIST`, then `scontrol show node`): node names need not resolve in DNS
    MASTER_PORT  15000 + job id mod 15000 (below Linux's ephemeral range; jobs sharing a node differ)

Preemption: `--signal=USR1@S` makes Slurm send SIGUSR1 to every rank S seconds before the time limit (or an
operator sends it with `scancel --signal=USR1 JOB`). The ranks finish the step, checkpoint, and rank 0 runs
`scontrol requeue $SLURM_JOB_ID` (requeue_job); the requeued job appends to the same log and resumes from
that checkpoint. SIGTERM (`scancel JOB`, the time limit, PreemptMode=CANCEL) checkpoints and stops without
requeueing: requeueing would undo a cancel, and with PreemptMode=REQUEUE Slurm requeues by itself.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trainer.errors import UserError
from trainer.parallel.distributed import tool_command
from trainer.run.config import RunConfig, load_config

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "hashmoe.sbatch"
PREPARE_TEMPLATE = TEMPLATE.with_name("prepare.sbatch")
# Values that end up on #SBATCH lines: no spaces, quotes or newlines (they would change the script).
SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:@%+=/-]+$")
TIME_FORMATS = ("MINUTES", "MINUTES:SECONDS", "HOURS:MINUTES:SECONDS", "DAYS-HOURS", "DAYS-HOURS:MINUTES",
                "DAYS-HOURS:MINUTES:SECONDS")


# ---- submitting ------------------------------------------------------------------------------------------
@dataclass
class SlurmRequest:
    nodes: int = 1
    gpus_per_node: int = 0
    ntasks_per_node: int | None = None  # CPU partitions: ranks per node (default 1); GPU: = gpus_per_node
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    signal_seconds: int = 120
    setup: list[str] = field(default_factory=list)  # shell lines run before srun (module load, source ...)
    srun_args: str = ""  # extra srun options, e.g. --container-image=... (pyxis)
    hashmoe: str | None = None  # command that runs hashmoe on the compute nodes
    template: str | None = None
    allow_config_change: bool = False  # pass --allow-config-change to `hashmoe train` in the job
    # The data preparation job, submitted first when the run's token store is missing (prepare_job False: the
    # training job's rank 0 prepares it, with the GPUs waiting).
    prepare_job: bool = True
    prepare_partition: str | None = None  # default: the training job's partition
    prepare_cpus: int | None = None  # default: cpus_per_task, else 8
    prepare_time: str | None = None  # default: the partition's

    @property
    def tasks_per_node(self) -> int:
        if self.gpus_per_node > 0:
            return self.gpus_per_node
        return self.ntasks_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def time_limit_seconds(value: str) -> int:
    """Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S; 0, UNLIMITED and INFINITE mean no limit."""
    if value.strip().upper() in ("0", "UNLIMITED", "INFINITE"):
        return 2**31
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if not match:
        raise UserError("--time", f"{value!r} is not a Slurm time limit",
                        f"Use one of {', '.join(TIME_FORMATS)}, e.g. --time 2:00:00 or --time 1-00:00:00.")
    days, first, second, third = match.groups()
    first, second, third = int(first), int(second or 0), int(third or 0)
    if days is not None:  # D-H[:M[:S]]
        return int(days) * 86400 + first * 3600 + second * 60 + third
    if match.group(4) is not None:  # H:M:S
        return first * 3600 + second * 60 + third
    return first * 60 + second  # M or M:S


def check_request(config: RunConfig, request: SlurmRequest) -> None:
    """Everything that would make the job fail after waiting in the queue, checked before submitting."""
    for flag, value in (("--nodes", request.nodes), ("--cpus-per-task", request.cpus_per_task),
                        ("--ntasks-per-node", request.ntasks_per_node)):
        if value is not None and value < 1:
            raise UserError(flag, f"got {value}", "Use a positive integer.")
    if request.gpus_per_node < 0:
        raise UserError("--gpus-per-node", f"got {request.gpus_per_node}", "Use 0 for a CPU partition, or the "
                        "number of GPUs per node (one rank per GPU).")
    if request.gpus_per_node > 0 and request.ntasks_per_node not in (None, request.gpus_per_node):
        raise UserError("--ntasks-per-node", f"{request.ntasks_per_node} with --gpus-per-node "
                        f"{request.gpus_per_node}", "On GPUs hashmoe runs one rank per GPU: drop "
                        "--ntasks-per-node (it is set to --gpus-per-node).")
    ep_size = config.parallel.ep_size
    if request.world_size % ep_size:
        per_node = "GPUs" if request.gpus_per_node else "tasks"
        raise UserError("parallel.ep_size", f"{ep_size} does not divide the job's world size {request.world_size} "
                        f"(--nodes {request.nodes} x {request.tasks_per_node} {per_node} per node)",
                        f"Request a multiple of {ep_size} ranks in all, or lower parallel.ep_size in the run config.")
    for flag, value in (("--partition", request.partition), ("--account", request.account), ("--qos", request.qos)):
        if value is not None and not SAFE_VALUE.match(value):
            raise UserError(flag, f"{value!r} holds spaces, quotes or other characters Slurm names do not have",
                            "Give the name as Slurm shows it (sinfo, sacctmgr show assoc).")
    if not 1 <= request.signal_seconds <= 65535:
        raise UserError("--signal-seconds", f"got {request.signal_seconds}", "Use 1 to 65535 seconds (Slurm's range).")
    if request.time is not None:
        limit = time_limit_seconds(request.time)
        if request.signal_seconds >= limit:
            raise UserError("--signal-seconds", f"{request.signal_seconds} s is not shorter than --time "
                            f"{request.time} ({limit} s)", "Warn the job earlier than its end: lower "
                            "--signal-seconds or raise --time.")
    for line in request.setup:
        if "\n" in line:
            raise UserError("--setup", "holds a newline", "Pass each shell line as its own --setup.")
    for flag, value in (("--srun-args", request.srun_args), ("--hashmoe", request.hashmoe or "")):
        if "\n" in value:
            raise UserError(flag, "holds a newline", "Give the options on one line (they go on srun's line).")
    template = Path(request.template) if request.template else TEMPLATE
    if not template.is_file():
        raise UserError("--template", f"{template} not found", "Pass an sbatch template (see slurm/hashmoe.sbatch).")
    if request.prepare_cpus is not None and request.prepare_cpus < 1:
        raise UserError("--prepare-cpus", f"got {request.prepare_cpus}", "Use a positive number of CPUs.")
    if request.prepare_partition is not None and not SAFE_VALUE.match(request.prepare_partition):
        raise UserError("--prepare-partition", f"{request.prepare_partition!r} holds spaces, quotes or other "
                        "characters Slurm names do not have", "Give the name as Slurm shows it (sinfo).")
    if request.prepare_time is not None:
        time_limit_seconds(request.prepare_time)


@dataclass
class RenderedJob:
    script: str
    run_dir: Path  # absolute
    config_snapshot: Path  # RUN_DIR/slurm/SUBMISSION/run.yaml, what every rank (and every requeue) trains from
    script_path: Path  # RUN_DIR/slurm/SUBMISSION/job.sbatch
    log_dir: Path  # RUN_DIR/slurm: %j.out (rank output) and %j.err (errors, progress bars)
    snapshot_text: str


def hashmoe_command(request: SlurmRequest) -> str:
    """What runs hashmoe on the compute nodes: --hashmoe, else this Python with the checkout's trainer."""
    return request.hashmoe or f"{shlex.quote(sys.executable)} -m trainer.cli"


def site_setup(request: SlurmRequest) -> str:
    return "\n".join(request.setup) if request.setup else "# (none: pass --setup 'module load ...')"


def render(config: RunConfig, request: SlurmRequest, workdir: Path | None = None) -> RenderedJob:
    workdir = (workdir or Path.cwd()).resolve()
    run_dir = (workdir / config.run_dir).resolve()
    log_dir = run_dir / "slurm"
    # Each submission keeps its own config and script: a job still pending trains from what was submitted with
    # it, whatever a later submission into the same folder says.
    submission = log_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    snapshot = submission / "run.yaml"
    resolved = config.to_dict()
    resolved["run"]["output_dir"] = str(run_dir)
    hashmoe = hashmoe_command(request)
    # singleton: Slurm runs one job of this name (one per run folder) and user at a time; a second submission
    # waits for the first to end instead of racing it for the folder
    sbatch = [f"--job-name={job_name(run_dir)}", "--dependency=singleton", f"--nodes={request.nodes}",
              f"--ntasks-per-node={request.tasks_per_node}"]
    if request.gpus_per_node:
        sbatch.append(f"--gpus-per-node={request.gpus_per_node}")
    if request.cpus_per_task:
        sbatch.append(f"--cpus-per-task={request.cpus_per_task}")
    for name in ("partition", "account", "qos", "time"):
        if getattr(request, name):
            sbatch.append(f"--{name}={getattr(request, name)}")
    values = {
        "sbatch_options": "\n".join(f"#SBATCH {option}" for option in sbatch),
        "output": shlex.quote(str(log_dir / "%j.out")),
        "error": shlex.quote(str(log_dir / "%j.err")),
        "signal_seconds": str(request.signal_seconds),
        "workdir": shlex.quote(str(workdir)),
        "site_setup": site_setup(request),
        "srun_args": request.srun_args.strip(),
        "train_command": f"{hashmoe} train {shlex.quote(str(snapshot))}"
                         + (" --allow-config-change" if request.allow_config_change else ""),
        "run_dir": shlex.quote(str(run_dir)),
        "world_size": str(request.world_size),
    }
    template = Path(request.template) if request.template else TEMPLATE
    script = fill_template(template.read_text(), values, template)
    return RenderedJob(script, run_dir, snapshot, submission / "job.sbatch", log_dir,
                       yaml.safe_dump(resolved, sort_keys=False))


def prepare_cpus(request: SlurmRequest) -> int:
    return request.prepare_cpus or request.cpus_per_task or 8


def render_prepare(config: RunConfig, request: SlurmRequest, job: RenderedJob,
                   workdir: Path | None = None) -> tuple[str, Path]:
    """The data preparation job (one task, CPUs only) for the same config snapshot: (script, its path)."""
    workdir = (workdir or Path.cwd()).resolve()
    hashmoe = hashmoe_command(request)
    sbatch = [f"--job-name=prep-{job_name(job.run_dir)}", "--nodes=1", "--ntasks=1",
              f"--cpus-per-task={prepare_cpus(request)}"]
    partition = request.prepare_partition or request.partition
    for name, value in (("partition", partition), ("account", request.account), ("qos", request.qos),
                        ("time", request.prepare_time)):
        if value:
            sbatch.append(f"--{name}={value}")
    values = {
        "sbatch_options": "\n".join(f"#SBATCH {option}" for option in sbatch),
        "output": shlex.quote(str(job.log_dir / "prepare-%j.out")),
        "error": shlex.quote(str(job.log_dir / "prepare-%j.err")),
        "workdir": shlex.quote(str(workdir)),
        "site_setup": site_setup(request),
        "prepare_command": f"{hashmoe} prepare {shlex.quote(str(job.config_snapshot))}",
    }
    return fill_template(PREPARE_TEMPLATE.read_text(), values, PREPARE_TEMPLATE), job.script_path.with_name(
        "prepare.sbatch")


def fill_template(text: str, values: dict[str, str], source: Path) -> str:
    unknown = sorted(set(re.findall(r"\{\{(\w+)\}\}", text)) - set(values))
    if unknown:
        raise UserError("--template", f"{source} uses unknown fields {', '.join(unknown)}",
                        f"Use only {', '.join('{{' + k + '}}' for k in sorted(values))}.")
    text = re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], text)
    text = re.sub(r" {2,}\\\n", " \\\n", text)  # an empty field left two spaces before a line continuation
    return re.sub(r"[ \t]+\n", "\n", text)


def job_name(run_dir: Path) -> str:
    """One name per run folder (`--dependency=singleton` keys on it): the folder's name, readable in squeue,
    and a digest of its absolute path, so two folders of the same name do not wait for each other."""
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"hashmoe-{Path(run_dir).name[:40]}-{digest}")


def submit(job: RenderedJob, run=subprocess.run, environ=None,
           prepare: tuple[str, Path] | None = None) -> tuple[str, str | None]:
    """Write the config snapshot and the script(s) into RUN_DIR/slurm/ and submit; returns the training job's
    id and the preparation job's. With `prepare` (its script and path), that job is submitted first and training
    waits for its success."""
    sbatch = shutil.which("sbatch", path=(environ or os.environ).get("PATH"))
    if sbatch is None:
        raise UserError("sbatch", "not found on PATH", "Run `hashmoe slurm` on a Slurm login node (or load the "
                        "site's slurm module), or use --dry-run to see the job script.")
    job.log_dir.mkdir(parents=True, exist_ok=True)  # Slurm opens the logs before the script runs
    job.config_snapshot.parent.mkdir(parents=True, exist_ok=True)
    job.config_snapshot.write_text(job.snapshot_text)
    job.script_path.write_text(job.script)
    prepare_id, dependency = None, []
    if prepare is not None:
        prepare[1].write_text(prepare[0])
        prepare_id = sbatch_script(sbatch, prepare[1], [], run, environ)
        # a failed preparation cancels the training job (else it would stay pending, DependencyNeverSatisfied)
        # (on the command line, this replaces the script's --dependency=singleton: both are kept)
        dependency = [f"--dependency=afterok:{prepare_id},singleton", "--kill-on-invalid-dep=yes"]
    return sbatch_script(sbatch, job.script_path, dependency, run, environ), prepare_id


def sbatch_script(sbatch: str, script: Path, options: list[str], run, environ) -> str:
    result = run([sbatch, "--parsable", *options, str(script)], capture_output=True, text=True, env=environ,
                 timeout=120)
    if result.returncode != 0:
        raise UserError("sbatch", f"refused the job: {result.stderr.strip() or result.stdout.strip()}",
                        f"Fix the option it names (the script is in {script}).")
    job_id = result.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise UserError("sbatch", f"answered {result.stdout.strip()!r}, not a job id", "Check the Slurm client.")
    return job_id


def slurm_command(config_path: str, overrides: list[str], output: str | None, request: SlurmRequest,
                  dry_run: bool) -> int:
    from trainer.data.prepare import store_paths
    from trainer.run.plan import plan_run

    config = load_config(config_path, overrides, output)  # config errors first, before anything else
    check_request(config, request)
    job = render(config, request)
    # checked now: a run folder trained with another model shape would fail only once the job starts
    resumes = plan_run(config, allow_config_change=request.allow_config_change).checkpoint
    store = store_paths(config.data, config.run.seed)
    prepare = render_prepare(config, request, job) if request.prepare_job and not store.complete() else None
    if dry_run:
        if prepare is not None:
            print(prepare[0], end="")
            print(f"# hashmoe: the data store {store.target} is missing: the job above prepares it, and the "
                  "training job below waits for it (--dependency=afterok)\n", flush=True)
        print(job.script, end="")
        print(f"# hashmoe: dry run, nothing submitted. Would write {job.config_snapshot} (the resolved config) "
              f"and {job.script_path}, then run: sbatch --parsable {job.script_path}"
              + (f"\n# the job would resume from {resumes}" if resumes is not None else ""), flush=True)
        return 0
    job_id, prepare_id = submit(job, prepare=prepare)
    if prepare_id is not None:
        print(f"hashmoe: the data store {store.target} is missing: job {prepare_id} ({prepare_cpus(request)} CPUs) "
              f"prepares it (log: {job.log_dir}/prepare-{prepare_id}.out); training starts when it succeeds",
              flush=True)
    if resumes is not None:
        print(f"hashmoe: the job resumes from {resumes}", flush=True)
    per_node = f"{request.gpus_per_node} GPUs" if request.gpus_per_node else f"{request.tasks_per_node} tasks"
    log = job.log_dir / f"{job_id}.out"
    print(f"hashmoe: submitted job {job_id}: {request.nodes} node(s) x {per_node} = {request.world_size} ranks, "
          f"run folder {job.run_dir}\n"
          f"  queue:       squeue -j {job_id}\n"
          f"  log:         tail -f {log}   (errors and progress: {job.log_dir / f'{job_id}.err'})\n"
          f"  TensorBoard: {tool_command('tensorboard')} --logdir {job.run_dir / 'tb'}\n"
          f"  stop:        scancel {job_id}   (checkpoints, then stops; resubmit to continue)\n"
          f"  one at a time: job name {job_name(job.run_dir)} with --dependency=singleton: it starts only once no "
          "other job of that name (this run folder) is running, and its config is its own "
          f"({job.config_snapshot})", flush=True)
    return 0

"""`hashmoe slurm` without a cluster: the rendered script, argument checks, submission through a fake sbatch,
and the rendezvous (MASTER_ADDR / MASTER_PORT) derived from Slurm's variables through a fake scontrol."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

from trainer.cli import main
from trainer.cluster.slurm import SlurmRequest, check_request, job_name, render, time_limit_seconds
from trainer.errors import UserError
from trainer.parallel.distributed import cpu_threads, resolve_env
from trainer.parallel.slurm_env import master_port, rendezvous
from trainer.run.config import load_config

ROOT = Path(__file__).resolve().parents[3]
TINY_EP2 = str(ROOT / "recipes" / "tiny-ep2.yaml")


def sbatch_lines(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_gpu_job_runs_one_rank_per_gpu_and_is_requeueable(tmp_path):
    config = load_config(TINY_EP2)
    job = render(config, SlurmRequest(nodes=2, gpus_per_node=4, partition="gpu", account="proj1", qos="high",
                                      time="1-00:00:00", signal_seconds=300, setup=["module load cuda/12.4"],
                                      srun_args="--container-image=hashmoe:latest"), workdir=tmp_path)
    run_dir = tmp_path / "runs" / "tiny-ep2"
    assert sbatch_lines(job.script) == [
        f"--job-name={job_name(run_dir)}", "--dependency=singleton", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4",
        "--partition=gpu", "--account=proj1", "--qos=high", "--time=1-00:00:00",
        f"--output={run_dir}/slurm/%j.out", f"--error={run_dir}/slurm/%j.err", "--open-mode=append",
        "--requeue", "--signal=USR1@300", f"--chdir={tmp_path}"]
    lines = job.script.splitlines()
    assert "module load cuda/12.4" in lines
    srun = lines.index(next(line for line in lines if line.startswith("srun ")))
    assert lines[srun] == "srun --kill-on-bad-exit=1 --container-image=hashmoe:latest \\"
    assert lines[srun + 1].strip().endswith(f"-m trainer.cli train {job.config_snapshot}")
    # the submitting shell's launcher variables are dropped before srun starts the ranks
    unset = lines.index(next(line for line in lines if line.startswith("unset RANK WORLD_SIZE")))
    assert unset < lines.index("module load cuda/12.4") < srun  # site setup may export its own MASTER_ADDR
    assert "{{" not in job.script
    # the job trains from a snapshot of the resolved config, its run folder made absolute
    # (one folder per submission: a pending job's snapshot is never overwritten by the next submission)
    assert job.config_snapshot.name == "run.yaml" and job.config_snapshot.parents[1] == run_dir / "slurm"
    assert job.script_path == job.config_snapshot.with_name("job.sbatch")
    assert render(config, SlurmRequest(), workdir=tmp_path).config_snapshot != job.config_snapshot
    assert f"output_dir: {run_dir}" in job.snapshot_text and "ep_size: 2" in job.snapshot_text


def test_cpu_job_takes_the_tasks_per_node_and_no_gpus(tmp_path):
    job = render(load_config(TINY_EP2), SlurmRequest(nodes=1, gpus_per_node=0, ntasks_per_node=2, cpus_per_task=1),
                 workdir=tmp_path)
    options = sbatch_lines(job.script)
    assert options[:5] == [f"--job-name={job_name(tmp_path / 'runs' / 'tiny-ep2')}", "--dependency=singleton",
                           "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"]
    assert not any(o.startswith(("--gpus", "--partition", "--time")) for o in options)
    assert "srun --kill-on-bad-exit=1 \\" in job.script.splitlines()


@pytest.mark.parametrize("request_args,key,words", [
    (dict(nodes=1, gpus_per_node=0, ntasks_per_node=3), "parallel.ep_size", "does not divide the job's world size 3"),
    (dict(nodes=3, gpus_per_node=1), "parallel.ep_size", "--nodes 3 x 1 GPUs per node"),
    (dict(nodes=1, gpus_per_node=4, ntasks_per_node=2), "--ntasks-per-node", "drop --ntasks-per-node"),
    (dict(nodes=0, gpus_per_node=2), "--nodes", "got 0"),
    (dict(gpus_per_node=-1), "--gpus-per-node", "Use 0 for a CPU partition"),
    (dict(gpus_per_node=2, time="2 hours"), "--time", "not a Slurm time limit"),
    (dict(gpus_per_node=2, time="1"), "--signal-seconds", "120 s is not shorter than --time 1 (60 s)"),
    (dict(gpus_per_node=2, signal_seconds=0), "--signal-seconds", "1 to 65535"),
    (dict(gpus_per_node=2, partition="gpu\n#SBATCH --x"), "--partition", "spaces, quotes"),
    (dict(gpus_per_node=2, template="/nonexistent.sbatch"), "--template", "not found"),
    (dict(gpus_per_node=2, srun_args="--x\nrm -rf /"), "--srun-args", "newline"),
])
def test_bad_requests_are_refused_naming_the_flag(request_args, key, words):
    with pytest.raises(UserError) as err:
        check_request(load_config(TINY_EP2), SlurmRequest(**request_args))
    assert err.value.key == key and words in str(err.value), str(err.value)


@pytest.mark.parametrize("value,seconds", [("30", 1800), ("30:15", 1815), ("2:00:00", 7200), ("1-0", 86400),
                                           ("1-2:30", 95400), ("2-00:00:10", 172810),
                                           ("UNLIMITED", 2**31), ("0", 2**31)])
def test_time_limit_formats(value, seconds):
    assert time_limit_seconds(value) == seconds


def fake_tool(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_dry_run_prints_the_script_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["slurm", TINY_EP2, "--gpus-per-node", "0", "--ntasks-per-node", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash\n") and "#SBATCH --ntasks-per-node=2" in out and "dry run" in out
    assert not (tmp_path / "runs").exists()


def fake_sbatch(tmp_path: Path, monkeypatch, answer: str) -> None:
    """An sbatch on PATH that appends its arguments to tmp_path/sbatch.args and answers `answer`; cwd tmp_path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_tool(bin_dir, "sbatch", f'echo "$@" >> {tmp_path}/sbatch.args\necho "{answer}"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)


def test_submit_calls_sbatch_and_says_how_to_follow_the_job(tmp_path, capsys, monkeypatch):
    fake_sbatch(tmp_path, monkeypatch, "4242;cluster")
    assert main(["slurm", TINY_EP2, "--gpus-per-node", "2", "--set", "optim.max_steps=7"]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "tiny-ep2"
    assert "submitted job 4242: 1 node(s) x 2 GPUs = 2 ranks" in out
    assert "squeue -j 4242" in out and f"tail -f {run_dir}/slurm/4242.out" in out
    assert f"tensorboard --logdir {run_dir}/tb" in out
    [submission] = [p for p in (run_dir / "slurm").iterdir() if p.is_dir()]
    # no token store yet (data_cache/ here is empty): the preparation job first, training waits for it (and for
    # any other job of this run folder: singleton)
    assert [line.split() for line in (tmp_path / "sbatch.args").read_text().splitlines()] == [
        ["--parsable", str(submission / "prepare.sbatch")],
        ["--parsable", "--dependency=afterok:4242,singleton", "--kill-on-invalid-dep=yes",
         str(submission / "job.sbatch")]]
    assert "job 4242 (8 CPUs) prepares it" in out
    assert f"job name {job_name(run_dir)} with --dependency=singleton" in out
    prepare_script = (submission / "prepare.sbatch").read_text()
    assert "#SBATCH --cpus-per-task=8" in prepare_script and "gpus" not in prepare_script
    assert f"-m trainer.cli prepare {submission / 'run.yaml'}" in prepare_script
    assert "max_steps: 7" in (submission / "run.yaml").read_text()  # overrides are in the snapshot


def test_no_preparation_job_when_the_store_exists_or_is_declined(tmp_path, capsys, monkeypatch):
    from trainer.data import prepare_data

    fake_sbatch(tmp_path, monkeypatch, "77")
    task = ["--set", "data.dataset=random_walk", "--set", "data.seq_len=64"]
    assert main(["slurm", TINY_EP2, "--gpus-per-node", "2", "--no-prepare-job", *task]) == 0
    prepare_data(load_config(TINY_EP2, task[1::2]).data, load_config(TINY_EP2).run.seed)
    assert main(["slurm", TINY_EP2, "--gpus-per-node", "2", *task, "--allow-config-change"]) == 0
    calls = (tmp_path / "sbatch.args").read_text().splitlines()
    assert len(calls) == 2 and all(call.endswith("job.sbatch") and "dependency" not in call for call in calls)
    # two submissions, two snapshots: the first job's config is its own even while it waits
    assert len([p for p in (tmp_path / "runs" / "tiny-ep2" / "slurm").iterdir() if p.is_dir()]) == 2
    assert "prepares it" not in capsys.readouterr().out


def test_config_errors_come_before_any_submission(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(TINY_EP2).read_text().replace("ep_size: 2", "ep_size: 3"))
    assert main(["slurm", str(bad), "--gpus-per-node", "2"]) == 2
    assert "parallel.ep_size: 3 does not divide model.num_experts=8" in capsys.readouterr().err


def test_sbatch_missing_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["slurm", TINY_EP2, "--gpus-per-node", "2"]) == 2
    assert "sbatch: not found on PATH" in capsys.readouterr().err


def fake_scontrol(tmp_path: Path) -> Path:
    """scontrol that knows a 3-node allocation whose names do not resolve, each with a NodeAddr."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake_tool(bin_dir, "scontrol", """\
case "$1 $2" in
  "show hostnames") printf 'gpu07\\ngpu09\\ngpu10\\n' ;;
  "show node") echo "NodeName=$4 Arch=x86_64 CoresPerSocket=8 NodeAddr=10.1.0.$(echo $4 | tr -dc 0-9 | sed 's/^0*//') NodeHostName=$4" ;;
  *) exit 1 ;;
esac
""")
    return bin_dir


def test_rendezvous_is_the_first_nodes_address_and_a_port_from_the_job_id(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{fake_scontrol(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    environ = {"SLURM_JOB_NODELIST": "gpu[07,09-10]", "SLURM_JOB_ID": "123456"}
    assert rendezvous(environ) == ("10.1.0.7", 15000 + 123456 % 15000)
    assert master_port("15000") == master_port("30000") == 15000


def test_rendezvous_without_scontrol_takes_the_first_host_name():
    def missing(*args, **kwargs):
        raise FileNotFoundError("scontrol")

    assert rendezvous({"SLURM_JOB_NODELIST": "gpu[07,09-10]", "SLURM_JOB_ID": "9"}, run=missing) == ("gpu07", 15009)
    assert rendezvous({"SLURM_JOB_NODELIST": "node-a,node-b", "SLURM_JOB_ID": "9"}, run=missing)[0] == "node-a"


def test_srun_ranks_get_rank_world_size_and_rendezvous_from_slurm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{fake_scontrol(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    environ = {"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "1",
               "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_ID": "777", "SLURM_JOB_NODELIST": "gpu[07,09-10]",
               "SLURM_CPUS_PER_TASK": "3"}
    env = resolve_env(environ)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.launcher) == (5, 6, 1, 2, "srun")
    assert (env.slurm_job_id, env.cpus_per_task) == ("777", 3)
    assert (environ["MASTER_ADDR"], environ["MASTER_PORT"]) == ("10.1.0.7", "15777")
    # a site that exports its own rendezvous keeps it
    environ = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "1",
               "MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "1234"}
    resolve_env(environ)
    assert (environ["MASTER_ADDR"], environ["MASTER_PORT"]) == ("10.9.9.9", "1234")


def test_cpu_threads_follow_omp_num_threads_then_slurm_then_the_cores_per_local_rank():
    slurm_task = resolve_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "1",
                              "SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "3",
                              "MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "1234"})
    assert cpu_threads(slurm_task, {}) == 3
    assert cpu_threads(slurm_task, {"OMP_NUM_THREADS": "1"}) == 1  # two runs side by side, one thread each
    local_ranks = resolve_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
    assert cpu_threads(local_ranks, {}) == max(1, (os.cpu_count() or 1) // 2)
    with pytest.raises(UserError, match="OMP_NUM_THREADS.*positive"):
        cpu_threads(local_ranks, {"OMP_NUM_THREADS": "0"})


def test_requeue_failure_is_a_warning_not_a_crash(capsys):
    from trainer.parallel.slurm_env import requeue_job

    def refused(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "Requested operation is presently disabled")

    assert requeue_job("55", run=refused) is False
    assert "resubmit the job" in capsys.readouterr().err


def test_a_run_folder_of_another_model_is_refused_before_submitting(tmp_path, capsys, monkeypatch):
    """The job would resume from the folder's checkpoint: a different model shape fails now, not in the job."""
    run_dir = tmp_path / "runs" / "tiny-ep2"
    (run_dir / "checkpoints" / "step_5").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_5" / "hashmoe_state.json").write_text(
        '{"step": 5, "model_config": {"num_experts": 4}}')
    (run_dir / "checkpoints" / "latest").write_text("step_5")
    (run_dir / "config.yaml").write_text("model:\n  num_experts: 4\n")
    monkeypatch.chdir(tmp_path)
    assert main(["slurm", TINY_EP2, "--gpus-per-node", "2", "--dry-run"]) == 2
    assert "model.num_experts 4 -> 8" in capsys.readouterr().err  # another config than the folder's
    assert main(["slurm", TINY_EP2, "--gpus-per-node", "2", "--dry-run", "--allow-config-change"]) == 2
    assert "model.num_experts: the checkpoint in" in capsys.readouterr().err  # and a shape no resume can change

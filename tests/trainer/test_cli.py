"""Tests of the `hashmoe` command line: help and version, and configuration errors that exit with code 2 and
print one `hashmoe: error: KEY: ...` line (a traceback only with --debug). None of these runs gets as far as
training: the errors are raised before the process group starts, except a missing data file, which rank 0
finds when it prepares the data, right after the (one-process) group has started.

The error cases run as real `hashmoe` subprocesses. Each one imports torch, transformers and the model code
(3-9 s of CPU apiece), so the cases of one test session start together, a few at a time, in a
module fixture; the launch checks that need no subprocess run in-process through `trainer.cli.main`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainer import __version__
from trainer import cli as cli_module

ROOT = Path(__file__).resolve().parents[2]
HASHMOE_SCRIPT = Path(sys.executable).parent / "hashmoe"
HASHMOE = [str(HASHMOE_SCRIPT)] if HASHMOE_SCRIPT.is_file() else [sys.executable, "-m", "trainer.cli"]
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID",
                      "SLURM_NTASKS", "SLURM_STEP_ID")
MAX_CONCURRENT = 3


def hashmoe(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """`hashmoe ARGS` in the repository root, as one process outside any launcher (world size 1)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    result = subprocess.run([*HASHMOE, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    result.seconds = time.perf_counter() - start
    return result


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("hashmoe: error:")]


# ---- help and version ---------------------------------------------------------------------------------
def test_help_lists_the_commands():
    result = hashmoe("--help")
    assert result.returncode == 0, result.stderr
    for command in ("train", "launch", "export", "push"):
        assert command in result.stdout
    assert "hashmoe train recipes/tiny.yaml" in result.stdout  # the examples


def test_no_command_prints_help():
    result = hashmoe()
    assert result.returncode == 0 and "train" in result.stdout and "launch" in result.stdout


def test_version():
    result = hashmoe("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"hashmoe {__version__}"


def test_train_help_explains_the_options():
    result = hashmoe("train", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--set", "KEY=VALUE", "--output", "--resume", "RUN.yaml"):
        assert option in result.stdout
    assert "override a config key" in result.stdout and "require a checkpoint" in result.stdout


def test_launch_requires_nproc():
    result = hashmoe("launch", "--help")
    assert result.returncode == 0 and "--nproc" in result.stdout
    result = hashmoe("launch", "recipes/tiny.yaml")
    assert result.returncode == 2 and "--nproc" in result.stderr  # argparse usage error


# ---- configuration errors as subprocesses: exit 2, one line naming the key, no traceback ---------------
@dataclass
class Case:
    args: list[str]  # "{tmp}" is the case's temporary folder; --output {tmp}/run is appended
    key: str
    fragments: tuple[str, ...]
    debug: bool = False  # --debug: a traceback is printed as well
    after_group_start: bool = False  # raised once the process group has started (config.yaml may be saved)
    imports_deepspeed: bool = False  # raised in trainer.run.loop.train, after `import deepspeed`


CASES = {
    "unknown_key": Case(["train", "recipes/tiny.yaml", "--set", "optim.lrr=1e-3"], "optim.lrr",
                        ("unknown key", "Valid keys here: ", "max_steps")),
    "wrong_type": Case(["train", "recipes/tiny.yaml", "--set", "optim.max_steps=ten"], "optim.max_steps",
                       ("expected int, got 'ten'",)),
    "ep_size_not_dividing_num_experts": Case(["train", "recipes/tiny.yaml", "--set", "parallel.ep_size=3"],
                                             "parallel.ep_size", ("3 does not divide model.num_experts=8",
                                                                  "Pick an ep_size that divides num_experts")),
    "missing_config_file": Case(["train", "{tmp}/nope.yaml"], "{tmp}/nope.yaml",
                                ("run config file not found", "recipes/")),
    "missing_data_file": Case(["train", "recipes/tiny.yaml", "--set", "data.dataset=files",
                               "--set", "data.train_files=[{tmp}/missing.txt]"], "data.train_files",
                              ("'{tmp}/missing.txt' does not exist", "Fix the path"),
                              after_group_start=True, imports_deepspeed=True),
    "ep_size_2_in_one_process": Case(["train", "recipes/tiny.yaml", "--set", "parallel.ep_size=2"],
                                     "parallel.ep_size", ("2 does not divide the world size 1",),
                                     imports_deepspeed=True),
    "launch_ep_size_not_dividing_num_experts": Case(
        ["launch", "recipes/tiny.yaml", "--nproc", "2", "--set", "parallel.ep_size=3"], "parallel.ep_size",
        ("3 does not divide model.num_experts=8",)),
    "debug_traceback": Case(["--debug", "train", "recipes/tiny.yaml", "--set", "optim.lrr=1"], "optim.lrr",
                            ("unknown key",), debug=True),
}


@pytest.fixture(scope="module")
def cli_runs(request, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Runs the selected CASES, MAX_CONCURRENT at a time: name -> (temporary folder, completed process)."""
    selected = {item.callspec.params["case"] for item in request.session.items
                if getattr(item, "callspec", None) is not None and item.callspec.params.get("case") in CASES}
    folders = {name: tmp_path_factory.mktemp(name) for name in sorted(selected)}

    def run(name: str):
        tmp = folders[name]
        args = [a.replace("{tmp}", str(tmp)) for a in CASES[name].args] + ["--output", str(tmp / "run")]
        return name, (tmp, hashmoe(*args))

    with ThreadPoolExecutor(max_workers=MAX_CONCURRENT) as pool:
        runs = dict(pool.map(run, folders))
    print("\nhashmoe error runs (seconds, run " + str(MAX_CONCURRENT) + " at a time):\n" +
          "".join(f"  {name}: {result.seconds:.1f}\n" for name, (_, result) in runs.items()))
    return runs


@pytest.mark.parametrize("case", list(CASES))
def test_config_error_exits_2_naming_the_key(case, cli_runs):
    spec = CASES[case]
    tmp, result = cli_runs[case]
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    lines = error_lines(result.stderr)
    assert len(lines) == 1, output
    assert lines[0].startswith(f"hashmoe: error: {spec.key.replace('{tmp}', str(tmp))}: "), output
    for fragment in spec.fragments:
        assert fragment.replace("{tmp}", str(tmp)) in lines[0], output
    assert ("Traceback" in output) == spec.debug, output
    if spec.debug:
        assert "trainer.errors.UserError" in result.stderr
    if not spec.after_group_start:
        assert not (tmp / "run").exists(), output  # refused before anything is written
    if not spec.imports_deepspeed:
        assert "accelerator" not in output, output  # DeepSpeed logs its accelerator choice on import
    assert "torch.distributed" not in output and "ChildFailedError" not in output, output  # no ranks started


# ---- launch checks, in-process: refused before any process starts --------------------------------------
@pytest.fixture
def no_spawn(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"launch started processes: {args}")

    import subprocess

    monkeypatch.setattr(subprocess, "Popen", refuse)


@pytest.mark.parametrize("argv, key, fragment", [
    (["launch", "recipes/tiny-ep2.yaml", "--nproc", "3"], "parallel.ep_size", "2 does not divide the world size 3"),
    (["launch", "recipes/tiny.yaml", "--nproc", "2", "--set", "parallel.ep_size=3"], "parallel.ep_size",
     "3 does not divide model.num_experts=8"),
    (["launch", "recipes/tiny.yaml", "--nproc", "0"], "--nproc", "got 0. Use at least 1 process"),
    (["launch", "recipes/tiny.yaml", "--nproc", "2", "--set", "optim.lr"], "--set", "is not KEY=VALUE"),
    (["launch", "recipes/tiny.yaml", "--nproc", "2", "--set", "data.dataset=files"], "data.train_files",
     "no train_files are given"),
])
def test_launch_refuses_before_starting_processes(no_spawn, capsys, tmp_path, argv, key, fragment):
    assert cli_module.main(argv + ["--output", str(tmp_path / "run")]) == 2
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert len(lines) == 1 and lines[0].startswith(f"hashmoe: error: {key}: ") and fragment in lines[0]
    assert "Traceback" not in captured.err
    assert not (tmp_path / "run").exists()


def test_launch_starts_one_train_process_per_rank(monkeypatch, tmp_path):
    import subprocess

    started = []

    class Rank:
        def __init__(self, command, env, start_new_session):
            started.append((command, env, start_new_session))
            self.returncode = 0

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Rank)
    assert cli_module.main(["launch", "recipes/tiny-ep2.yaml", "--nproc", "2", "--set", "optim.max_steps=5",
                            "--output", str(tmp_path), "--resume", "--allow-config-change"]) == 0
    assert [env["RANK"] for _, env, _ in started] == ["0", "1"]
    for command, env, new_session in started:
        assert command == [sys.executable, "-m", "trainer.cli", "train", "recipes/tiny-ep2.yaml", "--set",
                           "optim.max_steps=5", "--output", str(tmp_path), "--resume", "--allow-config-change"]
        assert (env["WORLD_SIZE"], env["MASTER_ADDR"], env["GLOO_SOCKET_IFNAME"]) == ("2", "127.0.0.1", "lo")
        assert new_session  # Ctrl-C reaches the launcher only, which forwards it once to every rank
    assert started[0][1]["MASTER_PORT"] == started[1][1]["MASTER_PORT"]


def test_a_gpu_deepspeed_config_on_a_cpu_machine_is_named(capsys):
    from trainer.run.config import load_config
    from trainer.run.loop import warn_gpu_config_on_cpu

    warn_gpu_config_on_cpu(load_config("recipes/tiny.yaml", ["parallel.ds_config=zero1_bf16"]))
    assert "parallel.ds_config=zero1_bf16 is a GPU config (bf16) but no GPU is visible" in capsys.readouterr().err
    warn_gpu_config_on_cpu(load_config("recipes/tiny.yaml"))
    assert capsys.readouterr().err == ""

"""`mpirun -np 2 hashmoe train RUN.yaml` and `deepspeed --launcher openmpi` with Debian's OpenMPI: ranks found by
DeepSpeed's own MPI discovery (mpi4py), no hashmoe mapping of OMPI_COMM_WORLD_* variables. Skipped where mpirun
is not installed (`bash scripts/setup.sh --with-cluster` installs it; mpi4py comes with every set-up)."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.trainer.harness import base_config, check, run, train_rows, write_config, write_corpus
from trainer.errors import UserError
from trainer.parallel.distributed import free_port, mpi4py_available, resolve_env

pytestmark = pytest.mark.slow  # multi-process

MPIRUN = shutil.which("mpirun")
needs_mpi = pytest.mark.skipif(MPIRUN is None or not mpi4py_available(), reason="mpirun or mpi4py not installed: "
                               "run `bash scripts/setup.sh --with-cluster` (Debian packages openmpi-bin "
                               "libopenmpi-dev; mpi4py from the `mpi` extra)")
ROOT_FLAG = ["--allow-run-as-root"] if os.geteuid() == 0 else []


@needs_mpi
def test_mpirun_two_ranks_train_with_sharded_experts(tmp_path):
    corpus = write_corpus(tmp_path)
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", base_config(run_dir, corpus, tmp_path / "cache",
                                                             parallel__ep_size=2, optim__max_steps=6))
    hashmoe = Path(sys.executable).parent / "hashmoe"
    command = [str(hashmoe), "train", str(config)] if hashmoe.exists() else [sys.executable, "-m", "trainer.cli",
                                                                               "train", str(config)]
    # -x: MASTER_PORT for both ranks (a free one: tests may run side by side); loopback only.
    result = check(run([MPIRUN, *ROOT_FLAG, "--oversubscribe", "-np", "2", "--mca", "btl", "self,vader",
                        "--mca", "oob_tcp_if_include", "lo", "-x", f"MASTER_PORT={free_port()}", *command],
                       timeout=180))
    assert "hashmoe: 2 ranks (mpirun, mpi4py), rendezvous " in result.stdout, result.stdout
    assert sorted(train_rows(run_dir)) == [1, 2, 3, 4, 5, 6]
    state = json.loads((run_dir / "checkpoints" / "step_6" / "hashmoe_state.json").read_text())
    assert (state["world_size"], state["ep_size"]) == (2, 2)


@needs_mpi
def test_deepspeed_launcher_openmpi_on_localhost(tmp_path):
    """DeepSpeed's own multi-node runner with its OpenMPI backend, on one host: it starts `mpirun` itself and the
    ranks find each other through mpi4py, as on a cluster (where the hostfile lists the nodes)."""
    corpus = write_corpus(tmp_path)
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", base_config(run_dir, corpus, tmp_path / "cache",
                                                             parallel__ep_size=2, optim__max_steps=4,
                                                             optim__micro_batch_size=2))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    deepspeed = Path(sys.executable).parent / "deepspeed"
    # --force_multi: one host would otherwise use DeepSpeed's local launcher; --no_ssh_check: localhost needs none
    launcher_args = " ".join([*ROOT_FLAG, "--oversubscribe", "--mca btl_tcp_if_include lo",
                              "--mca oob_tcp_if_include lo", f"-x MASTER_PORT={free_port()}"])
    result = check(run([str(deepspeed), "--hostfile", str(hostfile), "--force_multi", "--no_ssh_check",
                        "--master_addr", "127.0.0.1", "--launcher", "openmpi", "--launcher_args", launcher_args,
                        "--module", "trainer.cli", "train", str(config)], timeout=240))
    assert "cmd = mpirun -n 2" in result.stdout + result.stderr
    assert "hashmoe: 2 ranks (mpirun, mpi4py)" in result.stdout, result.stdout
    assert sorted(train_rows(run_dir)) == [1, 2, 3, 4]
    state = json.loads((run_dir / "checkpoints" / "step_4" / "hashmoe_state.json").read_text())
    assert (state["world_size"], state["ep_size"]) == (2, 2)


def test_openmpi_variables_map_to_ranks():
    environ = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
               "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "10.0.0.1"}
    env = resolve_env(environ)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.launcher) == (3, 4, 1, 2, "mpirun")


def test_multi_host_mpirun_without_master_addr_is_refused():
    environ = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
               "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(UserError, match="mpirun -x MASTER_ADDR="):
        resolve_env(environ)

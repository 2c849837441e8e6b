"""`mpirun -np 2 hashmoe train RUN.yaml` with Debian's OpenMPI: ranks from the OMPI_COMM_WORLD_* variables,
gloo on loopback. Skipped where mpirun is not installed (`bash scripts/setup.sh --with-cluster` installs it)."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.trainer.harness import base_config, check, run, train_rows, write_config, write_corpus
from trainer.distributed import free_port, resolve_env
from trainer.errors import UserError

pytestmark = pytest.mark.slow  # multi-process

MPIRUN = shutil.which("mpirun")


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed: run `bash scripts/setup.sh --with-cluster` "
                    "(Debian packages openmpi-bin libopenmpi-dev)")
def test_mpirun_two_ranks_train_with_sharded_experts(tmp_path):
    corpus = write_corpus(tmp_path)
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", base_config(run_dir, corpus, tmp_path / "cache",
                                                             parallel__ep_size=2, optim__max_steps=6))
    hashmoe = Path(sys.executable).parent / "hashmoe"
    command = [str(hashmoe), "train", str(config)] if hashmoe.exists() else [sys.executable, "-m", "trainer.cli",
                                                                               "train", str(config)]
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    # -x: MASTER_PORT for both ranks (a free one: tests may run side by side); loopback only.
    result = check(run([MPIRUN, *root, "--oversubscribe", "-np", "2", "--mca", "btl", "self,vader",
                        "--mca", "oob_tcp_if_include", "lo", "-x", f"MASTER_PORT={free_port()}", *command],
                       timeout=180))
    assert "hashmoe: 2 ranks (mpirun), rendezvous 127.0.0.1:" in result.stdout, result.stdout
    assert sorted(train_rows(run_dir)) == [1, 2, 3, 4, 5, 6]
    state = json.loads((run_dir / "checkpoints" / "step_6" / "hashmoe_state.json").read_text())
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

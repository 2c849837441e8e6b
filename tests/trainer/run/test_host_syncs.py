"""No read-back to the host per training micro-step, in the loop or the routers: every .item(), bool(),
int(), float() or .tolist() of a tensor stalls a GPU until its queue drains. Measured on CPU by watching those
calls from hashmoe's own code during `TrainLoop.train_step` (tests/trainer/sync_worker.py)."""

import json
import sys

import pytest

from tests.trainer.harness import base_config, check, run, write_config

pytestmark = pytest.mark.slow  # a training process per router

# grouped_mm leaves the rows of dropped routes unwritten; on CPU the expert op zeroes them after reading where
# they start (a CPU tensor: reading it costs nothing), on a GPU with a device-side mask and no read.
CPU_ONLY = (" in _zero_rows_past (__int__)",)

ROUTERS = {
    "dense": {"model__moe_layers": []},
    "hash": {},
    "hash-multi": {"model__hash_function": "random", "model__hash_heads": 2},
    "switch": {"model__router": "switch"},
    "topk": {"model__router": "topk"},
    "ladder": {"model__recurrence": {"kind": "ladder", "steps": 2}},
    "base": {"model__router": "base"},
}


def host_reads(corpus, tmp_path, **overrides) -> list[str]:
    corpus_file, cache = corpus
    # grouped_mm, the GPU default, on CPU too: the per-expert loop (the CPU default) reads the counts per slot
    # by design, to slice its matmuls.
    config = base_config(tmp_path / "run", corpus_file, cache, optim__max_steps=3, logging__log_every=100,
                         logging__eval_every=100, checkpoint__every=0, model__experts_implementation="grouped_mm",
                         **overrides)
    out = tmp_path / "reads.json"
    check(run([sys.executable, "tests/trainer/sync_worker.py", str(write_config(tmp_path / "run.yaml", config)),
               str(out)]))
    return json.loads(out.read_text())["reads"]


@pytest.mark.parametrize("router", list(ROUTERS))
def test_a_training_step_reads_nothing_back_to_the_host(router, corpus, tmp_path):
    reads = host_reads(corpus, tmp_path, **ROUTERS[router])
    reads = [r for r in reads if not r.endswith(CPU_ONLY)]
    if router == "base":
        # Left, and known: BASE's auction (models/assignment.py) runs rounds until every token has an expert; how
        # many is data, read once per round. Everything else in a BASE step reads nothing.
        reads = [r for r in reads if not r.startswith("models/assignment.py")]
    assert reads == []  # the loop, the model, the routers, the dispatcher

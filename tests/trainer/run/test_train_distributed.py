"""The trainer end to end on 2 gloo ranks and 1 process: real DeepSpeed engine, real process groups."""

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.trainer.harness import (
    base_config,
    check,
    run,
    torchrun,
    train_command,
    train_rows,
    write_config,
)

pytestmark = pytest.mark.slow

ROUTERS = {
    "hash": {},
    "switch": {"model__router": "switch"},
    "base": {"model__router": "base"},
    "topk": {"model__router": "topk"},
    "hash-ladder": {"model__recurrence": {"kind": "ladder", "steps": 2}},
    "base-staircase": {"model__router": "base",
                       "model__recurrence": {"kind": "staircase", "chunk": 8, "window": 16, "memory": 8}},
}


@pytest.mark.parametrize("router", list(ROUTERS))
def test_ep2_training_shards_experts_and_learns(router, corpus, tmp_path):
    corpus_file, cache = corpus
    run_dir = tmp_path / "run"
    config = base_config(run_dir, corpus_file, cache, parallel__ep_size=2, optim__max_steps=10,
                         logging__eval_blocks=0, checkpoint__every=5, parallel__collective_timeout_s=77,
                         **ROUTERS[router])
    path = write_config(tmp_path / "run.yaml", config)
    check(run(torchrun(2, ["tests/trainer/ep_worker.py", str(path), str(tmp_path)])))

    # every group, DeepSpeed's expert and expert-data-parallel ones included, waits 77 s, not gloo's 30 min
    for rank in (0, 1):
        timeouts = json.loads((tmp_path / f"group_timeouts_{rank}.json").read_text())
        assert len(timeouts) >= 3 and set(timeouts.values()) == {77.0}, timeouts

    states = [torch.load(tmp_path / f"rank_{r}.pt", weights_only=True) for r in (0, 1)]
    assert states[0].keys() == states[1].keys()
    expert_keys = [k for k in states[0] if ".deepspeed_experts." in k]
    assert len(expert_keys) == 4  # 2 local experts x (w1, w2) per rank
    for key in states[0]:
        if key in expert_keys:
            assert not torch.equal(states[0][key], states[1][key]), f"{key}: ranks hold the same expert"
        else:
            assert torch.equal(states[0][key], states[1][key]), f"{key}: shared parameter differs across ranks"

    rows = train_rows(run_dir)
    assert sorted(rows) == list(range(1, 11))
    assert rows[10]["train/loss"] < rows[1]["train/loss"] - 0.5, [rows[s]["train/loss"] for s in (1, 10)]

    for step in (5, 10):
        files = {p.name for p in (run_dir / "checkpoints" / f"step_{step}").iterdir()}
        assert {f"layer_0_expert_{g}_mp_rank_00_model_states.pt" for g in range(4)} <= files
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_10"


@pytest.mark.parametrize("router,optimizer", [("hash", "sgd"), ("topk", "adamw")])
def test_ep1_and_ep2_give_the_same_losses(router, optimizer, corpus, tmp_path):
    """Same seed and global batch: 1 process holding every expert vs 2 ranks exchanging tokens by all-to-all.
    Aux loss off and no capacity: the only difference left is where the experts run."""
    corpus_file, cache = corpus
    extra = dict(optim__optimizer=optimizer, optim__lr=0.05 if optimizer == "sgd" else 3e-3, optim__max_steps=6,
                 model__router_aux_loss_coef=0.0, model__capacity_factor=None, **ROUTERS[router])
    one = base_config(tmp_path / "ep1", corpus_file, cache, optim__micro_batch_size=4, **extra)
    two = base_config(tmp_path / "ep2", corpus_file, cache, optim__micro_batch_size=2, parallel__ep_size=2, **extra)
    check(run(train_command(write_config(tmp_path / "ep1.yaml", one), 1)))
    check(run(train_command(write_config(tmp_path / "ep2.yaml", two), 2)))
    rows1, rows2 = train_rows(tmp_path / "ep1"), train_rows(tmp_path / "ep2")
    assert sorted(rows1) == sorted(rows2) == list(range(1, 7))
    for step in rows1:
        assert rows2[step]["train/loss"] == pytest.approx(rows1[step]["train/loss"], rel=2e-6, abs=2e-6), step
    assert rows1[6]["train/loss"] != rows1[1]["train/loss"]  # it did train


@pytest.mark.parametrize("router", ["hash", "switch", "hash-ladder"])
def test_gradient_checkpointing_on_two_ranks_gives_the_same_losses(router, corpus, tmp_path):
    """model.gradient_checkpointing: true recomputes each block (its all-to-alls too) in the backward pass, with
    DeepSpeed and ep_size 2 on 2 ranks: the losses equal the run without it."""
    corpus_file, cache = corpus
    rows = {}
    for checkpointing in (False, True):
        name = f"gc{int(checkpointing)}"
        config = base_config(tmp_path / name, corpus_file, cache, parallel__ep_size=2, optim__micro_batch_size=2,
                             optim__max_steps=5, logging__eval_blocks=0, optim__lr=3e-3,
                             model__gradient_checkpointing=checkpointing, **ROUTERS[router])
        check(run(train_command(write_config(tmp_path / f"{name}.yaml", config), 2)))
        rows[checkpointing] = train_rows(tmp_path / name)
    assert sorted(rows[True]) == sorted(rows[False]) == list(range(1, 6))
    for step in rows[False]:
        assert rows[True][step]["train/loss"] == pytest.approx(rows[False][step]["train/loss"], rel=1e-6, abs=1e-6)
    assert rows[True][5]["train/loss"] != rows[True][1]["train/loss"]  # it did train


def test_metrics_jsonl_and_tensorboard_carry_the_named_tags(corpus, tmp_path):
    corpus_file, cache = corpus
    run_dir = tmp_path / "run"
    config = base_config(run_dir, corpus_file, cache, optim__max_steps=4, model__router="switch")
    check(run(train_command(write_config(tmp_path / "run.yaml", config), 1)))
    rows = [r for r in __import__("trainer.run.metrics", fromlist=["x"]).read_metrics(run_dir)]
    train_tags = {"train/loss", "train/ppl", "train/updates_per_sec", "train/tokens_per_sec", "train/lr",
                  "moe/aux_loss", "moe/dropped_frac", "moe/load_cv", "moe/load_cv_chosen", "memory/peak_rank_mib",
                  "train/grad_norm", "train/grad_norm_max"}
    assert train_tags <= set(rows[-2]) | set(rows[-1])
    assert "train/mfu" not in rows[-2]  # no known peak on CPU
    assert 100 < rows[-2]["memory/peak_rank_mib"] < 24 * 1024  # the trainer's resident set, in MiB
    assert {"valid/loss", "valid/ppl"} <= set(rows[-1])
    assert rows[0]["params/total"] > rows[0]["params/active"] > 0
    last = train_rows(run_dir)[4]
    assert last["train/ppl"] == pytest.approx(math.exp(last["train/loss"]))
    assert last["train/updates_per_sec"] > 0 and last["train/tokens_per_sec"] == pytest.approx(
        last["train/updates_per_sec"] * 4 * 32)
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"histograms": 0}).Reload()
    assert train_tags | {"valid/loss", "valid/ppl"} <= set(events.Tags()["scalars"])
    assert {"moe/expert_load/layer_0", "moe/expert_load_chosen/layer_0"} <= set(events.Tags()["histograms"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


@pytest.mark.parametrize("launcher", ["deepspeed", "hashmoe-launch"])
def test_same_command_under_other_launchers(launcher, corpus, tmp_path):
    """The deepspeed launcher (which inserts --local_rank=N) and `hashmoe launch --nproc 2` start 2 ranks."""
    import sys

    from trainer.parallel.distributed import free_port

    corpus_file, cache = corpus
    run_dir = tmp_path / "run"
    config = base_config(run_dir, corpus_file, cache, parallel__ep_size=2, optim__micro_batch_size=2,
                         optim__max_steps=3)
    path = str(write_config(tmp_path / "run.yaml", config))
    if launcher == "deepspeed":
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), "--module", "trainer.cli", "train", path]
    else:
        command = [sys.executable, "-m", "trainer.cli", "launch", path, "--nproc", "2"]
    check(run(command))
    assert sorted(train_rows(run_dir)) == [1, 2, 3]
    assert json.loads((run_dir / "checkpoints" / "step_3" / "hashmoe_state.json").read_text())["world_size"] == 2


def test_the_validation_set_is_the_same_on_any_number_of_ranks(corpus, tmp_path):
    """The same weights (lr 1e-30: the first step changes nothing) give the same valid loss on 1 rank, 2 ranks and
    2 ranks with ep_size 2 and another micro batch: the first logging.eval_blocks blocks, split over the ranks
    (10 blocks: shares of 5 and padding in micro batches of 3 and 4)."""
    corpus_file, cache = corpus
    losses = {}
    for name, ranks, extra in (("one", 1, dict(optim__micro_batch_size=4)),
                               ("two", 2, dict(optim__micro_batch_size=2)),
                               ("two-ep2", 2, dict(optim__micro_batch_size=3, parallel__ep_size=2))):
        config = base_config(tmp_path / name, corpus_file, cache, optim__max_steps=1, optim__lr=1e-30,
                             optim__warmup_steps=0, logging__eval_blocks=10, checkpoint__every=0, **extra)
        check(run(train_command(write_config(tmp_path / f"{name}.yaml", config), ranks)))
        losses[name] = next(r["valid/loss"] for r in __import__("trainer.run.metrics", fromlist=["x"]).read_metrics(
            tmp_path / name) if "valid/loss" in r)
    assert losses["two"] == pytest.approx(losses["one"], rel=1e-6), losses
    assert losses["two-ep2"] == pytest.approx(losses["one"], rel=1e-6), losses


def checkpoint_tensor(run_dir, suffix: str) -> torch.Tensor:
    latest = (run_dir / "checkpoints" / "latest").read_text()
    state = torch.load(run_dir / "checkpoints" / latest / "mp_rank_00_model_states.pt", weights_only=False)
    return next(v for k, v in state["module"].items() if k.endswith(suffix))


def test_bias_balancing_moves_every_rank_by_the_global_load(corpus, tmp_path):
    """DeepSeek-V3's aux-loss-free balancing: after every optimizer step each rank adds the same +-rate step,
    computed from the choices of all ranks. 1 process vs 2 ranks with ep_size 2 and the same global batch give
    the same biases and losses; a rank that moved by its own load alone would differ."""
    corpus_file, cache = corpus
    extra = dict(optim__max_steps=6, checkpoint__every=6, model__router="topk", model__router_aux_loss_coef=0.0,
                 model__capacity_factor=None, model__router_bias_update_rate=0.01)
    one = base_config(tmp_path / "one", corpus_file, cache, optim__micro_batch_size=4, **extra)
    two = base_config(tmp_path / "two", corpus_file, cache, optim__micro_batch_size=2, parallel__ep_size=2, **extra)
    check(run(train_command(write_config(tmp_path / "one.yaml", one), 1)))
    check(run(train_command(write_config(tmp_path / "two.yaml", two), 2)))
    bias_one, bias_two = (checkpoint_tensor(tmp_path / name, "router.score_correction_bias") for name in ("one", "two"))
    assert bias_one.abs().sum() > 0  # it moved: 6 steps of +-0.01 per expert
    assert torch.all((bias_one.abs() * 100).round() <= 6)
    torch.testing.assert_close(bias_two, bias_one, rtol=0, atol=1e-6)
    rows1, rows2 = train_rows(tmp_path / "one"), train_rows(tmp_path / "two")
    for step in rows1:
        assert rows2[step]["train/loss"] == pytest.approx(rows1[step]["train/loss"], rel=2e-6, abs=2e-6), step
    assert rows1[6]["moe/load_cv_chosen"] == pytest.approx(rows1[6]["moe/load_cv"])  # no capacity: nothing dropped
    assert rows1[6]["train/grad_norm"] > 0 and rows1[6]["train/grad_norm_max"] >= rows1[6]["train/grad_norm"]


def test_grad_norm_is_logged_under_zero_stage_0_and_1_alike(corpus, tmp_path):
    """Stage 0: hashmoe's own norm of the gradients (DeepSpeed does not keep it); ZeRO-1 moves the gradients into
    its partitions during backward, so the norm is DeepSpeed's. Same run, same numbers."""
    corpus_file, cache = corpus
    zero1 = tmp_path / "zero1_fp32.json"
    zero1.write_text(json.dumps({"zero_optimization": {"stage": 1}, "bf16": {"enabled": False},
                                 "optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
                                 "steps_per_print": 10 ** 9}))
    norms = {}
    for name, ds_config in (("stage0", "cpu"), ("stage1", str(zero1))):
        config = base_config(tmp_path / name, corpus_file, cache, optim__max_steps=3, optim__grad_clip=1.0,
                             parallel__ds_config=ds_config, checkpoint__every=0)
        check(run(train_command(write_config(tmp_path / f"{name}.yaml", config), 1)))
        norms[name] = [row["train/grad_norm"] for _, row in sorted(train_rows(tmp_path / name).items())]
    assert len(norms["stage0"]) == 3 and all(n > 0 for n in norms["stage0"])
    assert norms["stage1"] == pytest.approx(norms["stage0"], rel=1e-4)

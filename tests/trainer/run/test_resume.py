"""Checkpoints: resume after preemption is bitwise identical, resume at another ep_size, export, atomicity."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from tests.trainer.harness import (
    ROOT,
    base_config,
    check,
    env_for_run,
    run,
    train_command,
    train_rows,
    wait_for_step,
    write_config,
)
from trainer.run.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow  # multi-process


COMPARED = ("train/loss", "moe/aux_loss", "moe/dropped_frac", "moe/load_cv", "train/lr")


def test_preempted_and_resumed_run_matches_uninterrupted_run_bitwise(corpus, tmp_path):
    """Switch routing (jitter draws random numbers, capacity drops tokens): data order, optimizer, schedule
    and RNG must all be restored for the losses to match exactly."""
    corpus_file, cache = corpus
    overrides = dict(model__router="switch", optim__max_steps=20, checkpoint__every=1000, logging__eval_every=10)
    ref = write_config(tmp_path / "ref.yaml", base_config(tmp_path / "ref", corpus_file, cache, **overrides))
    check(run(train_command(ref, 1)))

    cut = write_config(tmp_path / "cut.yaml", base_config(tmp_path / "cut", corpus_file, cache, **overrides))
    process = subprocess.Popen(train_command(cut, 1), cwd=ROOT, env=env_for_run(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / "cut", 5, process)
    process.send_signal(signal.SIGUSR1)  # what Slurm sends before preemption
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    stopped_at = int(latest_checkpoint(tmp_path / "cut").name.split("_")[1])
    assert 5 <= stopped_at < 20, stopped_at

    resumed = check(run(train_command(cut, 1)))
    assert f"resuming from {tmp_path / 'cut' / 'checkpoints' / f'step_{stopped_at}'}" in resumed.stdout
    ref_rows, cut_rows = train_rows(tmp_path / "ref"), train_rows(tmp_path / "cut")
    assert sorted(cut_rows) == sorted(ref_rows) == list(range(1, 21))
    for step in ref_rows:
        for key in COMPARED:
            assert cut_rows[step][key] == ref_rows[step][key], (step, key)
    ref_valid = [r for r in map(json.loads, (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()) if "valid/loss" in r]
    cut_valid = [r for r in map(json.loads, (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) if "valid/loss" in r]
    assert [r["valid/loss"] for r in cut_valid if r["step"] == 20] == [r["valid/loss"] for r in ref_valid if r["step"] == 20]


# The 2026 block (SwiGLU experts in a gated bank, a shared expert, RoPE, RMSNorm, QK-norm, GQA, untied embeddings)
# with DeepSeek-V4's layout (a hash layer of k whole experts under a gate, then a learned top-k layer).
MODERN = dict(model__gated_ffn=True, model__hidden_act="silu", model__num_shared_experts=1,
              model__position_embedding_type="rope", model__norm_type="rmsnorm", model__qk_norm=True,
              model__num_key_value_heads=2, model__tie_word_embeddings=False, model__moe_layers=[0, 1],
              model__router=["hash", "topk"], model__hash_function="random", model__hash_experts_per_tok=2,
              model__hash_gate="sqrtsoftplus", model__capacity_factor=None,
              # Switch's balancing loss is computed per rank on its own tokens (as in DeepSpeed and Megatron), a
              # different function of the batch at another world size: off, so 1 and 2 processes train alike
              model__router_aux_loss_coef=0.0)


@pytest.mark.parametrize("first,second,block", [((2, 2), (1, 1), "gpt2"), ((1, 1), (2, 2), "gpt2"),
                                                ((2, 2), (1, 1), "modern")])
def test_resume_at_another_expert_parallel_size_continues_the_same_run(first, second, block, corpus, tmp_path):
    """(processes, ep_size) -> (processes, ep_size) at step 4: weights, schedule, data position and Adam
    moments carry over, so steps 5-8 match a run that never stopped (ep1 == ep2 up to float rounding)."""
    corpus_file, cache = corpus

    def config(run_dir, layout, max_steps):
        return base_config(run_dir, corpus_file, cache, parallel__ep_size=layout[1], optim__max_steps=max_steps,
                           optim__micro_batch_size=4 // layout[0], optim__schedule="constant",
                           logging__eval_every=100, checkpoint__every=4, **(MODERN if block == "modern" else {}))

    check(run(train_command(write_config(tmp_path / "ref.yaml", config(tmp_path / "ref", second, 8)), second[0])))
    run_dir = tmp_path / "run"
    check(run(train_command(write_config(tmp_path / "a.yaml", config(run_dir, first, 4)), first[0])))
    result = check(run(train_command(write_config(tmp_path / "b.yaml", config(run_dir, second, 8)), second[0],
                                     "--allow-config-change")))
    assert "at a new layout" in result.stdout and "optimizer moments restored by name" in result.stdout
    rows, ref = train_rows(run_dir), train_rows(tmp_path / "ref")
    assert sorted(rows) == list(range(1, 9))
    for step in range(1, 9):
        assert rows[step]["train/loss"] == pytest.approx(ref[step]["train/loss"], rel=1e-5, abs=1e-5), step
    # the new layout's checkpoint holds the same experts, in the same global numbering
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step_8").glob("layer_0_expert_*")) == [
        f"layer_0_expert_{g}_mp_rank_00_model_states.pt" for g in range(4)]


def export_and_load(checkpoint_dir, out_dir):
    from transformers import AutoModelForCausalLM

    from trainer.publish.export import export_checkpoint

    export_checkpoint(checkpoint_dir, out_dir)
    return AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True).eval()


@pytest.mark.parametrize("variant", ["one-head", "multi-hash", "modern-multi-hash"])
def test_export_gathers_every_expert_and_reproduces_the_training_models_valid_loss(variant, corpus, tmp_path):
    from trainer.data import prepare_data
    from trainer.run.config import load_config

    corpus_file, cache = corpus
    run_dir = tmp_path / "run"
    extra = dict(model__hash_function="random", model__hash_heads=2) if "multi-hash" in variant else {}
    if variant.startswith("modern"):  # segments of a gated bank: [gate; up] rows per slot, reassembled by export
        extra.update({k: v for k, v in MODERN.items() if "hash" not in k and "router" not in k}, model__router="hash",
                     model__moe_layers=[1])
    config = base_config(run_dir, corpus_file, cache, parallel__ep_size=2, optim__micro_batch_size=2,
                         optim__max_steps=6, logging__eval_every=6, logging__eval_blocks=0, **extra)
    path = write_config(tmp_path / "run.yaml", config)
    check(run(train_command(path, 2)))
    model = export_and_load(run_dir / "checkpoints" / "step_6", tmp_path / "hf")
    assert model.parameter_counts()["total"] > 0
    assert model.model.layers[1].mlp.experts.w1.shape[0] == 4  # every global expert in one bank

    valid_blocks = prepare_data(load_config(path).data, 7, None, is_main=False).valid_blocks[:]
    with torch.no_grad():
        logits = model(valid_blocks, use_cache=False).logits
        hf_loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), valid_blocks[:, 1:].flatten())
    trained = [r["valid/loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
               if "valid/loss" in r and r["step"] == 6]
    assert hf_loss.item() == pytest.approx(trained[0], abs=1e-5)
    assert (tmp_path / "hf" / "tokenizer.json").exists()


def test_crash_during_save_leaves_the_previous_checkpoint_usable(corpus, tmp_path):
    corpus_file, cache = corpus
    run_dir = tmp_path / "run"
    config = base_config(run_dir, corpus_file, cache, optim__max_steps=4, checkpoint__every=2, logging__eval_every=100)
    path = write_config(tmp_path / "run.yaml", config)
    check(run(train_command(path, 1)))
    assert latest_checkpoint(run_dir).name == "step_4"
    # a save of step 6 that died half-way: a partial staging folder and an unfinished `latest` rename
    staging = run_dir / "checkpoints" / ".staging" / "step_6"
    staging.mkdir(parents=True)
    (staging / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x02 truncated")
    (run_dir / "checkpoints" / "latest.tmp").write_text("step_")
    assert latest_checkpoint(run_dir).name == "step_4"

    config["optim"]["max_steps"] = 6
    result = check(run(train_command(write_config(path, config), 1, "--allow-config-change")))
    assert "resuming from" in result.stdout and "step_4" in result.stdout
    assert latest_checkpoint(run_dir).name == "step_6"
    assert not (run_dir / "checkpoints" / ".staging").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_2", "step_4", "step_6"]


def test_kill_at_any_moment_leaves_a_resumable_run(corpus, tmp_path):
    """SIGKILL (no handler runs) at several points while checkpoints are written every step."""
    corpus_file, cache = corpus
    run_dir = tmp_path / "run"
    config = base_config(run_dir, corpus_file, cache, optim__max_steps=16, checkpoint__every=1, checkpoint__keep=2,
                         logging__eval_every=100)
    path = write_config(tmp_path / "run.yaml", config)
    for delay in (0.0, 0.13, 0.29):
        process = subprocess.Popen(train_command(path, 1), cwd=ROOT, env=env_for_run(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        reached = (max(train_rows(run_dir)) if train_rows(run_dir) else 0) + 2
        wait_for_step(run_dir, reached, process)
        time.sleep(delay)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        latest = latest_checkpoint(run_dir)
        assert latest is not None and (latest / "mp_rank_00_model_states.pt").stat().st_size > 0
    check(run(train_command(path, 1)))
    assert latest_checkpoint(run_dir).name == "step_16"
    assert sorted(train_rows(run_dir)) == list(range(1, 17))

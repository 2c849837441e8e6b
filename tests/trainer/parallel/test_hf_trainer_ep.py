"""Expert parallelism in a user's own HF Trainer script (trainer.hf): 2 gloo ranks, ep_size 2, DeepSpeed engine
built by the Trainer; the per-step losses equal `hashmoe train`'s on the same data, seed and settings."""

import json

import pytest

from tests.trainer.harness import (
    base_config,
    check,
    run,
    torchrun,
    train_command,
    train_rows,
    write_config,
    write_corpus,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model", [{"model__hash_function": "random"},
                                   {"model__router": "topk", "model__capacity_factor": None},
                                   # the Trainer's RouterBiasUpdate callback moves the biases as hashmoe train does
                                   {"model__router": "topk", "model__capacity_factor": None,
                                    "model__router_bias_update_rate": 0.01, "model__router_aux_loss_coef": 0.0}])
def test_hf_trainer_with_sharded_experts_equals_hashmoe_train(model, tmp_path):
    corpus = write_corpus(tmp_path)
    config = base_config(tmp_path / "run", corpus, tmp_path / "cache", parallel__ep_size=2,
                         optim__micro_batch_size=2, optim__max_steps=5,
                         optim__schedule="constant", optim__warmup_steps=0, optim__weight_decay=0.0,
                         optim__lr=3e-3, logging__eval_blocks=0, **model)
    path = write_config(tmp_path / "run.yaml", config)
    check(run(train_command(path, 2)))
    hashmoe_rows = train_rows(tmp_path / "run")
    check(run(torchrun(2, ["tests/trainer/hf_trainer_worker.py", str(path), str(tmp_path / "hf.json")])))
    hf_losses = {int(step): loss for step, loss in json.loads((tmp_path / "hf.json").read_text()).items()}
    assert sorted(hf_losses) == sorted(hashmoe_rows) == list(range(1, 6))
    for step, loss in hf_losses.items():  # the Trainer logs the whole loss: LM loss + router aux loss
        row = hashmoe_rows[step]
        assert loss == pytest.approx(row["train/loss"] + row.get("moe/aux_loss", 0.0), rel=1e-5, abs=1e-5), step
    assert hf_losses[5] != hf_losses[1]  # it trained

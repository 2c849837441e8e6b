"""`hashmoe upcycle` (sparse upcycling) and `model.init_from`: the upcycled MoE equals its dense source at step 0
where a token's expert weights sum to 1 (hash, renormalised top-k), Switch and BASE start scaled by their gate,
and `hashmoe train` continues from the folder, also expert-parallel on 2 ranks with the dense model's step-0 loss."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from tests.trainer.harness import base_config, check, run, train_command, train_rows, write_config
from trainer.cli import main as cli
from trainer.publish.upcycle import upcycle

VOCAB = 300


def dense_folder(tmp_path, kind: str, tokenizer=None):
    """A tiny random dense model saved as a folder: Llama, Qwen3 or hashmoe's own GPT-2 block."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=64)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(intermediate_size=40, num_key_value_heads=2,
                                                                       **common))
    elif kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(intermediate_size=40, head_dim=16,
                                                                       num_key_value_heads=2, **common))
    else:
        from models import HashMoEConfig, HashMoEForCausalLM

        model = HashMoEForCausalLM(HashMoEConfig(intermediate_size=40, moe_layers=[], **common))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    folder = tmp_path / kind
    model.eval().save_pretrained(folder, max_shard_size="30KB")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return model, folder


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", ["llama", "qwen3", "hashmoe"])
@pytest.mark.parametrize("router,equal", [("hash", True), ("topk", True), ("switch", False), ("base", False)])
def test_upcycled_model_starts_where_the_dense_one_is(tmp_path, kind, router, equal):
    dense, folder = dense_folder(tmp_path, kind)
    out = upcycle(folder, tmp_path / "moe", num_experts=4, router=router, moe_layers=[0, 2], max_shard_bytes=40_000)
    moe = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert moe.config.moe_layers == [0, 2] and moe.config.num_experts == 4
    bank = moe.model.layers[2].mlp.experts
    assert torch.equal(bank.w1[0], bank.w1[3]) and torch.equal(bank.w2[1], bank.w2[2])  # copies of one FFN
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    diff = (logits(dense, ids) - logits(moe, ids)).abs().max().item()
    if equal:  # a token's weights sum to 1: sum_k w_k FFN(x) = FFN(x)
        assert diff <= 1e-5, diff
    else:  # the gate (Switch's probability, BASE's sigmoid) scales the FFN output at first
        assert diff > 1e-3, diff


def test_moe_options_a_dense_hashmoe_config_carries_unused_do_not_reach_the_upcycled_model(tmp_path):
    from models import HashMoEConfig, HashMoEForCausalLM

    torch.manual_seed(0)
    dense = HashMoEForCausalLM(HashMoEConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=40, moe_layers=[],
                                             num_shared_experts=1, routed_scaling_factor=2.5, scoring_func="sigmoid"))
    dense.eval().save_pretrained(tmp_path / "dense")
    moe = AutoModelForCausalLM.from_pretrained(upcycle(tmp_path / "dense", tmp_path / "moe", 4, "topk"),
                                               trust_remote_code=True).eval()
    assert moe.config.num_shared_experts == 0 and moe.config.routed_scaling_factor == 1.0
    ids = torch.randint(0, VOCAB, (2, 9))
    assert (logits(dense, ids) - logits(moe, ids)).abs().max().item() <= 1e-5


def test_upcycle_refuses_what_it_cannot_start_from(tmp_path, capsys):
    _, folder = dense_folder(tmp_path, "llama")
    assert cli(["upcycle", str(folder), str(tmp_path / "a"), "--num-experts", "4", "--router", "topk",
                "--moe-layers", "0,7"]) == 2
    assert "--moe-layers:" in capsys.readouterr().err
    upcycle(folder, tmp_path / "moe", num_experts=4, router="hash")
    assert cli(["upcycle", str(tmp_path / "moe"), str(tmp_path / "b"), "--num-experts", "4", "--router", "hash"]) == 2
    assert "already a Mixture-of-Experts" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow  # multi-process
def test_train_continues_from_an_upcycled_model_on_two_ranks_at_the_dense_loss(tmp_path, corpus):
    """model.init_from at ep_size 2: the step-0 LM loss of the upcycled top-k model equals that of the dense
    model it came from, on the same batch (the same seed and data order on 2 ranks)."""
    from trainer.data.tokenization import train_tokenizer

    corpus_file, cache = corpus
    tokenizer = train_tokenizer(corpus_file.read_text().split("\n\n")[:200], vocab_size=VOCAB)
    _, folder = dense_folder(tmp_path, "llama", tokenizer=tokenizer)
    dense = tmp_path / "dense-hashmoe"
    assert cli(["convert", str(folder), str(dense)]) == 0
    assert cli(["upcycle", str(dense), str(tmp_path / "moe"), "--num-experts", "4", "--router", "topk",
                "--moe-layers", "1,2"]) == 0
    losses = {}
    for name, init, ep_size in (("dense", dense, 1), ("moe", tmp_path / "moe", 2)):
        config = base_config(tmp_path / f"run-{name}", corpus_file, cache, parallel__ep_size=ep_size,
                             optim__max_steps=2, optim__micro_batch_size=2, logging__eval_every=2,
                             checkpoint__every=2)
        config["model"] = {"init_from": str(init)}
        check(run(train_command(write_config(tmp_path / f"{name}.yaml", config), 2)))
        losses[name] = train_rows(tmp_path / f"run-{name}")[1]["train/loss"]
    assert losses["moe"] == pytest.approx(losses["dense"], abs=1e-5), losses

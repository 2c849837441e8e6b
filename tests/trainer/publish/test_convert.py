"""`hashmoe convert` against transformers' own classes: tiny random Llama, Qwen3, Qwen3-MoE and Mixtral models
(fp32), converted into hashmoe folders and back, must give the same logits (within 1e-5) and the same greedy
generations; sharded sources stream, dtypes and tokenizers travel, unmappable options are refused by name."""

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from trainer.cli import main as cli
from trainer.publish.convert import convert

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128)
NATIVE = {
    "llama": lambda: transformers.LlamaConfig(intermediate_size=40, tie_word_embeddings=True, **COMMON),
    "qwen3": lambda: transformers.Qwen3Config(intermediate_size=40, head_dim=16, tie_word_embeddings=False,
                                              **COMMON),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        intermediate_size=48, moe_intermediate_size=16, head_dim=16, num_experts=6, num_experts_per_tok=2,
        mlp_only_layers=[0], norm_topk_prob=False, tie_word_embeddings=False, **COMMON),
    "qwen3_moe_normed": lambda: transformers.Qwen3MoeConfig(
        intermediate_size=48, moe_intermediate_size=16, head_dim=16, num_experts=4, num_experts_per_tok=3,
        norm_topk_prob=True, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0,
                                              "original_max_position_embeddings": 64}, **COMMON),
    "mixtral": lambda: transformers.MixtralConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                                                  **COMMON),
}


def native_model(name, seed=0):
    torch.manual_seed(seed)
    config = NATIVE[name]()
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # transformers zero-inits some weights (routers, norms): make every tensor count
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def assert_same_model(reference, candidate, atol=1e-5):
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (reference(ids).logits - candidate(ids).logits).abs().max().item()
    assert diff <= atol, diff
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(reference.generate(ids, **greedy), candidate.generate(ids, **greedy))
    return diff


@pytest.mark.parametrize("name", list(NATIVE))
def test_native_checkpoint_converts_to_an_equal_hashmoe_model_and_back(tmp_path, name):
    source = native_model(name)
    source.save_pretrained(tmp_path / "native", max_shard_size="40KB")  # several shards: read one layer at a time
    assert (tmp_path / "native" / "model.safetensors.index.json").is_file()
    convert(tmp_path / "native", tmp_path / "hashmoe", max_shard_bytes=30_000)
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "hashmoe", trust_remote_code=True).eval()
    assert type(converted).__name__ == "HashMoEForCausalLM"
    assert json.loads((tmp_path / "hashmoe" / "config.json").read_text())["auto_map"]
    assert_same_model(source, converted)

    convert(tmp_path / "hashmoe", tmp_path / "back", to_native=True)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()  # no trust_remote_code
    assert type(back) is type(source)
    assert_same_model(source, back)
    source_state, back_state = source.state_dict(), back.state_dict()
    assert source_state.keys() == back_state.keys()
    for key, value in source_state.items():
        assert torch.equal(value, back_state[key]), key


def test_dtype_and_tokenizer_travel_with_the_weights(tmp_path):
    from trainer.data.tokenization import train_tokenizer

    source = native_model("qwen3_moe").to(torch.bfloat16)
    source.save_pretrained(tmp_path / "native")
    tokenizer = train_tokenizer(["the cat sat on the mat", "a dog ran"] * 20, vocab_size=VOCAB + 200)
    tokenizer.save_pretrained(tmp_path / "native")
    assert cli(["convert", str(tmp_path / "native"), str(tmp_path / "out"), "--max-shard-size", "0.00002"]) == 0
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not list(tmp_path.glob("*.partial"))
    with safe_open(shards[0], "pt") as f:
        assert {f.get_tensor(key).dtype for key in f.keys()} == {torch.bfloat16}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tmp_path / "native" / name).read_bytes()
    converted = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():  # bf16: the same operations in the same order, so the same rounding
        torch.testing.assert_close(converted(ids).logits, source(ids).logits, rtol=0, atol=2e-2)


def test_options_without_a_native_class_are_refused_by_name(tmp_path, capsys):
    from models import HashMoEConfig, HashMoEForCausalLM

    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                position_embedding_type="rope", norm_type="rmsnorm", gated_ffn=True, qk_norm=True,
                moe_layers=[1], num_experts=4, router="topk", eval_capacity_factor=None)
    cases = {"router": dict(router="hash", hash_function="random"), "num_shared_experts": dict(num_shared_experts=1),
             "position_embedding_type": dict(position_embedding_type="absolute"), "gated_ffn": dict(gated_ffn=False)}
    for key, change in cases.items():
        HashMoEForCausalLM(HashMoEConfig(**{**base, **change})).save_pretrained(tmp_path / key)
        assert cli(["convert", str(tmp_path / key), str(tmp_path / f"{key}-native"), "--to-native"]) == 2
        err = capsys.readouterr().err
        assert f"model.{key}:" in err and "no transformers class computes it" in err, err
        assert not (tmp_path / f"{key}-native").exists()


def test_native_features_hashmoe_lacks_are_refused_by_name(tmp_path, capsys):
    config = transformers.Qwen3Config(intermediate_size=40, attention_bias=True, **COMMON)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "biased")
    assert cli(["convert", str(tmp_path / "biased"), str(tmp_path / "out")]) == 2
    assert "config.json: attention_bias: is True" in capsys.readouterr().err
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert cli(["convert", str(tmp_path / "gpt2"), str(tmp_path / "out")]) == 2
    assert "model_type: is 'gpt2'" in capsys.readouterr().err


def test_a_transformers_4_config_keeps_its_rope_scaling(tmp_path):
    """Hub checkpoints saved by transformers 4.x say their RoPE scaling as `rope_scaling` beside `rope_theta`
    (Llama 3.1's llama3 type): the converted model computes what transformers computes from the same file."""
    config = transformers.LlamaConfig(intermediate_size=40, rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}, **COMMON)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "native")
    saved = json.loads((tmp_path / "native" / "config.json").read_text())
    legacy = dict(saved.pop("rope_parameters"))
    saved["rope_theta"] = legacy.pop("rope_theta")
    saved["rope_scaling"] = {"type" if "type" in legacy else "rope_type": legacy.pop("rope_type"), **legacy}
    (tmp_path / "native" / "config.json").write_text(json.dumps(saved))
    source = AutoModelForCausalLM.from_pretrained(tmp_path / "native").eval()
    assert source.config.rope_parameters["rope_type"] == "llama3"
    convert(tmp_path / "native", tmp_path / "hashmoe")
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "hashmoe", trust_remote_code=True).eval()
    assert converted.config.rope_parameters["rope_type"] == "llama3"
    assert_same_model(source, converted)


def test_the_source_is_never_replaced_and_a_failure_leaves_no_half_folder(tmp_path, capsys, monkeypatch):
    native_model("llama").save_pretrained(tmp_path / "models" / "native")
    source = tmp_path / "models" / "native"
    for out in (source, tmp_path / "models"):
        assert cli(["convert", str(source), str(out)]) == 2
        assert "is the source" in capsys.readouterr().err
        assert (source / "model.safetensors").is_file()
    import trainer.publish.convert as convert_module

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(convert_module, "save_hashmoe_config", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()

"""`hashmoe convert`: transformers' own checkpoints <-> hashmoe model folders, one layer at a time.

Native families: Llama and Qwen3 (dense), Qwen3-MoE and Mixtral (top-k MoE). Into hashmoe: the native config maps
onto HashMoEConfig's block options (RoPE, RMSNorm, SwiGLU, GQA, QK-norm) and the weights are renamed and fused
where hashmoe fuses them: q, k and v into `qkv_proj`; each expert's gate and up projections into its rows of the
bank's `w1` (transformers' `gate_up_proj` layout), its down projection into `w2`. Out of hashmoe (`--to-native`)
the same maps run backwards into the per-expert layout transformers writes and reads.

The source is read from its safetensors shards through memory maps, one layer's tensors at a time, and the output
is written in shards of at most `max_shard_bytes`: a checkpoint of tens of GB converts on a node with less RAM than
that. Dtypes are kept. The output folder is written under OUT.partial and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default shard size


@dataclass(frozen=True)
class Family:
    """How one transformers model family names what hashmoe holds."""

    model_type: str
    architecture: str
    qk_norm: bool
    moe_block: str | None = None  # the MoE sublayer's name in a block ("mlp", "block_sparse_moe"); None: dense
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert gate, up, down


FAMILIES = {
    "llama": Family("llama", "LlamaForCausalLM", qk_norm=False),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", qk_norm=True),
    "qwen3_moe": Family("qwen3_moe", "Qwen3MoeForCausalLM", qk_norm=True, moe_block="mlp"),
    "mixtral": Family("mixtral", "MixtralForCausalLM", qk_norm=False, moe_block="block_sparse_moe",
                      expert_names=("w1", "w3", "w2")),
}


# ---- configs --------------------------------------------------------------------------------------------
def _require(native: dict, key: str, allowed, family: str) -> None:
    value = native.get(key)
    if value not in allowed:
        raise UserError(f"config.json: {key}", f"is {value!r}; a {family} checkpoint converts only with {key} in "
                        f"{list(allowed)} (hashmoe's block has no counterpart)", "Convert a checkpoint without it.")


def hashmoe_config(native: dict) -> tuple[Family, dict]:
    """The HashMoEConfig keyword arguments that compute what the native config computes."""
    family = FAMILIES.get(native.get("model_type"))
    if family is None:
        raise UserError("config.json: model_type", f"is {native.get('model_type')!r}",
                        f"hashmoe convert reads {', '.join(FAMILIES)} checkpoints (or a hashmoe folder with --to-native).")
    name = family.model_type
    _require(native, "attention_bias", (False, None), name)
    _require(native, "mlp_bias", (False, None), name)
    if native.get("sliding_window") is not None and native.get("use_sliding_window", name == "mixtral"):
        raise UserError("config.json: sliding_window", f"is {native['sliding_window']} (sliding-window attention)",
                        "hashmoe attends over the whole context: convert a checkpoint without a sliding window.")
    layers = native["num_hidden_layers"]
    kwargs = dict(
        vocab_size=native["vocab_size"], hidden_size=native["hidden_size"], num_hidden_layers=layers,
        num_attention_heads=native["num_attention_heads"],
        num_key_value_heads=native.get("num_key_value_heads") or native["num_attention_heads"],
        head_dim=native.get("head_dim") or native["hidden_size"] // native["num_attention_heads"],
        qk_norm=family.qk_norm, max_position_embeddings=native["max_position_embeddings"],
        position_embedding_type="rope", rope_parameters=native_rope_parameters(native),
        norm_type="rmsnorm", layer_norm_eps=native["rms_norm_eps"], hidden_act=native["hidden_act"], gated_ffn=True,
        dropout=float(native.get("attention_dropout") or 0.0), initializer_range=native.get("initializer_range", 0.02),
        tie_word_embeddings=bool(native.get("tie_word_embeddings", False)),
        intermediate_size=native["intermediate_size"], residual_init="layers",
        bos_token_id=native.get("bos_token_id"), eos_token_id=native.get("eos_token_id"),
        pad_token_id=native.get("pad_token_id"), dtype=native.get("dtype") or native.get("torch_dtype"))
    if family.moe_block is None:
        return family, kwargs
    if name == "qwen3_moe":
        sparse_step = native.get("decoder_sparse_step", 1)
        dense = set(native.get("mlp_only_layers") or [])
        experts = _experts(native)
        moe_layers = [i for i in range(layers) if i not in dense and experts > 0 and (i + 1) % sparse_step == 0]
        expert_size, normalize = native["moe_intermediate_size"], native["norm_topk_prob"]
    else:  # Mixtral always renormalises its top-k
        moe_layers, experts, expert_size, normalize = list(range(layers)), _experts(native), \
            native["intermediate_size"], True
    kwargs.update(moe_layers=moe_layers, num_experts=experts, expert_intermediate_size=expert_size, router="topk",
                  num_experts_per_tok=native["num_experts_per_tok"], norm_topk_prob=normalize, scoring_func="softmax",
                  capacity_factor=None, eval_capacity_factor=None, router_jitter=0.0,
                  router_aux_loss_coef=native.get("router_aux_loss_coef", 0.001))
    return family, kwargs


def native_rope_parameters(native: dict) -> dict:
    """transformers 5's `rope_parameters`, or what a 4.x config.json says the same with: `rope_scaling` (its
    `type` or `rope_type`: llama3, yarn, linear, ...) beside a top-level `rope_theta`."""
    params = dict(native.get("rope_parameters") or native.get("rope_scaling") or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", native.get("rope_theta", 10000.0))
    if "partial_rotary_factor" in native:
        params.setdefault("partial_rotary_factor", native["partial_rotary_factor"])
    return params


def _experts(native: dict) -> int:
    """Routed experts per layer: Qwen3-MoE's `num_experts` is saved as `num_local_experts` since transformers 5."""
    return native["num_experts"] if "num_experts" in native else native["num_local_experts"]


NOT_NATIVE = [  # (what the config says, why no native class computes it)
    (lambda c: c.position_embedding_type != "rope", "position_embedding_type", "learned absolute positions"),
    (lambda c: c.norm_type != "rmsnorm", "norm_type", "LayerNorm"),
    (lambda c: not c.gated_ffn, "gated_ffn", "a plain (non-GLU) FFN"),
    (lambda c: c.recurrence is not None, "recurrence", "a ladder or staircase recurrence"),
    (lambda c: c.frozen_ffn_size > 0, "frozen_ffn_size", "frozen random FFN units"),
    (lambda c: c.ffn_linear != "dense", "ffn_linear", "structured (Monarch) projections"),
    (lambda c: c.is_moe and set(c.routers) != {"topk"}, "router", "a router other than top-k"),
    (lambda c: c.is_moe and c.scoring_func != "softmax", "scoring_func", "non-softmax router scores"),
    (lambda c: c.is_moe and c.num_shared_experts > 0, "num_shared_experts", "shared experts"),
    (lambda c: c.is_moe and c.routed_scaling_factor != 1.0, "routed_scaling_factor", "scaled expert weights"),
    (lambda c: c.is_moe and c.router_bias_update_rate > 0, "router_bias_update_rate", "a score correction bias"),
    (lambda c: c.is_moe and c.eval_capacity_factor is not None, "eval_capacity_factor", "an expert capacity at "
     "inference"),
]


def native_config(config) -> tuple[Family, object]:
    """The transformers config class instance that computes what this HashMoEConfig computes, or a UserError
    naming the first option without a native counterpart."""
    import transformers

    for test, key, what in NOT_NATIVE:
        if test(config):
            raise UserError(f"model.{key}", f"is {getattr(config, key)!r} ({what}): no transformers class computes "
                            "it", "Convert a model without it, or publish it as a hashmoe folder (trust_remote_code).")
    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
        rope_parameters=dict(config.rope_parameters), rms_norm_eps=config.layer_norm_eps, hidden_act=config.hidden_act,
        attention_dropout=config.dropout, initializer_range=config.initializer_range,
        tie_word_embeddings=config.tie_word_embeddings, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, attention_bias=False)
    if not config.is_moe:
        family = FAMILIES["qwen3" if config.qk_norm else "llama"]
        extra = {} if config.qk_norm else {"mlp_bias": False}
        native = getattr(transformers, family.architecture.replace("ForCausalLM", "Config"))(
            intermediate_size=config.intermediate_size, **common, **extra)
    elif config.qk_norm:
        family = FAMILIES["qwen3_moe"]
        native = transformers.Qwen3MoeConfig(
            intermediate_size=config.intermediate_size, moe_intermediate_size=config.expert_intermediate_size,
            num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
            norm_topk_prob=config.norm_topk_prob, decoder_sparse_step=1, use_sliding_window=False,
            mlp_only_layers=[i for i in range(config.num_hidden_layers) if i not in config.moe_layers],
            router_aux_loss_coef=config.router_aux_loss_coef, **common)
    else:
        if config.moe_layers != list(range(config.num_hidden_layers)):
            raise UserError("model.moe_layers", f"is {config.moe_layers}: Mixtral (the native top-k MoE without "
                            "QK-norm) has an MoE FFN in every layer", "Use MoE in every layer, or qk_norm: true "
                            "(Qwen3-MoE, which allows dense layers).")
        if not config.norm_topk_prob:
            raise UserError("model.norm_topk_prob", "is false: Mixtral always renormalises its top-k weights",
                            "Use norm_topk_prob: true, or qk_norm: true (Qwen3-MoE has the option).")
        family = FAMILIES["mixtral"]
        native = transformers.MixtralConfig(
            intermediate_size=config.expert_intermediate_size, num_local_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok, sliding_window=None, router_jitter_noise=0.0,
            router_aux_loss_coef=config.router_aux_loss_coef, **common)
    native.architectures = [family.architecture]
    if getattr(config, "dtype", None) is not None:
        native.dtype = config.dtype
    return family, native


# ---- weights --------------------------------------------------------------------------------------------
class SafetensorsFolder:
    """The tensors of a model folder's safetensors files, read on demand through memory maps."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            shard_of = json.loads(index.read_text())["weight_map"]
        else:
            shard_of = {}
            for path in sorted(folder.glob("*.safetensors")):
                with safe_open(path, "pt") as f:
                    shard_of.update({key: path.name for key in f.keys()})
        if not shard_of:
            raise UserError(str(folder), "holds no safetensors weights (model.safetensors or an index of shards)",
                            "Save the model with save_pretrained (safetensors is its default) and convert that folder.")
        self.folder, self.shard_of = folder, shard_of
        self.handles = {name: safe_open(folder / name, "pt") for name in sorted(set(shard_of.values()))}

    def keys(self) -> list[str]:
        return list(self.shard_of)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.shard_of:
            raise UserError(str(self.folder), f"has no tensor {key!r}", "Convert a complete checkpoint folder.")
        return self.handles[self.shard_of[key]].get_tensor(key)

    def by_layer(self) -> tuple[list[str], dict[int, list[str]]]:
        """Keys outside the layers, and each layer's keys (without the `model.layers.i.` prefix)."""
        outside, layers = [], {}
        for key in self.keys():
            match = LAYER_KEY.match(key)
            if match is None:
                outside.append(key)
            else:
                layers.setdefault(int(match[1]), []).append(match[2])
        return outside, layers


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_bytes` (one tensor larger than that gets a shard of
    its own), named as transformers names them, with the index when there is more than one."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes, self.shards, self.total_bytes = 0, [], 0
        self.shapes: dict[str, tuple] = {}  # every tensor added, flushed or not

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.shapes[name] = tuple(tensor.shape)
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.folder / f"shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, (path, names) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def native_layer_to_hashmoe(family: Family, keys: list[str], get, is_moe: bool) -> dict[str, torch.Tensor]:
    """One block's tensors in hashmoe's names. `keys`: the native names without the `model.layers.i.` prefix;
    `get(name)`: that tensor."""
    out = {}
    for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight"):
        out[name] = get(name)
    if family.qk_norm:
        out["self_attn.q_norm.weight"], out["self_attn.k_norm.weight"] = get("self_attn.q_norm.weight"), \
            get("self_attn.k_norm.weight")
    out["self_attn.qkv_proj.weight"] = torch.cat([get(f"self_attn.{p}_proj.weight") for p in "qkv"])
    if not is_moe:
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[f"mlp.{name}.weight"] = get(f"mlp.{name}.weight")
        return out
    block = family.moe_block
    out["mlp.router.weight"] = get(f"{block}.gate.weight")
    if f"{block}.experts.gate_up_proj" in keys:  # transformers' fused in-memory layout, saved as it is
        out["mlp.experts.w1"], out["mlp.experts.w2"] = get(f"{block}.experts.gate_up_proj"), \
            get(f"{block}.experts.down_proj")
        return out
    gate, up, down = family.expert_names
    num_experts = len({key.split(".")[2] for key in keys if key.startswith(f"{block}.experts.")})
    out["mlp.experts.w1"] = torch.stack([torch.cat([get(f"{block}.experts.{e}.{gate}.weight"),
                                                    get(f"{block}.experts.{e}.{up}.weight")])
                                         for e in range(num_experts)])
    out["mlp.experts.w2"] = torch.stack([get(f"{block}.experts.{e}.{down}.weight") for e in range(num_experts)])
    return out


def hashmoe_layer_to_native(family: Family, get, config, is_moe: bool) -> dict[str, torch.Tensor]:
    """The inverse of `native_layer_to_hashmoe`, into the per-expert layout transformers saves."""
    out = {name: get(name) for name in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                        "self_attn.o_proj.weight")}
    if family.qk_norm:
        out["self_attn.q_norm.weight"], out["self_attn.k_norm.weight"] = get("self_attn.q_norm.weight"), \
            get("self_attn.k_norm.weight")
    q_rows, kv_rows = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    q, k, v = get("self_attn.qkv_proj.weight").split([q_rows, kv_rows, kv_rows])
    out.update({"self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v})
    if not is_moe:
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[f"mlp.{name}.weight"] = get(f"mlp.{name}.weight")
        return out
    block, (gate, up, down) = family.moe_block, family.expert_names
    out[f"{block}.gate.weight"] = get("mlp.router.weight")
    w1, w2 = get("mlp.experts.w1"), get("mlp.experts.w2")
    for e in range(w1.shape[0]):
        out[f"{block}.experts.{e}.{gate}.weight"], out[f"{block}.experts.{e}.{up}.weight"] = w1[e].chunk(2)
        out[f"{block}.experts.{e}.{down}.weight"] = w2[e]
    return out


# ---- the command ----------------------------------------------------------------------------------------
def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(str(folder), "has no config.json", "Pass a model folder (save_pretrained's output).")
    return json.loads(path.read_text())


def copy_side_files(source: Path, staging: Path) -> None:
    """The tokenizer and the generation config travel with the weights, byte for byte."""
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, staging / name)


def open_staging(out_dir: Path, source: Path) -> Path:
    """OUT.partial, empty: the output is written there and renamed into place only when complete. OUT must not be
    the source or a folder holding it (replacing OUT would delete the source)."""
    if out_dir.resolve() == source.resolve() or out_dir.resolve() in source.resolve().parents:
        raise UserError(str(out_dir), f"is the source {source} or a folder holding it, and OUT is replaced",
                        "Write to another folder.")
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish_staging(staging: Path, out_dir: Path, source: Path) -> Path:
    """Copy the source's tokenizer and generation config in, then replace OUT with the complete folder."""
    copy_side_files(source, staging)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    return out_dir


def convert(source: str | Path, out_dir: str | Path, to_native: bool = False,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress=None) -> Path:
    """Convert the model folder `source` into `out_dir` (see the module docstring). `progress(done, total)` is
    called after each layer."""
    source, out_dir = Path(source), Path(out_dir)
    if not source.is_dir():
        raise UserError(str(source), "is not a folder", "Pass a model folder (save_pretrained's output).")
    native = read_config(source)
    if to_native:
        if native.get("model_type") != "hashmoe":
            raise UserError("--to-native", f"converts a hashmoe folder, but {source} holds "
                            f"{native.get('model_type')!r}", "Pass a folder written by hashmoe export or convert.")
        from models import HashMoEConfig
        from trainer.run.config import saved_model_fields

        config = HashMoEConfig.from_dict(saved_model_fields(native))
        family, out_config = native_config(config)
    else:
        out_config = None
        family, kwargs = hashmoe_config(native)
        from models import HashMoEConfig

        try:
            config = HashMoEConfig(**kwargs)
        except ValueError as error:
            raise UserError(str(source / "config.json"), f"maps onto no valid hashmoe model ({error})",
                            "Convert a checkpoint whose shape hashmoe supports.") from None
    reader = SafetensorsFolder(source)
    outside, layers = reader.by_layer()
    if sorted(layers) != list(range(config.num_hidden_layers)):
        raise UserError(str(source), f"holds weights of layers {sorted(layers)[:5]}... for "
                        f"num_hidden_layers={config.num_hidden_layers}", "Convert a complete checkpoint folder.")
    staging = open_staging(out_dir, source)
    try:
        return _write_converted(source, out_dir, staging, reader, outside, layers, config, family, out_config,
                                max_shard_bytes, progress)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failed conversion leaves no half folder behind
        raise


def _write_converted(source: Path, out_dir: Path, staging: Path, reader: SafetensorsFolder, outside: list[str],
                     layers: dict[int, list[str]], config, family: Family, out_config, max_shard_bytes: int,
                     progress) -> Path:
    """The tensors of `reader` (`outside` the layers, and each layer's) into `staging`, then OUT: into hashmoe, or
    with `out_config` (a transformers config) into that native class."""
    to_native = out_config is not None
    writer = ShardWriter(staging, max_shard_bytes)
    expected = None if to_native else expected_state(config)
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        if key in outside and not (key == "lm_head.weight" and config.tie_word_embeddings):
            writer.add(key, reader.get(key))
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        is_moe = i in config.moe_layers

        def get(name, prefix=prefix):
            return reader.get(prefix + name)
        if to_native:
            tensors = hashmoe_layer_to_native(family, get, config, is_moe)
        else:
            tensors = native_layer_to_hashmoe(family, layers[i], get, is_moe)
        for name, tensor in tensors.items():
            writer.add(prefix + name, tensor)
        if progress is not None:
            progress(i + 1, config.num_hidden_layers)
    if expected is not None:
        check_against(expected, writer, source)
    writer.finish()
    if to_native:
        out_config.save_pretrained(staging)
    else:
        save_hashmoe_config(config, staging)
    return publish_staging(staging, out_dir, source)


def expected_state(config) -> dict[str, tuple]:
    """Names and shapes of the hashmoe model's saved tensors (built on the meta device: no memory)."""
    from models import HashMoEForCausalLM

    with torch.device("meta"):
        model = HashMoEForCausalLM(config)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def check_against(expected: dict[str, tuple], writer: ShardWriter, source: Path) -> None:
    written = writer.shapes
    missing = sorted(set(expected) - set(written))
    unexpected = sorted(set(written) - set(expected))
    wrong = sorted(n for n in set(written) & set(expected) if written[n] != expected[n])
    if missing or unexpected or wrong:
        raise UserError(str(source), f"does not fill the hashmoe model: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}, wrong shape {wrong[:3]}", "Convert a complete checkpoint folder; "
                        "if it is one, this is a hashmoe bug: please report it.")


def save_hashmoe_config(config, staging: Path) -> None:
    """config.json with auto_map and the model code beside it, as `save_pretrained` writes them for an exported
    hashmoe model (the model is built on the meta device: only its class is needed)."""
    from transformers.dynamic_module_utils import custom_object_save

    from models import HashMoEForCausalLM

    with torch.device("meta"):
        model = HashMoEForCausalLM(config)
    config.architectures = ["HashMoEForCausalLM"]
    custom_object_save(model, staging, config=config)
    config.save_pretrained(staging)

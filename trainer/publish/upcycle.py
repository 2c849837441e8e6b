"""`hashmoe upcycle`: a dense checkpoint into a Mixture-of-Experts whose experts start as copies of its FFN.

Sparse upcycling (Komatsuzaki et al. 2023, arXiv 2212.05055; Megatron-Core's `--moe-use-upcycling`): in the MoE
layers every expert is initialised with the dense FFN's weights and a new router is drawn; everything else is
copied. At step 0 the MoE layer computes sum_k weight_k * FFN(x) = FFN(x) * sum_k weight_k, so the upcycled model
equals the dense one exactly where a token's weights sum to 1:
  - hash (one expert, weight 1; or k experts with norm_topk_prob) and top-k with norm_topk_prob: equal;
  - Switch: the weight is the chosen expert's softmax probability p < 1, so the FFN output starts scaled by p
    (about 1/E at init), and capacity drops tokens in training; BASE: scaled by its sigmoid gate (about 1/2);
    a hash gate (sqrtsoftplus) with one expert: scaled by sqrt(softplus(x . w)) (about 0.83).
  Training recovers from the scaling within a few steps, but the step-0 loss is not the dense model's.

The source (Llama, Qwen3 or a dense hashmoe folder) is read one layer at a time through memory maps, as in
`hashmoe convert`; the E copies of one layer's FFN are the largest thing held in memory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from trainer.errors import UserError
from trainer.publish.convert import (
    DEFAULT_MAX_SHARD_BYTES,
    SafetensorsFolder,
    ShardWriter,
    check_against,
    expected_state,
    hashmoe_config,
    native_layer_to_hashmoe,
    open_staging,
    publish_staging,
    read_config,
    save_hashmoe_config,
)
from trainer.run.config import saved_model_fields

UPCYCLE_ROUTERS = ("hash", "topk", "switch", "base")


def dense_source(source: Path) -> tuple[dict, object]:
    """The source's config as HashMoEConfig keyword arguments, and how to read one layer in hashmoe's names."""
    saved = read_config(source)
    if saved.get("model_type") == "hashmoe":
        kwargs = saved_model_fields(saved)
        if kwargs.get("moe_layers"):
            raise UserError(str(source), f"is already a Mixture-of-Experts (moe_layers={kwargs['moe_layers']})",
                            "Upcycle a dense model.")
        for key, what in (("frozen_ffn_size", 0), ("ffn_linear", "dense"), ("recurrence", None)):
            if kwargs.get(key, what) != what:
                raise UserError(f"model.{key}", f"is {kwargs[key]!r}: upcycling copies a plain dense FFN into "
                                "the experts", "Upcycle a model without it.")
        return kwargs, None
    family, kwargs = hashmoe_config(saved)
    if family.moe_block is not None:
        raise UserError(str(source), f"is a {family.architecture}, already a Mixture-of-Experts",
                        "Bring it in with `hashmoe convert` instead; upcycling starts from a dense model.")
    return kwargs, family


def upcycle(source: str | Path, out_dir: str | Path, num_experts: int, router: str,
            moe_layers: list[int] | None = None, num_experts_per_tok: int = 2, hash_function: str = "random",
            seed: int = 0, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress=None) -> Path:
    """Write the upcycled model of the dense folder `source` into `out_dir` (see the module docstring)."""
    from models import HashMoEConfig

    source, out_dir = Path(source), Path(out_dir)
    if router not in UPCYCLE_ROUTERS:
        raise UserError("--router", f"is {router!r}", f"Use one of {', '.join(UPCYCLE_ROUTERS)}.")
    if num_experts < 2:
        raise UserError("--num-experts", f"is {num_experts}", "Use at least 2 experts.")
    kwargs, family = dense_source(source)
    layers = kwargs["num_hidden_layers"]
    moe_layers = list(range(layers)) if moe_layers is None else sorted(moe_layers)
    kwargs.update(moe_layers=moe_layers, num_experts=num_experts, router=router,
                  expert_intermediate_size=kwargs["intermediate_size"], num_experts_per_tok=num_experts_per_tok,
                  hash_function=hash_function, hash_seed=seed, norm_topk_prob=True, capacity_factor=None,
                  eval_capacity_factor=None, hash_heads=1, hash_experts_per_tok=1, hash_gate="none",
                  # MoE options a dense hashmoe config may carry unused: the upcycled layer is the plain one
                  num_shared_experts=0, scoring_func="softmax", routed_scaling_factor=1.0,
                  router_bias_update_rate=0.0)
    try:
        config = HashMoEConfig(**kwargs)
    except ValueError as error:
        key = str(error).removeprefix("HashMoEConfig.").split(":")[0]
        flag = {"moe_layers": "--moe-layers", "num_experts_per_tok": "--top-k", "hash_function": "--hash-function"}
        raise UserError(flag.get(key, f"model.{key}"), str(error).split(": ", 1)[-1], "Fix the option.") from None
    reader = SafetensorsFolder(source)
    staging = open_staging(out_dir, source)
    try:
        return _write_upcycled(source, out_dir, staging, reader, config, family, seed, max_shard_bytes, progress)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failed upcycling leaves no half folder behind
        raise


def _write_upcycled(source: Path, out_dir: Path, staging: Path, reader: SafetensorsFolder, config, family,
                    seed: int, max_shard_bytes: int, progress) -> Path:
    from models.routing import build_router

    outside, layer_keys = reader.by_layer()
    layers, moe_layers = config.num_hidden_layers, config.moe_layers
    writer = ShardWriter(staging, max_shard_bytes)
    for key in ("model.embed_tokens.weight", "model.embed_positions.weight", "model.norm.weight",
                "model.norm.bias", "lm_head.weight"):
        if key in outside and not (key == "lm_head.weight" and config.tie_word_embeddings):
            writer.add(key, reader.get(key))
    torch.manual_seed(seed)  # the new routers' weights
    for i in range(layers):
        prefix = f"model.layers.{i}."

        def get(name, prefix=prefix):
            return reader.get(prefix + name)
        if family is None:  # a hashmoe folder: already in hashmoe's names
            tensors = {name: get(name) for name in layer_keys[i]}
        else:
            tensors = native_layer_to_hashmoe(family, layer_keys[i], get, is_moe=False)
        if i in moe_layers:
            tensors.update(upcycled_ffn(tensors, config, build_router(config, i)))
        for name, tensor in tensors.items():
            writer.add(prefix + name, tensor)
        if progress is not None:
            progress(i + 1, layers)
    check_against(expected_state(config), writer, source)
    writer.finish()
    save_hashmoe_config(config, staging)
    return publish_staging(staging, out_dir, source)


def upcycled_ffn(tensors: dict, config, router: torch.nn.Module) -> dict[str, torch.Tensor]:
    """One layer's dense FFN tensors (removed from `tensors`) as an MoE's: every expert a copy of the FFN
    (w1 = [gate; up] when gated, else up; w2 = down), and the new router's parameters and tables."""
    up, down = tensors.pop("mlp.up_proj.weight"), tensors.pop("mlp.down_proj.weight")
    w1 = torch.cat([tensors.pop("mlp.gate_proj.weight"), up]) if config.gated_ffn else up
    E = config.num_experts
    out = {"mlp.experts.w1": w1.expand(E, *w1.shape).contiguous(),
           "mlp.experts.w2": down.expand(E, *down.shape).contiguous()}
    if hasattr(router, "reset_parameters"):
        router.reset_parameters()
    for name, tensor in router.state_dict().items():
        out[f"mlp.router.{name}"] = tensor.to(w1.dtype) if tensor.is_floating_point() else tensor
    return out

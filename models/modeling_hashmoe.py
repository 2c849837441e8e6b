"""hashmoe causal language model: a pre-norm decoder whose FFN sublayers are dense or Mixture-of-Experts.

The block is GPT-2's by default and, by config, the block of the 2026 MoE models (Qwen3-MoE, Mixtral, DeepSeek):
RoPE, RMSNorm, SwiGLU FFNs and experts, grouped-query attention, per-head QK-norm, shared experts.

References:
  Hash Layers      Roller, Sukhbaatar, Szlam, Weston 2021, arXiv 2106.04426
  Switch           Fedus, Zoph, Shazeer 2021, arXiv 2101.03961
  BASE layers      Lewis, Bhosale, Dettmers, Goyal, Zettlemoyer 2021, arXiv 2103.16716
  GPT-2 layout     Radford et al. 2019 (pre-norm, learned positions, tied embeddings)
  RoPE             Su et al. 2021, arXiv 2104.09864;  RMSNorm  Zhang & Sennrich 2019, arXiv 1910.07467
  GLU FFNs         Shazeer 2020, arXiv 2002.05202;    GQA      Ainslie et al. 2023, arXiv 2305.13245
  Shared experts   Dai et al. 2024 (DeepSeekMoE), arXiv 2401.06066

Shape suffixes: B batch, S query length, P cached + new length, D width, T = B*S tokens, E experts, H query
heads, Hkv key/value heads, hd head width.

The model knows nothing of processes or DeepSpeed: expert parallelism replaces each `HashMoESparseMLP` from
outside (trainer/parallel/expert_parallel.py) with a module of the same call signature.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_hashmoe import HashMoEConfig
from .experts import EXPERTS_IMPLEMENTATIONS, ExpertBank, dispatch, expert_init_std, glu_or_act
from .routing import (
    BaseRouter,
    HashRouter,
    RouterOutput,
    RoutingInputs,
    SoftmaxRouter,
    build_router,
    count_per_expert,
)
from .staircase import Staircase, StaircaseCache
from .structured import MonarchLinear


@dataclass
class MoELayerStats:
    """What one MoE layer reports per forward: the routing and the load it produced."""

    router: RouterOutput
    tokens_per_expert_E: torch.Tensor  # assignments each expert processed (after dropping)
    dropped: torch.Tensor  # number of dropped assignments
    chosen_per_expert_E: torch.Tensor  # assignments the router chose for each expert (before capacity)


# transformers 5.24 renamed the cache field of every output class from `past_key_values` to `cache`. The outputs
# below extend transformers' own MoE outputs, so they carry whichever name the installed release uses.
CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def resolve_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The forward's cache under either name; the old name warns where the installed release renamed it."""
    if past_key_values is None:
        return cache
    if CACHE_FIELD == "cache":
        warnings.warn("`past_key_values` is deprecated since transformers 5.24: pass `cache` instead",
                      FutureWarning, stacklevel=3)
    return past_key_values if cache is None else cache


@dataclass
class HashMoEModelOutput(MoeModelOutputWithPast):
    """transformers' MoE decoder output plus, per MoE layer (and ladder pass), the routing: `expert_indices`
    (when `output_router_logits`), and always `expert_load` ([E] assignments per expert), `expert_load_chosen`
    (the same before capacity dropped any), `dropped_tokens` and the summed router `aux_loss`."""

    aux_loss: torch.Tensor | None = None
    expert_indices: tuple[torch.Tensor, ...] | None = None
    expert_load: tuple[torch.Tensor, ...] | None = None
    expert_load_chosen: tuple[torch.Tensor, ...] | None = None
    dropped_tokens: torch.Tensor | None = None


@dataclass
class HashMoECausalLMOutput(MoeCausalLMOutputWithPast):
    """`loss` = `lm_loss` + `aux_loss` (transformers' causal-LM loss plus the routers' auxiliary losses; `aux_loss`
    is returned with labels or `output_router_logits`, as in transformers' MoE models).
    Per MoE layer: `router_logits` and `expert_indices` (when `output_router_logits`), and always `expert_load`
    ([E] assignments per expert, summed over ladder passes), `expert_load_chosen` (before capacity) and
    `dropped_tokens`."""

    lm_loss: torch.Tensor | None = None
    expert_indices: tuple[torch.Tensor, ...] | None = None
    expert_load: tuple[torch.Tensor, ...] | None = None
    expert_load_chosen: tuple[torch.Tensor, ...] | None = None
    dropped_tokens: torch.Tensor | None = None


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """softmax(q k^T * scaling + mask) v, returning the weights too (`output_attentions`). Layout as
    transformers' attention functions: inputs [B, H, S, hd] (keys and values [B, Hkv, P, hd], each serving
    `module.num_key_value_groups` query heads), output [B, S, H, hd]."""
    groups = module.num_key_value_groups
    if groups > 1:
        key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    weights_BHSP = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights_BHSP = weights_BHSP + attention_mask
    weights_BHSP = F.softmax(weights_BHSP, dim=-1, dtype=torch.float32).to(query.dtype)
    weights_BHSP = F.dropout(weights_BHSP, p=dropout, training=module.training)
    return torch.matmul(weights_BHSP, value).transpose(1, 2).contiguous(), weights_BHSP


@dataclass
class AttentionLayout:
    """Which keys each query may see, before the cache tells how many keys there are: the queries' absolute
    positions and, with padding, which of the keys so far are real tokens. A static cache returns all its
    `max_cache_len` slots, so the mask is built per layer from the keys actually returned."""

    query_pos_S: torch.Tensor
    key_real_BP: torch.Tensor | None  # attention_mask [B, tokens so far], 1 = real token
    ready_mask: torch.Tensor | None = None  # a 4-D mask given by the caller, used as it is
    plain_causal: bool = False  # no cache, no padding: attention functions may use their causal kernels
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # RoPE's (cos, sin) [B, S, rotary dims] of the queries

    def mask_for(self, num_keys: int, implementation: str, dtype: torch.dtype) -> torch.Tensor | None:
        if self.ready_mask is not None:
            return self.ready_mask[..., :num_keys]
        if self.plain_causal and num_keys == self.query_pos_S.shape[0] and implementation != "eager":
            return None  # sdpa's own causal kernel (is_causal); eager has none and needs the mask
        allowed_B1SP = attention_allowed(self.key_real_BP, self.query_pos_S, num_keys)
        if implementation == "sdpa":
            return allowed_B1SP
        return torch.zeros(allowed_B1SP.shape, dtype=dtype, device=allowed_B1SP.device).masked_fill(
            ~allowed_B1SP, torch.finfo(dtype).min)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and scaled in the input's dtype, as transformers' Llama, Qwen3 and
    Mixtral norms (so converted checkpoints compute what their own classes compute, in bf16 too)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: HashMoEConfig, size: int) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return RMSNorm(size, config.layer_norm_eps)
    return nn.LayerNorm(size, eps=config.layer_norm_eps)


class HashMoERotaryEmbedding(nn.Module):
    """cos and sin of the rotation angles position * inv_freq, per position id, in transformers' rotary layout and
    interface (`inv_freq` / `original_inv_freq` buffers, `rope_type`, `attention_scaling`), so transformers'
    rope utilities apply as they do to its own models: the scaled types (linear, yarn, llama3, longrope) through
    `ROPE_INIT_FUNCTIONS`, and the sequence-length-dependent ones (dynamic, longrope) through
    `dynamic_rope_update`, which recomputes the frequencies when a longer input arrives."""

    def __init__(self, config: HashMoEConfig, device=None):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        inv_freq, self.attention_scaling = self.frequencies(config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: HashMoEConfig, device=None, seq_len=None,
                                        **kwargs) -> tuple[torch.Tensor, float]:
        """RoPE's own frequencies (Su et al. 2021): theta^(-2i / d) over the rotated dims d of a head."""
        params = config.rope_parameters
        dim = int(config.head_dim * params.get("partial_rotary_factor", 1.0))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0

    def frequencies(self, config: HashMoEConfig, device=None) -> tuple[torch.Tensor, float]:
        if self.rope_type == "default":
            return self.compute_default_rope_parameters(config, device)
        return ROPE_INIT_FUNCTIONS[self.rope_type](config, device)

    def reset_frequencies(self) -> None:
        """Recompute the buffers (they are not saved: a model loaded onto the meta device gets them here)."""
        inv_freq, self.attention_scaling = self.frequencies(self.config, self.inv_freq.device)
        self.inv_freq.copy_(inv_freq)
        self.original_inv_freq.copy_(inv_freq)

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles_BSR = position_ids_BS[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        angles_BSR = torch.cat([angles_BSR, angles_BSR], dim=-1)
        return ((angles_BSR.cos() * self.attention_scaling).to(x.dtype),
                (angles_BSR.sin() * self.attention_scaling).to(x.dtype))


def apply_rotary(x_BHSd: torch.Tensor, cos_BSR: torch.Tensor, sin_BSR: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dims of each head (all of them unless partial_rotary_factor < 1) by the position's
    angles, pairing dim i with dim i + R/2 (the "rotate half" layout of transformers' Llama/Qwen checkpoints)."""
    R = cos_BSR.shape[-1]
    rotated, passed = x_BHSd[..., :R], x_BHSd[..., R:]
    first, second = rotated.chunk(2, dim=-1)
    cos, sin = cos_BSR.unsqueeze(1), sin_BSR.unsqueeze(1)
    rotated = rotated * cos + torch.cat([-second, first], dim=-1) * sin
    return rotated if passed.shape[-1] == 0 else torch.cat([rotated, passed], dim=-1)


class HashMoEAttention(nn.Module):
    """Causal self-attention through transformers' attention interface (eager or sdpa), with a KV cache:
    multi-head, or grouped-query with fewer key/value heads; optional per-head QK-norm and RoPE. One fused
    projection `qkv_proj` holds [q; k; v] rows (H*hd, Hkv*hd, Hkv*hd)."""

    def __init__(self, config: HashMoEConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads  # read by transformers' sdpa
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        self.is_causal = True  # read by transformers' sdpa function
        self.split_sizes = [self.num_heads * self.head_dim] + [self.num_key_value_heads * self.head_dim] * 2
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.split_sizes), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.o_proj.writes_residual = True
        if config.qk_norm:
            self.q_norm = make_norm(config, self.head_dim)
            self.k_norm = make_norm(config, self.head_dim)
        self.dropout = config.dropout

    def project(self, x_BSD: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None):
        """Queries [B, H, S, hd], keys and values [B, Hkv, S, hd]: normed and rotated, ready for the cache."""
        B, S, _ = x_BSD.shape
        q, k, v = (t.view(B, S, -1, self.head_dim) for t in self.qkv_proj(x_BSD).split(self.split_sizes, dim=-1))
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        return q, k, v

    def forward(self, x_BSD: torch.Tensor, layout: AttentionLayout, cache: Cache | None,
                cache_index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, S, _ = x_BSD.shape
        q, k, v = self.project(x_BSD, layout.rotary)
        if cache is not None:
            k, v = cache.update(k, v, cache_index)
        implementation = self.config._attn_implementation or "sdpa"
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        y_BSHd, weights = attend(self, q, k, v, layout.mask_for(k.shape[2], implementation, q.dtype),
                                 dropout=self.dropout if self.training else 0.0, scaling=self.scaling)
        return self.o_proj(y_BSHd.reshape(B, S, -1)), weights


class HashMoEMLP(nn.Module):
    """Dense FFN: act(x W_up^T) W_down^T, or with `gated_ffn` the GLU form act(x W_gate^T) * (x W_up^T) W_down^T
    (SwiGLU with silu), optionally with structured (Monarch) projections, plus optional frozen random hidden units
    ("doping", Chatelain et al. 2021): act(x U^T) V^T with U, V fixed by a seed, stored as buffers, never in the
    optimizer and never receiving gradients. `intermediate_size` given: a MoE layer's shared experts (plain
    projections, no doping)."""

    def __init__(self, config: HashMoEConfig, layer_idx: int = 0, intermediate_size: int | None = None):
        super().__init__()
        shared = intermediate_size is not None
        D, F = config.hidden_size, intermediate_size or config.intermediate_size
        if config.ffn_linear == "monarch" and not shared:
            def linear(n_in, n_out):
                return MonarchLinear(n_in, n_out, config.monarch_blocks)
        else:
            def linear(n_in, n_out):
                return nn.Linear(n_in, n_out, bias=False)
        self.gated = config.gated_ffn
        if self.gated:
            self.gate_proj = linear(D, F)
        self.up_proj = linear(D, F)
        self.down_proj = linear(F, D)
        self.down_proj.writes_residual = True
        self.activation = config.hidden_act
        self.frozen_size = 0 if shared else config.frozen_ffn_size
        if self.frozen_size:
            self.frozen_seed = config.frozen_seed + 1000 * layer_idx
            self.frozen_std = expert_init_std(config.initializer_range, config.residual_depth)
            frozen_up, frozen_down = self._draw_frozen_units(D)
            self.register_buffer("frozen_up", frozen_up)
            self.register_buffer("frozen_down", frozen_down)

    def _draw_frozen_units(self, D: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Drawn on CPU from the seed alone (also under from_pretrained's meta device): same on every rank.
        std, out_std = self.frozen_std
        with torch.device("cpu"):
            generator = torch.Generator().manual_seed(self.frozen_seed)
            frozen_up = torch.randn(self.frozen_size, D, generator=generator) * std
            frozen_down = torch.randn(D, self.frozen_size, generator=generator) * out_std
        return frozen_up, frozen_down

    def reset_frozen_units(self) -> None:
        frozen_up, frozen_down = self._draw_frozen_units(self.frozen_up.shape[1])
        self.frozen_up.copy_(frozen_up)
        self.frozen_down.copy_(frozen_down)

    def forward(self, x_BSD: torch.Tensor, routing: RoutingInputs | None = None) -> tuple[torch.Tensor, None]:
        pre_BSC = torch.cat([self.gate_proj(x_BSD), self.up_proj(x_BSD)], -1) if self.gated else self.up_proj(x_BSD)
        y_BSD = self.down_proj(glu_or_act(pre_BSC, self.activation, self.gated))
        if self.frozen_size:
            frozen_BSF = F.linear(x_BSD, self.frozen_up)
            y_BSD = y_BSD + F.linear(glu_or_act(frozen_BSF, self.activation, False), self.frozen_down)
        return y_BSD, None


class HashMoESparseMLP(nn.Module):
    """MoE FFN: router + expert bank + sort-based dispatch, all experts in this process, plus the shared experts
    (`shared_mlp`, DeepSeek's always-on experts; not named "experts...", which DeepSpeed's checkpointing would
    file as routed experts)."""

    def __init__(self, config: HashMoEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.router = build_router(config, layer_idx)
        segments = config.hash_heads if config.router_of(layer_idx) == "hash" else 1
        self.experts = ExpertBank(config.num_experts, config.hidden_size, config.expert_intermediate_size,
                                  config.hidden_act, num_segments=segments, gated=config.gated_ffn)
        if config.num_shared_experts:
            self.shared_mlp = HashMoEMLP(config, layer_idx,
                                         intermediate_size=config.num_shared_experts * config.expert_intermediate_size)

    def forward(self, x_BSD: torch.Tensor, routing: RoutingInputs) -> tuple[torch.Tensor, MoELayerStats]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        routed = self.router(x_TD, routing)
        y_TD = dispatch(x_TD, routed.expert_index_TK, routed.expert_weight_TK, self.experts,
                        implementation=experts_implementation(self.config))
        return with_shared_experts(self, x_BSD, y_TD.view_as(x_BSD)), moe_layer_stats(routed, self.num_experts)


def with_shared_experts(moe: nn.Module, x_BSD: torch.Tensor, routed_BSD: torch.Tensor) -> torch.Tensor:
    """The routed experts' output plus the shared experts' where the layer has them (also called by the
    expert-parallel twin of the layer)."""
    shared = getattr(moe, "shared_mlp", None)
    return routed_BSD if shared is None else routed_BSD + shared(x_BSD)[0]


def experts_implementation(config: HashMoEConfig) -> str | None:
    """transformers' `config._experts_implementation` (from_pretrained(experts_implementation=...)); None under
    a transformers without it: grouped_mm where it runs."""
    return getattr(config, "_experts_implementation", None)


def moe_layer_stats(routed: RouterOutput, num_experts: int) -> MoELayerStats:
    index = routed.expert_index_TK
    kept_E = count_per_expert(index, num_experts)
    chosen_E = kept_E if routed.chosen_index_TK is None else count_per_expert(routed.chosen_index_TK, num_experts)
    return MoELayerStats(routed, kept_E, (index < 0).sum(), chosen_E)


class HashMoEBlock(GradientCheckpointingLayer):
    """Pre-norm block. `x_BSD` travels positionally so gradient checkpointing (HF's, re-entrant or not) sees
    it; the cache is `past_key_values` so checkpointing drops it in training, as for transformers' layers."""

    def __init__(self, config: HashMoEConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(config, config.hidden_size)
        self.self_attn = HashMoEAttention(config)
        self.post_attention_layernorm = make_norm(config, config.hidden_size)
        is_moe = layer_idx in config.moe_layers
        self.mlp = HashMoESparseMLP(config, layer_idx) if is_moe else HashMoEMLP(config, layer_idx)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x_BSD, layout: AttentionLayout, routing: RoutingInputs, past_key_values: Cache | None = None,
                cache_index: int = 0):
        attn_BSD, weights = self.self_attn(self.input_layernorm(x_BSD), layout, past_key_values, cache_index)
        x_BSD = x_BSD + self.dropout(attn_BSD)
        ffn_BSD, stats = self.mlp(self.post_attention_layernorm(x_BSD), routing)
        return x_BSD + self.dropout(ffn_BSD), weights, stats


class HashMoEPreTrainedModel(PreTrainedModel):
    config_class = HashMoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["HashMoEBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = False  # flash kernels take no boolean mask; padding and the staircase need one
    _supports_flex_attn = False
    _supports_attention_backend = True

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers decides this from the source (its use_experts_implementation decorator), else makes
        # every model "eager". The bank reads config._experts_implementation itself.
        return True

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str | None:
        # transformers would make an unset choice "grouped_mm"; unset, the bank picks per device (grouped_mm on
        # CUDA, the loop on CPU, where torch's grouped_mm is slower).
        if requested_experts not in (None, *EXPERTS_IMPLEMENTATIONS):
            raise ValueError(f"experts_implementation={requested_experts!r}: hashmoe offers "
                             f"{', '.join(EXPERTS_IMPLEMENTATIONS)} (or leave it unset: grouped_mm on CUDA, the "
                             "per-expert loop on CPU).")
        return requested_experts

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std, out_std = expert_init_std(self.config.initializer_range, self.config.residual_depth)
        # Projections into the residual stream get GPT-2's 1/sqrt(2L) scaling. They are marked where they are
        # built: transformers initialises children before parents and skips a tensor already initialised, so
        # a parent cannot re-initialise its child's weight afterwards.
        if getattr(module, "writes_residual", False):
            std = out_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, HashMoERotaryEmbedding):
            module.reset_frequencies()
        elif isinstance(module, ExpertBank):
            module.reset_parameters(std, out_std)
        elif isinstance(module, (SoftmaxRouter, BaseRouter)):
            module.reset_parameters()
        elif isinstance(module, MonarchLinear):
            module.reset_parameters(std)
        elif isinstance(module, HashRouter):  # tables are data, not weights: rebuilt from the config's seed
            module.reset_table()
            module.reset_parameters()
        elif isinstance(module, HashMoEMLP) and module.frozen_size:
            module.reset_frozen_units()

    def hash_routers(self) -> list[HashRouter]:
        return [m for m in self.modules() if isinstance(m, HashRouter)]

    @torch.no_grad()
    def update_router_biases(self, all_reduce=None) -> None:
        """One aux-loss-free balancing step (DeepSeek-V3; `config.router_bias_update_rate`) for every switch/topk
        router, from the choices counted since the last call. Call it after each optimizer step; in data-parallel
        training pass `torch.distributed.all_reduce` so every rank moves its biases by the same global loads."""
        routers = [m for m in self.modules() if isinstance(m, SoftmaxRouter) and m.bias_update_rate > 0]
        if not routers:
            return
        chosen_RE = torch.stack([router.chosen_since_update for router in routers])
        if all_reduce is not None:
            all_reduce(chosen_RE)
        for router, chosen_E in zip(routers, chosen_RE):
            router.update_bias(chosen_E)

    def gradient_checkpointing_enable(self, *args, **kwargs):
        if self.config.gradient_checkpointing_unsupported:
            raise ValueError(f"gradient checkpointing {self.config.gradient_checkpointing_unsupported}: train this "
                             "model without it, or with recurrence.memory: 0.")
        return super().gradient_checkpointing_enable(*args, **kwargs)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        for router in self.hash_routers():
            router.resize_vocab(self.config.vocab_size)
        return embeddings


class HashMoEModel(HashMoEPreTrainedModel):
    def __init__(self, config: HashMoEConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "rope":
            self.rotary_emb = HashMoERotaryEmbedding(config)
        else:
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(HashMoEBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config, config.hidden_size)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                output_router_logits: bool | None = None, return_dict: bool | None = None,
                prev_token_ids: torch.LongTensor | None = None, next_token_ids: torch.LongTensor | None = None,
                cache: Cache | None = None, **kwargs) -> HashMoEModelOutput | tuple:
        """`prev_token_ids` / `next_token_ids` ([B, 1]): the ids just before / after `input_ids`, for hash
        routers when the sequence arrives in pieces (cached generation). `cache` is transformers 5.24's name
        for `past_key_values`; either is accepted."""
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_router_logits = config.output_router_logits if output_router_logits is None else output_router_logits
        return_dict = config.return_dict if return_dict is None else return_dict
        use_cache = config.use_cache if use_cache is None else use_cache
        past_key_values = resolve_cache(cache, past_key_values)
        hash_routed = config.is_moe and "hash" in config.routers
        if input_ids is None and inputs_embeds is None:
            raise ValueError("pass input_ids (or inputs_embeds together with input_ids for a hash model)")
        # input_ids with inputs_embeds (generate's way of starting from embeddings while keeping the prompt's ids):
        # the embeddings replace the token embeddings, the ids serve the hash routers
        if input_ids is None and hash_routed:
            raise ValueError("a hash-routed model routes every token by its id, so it needs input_ids: pass "
                             "input_ids (inputs_embeds may come with them and then replace the token embeddings)")
        staircase = (config.recurrence or {}).get("kind") == "staircase"
        if not use_cache:
            past_key_values = None
        elif past_key_values is None and not self.training and not staircase:
            # A staircase decodes token by token once it has a cache: scoring without one runs the whole sequence.
            past_key_values = DynamicCache()
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, S = inputs_embeds.shape[:2]
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        rope = config.position_embedding_type == "rope"
        # learned positions, and the position hash's table, have max_position_embeddings rows; RoPE has no limit
        bounded = not rope or ("hash" in config.routers and config.hash_function == "position")
        if isinstance(past_len, int) and past_len + S > config.max_position_embeddings and bounded:
            raise ValueError(f"sequence of {past_len + S} tokens exceeds max_position_embeddings="
                             f"{config.max_position_embeddings}")
        if attention_mask is not None and attention_mask.dim() == 2 and position_ids is None:
            # left padding: positions count only real tokens
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -S:]
        if position_ids is None:
            position_ids = (torch.arange(S, device=inputs_embeds.device) + past_len).expand(B, S)
        rotary = self.rotary_emb(inputs_embeds, position_ids) if rope else None
        x_BSD = self.dropout(inputs_embeds if rope else inputs_embeds + self.embed_positions(position_ids))
        if input_ids is None:  # dense and learned routers route by hidden state: any id stands in
            input_ids = torch.zeros((B, S), dtype=torch.long, device=inputs_embeds.device)
        hidden_states = (x_BSD,) if output_hidden_states else None
        attentions = () if output_attentions else None
        if staircase:
            x_BSD, layer_stats, past_key_values = self._staircase(x_BSD, input_ids, position_ids, attention_mask,
                                                                  past_key_values, prev_token_ids, next_token_ids)
        else:
            routing = routing_inputs(input_ids, position_ids, config.vocab_size, prev_token_ids, next_token_ids)
            layout = attention_layout(attention_mask, B, S, past_len, inputs_embeds.device, rotary)
            num_layers, steps = len(self.layers), config.ladder_steps
            reserve_cache_layers(past_key_values, steps * num_layers)
            layer_stats = []
            # Ladder (Ju et al. 2021): the same stack K times. Step k of layer i attends to its own cached keys
            # (cache slot k * L + i): a cache shared across steps would mix states of different depths.
            for step in range(steps):
                for index, block in enumerate(self.layers):
                    x_BSD, weights, stats = block(x_BSD, layout=layout, routing=routing,
                                                  past_key_values=past_key_values,
                                                  cache_index=step * num_layers + index)
                    if stats is not None:
                        layer_stats.append(stats)
                    if output_hidden_states:
                        hidden_states += (x_BSD,)
                    if output_attentions:
                        attentions += (weights,)
        x_BSD = self.norm(x_BSD)
        if output_hidden_states:  # as in transformers' decoders: the last entry is the normed output
            hidden_states = hidden_states[:-1] + (x_BSD,) if len(hidden_states) > 1 else hidden_states + (x_BSD,)
        output = HashMoEModelOutput(
            last_hidden_state=x_BSD, hidden_states=hidden_states, attentions=attentions,
            router_logits=tuple(s.router.router_logits_TE for s in layer_stats) if output_router_logits else None,
            aux_loss=sum((s.router.aux_loss for s in layer_stats), x_BSD.new_zeros(())),
            expert_indices=tuple(s.router.expert_index_TK for s in layer_stats) if output_router_logits else None,
            expert_load=per_layer_load(layer_stats, len(config.moe_layers)),
            expert_load_chosen=per_layer_load(layer_stats, len(config.moe_layers), chosen=True),
            dropped_tokens=sum((s.dropped for s in layer_stats), torch.zeros((), dtype=torch.long)),
            **{CACHE_FIELD: past_key_values})
        return output if return_dict else output.to_tuple()

    def _staircase(self, x_BSD, input_ids, position_ids, attention_mask, past_key_values, prev_token_ids,
                   next_token_ids):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("a staircase model reads sequences chunk by chunk from their first token and does not "
                             "take padded batches: pass sequences of equal length (no padding), or one at a time.")
        vocab, S = self.config.vocab_size, input_ids.shape[1]

        def routing_for(lo, hi):  # hash routers need the ids next to the slice
            prev = input_ids[:, lo - 1:lo] if lo > 0 else prev_token_ids
            nxt = input_ids[:, hi:hi + 1] if hi < S else next_token_ids
            return routing_inputs(input_ids[:, lo:hi], position_ids[:, lo:hi], vocab, prev, nxt)

        staircase = Staircase(self.config.recurrence, self.layers, attention_layout)
        if past_key_values is None:
            x_BSD, layer_stats = staircase.forward(x_BSD, routing_for)
        else:
            if not isinstance(past_key_values, StaircaseCache):
                if past_key_values.get_seq_length():
                    raise ValueError("a staircase model continues only its own StaircaseCache, not a filled "
                                     f"{type(past_key_values).__name__}")
                past_key_values = StaircaseCache()
            x_BSD, layer_stats = staircase.decode(x_BSD, routing_for, past_key_values)
        return x_BSD, layer_stats, past_key_values


def reserve_cache_layers(cache, num_layers: int) -> None:
    """generate() sizes its cache for num_hidden_layers; a ladder needs one cache layer per step. New layers
    copy the cache's own (still empty) first layer, so a static cache stays static."""
    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) >= num_layers:
        return
    template = layers[0] if layers and not getattr(layers[0], "is_initialized", True) else None
    while len(layers) < num_layers:
        layers.append(copy.deepcopy(template) if template is not None else DynamicLayer())


def routing_inputs(input_ids_BS, position_ids_BS, vocab_size, prev_token_ids_B1=None, next_token_ids_B1=None):
    """Neighbouring ids for hash routers; `vocab_size` marks "none" (sequence start, or unknown future)."""
    B = input_ids_BS.shape[0]
    none_B1 = torch.full((B, 1), vocab_size, dtype=input_ids_BS.dtype, device=input_ids_BS.device)
    prev_B1 = none_B1 if prev_token_ids_B1 is None else prev_token_ids_B1.to(input_ids_BS.dtype)
    next_B1 = none_B1 if next_token_ids_B1 is None else next_token_ids_B1.to(input_ids_BS.dtype)
    prev_BS = torch.cat([prev_B1, input_ids_BS[:, :-1]], dim=1)
    next_BS = torch.cat([input_ids_BS[:, 1:], next_B1], dim=1)
    return RoutingInputs(input_ids_BS.reshape(-1), prev_BS.reshape(-1), next_BS.reshape(-1),
                         position_ids_BS.reshape(-1))


def attention_layout(attention_mask, B: int, S: int, past_len, device, rotary=None) -> AttentionLayout:
    """What the attention layers need to build their masks (and RoPE's angles). A 4-D mask is the caller's and
    is used as it is (bool: True = may attend; float: added to the scores)."""
    query_pos_S = torch.arange(S, device=device) + past_len
    if attention_mask is not None and attention_mask.dim() == 4:
        return AttentionLayout(query_pos_S, None, ready_mask=attention_mask, rotary=rotary)
    plain = attention_mask is None and isinstance(past_len, int) and past_len == 0
    return AttentionLayout(query_pos_S, attention_mask, plain_causal=plain, rotary=rotary)


def attention_allowed(key_real_BP, query_pos_S, num_keys: int) -> torch.Tensor:
    """Boolean [B or 1, 1, S, num_keys] mask, True = may attend: causal over absolute positions (cache slots past
    the queries, e.g. a static cache's empty ones, are excluded), and padding keys hidden."""
    key_pos_P = torch.arange(num_keys, device=query_pos_S.device)
    allowed_SP = key_pos_P[None, :] <= query_pos_S[:, None]
    if key_real_BP is None:
        return allowed_SP[None, None]
    key_real_BP = key_real_BP.bool()
    seen = key_real_BP.shape[1]
    if seen < num_keys:  # a static cache holds more slots than tokens so far: the rest are empty
        key_real_BP = F.pad(key_real_BP, (0, num_keys - seen), value=False)
    key_real_BP = key_real_BP[:, -num_keys:] if seen > num_keys else key_real_BP
    # A padding query would see no key at all (NaN softmax): let every query see itself.
    itself_SP = key_pos_P[None, :] == query_pos_S[:, None]
    return (allowed_SP[None] & (key_real_BP[:, None, :] | itself_SP[None]))[:, None]


def per_layer_load(layer_stats: list[MoELayerStats], num_moe_layers: int,
                   chosen: bool = False) -> tuple[torch.Tensor, ...]:
    """Tokens per expert for each MoE layer (processed, or `chosen` before capacity), summed over ladder passes
    (stats arrive pass after pass)."""
    loads = [None] * num_moe_layers
    for i, stats in enumerate(layer_stats):
        j = i % num_moe_layers
        load = stats.chosen_per_expert_E if chosen else stats.tokens_per_expert_E
        loads[j] = load if loads[j] is None else loads[j] + load
    return tuple(load for load in loads if load is not None)


def micro_batch_share(labels: torch.Tensor | None, loss_kwargs: dict) -> float | torch.Tensor:
    """The weight of this micro-batch's router aux loss. With `num_items_in_batch` (HF Trainer under gradient
    accumulation) the LM loss is a sum over this micro-batch divided by the scored tokens of the whole
    accumulated batch, and the Trainer no longer divides by the accumulation steps: the aux loss gets the same
    treatment, weighted by this micro-batch's share of the scored tokens, so it is not counted once per step."""
    total = loss_kwargs.get("num_items_in_batch")
    if total is None:
        return 1.0
    ignore = loss_kwargs.get("ignore_index", -100)
    shifted = loss_kwargs.get("shift_labels")
    scored = (shifted != ignore).sum() if shifted is not None else (labels[..., 1:] != ignore).sum()
    return scored / total


class HashMoEForCausalLM(HashMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HashMoEConfig):
        super().__init__(config)
        self.model = HashMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, output_router_logits: bool | None = None,
                return_dict: bool | None = None, prev_token_ids: torch.LongTensor | None = None,
                next_token_ids: torch.LongTensor | None = None, logits_to_keep: int | torch.Tensor = 0,
                cache: Cache | None = None, **kwargs) -> HashMoECausalLMOutput | tuple:
        """`labels` are shifted inside (or give `shift_labels`); the loss is transformers' causal-LM loss, so
        `num_items_in_batch` (HF Trainer with gradient accumulation) normalises over the whole accumulated
        batch. `logits_to_keep`: compute logits for the last N positions only (0 = all)."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=resolve_cache(cache, past_key_values),
                             inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
                             output_hidden_states=output_hidden_states, output_router_logits=output_router_logits,
                             return_dict=True, prev_token_ids=prev_token_ids, next_token_ids=next_token_ids)
        hidden_BSD = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_BSD[:, keep])
        aux_loss, lm_loss, loss = outputs.aux_loss, None, None
        if labels is not None or kwargs.get("shift_labels") is not None:
            lm_loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
            loss = lm_loss + aux_loss * micro_batch_share(labels, kwargs)
        elif not (self.config.output_router_logits if output_router_logits is None else output_router_logits):
            # As transformers' MoE models: no aux_loss without labels or router outputs, so the tuple form
            # starts with the logits (a constant-zero aux_loss of a hash or dense model would come first)
            aux_loss = None
        output = HashMoECausalLMOutput(
            loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, logits=logits, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions, router_logits=outputs.router_logits,
            expert_indices=outputs.expert_indices, expert_load=outputs.expert_load,
            expert_load_chosen=outputs.expert_load_chosen, dropped_tokens=outputs.dropped_tokens, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)})
        return output if return_dict else output.to_tuple()

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        """generate() builds a 4-D mask for static caches here; this model builds its masks itself (per layer,
        from the keys the cache returns), so the 2-D padding mask passes through unchanged."""
        return attention_mask

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        new_ids = model_inputs.get("input_ids")
        embeds = model_inputs.get("inputs_embeds")
        if new_ids is None and embeds is not None and input_ids.shape[1] == embeds.shape[1]:
            model_inputs["input_ids"] = input_ids  # generate(input_ids=..., inputs_embeds=...): hashing needs the ids
            return model_inputs
        new_len = new_ids.shape[1] if new_ids is not None else 0
        if new_ids is not None and input_ids.shape[1] > new_len:
            # the cache holds the earlier tokens; hash routers still need the id just before the new ones
            model_inputs["prev_token_ids"] = input_ids[:, -new_len - 1:-new_len]
        return model_inputs

    def generate(self, *args, **kwargs):
        if "hash" in self.config.routers and self.config.hash_function == "oracle_future":
            raise ValueError("hash_function='oracle_future' routes each token by the *next* token, which does "
                             "not exist during generation; it is an analysis upper bound. Generate with a "
                             "model trained with another hash_function.")
        return super().generate(*args, **kwargs)

    # ---- hashmoe additions -------------------------------------------------------------------------

    @torch.no_grad()
    def fit_hash_tables(self, token_counts: torch.Tensor | None = None,
                        embeddings: torch.Tensor | None = None) -> None:
        """Build the data-dependent hash tables: `balanced`/`balanced_lpt` from training-set token counts ([V]),
        `clustered`/`dispersed` from token embeddings of a trained model ([vocab_size, d])."""
        for router in self.hash_routers():
            router.fit(token_counts=token_counts, embeddings=embeddings)

    def parameter_counts(self) -> dict[str, int]:
        """total / trainable / frozen parameters (frozen = doping buffers and any parameter with
        requires_grad=False), and `active`: every parameter but the experts one token does not use (k experts'
        worth per MoE layer; embeddings counted whole, as model cards do; frozen units included, since every
        token computes through them). `active_non_embedding` leaves the embeddings out: the N of
        Kaplan et al.'s FLOPs ~ 6N per token."""
        params = {id(p): p for p in self.parameters()}.values()  # tied weights once
        frozen_units = sum(b.numel() for name, b in self.named_buffers() if name.split(".")[-1].startswith("frozen_"))
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params) + frozen_units
        inactive = 0
        for module in self.modules():
            if isinstance(module, HashMoESparseMLP):
                bank = module.experts
                per_expert = bank.w1[0].numel() + bank.w2[0].numel()  # gate, up and down when gated
                k = getattr(module.router, "k", 1)  # hash multi-head: the heads share one expert's worth
                inactive += (bank.num_experts - k) * per_expert
        embedding = self.model.embed_tokens.weight.numel()
        if hasattr(self.model, "embed_positions"):
            embedding += self.model.embed_positions.weight.numel()
        if not self.config.tie_word_embeddings:
            embedding += self.lm_head.weight.numel()
        active = total - inactive
        return {"total": total, "trainable": trainable, "frozen": total - trainable, "active": active,
                "active_non_embedding": active - embedding}


HashMoEConfig.register_for_auto_class()
HashMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")
HashMoEModel.register_for_auto_class("AutoModel")

__all__ = ["HashMoEConfig", "HashMoEForCausalLM", "HashMoEModel", "HashMoEPreTrainedModel"]

"""hashmoe causal language model: a pre-norm GPT whose FFN sublayers are dense or Mixture-of-Experts.

References:
  Hash Layers      Roller, Sukhbaatar, Szlam, Weston 2021, arXiv 2106.04426
  Switch           Fedus, Zoph, Shazeer 2021, arXiv 2101.03961
  BASE layers      Lewis, Bhosale, Dettmers, Goyal, Zettlemoyer 2021, arXiv 2103.16716
  GPT-2 layout     Radford et al. 2019 (pre-norm, learned positions, tied embeddings)

Shape suffixes: B batch, S query length, P cached + new length, D width, T = B*S tokens, E experts.

The model knows nothing of processes or DeepSpeed: expert parallelism replaces each `HashMoESparseMLP` from
outside (trainer/parallel.py) with a module of the same call signature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.utils import ModelOutput

from .configuration_hashmoe import HashMoEConfig
from .experts import ACTIVATIONS, ExpertBank, dispatch_local, expert_init_std
from .routing import BaseRouter, HashRouter, RouterOutput, RoutingInputs, SoftmaxRouter, build_router
from .staircase import Staircase, StaircaseCache
from .structured import MonarchLinear


@dataclass
class MoELayerStats:
    """What one MoE layer reports per forward: the routing and the load it produced."""

    router: RouterOutput
    tokens_per_expert_E: torch.Tensor  # assignments each expert processed (after dropping)
    dropped: torch.Tensor  # number of dropped assignments


@dataclass
class HashMoECausalLMOutput(ModelOutput):
    """`loss` = `lm_loss` + `aux_loss`. Per MoE layer: `router_logits` and `expert_indices` (when
    `output_router_logits`), and always `expert_load` ([E] assignments per expert) and `dropped_tokens`."""

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    router_logits: tuple[torch.Tensor | None, ...] | None = None
    expert_indices: tuple[torch.Tensor, ...] | None = None
    expert_load: tuple[torch.Tensor, ...] | None = None
    dropped_tokens: torch.Tensor | None = None


class HashMoEAttention(nn.Module):
    """Causal multi-head self-attention through `scaled_dot_product_attention`, with a KV cache."""

    def __init__(self, config: HashMoEConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj.writes_residual = True
        self.dropout = config.dropout

    def forward(self, x_BSD: torch.Tensor, allowed_B1SP: torch.Tensor | None, cache: Cache | None,
                cache_index: int) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv_proj(x_BSD).view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.update(k, v, cache_index)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed_B1SP, is_causal=allowed_B1SP is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, D))


class HashMoEMLP(nn.Module):
    """Dense FFN: act(x W1^T) W2^T, optionally with structured (Monarch) projections, plus optional frozen
    random hidden units ("doping", Chatelain et al. 2021): act(x U^T) V^T with U, V fixed by a seed, stored
    as buffers, never in the optimizer and never receiving gradients."""

    def __init__(self, config: HashMoEConfig, layer_idx: int = 0):
        super().__init__()
        D, F = config.hidden_size, config.intermediate_size
        if config.ffn_linear == "monarch":
            self.up_proj = MonarchLinear(D, F, config.monarch_blocks)
            self.down_proj = MonarchLinear(F, D, config.monarch_blocks)
        else:
            self.up_proj = nn.Linear(D, F, bias=False)
            self.down_proj = nn.Linear(F, D, bias=False)
        self.down_proj.writes_residual = True
        self.act = ACTIVATIONS[config.hidden_act]
        self.frozen_size = config.frozen_ffn_size
        if self.frozen_size:
            std, out_std = expert_init_std(config.initializer_range, config.residual_depth)
            # Drawn on CPU from the seed alone (also under from_pretrained's meta device): same on every rank.
            with torch.device("cpu"):
                generator = torch.Generator().manual_seed(config.frozen_seed + 1000 * layer_idx)
                frozen_up = torch.randn(self.frozen_size, D, generator=generator) * std
                frozen_down = torch.randn(D, self.frozen_size, generator=generator) * out_std
            self.register_buffer("frozen_up", frozen_up)
            self.register_buffer("frozen_down", frozen_down)

    def forward(self, x_BSD: torch.Tensor, routing: RoutingInputs) -> tuple[torch.Tensor, None]:
        y_BSD = self.down_proj(self.act(self.up_proj(x_BSD)))
        if self.frozen_size:
            y_BSD = y_BSD + F.linear(self.act(F.linear(x_BSD, self.frozen_up)), self.frozen_down)
        return y_BSD, None


class HashMoESparseMLP(nn.Module):
    """MoE FFN: router + expert bank + sort-based dispatch, all experts in this process."""

    def __init__(self, config: HashMoEConfig, layer_idx: int):
        super().__init__()
        self.num_experts = config.num_experts
        self.router = build_router(config, layer_idx)
        segments = config.hash_heads if config.router == "hash" else 1
        self.experts = ExpertBank(config.num_experts, config.hidden_size, config.expert_intermediate_size,
                                  config.hidden_act, num_segments=segments)

    def forward(self, x_BSD: torch.Tensor, routing: RoutingInputs) -> tuple[torch.Tensor, MoELayerStats]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        routed = self.router(x_TD, routing)
        y_TD = dispatch_local(x_TD, routed.expert_index_TK, routed.expert_weight_TK, self.experts)
        return y_TD.view_as(x_BSD), moe_layer_stats(routed, self.num_experts)


def moe_layer_stats(routed: RouterOutput, num_experts: int) -> MoELayerStats:
    index = routed.expert_index_TK.reshape(-1)
    kept = index[index >= 0]
    return MoELayerStats(routed, torch.bincount(kept, minlength=num_experts), (index < 0).sum())


class HashMoEBlock(nn.Module):
    def __init__(self, config: HashMoEConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = HashMoEAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        is_moe = layer_idx in config.moe_layers
        self.mlp = HashMoESparseMLP(config, layer_idx) if is_moe else HashMoEMLP(config, layer_idx)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x_BSD, allowed_B1SP, cache, cache_index, routing):
        x_BSD = x_BSD + self.dropout(self.self_attn(self.input_layernorm(x_BSD), allowed_B1SP, cache, cache_index))
        ffn_BSD, stats = self.mlp(self.post_attention_layernorm(x_BSD), routing)
        return x_BSD + self.dropout(ffn_BSD), stats


class HashMoEPreTrainedModel(PreTrainedModel):
    config_class = HashMoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["HashMoEBlock"]
    _supports_sdpa = True

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
        elif isinstance(module, ExpertBank):
            module.reset_parameters(std, out_std)
        elif isinstance(module, (SoftmaxRouter, BaseRouter)):
            module.reset_parameters()
        elif isinstance(module, MonarchLinear):
            module.reset_parameters(std)


class HashMoEModel(HashMoEPreTrainedModel):
    def __init__(self, config: HashMoEConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(HashMoEBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                prev_token_ids=None, next_token_ids=None):
        B, S = input_ids.shape
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past_len + S > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {past_len + S} tokens exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if position_ids is None:
            if attention_mask is not None:  # left padding: count only real tokens
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -S:]
            else:
                position_ids = torch.arange(past_len, past_len + S, device=input_ids.device).expand(B, S)
        x_BSD = self.dropout(self.embed_tokens(input_ids) + self.embed_positions(position_ids))
        recurrence = self.config.recurrence or {}
        if recurrence.get("kind") == "staircase":
            return self._staircase(x_BSD, input_ids, position_ids, attention_mask, past_key_values,
                                   prev_token_ids, next_token_ids)
        routing = routing_inputs(input_ids, position_ids, self.config.vocab_size, prev_token_ids, next_token_ids)
        allowed_B1SP = attention_allowed(attention_mask, B, S, past_len, input_ids.device)
        num_layers, steps = len(self.layers), self.config.ladder_steps
        reserve_cache_layers(past_key_values, steps * num_layers)
        layer_stats = []
        # Ladder (Ju et al. 2021): the same stack K times. Step k of layer i attends to its own cached keys
        # (cache slot k * L + i): a cache shared across steps would mix states of different depths.
        for step in range(steps):
            for index, block in enumerate(self.layers):
                x_BSD, stats = block(x_BSD, allowed_B1SP, past_key_values, step * num_layers + index, routing)
                if stats is not None:
                    layer_stats.append(stats)
        return self.norm(x_BSD), layer_stats, past_key_values

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

        staircase = Staircase(self.config.recurrence, self.layers)
        if past_key_values is None:
            x_BSD, layer_stats = staircase.forward(x_BSD, routing_for)
        else:
            if not isinstance(past_key_values, StaircaseCache):
                if past_key_values.get_seq_length():
                    raise ValueError("a staircase model continues only its own StaircaseCache, not a filled "
                                     f"{type(past_key_values).__name__}")
                past_key_values = StaircaseCache()
            x_BSD, layer_stats = staircase.decode(x_BSD, routing_for, past_key_values)
        return self.norm(x_BSD), layer_stats, past_key_values


def reserve_cache_layers(cache, num_layers: int) -> None:
    """generate() sizes its DynamicCache for num_hidden_layers; a ladder needs one cache layer per step."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        while len(layers) < num_layers:
            layers.append(DynamicLayer())


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


def attention_allowed(attention_mask_BP, B, S, past_len, device):
    """Boolean [B, 1, S, P] mask (True = may attend), or None when plain causal attention suffices."""
    if attention_mask_BP is None and past_len == 0:
        return None
    query_pos_S1 = torch.arange(past_len, past_len + S, device=device)[:, None]
    key_pos_P = torch.arange(past_len + S, device=device)
    allowed_SP = key_pos_P[None, :] <= query_pos_S1
    if attention_mask_BP is None:
        return allowed_SP[None, None].expand(B, 1, S, past_len + S)
    key_real_BP = attention_mask_BP[:, -(past_len + S):].bool()
    # A padding query would see no key at all (NaN softmax): let every query see itself.
    allowed_BSP = allowed_SP[None] & (key_real_BP[:, None, :] | (key_pos_P[None, :] == query_pos_S1)[None])
    return allowed_BSP[:, None]


def per_layer_load(layer_stats: list[MoELayerStats], num_moe_layers: int) -> tuple[torch.Tensor, ...]:
    """Tokens per expert for each MoE layer, summed over ladder passes (stats arrive pass after pass)."""
    loads = [None] * num_moe_layers
    for i, stats in enumerate(layer_stats):
        j = i % num_moe_layers
        loads[j] = stats.tokens_per_expert_E if loads[j] is None else loads[j] + stats.tokens_per_expert_E
    return tuple(load for load in loads if load is not None)


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

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                output_router_logits: bool | None = None, prev_token_ids: torch.LongTensor | None = None,
                next_token_ids: torch.LongTensor | None = None, return_dict: bool | None = None,
                **kwargs) -> HashMoECausalLMOutput:
        """`prev_token_ids` / `next_token_ids` ([B, 1]): the ids just before / after `input_ids`, for hash
        routers when the sequence arrives in pieces (cached generation). `labels` are shifted inside."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        staircase = (self.config.recurrence or {}).get("kind") == "staircase"
        # A staircase decodes token by token once it has a cache: scoring without one runs the whole sequence.
        if use_cache and past_key_values is None and not self.training and not staircase:
            past_key_values = DynamicCache()
        elif not use_cache:
            past_key_values = None
        hidden_BSD, layer_stats, past_key_values = self.model(input_ids, attention_mask, position_ids,
                                                              past_key_values, prev_token_ids, next_token_ids)
        logits = self.lm_head(hidden_BSD)
        aux_loss = sum((s.router.aux_loss for s in layer_stats), logits.new_zeros(()))
        lm_loss = loss = None
        if labels is not None:
            lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                      ignore_index=-100)
            loss = lm_loss + aux_loss
        return HashMoECausalLMOutput(
            loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, logits=logits, past_key_values=past_key_values,
            router_logits=tuple(s.router.router_logits_TE for s in layer_stats) if output_router_logits else None,
            expert_indices=tuple(s.router.expert_index_TK for s in layer_stats) if output_router_logits else None,
            expert_load=per_layer_load(layer_stats, len(self.config.moe_layers)),
            dropped_tokens=sum((s.dropped for s in layer_stats), torch.zeros((), dtype=torch.long)),
        )

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(input_ids, past_key_values=past_key_values, **kwargs)
        new_len = model_inputs["input_ids"].shape[1]
        if input_ids.shape[1] > new_len:  # the cache holds the earlier tokens; hash routers still need their ids
            model_inputs["prev_token_ids"] = input_ids[:, -new_len - 1:-new_len]
        return model_inputs

    def generate(self, *args, **kwargs):
        if self.config.router == "hash" and self.config.hash_function == "oracle_future" and self.config.is_moe:
            raise ValueError("hash_function='oracle_future' routes each token by the *next* token, which does "
                             "not exist during generation; it is an analysis upper bound. Generate with a "
                             "model trained with another hash_function.")
        return super().generate(*args, **kwargs)

    # ---- hashmoe additions -------------------------------------------------------------------------
    def hash_routers(self) -> list[HashRouter]:
        return [m for m in self.modules() if isinstance(m, HashRouter)]

    @torch.no_grad()
    def fit_hash_tables(self, token_counts: torch.Tensor | None = None,
                        embeddings: torch.Tensor | None = None) -> None:
        """Build the data-dependent hash tables: `balanced` from training-set token counts ([vocab_size]),
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
                per_expert = bank.w1[0].numel() + bank.w2[0].numel()
                k = getattr(module.router, "k", 1)  # hash multi-head: the heads share one expert's worth
                inactive += (bank.num_experts - k) * per_expert
        embedding = self.model.embed_tokens.weight.numel() + self.model.embed_positions.weight.numel()
        if not self.config.tie_word_embeddings:
            embedding += self.lm_head.weight.numel()
        active = total - inactive
        return {"total": total, "trainable": trainable, "frozen": total - trainable, "active": active,
                "active_non_embedding": active - embedding}


HashMoEConfig.register_for_auto_class()
HashMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["HashMoEConfig", "HashMoEForCausalLM", "HashMoEModel", "HashMoEPreTrainedModel"]

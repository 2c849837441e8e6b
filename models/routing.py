"""Routers: which expert(s) each token goes to, with what weight, and at what auxiliary cost.

Shape suffixes: T tokens, D model width, E experts, K choices per token, H hash heads.

Every router maps (x_TD, RoutingInputs) to a RouterOutput. Index -1 means "dropped": the token skips the
layer and only the residual carries it (Switch capacity, Fedus et al. 2021 sec. 2.2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .assignment import balanced_assignment
from .experts import positions_in_slot
from .hashing import (
    balanced_table,
    bigram_hash,
    clustered_table,
    dispersed_table,
    random_distinct_table,
    random_table,
    universal_hash_params,
)


@dataclass
class RoutingInputs:
    """What every MoE layer gets besides the hidden states, flattened to [T]. Hash routers need token ids.

    prev_ids_T / next_ids_T hold the neighbouring token id, or `vocab_size` where there is none
    (sequence start / end, or the end of what has been generated so far).
    """

    input_ids_T: torch.Tensor
    prev_ids_T: torch.Tensor
    next_ids_T: torch.Tensor
    position_ids_T: torch.Tensor


@dataclass
class RouterOutput:
    expert_index_TK: torch.Tensor  # int64, -1 = dropped
    expert_weight_TK: torch.Tensor  # multiplies the expert's output
    aux_loss: torch.Tensor  # scalar, already scaled by its coefficient
    router_logits_TE: torch.Tensor | None = None
    chosen_index_TK: torch.Tensor | None = None  # the choice before capacity dropped any; None: nothing dropped


SCORE_FUNCTIONS = {
    "softmax": lambda logits_TE: logits_TE.softmax(dim=-1),
    "sigmoid": torch.sigmoid,  # DeepSeek-V3
    # DeepSeek-V4 (its learned and its hash layers); the clamp keeps the gradient finite where softplus underflows
    "sqrtsoftplus": lambda logits_TE: torch.sqrt(F.softplus(logits_TE).clamp_min(1e-20)),
}


def chosen_weights(weight_TK: torch.Tensor, renormalize: bool, scaling_factor: float) -> torch.Tensor:
    """The gate weights of a token's chosen experts: renormalised to sum to 1 (`norm_topk_prob`; the 1e-20 as
    DeepSeek's) and scaled (`routed_scaling_factor`). Learned top-k and V4's k-expert hash layers alike."""
    if renormalize:
        weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return weight_TK * scaling_factor if scaling_factor != 1.0 else weight_TK


class HashRouter(nn.Module):
    """Hash Layers (Roller et al. 2021): a fixed function of the token id picks the expert; weight 1, no loss.

    The table is a persistent buffer, so it is saved with the weights and identical on every process
    (the reference implementation regenerated it from a seed and never saved it).

    Vocabulary growth (`resize_token_embeddings`): every existing id, and the sequence-start key, keeps its
    expert; a new id v goes to expert `v % num_experts` until the table is refit (`fit_hash_tables`). Bigram
    hashes take any id as it is; the sequence-start marker is the vocabulary size, so after a resize a
    sequence's first token may route differently.
    """

    FITTED_FUNCTIONS = ("clustered", "dispersed")
    BALANCED_FUNCTIONS = ("balanced", "balanced_lpt")  # fit from token counts

    def __init__(self, hash_function: str, num_experts: int, num_heads: int, vocab_size: int,
                 max_positions: int, seed: int, gate: str = "none", hidden_size: int = 0,
                 init_scale: float = 0.1, experts_per_token: int = 1, normalize: bool = False,
                 scaling_factor: float = 1.0):
        super().__init__()
        self.hash_function = hash_function
        # k > 1 (DeepSeek-V4's tid2eid): the table's k rows are k distinct whole experts per key, not segments;
        # their weights (gate scores, or 1) are renormalised over the k when `normalize`.
        self.normalize, self.scaling_factor = normalize, scaling_factor
        self.k = experts_per_token  # whole experts a token uses (multi-hash heads share one expert's worth)
        if experts_per_token > 1:
            num_heads = experts_per_token
        # DeepSeek-V4's hash layers: the table picks the expert, a learned gate weights it (the gate's
        # gradient trains `weight`; the choice itself stays fixed).
        self.gate, self.init_scale = gate, init_scale
        if gate != "none":
            self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.num_experts = num_experts
        self.num_heads = num_heads
        self.seed = seed
        self.vocab_size, self.max_positions = vocab_size, max_positions
        # Built on CPU even under from_pretrained's meta-device context: the table is data, not a weight init.
        with torch.device("cpu"):
            table = self._initial_table(hash_function, num_experts, num_heads, vocab_size, max_positions, seed,
                                        experts_per_token > 1)
        self.register_buffer(self.table_name, table)
        # 0/1 in uint8 rather than bool: transformers' common save/load test cannot compare bool tensors.
        self.register_buffer("table_fitted", torch.tensor(int(hash_function not in self.FITTED_FUNCTIONS),
                                                          dtype=torch.uint8, device="cpu"))
        self._fitted_checked = False  # table_fitted read once, not at every forward (a device sync)

    def reset_parameters(self) -> None:
        if self.gate != "none":  # Switch's router init: logits start near 0
            nn.init.normal_(self.weight, std=math.sqrt(self.init_scale / self.weight.shape[1]))

    @property
    def table_name(self) -> str:
        return "hash_params" if self.hash_function == "bigram" else "table"

    def reset_table(self) -> None:
        """Rebuild the table the config implies (seeded, or uniform counts for balanced; unfitted for
        clustered/dispersed). Called by `_init_weights`, e.g. after a meta-device construction."""
        with torch.device("cpu"):
            table = self._initial_table(self.hash_function, self.num_experts, self.num_heads, self.vocab_size,
                                        self.max_positions, self.seed, self.k > 1)
        getattr(self, self.table_name).copy_(table)
        self.table_fitted.fill_(int(self.hash_function not in self.FITTED_FUNCTIONS))
        self._fitted_checked = False

    def resize_vocab(self, vocab_size: int) -> None:
        """Follow `resize_token_embeddings`: the rule is in the class docstring."""
        old_vocab, self.vocab_size = self.vocab_size, vocab_size
        if self.hash_function in ("bigram", "position") or vocab_size == old_vocab:
            return
        table_HK = self.table
        has_start_key = table_HK.shape[1] == old_vocab + 1  # prev_token / oracle_future: key V = "none"
        kept = min(old_vocab, vocab_size)
        new_ids = torch.arange(kept, vocab_size, device=table_HK.device)
        # k whole experts per token stay distinct: row h gives (v + h) % E; multi-hash heads all give v % E
        offset_H = torch.arange(table_HK.shape[0], device=table_HK.device) if self.k > 1 else \
            torch.zeros(table_HK.shape[0], dtype=torch.long, device=table_HK.device)
        columns = [table_HK[:, :kept], (new_ids[None] + offset_H[:, None]) % self.num_experts]
        if has_start_key:
            columns.append(table_HK[:, old_vocab:])
        self.table = torch.cat(columns, dim=1).contiguous()

    @staticmethod
    def _balance_seed(hash_function: str, seed: int) -> int | None:
        """balanced: greedy in a random token order seeded per layer; balanced_lpt: in frequency order."""
        return seed if hash_function == "balanced" else None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._fitted_checked = False

    @classmethod
    def _initial_table(cls, hash_function, num_experts, num_heads, vocab_size, max_positions, seed,
                       distinct: bool = False):
        if distinct:  # k distinct experts per key (hash_experts_per_tok): the first k of a random order
            return random_distinct_table(vocab_size, num_experts, num_heads, seed)
        if hash_function == "bigram":
            return universal_hash_params(num_heads, seed)
        num_keys = {"position": max_positions, "prev_token": vocab_size + 1,
                    "oracle_future": vocab_size + 1}.get(hash_function, vocab_size)
        if hash_function in cls.BALANCED_FUNCTIONS:  # uniform counts until fit() sees data
            return balanced_table(torch.ones(num_keys, dtype=torch.int64), num_experts,
                                  cls._balance_seed(hash_function, seed))[None]
        if hash_function in cls.FITTED_FUNCTIONS:
            return torch.zeros(1, num_keys, dtype=torch.int64)
        return torch.stack([random_table(num_keys, num_experts, seed + h) for h in range(num_heads)])

    def fit(self, token_counts: torch.Tensor | None = None, embeddings: torch.Tensor | None = None) -> None:
        """Rebuild a data-dependent table: balanced from token counts, clustered/dispersed from embeddings."""
        if self.hash_function in self.BALANCED_FUNCTIONS:
            if token_counts is None:
                raise ValueError(f"hash_function={self.hash_function!r} is fit from token_counts (a [vocab_size] "
                                 "tensor).")
            table_V = balanced_table(token_counts.cpu(), self.num_experts,
                                     self._balance_seed(self.hash_function, self.seed))
        elif self.hash_function in self.FITTED_FUNCTIONS:
            if embeddings is None:
                raise ValueError(f"hash_function={self.hash_function!r} is fit from embeddings "
                                 "([vocab_size, d] token embeddings of a trained model).")
            build = clustered_table if self.hash_function == "clustered" else dispersed_table
            table_V = build(embeddings.detach().float().cpu(), self.num_experts, self.seed)
        else:
            return  # seeded tables need no data
        if table_V.shape[0] != self.table.shape[1]:
            raise ValueError(f"fit data covers {table_V.shape[0]} tokens but the table has "
                             f"{self.table.shape[1]} (vocab_size)")
        self.table.copy_(table_V[None].to(self.table.device))
        self.table_fitted.fill_(1)
        self._fitted_checked = False

    def forward(self, x_TD: torch.Tensor, routing: RoutingInputs) -> RouterOutput:
        if not self._fitted_checked and not torch.compiler.is_compiling():
            self._fitted_checked = bool(self.table_fitted)
            if not self._fitted_checked:
                raise RuntimeError(f"hash_function={self.hash_function!r} needs its table built from a trained "
                                   "model's embeddings first: call model.fit_hash_tables(embeddings=...).")
        if self.hash_function == "bigram":
            index_TH = torch.stack([bigram_hash(routing.prev_ids_T, routing.input_ids_T, self.hash_params[h],
                                                self.num_experts) for h in range(self.num_heads)], dim=1)
        else:
            key_T = {"prev_token": routing.prev_ids_T, "oracle_future": routing.next_ids_T,
                     "position": routing.position_ids_T}.get(self.hash_function, routing.input_ids_T)
            index_TH = self.table[:, key_T].t()
        logits_TE = None
        if self.gate == "none":
            weight_TH = torch.ones(index_TH.shape, dtype=torch.float32, device=x_TD.device)
        else:
            logits_TE = F.linear(x_TD.float(), self.weight.float())
            weight_TH = SCORE_FUNCTIONS[self.gate](logits_TE.gather(1, index_TH))  # V4's sqrt(softplus)
        if self.num_heads > 1 and self.k == 1 and logits_TE is not None:
            # V4 renormalises the scores of a token's chosen experts (with one head that would fix the weight at
            # 1). The heads here are segments of one FFN, each weighted 1 without a gate, so the weights are
            # renormalised to sum to H, not 1.
            weight_TH = self.num_heads * weight_TH / weight_TH.sum(dim=-1, keepdim=True)
        # k whole experts (V4's table): the chosen experts' scores over their sum, as a learned top-k's
        weight_TH = chosen_weights(weight_TH, self.normalize and self.k > 1, self.scaling_factor)
        return RouterOutput(index_TH.contiguous(), weight_TH.to(x_TD.dtype), x_TD.new_zeros(()), logits_TE)


def count_per_expert(expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] number of entries equal to each expert; -1 (dropped) counts nowhere. A scatter-add into E zeros, not
    bincount, whose output size depends on the data (a graph break under torch.compile)."""
    flat = expert_index.reshape(-1)
    kept = (flat >= 0).long()
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat.clamp(min=0), kept)


def load_balancing_loss(probs_TE: torch.Tensor, expert_index_TK: torch.Tensor) -> torch.Tensor:
    """Switch eq. 4 without alpha: E * sum_i f_i * P_i, f_i = share of the T*K choices sent to expert i
    (before capacity), P_i = mean router probability of expert i."""
    num_experts = probs_TE.shape[1]
    fraction_E = count_per_expert(expert_index_TK, num_experts).float()
    fraction_E = fraction_E / expert_index_TK.numel()
    return num_experts * (fraction_E * probs_TE.mean(0)).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE (Zoph et al. 2022) eq. 5: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def drop_over_capacity(expert_index_TK: torch.Tensor, capacity: int, num_experts: int) -> torch.Tensor:
    """Keep at most `capacity` assignments per expert; the rest become -1.

    Priority as in GShard/Switch: every token's first choice before any second choice, then token order.
    """
    num_tokens, k = expert_index_TK.shape
    flat = expert_index_TK.t().reshape(-1)  # priority order
    flat = torch.where(positions_in_slot(flat, num_experts) < capacity, flat, torch.full_like(flat, -1))
    return flat.view(k, num_tokens).t().contiguous()


class SoftmaxRouter(nn.Module):
    """Learned router: Switch (Fedus et al. 2021: k=1, gate p_i) or top-k (renormalised gates by default).
    Scores are the softmax of the logits, or per expert sigmoid (DeepSeek-V3) or sqrt(softplus) (DeepSeek-V4)
    (`scoring`); the chosen experts' scores, renormalised (`renormalize`) and scaled (`scaling_factor`), are the
    gate weights.

    Logits in fp32 ("selective precision", Switch sec. 2.4), multiplicative jitter in training, capacity with
    token dropping, alpha-weighted load-balancing loss and optional z-loss.

    Aux-loss-free balancing (DeepSeek-V3, arXiv 2412.19437 sec. 2.1.2), when `bias_update_rate` > 0: a per-expert
    bias, added to the probabilities for the choice only (the gate weights stay the probabilities), moves by
    `rate * sign(mean load - load)` after every optimizer step (`update_bias`, with the loads of all ranks).
    """

    def __init__(self, hidden_size: int, num_experts: int, k: int, renormalize: bool, jitter: float,
                 capacity_factor: float | None, eval_capacity_factor: float | None, aux_loss_coef: float,
                 z_loss_coef: float, init_scale: float, bias_update_rate: float = 0.0, scoring: str = "softmax",
                 scaling_factor: float = 1.0):
        super().__init__()
        self.num_experts, self.k, self.renormalize, self.jitter = num_experts, k, renormalize, jitter
        self.scoring, self.scaling_factor = scoring, scaling_factor
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.aux_loss_coef, self.z_loss_coef, self.init_scale = aux_loss_coef, z_loss_coef, init_scale
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias_update_rate = bias_update_rate
        if bias_update_rate > 0:
            # Saved with the weights (it decides the routes at inference); fp32 like the logits. Named as
            # transformers' DeepSeek-V3 names it (e_score_...), and without "expert": DeepSpeed's checkpointing
            # files any MoE-layer tensor whose name holds "expert" as an expert's.
            self.register_buffer("score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))
            # Choices since the last update, summed on the device (no host read per step); integers, which
            # model.to(bfloat16) leaves alone (bf16 stops counting at 256).
            self.register_buffer("chosen_since_update", torch.zeros(num_experts, dtype=torch.long),
                                 persistent=False)

    @torch.no_grad()
    def update_bias(self, chosen_E: torch.Tensor) -> None:
        """One DeepSeek-V3 step from `chosen_E`, the choices per expert since the last update (all ranks')."""
        step_E = self.bias_update_rate * torch.sign(chosen_E.double().mean() - chosen_E)
        self.score_correction_bias += step_E.to(self.score_correction_bias)
        self.chosen_since_update.zero_()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=math.sqrt(self.init_scale / self.weight.shape[1]))
        if self.bias_update_rate > 0:  # nn.init: from_pretrained's guarded init keeps a loaded bias
            nn.init.zeros_(self.score_correction_bias)
            nn.init.zeros_(self.chosen_since_update)

    def capacity(self, num_tokens: int) -> int | None:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return None if factor is None else math.ceil(self.k * num_tokens * factor / self.num_experts)

    def forward(self, x_TD: torch.Tensor, routing: RoutingInputs) -> RouterOutput:
        x_TD32 = x_TD.float()
        if self.training and self.jitter > 0:
            x_TD32 = x_TD32 * torch.empty_like(x_TD32).uniform_(1 - self.jitter, 1 + self.jitter)
        logits_TE = F.linear(x_TD32, self.weight.float())
        scores_TE = SCORE_FUNCTIONS[self.scoring](logits_TE)
        if self.bias_update_rate > 0:
            index_TK = (scores_TE.detach() + self.score_correction_bias).topk(self.k, dim=-1).indices
            weight_TK = scores_TE.gather(1, index_TK)
            if self.training:
                self.chosen_since_update += count_per_expert(index_TK, self.num_experts)
        else:
            weight_TK, index_TK = scores_TE.topk(self.k, dim=-1)
        weight_TK = chosen_weights(weight_TK, self.renormalize, self.scaling_factor)
        # Switch's P_i is a probability: per-expert scores (sigmoid, sqrtsoftplus) are normalised per token first
        probs_TE = scores_TE if self.scoring == "softmax" else scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        aux_loss = self.aux_loss_coef * load_balancing_loss(probs_TE, index_TK)
        if self.z_loss_coef > 0:
            aux_loss = aux_loss + self.z_loss_coef * router_z_loss(logits_TE)
        capacity = self.capacity(x_TD.shape[0])
        chosen_TK = None  # nothing dropped: the choice is the index
        if capacity is not None:
            chosen_TK, index_TK = index_TK, drop_over_capacity(index_TK, capacity, self.num_experts)
        return RouterOutput(index_TK, weight_TK.to(x_TD.dtype), aux_loss, logits_TE, chosen_TK)


class BaseRouter(nn.Module):
    """BASE layers (Lewis et al. 2021): balanced assignment in training, greedy top-1 at inference.

    Affinities h_t . c_e choose the expert without gradient; the gate sigmoid(h_t . c_a) carries the gradient
    that trains the centroids. The paper's "+ h_t" is the block's residual connection.
    """

    def __init__(self, hidden_size: int, num_experts: int, centroid_gain: float, scaling_factor: float = 1.0):
        super().__init__()
        self.centroid_gain, self.scaling_factor = centroid_gain, scaling_factor
        # Not named "expert...": DeepSpeed's checkpointing treats such parameters as expert weights.
        self.centroids = nn.Parameter(torch.empty(num_experts, hidden_size))

    def reset_parameters(self) -> None:
        nn.init.orthogonal_(self.centroids, gain=self.centroid_gain)

    def forward(self, x_TD: torch.Tensor, routing: RoutingInputs) -> RouterOutput:
        scores_TE = x_TD.detach().float() @ self.centroids.detach().float().t()
        if self.training:
            index_T = balanced_assignment(scores_TE)
        else:  # balancing at inference would let future tokens change the route
            index_T = scores_TE.argmax(dim=-1)
        gate_T = torch.sigmoid((x_TD * self.centroids[index_T].to(x_TD.dtype)).sum(dim=-1)) * self.scaling_factor
        return RouterOutput(index_T[:, None], gate_T[:, None], x_TD.new_zeros(()), scores_TE)


def build_router(config, layer_idx: int) -> nn.Module:
    router = config.router_of(layer_idx)
    scale = config.routed_scaling_factor
    if router == "hash":
        return HashRouter(config.hash_function, config.num_experts, config.hash_heads, config.vocab_size,
                          config.max_position_embeddings, config.hash_seed + 1000 * layer_idx,
                          gate=config.hash_gate, hidden_size=config.hidden_size,
                          init_scale=config.router_init_scale, experts_per_token=config.hash_experts_per_tok,
                          normalize=config.norm_topk_prob, scaling_factor=scale)
    if router == "base":
        return BaseRouter(config.hidden_size, config.num_experts, config.base_centroid_gain, scale)
    is_switch = router == "switch"
    return SoftmaxRouter(
        config.hidden_size, config.num_experts, k=1 if is_switch else config.num_experts_per_tok,
        renormalize=config.norm_topk_prob and not is_switch, jitter=config.router_jitter if is_switch else 0.0,
        capacity_factor=config.capacity_factor, eval_capacity_factor=config.eval_capacity_factor,
        aux_loss_coef=config.router_aux_loss_coef, z_loss_coef=config.router_z_loss_coef,
        init_scale=config.router_init_scale, bias_update_rate=config.router_bias_update_rate,
        scoring=config.scoring_func, scaling_factor=scale)

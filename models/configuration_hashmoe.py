"""Configuration of hashmoe causal language models (dense, Hash, Switch, BASE and top-k MoE FFNs).

This file is shipped inside exported model folders and loaded with ``trust_remote_code=True``, so it
imports only ``transformers`` and the standard library.
"""

from __future__ import annotations

from transformers import PretrainedConfig

ROUTERS = ("hash", "switch", "base", "topk")
HASH_FUNCTIONS = (
    "random",
    "balanced",
    "balanced_lpt",
    "bigram",
    "prev_token",
    "position",
    "clustered",
    "dispersed",
    "oracle_future",
)
# Hash functions whose table is one seeded random draw per head; only these take hash_heads > 1
# (several data-fitted tables would all be the same partition, which defeats multi-hash).
SEEDED_HASH_FUNCTIONS = ("random", "bigram", "prev_token", "position", "oracle_future")
HASH_GATES = ("none", "sqrtsoftplus")
SCORING_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
ACTIVATIONS = ("gelu", "relu", "silu")
RECURRENCES = ("ladder", "staircase")
FFN_LINEARS = ("dense", "monarch")
RESIDUAL_INITS = ("layers", "passes")
POSITION_EMBEDDING_TYPES = ("absolute", "rope")
NORM_TYPES = ("layernorm", "rmsnorm")


class HashMoEConfig(PretrainedConfig):
    r"""
    Configuration of [`HashMoEForCausalLM`]: a pre-norm decoder-only Transformer whose FFN sublayers are dense
    or Mixture-of-Experts, layer by layer.

    Transformer:
        vocab_size (`int`, defaults to 8192): number of token ids.
        hidden_size (`int`, defaults to 256): model width d_model.
        intermediate_size (`int`, defaults to 1024): hidden width of the dense FFN.
        num_hidden_layers (`int`, defaults to 4): number of Transformer blocks.
        num_attention_heads (`int`, defaults to 4): query heads; must divide `hidden_size` unless `head_dim` is set.
        num_key_value_heads (`int`, *optional*): key/value heads, shared by groups of query heads (grouped-query
            attention, Ainslie et al. 2023); must divide num_attention_heads. Defaults to num_attention_heads
            (multi-head attention).
        head_dim (`int`, *optional*): width of one head; defaults to `hidden_size // num_attention_heads`. Set it
            to decouple the attention width from the model width (Qwen3 uses 128 at every size).
        qk_norm (`bool`, defaults to False): RMSNorm over each head's query and key before RoPE (Qwen3; OLMoE
            normalises the whole projection instead, which this option does not offer).
        max_position_embeddings (`int`, defaults to 1024): longest sequence with learned absolute positions
            (and the `position` hash function's table size); informational with RoPE.
        position_embedding_type (`str`, defaults to `"absolute"`): `absolute` (GPT-2's learned position
            embeddings, added to the token embeddings) or `rope` (rotary embeddings on queries and keys, Su et al.
            2021, through transformers' rope utilities).
        rope_parameters (`dict`, *optional*): transformers' RoPE settings for `rope`, e.g. `{"rope_type":
            "default", "rope_theta": 10000.0}` (also "linear", "dynamic", "yarn", "llama3", "longrope");
            standardised and computed by transformers' rope utilities.
        norm_type (`str`, defaults to `"layernorm"`): `layernorm` (GPT-2) or `rmsnorm` (Zhang & Sennrich 2019;
            Llama, Qwen3, Mixtral, DeepSeek), for the block norms, the final norm and `qk_norm`.
        hidden_act (`str`, defaults to `"gelu"`): FFN activation, one of gelu, relu, silu.
        gated_ffn (`bool`, defaults to False): GLU FFNs, act(x W_gate) * (x W_up) W_down (Shazeer 2020; SwiGLU
            with hidden_act silu, as Llama, Qwen3-MoE, Mixtral and DeepSeek), in the dense FFN, the shared
            experts and the routed experts (whose `w1` is then [gate; up], transformers' `gate_up_proj`).
        dropout (`float`, defaults to 0.0): dropout on embeddings, attention and residual branches.
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of every norm (LayerNorm or RMSNorm).
        initializer_range (`float`, defaults to 0.02): std of the normal init; residual projections use
            `initializer_range / sqrt(2 * num_hidden_layers)` (GPT-2).
        tie_word_embeddings (`bool`, defaults to True): share the input embedding and output projection.
        use_cache (`bool`, defaults to True): return a KV cache from `forward` (used by `generate`).

    Mixture-of-Experts:
        moe_layers (`list[int]`, defaults to `[]`): indices of the blocks whose FFN is a MoE layer; the others
            are dense. `[]` gives a dense model.
        num_experts (`int`, defaults to 8): experts per MoE layer.
        expert_intermediate_size (`int`, *optional*): hidden width of one expert; defaults to
            `intermediate_size`, so one expert costs what the dense FFN costs.
        num_shared_experts (`int`, defaults to 0): always-on experts beside the routed ones (DeepSeek-MoE, Dai et
            al. 2024; DeepSeek-V3/V4), held as one dense FFN of width `num_shared_experts *
            expert_intermediate_size` whose output is added to the routed experts' (weight 1).
        router (`str` or `list[str]`, defaults to `"hash"`): `hash` (Roller et al. 2021), `switch` (Fedus et al.
            2021), `base` (Lewis et al. 2021) or `topk` (top-k, the usual learned baseline): one name for every
            MoE layer, or a list with one name per MoE layer in `moe_layers` order. DeepSeek-V4's layout, hash in
            the first three MoE layers and a learned router above, is `[hash, hash, hash, topk, ...]`.
        hash_function (`str`, defaults to `"balanced"`): for `router="hash"`: random, balanced, balanced_lpt,
            bigram, prev_token, position, clustered, dispersed, or oracle_future (hashes the *next* token: an
            upper bound for analysis; `generate()` refuses it). balanced spreads the training set's token mass
            evenly, filling the lightest expert with tokens in a random order seeded per layer; balanced_lpt
            does it in decreasing frequency (Roller et al.'s greedy LPT). Both start from uniform token counts
            and are refit from data with `HashMoEForCausalLM.fit_hash_tables`; clustered and dispersed need
            that fit (from a trained model's embeddings) before use.
        hash_heads (`int`, defaults to 1): multi-hash: N hash functions, each choosing the expert for one of N
            segments of the expert's hidden units (must divide `expert_intermediate_size`). Only for the
            seeded hash functions (random, bigram, prev_token, position, oracle_future).
        hash_seed (`int`, defaults to 0): seed of the hash tables; layer i uses `hash_seed + 1000 * i`.
        hash_gate (`str`, defaults to `"none"`): the weight of the hashed expert's output: `none` (1, Roller et
            al.) or `sqrtsoftplus` (DeepSeek-V4's hash layers: the table picks the expert, a learned router
            weights it by `sqrt(softplus(x . w_e))`; with `hash_heads` > 1 the heads' weights are renormalised
            to sum to hash_heads, as V4 renormalises a token's chosen experts, and as the ungated heads' weights
            of 1 sum).
        hash_experts_per_tok (`int`, defaults to 1): whole experts a hash layer sends each token to (DeepSeek-V4's
            `tid2eid` table holds k distinct experts per token id). With k > 1 the table is drawn at random (k
            distinct experts per token) and the weights follow `hash_gate`, `norm_topk_prob` and
            `routed_scaling_factor` as V4's hash router does. Only with hash_function random and hash_heads 1.
        num_experts_per_tok (`int`, defaults to 2): k of the `topk` router.
        scoring_func (`str`, defaults to `"softmax"`): how a learned router (switch, topk) turns logits into scores:
            `softmax` (Switch, Mixtral, Qwen3-MoE), `sigmoid` (DeepSeek-V3) or `sqrtsoftplus` (DeepSeek-V4:
            sqrt(softplus(logit))). The top-k scores are the gate weights; the load-balancing loss uses the scores
            normalised over the experts.
        norm_topk_prob (`bool`, defaults to True): renormalise a token's k gate weights to sum to 1 (`topk`, and
            hash layers with hash_experts_per_tok > 1); Mixtral and DeepSeek always do, Qwen3-MoE by this same
            option. Switch (k = 1) never does.
        routed_scaling_factor (`float`, defaults to 1.0): multiplies the routed experts' weights (DeepSeek-V3/V4:
            2.5 / 1.5), in every learned or gated router.
        capacity_factor (`float`, *optional*, defaults to 1.0): training capacity of `switch`/`topk`: each
            expert takes at most `ceil(k * tokens * capacity_factor / num_experts)` tokens; the rest are dropped
            and pass through the residual. `None` means no capacity (dropless).
        eval_capacity_factor (`float`, *optional*, defaults to `None`): the same at evaluation. `None` (no capacity)
            makes evaluation equal generation: a token's output depends on nothing but its own sequence. A
            capacity at evaluation makes outputs depend on padding and on the other sequences in the batch.
        router_aux_loss_coef (`float`, defaults to 0.01): alpha of the load-balancing loss
            `alpha * E * sum_i f_i * P_i` (switch, topk).
        router_z_loss_coef (`float`, defaults to 0.0): coefficient of the router z-loss
            `mean(logsumexp(logits)^2)` (ST-MoE); 0 disables it.
        router_jitter (`float`, defaults to 0.01): multiplicative input jitter `U(1-eps, 1+eps)` of the switch
            router in training; 0 disables it.
        router_init_scale (`float`, defaults to 0.1): Switch's router init, normal with std
            `sqrt(router_init_scale / hidden_size)` (also the hash gate's).
        router_bias_update_rate (`float`, defaults to 0.0): aux-loss-free load balancing for `switch`/`topk`
            (DeepSeek-V3): a per-expert bias added to the router probabilities for the choice only, moved by
            this rate times `sign(mean load - load)` after each optimizer step (`update_router_biases`). 0 turns
            it off; DeepSeek-V3 used 0.001 with a router_aux_loss_coef near 0.
        base_centroid_gain (`float`, defaults to 0.1): gain of the orthogonal init of BASE expert centroids.
        output_router_logits (`bool`, defaults to False): return router logits and expert assignments.

    Parameters without training (Chatelain et al. 2021), dense FFN layers only:
        frozen_ffn_size (`int`, defaults to 0): extra hidden units per dense FFN whose weights are random,
            drawn from `frozen_seed`, stored as buffers and never trained ("doping").
        frozen_seed (`int`, defaults to 0): seed of the frozen units; layer i uses `frozen_seed + 1000 * i`.
        ffn_linear (`str`, defaults to `"dense"`): `dense` or `monarch` (a product of two block-diagonal
            factors, `models/structured.py`) for the dense FFN's two projections.
        monarch_blocks (`int`, defaults to 4): blocks of the Monarch factors; must divide hidden_size and
            intermediate_size.

    Initialisation:
        residual_init (`str`, defaults to `"layers"`): the projections into the residual stream start at
            N(0, initializer_range / sqrt(2 D)) (GPT-2) with D = `"layers"`: num_hidden_layers, or `"passes"`:
            layers x passes through the stack (a ladder's K passes add K times as many residual branches). In the
            review of issue 15, "passes" slowed Ladder x2 (245.1 vs 233.5 valid ppl), hence the default.

    Computation without parameters (Ju et al. 2021):
        recurrence (`dict`, *optional*): `{"kind": "ladder", "steps": K}` applies the whole layer stack K times
            with shared weights (K x the compute, the same parameters); generation keeps a separate KV cache
            per ladder step. `{"kind": "staircase", "chunk": F, "window": W, "memory": M}` reads the sequence
            in chunks of F tokens; each step runs the stack over the W most recent tokens' current states (the
            new chunk included), so every chunk is processed W / F times and its output is taken when it leaves
            the window. `memory` (default 0, a multiple of F) keeps the keys and values of the M tokens that
            left the window last as extra attention context (the cached Staircase); `memory_form` says what the memory
            holds: `"layers"` (default: each layer's own keys and values of those tokens, Transformer-XL's form)
            or `"output"` (their output states, projected by every layer: the paper's form as the review of
            issue 15 read it; `models/staircase.py`). `None` (default): one pass.
    """

    model_type = "hashmoe"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    qk_norm: bool = False
    max_position_embeddings: int = 1024
    position_embedding_type: str = "absolute"
    rope_parameters: dict | None = None
    norm_type: str = "layernorm"
    hidden_act: str = "gelu"
    gated_ffn: bool = False
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    moe_layers: list[int] | None = None
    num_experts: int = 8
    expert_intermediate_size: int | None = None
    num_shared_experts: int = 0
    router: str | list[str] = "hash"
    hash_function: str = "balanced"
    hash_heads: int = 1
    hash_seed: int = 0
    hash_gate: str = "none"
    hash_experts_per_tok: int = 1
    num_experts_per_tok: int = 2
    scoring_func: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    capacity_factor: float | None = 1.0
    eval_capacity_factor: float | None = None
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    router_jitter: float = 0.01
    router_init_scale: float = 0.1
    router_bias_update_rate: float = 0.0
    base_centroid_gain: float = 0.1
    output_router_logits: bool = False
    recurrence: dict | None = None
    frozen_ffn_size: int = 0
    frozen_seed: int = 0
    ffn_linear: str = "dense"
    monarch_blocks: int = 4
    residual_init: str = "layers"

    def __post_init__(self, **kwargs):
        self.moe_layers = sorted(int(i) for i in (self.moe_layers or []))
        if self.expert_intermediate_size is None:
            self.expert_intermediate_size = self.intermediate_size
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and _positive_int(self.num_attention_heads) and _positive_int(self.hidden_size) \
                and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Raise a ValueError naming the first invalid field and how to fix it."""

        def fail(field: str, problem: str, fix: str) -> None:
            raise ValueError(f"HashMoEConfig.{field}: {problem}. {fix}")

        if self.head_dim is None and _positive_int(self.num_attention_heads) and _positive_int(self.hidden_size):
            fail("num_attention_heads", f"{self.num_attention_heads} does not divide hidden_size="
                 f"{self.hidden_size}", "Pick a head count that divides hidden_size, or set head_dim.")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                      "num_experts", "expert_intermediate_size", "hash_heads", "num_experts_per_tok",
                      "hash_experts_per_tok"):
            value = getattr(self, field)
            if not _positive_int(value):
                fail(field, f"got {value!r}", "Use a positive integer.")
        if not _positive_int(self.num_shared_experts) and self.num_shared_experts != 0:
            fail("num_shared_experts", f"got {self.num_shared_experts!r}", "Use 0 (none) or a positive integer.")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"{self.num_key_value_heads} does not divide num_attention_heads="
                 f"{self.num_attention_heads}", "Each key/value head serves a whole group of query heads: pick a "
                 "divisor of num_attention_heads.")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            fail("position_embedding_type", f"got {self.position_embedding_type!r}",
                 f"Use one of {POSITION_EMBEDDING_TYPES}.")
        if self.position_embedding_type == "rope":
            if self.head_dim % 2:
                fail("head_dim", f"RoPE rotates pairs of dimensions but head_dim={self.head_dim} is odd",
                     "Use an even head_dim.")
            if (self.recurrence or {}).get("kind") == "staircase":
                fail("position_embedding_type", "rope is not offered with a staircase recurrence yet (its "
                     "windows attend over relative slots, not absolute positions)", "Use absolute positions.")
        if self.norm_type not in NORM_TYPES:
            fail("norm_type", f"got {self.norm_type!r}", f"Use one of {NORM_TYPES}.")
        for field in ("qk_norm", "gated_ffn"):
            if not isinstance(getattr(self, field), bool):
                fail(field, f"got {getattr(self, field)!r}", "Use true or false.")
        if self.hidden_act not in ACTIVATIONS:
            fail("hidden_act", f"unknown activation {self.hidden_act!r}", f"Use one of {ACTIVATIONS}.")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", f"got {self.dropout!r}", "Use a probability in [0, 1).")
        bad_layers = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
        if bad_layers:
            fail("moe_layers", f"indices {bad_layers} are out of range for num_hidden_layers="
                 f"{self.num_hidden_layers}", f"Use indices in [0, {self.num_hidden_layers - 1}].")
        if len(set(self.moe_layers)) != len(self.moe_layers):
            fail("moe_layers", f"{self.moe_layers} repeats an index", "List each MoE layer once.")
        routers = self.router if isinstance(self.router, list) else [self.router]
        unknown = [r for r in routers if r not in ROUTERS]
        if unknown:
            fail("router", f"unknown router {unknown[0]!r}", f"Use one of {ROUTERS}, or a list of them.")
        if isinstance(self.router, list) and len(self.router) != len(self.moe_layers):
            fail("router", f"lists {len(self.router)} routers for {len(self.moe_layers)} MoE layers "
                 f"(moe_layers={self.moe_layers})", "Give one router per MoE layer, or one name for all.")
        if self.hash_function not in HASH_FUNCTIONS:
            fail("hash_function", f"unknown hash function {self.hash_function!r}",
                 f"Use one of {HASH_FUNCTIONS}.")
        if self.hash_gate not in HASH_GATES:
            fail("hash_gate", f"unknown gate {self.hash_gate!r}", f"Use one of {HASH_GATES}.")
        if self.scoring_func not in SCORING_FUNCS:
            fail("scoring_func", f"unknown scoring function {self.scoring_func!r}", f"Use one of {SCORING_FUNCS}.")
        if not isinstance(self.norm_topk_prob, bool):
            fail("norm_topk_prob", f"got {self.norm_topk_prob!r}", "Use true or false.")
        if not isinstance(self.routed_scaling_factor, (int, float)) or not self.routed_scaling_factor > 0:
            fail("routed_scaling_factor", f"got {self.routed_scaling_factor!r}", "Use a positive number (1: off).")
        hashed = self.uses_router("hash")
        if self.hash_gate != "none" and not hashed:
            fail("hash_gate", f"{self.hash_gate!r} weights a hash router, but router={self.router!r}",
                 "Use hash_gate='none', or router='hash'.")
        if not isinstance(self.router_bias_update_rate, (int, float)) or self.router_bias_update_rate < 0:
            fail("router_bias_update_rate", f"got {self.router_bias_update_rate!r}",
                 "Use 0 (off) or a small positive rate such as 0.001.")
        if self.router_bias_update_rate > 0 and not (self.uses_router("switch") or self.uses_router("topk")):
            fail("router_bias_update_rate", f"balances a learned router's choice, but router={self.router!r} "
                 "chooses without one", "Use 0, or router='switch' or 'topk'.")
        if hashed and self.hash_heads > 1:
            if self.hash_function not in SEEDED_HASH_FUNCTIONS:
                fail("hash_heads", f"multi-hash ({self.hash_heads} heads) is not available for "
                     f"hash_function={self.hash_function!r}",
                     f"Use hash_heads=1, or one of {SEEDED_HASH_FUNCTIONS}.")
            if self.expert_intermediate_size % self.hash_heads:
                fail("hash_heads", f"{self.hash_heads} heads do not divide expert_intermediate_size="
                     f"{self.expert_intermediate_size}", "Pick hash_heads dividing the expert width.")
        if hashed and self.hash_experts_per_tok > 1:
            if self.hash_function != "random" or self.hash_heads > 1:
                fail("hash_experts_per_tok", f"{self.hash_experts_per_tok} experts per token are drawn as a "
                     f"random table, but hash_function={self.hash_function!r}, hash_heads={self.hash_heads}",
                     "Use hash_function random with hash_heads 1, or hash_experts_per_tok 1.")
            if self.hash_experts_per_tok > self.num_experts:
                fail("hash_experts_per_tok", f"{self.hash_experts_per_tok} distinct experts per token exceed "
                     f"num_experts={self.num_experts}", "Use k <= num_experts.")
        if self.uses_router("topk") and self.num_experts_per_tok > self.num_experts:
            fail("num_experts_per_tok", f"k={self.num_experts_per_tok} exceeds num_experts="
                 f"{self.num_experts}", "Use k <= num_experts.")
        for field in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, field)
            if value is not None and not value > 0:
                fail(field, f"got {value!r}", "Use a positive number, or null for no capacity (dropless).")
        for field in ("router_aux_loss_coef", "router_z_loss_coef", "router_jitter", "router_init_scale",
                      "base_centroid_gain"):
            if getattr(self, field) < 0:
                fail(field, f"got {getattr(self, field)!r}", "Use a non-negative number.")
        if self.router_jitter >= 1:
            fail("router_jitter", f"got {self.router_jitter!r}", "Use eps in [0, 1).")
        if not isinstance(self.frozen_ffn_size, int) or self.frozen_ffn_size < 0:
            fail("frozen_ffn_size", f"got {self.frozen_ffn_size!r}", "Use 0 (no doping) or a positive integer.")
        if self.residual_init not in RESIDUAL_INITS:
            fail("residual_init", f"got {self.residual_init!r}", f"Use one of {RESIDUAL_INITS}.")
        if self.ffn_linear not in FFN_LINEARS:
            fail("ffn_linear", f"unknown linear layer {self.ffn_linear!r}", f"Use one of {FFN_LINEARS}.")
        if self.ffn_linear == "monarch" and (self.monarch_blocks < 1 or self.hidden_size % self.monarch_blocks
                                             or self.intermediate_size % self.monarch_blocks):
            fail("monarch_blocks", f"{self.monarch_blocks} does not divide hidden_size={self.hidden_size} and "
                 f"intermediate_size={self.intermediate_size}", "Pick a block count dividing both.")
        if self.recurrence is not None:
            if not isinstance(self.recurrence, dict) or self.recurrence.get("kind") not in RECURRENCES:
                fail("recurrence", f"got {self.recurrence!r}",
                     f"Use null, or a mapping with kind one of {RECURRENCES}, e.g. {{kind: ladder, steps: 2}}.")
            if self.recurrence["kind"] == "ladder":
                self._check_ladder(fail)
            else:
                self._check_staircase(fail)

    def _check_ladder(self, fail) -> None:
        unknown = set(self.recurrence) - {"kind", "steps"}
        if unknown or not _positive_int(self.recurrence.get("steps")):
            fail("recurrence", f"got {self.recurrence!r}", "A ladder takes one key besides kind: steps, "
                 "a positive integer (the number of passes through the stack).")

    def _check_staircase(self, fail) -> None:
        r = self.recurrence
        unknown = set(r) - {"kind", "chunk", "window", "memory", "memory_form"}
        chunk, window, memory = r.get("chunk"), r.get("window"), r.get("memory", 0)
        usage = ("e.g. {kind: staircase, chunk: 16, window: 64, memory: 0}: chunk and window positive integers, "
                 "window a multiple of chunk, memory 0 or a multiple of chunk, memory_form layers (default) or "
                 "output.")
        if r.get("memory_form", "layers") not in ("layers", "output"):
            fail("recurrence", f"memory_form={r.get('memory_form')!r}", f"Use layers or output: {usage}")
        if unknown or not _positive_int(chunk) or not _positive_int(window) or not (memory == 0 or _positive_int(memory)):
            fail("recurrence", f"got {r!r}", f"A staircase takes chunk, window and optionally memory: {usage}")
        if window % chunk or memory % chunk:
            fail("recurrence", f"window={window} and memory={memory} must be multiples of chunk={chunk}", usage)

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    @property
    def routers(self) -> list[str]:
        """The router of each MoE layer, in `moe_layers` order."""
        return list(self.router) if isinstance(self.router, list) else [self.router] * len(self.moe_layers)

    def router_of(self, layer_idx: int) -> str:
        """The router of block `layer_idx` (an MoE layer)."""
        return self.routers[self.moe_layers.index(layer_idx)]

    def uses_router(self, name: str) -> bool:
        """Whether `router` names `name` (for a dense model: the router its MoE layers would have)."""
        return name in (self.router if isinstance(self.router, list) else [self.router])

    @property
    def ladder_steps(self) -> int:
        """Passes through the layer stack per forward for a ladder (1 otherwise)."""
        return self.recurrence["steps"] if self.recurrence and self.recurrence["kind"] == "ladder" else 1

    @property
    def gradient_checkpointing_unsupported(self) -> str | None:
        """Why gradient checkpointing cannot run on this model, or None. The cached staircase's memory reaches
        each block as a KV cache that the block extends: transformers' checkpointing drops the cache, and a
        recomputation would extend it a second time."""
        if self.recurrence and self.recurrence["kind"] == "staircase" and self.recurrence.get("memory", 0):
            return "is not supported for the cached staircase (recurrence.memory > 0) yet"
        return None

    @property
    def passes_per_token(self) -> int:
        """How many times the layer stack processes each token: ladder steps, or window / chunk of a staircase."""
        if self.recurrence and self.recurrence["kind"] == "staircase":
            return self.recurrence["window"] // self.recurrence["chunk"]
        return self.ladder_steps

    @property
    def residual_depth(self) -> int:
        """The depth D of GPT-2's 1/sqrt(2D) output init (`residual_init`): the layers, or layers x passes."""
        return self.num_hidden_layers * (self.passes_per_token if self.residual_init == "passes" else 1)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


__all__ = ["HashMoEConfig"]

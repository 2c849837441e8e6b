"""Staircase recurrence (Ju, Roller, Sukhbaatar, Weston 2021, arXiv 2106.04279), over hashmoe's layer stack.

Shape suffixes: B batch, S sequence, W tokens in the window, D width.

The sequence is cut into chunks of F tokens; K = window / F. Chunk c enters the window at step c and takes
part in steps c .. c+K-1; step s runs the shared stack once over the chunks then in the window, in sequence
order, each at its current state, under causal attention. The output of chunk c is its state after step
c+K-1, when it leaves the window: K passes through the stack per token, the parameters of one.

Attention is causal inside a step, so a chunk's states never depend on the chunks after it. Two things follow:
running past the end of the sequence (steps n .. n+K-2, no new chunk) finishes the last chunks exactly as
later chunks would have, and the states of step s can be built one token at a time, which is how generation
works (`decode`): each new token runs all K of its passes at once, appending its keys and values to the
per-step caches of steps c .. c+K-1, which hold the earlier window tokens' keys and values of that step.

Cached variant (`memory` M > 0 tokens): a chunk's keys and values from its last pass are kept, and the
steps after it attend to the M most recent finished tokens as extra context (Transformer-XL-like memory,
here without stopping gradients).

What the memory holds, against the paper: here each layer l attends to the keys and values that layer l computed
for the finished tokens in their last pass, i.e. per-layer states (Transformer-XL's form; the same as caching
each layer's input states and projecting them again, since the weights are shared). The review of issue 15 read
the paper's cached Staircase as keeping one state per finished token, the chunk's output state after its last
pass, which every layer then attends to through its own key/value projection (the Feedback Transformer's
form). The two differ in what a layer sees of the past: its own level here, the top of the stack there. Both
are offered: `memory_form: layers` (this default) or `memory_form: output` (the paper's, as read above).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class StaircaseCache(DynamicCache):
    """Generation state of a staircase: one KV cache per step still in progress, and finished chunks' keys
    and values for the memory. `get_seq_length()` is the number of tokens decoded, as generate() expects."""

    def __init__(self):
        super().__init__()
        self.step_caches: dict[int, tuple[DynamicCache, int]] = {}  # step -> (cache, memory length in it)
        self.finished: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # chunk -> per-layer (k, v)
        self.chunk_outputs: list[torch.Tensor] = []  # outputs of the chunk being decoded (memory_form "output")
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    # Beam search and batch expansion act on every sequence's state: the per-step caches and the memory.
    def _apply_to_memory(self, tensor_fn) -> None:
        self.finished = {chunk: [(tensor_fn(k), tensor_fn(v)) for k, v in layers]
                         for chunk, layers in self.finished.items()}
        self.chunk_outputs = [tensor_fn(h) for h in self.chunk_outputs]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for step_cache, _ in self.step_caches.values():
            step_cache.reorder_cache(beam_idx)
        self._apply_to_memory(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for step_cache, _ in self.step_caches.values():
            step_cache.batch_repeat_interleave(repeats)
        self._apply_to_memory(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for step_cache, _ in self.step_caches.values():
            step_cache.batch_select_indices(indices)
        self._apply_to_memory(lambda t: t[indices, ...])

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.seen_tokens + max_length
        if max_length >= self.seen_tokens:
            return
        raise NotImplementedError(
            "a StaircaseCache cannot drop decoded tokens: each token's passes are already folded into the caches "
            "of later steps. Assisted decoding and other cache cropping need a model without staircase recurrence.")


class Staircase:
    def __init__(self, recurrence: dict, blocks, attention_layout):
        """`attention_layout(mask, B, W, past_len, device)`: the model's attention-mask description (passed in
        so this module does not import the model file that imports it)."""
        self.attention_layout = attention_layout
        self.chunk = recurrence["chunk"]
        self.passes = recurrence["window"] // self.chunk  # K
        self.memory_chunks = recurrence.get("memory", 0) // self.chunk  # M / F
        self.memory_from_output = recurrence.get("memory_form", "layers") == "output"
        self.blocks = blocks

    def forward(self, x_BSD: torch.Tensor, routing_for):
        """The whole sequence at once (training, scoring). `routing_for(lo, hi)`: routing inputs of tokens lo:hi."""
        B, S, _ = x_BSD.shape
        F, K = self.chunk, self.passes
        states = list(x_BSD.split(F, dim=1))
        n = len(states)
        outputs, finished, layer_stats = [None] * n, {}, []
        for step in range(n + K - 1):
            first, last = max(0, step - K + 1), min(step, n - 1)
            x_BWD = torch.cat(states[first:last + 1], dim=1)
            cache, memory_len = self._memory_cache(finished, step)
            lo = first * F
            x_BWD = self._run_stack(x_BWD, cache, memory_len, routing_for(lo, lo + x_BWD.shape[1]), layer_stats)
            states[first:last + 1] = x_BWD.split(F, dim=1)
            if step - K + 1 == first:  # the oldest chunk leaves the window: its output is final
                outputs[first] = states[first]
                if cache is not None:
                    finished[first] = (self._output_kv(states[first]) if self.memory_from_output
                                       else self._chunk_kv(cache, memory_len, states[first].shape[1]))
                    finished.pop(first - self.memory_chunks, None)
        return torch.cat(outputs, dim=1), layer_stats

    def decode(self, x_BSD: torch.Tensor, routing_for, cache: StaircaseCache):
        """Tokens appended one at a time to `cache` (generation). Same outputs as `forward` on the whole
        sequence: each token runs its K passes now, against the per-step caches."""
        outputs, layer_stats = [], []
        for j in range(x_BSD.shape[1]):
            chunk, offset = divmod(cache.seen_tokens, self.chunk)
            if offset == 0:
                self._start_chunk(cache, chunk)
            h_B1D = x_BSD[:, j:j + 1]
            routing = routing_for(j, j + 1)
            for step in range(chunk, chunk + self.passes):
                step_cache, memory_len = cache.step_caches[step]
                h_B1D = self._run_stack(h_B1D, step_cache, step_cache.get_seq_length(), routing, layer_stats)
            outputs.append(h_B1D)
            if self.memory_from_output and self.memory_chunks:
                cache.chunk_outputs.append(h_B1D)
            cache.seen_tokens += 1
        return torch.cat(outputs, dim=1), layer_stats

    # ---- internals -------------------------------------------------------------------------------------
    def _run_stack(self, x_BWD, cache, past_len, routing, layer_stats):
        B, W, _ = x_BWD.shape
        layout = self.attention_layout(None, B, W, past_len, x_BWD.device)
        for index, block in enumerate(self.blocks):
            x_BWD, _, stats = block(x_BWD, layout=layout, routing=routing, past_key_values=cache, cache_index=index)
            if stats is not None:
                layer_stats.append(stats)
        return x_BWD

    def _memory_cache(self, finished: dict, step: int):
        """A KV cache holding the memory of `step` (chunks step-K-M+1 .. step-K), or (None, 0) without memory."""
        if not self.memory_chunks:
            return None, 0
        cache = DynamicCache()
        while len(cache.layers) < len(self.blocks):
            cache.layers.append(DynamicLayer())
        chunks = [c for c in range(step - self.passes - self.memory_chunks + 1, step - self.passes + 1)
                  if c in finished]
        memory_len = 0
        if chunks:
            for index in range(len(self.blocks)):
                keys = torch.cat([finished[c][index][0] for c in chunks], dim=2)
                values = torch.cat([finished[c][index][1] for c in chunks], dim=2)
                cache.update(keys, values, index)
            memory_len = cache.layers[0].keys.shape[2]
        return cache, memory_len

    def _output_kv(self, h_BFD: torch.Tensor):
        """Per-layer (k, v) of finished tokens from their output states: each layer projects the same states with
        its own norm and key/value weights (memory_form "output")."""
        kv = []
        for block in self.blocks:
            _, k, v = block.self_attn.project(block.input_layernorm(h_BFD), rotary=None)  # no RoPE with a staircase
            kv.append((k, v))
        return kv

    def _chunk_kv(self, cache: DynamicCache, start: int, length: int):
        return [(layer.keys[:, :, start:start + length], layer.values[:, :, start:start + length])
                for layer in cache.layers[:len(self.blocks)]]

    def _start_chunk(self, cache: StaircaseCache, chunk: int) -> None:
        """Chunk `chunk - 1` is complete: keep its last-pass keys and values for the memory, drop the cache
        of the step that just ended, open the caches of the steps this chunk takes part in."""
        K = self.passes
        if self.memory_chunks and chunk > 0:
            if self.memory_from_output:
                cache.finished[chunk - 1] = self._output_kv(torch.cat(cache.chunk_outputs, dim=1))
                cache.chunk_outputs = []
            else:
                last_cache, memory_len = cache.step_caches[chunk - 1 + K - 1]  # only that chunk after memory
                cache.finished[chunk - 1] = self._chunk_kv(last_cache, memory_len, self.chunk)
            cache.finished.pop(chunk - 1 - self.memory_chunks, None)
        for step in [s for s in cache.step_caches if s < chunk]:
            del cache.step_caches[step]
        for step in range(chunk, chunk + K):
            if step not in cache.step_caches:
                step_cache, memory_len = self._memory_cache(cache.finished, step)
                if step_cache is None:
                    step_cache = DynamicCache()
                    while len(step_cache.layers) < len(self.blocks):
                        step_cache.layers.append(DynamicLayer())
                cache.step_caches[step] = (step_cache, memory_len)

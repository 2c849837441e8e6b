"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`, from the installed release's sdist)
and hashmoe's generation tests in HF's style, for every routing and recurrence variant.

Every skip names why the test cannot apply to that architecture.
"""

from __future__ import annotations

import unittest

import pytest
import torch
from transformers.models.auto import modeling_auto

from models import HashMoEConfig, HashMoEForCausalLM, HashMoEModel
from tests.conftest import MODERN_BLOCK, V4_LAYOUT
from tests.models.hf_suite import load_upstream

modeling_common, configuration_common = load_upstream()
ModelTesterMixin, ids_tensor = modeling_common.ModelTesterMixin, modeling_common.ids_tensor
from hf_upstream.generation.test_utils import GenerationTesterMixin  # noqa: E402  (the package exists now)

pytestmark = pytest.mark.conformance

# transformers' suite tells a base model from a causal LM (which gets labels, which is trained) by these name
# tables, where every in-library model is listed; hashmoe's classes join them for this test session.
modeling_auto.MODEL_MAPPING_NAMES.setdefault("hashmoe", "HashMoEModel")
modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault("hashmoe", "HashMoEForCausalLM")


class HashMoEModelTester:
    def __init__(self, parent, padding: bool = True, **overrides):
        self.parent = parent
        self.batch_size, self.seq_length, self.is_training = 2, 8, True
        self.vocab_size, self.hidden_size, self.num_attention_heads = 99, 32, 4
        self.num_blocks = overrides.pop("num_hidden_layers", 2)
        self.padding = padding
        self.overrides = overrides
        # What the suite counts as layers (attention maps and hidden states returned): block applications. A
        # ladder applies the stack once per step.
        self.num_hidden_layers = self.num_blocks * self.get_config().ladder_steps

    def get_config(self) -> HashMoEConfig:
        values = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=64,
                      num_hidden_layers=self.num_blocks, num_attention_heads=self.num_attention_heads,
                      max_position_embeddings=64, moe_layers=[1], num_experts=4, pad_token_id=0)
        values.update(self.overrides)
        return HashMoEConfig(**values)

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = torch.ones_like(input_ids)
        if self.padding:  # left padding on the second sequence
            attention_mask[1, :3] = 0
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


NEEDS_IDS = ("a hash router chooses experts by token id, so embeddings alone are refused with a ValueError "
             "(checked in test_generate_from_inputs_embeds, with ids and embeddings together)")
EXPERTS_INTERFACE = ("the test counts calls of transformers' own experts functions (batched_mm / grouped_mm over "
                     "gate_up_proj weights); hashmoe's ExpertBank is its own module with its own grouped_mm and "
                     "eager paths, tested equal in tests/models/test_experts.py and test_modeling.py "
                     "(test_experts_implementations_give_the_same_model)")
HASH_SKIPS = {"test_inputs_embeds": NEEDS_IDS, "test_inputs_embeds_matches_input_ids": NEEDS_IDS}
ROPE_TESTS = ("test_model_rope_scaling_from_config_0_linear", "test_model_rope_scaling_from_config_1_dynamic",
              "test_model_rope_scaling_from_config_2_yarn", "test_model_rope_scaling_frequencies")
LEARNED_POSITIONS = ("learned absolute positions (position_embedding_type: absolute, GPT-2's block): there is no "
                     "RoPE to scale; the RoPE variants (TestModern*) run these tests")


class HashMoECommonTests(ModelTesterMixin, GenerationTesterMixin):
    all_model_classes = (HashMoEModel, HashMoEForCausalLM)
    config_overrides: dict = {}
    padding = True
    test_all_params_have_gradient = False  # an expert no token reached in a tiny batch has no gradient
    skips: dict = {}

    def setUp(self):
        self.model_tester = HashMoEModelTester(self, padding=self.padding, **self.config_overrides)
        self.config_tester = configuration_common.ConfigTester(self, config_class=HashMoEConfig, hidden_size=32,
                                                               **self.config_overrides)
        name = self._testMethodName
        if name in self.skips:
            self.skipTest(self.skips[name])
        if name in ROPE_TESTS and self.model_tester.get_config().position_embedding_type != "rope":
            self.skipTest(LEARNED_POSITIONS)
        if name.startswith("test_eager_matches_batched_and_grouped_inference"):
            self.skipTest(EXPERTS_INTERFACE)

    def test_config(self):
        self.config_tester.run_common_tests()


def variant(name: str, bases=(), **attributes):
    return type(f"Test{name}", (HashMoECommonTests, unittest.TestCase), attributes)


TestDense = variant("Dense", config_overrides=dict(moe_layers=[]))
TestHashBalanced = variant("HashBalanced", skips=HASH_SKIPS,
                           config_overrides=dict(router="hash", hash_function="balanced"))
TestHashBigram = variant("HashBigram", skips=HASH_SKIPS, config_overrides=dict(router="hash", hash_function="bigram"))
TestHashMulti = variant("HashMulti", skips=HASH_SKIPS,
                        config_overrides=dict(router="hash", hash_function="random", hash_heads=4))
TestSwitch = variant("Switch", config_overrides=dict(router="switch"))
TestBase = variant("Base", config_overrides=dict(router="base"))
TestTopk = variant("Topk", config_overrides=dict(router="topk"))
TestLadder = variant("Ladder", skips=HASH_SKIPS, config_overrides=dict(
    router="hash", hash_function="random", num_hidden_layers=1, moe_layers=[0],
    recurrence={"kind": "ladder", "steps": 2}))
STAIRCASE_PADDING = ("a staircase reads each sequence chunk by chunk from its first token: padded batches are refused "
                     "with a ValueError (tests/models/test_staircase.py)")
STAIRCASE_LAYERS = ("each staircase step runs the stack over a different window of chunks, so there is no single "
                    "[B, S, D] state or attention map per layer: output_hidden_states gives the embeddings and the "
                    "final output, output_attentions nothing")
STAIRCASE_SKIPS = {**HASH_SKIPS, **{name: STAIRCASE_PADDING for name in modeling_common.ModelTesterMixin.__dict__
                                    if name.startswith("test_eager_matches_sdpa_inference")},
                   "test_left_padding_equals_each_sequence_alone": STAIRCASE_PADDING,
                   "test_attention_outputs": STAIRCASE_LAYERS, "test_hidden_states_output": STAIRCASE_LAYERS,
                   "test_retain_grad_hidden_states_attentions": STAIRCASE_LAYERS,
                   "test_assisted_decoding_equals_greedy": "assisted decoding crops rejected tokens from the cache; "
                   "a StaircaseCache cannot (each token's passes are folded into later steps) and says so",
                   **{name: "the test's mock replays only the last forward a layer handed to the checkpoint "
                      "function, and a staircase runs each block once per step on a different window (gradients "
                      "with checkpointing equal those without: tests/models/test_staircase.py)"
                      for name in ("test_training_gradient_checkpointing",
                                   "test_training_gradient_checkpointing_use_reentrant_false",
                                   "test_training_gradient_checkpointing_use_reentrant_true")}}
TestStaircase = variant("Staircase", padding=False, skips=STAIRCASE_SKIPS, config_overrides=dict(
    router="hash", hash_function="random", recurrence={"kind": "staircase", "chunk": 2, "window": 4}))

# The 2026 block (Qwen3-MoE's shape: RoPE, RMSNorm, SwiGLU, GQA, head_dim apart from the width, QK-norm, untied
# embeddings) with each kind of router, DeepSeek-V4's layout and a shared expert.
TestModernDense = variant("ModernDense", config_overrides=dict(moe_layers=[], **MODERN_BLOCK))
TestModernHash = variant("ModernHash", skips=HASH_SKIPS,
                         config_overrides=dict(router="hash", hash_function="random", **MODERN_BLOCK))
TestModernTopk = variant("ModernTopk", config_overrides=dict(router="topk", **MODERN_BLOCK))
TestModernTopkShared = variant("ModernTopkShared", config_overrides=dict(router="topk", num_shared_experts=1,
                                                                         **MODERN_BLOCK))
TestModernV4 = variant("ModernV4", skips=HASH_SKIPS, config_overrides=dict(**V4_LAYOUT, **MODERN_BLOCK))
# A tester whose model classes are the causal LM alone (as many downstream testers declare them): the suite then
# reads outputs[0] of a forward without labels as the logits, as for transformers' own MoE models.
TestHashCausalLMOnly = variant("HashCausalLMOnly", all_model_classes=(HashMoEForCausalLM,), skips=HASH_SKIPS,
                               config_overrides=dict(router="hash", hash_function="random"))
TestDenseCausalLMOnly = variant("DenseCausalLMOnly", all_model_classes=(HashMoEForCausalLM,),
                                config_overrides=dict(moe_layers=[]))

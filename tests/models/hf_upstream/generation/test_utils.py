"""`GenerationTesterMixin` stand-in (transformers' sdist lacks tests/generation/): hashmoe's own generation
tests, in the style of transformers' — every decoding mode checked against a reference computed another way
(a manual argmax loop over full forwards, the uncached model, each sequence alone), not just "it ran".

A test class sets `generation_skips = {"test_name": "reason"}` for what cannot apply to its architecture.
"""

import copy

import torch
from transformers import DynamicCache


def cache_of(output):
    """The cache of a model or generate() output: `cache` from transformers 5.24, `past_key_values` before."""
    return output["cache"] if "cache" in output else output["past_key_values"]


class GenerationTesterMixin:
    generation_skips: dict = {}
    max_new_tokens = 6

    def _skip_if_listed(self):
        name = self._testMethodName
        if name in self.generation_skips:
            self.skipTest(self.generation_skips[name])

    def _generation_setup(self, batch_size=2, prompt_length=5):
        self._skip_if_listed()
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        torch.manual_seed(0)
        model = self.all_generative_model_classes[0](config).eval()
        generator = torch.Generator().manual_seed(1)
        prompt = torch.randint(1, config.vocab_size, (batch_size, prompt_length), generator=generator)
        return model, prompt

    def _generate(self, model, prompt, **kwargs):
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": False, "pad_token_id": 0, **kwargs}
        return model.generate(prompt, **kwargs)

    def test_greedy_generate_equals_manual_argmax(self):
        model, prompt = self._generation_setup()
        ids = prompt
        with torch.no_grad():
            for _ in range(self.max_new_tokens):
                next_id = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, next_id], dim=1)
        self.assertTrue(torch.equal(self._generate(model, prompt), ids))

    def test_greedy_generate_with_cache_equals_without(self):
        model, prompt = self._generation_setup()
        out_cached = self._generate(model, prompt, use_cache=True, output_logits=True, return_dict_in_generate=True)
        out_plain = self._generate(model, prompt, use_cache=False, output_logits=True, return_dict_in_generate=True)
        self.assertTrue(torch.equal(out_cached.sequences, out_plain.sequences))
        for cached, plain in zip(out_cached.logits, out_plain.logits):
            torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-5)

    def test_sample_generate_reproducible_and_cache_independent(self):
        model, prompt = self._generation_setup()
        kwargs = dict(do_sample=True, top_k=10, temperature=1.3)
        runs = []
        for use_cache in (True, True, False):
            torch.manual_seed(7)
            runs.append(self._generate(model, prompt, use_cache=use_cache, **kwargs))
        self.assertTrue(torch.equal(runs[0], runs[1]))
        self.assertTrue(torch.equal(runs[0], runs[2]))

    def test_beam_search_generate(self):
        model, prompt = self._generation_setup()
        kwargs = dict(num_beams=3, num_return_sequences=2, output_scores=True, return_dict_in_generate=True)
        cached = self._generate(model, prompt, use_cache=True, **kwargs)
        plain = self._generate(model, prompt, use_cache=False, **kwargs)
        self.assertEqual(cached.sequences.shape, (2 * prompt.shape[0], prompt.shape[1] + self.max_new_tokens))
        self.assertTrue(torch.equal(cached.sequences, plain.sequences))
        torch.testing.assert_close(cached.sequences_scores, plain.sequences_scores, rtol=1e-4, atol=1e-5)
        # the best beam scores at least as well as greedy decoding under the model
        greedy = self._generate(model, prompt)
        self.assertGreaterEqual(float(self._sequence_logprob(model, cached.sequences[0], prompt.shape[1])) + 1e-4,
                                float(self._sequence_logprob(model, greedy[0], prompt.shape[1])))

    @staticmethod
    def _sequence_logprob(model, ids, prompt_length):
        with torch.no_grad():
            logprobs = model(ids[None], use_cache=False).logits[0].log_softmax(-1)
        return sum(logprobs[t - 1, ids[t]] for t in range(prompt_length, ids.shape[0]))

    def test_left_padding_equals_each_sequence_alone(self):
        model, prompt = self._generation_setup(batch_size=2, prompt_length=6)
        short = prompt[1, 2:]
        padded = prompt.clone()
        padded[1, :2] = 0
        mask = torch.ones_like(padded)
        mask[1, :2] = 0
        together = self._generate(model, padded, attention_mask=mask)
        alone = [self._generate(model, prompt[:1]), self._generate(model, short[None])]
        self.assertTrue(torch.equal(together[0], alone[0][0]))
        self.assertTrue(torch.equal(together[1, 2:], alone[1][0]))

    def test_explicit_dynamic_cache_equals_default(self):
        model, prompt = self._generation_setup()
        default = self._generate(model, prompt)
        explicit = self._generate(model, prompt, past_key_values=DynamicCache())
        self.assertTrue(torch.equal(default, explicit))

    def test_static_cache_equals_dynamic(self):
        model, prompt = self._generation_setup()
        dynamic = self._generate(model, prompt)
        static = self._generate(model, prompt, cache_implementation="static")
        self.assertTrue(torch.equal(dynamic, static))

    def test_continue_from_cache(self):
        model, prompt = self._generation_setup()
        whole = self._generate(model, prompt, max_new_tokens=2 * self.max_new_tokens)
        first = self._generate(model, prompt, return_dict_in_generate=True)
        rest = self._generate(model, first.sequences, past_key_values=copy.deepcopy(cache_of(first)))
        self.assertTrue(torch.equal(rest, whole))

    def test_generate_from_inputs_embeds(self):
        """generate(input_ids, inputs_embeds): the embeddings replace the token embeddings and the ids are kept
        (HF's call for generating from embeddings with the prompt's ids), for every router; embeddings alone
        for every router that does not choose by id, while a hash model says it needs the ids."""
        model, prompt = self._generation_setup()
        embeds = model.get_input_embeddings()(prompt)
        from_ids = self._generate(model, prompt)
        both = self._generate(model, prompt, inputs_embeds=embeds)
        self.assertTrue(torch.equal(both, from_ids))
        if "hash" in model.config.routers:
            with self.assertRaisesRegex(ValueError, "needs input_ids"):
                self._generate(model, None, inputs_embeds=embeds)
        else:
            # generate() returns only the new tokens when it starts from embeddings
            from_embeds = self._generate(model, None, inputs_embeds=embeds)
            self.assertTrue(torch.equal(from_embeds, from_ids[:, prompt.shape[1]:]))

    def test_assisted_decoding_equals_greedy(self):
        model, prompt = self._generation_setup(batch_size=1)
        torch.manual_seed(5)
        assistant = type(model)(model.config).eval()  # another draft model: its guesses are often rejected
        greedy = self._generate(model, prompt)
        assisted = self._generate(model, prompt, assistant_model=assistant)
        self.assertTrue(torch.equal(greedy, assisted))

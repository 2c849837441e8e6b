"""`ExportTesterMixin` stand-in (transformers' sdist lacks tests/exporters/): hashmoe's own export test.

`torch.export` of the causal LM's forward without a cache, for the model tester's config, checked against
eager logits. Variants whose forward is data-dependent by design (capacity dropping, balanced assignment,
chunked staircase) set `test_torch_exportable = False` with the reason next to it.
"""

import torch


class ExportTesterMixin:
    test_torch_exportable = True

    def test_torch_export(self):
        if not self.test_torch_exportable:
            self.skipTest(getattr(self, "torch_export_skip_reason", "not exportable"))
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_generative_model_classes:
            model = model_class(config).eval()
            args = {"input_ids": inputs["input_ids"], "use_cache": False}
            with torch.no_grad():
                expected = model(**args).logits
                program = torch.export.export(model, args=(), kwargs=args, strict=False)
                got = program.module()(**args).logits
            torch.testing.assert_close(got, expected)

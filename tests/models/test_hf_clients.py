"""hashmoe models under transformers' and accelerate's own clients: HF Trainer with gradient accumulation,
accelerate's disk offload (device_map), bf16 loading."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from models import HashMoEForCausalLM
from tests.conftest import tiny_config

pytestmark = pytest.mark.conformance

VARIANTS = {
    "dense": dict(moe_layers=[]),
    "hash": dict(router="hash", hash_function="random"),
    "hash-multi": dict(router="hash", hash_function="random", hash_heads=2),
    "switch": dict(router="switch", router_jitter=0.0, capacity_factor=None),
    "base": dict(router="base"),
    "topk": dict(router="topk"),
}


class Rows(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[:3] = -100  # uneven scored tokens per row: the accumulated loss must weigh tokens, not rows
        labels[: int(i) % 5] = -100
        return {"input_ids": self.ids[i], "labels": labels}


def one_trainer_step(model, data, tmp_path, batch: int, accumulation: int):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.0,
                             logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             dataloader_drop_last=True, seed=0, data_seed=0, disable_tqdm=True)
    grads = {}
    trainer = Trainer(model=model, args=args, train_dataset=data)
    # Read the accumulated gradients just before the optimizer consumes them.
    trainer.create_optimizer()
    step = trainer.optimizer.step

    def capture(*a, **k):
        grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        return step(*a, **k)

    trainer.optimizer.step = capture
    result = trainer.train()
    return result.training_loss, grads


@pytest.mark.parametrize("name", ["dense", "hash", "hash-multi"])
def test_trainer_gradient_accumulation_equals_one_big_batch(tmp_path, name):
    """GA=4 over micro-batches of 2 gives the loss and gradients of one batch of 8 (routing that does not depend
    on the batch's composition: dense and hash)."""
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(0))
    data = Rows(ids)
    losses, grads = [], []
    for batch, accumulation in ((8, 1), (2, 4)):
        torch.manual_seed(0)
        model = HashMoEForCausalLM(tiny_config(**VARIANTS[name]))
        loss, grad = one_trainer_step(model, data, tmp_path / f"{batch}", batch, accumulation)
        losses.append(loss)
        grads.append(grad)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_disk_offload_equals_in_memory(tmp_path, name):
    torch.manual_seed(0)
    model = HashMoEForCausalLM(tiny_config(**VARIANTS[name])).eval()
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    expected = model(ids).logits
    device_map = {"model.embed_tokens": "cpu", "model.embed_positions": "cpu", "model.layers.0": "disk",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map,
                                                     offload_folder=str(tmp_path / "offload")).eval()
    assert any(p.device.type == "meta" for p in offloaded.model.layers[1].parameters())  # really offloaded
    torch.testing.assert_close(offloaded(ids).logits, expected)


@pytest.mark.parametrize("name", ["dense", "hash", "switch"])
def test_bfloat16_load(tmp_path, name):
    torch.manual_seed(0)
    model = HashMoEForCausalLM(tiny_config(**VARIANTS[name])).eval()
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    torch.testing.assert_close(loaded(ids).logits.float(), model(ids).logits, rtol=0.05, atol=0.05)
    assert loaded.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (2, 12)


@pytest.mark.parametrize("name", ["dense", "hash", "switch"])
def test_compile_fullgraph_equals_eager(name):
    """torch.compile(fullgraph=True): one graph, no break (the experts are one custom op whose output shape does
    not depend on the routing); logits, and for a training step the gradients, equal eager."""
    torch._dynamo.reset()  # each test compiles the same forward code anew: keep under dynamo's recompile limit
    torch.manual_seed(0)
    model = HashMoEForCausalLM(tiny_config(**VARIANTS[name]))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
    model.train()
    grads = []
    for forward in (model, compiled):
        model.zero_grad()
        forward(ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ["dense", "hash"])
def test_compiled_generation_with_static_cache_equals_eager(name):
    """The forward compiled with fullgraph=True, decoding into a static cache: the eager greedy tokens."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = HashMoEForCausalLM(tiny_config(**VARIANTS[name])).eval()
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **kwargs)
    model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    assert torch.equal(model.generate(ids, cache_implementation="static", **kwargs), expected)

"""The model card of `hashmoe push` for exports without a run folder (dense, switch, multi-hash): metadata the
Hub's validate-yaml endpoint (here: the test double's) accepts, tags by router, parameter counts equal to the
model's own. The card of a real run (metrics, plots) is tested in test_hub.py."""

from __future__ import annotations

import pytest
import yaml

from models import HashMoEForCausalLM
from tests.conftest import tiny_config
from tests.hub_server import HubServer
from trainer.analysis.compare import human
from trainer.publish.model_card import GENERATED_MARK, is_generated, write_model_card


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub"), {}) as server:
        yield server


@pytest.mark.parametrize("overrides, tags, absent", [
    (dict(moe_layers=[]), {"dense"}, {"mixture-of-experts", "hash-layers"}),
    (dict(router="switch"), {"mixture-of-experts", "router-switch", "switch-transformer"}, {"hash-layers", "dense"}),
    (dict(router="hash", hash_function="bigram", hash_heads=2), {"hash-layers", "hash-bigram", "moe"}, {"dense"}),
    (dict(moe_layers=[0, 1], router=["hash", "topk"], hash_function="random"),  # DeepSeek-V4's layout
     {"router-hash", "router-topk", "hash-layers", "top-k", "hash-random"}, {"dense"}),
])
def test_card_without_a_run(hub, monkeypatch, tmp_path, overrides, tags, absent):
    from huggingface_hub import ModelCard, constants

    model = HashMoEForCausalLM(tiny_config(**overrides))
    model.save_pretrained(tmp_path)
    path = write_model_card(tmp_path, "alice/m", None, "mit")
    text = path.read_text()
    assert is_generated(path) and GENERATED_MARK in text
    meta = yaml.safe_load(text.split("\n---\n", 1)[0].removeprefix("---\n"))
    assert meta["license"] == "mit" and meta["library_name"] == "transformers"
    assert tags <= set(meta["tags"]) and not absent & set(meta["tags"])
    assert "model-index" not in meta  # no run: no metrics to claim
    counts = model.parameter_counts()
    assert f"| parameters: total | {human(counts['total'])} |" in text
    assert f"| parameters: active per token | {human(counts['active'])} |" in text
    assert not (tmp_path / "plots").exists()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    ModelCard(text).validate()  # the real client's check, answered by the double


def test_the_double_rejects_metadata_the_hub_would(hub, monkeypatch):
    from huggingface_hub import ModelCard, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    with pytest.raises(ValueError, match=r'license\\?" must be a string'):
        ModelCard("---\nlicense: 3\n---\n# x\n").validate()
    with pytest.raises(ValueError, match="model-index"):
        ModelCard("---\nmodel-index: [{name: x, results: [{task: {type: text-generation}, dataset: {type: d, "
                  "name: d}, metrics: [{type: perplexity, value: [1]}]}]}]\n---\n").validate()

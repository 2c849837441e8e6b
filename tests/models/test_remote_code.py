"""A user who never installed hashmoe loads a saved model with trust_remote_code=True."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from models import HashMoEForCausalLM
from tests.conftest import tiny_config

# Runs in a fresh interpreter where the project's packages cannot be imported at all.
LOADER = textwrap.dedent("""
    import sys
    class BlockProject:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("models", "trainer", "hashmoe", "tests"):
                raise ImportError(f"{name} must not be needed to load the model")
    sys.meta_path.insert(0, BlockProject())
    import torch
    from transformers import AutoModelForCausalLM
    folder, ids_path, out_path = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.load(ids_path, weights_only=True)
    torch.save({"logits": model(ids).logits, "generated": model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0),
                "module": type(model).__module__}, out_path)
""")


@pytest.mark.parametrize("extra", [
    dict(router="hash", hash_function="bigram", hash_heads=2),
    dict(router="hash", hash_function="prev_token", recurrence={"kind": "staircase", "chunk": 2, "window": 4, "memory": 2}),
])
def test_trust_remote_code_load_in_clean_process(tmp_path, extra):
    torch.manual_seed(0)
    model = HashMoEForCausalLM(tiny_config(**extra)).eval()
    folder = tmp_path / "export"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hashmoe.HashMoEForCausalLM"
    for name in ("modeling_hashmoe.py", "configuration_hashmoe.py", "routing.py", "experts.py", "hashing.py",
                 "assignment.py", "structured.py", "staircase.py"):
        assert (folder / name).exists(), name

    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    (tmp_path / "loader.py").write_text(LOADER)
    result = subprocess.run([sys.executable, str(tmp_path / "loader.py"), str(folder), str(tmp_path / "ids.pt"),
                             str(tmp_path / "out.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["module"].startswith("transformers_modules.")
    # The same code in another interpreter: equal up to kernel rounding (seen: 3e-8 with transformers 5.24).
    torch.testing.assert_close(out["logits"], model(ids).logits, rtol=1e-5, atol=1e-6)
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out["generated"], expected)

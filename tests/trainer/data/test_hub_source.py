"""A Hub dataset as a source, read by the real `datasets` streaming client from tests/hub_server.py (the Hub's
HTTP protocol: repo info, tree, resolve with the range requests parquet reads make), through `hashmoe prepare`
as a user runs it; then training with the network off reads the store alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from tests.hub_server import HubServer
from tests.trainer.harness import ROOT, base_config, env_for_run, write_config

pytestmark = pytest.mark.slow  # hashmoe commands in subprocesses

TOKEN = "hf_alice_data"


def online_env(hub: HubServer, tmp: Path) -> dict:
    env = env_for_run()
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0", HF_HUB_DISABLE_XET="1",
               HF_HOME=str(tmp / "hf_home"), HF_TOKEN=TOKEN, HF_HUB_DISABLE_TELEMETRY="1")
    return env


def hashmoe(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def upload_dataset(hub: HubServer, tmp: Path, monkeypatch, docs: list[str]) -> str:
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    folder = tmp / "upload"
    (folder / "data").mkdir(parents=True, exist_ok=True)
    half = len(docs) // 2
    for i, part in enumerate((docs[:half], docs[half:])):
        datasets.Dataset.from_dict({"text": part, "n": list(range(len(part)))}).to_parquet(
            str(folder / "data" / f"train-{i:05d}-of-00002.parquet"))
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo("alice/tagged", repo_type="dataset", exist_ok=True)
    return api.upload_folder(folder_path=str(folder), repo_id="alice/tagged", repo_type="dataset").oid


def test_a_hub_dataset_is_prepared_pinned_and_then_trained_on_offline(tmp_path, monkeypatch):
    docs = [f"doc{i:03d}x " + "the king and the queen of night " * 8 for i in range(40)]
    with HubServer(tmp_path / "hub", {TOKEN: "alice"}) as hub:
        commit = upload_dataset(hub, tmp_path, monkeypatch, docs)
        config = base_config(tmp_path / "run", tmp_path / "unused.jsonl", tmp_path / "cache", optim__max_steps=2,
                             logging__eval_every=2, checkpoint__every=2)
        config["data"].update(train_files=[], sources=[{"hub": "alice/tagged", "name": "web"}], seq_len=16)
        config["model"]["max_position_embeddings"] = 16
        path = write_config(tmp_path / "run.yaml", config)

        prepared = hashmoe("prepare", str(path), env=online_env(hub, tmp_path))
        assert prepared.returncode == 0, prepared.stderr[-3000:]
        assert "hashmoe: data store prepared" in prepared.stdout and hub.unhandled == []
        assert any(name.endswith(".parquet") for name, _ in hub.ranges)  # parquet is read by byte ranges
        manifest = json.loads(next((tmp_path / "cache").glob("*/manifest.json")).read_text())
        assert manifest["corpora"][0] | {"documents": 0} == {"hub": "alice/tagged", "config": "", "split": "train",
                                                             "commit": commit, "documents": 0, "train_tokens":
                                                             manifest["corpora"][0]["train_tokens"]}
        assert manifest["corpora"][0]["documents"] == 40
        from transformers import AutoTokenizer

        store = next((tmp_path / "cache").glob("*/manifest.json")).parent
        tok = AutoTokenizer.from_pretrained(store / "tokenizer")
        import numpy as np

        text = tok.decode(np.fromfile(store / "train.bin", dtype=np.uint16).tolist())
        assert [int(t) for t in re.findall(r"doc(\d{3})x", text)] == [i for i in range(40) if i % 10]  # valid_fraction 0.1

        upload_dataset(hub, tmp_path, monkeypatch, docs[::-1])  # main moves on; the store keeps what it read
        asked = len(hub.requests)
        offline = env_for_run() | {"HF_HOME": str(tmp_path / "hf_home")}  # HF_HUB_OFFLINE=1, no endpoint
        trained = hashmoe("train", str(path), env=offline)
        assert trained.returncode == 0, trained.stderr[-3000:]
        assert "finished at step 2" in trained.stdout and len(hub.requests) == asked  # not one request

        missing = dict(config)
        missing["data"] = dict(config["data"], sources=[{"hub": "alice/no-such-dataset"}], cache_dir=str(tmp_path / "c2"))
        refused = hashmoe("prepare", str(write_config(tmp_path / "missing.yaml", missing)),
                          env=online_env(hub, tmp_path))
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert "data.sources: the Hub dataset alice/no-such-dataset, split train: could not be found" in refused.stderr
        assert "HF_ENDPOINT" in refused.stderr and not list((tmp_path / "c2").glob("*/manifest.json"))

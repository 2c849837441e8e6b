"""Run the real trainer in subprocesses (1 process, or 2 gloo ranks under torchrun) on a small corpus."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("the king queen lord lady sword crown night day love death fair foul speak hear see come go "
         "my thy his her our good ill sweet bitter heart blood honour").split()


def write_corpus(folder: Path, docs: int = 60, seed: int = 0) -> Path:
    """Rhyming-ish synthetic lines with structure a small model learns in a few steps."""
    rng = random.Random(seed)
    path = folder / "corpus.jsonl"
    with path.open("w") as f:
        for _ in range(docs):
            lines = []
            for _ in range(rng.randint(8, 16)):
                a, b, c = rng.sample(WORDS, 3)
                lines.append(f"the {a} of {b} is {c} , and {c} is the {a} .")
            f.write(json.dumps({"text": "\n".join(lines)}) + "\n")
    return path


def base_config(run_dir: Path, corpus: Path, cache: Path, **overrides) -> dict:
    config = {
        "run": {"name": run_dir.name, "output_dir": str(run_dir), "seed": 7},
        "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "max_position_embeddings": 32, "moe_layers": [1], "num_experts": 4, "router": "hash",
                  "hash_function": "balanced"},
        "data": {"dataset": "files", "train_files": [str(corpus)], "vocab_size": 300, "seq_len": 32,
                 "valid_fraction": 0.1, "cache_dir": str(cache)},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "max_steps": 8, "micro_batch_size": 4, "grad_clip": 0.0},
        "parallel": {"ep_size": 1, "ds_config": "cpu"},
        "logging": {"log_every": 1, "eval_every": 4, "eval_blocks": 8, "tensorboard": True, "progress": False},
        "checkpoint": {"every": 4, "keep": 3},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        config[section][key] = value
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def env_for_run() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                     "MASTER_", "OMPI_", "SLURM_"))}
    env.update(GLOO_SOCKET_IFNAME="lo", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT),
               TOKENIZERS_PARALLELISM="false")
    return env


def torchrun(nproc: int, module_args: list[str]) -> list[str]:
    from trainer.parallel.distributed import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())] + module_args


def train_command(config_path: Path, nproc: int, *extra: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "trainer.cli", "train", str(config_path), *extra]
    return torchrun(nproc, ["-m", "trainer.cli", "train", str(config_path), *extra])


def run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, env=env_for_run(), capture_output=True, text=True, timeout=timeout)
    return result


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def train_rows(run_dir: Path) -> dict[int, dict]:
    from trainer.run.metrics import read_metrics

    return {r["step"]: r for r in read_metrics(run_dir) if "train/loss" in r}


def snapshot(folder: Path) -> dict[str, str]:
    """Path -> sha256 of every file under folder: a run's whole record, byte for byte."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 180) -> None:
    """Until the running `process` has logged training step `step` (it must not exit first)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if train_rows(run_dir) and max(train_rows(run_dir)) >= step:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")

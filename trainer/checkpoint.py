"""Atomic DeepSpeed checkpoints: written aside, renamed into place, then `latest` is replaced.

    RUN_DIR/checkpoints/.staging/step_N/   DeepSpeed writes here (every rank), plus rng_rank_R.pt
    RUN_DIR/checkpoints/step_N/            ... renamed by rank 0 once every rank has finished
    RUN_DIR/checkpoints/latest             "step_N", replaced atomically last

A crash at any point leaves `latest` naming a complete checkpoint; a stale staging folder is removed at
the next save. DeepSpeed's own `latest` file is not written (save_latest=False): ours is the only one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trainer import portable_optim

STATE_FILE = "hashmoe_state.json"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = checkpoint_root(run_dir)
    latest = root / "latest"
    if not latest.is_file():
        return None
    path = root / latest.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


def read_state(checkpoint_dir: Path) -> dict:
    return json.loads((Path(checkpoint_dir) / STATE_FILE).read_text())


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
            "python": random.getstate()[1], "python_index": random.getstate()[2]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(state["python"]), state["python_index"]))


def save_checkpoint(engine, run_dir: Path, step: int, state: dict, keep: int, rank: int) -> Path:
    root = checkpoint_root(run_dir)
    staging = root / ".staging"
    tag = f"step_{step}"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted save
        staging.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(staging), tag=tag, save_latest=False)
    torch.save(rng_state(), staging / tag / f"rng_rank_{rank}.pt")
    portable_optim.save(engine, staging / tag, rank)
    if rank == 0:
        (staging / tag / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1))
    _barrier()
    final = root / tag
    if rank == 0:
        if final.exists():  # re-saving a step (e.g. after resume): replace it as a whole
            shutil.rmtree(final)
        os.replace(staging / tag, final)
        tmp = root / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, root / "latest")
        shutil.rmtree(staging, ignore_errors=True)
        prune(root, keep)
    _barrier()
    return final


def prune(root: Path, keep: int) -> None:
    steps = sorted((int(p.name.split("_")[1]), p) for p in root.glob("step_*") if p.name.split("_")[1].isdigit())
    for _, path in steps[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(engine, checkpoint_dir: Path, rank: int, same_layout: bool) -> bool:
    """Model weights and schedule always. Same layout: DeepSpeed's optimizer state and this rank's RNG.
    Another layout: DeepSpeed cannot re-shard MoE optimizer state (it raises), so the moments come from the
    by-name copy (ZeRO-0); returns False when they could not be restored (ZeRO-1/2 at a new layout)."""
    checkpoint_dir = Path(checkpoint_dir)
    path, _ = engine.load_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name,
                                     load_optimizer_states=same_layout, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {checkpoint_dir}")
    rng_file = checkpoint_dir / f"rng_rank_{rank}.pt"
    if same_layout and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    if same_layout:
        return True
    # The optimizer's own state dict (not loaded here) is what carries each group's current lr; the restored
    # scheduler knows it, so apply it before the next step.
    if engine.lr_scheduler is not None:
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    return portable_optim.load(engine, checkpoint_dir)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()

"""Atomic, self-verifying DeepSpeed checkpoints: written aside, renamed into place, then `latest` is replaced.

    RUN_DIR/checkpoints/.staging/step_N/   DeepSpeed writes here (every rank), plus rng_rank_R.pt
    RUN_DIR/checkpoints/step_N/            ... renamed by rank 0 once every rank has finished
    RUN_DIR/checkpoints/step_N/manifest.json   every file's size and sha256, written last inside the folder
    RUN_DIR/checkpoints/latest             "step_N", replaced atomically last

A crash at any point leaves `latest` naming a complete checkpoint; a stale staging folder is removed at
the next save. DeepSpeed's own `latest` file is not written (save_latest=False): ours is the only one.
The manifest catches what atomic renames cannot: a file truncated or deleted afterwards (a full disk during a
copy, a cleanup script). Resume falls back to the newest intact checkpoint, saying which file is damaged;
nothing damaged is deleted (a re-save of the same step moves it aside as step_N.damaged).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trainer.errors import UserError
from trainer.fileio import write_text_atomic
from trainer.parallel.distributed import collective_device, on_rank0
from trainer.run import portable_optim

STATE_FILE = "hashmoe_state.json"
MANIFEST_FILE = "manifest.json"
# Below this many free bytes, a failed write is taken for a full disk (torch.save does not say ENOSPC).
DISK_NEARLY_FULL = 64 * 1024 * 1024


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_step(path: Path) -> int | None:
    """N for a folder named step_N, else None (staging, step_N.damaged, ...)."""
    prefix, _, number = Path(path).name.partition("_")
    return int(number) if prefix == "step" and number.isdigit() else None


def step_folders(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, newest step first."""
    root = checkpoint_root(run_dir)
    found = [p for p in root.glob("step_*") if p.is_dir() and checkpoint_step(p) is not None] if root.is_dir() else []
    return sorted(found, key=checkpoint_step, reverse=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder `latest` names, if it holds a state file (no verification: see find_resumable)."""
    root = checkpoint_root(run_dir)
    latest = root / "latest"
    if not latest.is_file():
        return None
    path = root / latest.read_text(errors="replace").strip()
    return path if checkpoint_step(path) is not None and (path / STATE_FILE).is_file() else None


def read_state(checkpoint_dir: Path) -> dict:
    return json.loads((Path(checkpoint_dir) / STATE_FILE).read_text())


# ---- verification ------------------------------------------------------------------------------------
def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def damage(checkpoint_dir: Path) -> str | None:
    """None if the checkpoint is whole, else what is wrong, naming the file. A checkpoint written before
    manifests existed is checked for its state file only."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / STATE_FILE).is_file():
        return f"{checkpoint_dir / STATE_FILE} is missing"
    try:
        read_state(checkpoint_dir)
    except (OSError, ValueError):
        return f"{checkpoint_dir / STATE_FILE} is not readable JSON"
    manifest_path = checkpoint_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{manifest_path} is not readable"
    for name, entry in sorted(manifest.items()):
        path = checkpoint_dir / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{path} has {size} bytes, {entry['size']} were written"
        if file_digest(path) != entry["sha256"]:
            return f"{path} does not match its checksum"
    return None


def find_resumable(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint, and warnings about newer damaged ones (or an unreadable `latest`).
    Raises UserError when checkpoints exist but none is intact: starting over would discard them."""
    root = checkpoint_root(run_dir)
    warnings = []
    latest_file = root / "latest"
    if latest_file.is_file() and latest_checkpoint(run_dir) is None:
        text = latest_file.read_text(errors="replace").strip()[:40]
        warnings.append(f"{latest_file} names {text!r}, which is not a complete checkpoint")
    # Newest first, whatever `latest` says: a folder renamed into place is complete (its manifest was written
    # before the rename), even if the crash came before `latest` was replaced.
    candidates = step_folders(run_dir)
    for path in candidates:
        problem = damage(path)
        if problem is None:
            return path, warnings
        warnings.append(f"{path.name} is damaged: {problem}")
    if candidates:
        raise UserError(str(root), "no intact checkpoint to resume from (" + "; ".join(warnings) + ")",
                        "Restore the damaged files from a copy, or train into a new folder with --output; "
                        "nothing was changed or deleted")
    return None, warnings


def verified(checkpoint_dir: Path) -> Path:
    """For export: the checkpoint, or exit 2 naming the damaged file."""
    problem = damage(checkpoint_dir)
    if problem is not None:
        intact = [p for p in step_folders(Path(checkpoint_dir).parents[1]) if damage(p) is None]
        raise UserError(str(checkpoint_dir), f"is damaged: {problem}",
                        f"Export an intact checkpoint ({intact[0]})" if intact else
                        "Restore the file from a copy; no intact checkpoint of this run remains")
    return Path(checkpoint_dir)


# ---- saving ------------------------------------------------------------------------------------------
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
    world = dist.get_world_size() if dist.is_initialized() else 1

    def clear_staging():
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted save
        staging.mkdir(parents=True)

    on_rank0(clear_staging)
    error = None
    try:
        engine.save_checkpoint(str(staging), tag=tag, save_latest=False)
        torch.save(rng_state(), staging / tag / f"rng_rank_{rank}.pt")
        portable_optim.save(engine, staging / tag, rank)
        if rank == 0:
            (staging / tag / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1))
    except (OSError, RuntimeError) as err:  # a full disk, a quota, a read-only folder: every rank must hear
        error = err  # of it (torch.save reports a full disk as a RuntimeError of its zip writer)
    _raise_if_any_failed(error, rank, staging, root)
    _barrier()
    # Every rank hashes a share of the files (checkpoints of large models are many GB), shares of equal bytes, so
    # no rank waits long for another inside the all-gather; rank 0 splits them (one listing, one set of sizes,
    # whatever another node's file-system cache says) and writes the list.
    split = [hashing_shares(staging / tag, world) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(split, src=0)
    mine = {}
    for name in split[0][rank]:
        digest = file_digest(staging / tag / name)  # opened first: NFS revalidates the size it reports then
        mine[name] = {"size": (staging / tag / name).stat().st_size, "sha256": digest}
    shares = [None] * world
    if world > 1:
        dist.all_gather_object(shares, mine)
    else:
        shares = [mine]
    error = None
    if rank == 0:
        try:
            entries = {name: entry for share in shares for name, entry in share.items()}
            write_text_atomic(staging / tag / MANIFEST_FILE, json.dumps({"files": dict(sorted(entries.items()))}, indent=1))
        except OSError as err:
            error = err
    _raise_if_any_failed(error, rank, staging, root)
    final = root / tag

    def publish():
        if final.exists():  # the same step saved again after a fallback: keep the old folder, aside
            final.rename(_aside(final))
        os.replace(staging / tag, final)
        write_text_atomic(root / "latest", tag)
        shutil.rmtree(staging, ignore_errors=True)
        prune(root, keep, step)

    on_rank0(publish)  # deleting an old checkpoint of many GB may take a while: not inside a timed collective
    return final


def hashing_shares(folder: Path, world: int) -> list[list[str]]:
    """The files under `folder` (relative names) in `world` shares of about equal bytes: largest first, each to
    the share with the fewest bytes so far."""
    files = sorted((p.stat().st_size, str(p.relative_to(folder))) for p in folder.rglob("*") if p.is_file())
    shares, loads = [[] for _ in range(world)], [0] * world
    for size, name in sorted(files, key=lambda f: (-f[0], f[1])):
        lightest = loads.index(min(loads))
        shares[lightest].append(name)
        loads[lightest] += size
    return shares


def _aside(path: Path) -> Path:
    target = path.with_name(path.name + ".damaged")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged{n}")
    return target


def _raise_if_any_failed(error: Exception | None, rank: int, staging: Path, root: Path) -> None:
    failed = torch.tensor([0.0 if error is None else 1.0], device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if not failed.item():
        return
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    free = shutil.disk_usage(root).free
    if isinstance(error, OSError):
        reason = f"{error.strerror or error} ({error.filename})"
    elif error is None:
        reason = "another rank failed to write its part"
    elif free < DISK_NEARLY_FULL:
        reason = f"{os.strerror(errno.ENOSPC)}: {free} bytes free ({str(error).splitlines()[0][:120]})"
    else:
        raise error  # not the disk: a bug to see in full
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    raise UserError(str(root), f"could not write the checkpoint: {reason}",
                    "Free disk space or fix the folder's permissions, then run the same command again: "
                    + (f"it resumes from {latest}, which is intact" if latest else "no earlier checkpoint exists"))


def prune(root: Path, keep: int, saved_step: int) -> None:
    """Keep the `keep` newest checkpoints up to the one just saved. Folders of higher steps (a timeline
    abandoned after a fallback from a damaged checkpoint) are neither counted nor deleted."""
    steps = sorted(s for p in root.glob("step_*") if (s := checkpoint_step(p)) is not None and s <= saved_step)
    for step in steps[:-keep]:
        shutil.rmtree(root / f"step_{step}", ignore_errors=True)


# ---- loading -----------------------------------------------------------------------------------------
def load_checkpoint(engine, checkpoint_dir: Path, rank: int, same_layout: bool) -> bool:
    """Model weights and schedule always. Same layout: DeepSpeed's optimizer state and this rank's RNG.
    Another layout: DeepSpeed cannot re-shard MoE optimizer state (it raises), so the moments come from the
    by-name copy (ZeRO-0); returns False when they could not be restored (ZeRO-1/2 at a new layout)."""
    checkpoint_dir = Path(checkpoint_dir)
    try:
        path, _ = engine.load_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name,
                                         load_optimizer_states=same_layout, load_lr_scheduler_states=True)
    except (RuntimeError, OSError, EOFError, KeyError) as err:  # a checkpoint without a manifest, damaged
        raise UserError(str(checkpoint_dir), f"DeepSpeed could not load it ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200]})", "Move it aside to resume from an earlier one, or "
                        "train into a new folder with --output") from None
    if path is None:
        raise UserError(str(checkpoint_dir), "DeepSpeed found no checkpoint files in it",
                        "Move it aside to resume from an earlier one, or train into a new folder with --output")
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

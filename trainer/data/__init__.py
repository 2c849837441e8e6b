"""The data pipeline: sources -> tokenizer -> a token store every rank memory-maps -> batches by step.

    config.py        the `data:` section and its checks
    sources.py       local files, globs, save_to_disk folders, the Shakespeare corpus, read as chunks
    tokenization.py  the BPE tokenizer (trained on a bounded sample) and the tokenizing workers
    store.py         the store's layout, its one builder at a time, heartbeat and waiting, memory-mapped reading
    prepare.py       building a store and opening it as blocks (`prepare_data`, what `hashmoe prepare` runs)
    schedule.py      batches as a pure function of the step, validation shares
    tasks.py         synthetic tasks with exact answers

Names are imported lazily: the tokenizing workers are spawned processes that import this package, and must not
pay for torch.

May import: the shared leaves (trainer.errors, trainer.fileio); nothing else of trainer (a data store is
prepared by `hashmoe prepare` without any training code).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataConfig": "config", "validate": "config",
    "PreparedData": "prepare", "Blocks": "prepare", "prepare_data": "prepare", "store_paths": "prepare",
    "store_fingerprint": "prepare",
    "BatchSchedule": "schedule", "valid_shard": "schedule",
    "EOS_TOKEN": "tokenization",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"trainer.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'trainer.data' has no attribute {name!r}")

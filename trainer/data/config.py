"""The `data:` section of a run config and its checks (run before any work, on every rank)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.data.tasks import TASKS, check_task
from trainer.errors import UserError

MIN_VOCAB_SIZE = 257  # 256 byte symbols + EOS
WEIGHT_QUANTUM = 10_000  # mixture weights are followed exactly to 1 part in this (trainer/data/schedule.py)


@dataclass
class SourceConfig:
    """One corpus of a mixture (`data.sources`)."""

    files: list[str] = field(default_factory=list)  # as data.train_files: files, globs, save_to_disk folders
    # ... or a dataset on the Hugging Face Hub (read streaming through `datasets`; the commit read is pinned in
    # the store, so training needs no network once it exists)
    hub: str = ""  # e.g. "HuggingFaceFW/fineweb-edu"
    hub_config: str = ""  # the dataset's configuration (subset), if it has several
    split: str = "train"
    revision: str = ""  # a branch, tag or commit (default: the main branch, resolved to its commit when prepared)
    weight: float | None = None  # share of the training blocks drawn from it, normalised over the sources
    name: str = ""  # how the run's metrics and messages call it (default: source0, source1, ...)
    text_field: str = ""  # default: data.text_field


@dataclass
class DataConfig:
    dataset: str = "shakespeare"  # "shakespeare" (the default corpus), "files", or a task: random_walk, reverse
    # Local files, globs or folders: .txt/.md (a document per file), .jsonl/.parquet/.arrow (a document per
    # record), each optionally .gz or .zst; a folder written by `datasets`' save_to_disk.
    train_files: list[str] = field(default_factory=list)
    # A mixture instead of train_files: a list of sources, each {files: [...], weight: W, name: N}; every training
    # step draws each source's share of blocks by its normalised weight (deterministic, exact to 1/10,000).
    sources: list[SourceConfig] = field(default_factory=list)
    text_field: str = "text"  # the record field (jsonl) or column (parquet, arrow) holding the text
    tokenizer: str = "train"  # "train" (byte-level BPE on a sample of the training split) or a local HF tokenizer folder
    vocab_size: int = 4096  # for tokenizer="train"
    # MB of training text the BPE tokenizer is trained on (the first documents of the training split): bounds the
    # preparation's memory whatever the corpus size. Measured (`python -m benchmarks.data --tokenizer-sample`,
    # BENCHMARKS.md): 16 / 64 / 256 MB train in 3.4 / 8.8 / 30 s with 107 / 160 / 359 MB peak, and compress
    # held-out text equally (5.285 / 5.286 / 5.286 bytes per token at vocabulary 4096): 64 MB leaves room for
    # real text, richer than that Zipf corpus, at a cost small next to tokenizing (a 1 GB corpus: 173 s).
    tokenizer_sample_mb: int = 64
    seq_len: int = 128  # tokens per training block, cut from the stored stream (the store does not depend on it)
    valid_fraction: float = 0.05  # share of documents held out for validation (every 1/f-th one, the first included)
    cache_dir: str = "data_cache"  # the prepared stores, one folder per fingerprint of what decides their bytes
    num_proc: int = 0  # worker processes that tokenize (0: one per available core); the store's bytes do not depend on it
    # A rank that waits for another process to prepare the store gives up when that process's heartbeat (a file
    # next to the store, rewritten every few seconds) has not appeared or not changed for this long.
    prepare_timeout_s: int = 300
    # Synthetic tasks (trainer/data/tasks.py); one block = one episode (random_walk) or packed examples (reverse).
    task_size: int = 8  # random_walk: positions on the ring; reverse: digits in the alphabet
    task_query_every: int | list[int] = 4  # random_walk: moves between queries (a list: each gap drawn from it)
    task_show_answers: bool = True  # random_walk: the answer follows "?" in the input (false: a label only)
    task_hide_answers: float = 0.0  # random_walk: share of shown answers blanked ("_") in the input, still scored
    task_far: int = 0  # random_walk: also score answers shown >= this many tokens back (valid/far_error); 0 off
    task_length: int = 8  # reverse: digits per example
    task_examples: int = 4096  # training blocks
    task_valid_examples: int = 256  # validation blocks (fresh episodes)


def validate(cfg: DataConfig) -> None:
    def bad(key: str, problem: str, fix: str) -> UserError:
        return UserError(f"data.{key}", problem, fix)

    if cfg.dataset not in ("shakespeare", "files", *TASKS):
        raise bad("dataset", f"unknown dataset {cfg.dataset!r}",
                  "Use `shakespeare` (the built-in corpus), `files` (with data.train_files), or a synthetic "
                  f"task: {', '.join(TASKS)}")
    if cfg.dataset in TASKS:
        check_task(cfg)
    if cfg.dataset != "files" and (cfg.train_files or cfg.sources):
        which = "train_files" if cfg.train_files else "sources"
        raise bad("dataset", f"data.{which} is set but data.dataset is `{cfg.dataset}`",
                  f"Set data.dataset: files to train on your files, or remove data.{which}")
    if cfg.dataset == "files" and not cfg.train_files and not cfg.sources:
        raise bad("train_files", "data.dataset is `files` but no train_files are given",
                  "List local files, globs or save_to_disk folders under data.train_files (or a mixture under "
                  "data.sources)")
    if cfg.train_files and cfg.sources:
        raise bad("sources", "both data.train_files and data.sources are set",
                  "Use data.train_files for one corpus, or data.sources for a mixture (move the files into a source)")
    validate_sources(cfg.sources)
    if not isinstance(cfg.seq_len, int) or cfg.seq_len < 2:
        raise bad("seq_len", f"seq_len must be an integer >= 2, got {cfg.seq_len!r}",
                  "A block needs at least one input and one target token; 128-1024 is typical")
    if not 0.0 < cfg.valid_fraction < 1.0:
        raise bad("valid_fraction", f"valid_fraction must be in (0, 1), got {cfg.valid_fraction!r}",
                  "Use e.g. 0.05 to hold out 5% of the documents")
    if cfg.tokenizer == "train" and (not isinstance(cfg.vocab_size, int) or cfg.vocab_size < MIN_VOCAB_SIZE):
        raise bad("vocab_size", f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} (256 bytes + EOS), "
                  f"got {cfg.vocab_size!r}", "Use e.g. 4096")
    if not isinstance(cfg.tokenizer_sample_mb, int) or cfg.tokenizer_sample_mb < 1:
        raise bad("tokenizer_sample_mb", f"must be an integer >= 1, got {cfg.tokenizer_sample_mb!r}",
                  "Use e.g. 64 (MB of training text the tokenizer is trained on)")
    if not isinstance(cfg.num_proc, int) or cfg.num_proc < 0:
        raise bad("num_proc", f"must be an integer >= 0, got {cfg.num_proc!r}",
                  "Use 0 (one worker per core) or a number of worker processes")
    if not isinstance(cfg.prepare_timeout_s, int) or cfg.prepare_timeout_s < 1:
        raise bad("prepare_timeout_s", f"must be an integer >= 1, got {cfg.prepare_timeout_s!r}",
                  "Use e.g. 300 (seconds without a heartbeat from the preparing process)")


def validate_sources(sources: list[SourceConfig]) -> None:
    weighted = [s.weight is not None for s in sources]
    for i, source in enumerate(sources):
        key = f"data.sources[{i}]"
        if bool(source.files) == bool(source.hub):
            raise UserError(f"{key}.files", "a source needs files or a hub dataset, and not both",
                            "List its files, globs or folders under `files`, or name a Hub dataset under `hub`")
        if source.weight is not None and not source.weight > 0:
            raise UserError(f"{key}.weight", f"must be > 0, got {source.weight!r}",
                            "Give every source a positive weight (they are normalised), or remove the source")
    if any(weighted) and not all(weighted):
        missing = ", ".join(f"data.sources[{i}]" for i, w in enumerate(weighted) if not w)
        raise UserError("data.sources", f"weights are given for some sources but not for {missing}",
                        "Give every source a weight, or none (equal weights)")
    names = source_names(sources)
    if len(set(names)) != len(names):
        raise UserError("data.sources", f"two sources share a name ({', '.join(names)})", "Give each a unique name")
    weights = source_weights(sources)
    for i, weight in enumerate(weights):
        if round(weight * WEIGHT_QUANTUM) == 0:
            raise UserError(f"data.sources[{i}].weight", f"is {weight:.2e} of the total, below the 1/{WEIGHT_QUANTUM:,} "
                            "the mixture follows", "Raise it, or leave that source out")


def source_names(sources: list[SourceConfig]) -> list[str]:
    return [s.name or f"source{i}" for i, s in enumerate(sources)]


def source_weights(sources: list[SourceConfig]) -> list[float]:
    """Normalised weights (equal when none is given)."""
    raw = [s.weight if s.weight is not None else 1.0 for s in sources]
    return [w / sum(raw) for w in raw]

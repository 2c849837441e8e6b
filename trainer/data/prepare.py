"""Prepare a store (read, split, tokenize in worker processes, write) and open one for training.

The validation split holds out whole documents: document i (counting non-blank documents in source order) is
held out when floor((i+1) f + 1 - f) > floor(i f + 1 - f) for f = data.valid_fraction, i.e. every 1/f-th
document, the first included. It is decided while streaming, needs no document count up front, and does not
depend on the seed: every seed of a study shares one store."""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from trainer.data.config import DataConfig, source_names, source_weights, validate
from trainer.data.sources import (
    CHUNK_BYTES,
    Corpus,
    HubDataset,
    SourceError,
    chunk_documents,
    describe_sources,
    match_files,
    read_chunks,
    resolve_hub_commit,
    shakespeare_files,
    source_bytes,
)
from trainer.data.store import (
    STORE_FORMAT,
    ArrayWriter,
    Store,
    StorePaths,
    build_once,
    wait_for_store,
    write_array,
    write_manifest,
)
from trainer.data.tasks import TASKS, build_task, vocabulary, word_tokenizer
from trainer.data.tokenization import (
    ChunkEncoder,
    encode_chunk,
    init_worker,
    load_tokenizer,
    token_dtype,
    tokenizer_digest,
    train_tokenizer,
)
from trainer.errors import UserError

log = logging.getLogger(__name__)

TASK_FORMAT = 2  # bump when a task's generator changes (2: valid_lookback stored)
TASK_KEYS = ("task_size", "task_query_every", "task_show_answers", "task_hide_answers", "task_length",
             "task_examples", "task_valid_examples")


class Blocks:
    """Fixed-length blocks cut from a flat array: block i = array[i*seq_len:(i+1)*seq_len], the partial last
    one dropped. Indexing returns int64 tensors (a copy of just those blocks); the array stays memory-mapped."""

    def __init__(self, array: np.ndarray, seq_len: int):
        self.array, self.seq_len = array, seq_len

    def __len__(self) -> int:
        return len(self.array) // self.seq_len

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.seq_len

    def __getitem__(self, index) -> torch.Tensor:
        L = self.seq_len
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("Blocks take contiguous slices only")
            rows = np.asarray(self.array[start * L:max(start, stop) * L]).reshape(-1, L)
        elif isinstance(index, int):
            if not -len(self) <= index < len(self):
                raise IndexError(f"block {index} of {len(self)}")
            index %= len(self)
            rows = np.asarray(self.array[index * L:(index + 1) * L])
        else:
            ids = np.asarray(index, dtype=np.int64).reshape(-1)
            if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
                raise IndexError(f"block indices outside [0, {len(self)})")
            rows = self.array[ids[:, None] * L + np.arange(L)]
        return torch.from_numpy(rows.astype(np.int64))


class MixedBlocks:
    """The blocks of several corpora under one numbering: ids [offset_s, offset_s + len(part_s)) are corpus s's."""

    def __init__(self, parts: list[Blocks]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.seq_len = parts[0].seq_len

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.seq_len

    def __getitem__(self, index) -> torch.Tensor:
        ids = np.asarray(index, dtype=np.int64).reshape(-1)
        corpus = np.searchsorted(self.offsets, ids, side="right") - 1
        rows = torch.empty(len(ids), self.seq_len, dtype=torch.int64)
        for s in np.unique(corpus):
            where = np.flatnonzero(corpus == s)
            rows[torch.from_numpy(where)] = self.parts[s][ids[where] - self.offsets[s]]
        return rows


@dataclass
class PreparedData:
    train_blocks: Blocks  # [N_train, seq_len] token ids, cut from the memory-mapped training stream
    valid_blocks: Blocks
    tokenizer_dir: Path
    vocab_size: int  # len(tokenizer)
    eos_token_id: int
    train_token_counts: torch.Tensor  # int64 [vocab_size], unigram counts over the training stream
    fingerprint: str  # the store's: recorded in every checkpoint, checked on resume
    store_dir: Path
    # Tasks only: labels (-100 = not scored) and answer numbers (-1 = none), blocks like the tokens.
    train_labels: Blocks | None = None
    valid_labels: Blocks | None = None
    valid_units: Blocks | None = None
    valid_lookback: Blocks | None = None  # random_walk: tokens back to where each answer was last shown
    # A mixture (data.sources): train_blocks is a MixedBlocks; each source's name and normalised weight.
    mixture: list[tuple[str, float]] | None = None


# ---------------------------------------------------------------- which store


def corpora(cfg: DataConfig) -> list[Corpus]:
    """The store's corpora in order ([] for a task); resolving globs checks every file exists."""
    if cfg.dataset == "shakespeare":
        return [Corpus("shakespeare", shakespeare_files(), cfg.text_field)]
    if cfg.dataset in TASKS:
        return []
    if not cfg.sources:
        return [Corpus("train_files", match_files(cfg.train_files), cfg.text_field)]
    return [Corpus(name, match_files(source.files) if source.files else [], source.text_field or cfg.text_field,
                   HubDataset(source.hub, source.hub_config, source.split, source.revision) if source.hub else None)
            for name, source in zip(source_names(cfg.sources), cfg.sources)]


def describe_corpus(dataset: str, corpus: Corpus) -> list:
    if corpus.hub is not None:  # as asked for: no network to tell the store (the commit read is in its manifest)
        hub = corpus.hub
        return [["hub", hub.name, hub.config, hub.split, hub.revision], corpus.text_field]
    return [describe_sources(dataset, corpus.files), corpus.text_field]


def store_fingerprint(cfg: DataConfig, seed: int) -> str:
    """Hash of what decides the store's bytes: the sources, the tokenizer, the validation split; not seq_len,
    the seed, the world size, num_proc or a mixture's weights and names (tasks: their episodes are generated per
    seed and seq_len)."""
    import tokenizers  # its BPE trainer and encoder decide the token ids

    payload = {"format": STORE_FORMAT, "dataset": cfg.dataset, "tokenizers": tokenizers.__version__}
    if cfg.dataset in TASKS:
        payload.update({key: getattr(cfg, key) for key in TASK_KEYS})
        payload.update(task_format=TASK_FORMAT, seq_len=cfg.seq_len, seed=seed)
    else:
        parts = corpora(cfg)
        payload.update(valid_fraction=cfg.valid_fraction)
        if cfg.sources:  # a mixture: one stream per source, in order
            payload["mixture"] = [describe_corpus(cfg.dataset, c) for c in parts]
        else:  # as before mixtures, so single-corpus stores keep their fingerprints
            payload.update(sources=describe_sources(cfg.dataset, parts[0].files),
                           text_field=cfg.text_field if cfg.dataset == "files" else None)
        if cfg.tokenizer == "train":
            payload.update(tokenizer="train", vocab_size=cfg.vocab_size, tokenizer_sample_mb=cfg.tokenizer_sample_mb)
        else:
            payload["tokenizer"] = tokenizer_digest(cfg.tokenizer)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def store_paths(cfg: DataConfig, seed: int) -> StorePaths:
    """Validate the data section and find its store (nothing is read beyond file sizes)."""
    validate(cfg)
    return StorePaths(Path(cfg.cache_dir).expanduser().resolve() / store_fingerprint(cfg, seed))


# ---------------------------------------------------------------- building


def is_valid_document(index: np.ndarray, fraction: Fraction) -> np.ndarray:
    """Every 1/f-th document, the first included (exact integer arithmetic, see the module docstring)."""
    p, q = fraction.numerator, fraction.denominator
    return ((index + 1) * p + (q - p)) // q > (index * p + (q - p)) // q


def held_out(index: int, fraction: Fraction) -> bool:
    """Whether document `index` is a validation document."""
    return bool(is_valid_document(np.array([index]), fraction)[0])


class SplitWriter:
    """One split's token stream: documents joined by EOS (none before the first), their start offsets."""

    def __init__(self, staging: Path, name: str, dtype, eos: int):
        self.tokens = ArrayWriter(staging / f"{name}.bin", dtype)
        self.offsets = ArrayWriter(staging / f"{name}_docs.bin", np.uint64)
        self.eos, self.documents = eos, 0

    def extend(self, tokens: np.ndarray) -> None:
        """More tokens of the last document (its next piece): no EOS, no new offset."""
        self.tokens.append(tokens)

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Append documents (their tokens back to back); returns what was written, separators included."""
        if len(lengths) == 0:
            return tokens[:0]
        separator = np.ones(len(lengths), dtype=np.int64)
        separator[0] = self.documents > 0
        starts = np.cumsum(lengths + separator) - lengths  # each document's first token in `written`
        written = np.empty(int(lengths.sum() + separator.sum()), dtype=self.tokens.dtype)
        is_eos = np.zeros(len(written), dtype=bool)
        is_eos[(starts - 1)[separator == 1]] = True
        written[is_eos], written[~is_eos] = self.eos, tokens
        self.offsets.append(self.tokens.length + starts)
        self.tokens.append(written)
        self.documents += len(lengths)
        return written


def _worker_count(cfg: DataConfig, total_bytes: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    wanted = cfg.num_proc or cores
    return max(1, min(wanted, -(-total_bytes // CHUNK_BYTES)))


def _encoded_chunks(chunks, tokenizer_json: str, dtype, workers: int):
    """(tokens, lengths, text bytes) per chunk, in chunk order; at most 2 chunks per worker in flight, so
    memory stays bounded whatever the corpus (Pool.imap would read ahead without limit)."""
    if workers == 1:
        encoder = ChunkEncoder(tokenizer_json, dtype.name)
        for chunk in chunks:
            yield encoder(chunk)
        return
    # A process pool that fails loudly: a worker that dies (killed, out of memory) breaks the pool with an error,
    # where multiprocessing.Pool would start a new worker and wait for the lost task forever.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker,
                               initargs=(tokenizer_json, dtype.name))
    try:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.submit(encode_chunk, chunk))
            if len(pending) >= 2 * workers:
                yield _result(pending.popleft().result())
        while pending:
            yield _result(pending.popleft().result())
    except BrokenProcessPool as e:
        raise UserError("data.num_proc", f"a tokenizing worker process died ({e})", "Check the memory available "
                        "per worker (dmesg shows the out-of-memory killer), or lower data.num_proc") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _result(value):
    if isinstance(value, Exception):
        raise value
    return value


def _tokenizer_sample(chunks, fraction: Fraction, limit_bytes: int) -> list[str]:
    """The first `limit_bytes` of training documents (the validation documents skipped, so nothing of them
    leaks into the tokenizer; a document that would pass the limit is cut there)."""
    sample, size, index = [], 0, 0
    for chunk in chunks:
        docs, wanted = chunk_documents(chunk), []
        if chunk.continues:  # the rest of the previous document: in its split, not a new document
            wanted += [] if held_out(index - 1, fraction) else docs[:1]
            docs = docs[1:]
        valid = is_valid_document(np.arange(index, index + len(docs)), fraction)
        index += len(docs)
        wanted += [doc for doc, is_valid in zip(docs, valid) if not is_valid]
        for doc in wanted:
            encoded = doc.encode()
            if size + len(encoded) >= limit_bytes:
                sample.append(encoded[: limit_bytes - size].decode(errors="ignore"))
                return sample
            sample.append(doc)
            size += len(encoded)
    return sample


def _progress_bar(enabled: bool, total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                dynamic_ncols=True, leave=True)


def _train_tokenizer_on_samples(cfg: DataConfig, parts: list[Corpus], fraction: Fraction):
    """BPE on the first tokenizer_sample_mb MB of training text, an equal share from each corpus."""
    share = (cfg.tokenizer_sample_mb << 20) // len(parts)
    sample = []
    for part in parts:
        sample += _tokenizer_sample(read_chunks(cfg.dataset, part), fraction, share)
    if not sample:
        raise UserError("data.train_files", "found no training document (at least 2 non-empty documents are "
                        "needed: one is held out for validation)", "Add documents: each .txt or .md file is one "
                        "document, each .jsonl/.parquet/.arrow record is one")
    return train_tokenizer(sample, cfg.vocab_size)  # on training documents only: no valid leakage


def build_text_store(cfg: DataConfig, parts: list[Corpus], staging: Path, progress: dict, show: bool,
                     fingerprint: str) -> None:
    started = time.perf_counter()
    fraction = Fraction(cfg.valid_fraction).limit_denominator(1 << 20)
    try:
        for part in parts:  # one commit read by both passes, recorded in the manifest
            if part.hub is not None:
                part.hub.commit = resolve_hub_commit(part.hub)
        progress["stage"] = "training the tokenizer"
        tok = (_train_tokenizer_on_samples(cfg, parts, fraction) if cfg.tokenizer == "train"
               else load_tokenizer(cfg.tokenizer))
        tok.save_pretrained(str(staging / "tokenizer"))
        vocab, eos, dtype = len(tok), tok.eos_token_id, token_dtype(len(tok))
        tokenizer_json = str(staging / "tokenizer" / "tokenizer.json")
        progress["stage"] = "tokenizing"
        total = None if any(part.hub for part in parts) else sum(source_bytes(part.files) for part in parts)
        workers = _worker_count(cfg, total if total is not None else 1 << 40)
        splits = {"train": SplitWriter(staging, "train", dtype, eos), "valid": SplitWriter(staging, "valid", dtype, eos)}
        counts = np.zeros(vocab, dtype=np.int64)
        ranges, documents, text_bytes = [], [], 0  # per corpus: its training tokens [start, end), its documents
        bar = _progress_bar(show, total, f"prepare ({workers} worker{'s' * (workers > 1)})")
        for part in parts:
            index, start = 0, splits["train"].tokens.length + (splits["train"].documents > 0)  # after the EOS
            chunks = read_chunks(cfg.dataset, part)
            for tokens, lengths, size, continues in _encoded_chunks(chunks, tokenizer_json, dtype, workers):
                if continues and index:  # the next piece of the last document: appended to it, in its split
                    split = "valid" if held_out(index - 1, fraction) else "train"
                    piece, tokens, lengths = tokens[:lengths[0]], tokens[lengths[0]:], lengths[1:]
                    splits[split].extend(piece)
                    if split == "train":
                        counts += np.bincount(piece, minlength=vocab)
                valid = is_valid_document(np.arange(index, index + len(lengths)), fraction)  # per corpus
                index += len(lengths)
                per_token = np.repeat(valid, lengths)
                splits["valid"].add(tokens[per_token], lengths[valid])
                written = splits["train"].add(tokens[~per_token], lengths[~valid])
                counts += np.bincount(written, minlength=vocab)
                text_bytes += size
                bar.update(size)
                tokens_so_far = splits["train"].tokens.length + splits["valid"].tokens.length
                bar.set_postfix(tokens=f"{tokens_so_far / 1e6:.1f}M", refresh=False)
                progress.update(text_mb=text_bytes / 2**20, tokens=tokens_so_far)
            if index < 2:
                where = f" in data.sources {part.name}" if cfg.sources else ""
                raise UserError("data.sources" if cfg.sources else "data.train_files", f"found {index} non-empty document(s){where}; at least 2 are "
                                "needed (one is held out for validation)", "Add documents: each .txt or .md file is "
                                "one document, each .jsonl/.parquet/.arrow record is one")
            ranges.append([start, splits["train"].tokens.length])
            documents.append(index)
        bar.close()
    except SourceError as e:
        raise UserError(e.key, f"{e.origin}: {e.problem}", e.fix) from None
    arrays = {}
    for name, split in splits.items():
        arrays[name], arrays[f"{name}_docs"] = split.tokens.close(), split.offsets.close()
    for name, values in (("token_counts", counts), ("train_sources", np.array(ranges, dtype=np.int64).ravel())):
        arrays[name] = write_array(staging / f"{name}.bin", np.int64, values)
    manifest = {"format": STORE_FORMAT, "fingerprint": fingerprint, "kind": "text",
                "vocab_size": vocab, "eos_token_id": eos, "arrays": arrays, "text_bytes": text_bytes,
                "documents": {name: split.documents for name, split in splits.items()},
                "tokens": {name: split.tokens.length for name, split in splits.items()},
                "corpora": [{**({"hub": part.hub.name, "config": part.hub.config, "split": part.hub.split,
                                 "commit": part.hub.commit} if part.hub else
                                {"files": [str(f) for f in part.files] if cfg.dataset == "files" else cfg.dataset}),
                             "documents": count, "train_tokens": end - start}
                            for part, count, (start, end) in zip(parts, documents, ranges)]}
    write_manifest(staging, manifest, started, workers)


def build_task_store(cfg: DataConfig, seed: int, staging: Path, progress: dict, fingerprint: str) -> None:
    started = time.perf_counter()
    progress["stage"] = "generating episodes"
    tensors = build_task(cfg, seed)
    tok = word_tokenizer(vocabulary(cfg.dataset, cfg.task_size, blank=bool(cfg.task_hide_answers)))
    tok.save_pretrained(str(staging / "tokenizer"))
    dtype = token_dtype(len(tok))
    tensors["token_counts"] = torch.bincount(tensors["train_blocks"].flatten(), minlength=len(tok))
    arrays = {}
    for key, tensor in tensors.items():
        name = key.removesuffix("_blocks")  # train_blocks -> train: the token streams have one name everywhere
        kind = dtype if key.endswith("_blocks") else np.int64 if key == "token_counts" else np.int32
        arrays[name] = write_array(staging / f"{name}.bin", kind, tensor.flatten().numpy())
    manifest = {"format": STORE_FORMAT, "fingerprint": fingerprint, "kind": "task",
                "task": cfg.dataset, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "arrays": arrays,
                "seq_len": cfg.seq_len, "blocks": {"train": cfg.task_examples, "valid": cfg.task_valid_examples}}
    write_manifest(staging, manifest, started, workers=1)


# ---------------------------------------------------------------- the entry point


def open_prepared(store: Store, cfg: DataConfig) -> PreparedData:
    manifest, L = store.manifest, cfg.seq_len

    def blocks(name: str) -> Blocks | None:
        return Blocks(store.array(name), L) if store.has(name) else None

    data = PreparedData(train_blocks=blocks("train"), valid_blocks=blocks("valid"),
                        tokenizer_dir=store.tokenizer_dir, vocab_size=manifest["vocab_size"],
                        eos_token_id=manifest["eos_token_id"],
                        train_token_counts=torch.from_numpy(np.array(store.array("token_counts"))),
                        fingerprint=manifest["fingerprint"], store_dir=store.folder,
                        train_labels=blocks("train_labels"), valid_labels=blocks("valid_labels"),
                        valid_units=blocks("valid_units"), valid_lookback=blocks("valid_lookback"))
    if cfg.sources:
        ranges = np.asarray(store.array("train_sources")).reshape(-1, 2)
        parts = [Blocks(data.train_blocks.array[start:end], L) for start, end in ranges]
        for name, part, (start, end) in zip(source_names(cfg.sources), parts, ranges):
            if len(part) == 0:
                raise UserError("data.seq_len", f"data.sources {name} holds {end - start} training tokens, fewer than "
                                f"one block of seq_len={L}", "Lower data.seq_len or add text to that source")
        data.train_blocks = MixedBlocks(parts)
        data.mixture = list(zip(source_names(cfg.sources), source_weights(cfg.sources)))
    if len(data.train_blocks) == 0:
        raise UserError("data.seq_len", f"the training split ({manifest['tokens']['train']} tokens) holds fewer "
                        f"tokens than one block of seq_len={L}", "Lower data.seq_len or add text")
    if len(data.valid_blocks) == 0:
        raise UserError("data.valid_fraction", f"the validation split ({manifest['tokens']['valid']} tokens) "
                        f"holds fewer tokens than one block of seq_len={L}", "Raise data.valid_fraction, lower "
                        "data.seq_len or add text")
    return data


def prepare_data(cfg: DataConfig, seed: int, run_dir: Path | None = None, *, is_main: bool = True,
                 wait: bool = False, failure_before: str | None = None, progress: bool = False,
                 paths: StorePaths | None = None) -> PreparedData:
    """The prepared data of `cfg`, from its store in `cfg.cache_dir`, built first if it is missing.

    The main rank (or a single process) builds a missing store, or waits while another process builds it.
    Other ranks never write: with `wait` they wait for the main rank's build on the file system (reading its
    heartbeat; `failure_before` is the failure marker's content before that build began), else a missing store
    is an error (the cache folder is not shared). The main rank copies the tokenizer to `run_dir/tokenizer`;
    tokenizer_dir points there whenever that copy exists. `paths`: the store another rank named (default: this
    config's)."""
    paths = paths or store_paths(cfg, seed)
    start = time.perf_counter()
    if paths.complete():
        log.info("data: store %s", paths.target)
    elif is_main:
        parts = corpora(cfg)
        log.info("data: preparing %s into %s", cfg.dataset, paths.target)
        if cfg.dataset in TASKS:
            build_once(paths, lambda staging, beat: build_task_store(cfg, seed, staging, beat, paths.target.name),
                       cfg.prepare_timeout_s)
        else:
            build_once(paths, lambda staging, beat: build_text_store(cfg, parts, staging, beat, progress,
                                                                    paths.target.name),
                       cfg.prepare_timeout_s)
    elif wait:
        # Twice the builder's patience: rank 0 takes over a stale build left by a killed job after
        # prepare_timeout_s, and its new heartbeat must reach the waiting ranks before they give up.
        status = wait_for_store(paths, 2 * cfg.prepare_timeout_s, failure_before, "this rank", dead_pid_stops=False)
        if status.startswith("failed"):
            raise UserError("data", f"rank 0 could not prepare the data store: {status[8:]}", "See rank 0's error",
                            all_ranks=True)
        if status != "complete":
            problem = ("no heartbeat of rank 0's preparation appeared" if status == "absent"
                       else "rank 0's preparation stopped (its heartbeat did not change)")
            raise UserError("data.cache_dir", f"{problem} within 2 x data.prepare_timeout_s={cfg.prepare_timeout_s} s "
                            f"at {paths.staging}", "Put data.cache_dir on a file system shared by all nodes, or "
                            "run `hashmoe prepare RUN.yaml` before training")
    else:
        raise UserError("data.cache_dir", f"the data store {paths.target} is not there on this rank",
                        "Put data.cache_dir on a file system shared by all nodes, or run `hashmoe prepare "
                        "RUN.yaml` where the ranks can read it")
    data = open_prepared(Store(paths.target), cfg)
    if run_dir is not None:
        if is_main:
            shutil.copytree(data.tokenizer_dir, Path(run_dir) / "tokenizer", dirs_exist_ok=True)
        if (Path(run_dir) / "tokenizer" / "tokenizer.json").is_file():
            data.tokenizer_dir = Path(run_dir) / "tokenizer"
    log.info("data: %d train / %d valid blocks of %d tokens, vocab %d (%.1f s)", len(data.train_blocks),
             len(data.valid_blocks), cfg.seq_len, data.vocab_size, time.perf_counter() - start)
    return data

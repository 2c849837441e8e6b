"""Tokenizers and the tokenizing workers.

The BPE tokenizer is trained on a bounded sample of the training split (`data.tokenizer_sample_mb`), so its
memory does not grow with the corpus. The workers (`encode_chunk`, run in a spawned process pool) turn chunks
of documents into token arrays; they import no torch (a spawned worker pays for every import, per core)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np

from trainer.data.sources import Chunk, SourceError, chunk_documents
from trainer.errors import UserError

EOS_TOKEN = "<|endoftext|>"


def token_dtype(vocab_size: int) -> np.dtype:
    """2 bytes per token when every id fits (Megatron-Core and nanoGPT store uint16 too), else 4."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def train_tokenizer(docs, vocab_size: int):
    """A byte-level BPE tokenizer (any byte encodes) with EOS as its one special token, as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer, length=len(docs))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN,
                                   clean_up_tokenization_spaces=False)  # decode must give back the text


def tokenizer_digest(folder: str) -> str:
    import hashlib

    path = Path(folder).expanduser()
    if not (path / "tokenizer.json").is_file():
        raise UserError("data.tokenizer", f"{folder!r} is neither `train` nor a folder with a tokenizer.json",
                        "Use `train` to train a BPE tokenizer, or a folder written by save_pretrained of a "
                        "fast Hugging Face tokenizer")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def load_tokenizer(folder: str):
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


class ChunkEncoder:
    """Documents of a chunk -> (tokens of all of them back to back, tokens per document, text bytes read, whether
    the first one continues the previous chunk's last document).
    No BOS/EOS of the tokenizer's own: the store puts EOS between documents."""

    def __init__(self, tokenizer_json: str, dtype: str):
        from tokenizers import Tokenizer

        self.tokenizer, self.dtype = Tokenizer.from_file(tokenizer_json), np.dtype(dtype)

    def __call__(self, chunk: Chunk) -> tuple[np.ndarray, np.ndarray, int, bool]:
        docs = chunk_documents(chunk)
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)  # no offsets: faster
        encodings = encode(docs, add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        tokens = np.fromiter((i for e in encodings for i in e.ids), dtype=self.dtype, count=int(lengths.sum()))
        size = len(chunk.payload) if chunk.kind == "jsonl" else sum(len(t) for t in chunk.payload)
        return tokens, lengths, size, chunk.continues


_worker_encoder: ChunkEncoder | None = None


def init_worker(tokenizer_json: str, dtype: str) -> None:
    global _worker_encoder
    # One process per core already: the tokenizer's own threads would only contend with the other workers.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Ctrl-C and scancel's SIGTERM are the main process's to handle (it stops the pool and cleans up): a worker
    # killed by them would read as a crashed worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _worker_encoder = ChunkEncoder(tokenizer_json, dtype)


def encode_chunk(chunk: Chunk):
    """The pool's task: an exception (SourceError) is handed back as a value, so it reaches the writer intact."""
    try:
        return _worker_encoder(chunk)
    except SourceError as e:
        return e

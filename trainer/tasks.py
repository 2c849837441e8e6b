"""Synthetic tasks with exact answers, as datasets the trainer reads like text (`data.dataset`):

  random_walk  State tracking (Ju et al. 2021, Staircase, sec. 4.2): an agent walks on a ring of N
               positions. A block is one episode: the start position, then moves L / R / S (stay), and after
               every `task_query_every` moves a query `?` whose answer is the current position. With
               `task_show_answers` (the default) the answer follows `?` in the input, as teacher forcing
               would have it, so an answer needs the previous answer and the moves since; without, the
               answer is only the label of the `?` and the walk goes on, so every answer needs the start
               and all moves since (the position is never shown again after the start).
  reverse      Algorithmic: `task_length` digits over an alphabet of N, a separator `=`, then the digits in
               reverse order; examples packed into a block back to back.

Only answer tokens are trained and scored: `labels` holds the answer token at answer positions and -100
elsewhere (the model shifts labels, so position t's label is the token at t, predicted from t-1).
`units` numbers the answers of a block (a random-walk query, or one whole reversed string) so the trainer can
report exact-match error: the share of answers with any wrong token.
"""

from __future__ import annotations

import torch

from trainer.errors import UserError

TASKS = ("random_walk", "reverse")
EOS = "<|endoftext|>"
MOVES = {"L": -1, "R": 1, "S": 0}


def vocabulary(task: str, size: int) -> list[str]:
    """Token strings in id order: EOS first, then the task's symbols."""
    if task == "random_walk":
        return [EOS, *MOVES, "?"] + [f"p{i}" for i in range(size)]
    return [EOS, "="] + [f"d{i}" for i in range(size)]


def word_tokenizer(words: list[str]):
    """A whitespace word-level tokenizer over exactly `words` (ids in list order), as an HF fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, clean_up_tokenization_spaces=False)


def random_walk_blocks(num_blocks: int, seq_len: int, positions: int, query_every: int, generator,
                       show_answers: bool = True):
    """(ids, labels, units), each int64 [num_blocks, seq_len]."""
    vocab = {w: i for i, w in enumerate(vocabulary("random_walk", positions))}
    move_ids = torch.tensor([vocab[m] for m in MOVES])
    steps = torch.tensor(list(MOVES.values()))
    ids = torch.full((num_blocks, seq_len), vocab[EOS], dtype=torch.long)
    labels = torch.full_like(ids, -100)
    units = torch.full_like(ids, -1)
    position = torch.randint(0, positions, (num_blocks,), generator=generator)
    ids[:, 1] = vocab["p0"] + position
    t, unit, since_query = 2, 0, 0
    while t < seq_len:
        if since_query == query_every and t + 1 < seq_len:  # "?", predicting the answer as the next token
            ids[:, t] = vocab["?"]
            labels[:, t + 1] = vocab["p0"] + position
            units[:, t + 1] = unit
            if show_answers:  # the answer is also the next input; hidden, the next input is the next move
                ids[:, t + 1] = labels[:, t + 1]
            t, unit, since_query = t + 2 if show_answers else t + 1, unit + 1, 0
            continue
        move = torch.randint(0, len(MOVES), (num_blocks,), generator=generator)
        ids[:, t] = move_ids[move]
        position = (position + steps[move]) % positions
        t, since_query = t + 1, since_query + 1
    return ids, labels, units


def reverse_blocks(num_blocks: int, seq_len: int, alphabet: int, length: int, generator):
    """(ids, labels, units): examples `EOS d1 .. dk = dk .. d1` packed; the tail of a block is EOS padding."""
    vocab = {w: i for i, w in enumerate(vocabulary("reverse", alphabet))}
    per_example = 2 * length + 2
    ids = torch.full((num_blocks, seq_len), vocab[EOS], dtype=torch.long)
    labels = torch.full_like(ids, -100)
    units = torch.full_like(ids, -1)
    for unit, start in enumerate(range(0, seq_len - per_example + 1, per_example)):
        digits = vocab["d0"] + torch.randint(0, alphabet, (num_blocks, length), generator=generator)
        answer = slice(start + length + 2, start + per_example)
        ids[:, start + 1:start + 1 + length] = digits
        ids[:, start + length + 1] = vocab["="]
        ids[:, answer] = labels[:, answer] = digits.flip(1)
        units[:, answer] = unit
    return ids, labels, units


def build_task(cfg, seed: int) -> dict:
    """Train and validation blocks of the task `cfg.dataset` (a DataConfig), from `seed`; validation examples
    come from a separate generator stream, so they are new episodes, not held-out copies."""
    check_task(cfg)
    blocks = {}
    for split, count, stream in (("train", cfg.task_examples, 0), ("valid", cfg.task_valid_examples, 1)):
        gen = torch.Generator().manual_seed(seed * 1000 + stream)
        if cfg.dataset == "random_walk":
            made = random_walk_blocks(count, cfg.seq_len, cfg.task_size, cfg.task_query_every, gen,
                                      cfg.task_show_answers)
        else:
            made = reverse_blocks(count, cfg.seq_len, cfg.task_size, cfg.task_length, gen)
        blocks.update({f"{split}_blocks": made[0], f"{split}_labels": made[1], f"{split}_units": made[2]})
    return blocks


def check_task(cfg) -> None:
    def bad(key, problem, fix):
        return UserError(f"data.{key}", problem, fix)

    for key in ("task_size", "task_examples", "task_valid_examples", "task_query_every", "task_length"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad(key, f"must be a positive integer, got {value!r}", "See DataConfig in trainer/data.py.")
    if not isinstance(cfg.task_show_answers, bool):
        raise bad("task_show_answers", f"must be true or false, got {cfg.task_show_answers!r}",
                  "Set data.task_show_answers: true (answers in the input) or false (labels only).")
    if cfg.dataset == "random_walk" and cfg.seq_len < cfg.task_query_every + 4:
        raise bad("seq_len", f"{cfg.seq_len} leaves no room for one query after {cfg.task_query_every} moves",
                  f"Use seq_len >= {cfg.task_query_every + 4} or a smaller data.task_query_every.")
    if cfg.dataset == "reverse" and cfg.seq_len < 2 * cfg.task_length + 2:
        raise bad("seq_len", f"{cfg.seq_len} is shorter than one example (2 * task_length + 2 = "
                  f"{2 * cfg.task_length + 2} tokens)", "Raise data.seq_len or lower data.task_length.")


def answer_errors(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, units_BS: torch.Tensor) -> torch.Tensor:
    """float64 [4]: wrong answer tokens, answer tokens, wrong answers (units), answers: sums, to all-reduce."""
    target_BS, unit_BS = labels_BS[:, 1:], units_BS[:, 1:]
    scored_BS = target_BS != -100
    wrong_BS = (logits_BSV[:, :-1].argmax(-1) != target_BS) & scored_BS
    num_units = int(units_BS.max()) + 1 if scored_BS.any() else 0
    B = labels_BS.shape[0]
    # one slot per (block, unit); a unit is wrong if any of its tokens is
    flat_unit = (torch.arange(B)[:, None] * num_units + unit_BS)[scored_BS]
    unit_wrong = torch.zeros(B * num_units, dtype=torch.long).index_add_(0, flat_unit, wrong_BS[scored_BS].long()) > 0
    unit_used = torch.zeros(B * num_units, dtype=torch.bool)
    unit_used[flat_unit] = True
    return torch.tensor([float(wrong_BS.sum()), float(scored_BS.sum()), float(unit_wrong[unit_used].sum()),
                         float(unit_used.sum())], dtype=torch.float64)

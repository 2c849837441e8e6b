"""Synthetic tasks with exact answers, as datasets the trainer reads like text (`data.dataset`):

  random_walk  State tracking (Ju et al. 2021, Staircase, sec. 4.2): an agent walks on a ring of N
               positions. A block is one episode: the start position, then moves L / R / S (stay), and after
               every `task_query_every` moves a query `?` whose answer is the current position (a list:
               each gap drawn uniformly from it, per query, so short gaps give a foothold and long ones
               need a long memory). With `task_show_answers` (the default) the answer follows `?` in the
               input, as teacher forcing would have it, so an answer needs the previous answer and the
               moves since; without, the answer is only the label of the `?` and the walk goes on, so every
               answer needs the start and all moves since (the position is never shown again after the
               start). `task_hide_answers: h` keeps the shown form but puts a blank `_` in place of each
               answer with probability h, so after k blanks in a row the position was last shown 5k + 4
               tokens back (a query every 3 moves): the local step stays learnable and runs of blanks need
               the state carried. `lookback` holds, at each answer, how many tokens before its `?` the position was
               last shown: with `task_far` the evaluation also scores the answers no span of
               `task_far` tokens can read off the input.
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


def vocabulary(task: str, size: int, blank: bool = False) -> list[str]:
    """Token strings in id order: EOS first, then the task's symbols (the walk's blank `_` last, only if used)."""
    if task == "random_walk":
        return [EOS, *MOVES, "?"] + [f"p{i}" for i in range(size)] + (["_"] if blank else [])
    return [EOS, "="] + [f"d{i}" for i in range(size)]


def word_tokenizer(words: list[str]):
    """A whitespace word-level tokenizer over exactly `words` (ids in list order), as an HF fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, clean_up_tokenization_spaces=False)


def query_gaps(query_every) -> list[int]:
    """`task_query_every` as the list of gaps a query may follow (one value: a fixed gap)."""
    return list(query_every) if isinstance(query_every, (list, tuple)) else [query_every]


def random_walk_blocks(num_blocks: int, seq_len: int, positions: int, query_every, generator,
                       show_answers: bool = True, hide_share: float = 0.0):
    """(ids, labels, units, lookback), each int64 [num_blocks, seq_len]; lookback is -1 off the answers."""
    vocab = {w: i for i, w in enumerate(vocabulary("random_walk", positions, blank=hide_share > 0))}
    move_ids = torch.tensor([vocab[m] for m in MOVES])
    steps = torch.tensor(list(MOVES.values()))
    gaps = torch.tensor(query_gaps(query_every))
    B = num_blocks
    ids = torch.full((B, seq_len), vocab[EOS], dtype=torch.long)
    labels = torch.full_like(ids, -100)
    units = torch.full_like(ids, -1)
    lookback = torch.full_like(ids, -1)

    def draw_gaps(count: int) -> torch.Tensor:  # a fixed gap draws nothing, so its episodes keep their moves
        if len(gaps) == 1:
            return gaps.repeat(count)
        return gaps[torch.randint(0, len(gaps), (count,), generator=generator)]

    position = torch.randint(0, positions, (B,), generator=generator)
    ids[:, 1] = vocab["p0"] + position
    shown_at = torch.ones(B, dtype=torch.long)  # the last token that showed the position
    gap, since_query, unit = draw_gaps(B), torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    answering = torch.zeros(B, dtype=torch.bool)  # "?" was the last token and its answer is the next input
    for t in range(2, seq_len):
        ids[answering, t] = labels[answering, t]
        shown = answering
        if hide_share and answering.any():  # drawn only when used: the other forms keep their moves
            blanked = answering & (torch.rand(B, generator=generator) < hide_share)
            ids[blanked, t] = vocab["_"]
            shown = answering & ~blanked
        shown_at[shown] = t
        query = ~answering & (since_query == gap) & (t + 1 < seq_len)
        if query.any():  # "?", predicting the answer as the next token
            ids[query, t] = vocab["?"]
            labels[query, t + 1] = vocab["p0"] + position[query]
            units[query, t + 1] = unit[query]
            lookback[query, t + 1] = t - shown_at[query]
            unit[query] += 1
            since_query[query] = 0
            gap[query] = draw_gaps(int(query.sum()))
        moving = ~answering & ~query
        if moving.any():  # hidden answers: the move after "?" is the next input while "?"'s label is scored
            move = torch.randint(0, len(MOVES), (B,), generator=generator)
            ids[moving, t] = move_ids[move][moving]
            position = torch.where(moving, (position + steps[move]) % positions, position)
            since_query += moving.long()
        answering = query & show_answers
    return ids, labels, units, lookback


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
                                      cfg.task_show_answers, cfg.task_hide_answers)
            if split == "valid":
                blocks["valid_lookback"] = made[3]
        else:
            made = reverse_blocks(count, cfg.seq_len, cfg.task_size, cfg.task_length, gen)
        blocks.update({f"{split}_blocks": made[0], f"{split}_labels": made[1], f"{split}_units": made[2]})
    return blocks


def check_task(cfg) -> None:
    def bad(key, problem, fix):
        return UserError(f"data.{key}", problem, fix)

    def positive(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    for key in ("task_size", "task_examples", "task_valid_examples", "task_length"):
        if not positive(getattr(cfg, key)):
            raise bad(key, f"must be a positive integer, got {getattr(cfg, key)!r}",
                      "See DataConfig in trainer/data/config.py.")
    gaps = query_gaps(cfg.task_query_every)
    if not gaps or not all(positive(g) for g in gaps):
        raise bad("task_query_every", f"must be a positive integer or a list of them, got {cfg.task_query_every!r}",
                  "Write a fixed gap (task_query_every: 8) or the gaps to draw from (task_query_every: [1, 2, 40]).")
    if not isinstance(cfg.task_far, int) or isinstance(cfg.task_far, bool) or cfg.task_far < 0:
        raise bad("task_far", f"must be a non-negative integer, got {cfg.task_far!r}",
                  "Set data.task_far to a span in tokens (0: off).")
    hide = cfg.task_hide_answers
    if isinstance(hide, bool) or not isinstance(hide, (int, float)) or not 0 <= hide < 1:
        raise bad("task_hide_answers", f"must be a share in [0, 1), got {hide!r}",
                  "Set data.task_hide_answers: 0.5 to blank half the answers (0: none).")
    if hide and not cfg.task_show_answers:
        raise bad("task_hide_answers", "blanks shown answers, but data.task_show_answers is false",
                  "Set data.task_show_answers: true, or drop data.task_hide_answers.")
    if cfg.task_far and cfg.dataset != "random_walk":
        raise bad("task_far", f"scores random-walk answers only, not {cfg.dataset!r}", "Remove data.task_far.")
    if not isinstance(cfg.task_show_answers, bool):
        raise bad("task_show_answers", f"must be true or false, got {cfg.task_show_answers!r}",
                  "Set data.task_show_answers: true (answers in the input) or false (labels only).")
    if cfg.dataset == "random_walk" and cfg.seq_len < min(gaps) + 4:
        raise bad("seq_len", f"{cfg.seq_len} leaves no room for one query after {min(gaps)} moves",
                  f"Use seq_len >= {min(gaps) + 4} or a smaller data.task_query_every.")
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


def far_errors(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, lookback_BS: torch.Tensor, far: int) -> torch.Tensor:
    """float64 [2]: wrong answers and answers among those whose position was last shown at least `far` tokens
    before their "?" (random-walk answers are one token each): sums, to all-reduce."""
    far_BS = (lookback_BS[:, 1:] >= far) & (labels_BS[:, 1:] != -100)
    wrong_BS = (logits_BSV[:, :-1].argmax(-1) != labels_BS[:, 1:]) & far_BS
    return torch.tensor([float(wrong_BS.sum()), float(far_BS.sum())], dtype=torch.float64)

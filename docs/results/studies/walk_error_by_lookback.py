"""Study (d): a finished random-walk run's exact-match error by how far back its answers' positions were last in
the input (the start or a shown answer), on the run's fixed validation episodes. The far bucket is what a
32-token span cannot read; the short ones say whether a model learned the walk at all.

    .venv/bin/python docs/results/studies/walk_error_by_lookback.py runs/studies/walkgap-plain-s1234 ...
"""

import sys

import torch

from trainer.data import prepare_data
from trainer.publish.export import load_checkpoint_model, resolve_checkpoint
from trainer.run.config import load_config

BUCKETS = [(1, 4), (5, 8), (9, 16), (17, 31), (32, 10_000)]  # the last: no 32-token span reads it
BATCH = 16


@torch.no_grad()
def errors_by_bucket(model, data, count: int) -> list[tuple[int, int]]:
    wrong_answers = [[0, 0] for _ in BUCKETS]
    for start in range(0, count, BATCH):
        ids = data.valid_blocks[start:start + BATCH]
        labels = data.valid_labels[start:start + BATCH, 1:]
        lookback = data.valid_lookback[start:start + BATCH, 1:]
        wrong = model(ids, use_cache=False).logits[:, :-1].argmax(-1) != labels
        for i, (low, high) in enumerate(BUCKETS):
            bucket = (labels != -100) & (lookback >= low) & (lookback <= high)
            wrong_answers[i][0] += int((wrong & bucket).sum())
            wrong_answers[i][1] += int(bucket.sum())
    return wrong_answers


def main(run_dirs: list[str]) -> None:
    names = [f"{low}–{high}" if high < 10_000 else f"{low}+" for low, high in BUCKETS]
    print("| run | step | " + " | ".join(f"lookback {n}" for n in names) + " |")
    print("|---|---|" + "---|" * len(BUCKETS))
    for run_dir in run_dirs:
        config = load_config(f"{run_dir}/config.yaml")
        data = prepare_data(config.data, config.run.seed)
        if data.valid_lookback is None:
            sys.exit(f"{run_dir}: not a random-walk run")
        checkpoint = resolve_checkpoint(run_dir)
        model = load_checkpoint_model(checkpoint).eval()
        count = config.logging.eval_blocks or len(data.valid_blocks)
        cells = [f"{w / n:.1%} ({n})" if n else "-" for w, n in errors_by_bucket(model, data, count)]
        print(f"| {run_dir} | {checkpoint.name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])

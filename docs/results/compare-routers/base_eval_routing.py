"""Why BASE scores worse than dense in study (a): BASE trains on a balanced assignment of the batch's tokens to the
experts but, at evaluation, routes each token greedily to its highest-affinity expert (as Lewis et al. do, so that
a token's output does not depend on other sequences). This scores a finished run's last checkpoint both ways on its
fixed validation blocks and reports how often the greedy choice equals the balanced one, and the greedy load's CV.

    .venv/bin/python docs/results/compare-routers/base_eval_routing.py runs/compare-routers/base-e16-s1234 ...

The balanced score is a diagnostic only: it lets the other sequences of the evaluation batch (16 blocks) choose a
token's expert, which is why comparisons do not use it.
"""

import math
import sys

import torch

from models.routing import BaseRouter, balanced_assignment
from trainer.data import prepare_data
from trainer.publish.export import load_checkpoint_model, resolve_checkpoint
from trainer.run.config import load_config

BATCH = 16


@torch.no_grad()
def valid_loss(model, blocks: torch.Tensor, routers, balanced: bool) -> float:
    for router in routers:
        router.training = balanced  # BaseRouter balances in training mode; nothing else is switched
    total = 0.0
    for start in range(0, len(blocks), BATCH):
        ids = blocks[start:start + BATCH]
        logits = model(ids, use_cache=False).logits
        total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                                   reduction="sum").item()
    for router in routers:
        router.training = False
    return total / blocks[:, 1:].numel()


@torch.no_grad()
def greedy_vs_balanced(model, blocks: torch.Tensor, routers) -> list[tuple[float, float]]:
    scores = []
    hooks = [r.register_forward_hook(lambda mod, args, out: scores.append(
        args[0].float() @ mod.centroids.float().t())) for r in routers]
    model(blocks[:BATCH], use_cache=False)
    for hook in hooks:
        hook.remove()
    result = []
    for scores_TE in scores:
        greedy_T = scores_TE.argmax(-1)
        load_E = torch.bincount(greedy_T, minlength=scores_TE.shape[1]).float()
        agree = (greedy_T == balanced_assignment(scores_TE)).float().mean().item()
        result.append((agree, (load_E.std() / load_E.mean()).item()))
    return result


def main(run_dirs: list[str]) -> None:
    print("| run | valid ppl, greedy (as scored) | valid ppl, balanced over the batch | greedy = balanced, per "
          "MoE layer | greedy load CV, per layer |\n|---|---|---|---|---|")
    for run_dir in run_dirs:
        config = load_config(f"{run_dir}/config.yaml")
        blocks = prepare_data(config.data, config.run.seed).valid_blocks[:config.logging.eval_blocks or None]
        model = load_checkpoint_model(resolve_checkpoint(run_dir)).eval()
        routers = [m for m in model.modules() if isinstance(m, BaseRouter)]
        greedy, balanced = (valid_loss(model, blocks, routers, b) for b in (False, True))
        layers = greedy_vs_balanced(model, blocks, routers)
        print(f"| {run_dir} | {math.exp(greedy):.1f} | {math.exp(balanced):.1f} | "
              f"{' / '.join(f'{a:.0%}' for a, _ in layers)} | {' / '.join(f'{c:.2f}' for _, c in layers)} |")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Optimizer state that survives a change of world size or ep_size.

DeepSpeed saves MoE optimizer state per expert-parallel rank, indexed by position in the rank's parameter
groups, and refuses to load it into another layout. For a plain torch optimizer (ZeRO stage 0, the CPU
config) hashmoe also writes each parameter's state under its *global* name (expert parameters renamed from
their local index to their global slot, as DeepSpeed's checkpoint files are), so any layout can pick up
the moments of the parameters it holds. ZeRO-1/2 partition state into flat buffers: not covered here.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

LOCAL_EXPERT = re.compile(r"(\.deepspeed_experts\.)(\d+)(\.)")


def supported(engine) -> bool:
    return isinstance(engine.optimizer, torch.optim.Optimizer) and engine.zero_optimization_stage() == 0


def global_names(engine) -> dict[torch.nn.Parameter, str]:
    """Parameter -> name with the local expert index replaced by the global slot."""
    from trainer.parallel import expert_parallel_layers

    offsets = {}
    for name, layer in expert_parallel_layers(engine.module):
        ep_rank = torch.distributed.get_rank() % layer.ep_size
        offsets[name] = ep_rank * layer.num_local_experts
    names = {}
    for name, param in engine.module.named_parameters():
        prefix = name.split(".deepspeed_moe.")[0]
        if prefix in offsets:
            offset = offsets[prefix]
            name = LOCAL_EXPERT.sub(lambda m, offset=offset: f"{m[1]}{int(m[2]) + offset}{m[3]}", name)
        names[param] = name
    return names


def save(engine, folder: Path, rank: int) -> None:
    """Every rank writes the state of its parameters; shared parameters are identical on all ranks, so the
    loader keeps the first copy it finds."""
    if not supported(engine):
        return
    names = global_names(engine)
    state = {names[p]: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for p, s in engine.optimizer.state.items() if p in names}
    torch.save(state, Path(folder) / f"optim_by_name_rank_{rank}.pt")


def load(engine, folder: Path) -> bool:
    """Fill the optimizer state of this rank's parameters from any layout's files; False if not possible."""
    files = sorted(Path(folder).glob("optim_by_name_rank_*.pt"))
    if not files or not supported(engine):
        return False
    by_name = {}
    for path in files:
        for name, state in torch.load(path, map_location="cpu", weights_only=True).items():
            by_name.setdefault(name, state)
    names = global_names(engine)
    for group in engine.optimizer.param_groups:
        for param in group["params"]:
            saved = by_name.get(names[param])
            if saved is not None:
                engine.optimizer.state[param] = {k: v.clone() if torch.is_tensor(v) else v for k, v in saved.items()}
    return True

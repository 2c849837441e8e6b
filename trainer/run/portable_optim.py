"""Optimizer state that survives a change of world size or ep_size.

DeepSpeed saves MoE optimizer state per expert-parallel rank, indexed by position in the rank's parameter
groups, and refuses to load it into another layout. For a plain torch optimizer (ZeRO stage 0, the CPU
config) hashmoe also writes each parameter's state under its *global* name (expert parameters renamed from
their local index to their global slot, as DeepSpeed's checkpoint files are), so any layout can pick up
the moments of the parameters it holds. ZeRO-1/2 partition state into flat buffers: not covered here.
"""

from __future__ import annotations

from pathlib import Path

import torch


def supported(engine) -> bool:
    return isinstance(engine.optimizer, torch.optim.Optimizer) and engine.zero_optimization_stage() == 0


def parameter_names(engine) -> dict[torch.nn.Parameter, str | list[str]]:
    """Parameter -> its name; an expert bank's parameter -> the global name of each of its slots, as DeepSpeed's
    checkpoint files name them (`P.deepspeed_moe.experts.deepspeed_experts.{global slot}.w1`)."""
    from trainer.parallel.expert_parallel import expert_parallel_layers

    names = {param: name for name, param in engine.module.named_parameters()}
    for prefix, layer in expert_parallel_layers(engine.module):
        bank = layer.local_experts
        first = (torch.distributed.get_rank() % layer.ep_size) * bank.num_slots
        for which in ("w1", "w2"):
            names[getattr(bank, which)] = [f"{prefix}.deepspeed_moe.experts.deepspeed_experts.{first + g}.{which}"
                                           for g in range(bank.num_slots)]
    return names


def _banks(engine) -> dict[torch.nn.Parameter, tuple]:
    from trainer.parallel.expert_parallel import expert_parallel_layers

    return {getattr(layer.local_experts, which): (layer.local_experts, which)
            for _, layer in expert_parallel_layers(engine.module) for which in ("w1", "w2")}


def save(engine, folder: Path, rank: int) -> None:
    """Every rank writes the state of its parameters; shared parameters are identical on all ranks, so the
    loader keeps the first copy it finds."""
    if not supported(engine):
        return
    names, banks = parameter_names(engine), _banks(engine)
    state = {}
    for param, param_state in engine.optimizer.state.items():
        if param not in names:
            continue
        if param not in banks:
            state[names[param]] = {k: v.clone() if torch.is_tensor(v) else v for k, v in param_state.items()}
            continue
        bank, which = banks[param]
        for slot, name in enumerate(names[param]):  # moments shaped like the bank are split slot by slot
            state[name] = {k: bank.to_slots(which, v)[slot].clone() if _shaped_like(v, param) else
                           (v.clone() if torch.is_tensor(v) else v) for k, v in param_state.items()}
    torch.save(state, Path(folder) / f"optim_by_name_rank_{rank}.pt")


def _shaped_like(value, param) -> bool:
    return torch.is_tensor(value) and value.shape == param.shape


def load(engine, folder: Path) -> bool:
    """Fill the optimizer state of this rank's parameters from any layout's files; False if not possible."""
    files = sorted(Path(folder).glob("optim_by_name_rank_*.pt"))
    if not files or not supported(engine):
        return False
    by_name = {}
    for path in files:
        for name, state in torch.load(path, map_location="cpu", weights_only=True).items():
            by_name.setdefault(name, state)
    names, banks = parameter_names(engine), _banks(engine)
    for group in engine.optimizer.param_groups:
        for param in group["params"]:
            if param not in banks:
                saved = by_name.get(names[param])
                if saved is not None:
                    engine.optimizer.state[param] = {k: v.clone() if torch.is_tensor(v) else v
                                                     for k, v in saved.items()}
                continue
            slots = [by_name.get(name) for name in names[param]]
            if any(s is None for s in slots):
                continue
            bank, which = banks[param]
            engine.optimizer.state[param] = {
                key: bank.from_slots(which, torch.stack([s[key] for s in slots])).clone()
                if torch.is_tensor(value) and value.dim() > 0 else (value.clone() if torch.is_tensor(value) else value)
                for key, value in slots[0].items()}
    return True

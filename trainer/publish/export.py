"""`hashmoe export`: a DeepSpeed checkpoint (any ep_size) -> one HF folder with every expert.

DeepSpeed keeps the non-expert weights in mp_rank_00_model_states.pt (our router lives there, under the MoE
wrapper's `deepspeed_moe.gate.`) and one file per global expert slot. Slot g of layer prefix P holds
`P.deepspeed_moe.experts.deepspeed_experts.g.w1/.w2`; with multi-hash, slot g is segment g % S of expert
g // S (the bank's `from_slots` puts them back). Reassembling needs only the files, not the world size or ep_size that wrote them.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from trainer.errors import UserError
from trainer.run import checkpoint as ckpt

GATE = ".deepspeed_moe.gate."
EXPERT_KEY = re.compile(r"^(?P<prefix>.+)\.deepspeed_moe\.experts\.deepspeed_experts\.(?P<slot>\d+)\.(?P<param>w[12])$")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder's newest checkpoint; verified against its manifest (exit 2 naming
    the damaged file)."""
    path = Path(path)
    if ckpt.checkpoint_step(path) is not None and path.is_dir():
        return ckpt.verified(path)
    newest = ckpt.step_folders(path)
    if newest:
        return ckpt.verified(newest[0])
    raise UserError(str(path), "is neither a checkpoint (RUN_DIR/checkpoints/step_N) nor a run folder with one",
                    "Pass RUN_DIR/checkpoints/step_N, or RUN_DIR to export its latest checkpoint.")


def hf_state_dict(checkpoint_dir: Path, model) -> dict[str, torch.Tensor]:
    """The HF model's state dict, assembled from DeepSpeed's files."""
    main = torch.load(checkpoint_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    state = {key.replace(GATE, "."): value for key, value in main["module"].items()}
    banks = {name: module.experts for name, module in model.named_modules()
             if hasattr(module, "experts") and hasattr(module.experts, "num_slots")}
    pieces = {prefix: {} for prefix in banks}  # prefix -> {(param, slot): tensor}
    for path in sorted(checkpoint_dir.glob("layer_*_expert_*_mp_rank_*_model_states.pt")):
        for key, value in torch.load(path, map_location="cpu", weights_only=True).items():
            match = EXPERT_KEY.match(key)
            if match is None or match["prefix"] not in banks:
                raise UserError(str(path), f"holds an unexpected key {key!r}", "Export a checkpoint written by hashmoe.")
            slot = int(match["slot"])
            if slot >= banks[match["prefix"]].num_slots:
                raise UserError("model.num_experts", f"{path.name} holds slot {slot} but the model has "
                                f"{banks[match['prefix']].num_slots} slots", "Export with the run's own config.")
            pieces[match["prefix"]][(match["param"], slot)] = value
    for prefix, bank in banks.items():
        found = pieces[prefix]
        if len(found) != 2 * bank.num_slots:
            raise UserError(str(checkpoint_dir), f"{prefix}: found {len(found) // 2} of {bank.num_slots} expert "
                            "files", "The checkpoint is incomplete; export an earlier one.")
        for param in ("w1", "w2"):  # the bank's own slot layout (segments, gate and up rows) in reverse
            slots = torch.stack([found[(param, g)] for g in range(bank.num_slots)])
            state[f"{prefix}.experts.{param}"] = bank.from_slots(param, slots)
    return state


def load_checkpoint_model(checkpoint_dir: Path):
    """The HashMoEForCausalLM saved in a hashmoe checkpoint folder (RUN_DIR/checkpoints/step_N), on the CPU."""
    from models import HashMoEConfig, HashMoEForCausalLM
    from trainer.run.config import saved_model_fields

    state = ckpt.read_state(checkpoint_dir)
    config = HashMoEConfig(**saved_model_fields(state["model_config"]))
    model = HashMoEForCausalLM(config)
    model.load_state_dict(hf_state_dict(checkpoint_dir, model), strict=True)
    return model


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    from transformers import AutoTokenizer

    checkpoint_dir = resolve_checkpoint(checkpoint)
    model = load_checkpoint_model(checkpoint_dir)
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer_dir = checkpoint_dir.parents[1] / "tokenizer"
    if tokenizer_dir.is_dir():
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(staging)
    # transformers writes the weights through a private temporary file (mode 0600): give every file the
    # permissions a plain file gets here, as for the rest of the folder
    umask = os.umask(0)
    os.umask(umask)
    for path in staging.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    return out_dir

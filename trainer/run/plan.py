"""What a (re)run of a run folder will do, decided before anything is written: the checkpoint it resumes from,
whether this config may resume it, or that the run already finished."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from trainer.data.prepare import store_paths
from trainer.errors import UserError
from trainer.run import checkpoint as ckpt
from trainer.run.config import (
    CHANGES_FILE,
    RunConfig,
    config_changes,
    describe_changes,
)
from trainer.run.metrics import read_metrics


@dataclass
class RunPlan:
    """What a (re)run of a run folder will do, decided before anything is written."""

    checkpoint: Path | None = None  # resume from here; None: a new run
    state: dict = field(default_factory=dict)  # its hashmoe_state.json (step, layout, model config)
    warnings: list[str] = field(default_factory=list)  # damaged checkpoints skipped, a corrupt `latest`
    changes: list = field(default_factory=list)  # (key, old, new) accepted with --allow-config-change
    finished: dict | None = None  # the run already reached max_steps: its summary; nothing to do

    @property
    def start_step(self) -> int:
        return self.state.get("step", 0)


def plan_run(config: RunConfig, resume: bool = False, allow_config_change: bool = False) -> RunPlan:
    """Read the run folder (no writes): the checkpoint to resume from, and whether this config may resume it."""
    run_dir = config.run_dir
    previous, warnings = ckpt.find_resumable(run_dir)
    if resume and previous is None:
        raise UserError("--resume", f"no complete checkpoint in {ckpt.checkpoint_root(run_dir)}",
                        "Drop --resume to start a new run, or point --output at the run folder")
    if previous is None:
        return RunPlan(warnings=warnings)
    changes = config_changes(run_dir, config)
    if changes and not allow_config_change:
        raise UserError(str(run_dir / "config.yaml"), f"this run folder's checkpoints were trained with other "
                        f"values ({describe_changes(changes)})", "Train into a new folder with --output DIR, or "
                        "continue this run with the new values: add --allow-config-change (the change and the step "
                        f"it starts at are recorded in {run_dir / CHANGES_FILE} and the model card)")
    state = ckpt.read_state(previous)
    check_resumable(config, previous, state.get("model_config", {}))
    trained_on, store_now = state.get("data_fingerprint"), store_paths(config.data, config.run.seed).target.name
    if trained_on is not None and trained_on != store_now:
        if not allow_config_change:
            raise UserError("data", f"the checkpoint {previous} was trained on the data store {trained_on}, this "
                            f"config's data is the store {store_now} (other sources, tokenizer or split, or a run "
                            "from before the token store)", "Train into a new folder with --output DIR, or continue "
                            "on this data with --allow-config-change (recorded in "
                            f"{run_dir / CHANGES_FILE} and the model card)")
        changes = [*changes, ("data.store", trained_on, store_now)]
    plan = RunPlan(previous, state, warnings, changes)
    if plan.start_step >= config.optim.max_steps:
        plan.finished = finished_summary(config, plan.start_step)
    return plan


def finished_summary(config: RunConfig, step: int) -> dict:
    summary_file = config.run_dir / "summary.json"
    summary = {}
    if summary_file.is_file():
        with contextlib.suppress(OSError, ValueError):
            summary = json.loads(summary_file.read_text())
    if summary.get("valid_loss") is None:  # from the last evaluation the metrics hold
        valid = [r["valid/loss"] for r in read_metrics(config.run_dir) if "valid/loss" in r and r["step"] <= step]
        summary["valid_loss"] = valid[-1] if valid else None
    loss = summary["valid_loss"]
    return {"step": step, "stopped_early": False, "already_finished": True, "requeue": False, "valid_loss": loss,
            "valid_ppl": math.exp(loss) if loss is not None else None, "run_dir": str(config.run_dir),
            "tensorboard": str(config.run_dir / "tb")}


def check_resumable(config: RunConfig, checkpoint_dir: Path, saved: dict) -> None:
    """A checkpoint of another model shape (`saved`: the model config it recorded) cannot be resumed: say which
    field differs."""
    from trainer.run.config import run_model_config

    now = run_model_config(config).to_dict()
    for key in ("num_experts", "moe_layers", "hidden_size", "num_hidden_layers", "router", "hash_heads",
                "expert_intermediate_size", "intermediate_size", "recurrence", "frozen_ffn_size", "ffn_linear",
                "gated_ffn", "num_key_value_heads", "head_dim", "qk_norm", "position_embedding_type", "norm_type",
                "num_shared_experts", "hash_experts_per_tok", "tie_word_embeddings"):
        if key in saved and saved[key] != now.get(key):
            raise UserError(f"model.{key}", f"the checkpoint in {checkpoint_dir} was trained with {key}="
                            f"{saved[key]!r}, this config says {now.get(key)!r}",
                            "Use the run's original model section, or a new --output folder")



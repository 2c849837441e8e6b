"""Run config: one YAML file -> validated dataclasses. Unknown keys, wrong types and inconsistent values fail
here, naming the key, before any process group starts.

    run:        name, output_dir, seed
    model:      any HashMoEConfig field (models/configuration_hashmoe.py documents them), and
                gradient_checkpointing (bool): recompute each block's activations in the backward pass
    data:       trainer.data.DataConfig
    optim:      optimizer, schedule, batch
    parallel:   ep_size, ds_config
    logging:    log/eval cadence, TensorBoard, progress bar
    checkpoint: cadence and retention
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.data.config import DataConfig
from trainer.data.config import validate as _validate_data
from trainer.errors import UserError
from trainer.fileio import write_text_atomic

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
# Model fields the trainer sets itself (from the tokenizer): the fix to give when a config sets one.
TRAINER_SET_MODEL_FIELDS = {"vocab_size": "Set data.vocab_size instead.",
                            "pad_token_id": "Remove it: the tokenizer's EOS token is used.",
                            "bos_token_id": "Remove it: the tokenizer's EOS token is used.",
                            "eos_token_id": "Remove it: the tokenizer's EOS token is used."}


# Keys of the model section that say how to train the model, not what it is: not HashMoEConfig fields.
# init_from: a hashmoe model folder (export, convert or upcycle) whose config and weights the run starts from.
TRAINER_MODEL_KEYS = {"gradient_checkpointing": bool, "experts_implementation": str, "init_from": str}
# What a saved config.json holds besides the model's own fields.
SAVED_ONLY_KEYS = ("architectures", "auto_map", "model_type", "transformers_version")


def saved_model_fields(saved: dict) -> dict:
    """A saved hashmoe config (config.json, or a checkpoint's model_config) as HashMoEConfig keyword arguments."""
    return {k: v for k, v in saved.items() if k not in SAVED_ONLY_KEYS}


def model_config_fields(model_section: dict) -> dict:
    """The model section without the trainer's own keys: what HashMoEConfig takes."""
    return {k: v for k, v in model_section.items() if k not in TRAINER_MODEL_KEYS}


def init_from_config(folder: str) -> dict:
    """The model config saved in the hashmoe model folder `folder` (model.init_from), as a dict."""
    path = Path(folder).expanduser() / "config.json"
    if not path.is_file():
        raise UserError("model.init_from", f"{folder} has no config.json", "Point it at a model folder written by "
                        "hashmoe export, convert or upcycle.")
    saved = json.loads(path.read_text())
    if saved.get("model_type") != "hashmoe":
        raise UserError("model.init_from", f"{folder} holds a {saved.get('model_type')!r} model, not a hashmoe one",
                        "Bring it in first: `hashmoe convert FOLDER OUT` (Llama, Qwen3, Qwen3-MoE, Mixtral) or "
                        "`hashmoe upcycle FOLDER OUT --num-experts E --router R` (a dense model into an MoE).")
    return saved_model_fields(saved)


def run_model_config(config: RunConfig, vocab_size: int | None = None, **extra):
    """The run's HashMoEConfig: its model section, over the folder's saved config with model.init_from (then the
    folder's vocab_size holds: the embeddings are the folder's), else with `vocab_size` (the tokenizer's)."""
    from models import HashMoEConfig

    fields = model_config_fields(config.model)
    init_from = config.model.get("init_from")
    if init_from:
        return HashMoEConfig.from_dict({**init_from_config(init_from), **fields, **extra})
    return HashMoEConfig(**fields, vocab_size=vocab_size or config.data.vocab_size, **extra)


def resolve_init_tokenizer(config: RunConfig) -> None:
    """A run that starts from a model folder reads its data with that folder's tokenizer (the token ids the
    embeddings were trained on) unless data.tokenizer names another."""
    folder = config.model.get("init_from")
    if not folder:
        return
    init_from_config(folder)  # a missing or foreign folder is named as model.init_from
    if config.data.tokenizer != "train":
        return
    if not (Path(folder).expanduser() / "tokenizer.json").is_file():
        raise UserError("data.tokenizer", f"is `train`, but the model in model.init_from={folder} was trained with "
                        "token ids of its own tokenizer, which the folder does not hold", "Set data.tokenizer to "
                        "the model's tokenizer folder (or copy it into the model folder with save_pretrained).")
    config.data.tokenizer = str(folder)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (1e-3, 3e-4) as numbers, as YAML 1.2 does;
    PyYAML (YAML 1.1) reads them as strings, so `lr: 1e-3` or `--set optim.lr=3e-4` would be rejected."""


_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                  list("-+0123456789"))


def _load_yaml(text: str):
    return yaml.load(text, Loader=_YamlLoader)


@dataclass
class RunSection:
    name: str = "run"
    output_dir: str = "runs/run"  # the run folder (config.yaml, metrics.jsonl, tb/, checkpoints/)
    seed: int = 1234


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # final lr / peak lr for cosine and linear schedules
    schedule: str = "cosine"  # cosine | linear | constant (all after linear warmup)
    warmup_steps: int = 50
    weight_decay: float = 0.1  # not applied to biases, norms, embeddings, routers
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # 0 disables clipping
    micro_batch_size: int = 8  # sequences per rank per micro step
    grad_accum: int = 1
    max_steps: int = 300


@dataclass
class ParallelConfig:
    ep_size: int = 1  # ranks the experts of each MoE layer are sharded over; divides num_experts and world size
    ds_config: str = "cpu"  # name in ds_configs/ (cpu, zero1_bf16, zero2_bf16) or a path to a JSON file
    # A collective that waits longer for a rank ends the run, naming that rank (trainer/run/faults.py). NCCL's own
    # default, 10 minutes: far above any wait of a healthy step (the slowest rank's step, a checkpoint's share of
    # hashing), while a hung node idles the whole allocation for at most that long, not gloo's 30 minutes.
    collective_timeout_s: float = 600.0


@dataclass
class LoggingConfig:
    log_every: int = 10
    eval_every: int = 100  # also evaluated at the last step
    eval_blocks: int = 0  # the first N blocks of the validation split, the same on any number of ranks; 0 = all
    tensorboard: bool = True
    progress: bool = True


@dataclass
class CheckpointConfig:
    every: int = 100  # 0 = only at the end
    keep: int = 2  # most recent checkpoints kept


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir)


# ---- loading ------------------------------------------------------------------------------------------
def load_config(path: str | Path, overrides: list[str] = (), output_dir: str | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(str(path), "run config file not found", "Pass the path of a run YAML (see recipes/).")
    try:
        raw = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(str(path), f"is not valid YAML ({' '.join(str(err).split())})", "Fix the YAML syntax.") from None
    if not isinstance(raw, dict):
        raise UserError(str(path), "must hold a mapping of sections", "Start from a file in recipes/.")
    for item in overrides:
        apply_override(raw, item)
    if output_dir is not None:
        raw.setdefault("run", {})["output_dir"] = output_dir
    for key, why in drop_retired(raw):
        if os.environ.get("RANK", "0") == "0":
            print(f"hashmoe: warning: {path}: {key} is retired ({why}); update the file", file=sys.stderr)
    return config_from_dict(raw)


# Keys that once meant something: old recipes and run folders still load. (key, what became of it).
RETIRED_KEYS = {"parallel.dispatch": "every run uses one dispatcher: uneven all-to-all, no capacity padding",
                "logging.eval_batches": "the validation set is logging.eval_blocks blocks, the same on any number "
                                        "of ranks; read as eval_batches x optim.micro_batch_size"}


def drop_retired(raw: dict) -> list[tuple[str, str]]:
    """Rewrite retired keys of a raw config in place (dropped, or turned into their successor); returns
    (key, why) of each one found."""
    found = []
    for key, why in RETIRED_KEYS.items():
        section, name = key.split(".")
        if not (isinstance(raw.get(section), dict) and name in raw[section]):
            continue
        value = raw[section].pop(name)
        found.append((key, why))
        if key == "logging.eval_batches" and "eval_blocks" not in raw[section] and isinstance(value, int):
            optim = raw.get("optim") if isinstance(raw.get("optim"), dict) else {}
            raw[section]["eval_blocks"] = value * optim.get("micro_batch_size", OptimConfig.micro_batch_size)
    return found


def apply_override(raw: dict, item: str) -> None:
    """`a.b=c`: c is parsed as YAML (so 1e-3, true, [1, 3] and null work); a bare comma list of numbers
    (`moe_layers=1,3`) is read as the list it means."""
    if "=" not in item:
        raise UserError("--set", f"{item!r} is not KEY=VALUE", "Write e.g. --set optim.lr=3e-4.")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(key, f"{part} is not a section", "Override a key inside a section.")
    try:
        parsed = _load_yaml(value)
        if isinstance(parsed, str) and "," in parsed:
            items = [_load_yaml(v) for v in parsed.split(",")]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
                parsed = items
        node[parts[-1]] = parsed
    except yaml.YAMLError:
        raise UserError("--set", f"the value in {item!r} is not valid YAML",
                        "Quote it, or write lists as [a, b] and mappings as {k: v}.") from None


def config_from_dict(raw: dict) -> RunConfig:
    drop_retired(raw)
    config = _build(RunConfig, raw, "")
    validate(config)
    return config


def _build(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise UserError(prefix.rstrip(".") or "config", f"expected a mapping, got {raw!r}",
                        "Write the section as `key: value` lines.")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise UserError(prefix + unknown[0], "unknown key",
                        f"Valid keys here: {', '.join(sorted(known))}.")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, prefix + name)
    return cls(**values)


def _coerce(hint, value, key: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        for member in members[:-1]:  # the first member the value fits, e.g. `int | list[int]`
            try:
                return _coerce(member, value, key)
            except UserError:
                pass
        return _coerce(members[-1], value, key)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(key, f"expected a list, got {value!r}", "Write it as [a, b, ...].")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(key, f"expected a mapping, got {value!r}", "Write it as `key: value` lines.")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Any or isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise UserError(key, f"expected {hint.__name__}, got {value!r}", f"Give a {hint.__name__} value.")


def validate(config: RunConfig) -> None:
    """Semantic checks that need more than one key. Model fields are checked by HashMoEConfig itself."""
    from models import HashMoEConfig

    model_fields = {f.name for f in dataclasses.fields(HashMoEConfig)}
    for key, kind in TRAINER_MODEL_KEYS.items():
        if key in config.model:
            _coerce(kind, config.model[key], f"model.{key}")
    for key in model_config_fields(config.model):
        if key not in model_fields:
            raise UserError(f"model.{key}", "unknown model field",
                            "See HashMoEConfig in models/configuration_hashmoe.py for the fields.")
    implementation = config.model.get("experts_implementation")
    if implementation not in (None, "grouped_mm", "eager"):
        raise UserError("model.experts_implementation", f"got {implementation!r}",
                        "Use grouped_mm (torch._grouped_mm), eager (one matmul per expert), or leave it unset "
                        "(grouped_mm on CUDA, eager on CPU); batched_mm copies the expert weights once per token "
                        "and fits inference, not training.")
    for key, fix in TRAINER_SET_MODEL_FIELDS.items():
        if key in config.model:
            raise UserError(f"model.{key}", "is set from the tokenizer", fix)
    resolve_init_tokenizer(config)
    try:
        model_config = run_model_config(config)
    except (ValueError, TypeError) as err:
        message = str(err)
        if message.startswith("HashMoEConfig."):  # "HashMoEConfig.FIELD: PROBLEM. FIX"
            field_name, _, rest = message.removeprefix("HashMoEConfig.").partition(": ")
            problem, sep, fix = rest.partition(". ")
            raise UserError(f"model.{field_name}", problem if sep else rest.rstrip("."),
                            fix if sep else "Fix the model section.") from None
        raise UserError("model", message, "Fix the model section.") from None
    if config.model.get("gradient_checkpointing") and model_config.gradient_checkpointing_unsupported:
        raise UserError("model.gradient_checkpointing", model_config.gradient_checkpointing_unsupported,
                        "Set model.gradient_checkpointing: false, or recurrence.memory: 0.")
    _validate_data(config.data)
    if config.data.seq_len > model_config.max_position_embeddings:
        raise UserError("data.seq_len", f"{config.data.seq_len} exceeds model.max_position_embeddings="
                        f"{model_config.max_position_embeddings}", "Shorten seq_len or raise max_position_embeddings.")
    optim, parallel = config.optim, config.parallel
    for key in ("micro_batch_size", "grad_accum", "max_steps"):
        if getattr(optim, key) < 1:
            raise UserError(f"optim.{key}", f"got {getattr(optim, key)}", "Use a positive integer.")
    if optim.optimizer not in ("adamw", "sgd"):
        raise UserError("optim.optimizer", f"unknown optimizer {optim.optimizer!r}", "Use adamw or sgd.")
    if optim.schedule not in ("cosine", "linear", "constant"):
        raise UserError("optim.schedule", f"unknown schedule {optim.schedule!r}", "Use cosine, linear or constant.")
    if not optim.lr > 0:
        raise UserError("optim.lr", f"got {optim.lr}", "Use a positive learning rate.")
    if len(optim.betas) != 2:
        raise UserError("optim.betas", f"got {optim.betas}", "Give two numbers, e.g. [0.9, 0.95].")
    if not parallel.collective_timeout_s > 0:
        raise UserError("parallel.collective_timeout_s", f"got {parallel.collective_timeout_s}",
                        "Use a positive number of seconds (600, the default, suits GPU clusters).")
    if parallel.ep_size < 1:
        raise UserError("parallel.ep_size", f"got {parallel.ep_size}", "Use a positive integer.")
    if parallel.ep_size > 1:
        if not model_config.is_moe:
            raise UserError("parallel.ep_size", "is > 1 but the model has no MoE layer",
                            "Set model.moe_layers or use ep_size: 1.")
        if model_config.num_experts % parallel.ep_size:
            raise UserError("parallel.ep_size", f"{parallel.ep_size} does not divide model.num_experts="
                            f"{model_config.num_experts}", "Pick an ep_size that divides num_experts.")
    resolve_ds_config_path(parallel.ds_config)
    for key in ("log_every", "eval_every"):
        if getattr(config.logging, key) < 1:
            raise UserError(f"logging.{key}", f"got {getattr(config.logging, key)}", "Use a positive integer.")
    if config.checkpoint.keep < 1:
        raise UserError("checkpoint.keep", f"got {config.checkpoint.keep}", "Keep at least 1 checkpoint.")


def check_world_size(config: RunConfig, world_size: int) -> None:
    if world_size % config.parallel.ep_size:
        raise UserError("parallel.ep_size", f"{config.parallel.ep_size} does not divide the world size "
                        f"{world_size}", "Launch a multiple of ep_size processes, or lower ep_size.")


def resolve_ds_config_path(name: str) -> Path:
    candidate = Path(name)
    if candidate.suffix == ".json" and candidate.is_file():
        return candidate
    shipped = DS_CONFIG_DIR / f"{name}.json"
    if shipped.is_file():
        return shipped
    choices = ", ".join(sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
    raise UserError("parallel.ds_config", f"no DeepSpeed config {name!r}",
                    f"Use one of {choices}, or a path to a JSON file.")


def save_resolved(config: RunConfig, run_dir: Path) -> None:
    """RUN_DIR/config.yaml: written when training starts from it, never by a run that does not train."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))


# ---- reruns into an existing run folder ----------------------------------------------------------------
CHANGES_FILE = "config_changes.jsonl"  # RUN_DIR/: one row per key changed on a resume (--allow-config-change)
# Keys that may differ between a run and its resume without changing what is trained: where files live, the
# progress bar, how long a collective may wait, how data is prepared (the store's bytes do not depend on it),
# the expert-parallel layout (resuming at another ep_size continues the same run) and how the experts' matmuls
# run (the same function).
UNRECORDED_KEYS = {"run.output_dir", "data.cache_dir", "data.num_proc", "data.prepare_timeout_s",
                   "logging.progress", "parallel.ep_size", "model.experts_implementation",
                   "parallel.collective_timeout_s"}


def flatten_config(tree: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}: the dotted keys of --set."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(run_dir: Path, config: RunConfig) -> list[tuple[str, Any, Any]]:
    """(key, value in RUN_DIR/config.yaml, value now) for every key that differs; [] without a config.yaml."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return []
    raw = _load_yaml(path.read_text()) or {}
    try:  # through today's defaults, so a key added since the run was started is not a change
        saved = config_from_dict(raw).to_dict()
    except UserError:
        saved = raw
    before, now = flatten_config(saved), flatten_config(config.to_dict())
    return [(key, before.get(key), now.get(key)) for key in sorted(before.keys() | now.keys())
            if key not in UNRECORDED_KEYS and before.get(key) != now.get(key)]


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)


def record_changes(run_dir: Path, changes: list[tuple[str, Any, Any]], step: int) -> None:
    """Append the changes, with the step they apply from, to RUN_DIR/config_changes.jsonl (the model card
    lists them)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with open(Path(run_dir) / CHANGES_FILE, "a") as f:
        for key, old, new in changes:
            f.write(json.dumps({"step": step, "key": key, "old": old, "new": new, "time": stamp}) + "\n")


def read_changes(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / CHANGES_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

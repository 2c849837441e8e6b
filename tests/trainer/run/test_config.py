"""Tests for trainer/run/config.py: recipes load, `--set` overrides, and every config error names its key and fix."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from trainer.data import DataConfig
from trainer.errors import EXIT_USER_ERROR, UserError
from trainer.run.config import (
    DS_CONFIG_DIR,
    CheckpointConfig,
    LoggingConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    apply_override,
    check_world_size,
    config_from_dict,
    load_config,
    resolve_ds_config_path,
    save_resolved,
)

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "recipes" / "tiny.yaml"
TINY_EP2 = ROOT / "recipes" / "tiny-ep2.yaml"
TINY_MODEL = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
              "max_position_embeddings": 128, "moe_layers": [1, 3], "num_experts": 8, "router": "hash",
              "hash_function": "balanced"}


def tiny_raw() -> dict:
    return yaml.safe_load(TINY.read_text())


def error_of(raw: dict, *overrides: str) -> UserError:
    """The UserError that config_from_dict raises for `raw` with `overrides` applied."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        apply_override(raw, item)
    with pytest.raises(UserError) as info:
        config_from_dict(raw)
    return info.value


def tiny_error(*overrides: str) -> UserError:
    return error_of(tiny_raw(), *overrides)


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- recipes and defaults -----------------------------------------------------------------------------
def test_tiny_recipe_loads_with_defaults_filled():
    config = load_config(TINY)
    assert config.run.name == "tiny" and config.run.output_dir == "runs/tiny" and config.run.seed == 1234
    assert config.run_dir == Path("runs/tiny")
    assert config.model == TINY_MODEL
    assert config.data == DataConfig(dataset="shakespeare", vocab_size=4096, seq_len=128)
    assert config.optim == OptimConfig(lr=2e-3, warmup_steps=100, max_steps=300, micro_batch_size=16)
    # keys the recipe leaves out take the dataclass defaults
    assert config.optim.optimizer == "adamw" and config.optim.schedule == "cosine"
    assert config.optim.betas == [0.9, 0.95] and config.optim.grad_accum == 1
    assert config.parallel == ParallelConfig(ep_size=1, ds_config="cpu")
    assert config.logging == LoggingConfig(log_every=10, eval_every=100, eval_blocks=128)
    assert config.logging.tensorboard is True and config.logging.progress is True
    assert config.checkpoint == CheckpointConfig(every=100, keep=2)


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml")))
def test_every_shipped_recipe_gives_a_valid_model_config(recipe):
    from models import HashMoEConfig
    from trainer.run.config import model_config_fields

    config = load_config(ROOT / recipe)
    HashMoEConfig(**model_config_fields(config.model), vocab_size=config.data.vocab_size)  # raises on a bad field


def test_tiny_ep2_recipe_loads():
    config = load_config(TINY_EP2)
    assert config.parallel.ep_size == 2
    assert config.optim.micro_batch_size == 8
    assert config.model == TINY_MODEL
    check_world_size(config, 2)
    check_world_size(config, 4)


def test_empty_file_and_empty_sections_give_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path / "empty.yaml", "")) == RunConfig()
    config = load_config(write_yaml(tmp_path / "sections.yaml", "run:\noptim:\nlogging:\n"))
    assert config == RunConfig()


def test_the_retired_dispatch_key_is_ignored_with_a_warning(tmp_path, capsys):
    """parallel.dispatch (stock | dropless) is gone: one dispatcher serves every run. Old recipes still load."""
    config = load_config(write_yaml(tmp_path / "old.yaml", "parallel:\n  dispatch: stock\n  ep_size: 1\n"))
    assert config == RunConfig()
    err = capsys.readouterr().err
    assert "parallel.dispatch is retired" in err and "update the file" in err
    assert config_from_dict({"parallel": {"dispatch": "dropless"}}) == RunConfig()  # a run folder's config.yaml


def test_the_retired_eval_batches_becomes_eval_blocks(tmp_path, capsys):
    config = load_config(write_yaml(tmp_path / "old.yaml", "optim:\n  micro_batch_size: 4\nlogging:\n"
                                    "  eval_batches: 3\n"))
    assert config.logging.eval_blocks == 12 and "logging.eval_batches is retired" in capsys.readouterr().err
    assert config_from_dict({"logging": {"eval_batches": 2}}).logging.eval_blocks == 2 * OptimConfig().micro_batch_size


def test_ints_are_coerced_to_float(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", "optim:\n  lr: 1\n  min_lr_ratio: 0\n  betas: [1, 0]\n"
                                              "  grad_clip: 2\n")
    optim = load_config(path).optim
    assert optim.lr == 1.0 and type(optim.lr) is float
    assert optim.min_lr_ratio == 0.0 and type(optim.min_lr_ratio) is float
    assert optim.betas == [1.0, 0.0] and all(type(b) is float for b in optim.betas)
    assert type(optim.grad_clip) is float


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    # PyYAML alone reads `1e-3` as a string; run configs read it as a float, in files and in model fields.
    path = write_yaml(tmp_path / "run.yaml", "optim:\n  lr: 1e-3\n  weight_decay: 5E-2\n"
                                              "model:\n  moe_layers: [1]\n  router: topk\n"
                                              "  router_z_loss_coef: 1e-3\n")
    config = load_config(path)
    assert config.optim.lr == 1e-3 and config.optim.weight_decay == 5e-2
    assert config.model["router_z_loss_coef"] == 1e-3


def test_output_dir_argument_overrides_run_output_dir(tmp_path):
    config = load_config(TINY, output_dir=str(tmp_path / "out"))
    assert config.run.output_dir == str(tmp_path / "out")
    assert config.run_dir == tmp_path / "out"


# ---- --set overrides ----------------------------------------------------------------------------------
def test_overrides_parse_values_as_yaml():
    config = load_config(TINY, ["optim.lr=3e-4", "model.moe_layers=[0, 1]", "model.capacity_factor=null",
                                "logging.progress=false", "run.name=a=b", "optim.betas=[0.8, 0.9]"])
    assert config.optim.lr == 3e-4
    assert config.model["moe_layers"] == [0, 1]
    assert "capacity_factor" in config.model and config.model["capacity_factor"] is None
    assert config.logging.progress is False
    assert config.run.name == "a=b"  # only the first `=` splits
    assert config.optim.betas == [0.8, 0.9]


def test_a_bare_comma_list_of_numbers_is_a_list():
    config = load_config(TINY, ["model.moe_layers=1,3", "optim.betas=0.8,0.9", "run.name=a,b"])
    assert config.model["moe_layers"] == [1, 3] and config.optim.betas == [0.8, 0.9]
    assert config.run.name == "a,b"  # not numbers: the string it says


def test_override_creates_missing_sections_and_keys():
    raw = {}
    apply_override(raw, "checkpoint.keep=5")
    apply_override(raw, "model.num_experts=4")
    assert raw == {"checkpoint": {"keep": 5}, "model": {"num_experts": 4}}
    config = config_from_dict(raw)
    assert config.checkpoint.keep == 5 and config.model == {"num_experts": 4}


def test_overrides_apply_in_order():
    assert load_config(TINY, ["optim.lr=1e-2", "optim.lr=5e-3"]).optim.lr == 5e-3


def test_override_without_equals_sign():
    with pytest.raises(UserError) as info:
        load_config(TINY, ["optim.lr"])
    assert info.value.key == "--set"
    assert "is not KEY=VALUE" in info.value.problem and "--set optim.lr=3e-4" in str(info.value)


def test_override_with_invalid_yaml_value():
    with pytest.raises(UserError) as info:
        load_config(TINY, ["model.moe_layers=[0,"])
    assert info.value.key == "--set"
    assert "not valid YAML" in str(info.value) and "Quote it" in str(info.value)


def test_override_below_a_value_is_not_a_section():
    with pytest.raises(UserError) as info:
        load_config(TINY, ["optim.lr.x=1"])
    assert info.value.key == "optim.lr.x"
    assert "lr is not a section" in str(info.value)


# ---- unknown keys and wrong types ---------------------------------------------------------------------
@pytest.mark.parametrize("overrides, key, valid", [
    (["optimizer.lr=1"], "optimizer", ["checkpoint", "data", "logging", "model", "optim", "parallel", "run"]),
    (["optim.lrr=1"], "optim.lrr", ["betas", "grad_accum", "lr", "max_steps", "optimizer", "schedule"]),
    (["data.train_file=[a.txt]"], "data.train_file", ["dataset", "seq_len", "train_files", "vocab_size"]),
    (["parallel.ep=2"], "parallel.ep", ["ds_config", "ep_size"]),
    (["logging.every=2"], "logging.every", ["eval_every", "log_every", "tensorboard"]),
    (["checkpoint.save_every=2"], "checkpoint.save_every", ["every", "keep"]),
    (["run.nmae=x"], "run.nmae", ["name", "output_dir", "seed"]),
])
def test_unknown_keys_are_named_in_full(overrides, key, valid):
    err = tiny_error(*overrides)
    assert err.key == key
    assert err.problem == "unknown key"
    assert err.fix.startswith("Valid keys here: ")
    listed = err.fix.removeprefix("Valid keys here: ").rstrip(".").split(", ")
    assert listed == sorted(listed) and set(valid) <= set(listed)


def test_unknown_model_field_is_named_in_full():
    err = tiny_error("model.num_expert=4")
    assert err.key == "model.num_expert"
    assert err.problem == "unknown model field"
    assert "See HashMoEConfig in models/configuration_hashmoe.py" in str(err)


def test_first_unknown_key_is_reported():
    err = error_of({"optim": {"zz": 1, "lrr": 1, "lr": 1.0}})
    assert err.key == "optim.lrr"


@pytest.mark.parametrize("overrides, key, fix", [
    (["optim.max_steps=ten"], "optim.max_steps", "int value"),
    (["optim.max_steps=2.5"], "optim.max_steps", "int value"),
    (["optim.lr=fast"], "optim.lr", "float value"),
    (["optim.lr=true"], "optim.lr", "float value"),
    (["optim.betas=0.9"], "optim.betas", "Write it as [a, b, ...]"),
    (["optim.betas=[0.9, high]"], "optim.betas[1]", "float value"),
    (["logging.log_every=true"], "logging.log_every", "int value"),  # a bool is not an int
    (["run.seed=false"], "run.seed", "int value"),
    (["logging.tensorboard=1"], "logging.tensorboard", "bool value"),
    (["run.name=5"], "run.name", "str value"),
    (["data.train_files=a.txt"], "data.train_files", "Write it as [a, b, ...]"),
    (["optim=3"], "optim", "Write the section as `key: value` lines"),
    (["model=[1, 2]"], "model", "Write it as `key: value` lines"),
])
def test_wrong_types_name_the_key(overrides, key, fix):
    err = tiny_error(*overrides)
    assert err.key == key
    assert "expected" in err.problem
    assert fix in str(err)


def test_top_level_must_be_a_mapping(tmp_path):
    path = write_yaml(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    assert info.value.key == str(path) and "must hold a mapping" in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError) as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.key == str(tmp_path / "nope.yaml")
    assert "not found" in info.value.problem and "recipes/" in info.value.fix


def test_invalid_yaml_file(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", "optim: {lr: [1\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    assert info.value.key == str(path) and "not valid YAML" in str(info.value)


# ---- semantic checks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, key, fix", [
    (["parallel.ep_size=3"], "parallel.ep_size", "Pick an ep_size that divides num_experts"),
    (["parallel.ep_size=0"], "parallel.ep_size", "Use a positive integer"),
    (["parallel.ep_size=2", "model.moe_layers=[]"], "parallel.ep_size", "Set model.moe_layers or use ep_size: 1"),
    (["parallel.ds_config=nope"], "parallel.ds_config", "Use one of cpu, zero1_bf16, zero2_bf16"),
    (["parallel.ds_config=/no/such/file.json"], "parallel.ds_config", "or a path to a JSON file"),
    (["data.seq_len=256"], "data.seq_len", "Shorten seq_len or raise max_position_embeddings"),
    (["optim.optimizer=adam"], "optim.optimizer", "Use adamw or sgd"),
    (["optim.schedule=step"], "optim.schedule", "Use cosine, linear or constant"),
    (["optim.lr=0"], "optim.lr", "Use a positive learning rate"),
    (["optim.lr=-1e-3"], "optim.lr", "Use a positive learning rate"),
    (["optim.betas=[0.9]"], "optim.betas", "Give two numbers"),
    (["optim.micro_batch_size=0"], "optim.micro_batch_size", "Use a positive integer"),
    (["optim.grad_accum=0"], "optim.grad_accum", "Use a positive integer"),
    (["optim.max_steps=0"], "optim.max_steps", "Use a positive integer"),
    (["logging.log_every=0"], "logging.log_every", "Use a positive integer"),
    (["logging.eval_every=0"], "logging.eval_every", "Use a positive integer"),
    (["checkpoint.keep=0"], "checkpoint.keep", "Keep at least 1 checkpoint"),
    (["data.dataset=wikipedia"], "data.dataset", "Use `shakespeare`"),
    (["data.dataset=files"], "data.train_files", "List local files, globs or save_to_disk folders"),
    (["data.valid_fraction=1.5"], "data.valid_fraction", "hold out 5% of the documents"),
    (["data.vocab_size=100"], "data.vocab_size", "Use e.g. 4096"),
])
def test_semantic_errors_name_the_key(overrides, key, fix):
    err = tiny_error(*overrides)
    assert err.key == key
    assert fix in str(err)


@pytest.mark.parametrize("overrides, key, fix", [
    (["model.moe_layers=[1, 4]"], "model.moe_layers", "Use indices in [0, 3]"),
    (["model.moe_layers=[1, 1]"], "model.moe_layers", "List each MoE layer once"),
    (["model.num_attention_heads=3"], "model.num_attention_heads", "Pick a head count that divides hidden_size"),
    (["model.router=random"], "model.router", "Use one of ('hash', 'switch', 'base', 'topk')"),
    (["model.num_experts=0"], "model.num_experts", "Use a positive integer"),
    (["model.num_experts='8'"], "model.num_experts", "Use a positive integer"),
    (["model.dropout=1.5"], "model.dropout", "Use a probability in [0, 1)"),
    (["model.hash_heads=2"], "model.hash_heads", "Use hash_heads=1, or one of"),
    (["model.capacity_factor=0"], "model.capacity_factor", "or null for no capacity (dropless)"),
    (["model.experts_implementation=batched_mm"], "model.experts_implementation", "Use grouped_mm"),
])
def test_model_field_errors_name_the_model_field(overrides, key, fix):
    err = tiny_error(*overrides)
    assert err.key == key
    assert fix in err.fix
    assert not err.problem.startswith("HashMoEConfig")
    assert ".." not in str(err)


def test_model_errors_that_name_no_field_name_the_model_section():
    err = tiny_error("model.moe_layers=1")
    assert err.key == "model" and err.fix == "Fix the model section."


@pytest.mark.parametrize("field, fix", [
    ("vocab_size", "Set data.vocab_size instead"),
    ("eos_token_id", "the tokenizer's EOS token is used"),
    ("pad_token_id", "the tokenizer's EOS token is used"),
    ("bos_token_id", "the tokenizer's EOS token is used"),
])
def test_model_fields_set_by_the_trainer_are_refused(field, fix):
    err = tiny_error(f"model.{field}=100")
    assert err.key == f"model.{field}"
    assert "is set from the tokenizer" in err.problem and fix in str(err)


def test_seq_len_equal_to_max_position_embeddings_is_fine():
    config = load_config(TINY, ["data.seq_len=128", "model.max_position_embeddings=128"])
    assert config.data.seq_len == 128


def test_dense_model_with_ep_size_1_is_fine():
    config = load_config(TINY, ["model.moe_layers=[]"])
    assert config.model["moe_layers"] == [] and config.parallel.ep_size == 1


def test_optimizer_and_schedule_choices_are_accepted():
    for optimizer in ("adamw", "sgd"):
        for schedule in ("cosine", "linear", "constant"):
            config = load_config(TINY, [f"optim.optimizer={optimizer}", f"optim.schedule={schedule}"])
            assert (config.optim.optimizer, config.optim.schedule) == (optimizer, schedule)


def test_check_world_size():
    config = load_config(TINY_EP2)
    with pytest.raises(UserError) as info:
        check_world_size(config, 3)
    assert info.value.key == "parallel.ep_size"
    assert "does not divide the world size 3" in info.value.problem
    assert "Launch a multiple of ep_size processes" in str(info.value)
    check_world_size(config, 2)
    for world_size in (1, 2, 3):
        check_world_size(load_config(TINY), world_size)


def test_resolve_ds_config_path(tmp_path):
    assert resolve_ds_config_path("cpu") == DS_CONFIG_DIR / "cpu.json"
    assert {p.stem for p in DS_CONFIG_DIR.glob("*.json")} == {"cpu", "zero1_bf16", "zero2_bf16"}
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1}))
    assert resolve_ds_config_path(str(own)) == own
    assert load_config(TINY, [f"parallel.ds_config={own}"]).parallel.ds_config == str(own)


def test_user_error_message_format():
    err = UserError("parallel.ep_size", "3 does not divide 8", "Pick another.")
    assert str(err) == "parallel.ep_size: 3 does not divide 8. Pick another."
    assert (err.key, err.problem, err.fix) == ("parallel.ep_size", "3 does not divide 8", "Pick another.")
    assert EXIT_USER_ERROR == 2


# ---- save_resolved ------------------------------------------------------------------------------------
def test_save_resolved_round_trips(tmp_path):
    config = load_config(TINY, ["optim.lr=3e-4", "model.capacity_factor=null", "data.train_files=[]",
                                "optim.betas=[0.8, 0.99]"], output_dir=str(tmp_path / "run"))
    save_resolved(config, config.run_dir)
    saved = config.run_dir / "config.yaml"
    assert sorted(p.name for p in config.run_dir.iterdir()) == ["config.yaml"]  # no config.yaml.tmp left
    raw = yaml.safe_load(saved.read_text())
    assert list(raw) == ["run", "model", "data", "optim", "parallel", "logging", "checkpoint"]
    assert raw["optim"]["lr"] == 3e-4 and raw["run"]["output_dir"] == str(tmp_path / "run")
    assert config_from_dict(raw) == config
    assert load_config(saved) == config
    # saving again replaces the file
    save_resolved(load_config(saved, ["optim.max_steps=7"]), config.run_dir)
    assert load_config(saved).optim.max_steps == 7


def test_save_resolved_of_defaults_round_trips(tmp_path):
    save_resolved(RunConfig(), tmp_path / "a" / "b")
    assert load_config(tmp_path / "a" / "b" / "config.yaml") == RunConfig()


@pytest.mark.parametrize("overrides, problem", [
    (["model.gradient_checkpointing=2"], "expected bool, got 2"),
    (["model.gradient_checkpointing=true",
      "model.recurrence={kind: staircase, chunk: 8, window: 16, memory: 8}"], "cached staircase"),
])
def test_gradient_checkpointing_key(overrides, problem):
    err = tiny_error(*overrides)
    assert err.key == "model.gradient_checkpointing"
    assert problem in err.problem


def test_gradient_checkpointing_is_a_trainer_key_not_a_model_field():
    config = load_config(TINY, ["model.gradient_checkpointing=true"])
    assert config.model["gradient_checkpointing"] is True

"""`hashmoe train`: data -> model -> expert parallelism -> DeepSpeed engine -> steps, metrics, checkpoints."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.data.prepare import PreparedData, prepare_data, store_paths
from trainer.errors import UserError
from trainer.parallel.distributed import (
    ProcessEnv,
    groups_inherit_timeout,
    init_distributed,
    on_rank0,
    resolve_env,
)
from trainer.run import checkpoint as ckpt
from trainer.run.config import (
    RunConfig,
    check_world_size,
    describe_changes,
    record_changes,
    resolve_ds_config_path,
    save_resolved,
)
from trainer.run.faults import (
    RunProgress,
    StallReporter,
    exit_lost_peer,
    is_peer_failure,
    report_crash,
    stall_report_s,
)
from trainer.run.plan import plan_run
from trainer.run.steps import EXPERT_PARAMS, StopRequest, TrainLoop

NO_DECAY_MARKERS = ("embed", "norm", "bias", "router")


def build_model_config(config: RunConfig, data: PreparedData):
    from trainer.run.config import run_model_config

    model_config = run_model_config(config, data.vocab_size, eos_token_id=data.eos_token_id,
                                    bos_token_id=data.eos_token_id, pad_token_id=data.eos_token_id,
                                    experts_implementation=config.model.get("experts_implementation"))
    if data.vocab_size > model_config.vocab_size:
        raise UserError("data.tokenizer", f"has {data.vocab_size} tokens, more than the {model_config.vocab_size} "
                        f"embeddings of the model in model.init_from", "Use the model's own tokenizer.",
                        all_ranks=True)
    return model_config


def build_model(config: RunConfig, data: PreparedData):
    """Same weights on every rank (seeded), hash tables fit from the training split's token counts; or the model
    folder of model.init_from as it is."""
    from models import HashMoEForCausalLM
    from models.routing import HashRouter

    torch.manual_seed(config.run.seed)
    model_config = build_model_config(config, data)
    if config.model.get("init_from"):
        # the folder's model as it is, hash tables included: its experts were trained on (or copied for) them
        model = load_init_model(config.model["init_from"], model_config)
    else:
        model = HashMoEForCausalLM(model_config)
        fitted_from_counts = "hash" in model.config.routers and model.config.hash_function in \
            HashRouter.BALANCED_FUNCTIONS
        if model.config.is_moe and fitted_from_counts:
            model.fit_hash_tables(token_counts=data.train_token_counts)
    if config.model.get("gradient_checkpointing"):
        # Before parallelize(): the expert-parallel MoE replaces each block's FFN, and the block (a
        # GradientCheckpointingLayer) is what is recomputed, all-to-alls included, on every rank alike.
        model.gradient_checkpointing_enable()
    return model


def load_init_model(folder: str, model_config):
    """The weights of the hashmoe model folder `folder` (model.init_from) in a model of `model_config` (the
    folder's config with the run's overrides), in fp32: every saved tensor must fill the model exactly."""
    from models import HashMoEForCausalLM

    try:
        model, info = HashMoEForCausalLM.from_pretrained(folder, config=model_config, dtype=torch.float32,
                                                         output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as error:
        raise UserError("model.init_from", f"could not load {folder}: {' '.join(str(error).split())[:300]}",
                        "Point it at a model folder written by hashmoe export, convert or upcycle, and change no "
                        "model field that shapes a weight.", all_ranks=True) from None
    problems = {kind: info.get(kind) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
                if info.get(kind)}
    if problems:
        raise UserError("model.init_from", f"{folder} does not fill the run's model: "
                        + "; ".join(f"{kind} {sorted(map(str, keys))[:3]}" for kind, keys in problems.items()),
                        "Change no model field that shapes a weight (experts, widths, layers) over the folder's "
                        "config.", all_ranks=True)
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay on weight matrices only; DeepSpeed splits the expert parameters out of these groups itself
    (it needs a 'name' on each group)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or any(m in name for m in NO_DECAY_MARKERS) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def deepspeed_config(config: RunConfig) -> dict:
    ds = json.loads(resolve_ds_config_path(config.parallel.ds_config).read_text())
    optim = config.optim
    ds["train_micro_batch_size_per_gpu"] = optim.micro_batch_size
    ds["gradient_accumulation_steps"] = optim.grad_accum
    ds["gradient_clipping"] = optim.grad_clip
    params = dict(ds.get("optimizer", {}).get("params", {}))
    if optim.optimizer == "sgd":
        params.pop("torch_adam", None)
        ds["optimizer"] = {"type": "SGD", "params": {**params, "lr": optim.lr}}
    else:
        ds["optimizer"] = {"type": "AdamW", "params": {**params, "lr": optim.lr, "betas": list(optim.betas),
                                                       "weight_decay": optim.weight_decay}}
    return ds


def lr_factor(config: RunConfig, step: int) -> float:
    optim = config.optim
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, optim.max_steps - optim.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if optim.schedule == "cosine" else 1 - progress
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * shape


def prepare_on_rank0(config: RunConfig, env: ProcessEnv) -> PreparedData:
    """Rank 0 opens the data store, or builds it while the other ranks wait on the file system, reading its
    heartbeat, not at a collective whose timeout would end the job during a long preparation. Every rank reads
    the store rank 0 names (a node whose copies of the files differ in mtime still reads rank 0's). Then every
    rank says whether it has the data: one error (rank 0's own first, else the first failing rank's, such as a
    store rank 0 found but another rank cannot see) is printed once and every rank exits with it."""
    from trainer.data.store import StorePaths

    data, error = None, None
    target, failure_before, present = None, None, False
    try:
        if env.is_main:
            paths = store_paths(config.data, config.run.seed)
            target, present = str(paths.target), paths.complete()
    except Exception as err:  # noqa: BLE001 - any failure must reach the all_gather below, or the others wait
        error = describe_failure(err)
    box = [(target, present)]
    dist.broadcast_object_list(box, src=0)
    target, present = box[0]
    try:
        if target is not None:
            paths = StorePaths(Path(target))
            failure_before = paths.failure()  # read before rank 0 may start a build that replaces it
            if env.is_main:
                data = prepare_data(config.data, config.run.seed, config.run_dir, progress=config.logging.progress)
            else:
                data = prepare_data(config.data, config.run.seed, None, is_main=False, wait=not present,
                                    failure_before=failure_before, paths=paths)
    except Exception as err:  # noqa: BLE001 - as above
        error = describe_failure(err)
        if env.is_main and not present:
            paths.record_failure(f"{error[0]}: {error[1]}")  # the waiting ranks stop waiting
    errors = [None] * env.world_size
    dist.all_gather_object(errors, error)
    failed = [(rank, found) for rank, found in enumerate(errors) if found is not None]
    if failed:
        rank, (key, problem, fix) = failed[0]
        raise UserError(key, problem + (f" (on rank {rank})" if rank else ""), fix, all_ranks=True)
    return data


def describe_failure(err: Exception) -> tuple[str, str, str]:
    if isinstance(err, UserError):
        return err.key, err.problem, err.fix
    if os.environ.get("HASHMOE_DEBUG") == "1":
        import traceback

        traceback.print_exc()
    return "data", f"preparing the data failed: {type(err).__name__}: {err}", "Run with --debug for the traceback"


def train(config: RunConfig, resume: bool = False, allow_config_change: bool = False, on_finish=None) -> dict:
    """Train the run; `on_finish(engine)` (optional) is called on every rank after the last step, for
    inspection by tools and tests. A collective that fails because another rank stopped answering ends this
    process with trainer.run.faults.EXIT_PEER_LOST."""
    started = time.perf_counter()  # the command's wall clock (time/elapsed_s): set-up, evaluation, saving included

    env = resolve_env()
    stop = StopRequest(announce=env.is_main)
    check_world_size(config, env.world_size)
    timeout_s = config.parallel.collective_timeout_s
    backend = init_distributed(env, timeout_s)
    progress = RunProgress()
    held = []  # rank 0: the run folder's lock, taken before anything is written
    try:
        on_rank0(lambda: held.append(take_run_folder(config.run_dir)))
        stop.folder_lock = held[0] if held else None
        return _train(config, env, backend, stop, progress, started, resume, allow_config_change, on_finish)
    except Exception as err:
        if env.world_size > 1 and is_peer_failure(err):
            for lock in held:
                lock.release()
            exit_lost_peer(err, env.rank, env.world_size, progress, config.run_dir, timeout_s)
        if env.world_size > 1 and not isinstance(err, UserError):
            report_crash(env.rank)
        raise
    finally:
        for lock in held:
            lock.release()


def take_run_folder(run_dir: Path):
    """This run's hold on its folder: its own lock, or, on a rank of `hashmoe launch`, the launcher's."""
    from trainer.run.run_lock import TOKEN_ENV, RunFolderLock

    token = os.environ.get(TOKEN_ENV)
    return RunFolderLock.adopt(run_dir, token) if token else RunFolderLock.acquire(run_dir)


def _train(config: RunConfig, env: ProcessEnv, backend: str, stop: StopRequest, progress: RunProgress,
           started: float, resume: bool, allow_config_change: bool, on_finish) -> dict:
    import deepspeed

    from trainer.parallel.expert_parallel import check_expert_groups, parallelize

    run_dir = config.run_dir
    plan = on_rank0(lambda: plan_run(config, resume, allow_config_change))
    if env.is_main:
        for warning in plan.warnings:
            print(f"hashmoe: warning: {warning}; using {plan.checkpoint or 'no checkpoint (a new run)'} instead "
                  "(nothing was deleted)",
                  file=sys.stderr, flush=True)
    if plan.finished is not None:
        return plan.finished
    if env.is_main:
        if env.world_size > 1:
            print(f"hashmoe: {env.world_size} ranks ({env.launcher}), rendezvous {env.rendezvous}, {backend}",
                  flush=True)
        warn_gpu_config_on_cpu(config)
    data = prepare_on_rank0(config, env)
    model = build_model(config, data)
    counts = model.parameter_counts()
    model_config = model.config
    with groups_inherit_timeout():  # DeepSpeed's expert and data-parallel groups, made in here
        parallelize(model, config.parallel.ep_size, env.rank)
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, config.optim.weight_decay),
            config=deepspeed_config(config),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(config, s)))
    check_expert_groups(engine.module, env.rank)

    start_step = plan.start_step
    if plan.checkpoint is not None:
        previous, state = plan.checkpoint, plan.state
        # DeepSpeed's own optimizer files index parameters by position: usable only for the same layout and the
        # same expert parameters (checkpoints before the one expert bank held one module per slot; their moments
        # come by name instead, as at a new layout)
        same_layout = (state["world_size"] == env.world_size and state["ep_size"] == config.parallel.ep_size
                       and state.get("expert_params") == EXPERT_PARAMS)
        moments = ckpt.load_checkpoint(engine, previous, env.rank, same_layout)
        if env.is_main:
            restored = "optimizer moments restored by name" if moments else (
                "optimizer moments reset (DeepSpeed cannot re-shard ZeRO-1/2 MoE optimizer state)")
            layout = (f"at a new layout (world {state['world_size']}->{env.world_size}, ep_size "
                      f"{state['ep_size']}->{config.parallel.ep_size})"
                      if (state["world_size"], state["ep_size"]) != (env.world_size, config.parallel.ep_size)
                      else "written with one module per expert (an earlier hashmoe)")
            note = "" if same_layout else f" {layout}: weights, schedule and data position restored, {restored}"
            changed = f"; from here on {describe_changes(plan.changes)}" if plan.changes else ""
            print(f"hashmoe: resuming from {previous} (step {start_step}){note}{changed}", flush=True)
    if env.is_main:  # training starts here: the run folder's record now describes this run
        save_resolved(config, run_dir)
        if plan.changes:
            record_changes(run_dir, plan.changes, start_step)

    loop = TrainLoop(config, env, engine, data, model_config, counts, stop, progress)
    # a resumed run's clock goes on from what its checkpoint had used (time after that checkpoint is lost)
    loop.elapsed_before = plan.state.get("elapsed_seconds", 0.0) + (loop.created - started)
    reporter = StallReporter(progress, stall_report_s(config.parallel.collective_timeout_s)) if env.is_main else None
    try:
        summary = loop.run(start_step)
    finally:
        if reporter is not None:
            reporter.stop()
    if on_finish is not None:
        on_finish(engine)
    if summary["stopped_early"]:
        requeue = summary["requeue"] and env.slurm_job_id is not None
        summary["requeued"] = requeue
        if env.is_main:  # now: a requeue ends the job at once
            print(stopped_line(summary), flush=True)
        if requeue:
            from trainer.parallel.slurm_env import requeue_job

            dist.barrier()  # every rank is done writing
            if env.is_main:
                requeue_job(env.slurm_job_id)
    return summary


def stopped_line(summary: dict) -> str:
    ppl = summary["valid_ppl"]
    how = "requeueing the Slurm job to resume from it" if summary.get("requeued") else (
        "run the same command again to resume")
    return (f"hashmoe: stopped at step {summary['step']}" + (f", valid ppl {ppl:.2f}" if ppl is not None else "")
            + f", checkpoint saved; {how}")


def warn_gpu_config_on_cpu(config: RunConfig) -> None:
    """A GPU DeepSpeed config (bf16/fp16) runs on CPU too, slowly and in another precision than intended."""
    if torch.cuda.is_available():
        return
    ds = json.loads(resolve_ds_config_path(config.parallel.ds_config).read_text())
    half = [k for k in ("bf16", "fp16") if ds.get(k, {}).get("enabled")]
    if half:
        print(f"hashmoe: warning: parallel.ds_config={config.parallel.ds_config} is a GPU config ({half[0]}) but no "
              "GPU is visible: training on CPU in that precision. Use parallel.ds_config=cpu here.",
              file=sys.stderr, flush=True)



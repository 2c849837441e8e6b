"""The optimizer steps of a run: what every rank does per step (forward, backward, step, the router biases),
the metrics window, evaluation and checkpoints at their steps, and the signals and run-folder check every
rank agrees on after each step (StopRequest)."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.data.schedule import BatchSchedule, MixtureSchedule, valid_shard
from trainer.data.tasks import answer_errors, far_errors
from trainer.errors import UserError
from trainer.parallel.distributed import (
    collective_device,
)
from trainer.run import checkpoint as ckpt
from trainer.run.faults import (
    RunProgress,
)
from trainer.run.metrics import MetricsWriter, StepTimer, load_cv, peak_flops, peak_memory_mib

# How a rank's expert weights are held, recorded in each checkpoint: one bank per layer (LocalExperts).
EXPERT_PARAMS = "bank"


def flops_per_token(model_config, counts: dict, seq_len: int) -> float:
    """Training FLOPs per token on *active* parameters: 6N plus attention's 12 * L * d * seq (nanoGPT's
    estimate_mfu, Kaplan et al. 2020 appendix)."""
    # frozen units cost forward and input-gradient matmuls (4 FLOPs per weight) but no weight gradient
    trained = counts["active_non_embedding"] - counts["frozen"]
    per_pass = 6 * trained + 4 * counts["frozen"] + 12 * model_config.num_hidden_layers * model_config.hidden_size * seq_len
    return per_pass * model_config.passes_per_token  # a ladder/staircase runs the stack K times per token


class StopRequest:
    """SIGUSR1 (Slurm's warning before the time limit or a preemption), SIGTERM (scancel, the time limit
    itself) and SIGINT (Ctrl-C): finish the step, checkpoint, exit. Only SIGUSR1 asks for a requeue under
    Slurm; SIGTERM and SIGINT mean "stop" (a user's scancel must not come back). A second Ctrl-C exits at once,
    without a checkpoint (the previous one stays intact: checkpoints are renamed into place). Installed before
    the process group starts, so a signal that arrives during start-up still ends with a checkpoint."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
    FOLDER_CHECK_S = 15.0  # between writes, rank 0 reads the run folder's lock this often

    def __init__(self, announce: bool = True):
        self.received = torch.zeros(len(self.SIGNALS) + 1)  # 1 where that signal arrived on this rank; last: lost
        self.agreed_flags = torch.zeros(len(self.SIGNALS) + 1)  # the same, over all ranks, at the last agreed()
        self.announce = announce  # rank 0 says what a Ctrl-C does
        self.folder_lock = None  # rank 0: the run folder's lock, read before every write
        self.lost_folder: str | None = None  # who took the folder (rank 0)
        self.folder_checked_at = time.monotonic()
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        index = self.SIGNALS.index(signum)
        if signum == signal.SIGINT and self.received[index]:
            print("\nhashmoe: second interrupt: exiting without a checkpoint (the last saved one is intact)",
                  file=sys.stderr, flush=True)
            if self.folder_lock is not None:
                self.folder_lock.release()
            os._exit(130)
        self.received[index] = 1.0
        if signum == signal.SIGINT and self.announce:
            print("\nhashmoe: interrupt: finishing the step and saving a checkpoint (Ctrl-C again to exit at once)",
                  file=sys.stderr, flush=True)

    def agreed(self, writes_next: bool = True) -> bool:
        """Collective: every rank learns which signals any rank received, and whether the run folder is still
        this run's (rank 0 reads its lock when a write comes next, else every FOLDER_CHECK_S); all stop at the
        same step."""
        if self.folder_lock is not None and self.lost_folder is None and (
                writes_next or self.received.any() or time.monotonic() - self.folder_checked_at > self.FOLDER_CHECK_S):
            self.lost_folder = self.folder_lock.lost()
            self.folder_checked_at = time.monotonic()
            self.received[-1] = float(self.lost_folder is not None)
        # A copy: the handler may fire during the all_reduce, and every rank must decide on the same values.
        flags = self.received.clone().to(collective_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.agreed_flags = flags.cpu()  # one small read per step: every rank must decide on the same values
        return bool(self.agreed_flags.any())

    @property
    def requeue(self) -> bool:
        """Call after agreed(): preempted (USR1) and nobody asked to stop for good (TERM, INT)."""
        return bool(self.agreed_flags[0]) and not bool(self.agreed_flags[1:].any())

    @property
    def interrupted(self) -> bool:
        return bool(self.agreed_flags[2])

    def raise_if_folder_lost(self, run_dir: Path) -> None:
        """After agreed(): another run took the folder while this one was paused: exit, writing nothing."""
        if self.agreed_flags[-1]:
            raise UserError("run.output_dir", f"{run_dir} is no longer this run's: {self.lost_folder}; this run "
                            "stopped without writing anything more", "Let that run go on (it resumes from the last "
                            "checkpoint), or train into another folder with --output DIR", all_ranks=True)


class TrainLoop:
    def __init__(self, config, env, engine, data, model_config, counts, stop: StopRequest | None = None,
                 progress: RunProgress | None = None):
        self.config, self.env, self.engine, self.data = config, env, engine, data
        self.progress = progress or RunProgress()
        self.counts = counts
        self.model_config_dict = json.loads(model_config.to_json_string())
        optim = config.optim
        per_rank = optim.micro_batch_size * optim.grad_accum
        if data.mixture:
            self.schedule = MixtureSchedule([len(part) for part in data.train_blocks.parts],
                                            [weight for _, weight in data.mixture], per_rank, env.rank,
                                            env.world_size, config.run.seed)
        else:
            self.schedule = BatchSchedule(len(data.train_blocks), per_rank, env.rank, env.world_size, config.run.seed)
        self.balances_router_bias = bool(getattr(model_config, "router_bias_update_rate", 0))
        self.tokens_per_step = env.world_size * optim.micro_batch_size * optim.grad_accum * config.data.seq_len
        self.flops_per_token = flops_per_token(model_config, counts, config.data.seq_len)
        self.device = next(engine.module.parameters()).device
        self.peak_flops = peak_flops(self.device)
        self.num_moe_layers = len(model_config.moe_layers)
        self.num_experts = model_config.num_experts
        self.metrics: MetricsWriter | None = None  # opened by run(), which knows the step it resumes from
        self.elapsed_before = 0.0  # wall seconds before this loop started: set-up, and earlier commands' share
        self.created = time.perf_counter()
        self.stop = stop or StopRequest()
        self.reset_window()

    def reset_window(self):
        # On the model's device: a micro-step adds to them without reading anything back to the host (a GPU would
        # stall on every .item()); window_metrics reads them once per logging step.
        device = self.engine.device
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)  # lm loss, aux loss, dropped, routes, micro steps
        self.load = torch.zeros(self.num_moe_layers, self.num_experts, dtype=torch.float64, device=device)
        self.load_chosen = torch.zeros_like(self.load)  # before capacity
        self.grad_norms = torch.zeros(3, dtype=torch.float64, device=device)  # sum, max, optimizer steps

    def run(self, start_step: int) -> dict:
        config, engine = self.config, self.engine
        max_steps = config.optim.max_steps
        timer = StepTimer()
        self.metrics = MetricsWriter(config.run_dir, self.env.is_main, config.logging.tensorboard,
                                     resume_step=start_step)
        progress = None
        if self.env.is_main and config.logging.progress:
            from tqdm import tqdm

            progress = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if start_step == 0 and self.env.is_main:
            self.metrics.log(0, {f"params/{k}": v for k, v in self.counts.items()} |
                             {"train/flops_per_token": self.flops_per_token})
        last_valid = None
        step = start_step
        engine.train()
        timer.resume()
        self.progress.step_finished(step)
        every = config.checkpoint.every
        while step < max_steps:
            self.progress.set(f"during step {step + 1}")
            self.train_step(step)
            step += 1
            self.progress.step_finished(step)
            if self.data.mixture:
                self.announce_new_epochs(step)
            timer.steps += 1
            writes_next = (step % config.logging.log_every == 0 or step % config.logging.eval_every == 0
                           or (every and step % every == 0) or step == max_steps)
            stop = self.stop.agreed(writes_next)
            self.stop.raise_if_folder_lost(config.run_dir)
            is_last = step == max_steps or stop
            if step % config.logging.log_every == 0 or is_last:
                seconds, steps = timer.window()
                row = self.window_metrics(step, seconds, steps)
                if progress is not None:
                    progress.set_postfix(loss=f"{row['train/loss']:.3f}", upd_s=f"{row['train/updates_per_sec']:.2f}")
            if step % config.logging.eval_every == 0 or is_last:
                timer.pause()
                self.progress.set(f"during the evaluation at step {step}")
                last_valid = self.evaluate(step)
                timer.resume()
            if (every and step % every == 0) or is_last:
                timer.pause()
                self.progress.set(f"while saving checkpoint step_{step}")
                ckpt.save_checkpoint(engine, config.run_dir, step, self.checkpoint_state(), config.checkpoint.keep,
                                     self.env.rank)
                timer.resume()
            if progress is not None:
                progress.update(1)
            if stop:
                break
        if progress is not None:
            progress.close()
        self.metrics.close()
        stopped = step < max_steps
        summary = {"step": step, "stopped_early": stopped, "requeue": stopped and self.stop.requeue,
                   "interrupted": stopped and self.stop.interrupted,
                   "valid_loss": last_valid,
                   "valid_ppl": math.exp(last_valid) if last_valid is not None else None,
                   "run_dir": str(config.run_dir), "tensorboard": str(config.run_dir / "tb")}
        if self.env.is_main:
            (config.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def checkpoint_state(self) -> dict:
        return {"world_size": self.env.world_size, "ep_size": self.config.parallel.ep_size,
                "num_experts": self.num_experts, "data_fingerprint": self.data.fingerprint,
                "model_config": self.model_config_dict, "expert_params": EXPERT_PARAMS,
                "elapsed_seconds": self.elapsed_seconds()}

    def elapsed_seconds(self) -> float:
        """Wall seconds of the whole run so far (every command that trained it, up to its last checkpoint)."""
        return self.elapsed_before + time.perf_counter() - self.created

    def train_step(self, step: int) -> None:
        engine = self.engine
        indices = self.schedule.indices(step)
        blocks = self.data.train_blocks[indices]
        # Tasks score only their answer tokens; text scores every next token.
        labels = blocks if self.data.train_labels is None else self.data.train_labels[indices]
        for micro, micro_labels in zip(blocks.chunk(self.config.optim.grad_accum),
                                       labels.chunk(self.config.optim.grad_accum)):
            out = engine(micro, labels=micro_labels, use_cache=False)
            engine.backward(out.loss)
            boundary = engine.is_gradient_accumulation_boundary()
            partitioned = engine.zero_optimization_stage() > 0
            if boundary and not partitioned:
                self.add_grad_norm(self.local_grad_norm())
            engine.step()
            if boundary and partitioned:
                # ZeRO-1/2 moved the gradients into its partitions during backward and computed the norm itself
                self.add_grad_norm(engine.get_global_grad_norm())
            if boundary and self.balances_router_bias:
                # every rank's choices, so each rank applies the same bias update (one all-reduce per step)
                self.engine.module.update_router_biases(dist.all_reduce)
            dropped = torch.as_tensor(out.dropped_tokens, device=self.sums.device)
            routes = sum((load.sum() for load in out.expert_load), dropped)
            self.sums += torch.stack([t.detach().to(self.sums.device, torch.float64) for t in
                                      (out.lm_loss, out.aux_loss, dropped, routes, torch.ones((), device=dropped.device))])
            for i, (load, chosen) in enumerate(zip(out.expert_load, out.expert_load_chosen)):
                self.load[i] += load.detach().to(self.load.device, torch.float64)
                self.load_chosen[i] += chosen.detach().to(self.load.device, torch.float64)

    def local_grad_norm(self) -> torch.Tensor | None:
        """This rank's gradient 2-norm before clipping, on the device: DeepSpeed computes it to clip in fp32 stage
        0 but does not keep it. Ranks differ only by their experts' gradients; the window reports the mean over
        ranks, which is the norm DeepSpeed's clipping uses."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).double()) if grads else None

    def add_grad_norm(self, norm: torch.Tensor | float | None) -> None:
        if norm is None:
            return
        norm = torch.as_tensor(norm, dtype=torch.float64).to(self.grad_norms.device)
        self.grad_norms += torch.stack([norm, torch.zeros_like(norm), torch.ones_like(norm)])
        self.grad_norms[1] = torch.maximum(self.grad_norms[1], norm)

    def announce_new_epochs(self, step: int) -> None:
        """A mixture source whose blocks have all been drawn starts a fresh order: say so (rank 0), once."""
        before, now = self.schedule.epochs(step - 1), self.schedule.epochs(step)
        if self.env.is_main:
            for (name, _), old, new in zip(self.data.mixture, before, now):
                if new > old:
                    print(f"hashmoe: data source {name} ran out at step {step}: it starts epoch {new + 1} "
                          "(a fresh order of its blocks)", flush=True)

    def window_metrics(self, step: int, seconds: float, steps: int) -> dict:
        # One all-reduce and one read-back for the window's sums; the max grad norm is summed over ranks too and
        # divided below like the mean's.
        packed = torch.cat([self.sums, self.grad_norms, self.load.flatten(), self.load_chosen.flatten()])
        dist.all_reduce(packed)
        sums, grad_norms, loads = packed.cpu().split([len(self.sums), len(self.grad_norms), 2 * self.load.numel()])
        load, load_chosen = loads.view(2, *self.load.shape)
        lm_loss = (sums[0] / sums[4]).item()
        row = {"train/loss": lm_loss, "train/ppl": math.exp(min(lm_loss, 50.0)),
               "train/updates_per_sec": steps / seconds if seconds > 0 else float("nan"),
               "train/tokens_per_sec": steps * self.tokens_per_step / seconds if seconds > 0 else float("nan"),
               "train/lr": self.engine.get_lr()[0], "moe/aux_loss": (sums[1] / sums[4]).item()}
        row["train/flops_per_sec"] = row["train/tokens_per_sec"] * self.flops_per_token
        row["time/elapsed_s"] = self.elapsed_seconds()
        if self.data.mixture:  # epochs of each source so far: its share of the blocks drawn, over its size
            drawn = self.schedule.drawn(step * self.schedule.global_batch_size)
            for (name, _), count, blocks in zip(self.data.mixture, drawn, self.schedule.source_blocks):
                row[f"data/epochs/{name}"] = float(count / blocks)
        if grad_norms[2] > 0:
            ranks = self.env.world_size
            row["train/grad_norm"] = (grad_norms[0] / grad_norms[2]).item()
            row["train/grad_norm_max"] = (grad_norms[1] / ranks).item()  # the ranks' mean of their largest
        if self.peak_flops is not None:
            row["train/mfu"] = row["train/flops_per_sec"] / (self.env.world_size * self.peak_flops)
        peak = torch.tensor([peak_memory_mib(self.device)], device=collective_device())
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        row["memory/peak_rank_mib"] = peak.item()  # the largest over ranks
        if self.config.parallel.ep_size > 1 and seconds > 0:
            # The dispatcher's all-to-alls, timed where they are called; includes waiting for slower ranks,
            # which is what an imbalanced routing costs.
            from trainer.parallel.expert_parallel import expert_parallel_layers

            comm = sum(layer.comm_timer.seconds for _, layer in expert_parallel_layers(self.engine.module))
            for _, layer in expert_parallel_layers(self.engine.module):
                layer.comm_timer.seconds = 0.0
            row["time/all_to_all_frac"] = comm / seconds
        if self.num_moe_layers:
            row["moe/dropped_frac"] = (sums[2] / sums[3]).item() if sums[3] > 0 else 0.0
            row["moe/load_cv"] = sum(load_cv(layer) for layer in load) / self.num_moe_layers
            row["moe/load_cv_chosen"] = sum(load_cv(layer) for layer in load_chosen) / self.num_moe_layers
            for i, layer in enumerate(load):
                self.metrics.histogram(step, f"moe/expert_load/layer_{i}", layer)
                self.metrics.histogram(step, f"moe/expert_load_chosen/layer_{i}", load_chosen[i])
        self.metrics.log(step, row)
        self.reset_window()
        return row

    @torch.no_grad()
    def evaluate(self, step: int) -> float:
        """Mean next-token loss over the validation set: the first `logging.eval_blocks` blocks of the split (all
        of them for 0), the same blocks whatever the world size, micro batch or ep_size, split over the ranks. All
        ranks run the same number of forward passes (expert all-to-alls are collective): short shares repeat a
        block, masked."""
        engine, optim = self.engine, self.config.optim
        engine.eval()
        count = self.config.logging.eval_blocks or len(self.data.valid_blocks)
        shard = valid_shard(self.data.valid_blocks, self.env.rank, self.env.world_size, count)
        longest = math.ceil(min(count, len(self.data.valid_blocks)) / self.env.world_size)
        real = torch.zeros(longest, dtype=torch.bool)
        real[: len(shard)] = True
        task = self.data.valid_labels is not None
        far = self.config.data.task_far
        if task:
            labels = valid_shard(self.data.valid_labels, self.env.rank, self.env.world_size, count)
            units = valid_shard(self.data.valid_units, self.env.rank, self.env.world_size, count)
            if far:
                lookback = valid_shard(self.data.valid_lookback, self.env.rank, self.env.world_size, count)
        if len(shard) < longest:
            pad = longest - len(shard)
            shard = torch.cat([shard, self.data.valid_blocks[:1].expand(pad, -1)])
            if task:
                labels = torch.cat([labels, labels.new_full((pad, labels.shape[1]), -100)])
                units = torch.cat([units, units.new_full((pad, units.shape[1]), -1)])
                if far:
                    lookback = torch.cat([lookback, lookback.new_full((pad, lookback.shape[1]), -1)])
        if not task:
            labels = units = shard
        totals = torch.zeros(8, dtype=torch.float64)  # loss sum, scored tokens, task answer counts, far answers
        for start in range(0, longest, optim.micro_batch_size):
            part = slice(start, start + optim.micro_batch_size)
            ids, mask, target = shard[part], real[part], labels[part]
            logits = engine(ids, use_cache=False).logits
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target[:, 1:].flatten(),
                                                       reduction="none", ignore_index=-100).view(len(ids), -1)
            scored = (target[:, 1:] != -100) & mask[:, None]
            totals[:2] += torch.tensor([losses[scored].sum().item(), float(scored.sum())], dtype=torch.float64)
            if task:
                totals[2:6] += answer_errors(logits[mask], target[mask], units[part][mask])
            if task and far:
                totals[6:] += far_errors(logits[mask], target[mask], lookback[part][mask], far)
        totals = totals.to(engine.device)  # NCCL reduces device tensors only
        dist.all_reduce(totals)
        totals = totals.cpu()
        engine.train()
        valid_loss = (totals[0] / totals[1]).item()
        row = {"valid/loss": valid_loss, "valid/ppl": math.exp(min(valid_loss, 50.0))}
        if task:  # share of answer tokens / whole answers predicted wrong (greedy)
            row.update({"valid/token_error": (totals[2] / totals[3]).item(),
                        "valid/exact_match_error": (totals[4] / totals[5]).item()})
        if task and far and totals[7]:  # answers whose position no span of `far` tokens shows
            row["valid/far_error"] = (totals[6] / totals[7]).item()
        self.metrics.log(step, row)
        self.metrics.flush()
        return valid_loss

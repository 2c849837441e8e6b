"""One rank of an HF `Trainer` run of a hashmoe run config, experts sharded with `trainer.hf.shard_experts`:
the same model (built as `hashmoe train` builds it), the same blocks per rank and step (hashmoe's BatchSchedule),
the same optimizer settings. Writes the per-step losses the Trainer logged."""

import json
import sys

import deepspeed
import deepspeed.ops
import torch
import torch.distributed as dist
from transformers import Trainer, TrainingArguments

from trainer.data import BatchSchedule, prepare_data
from trainer.hf import RouterBiasUpdate, deepspeed_config, shard_experts
from trainer.parallel.distributed import shutdown_distributed
from trainer.run.config import load_config
from trainer.run.loop import build_model


class FixedOrderTrainer(Trainer):
    """The Trainer with the batches given, in order, on this rank (instead of its own shuffled, sharded ones)."""

    def __init__(self, *args, micro_batches, **kwargs):
        super().__init__(*args, **kwargs)
        self.micro_batches = micro_batches

    def get_train_dataloader(self):
        return torch.utils.data.DataLoader(self.micro_batches, batch_size=None)


def main(config_path: str, out_path: str) -> None:
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    config = load_config(config_path)
    data = prepare_data(config.data, config.run.seed, is_main=False)  # the hashmoe run prepared the cache
    model = shard_experts(build_model(config, data), config.parallel.ep_size)
    optim = config.optim
    schedule = BatchSchedule(len(data.train_blocks), optim.micro_batch_size, rank, world, config.run.seed)
    micro_batches = []
    for step in range(optim.max_steps):
        blocks = schedule.batch(data.train_blocks, step)
        micro_batches.append({"input_ids": blocks, "labels": blocks})
    args = TrainingArguments(
        output_dir=out_path + ".trainer", per_device_train_batch_size=optim.micro_batch_size, max_steps=optim.max_steps,
        learning_rate=optim.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=optim.betas[0], adam_beta2=optim.betas[1], adam_epsilon=1e-8, max_grad_norm=optim.grad_clip,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=config.run.seed,
        deepspeed=deepspeed_config())
    trainer = FixedOrderTrainer(model=model, args=args, micro_batches=micro_batches, callbacks=[RouterBiasUpdate()])
    trainer.train()
    if rank == 0:
        losses = {row["step"]: row["loss"] for row in trainer.state.log_history if "loss" in row}
        with open(out_path, "w") as f:
            json.dump(losses, f)
    shutdown_distributed()  # without it, a peer aborted at exit about 1 run in 3 (see the function)


if __name__ == "__main__":
    main(*sys.argv[1:])

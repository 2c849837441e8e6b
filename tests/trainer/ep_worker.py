"""Run `hashmoe train` in-process on each rank (the CLI's own path), then save this rank's module state so
the test can compare what the ranks hold."""

import os
import sys

import torch

from trainer.config import load_config
from trainer.distributed import shutdown_distributed
from trainer.loop import train


def main(config_path: str, dump_dir: str) -> None:
    def dump(engine):
        torch.save(engine.module.state_dict(), os.path.join(dump_dir, f"rank_{os.environ['RANK']}.pt"))

    train(load_config(config_path), on_finish=dump)
    shutdown_distributed()  # as the CLI does


if __name__ == "__main__":
    main(*sys.argv[1:])

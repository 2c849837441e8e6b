"""Run `hashmoe train` in-process on each rank (the CLI's own path), then save this rank's module state so
the test can compare what the ranks hold, and the timeout of every process group this rank is in."""

import json
import os
import sys

import torch

from trainer.parallel.distributed import shutdown_distributed
from trainer.run.config import load_config
from trainer.run.loop import train


def main(config_path: str, dump_dir: str) -> None:
    def dump(engine):
        from torch.distributed import distributed_c10d

        from trainer.parallel.distributed import group_timeout

        rank = os.environ["RANK"]
        torch.save(engine.module.state_dict(), os.path.join(dump_dir, f"rank_{rank}.pt"))
        timeouts = {f"{distributed_c10d._get_process_group_name(group)} {distributed_c10d.get_process_group_ranks(group)}":
                    group_timeout(group).total_seconds() for group in distributed_c10d._world.pg_map}
        with open(os.path.join(dump_dir, f"group_timeouts_{rank}.json"), "w") as f:
            json.dump(timeouts, f)

    train(load_config(config_path), on_finish=dump)
    shutdown_distributed()  # as the CLI does


if __name__ == "__main__":
    main(*sys.argv[1:])

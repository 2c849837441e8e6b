"""Run `hashmoe train` in this process and record every read of a tensor's value back to the host (.item(),
bool(), int(), float(), .tolist()) made by hashmoe's own code while a training micro-step runs: on a GPU each
one stalls the step. Writes {"reads": ["file:line in function", ...]} to argv[2]."""

import json
import sys
import traceback
from pathlib import Path

import torch

from trainer.parallel.distributed import shutdown_distributed
from trainer.run.config import load_config
from trainer.run.loop import train

ROOT = Path(__file__).resolve().parents[2]
OURS = (str(ROOT / "models"), str(ROOT / "trainer"))
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


def steady_step() -> bool:
    """Inside TrainLoop.train_step, after the first step (which may check things once, e.g. that a hash table
    was fitted)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "train_step" and frame.f_code.co_filename.endswith("trainer/run/steps.py"):
            return frame.f_locals.get("step", 0) > 0
        frame = frame.f_back
    return False


def main(config_path: str, out_path: str) -> None:
    seen = []

    def watch(name, original):
        def wrapper(self, *args, **kwargs):
            caller = traceback.extract_stack()[-2]
            if steady_step() and caller.filename.startswith(OURS):
                seen.append(f"{Path(caller.filename).relative_to(ROOT)}:{caller.lineno} in {caller.name} ({name})")
            return original(self, *args, **kwargs)
        return wrapper

    for name in READS:
        setattr(torch.Tensor, name, watch(name, getattr(torch.Tensor, name)))
    train(load_config(config_path))
    shutdown_distributed()
    Path(out_path).write_text(json.dumps({"reads": sorted(set(seen))}))


if __name__ == "__main__":
    main(*sys.argv[1:])

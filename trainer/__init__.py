"""hashmoe trainer: run configs, data, DeepSpeed expert parallelism, metrics, checkpoints, CLI."""

__version__ = "0.1.0"

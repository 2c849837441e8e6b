"""Run control: a run from its config to its folder — the training loop, the config and its record, checkpoints,
metrics, the run folder's lock and what happens when a rank stops answering.

May import: trainer.parallel, trainer.data, the shared leaves (trainer.errors, trainer.fileio), models."""

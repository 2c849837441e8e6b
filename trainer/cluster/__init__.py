"""Starting runs: `hashmoe launch` (local ranks) and `hashmoe slurm` (batch jobs).

May import: trainer.run, trainer.parallel, trainer.data, the shared leaves, models."""

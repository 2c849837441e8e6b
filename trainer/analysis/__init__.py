"""Reading finished runs: `hashmoe compare` and the grouping of seeds.

May import: trainer.run, trainer.parallel, trainer.data, the shared leaves, models."""

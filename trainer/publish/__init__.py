"""Models out of and into hashmoe: export to one HF folder, the model card, the Hub, and the conversion and
upcycling of pretrained checkpoints (they write model folders, as export does).

May import: trainer.analysis, trainer.run, trainer.parallel, trainer.data, the shared leaves, models."""

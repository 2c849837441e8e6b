"""Processes and expert parallelism: who each process is (rank, launcher, rendezvous), the process groups and
their timeout, the expert-parallel MoE layer on DeepSpeed and its token exchange.

May import: the shared leaves (trainer.errors, trainer.fileio), models."""

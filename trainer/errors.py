"""Errors a user can fix: printed as one paragraph naming the key and the fix, exit code 2, no traceback."""

from __future__ import annotations

import os


class UserError(Exception):
    """`key` is the config key, file or option at fault (e.g. "parallel.ep_size", "data.train_files")."""

    def __init__(self, key: str, problem: str, fix: str, all_ranks: bool = False):
        self.key, self.problem, self.fix = key, problem, fix
        self.all_ranks = all_ranks  # raised on every rank alike (decided on rank 0): only rank 0 prints it
        super().__init__(f"{key}: {problem}. {fix}")


EXIT_USER_ERROR = 2


def debug_enabled() -> bool:
    """`hashmoe --debug`: tracebacks and DeepSpeed's own messages (inherited by the ranks `hashmoe launch` starts)."""
    return os.environ.get("HASHMOE_DEBUG") == "1"

"""Small files of a run folder (config.yaml, metrics.jsonl after a restart, a checkpoint's manifest and
`latest`) are written aside and renamed into place: a crash leaves the old file or the new one, never half."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

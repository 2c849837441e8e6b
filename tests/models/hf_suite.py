"""Import transformers' own common model tests from the sdist of the installed transformers release.

`scripts/setup.sh` fetches the sdist (`pip download --no-binary :all: --no-deps transformers==<installed>`) and
keeps its `tests/test_modeling_common.py` and `tests/test_configuration_common.py` in
`.cache/transformers-tests/<version>/` (or set HASHMOE_TRANSFORMERS_TESTS to such a folder). They are imported
as modules of a package `hf_upstream` whose path is that folder followed by tests/models/hf_upstream, where
the modules they import but the sdist lacks are (see its README).
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import transformers

REPO = Path(__file__).resolve().parents[2]
SHIMS = Path(__file__).resolve().parent / "hf_upstream"
FILES = ("test_modeling_common.py", "test_configuration_common.py")


def upstream_tests_dir() -> Path:
    version = transformers.__version__
    folder = Path(os.environ.get("HASHMOE_TRANSFORMERS_TESTS") or REPO / ".cache" / "transformers-tests" / version)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"transformers {version}'s common tests are not in {folder} (missing {', '.join(missing)}). "
            "Run `bash scripts/setup.sh` (it fetches them from the transformers sdist for every environment it "
            "builds), or point HASHMOE_TRANSFORMERS_TESTS at the sdist's tests/ folder.")
    return folder


def load_upstream():
    """(test_modeling_common, test_configuration_common) of the installed transformers release."""
    if "hf_upstream" not in sys.modules:
        package = types.ModuleType("hf_upstream")
        package.__path__ = [str(upstream_tests_dir()), str(SHIMS)]
        sys.modules["hf_upstream"] = package
    return (importlib.import_module("hf_upstream.test_modeling_common"),
            importlib.import_module("hf_upstream.test_configuration_common"))

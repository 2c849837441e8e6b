"""The README's 60-second example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    assert (tmp_path / "my-hash-moe" / "model.safetensors").exists()


TOOLS = ("hashmoe", "tensorboard", "torchrun", "deepspeed")


def readme_commands() -> list[str]:
    """Lines of bash (and unlabelled) code blocks, and inline code spans that are whole commands."""
    commands, fence = [], None
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            continue
        if fence in ("", "bash"):
            commands.append(line)
        elif fence is None:
            commands += [span for span in re.findall(r"`([^`]+)`", line)
                         if re.search(r"RUN\.yaml|recipes/| --[a-z]", span)]
    return commands


def test_readme_commands_call_the_tools_one_way():
    """A new user copies lines literally, without activating anything: every tool of the environment is
    called as .venv/bin/TOOL, in code blocks and in inline commands alike (prose may name the tool bare)."""
    bare = [line.strip() for line in readme_commands() for tool in TOOLS
            if re.search(rf"(?<![\w/.-]){tool} ", line.split("#")[0])]
    assert not bare, "call these through .venv/bin/:\n" + "\n".join(bare)
    text = README.read_text()
    assert "mpirun -np 2 .venv/bin/hashmoe train" in text
    assert ".venv/bin/tensorboard --logdir runs/tiny/tb" in text

"""Bad input, as a user meets it: each case runs the real `hashmoe` command in a fresh process and must exit 2
with one line naming the thing at fault and the fix, no traceback, and leave every earlier checkpoint and
record byte for byte as it was. The checkpoint cases damage a copy of one trained run folder."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hub_server import HubServer
from tests.trainer.harness import (
    ROOT,
    base_config,
    check,
    env_for_run,
    run,
    snapshot,
    train_command,
    write_config,
    write_corpus,
)

pytestmark = pytest.mark.slow  # a process per case, and a training run


@dataclass
class Case:
    """What a case's set-up hands back: the command's arguments, and the folder whose record must survive."""

    argv: list[str]
    keep: Path | None = None  # a run folder that must come out unchanged
    env: dict | None = None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A corpus, and a finished run folder with two checkpoints (step_2, step_4) to copy."""
    root = tmp_path_factory.mktemp("world")
    corpus = write_corpus(root)
    trained = root / "trained"
    config = base_config(trained, corpus, root / "cache", optim__max_steps=4, checkpoint__every=2,
                         logging__eval_every=2)
    check(run(train_command(write_config(root / "trained.yaml", config), 1)))
    return root, corpus, trained


class Ctx:
    def __init__(self, world, tmp_path: Path):
        self.root, self.corpus, self.trained = world
        self.tmp = tmp_path

    def config(self, run_dir: Path | None = None, **overrides) -> Path:
        run_dir = run_dir or self.tmp / "new-run"
        return write_config(self.tmp / "run.yaml", base_config(run_dir, self.corpus, self.root / "cache", **overrides))

    def files_config(self, *files: Path, **overrides) -> Path:
        config = base_config(self.tmp / "new-run", self.corpus, self.tmp / "cache", **overrides)
        config["data"]["train_files"] = [str(f) for f in files]
        return write_config(self.tmp / "run.yaml", config)

    def mixture_config(self, *sources: dict) -> Path:
        config = base_config(self.tmp / "new-run", self.corpus, self.tmp / "cache")
        config["data"]["train_files"] = []
        config["data"]["sources"] = [dict(source, files=[str(self.corpus)]) for source in sources]
        return write_config(self.tmp / "run.yaml", config)

    def copy_run(self) -> tuple[Path, Path]:
        """A copy of the trained run and its config (the same one it was trained with)."""
        run_dir = self.tmp / "trained"
        shutil.copytree(self.trained, run_dir)
        config = base_config(run_dir, self.corpus, self.root / "cache", optim__max_steps=4, checkpoint__every=2,
                             logging__eval_every=2)
        return run_dir, write_config(self.tmp / "trained.yaml", config)

    def text(self, name: str, content: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content)
        return path


def train(config: Path, *extra: str) -> list[str]:
    return ["train", str(config), *extra]


def damaged_everywhere(ctx: Ctx, damage) -> Case:
    run_dir, config = ctx.copy_run()
    for step in ("step_2", "step_4"):
        damage(run_dir / "checkpoints" / step)
    return Case(train(config), keep=run_dir)


def rerun_with(ctx: Ctx, *extra: str) -> Case:
    run_dir, config = ctx.copy_run()
    return Case(train(config, *extra), keep=run_dir)


def export_damaged(ctx: Ctx, damage) -> Case:
    run_dir, _ = ctx.copy_run()
    damage(run_dir / "checkpoints" / "step_4")
    return Case(["export", str(run_dir / "checkpoints" / "step_4"), str(ctx.tmp / "hf")], keep=run_dir)


def junk_folder(ctx: Ctx) -> Path:
    folder = ctx.tmp / "junk"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("not json")
    return folder


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def mount_tmpfs(folder: Path, size_bytes: int, read_only: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size_bytes}" + (",ro" if read_only else "")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")


def full_disk_during_checkpoint(ctx: Ctx) -> Case:
    """The run folder on a small tmpfs with room for the metrics but not for another checkpoint."""
    disk = ctx.tmp / "disk"
    checkpoint_bytes = sum(p.stat().st_size for p in (ctx.trained / "checkpoints" / "step_4").rglob("*") if p.is_file())
    run_bytes = sum(p.stat().st_size for p in ctx.trained.rglob("*") if p.is_file())
    mount_tmpfs(disk, run_bytes + 64 * 1024 + checkpoint_bytes // 3)
    ctx.mounts.append(disk)
    run_dir = disk / "trained"
    shutil.copytree(ctx.trained, run_dir)
    config = base_config(run_dir, ctx.corpus, ctx.root / "cache", optim__max_steps=6, checkpoint__every=2,
                         logging__eval_every=2)
    return Case(train(write_config(ctx.tmp / "run.yaml", config), "--allow-config-change"), keep=None)


def read_only_output(ctx: Ctx) -> Case:
    folder = ctx.tmp / "ro"
    mount_tmpfs(folder, 1 << 20, read_only=True)
    ctx.mounts.append(folder)
    return Case(train(ctx.config(folder / "run")))


def folder_in_use(ctx: Ctx) -> Case:
    """A run on another node holds the folder (its lock, heartbeat just now): refused, its lock untouched."""
    run_dir = ctx.tmp / "new-run"
    run_dir.mkdir()
    (run_dir / "run.lock").write_text(json.dumps({
        "host": "node-b", "pid": 4242, "command": "hashmoe train", "token": "b" * 32, "slurm_job_id": "812",
        "since": "2026-12-06 09:00:00 UTC"}))
    return Case(train(ctx.config()), keep=run_dir)


def hub_push(ctx: Ctx, token: str, repo_id: str) -> Case:
    run_dir, _ = ctx.copy_run()
    hub = HubServer(ctx.tmp / "hub", {"hf_alice": "alice"}).__enter__()
    ctx.servers.append(hub)
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": token,
           "HF_HOME": str(ctx.tmp / "hf_home")}
    return Case(["push", str(run_dir), "--repo-id", repo_id], env=env)


# (id, set-up, the key the message must start with, a fragment of the problem or the fix)
CASES = [
    # ---- config
    ("unknown-key", lambda c: Case(train(c.config(), "--set", "optim.lrr=1")), "optim.lrr", "Valid keys here"),
    ("wrong-type", lambda c: Case(train(c.config(), "--set", "optim.lr=fast")), "optim.lr", "expected float"),
    ("ep-size-divides-not", lambda c: Case(train(c.config(), "--set", "parallel.ep_size=3")), "parallel.ep_size",
     "does not divide"),
    ("moe-layer-out-of-range", lambda c: Case(train(c.config(), "--set", "model.moe_layers=1,7")),
     "model.moe_layers", "7"),
    ("no-config-file", lambda c: Case(train(c.tmp / "nope.yaml")), "nope.yaml", "run config file not found"),
    ("invalid-yaml", lambda c: Case(train(c.text("bad.yaml", b"optim: [1, 2\n"))), "bad.yaml", "not valid YAML"),
    ("set-without-value", lambda c: Case(train(c.config(), "--set", "optim.lr")), "--set", "KEY=VALUE"),
    ("unknown-ds-config", lambda c: Case(train(c.config(), "--set", "parallel.ds_config=zero9")),
     "parallel.ds_config", "Use one of"),
    ("seq-len-too-long", lambda c: Case(train(c.config(), "--set", "data.seq_len=4096")), "data.seq_len",
     "max_position_embeddings"),
    ("vocab-in-model", lambda c: Case(train(c.config(), "--set", "model.vocab_size=5")), "model.vocab_size",
     "data.vocab_size"),
    ("zero-grad-accum", lambda c: Case(train(c.config(), "--set", "optim.grad_accum=0")), "optim.grad_accum",
     "positive integer"),
    # ---- data
    ("empty-file", lambda c: Case(train(c.files_config(c.text("empty.txt", b"")))), "data", "document"),
    ("binary-file", lambda c: Case(train(c.files_config(c.text("blob.txt", bytes(range(256)) * 64)))),
     "data.train_files", "is not UTF-8"),
    ("latin-1-text", lambda c: Case(train(c.files_config(c.text("a.txt", "café ".encode("latin-1") * 400),
                                                         c.text("b.txt", "thé ".encode("latin-1") * 400)))),
     "data.train_files", "iconv"),
    ("too-short-for-a-sequence", lambda c: Case(train(c.files_config(c.text("a.txt", b"the king"),
                                                                     c.text("b.txt", b"the queen")))),
     "data.", "fewer tokens than one block"),
    ("glob-matches-nothing", lambda c: Case(train(c.files_config(c.tmp / "none" / "*.txt"))), "data.train_files",
     "none"),
    ("unsupported-suffix", lambda c: Case(train(c.files_config(c.text("table.csv", b"text\nhello\n")))),
     "data.train_files", "unsupported file type"),
    ("jsonl-without-text-field", lambda c: Case(train(c.files_config(
        c.text("docs.jsonl", b'{"body": "the king"}\n{"body": "the queen"}\n')))), "data.text_field", "body"),
    ("truncated-gz-shard", lambda c: Case(train(c.files_config(c.corpus, c.text(
        "cut.jsonl.gz", gzip.compress(b'{"text": "the king"}\n' * 500)[:60])))), "data.train_files", "cut.jsonl.gz"),
    ("mixture-zero-weight", lambda c: Case(train(c.mixture_config({"weight": 1.0}, {"weight": 0}))),
     "data.sources[1].weight", "positive weight"),
    ("mixture-some-weights", lambda c: Case(train(c.mixture_config({"weight": 2.0}, {"name": "b"}))),
     "data.sources", "weights are given for some sources but not for data.sources[1]"),
    ("jsonl-line-not-json", lambda c: Case(train(c.files_config(c.corpus, c.text(
        "docs.jsonl", b'{"text": "the king"}\n{"text": \n')))), "data.train_files", "docs.jsonl, line 2"),
    ("prepare-latin-1-text", lambda c: Case(["prepare", str(c.files_config(
        c.text("a.txt", "caf\u00e9 ".encode("latin-1") * 400), c.text("b.txt", b"the king")))]),
     "data.train_files", "iconv"),
    # ---- tokenizer
    ("tokenizer-missing", lambda c: Case(train(c.config(), "--set", f"data.tokenizer={c.tmp / 'no-tokenizer'}")),
     "data.tokenizer", "no-tokenizer"),
    ("tokenizer-not-a-tokenizer", lambda c: Case(train(c.config(), "--set", f"data.tokenizer={junk_folder(c)}")),
     "data.tokenizer", "junk"),
    # ---- checkpoints
    ("truncated-model-states", lambda c: damaged_everywhere(c, lambda d: truncate(d / "mp_rank_00_model_states.pt")),
     "checkpoints", "mp_rank_00_model_states.pt"),
    ("missing-expert-file", lambda c: damaged_everywhere(
        c, lambda d: (d / "layer_0_expert_1_mp_rank_00_model_states.pt").unlink()), "checkpoints",
     "layer_0_expert_1_mp_rank_00_model_states.pt is missing"),
    ("corrupt-latest-and-checkpoints", lambda c: damaged_everywhere(
        c, lambda d: ((d.parent / "latest").write_bytes(b"\x00\xff garbage"), truncate(d / "hashmoe_state.json"))),
     "checkpoints", "latest"),
    ("other-num-experts", lambda c: rerun_with(c, "--set", "model.num_experts=8"), "config.yaml",
     "model.num_experts 4 -> 8"),
    ("other-num-experts-allowed", lambda c: rerun_with(c, "--set", "model.num_experts=8", "--set",
                                                       "optim.max_steps=6", "--allow-config-change"),
     "model.num_experts", "trained with num_experts=4"),
    ("export-truncated", lambda c: export_damaged(c, lambda d: truncate(
        d / "layer_0_expert_0_mp_rank_00_model_states.pt")), "step_4", "Export an intact checkpoint"),
    ("export-corrupt-manifest", lambda c: export_damaged(c, lambda d: (d / "manifest.json").write_text("{")),
     "step_4", "manifest.json is not readable"),
    ("export-not-a-checkpoint", lambda c: Case(["export", str(c.tmp), str(c.tmp / "hf")]), "/",
     "neither a checkpoint"),
    # ---- output folder
    ("output-under-a-file", lambda c: Case(train(c.config(c.text("plain-file", b"") / "run"))), "run.output_dir",
     "--output"),
    ("read-only-output", read_only_output, "run.output_dir", "Read-only file system"),
    ("folder-in-use", folder_in_use, "run.output_dir",
     "is in use by hashmoe train on host node-b pid 4242, Slurm job 812"),
    ("full-disk-during-checkpoint", full_disk_during_checkpoint, "checkpoints",
     "No space left on device"),
    # ---- Hub
    ("rejected-hub-token", lambda c: hub_push(c, "hf_wrong", "alice/tiny"), "HF_TOKEN", "rejected the token (401)"),
    ("bad-repo-id", lambda c: hub_push(c, "hf_alice", "not a repo"), "--repo-id", "OWNER/NAME"),
]


@pytest.mark.parametrize("setup, key, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_naming_the_thing_and_the_fix(world, tmp_path, setup, key, fragment):
    ctx = Ctx(world, tmp_path)
    ctx.mounts, ctx.servers = [], []
    try:
        case = setup(ctx)
        kept = snapshot(case.keep) if case.keep is not None else None
        disk_run = ctx.mounts and (ctx.mounts[0] / "trained")
        before_disk = {k: v for k, v in snapshot(disk_run).items() if k.startswith("checkpoints/step_4")} \
            if disk_run and disk_run.exists() else None
        result = subprocess.run([sys.executable, "-m", "trainer.cli", *case.argv], cwd=ROOT,
                                env={**env_for_run(), **(case.env or {})}, capture_output=True, text=True,
                                timeout=300)
        errors = [line for line in result.stderr.splitlines() if line.startswith("hashmoe: error")]
        assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-4000:])
        assert len(errors) == 1, result.stderr[-4000:]
        assert errors[0].startswith("hashmoe: error: ") and key in errors[0].split(": ")[2], errors[0]
        assert fragment in errors[0], errors[0]
        assert "Traceback" not in result.stderr, result.stderr[-4000:]
        if kept is not None:
            assert snapshot(case.keep) == kept  # nothing already written was changed or lost
        if before_disk is not None:  # the failed save left the intact checkpoint as it was
            after = snapshot(disk_run)
            assert {k: v for k, v in after.items() if k.startswith("checkpoints/step_4")} == before_disk
            assert (disk_run / "checkpoints" / "latest").read_text() == "step_4"
            assert not (disk_run / "checkpoints" / ".staging").exists()
        new_run = tmp_path / "new-run"
        assert not (new_run / "config.yaml").exists() and not (new_run / "metrics.jsonl").exists()
        print(f"{errors[0]}")  # the note lists what each case prints: pytest -rA shows it
    finally:
        for hub in ctx.servers:
            hub.__exit__(None, None, None)
        for folder in ctx.mounts:
            subprocess.run(["umount", str(folder)], capture_output=True)


def test_a_corrupt_latest_file_is_a_warning_and_the_newest_intact_checkpoint_is_used(world, tmp_path):
    ctx = Ctx(world, tmp_path)
    run_dir, config = ctx.copy_run()
    (run_dir / "checkpoints" / "latest").write_bytes(b"\x00\xff garbage")
    result = check(run(train_command(config, 1)))
    assert "hashmoe: warning: " in result.stderr and "latest names" in result.stderr
    assert "already finished at step 4" in result.stdout  # step_4 is intact: nothing to train
    assert json.loads((run_dir / "checkpoints" / "step_4" / "hashmoe_state.json").read_text())["step"] == 4

"""`hashmoe push` against a test double of the Hub (tests/hub_server.py), driven by the real `huggingface_hub`
client: one real tiny run is trained, pushed with `hashmoe push RUN_DIR`, downloaded and loaded with
`trust_remote_code=True` in a fresh interpreter that cannot import hashmoe; then re-push, dry run and the
errors. The token is a made-up string that must never show up in any output or uploaded file.

Client calls exercised: whoami, create_repo (new and existing, public and private), create_branch,
upload_folder (validate-yaml, preupload, LFS batch + PUT, NDJSON commit with additions and deletions, tree
listing for delete_patterns), repo_info, snapshot_download and from_pretrained (tree, resolve HEAD/GET).
The pushes run in this process through `trainer.cli.main` (fd-level output captured); the `hashmoe` console
script itself is covered by tests/trainer/test_cli.py."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from tests.hub_server import HubServer
from tests.trainer.harness import (
    ROOT,
    base_config,
    check,
    env_for_run,
    train_command,
    write_config,
    write_corpus,
)
from trainer import cli

TOKEN = "hf_TESTtokenNEVERprinted4242"  # alice's; the double knows it
BOB_TOKEN = "hf_bobsTOKENalsoSECRET1717"

# A user who never installed hashmoe: the project's packages cannot be imported at all.
LOADER = textwrap.dedent("""
    import sys
    class BlockProject:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("models", "trainer", "hashmoe", "tests"):
                raise ImportError(f"{name} must not be needed to load the model")
    sys.meta_path.insert(0, BlockProject())
    import torch
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM, AutoTokenizer
    repo_id, ids_path, out_path = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True).eval()
    tokenized = AutoTokenizer.from_pretrained(repo_id)("the king of night").input_ids  # as the card says
    folder = snapshot_download(repo_id)
    ids = torch.load(ids_path, weights_only=True)
    torch.save({"logits": model(ids).logits, "module": type(model).__module__, "folder": folder,
                "tokenized": tokenized}, out_path)
""")


def client_env(hub: HubServer, tmp: Path, **extra) -> dict:
    """Environment of a real client process pointed at the double (HF_ENDPOINT is read at import)."""
    env = {k: v for k, v in env_for_run().items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp / "hf_home"),
               HF_HUB_DISABLE_TELEMETRY="1", **extra)
    return env


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub"), {TOKEN: "alice", BOB_TOKEN: "bob"}) as server:
        yield server


def use_client_in_process(monkeypatch, tmp: Path) -> None:
    """The client in this process: online, LFS instead of Xet, alice's token in HF_TOKEN and no login file."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1 for the suite
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp / "no-login" / "token"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)


@contextlib.contextmanager
def output_to(path: Path):
    """Everything this process writes, at the file-descriptor level too (progress bars, log handlers), into path."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sink.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


@pytest.fixture(scope="module")
def pushed(hub, tmp_path_factory):
    """A real 6-step run, pushed with `hashmoe push RUN_DIR` (in this process: a subprocess would import torch
    and transformers again, seconds of CPU): (run folder, everything the push printed)."""
    tmp = tmp_path_factory.mktemp("push")
    config = base_config(tmp / "run", write_corpus(tmp), tmp / "cache", optim__max_steps=6,
                         logging__eval_every=3, checkpoint__every=6)
    check(subprocess.run(train_command(write_config(tmp / "run.yaml", config), 1), cwd=ROOT, env=env_for_run(),
                         capture_output=True, text=True, timeout=300))
    with pytest.MonkeyPatch.context() as monkeypatch, output_to(tmp / "push.log"):
        use_client_in_process(monkeypatch, tmp)
        code = cli.main(["push", str(tmp / "run"), "--repo-id", "alice/tiny-hash", "--endpoint", hub.endpoint])
    output = (tmp / "push.log").read_text()
    assert code == 0, output
    return tmp / "run", output


@pytest.fixture
def in_process(hub, monkeypatch, tmp_path):
    use_client_in_process(monkeypatch, tmp_path)
    return hub


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("\n---\n", 1)[0].removeprefix("---\n"))


def test_pushed_run_loads_from_the_hub_in_a_process_without_hashmoe(pushed, hub, tmp_path):
    from models import HashMoEForCausalLM

    run_dir, output = pushed
    export_dir = run_dir / "hf"
    assert f"hashmoe: exporting {run_dir / 'checkpoints' / 'step_6'} to {export_dir}" in output
    assert f"{hub.endpoint}/alice/tiny-hash" in output
    remote = hub.files("alice/tiny-hash")
    local = {p.relative_to(export_dir).as_posix(): p.read_bytes() for p in export_dir.rglob("*") if p.is_file()}
    assert remote == {**local, ".gitattributes": remote[".gitattributes"]}  # the folder, byte for byte
    assert {"model.safetensors", "modeling_hashmoe.py", "tokenizer.json", "README.md",
            "plots/valid_ppl_vs_step.png"} <= set(remote)
    # safetensors and PNGs travel through the LFS batch API and the signed PUT, the rest inline in the commit
    assert ("PUT", "/_lfs/" + hashlib.sha256(remote["model.safetensors"]).hexdigest()) in hub.requests

    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "loader.py").write_text(LOADER)
    env = {k: v for k, v in client_env(hub, tmp_path).items() if k != "PYTHONPATH"}  # public repo: no token
    loaded = subprocess.run([sys.executable, str(tmp_path / "loader.py"), "alice/tiny-hash", str(tmp_path / "ids.pt"),
                             str(tmp_path / "out.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["module"].startswith("transformers_modules.")
    snapshot = Path(out["folder"])
    assert {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()} == set(remote)
    from transformers import AutoTokenizer

    assert out["tokenized"] == AutoTokenizer.from_pretrained(export_dir)("the king of night").input_ids
    model = HashMoEForCausalLM.from_pretrained(export_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], model(ids).logits, rtol=0, atol=0)
    assert hub.unhandled == []  # the client needed no endpoint the double lacks


def test_model_card_yaml_parses_and_carries_the_runs_metrics(pushed, hub):
    run_dir, _ = pushed
    readme = hub.files("alice/tiny-hash")["README.md"].decode()
    meta = front_matter(readme)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert {"mixture-of-experts", "hash-layers", "router-hash", "hash-balanced", "custom_code"} <= set(meta["tags"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ppls = [r["valid/ppl"] for r in rows if "valid/ppl" in r]
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert [m["value"] for m in metrics] == [round(ppls[-1], 4), round(min(ppls), 4)]
    assert ("POST", "/api/validate-yaml") in hub.requests  # the client had the double check the metadata
    params = next(r for r in rows if "params/total" in r)
    from trainer.analysis.compare import human

    for row in ("| router | `hash` |", "| hash function | `balanced` |", "| experts per MoE layer | 4 |",
                "| MoE blocks | 1 of 2 |", f"| parameters: total | {human(params['params/total'])} |",
                f"| parameters: active per token | {human(params['params/active'])} |",
                f"| validation perplexity: final | {ppls[-1]:.2f} |", "| steps | 6 (finished) |",
                "| tokens seen | 768 |", 'from_pretrained("alice/tiny-hash", trust_remote_code=True)',
                "arXiv:2106.04426", "## Limitations"):
        assert row in readme, row
    assert str(run_dir) not in readme  # no local paths


def test_the_token_never_leaks(pushed, hub, in_process, tmp_path, capfd):
    run_dir, output = pushed
    assert ("GET", "/api/whoami-v2") in hub.requests  # the token was used...
    folder = tmp_path / "export"
    shutil.copytree(run_dir / "hf", folder)
    cli.main(["push", str(folder), "--run-dir", str(run_dir), "--repo-id", "alice/tiny-hash", "--dry-run"])
    # a wrong token that contains the real one: echoing it anywhere would show the real one
    cli.main(["push", str(folder), "--repo-id", "alice/x", "--endpoint", hub.endpoint, "--token", TOKEN + "x"])
    cli.main(["--debug", "push", str(folder), "--repo-id", "bob/x", "--endpoint", hub.endpoint])
    captured = capfd.readouterr()
    texts = {"push output": output, "later output": captured.out + captured.err}
    texts |= {str(p): p.read_bytes().decode("latin-1") for p in (hub.root / "blobs").iterdir()}  # every upload
    texts |= {str(p): p.read_bytes().decode("latin-1") for p in [*run_dir.rglob("*"), *folder.rglob("*")]
              if p.is_file()}
    assert len(texts) > 20
    for where, text in texts.items():  # ...and shows up nowhere
        assert TOKEN not in text, where
    assert "rejected the token (401)" in captured.err and "belongs to 'alice'" in captured.err


def test_repush_updates_in_place_and_keeps_a_users_readme(pushed, in_process, tmp_path, capsys):
    hub = in_process
    folder = tmp_path / "export"
    shutil.copytree(pushed[0] / "hf", folder, ignore=shutil.ignore_patterns("README.md", "plots"))
    (folder / "notes.txt").write_text("first push only")
    push = ["push", str(folder), "--repo-id", "alice/re-push", "--endpoint", hub.endpoint, "--private"]
    assert cli.main(push) == 0
    assert "notes.txt" in hub.files("alice/re-push") and hub.repos["alice/re-push"].private
    public = ["push", str(folder), "--repo-id", "alice/public", "--endpoint", hub.endpoint]
    assert cli.main(public) == 0 and cli.main(public + ["--private"]) == 0
    assert not hub.repos["alice/public"].private and "--private does not change that" in capsys.readouterr().out
    card = hub.files("alice/re-push")["README.md"].decode()
    assert "The run folder was not available" in card  # an export outside its run: no metrics to report
    (folder / "notes.txt").unlink()
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# my own words\n")
    assert cli.main(push + ["--commit-message", "second"]) == 0
    files = hub.files("alice/re-push")
    assert "notes.txt" not in files and ".gitattributes" in files  # the repo now equals the folder
    assert files["README.md"] == b"---\nlicense: mit\n---\n# my own words\n"
    assert "README.md (yours, kept)" in capsys.readouterr().out
    assert list(hub.repos["alice/re-push"].messages.values())[-1] == "second"
    assert cli.main(push + ["--branch", "dev"]) == 0  # a new branch, from main
    assert hub.files("alice/re-push", "dev") == files
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):  # private: hidden from anonymous readers
        HfApi(endpoint=hub.endpoint, token=False).model_info("alice/re-push")


def test_dry_run_contacts_nothing_and_lists_the_files(pushed, in_process, monkeypatch, tmp_path, capsys):
    hub = in_process
    monkeypatch.delenv("HF_TOKEN")
    folder = tmp_path / "export"
    shutil.copytree(pushed[0] / "hf", folder, ignore=shutil.ignore_patterns("README.md", "plots"))
    before = len(hub.requests)
    assert cli.main(["push", str(folder), "--run-dir", str(pushed[0]), "--repo-id", "alice/dry", "--endpoint",
                     hub.endpoint, "--dry-run", "--include-logs"]) == 0
    out = capsys.readouterr().out
    assert len(hub.requests) == before and "alice/dry" not in hub.repos
    assert "dry run, nothing uploaded" in out and f"{hub.endpoint}/alice/dry" in out
    for name in ("model.safetensors", "config.json", "modeling_hashmoe.py", "README.md", "tokenizer.json",
                 "plots/valid_ppl_vs_step.png"):
        assert f"  {name}  (" in out, name
    assert "validation perplexity: final" in (folder / "README.md").read_text()  # written, from --run-dir
    assert "token: none found" in out
    assert "  runs/metrics.jsonl  (" in out and "  runs/events.out.tfevents." in out  # --include-logs


NO_WEIGHTS = "no-weights"


@pytest.mark.parametrize("args, env, key, fragment", [
    (["{export}", "--repo-id", "alice"], {}, "--repo-id", "is not a Hub repository id"),
    (["{export}", "--repo-id", "alice/a/b"], {}, "--repo-id", "Use OWNER/NAME"),
    (["{export}", "--repo-id", "alice/na me"], {}, "--repo-id", "is not a Hub repository id"),
    (["{export}", "--repo-id", "alice/x--y"], {}, "--repo-id", "is not a Hub repository id"),
    (["{export}", "--repo-id", "alice/x"], {"HF_TOKEN": None}, "HF_TOKEN", "no Hugging Face token found"),
    (["{export}", "--repo-id", "alice/x"], {"HF_TOKEN": "hf_wrong"}, "HF_TOKEN", "rejected the token (401)"),
    (["{export}", "--repo-id", "bob/x"], {}, "--repo-id", "belongs to 'alice', who cannot write to the namespace"),
    (["{tmp}/" + NO_WEIGHTS, "--repo-id", "alice/x"], {}, "{tmp}/" + NO_WEIGHTS, "holds no safetensors weights"),
    (["{tmp}/missing", "--repo-id", "alice/x"], {}, "{tmp}/missing", "does not exist"),
    (["{export}", "--repo-id", "alice/x", "--include-logs"], {}, "--include-logs", "no run folder"),
])
def test_errors_exit_2_before_anything_is_uploaded(pushed, in_process, monkeypatch, tmp_path, capsys, args, env,
                                                   key, fragment):
    hub = in_process
    folder = tmp_path / "export"  # outside any run folder
    shutil.copytree(pushed[0] / "hf", folder)
    (tmp_path / NO_WEIGHTS).mkdir()
    shutil.copy(folder / "config.json", tmp_path / NO_WEIGHTS / "config.json")
    for name, value in env.items():
        monkeypatch.delenv(name) if value is None else monkeypatch.setenv(name, value)
    fill = {"{export}": str(folder), "{tmp}": str(tmp_path)}
    for a, b in fill.items():
        args, key = [x.replace(a, b) for x in args], key.replace(a, b)
    before, repos = len(hub.requests), set(hub.repos)
    assert cli.main(["push", *args, "--endpoint", hub.endpoint]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hashmoe: error: {key}: ") and fragment in err, err
    assert "Traceback" not in err
    assert set(hub.requests[before:]) <= {("GET", "/api/whoami-v2")}  # at most the token check
    assert set(hub.repos) == repos  # nothing created


def test_a_card_the_hub_rejects_and_an_unreachable_endpoint_exit_2(pushed, in_process, tmp_path, capsys):
    hub = in_process
    folder = tmp_path / "export"
    shutil.copytree(pushed[0] / "hf", folder)
    (folder / "README.md").write_text("---\nlicense: 3\n---\n# mine\n")  # kept as the user's, then refused
    before = len(hub.requests)
    assert cli.main(["push", str(folder), "--repo-id", "alice/bad-card", "--endpoint", hub.endpoint]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hashmoe: error: README.md: Invalid metadata in README.md.") and "license" in err, err
    assert not [r for r in hub.requests[before:] if "preupload" in r[1] or "lfs" in r[1] or "commit" in r[1]]
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    assert cli.main(["push", str(folder), "--repo-id", "alice/x", "--endpoint", closed]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hashmoe: error: --endpoint: cannot reach {closed} while checking the token"), err


def test_offline_mode_is_refused(in_process, monkeypatch, capsys, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert cli.main(["push", str(tmp_path), "--repo-id", "alice/x"]) == 2
    assert "hashmoe: error: HF_HUB_OFFLINE: " in capsys.readouterr().err
    assert os.environ.get("HF_TOKEN") == TOKEN  # the refusal is not about the token


def test_pipeline_text_generation_on_the_exported_run_folder(pushed):
    """transformers' own `pipeline` on the folder `hashmoe push` exported: same text as greedy generate()."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    folder = str(pushed[0] / "hf")
    generator = pipeline("text-generation", model=folder, trust_remote_code=True)
    text = generator("the king of", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    prompt = tokenizer("the king of", return_tensors="pt")
    expected = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert text == tokenizer.decode(expected[0], skip_special_tokens=True)
    assert len(text) > len("the king of")

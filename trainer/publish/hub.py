"""`hashmoe push`: publish an exported model (or a run folder, exported first) to the Hugging Face Hub.

    RUN_DIR | EXPORT_DIR ─► export (trainer/publish/export.py, run folders only) ─► README.md model card (+ plots)
        ─► checks that need no network (repo id, weights, auto_map, token present)
        ─► whoami (a rejected token stops here) ─► create_repo(exist_ok) ─► [create_branch]
        ─► upload_folder: one commit; remote files the folder no longer has are deleted, so a re-push
           leaves the repo equal to the folder (the Hub's .gitattributes excepted)

The token comes from --token, HF_TOKEN or the `hf auth login` file, in that order (huggingface_hub's own
lookup after --token). It is passed to the client and nowhere else: not printed, not written into the card or
any file, and scrubbed from error messages in case a server echoes it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import UserError
from trainer.run import checkpoint as ckpt

# The Hub's rule for names: letters, digits, '-', '_', '.', not starting or ending with '-' or '.', no '--' or
# '..', at most 96 characters; exactly one '/' between namespace and name (a push needs the namespace).
NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
REPO_ID = re.compile(rf"^{NAME}/{NAME}$")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
LOG_FOLDER = "runs"  # where the Hub looks for TensorBoard event files


@dataclass
class PushResult:
    repo_id: str
    url: str
    export_dir: Path
    files: list[tuple[str, int]] = field(default_factory=list)  # (path in repo, bytes)
    commit: str | None = None  # None for a dry run
    card_kept: bool = False  # the folder had a README.md of its own
    token_source: str | None = None  # where the token was found (never the token itself); None: no token


def check_repo_id(repo_id: str) -> None:
    if not REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise UserError("--repo-id", f"{repo_id!r} is not a Hub repository id",
                        "Use OWNER/NAME (your user or organisation name, a slash, the model name): letters, "
                        "digits, '-', '_' and '.', at most 96 characters each, e.g. --repo-id alice/hash-moe-tiny")


def find_source(source: str | Path, run_dir: str | Path | None) -> tuple[Path, Path | None]:
    """(export folder, run folder or None). A run folder or checkpoint is exported to RUN_DIR/hf first."""
    source = Path(source)
    if (source / "config.json").is_file():
        if run_dir is None and (source.parent / "metrics.jsonl").is_file():
            run_dir = source.parent  # RUN_DIR/hf, as written below
        return source, Path(run_dir) if run_dir is not None else None
    if (source / ckpt.STATE_FILE).is_file() or ckpt.step_folders(source):
        from trainer.publish.export import export_checkpoint, resolve_checkpoint

        checkpoint = resolve_checkpoint(source)
        run_dir = Path(run_dir) if run_dir is not None else checkpoint.parents[1]
        print(f"hashmoe: exporting {checkpoint} to {run_dir / 'hf'}", flush=True)
        return export_checkpoint(checkpoint, run_dir / "hf"), run_dir
    if not source.exists():
        raise UserError(str(source), "does not exist", "Pass a run folder (RUN_DIR) or a folder written by "
                        "`hashmoe export`.")
    raise UserError(str(source), "is neither an exported model (no config.json) nor a run folder with a checkpoint",
                    "Pass RUN_DIR (its latest checkpoint is exported to RUN_DIR/hf) or the OUT_DIR of "
                    "`hashmoe export CHECKPOINT OUT_DIR`.")


def check_export(export_dir: Path) -> None:
    if not any((export_dir / name).is_file() for name in WEIGHTS):
        other = sorted(p.name for p in export_dir.glob("*.bin")) + sorted(p.name for p in export_dir.glob("*.pt"))
        raise UserError(str(export_dir), "holds no safetensors weights (model.safetensors or its index)"
                        + (f"; found {', '.join(other)}" if other else ""),
                        "Export the run with `hashmoe export CHECKPOINT OUT_DIR` (or push RUN_DIR) and push that.")
    index = export_dir / "model.safetensors.index.json"
    if index.is_file():
        missing = sorted({s for s in json.loads(index.read_text())["weight_map"].values()
                          if not (export_dir / s).is_file()})
        if missing:
            raise UserError(str(index), f"names shards that are missing: {', '.join(missing)}",
                            "Export again; the folder is incomplete.")
    config = json.loads((export_dir / "config.json").read_text())
    code = (config.get("auto_map") or {}).get("AutoModelForCausalLM", "").split(".")[0]
    if not code or not (export_dir / f"{code}.py").is_file():
        raise UserError(str(export_dir / "config.json"), "has no auto_map to model code in the folder, so "
                        "`trust_remote_code=True` could not load it", "Export with `hashmoe export` (it "
                        "writes config.json with auto_map and copies modeling_hashmoe.py and the files it imports).")


def find_token(token: str | None) -> tuple[str | None, str]:
    """(token, where it came from), without contacting the Hub."""
    if token:
        return token, "--token"
    from huggingface_hub import get_token

    found = get_token()
    from_env = (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or "").strip()
    return found, "HF_TOKEN" if found is not None and found == from_env else "the `hf auth login` token"


def files_to_upload(export_dir: Path, include_logs: bool) -> list[tuple[str, int]]:
    files = []
    for path in sorted(export_dir.rglob("*")):
        relative = path.relative_to(export_dir).as_posix()
        if path.is_file() and (include_logs or not relative.startswith(f"{LOG_FOLDER}/")):
            files.append((relative, path.stat().st_size))
    return files


def copy_logs(export_dir: Path, run_dir: Path | None) -> None:
    target = export_dir / LOG_FOLDER
    shutil.rmtree(target, ignore_errors=True)
    if run_dir is None or not (run_dir / "tb").is_dir():
        raise UserError("--include-logs", "no run folder with TensorBoard logs (RUN_DIR/tb) is known",
                        "Push RUN_DIR, or pass --run-dir RUN_DIR with the exported folder.")
    shutil.copytree(run_dir / "tb", target)
    if (run_dir / "metrics.jsonl").is_file():
        shutil.copy(run_dir / "metrics.jsonl", target / "metrics.jsonl")


def push(source: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
         revision: str | None = None, commit_message: str | None = None, endpoint: str | None = None,
         run_dir: str | Path | None = None, include_logs: bool = False, license: str = "apache-2.0",
         dry_run: bool = False) -> PushResult:
    from huggingface_hub import constants

    from trainer.publish.model_card import is_generated, write_model_card

    check_repo_id(repo_id)
    token, token_source = find_token(token)
    if not dry_run:
        if constants.HF_HUB_OFFLINE:
            raise UserError("HF_HUB_OFFLINE", "offline mode is set in the environment (HF_HUB_OFFLINE or "
                            "TRANSFORMERS_OFFLINE), so the Hub cannot be reached", "Unset it for `hashmoe push`.")
        if token is None:
            raise UserError("HF_TOKEN", "no Hugging Face token found (none in --token, HF_TOKEN or the "
                            "`hf auth login` file)", "Create a token with write access at "
                            "https://huggingface.co/settings/tokens and run `hf auth login`, or export HF_TOKEN.")
    export_dir, run_dir = find_source(source, run_dir)
    check_export(export_dir)
    readme = export_dir / "README.md"
    card_kept = readme.is_file() and not is_generated(readme)
    if not card_kept:
        write_model_card(export_dir, repo_id, run_dir, license)
    if include_logs:
        copy_logs(export_dir, run_dir)
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    result = PushResult(repo_id, f"{endpoint}/{repo_id}", export_dir, files_to_upload(export_dir, include_logs),
                        card_kept=card_kept, token_source=token_source if token else None)
    if revision and revision != "main":
        result.url += f"/tree/{revision}"
    if dry_run:
        return result
    try:
        result.commit = upload(export_dir, repo_id, token, token_source, private, revision, commit_message,
                               endpoint, include_logs)
    except UserError as err:  # scrub the token from any text a server may have echoed back
        # (the chain, shown by --debug, keeps the client's own error: its text holds no request headers)
        raise UserError(err.key, err.problem.replace(token, "***"), err.fix.replace(token, "***")) from err.__cause__
    return result


def upload(export_dir: Path, repo_id: str, token: str, token_source: str, private: bool, revision: str | None,
           commit_message: str | None, endpoint: str, include_logs: bool) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint, token=token)
    step = "checking the token (whoami)"
    try:
        # whoami first: a rejected token or a namespace the token cannot write to stops the push before
        # anything is created or uploaded.
        who = api.whoami()
        namespaces = {who.get("name")} | {org.get("name") for org in who.get("orgs") or []}
        owner = repo_id.split("/")[0]
        if owner not in namespaces:
            raise UserError("--repo-id", f"the token from {token_source} belongs to {who.get('name')!r}, who "
                            f"cannot write to the namespace {owner!r}",
                            f"Push to {who.get('name')}/{repo_id.split('/')[1]}, or use a token of {owner!r}.")
        step = f"creating {repo_id}"
        # private=None, not False: a new repo then gets the namespace's default visibility, as on the website
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if private and not api.repo_info(repo_id).private:  # create_repo leaves an existing repo as it is
            print(f"hashmoe: warning: {repo_id} already exists and is public; --private does not change that "
                  "(the repo's settings page does)", flush=True)
        if revision and revision != "main":
            step = f"creating the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "uploading"
        info = api.upload_folder(
            repo_id=repo_id, folder_path=export_dir, revision=revision,
            commit_message=commit_message or f"hashmoe push: {export_dir.name}",
            ignore_patterns=None if include_logs else [f"{LOG_FOLDER}/**"],
            delete_patterns="*")  # files the folder no longer has leave the repo (the Hub keeps .gitattributes)
        return info.oid
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            raise UserError(token_source, f"the Hub at {endpoint} rejected the token (401) while {step}",
                            "Create a token with write access at https://huggingface.co/settings/tokens and run "
                            "`hf auth login`, or export HF_TOKEN.") from err
        if status == 403:
            raise UserError("--repo-id", f"the token from {token_source} may not write to {repo_id} (403) while "
                            f"{step}", "Use a token with write access to that namespace.") from err
        raise UserError("--repo-id", f"the Hub answered {status} while {step}: {first_line(err)}",
                        "Check --repo-id and --revision; rerun with --debug for the full error.") from err
    except ValueError as err:  # huggingface_hub raises ValueError for card metadata the Hub rejects
        if "Invalid metadata in README.md" not in str(err):
            raise
        raise UserError("README.md", f"{first_line(err)} (while {step})", "Fix the model card's YAML "
                        "front matter, or delete README.md so hashmoe writes its own.") from err
    except Exception as err:
        # Connection errors come from the client's HTTP library (httpx2); name the endpoint, not a traceback.
        if type(err).__module__.split(".")[0] not in ("httpx", "httpx2"):
            raise
        raise UserError("--endpoint", f"cannot reach {endpoint} while {step} ({type(err).__name__})",
                        "Check the network, --endpoint and HF_ENDPOINT.") from err


def first_line(err: Exception) -> str:
    return " ".join(str(err).split("\n\n")[0].split())

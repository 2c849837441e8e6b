"""A run folder never loses work or lies: Ctrl-C checkpoints (one process and under `hashmoe launch`), no step
is recorded twice, a finished run is left alone, a rerun with other values is refused unless asked for (and
then recorded), and a damaged checkpoint is skipped for the newest intact one, on 1 and 2 ranks."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.trainer.harness import (
    ROOT,
    base_config,
    check,
    env_for_run,
    run,
    snapshot,
    train_command,
    train_rows,
    wait_for_step,
    write_config,
    write_corpus,
)
from trainer.run.checkpoint import MANIFEST_FILE, latest_checkpoint, step_folders
from trainer.run.metrics import read_metrics

pytestmark = pytest.mark.slow  # multi-process


def logged_steps(run_dir) -> list[int]:
    """Every training row's step, in file order, duplicates kept."""
    return [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]


def start(command: list[str]) -> subprocess.Popen:
    # SIGINT default in the child, as in a terminal (a background job here inherits it ignored)
    return subprocess.Popen(command, cwd=ROOT, env=env_for_run(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def hashmoe(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", *args]


def test_ctrl_c_checkpoints_and_a_rerun_resumes(corpus, tmp_path):
    corpus_file, cache = corpus
    run_dir = tmp_path / "run"
    path = write_config(tmp_path / "run.yaml", base_config(run_dir, corpus_file, cache, optim__max_steps=200,
                                                           checkpoint__every=1000, logging__eval_every=1000))
    process = start(train_command(path, 1))
    wait_for_step(run_dir, 3, process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "finishing the step and saving a checkpoint (Ctrl-C again to exit at once)" in err
    stopped = [line for line in out.splitlines() if line.startswith("hashmoe: stopped at step")]
    assert len(stopped) == 1 and stopped[0].endswith("checkpoint saved; run the same command again to resume"), out
    step = int(latest_checkpoint(run_dir).name.split("_")[1])
    assert 3 <= step < 200 and f"stopped at step {step}" in stopped[0]

    process = start(train_command(path, 1, "--set", "optim.max_steps=200"))  # same values: no change
    wait_for_step(run_dir, step + 2, process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and f"resuming from {run_dir / 'checkpoints' / f'step_{step}'}" in out
    steps = logged_steps(run_dir)
    assert steps == list(range(1, max(steps) + 1)), steps  # the resumed run continued the record, nothing twice


def test_a_second_ctrl_c_exits_at_once_without_a_checkpoint(corpus, tmp_path):
    corpus_file, cache = corpus
    run_dir = tmp_path / "run"
    # A model large enough that finishing a step, evaluating and checkpointing take far longer than the 50 ms
    # between the two signals (two signals back to back would reach the Python handler as one).
    big = dict(model__hidden_size=256, model__intermediate_size=1024, model__num_experts=8,
               model__num_hidden_layers=4, model__moe_layers=[1, 3])
    path = write_config(tmp_path / "run.yaml", base_config(run_dir, corpus_file, cache, optim__max_steps=200,
                                                           checkpoint__every=1000, logging__eval_every=1000, **big))
    process = start(train_command(path, 1))
    wait_for_step(run_dir, 2, process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-2000:]
    assert "second interrupt: exiting without a checkpoint" in err and "Traceback" not in err
    assert latest_checkpoint(run_dir) is None and not (run_dir / "checkpoints" / "step_2").exists()


def test_ctrl_c_under_hashmoe_launch_stops_both_ranks_with_one_line(corpus, tmp_path):
    corpus_file, cache = corpus
    run_dir = tmp_path / "run"
    path = write_config(tmp_path / "run.yaml", base_config(run_dir, corpus_file, cache, parallel__ep_size=2,
                                                           optim__micro_batch_size=2, optim__max_steps=200,
                                                           checkpoint__every=1000, logging__eval_every=1000))
    process = start(hashmoe("launch", str(path), "--nproc", "2"))
    wait_for_step(run_dir, 3, process)
    process.send_signal(signal.SIGINT)  # what the terminal sends the launcher on Ctrl-C
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]
    assert len([line for line in out.splitlines() if line.startswith("hashmoe: stopped at step")]) == 1, out
    state = json.loads((latest_checkpoint(run_dir) / "hashmoe_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] >= 3


def test_a_configuration_error_on_every_rank_is_one_line_under_launch(tmp_path):
    binary = tmp_path / "corpus.txt"
    binary.write_bytes(bytes(range(256)) * 40)
    path = write_config(tmp_path / "run.yaml", base_config(tmp_path / "run", binary, tmp_path / "cache",
                                                           parallel__ep_size=2))
    result = run(hashmoe("launch", str(path), "--nproc", "2"))
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("hashmoe: error: data.train_files:"), result.stderr
    assert "is not UTF-8" in errors[0] and "Traceback" not in result.stderr


def test_a_restart_without_checkpoint_starts_the_record_clean(corpus, tmp_path):
    corpus_file, cache = corpus
    run_dir = tmp_path / "run"
    path = write_config(tmp_path / "run.yaml", base_config(run_dir, corpus_file, cache, optim__max_steps=200,
                                                           checkpoint__every=1000, logging__eval_every=1000))
    process = start(train_command(path, 1))
    wait_for_step(run_dir, 4, process)
    process.kill()  # no handler runs: nothing is saved
    process.wait()
    assert latest_checkpoint(run_dir) is None and max(logged_steps(run_dir)) >= 4
    config = base_config(run_dir, corpus_file, cache, optim__max_steps=6, checkpoint__every=1000,
                         logging__eval_every=1000)
    check(run(train_command(write_config(path, config), 1)))
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in read_metrics(run_dir) if "params/total" in r] == [0]


def test_a_finished_run_rerun_changes_nothing_and_changed_values_are_refused(corpus, tmp_path):
    corpus_file, cache = corpus
    run_dir = tmp_path / "run"
    path = write_config(tmp_path / "run.yaml", base_config(run_dir, corpus_file, cache, optim__max_steps=4))
    first = check(run(train_command(path, 1)))
    for noise in ("Setting accelerator to CPU", "No existing process group found"):  # DeepSpeed's, without --debug
        assert noise not in first.stdout + first.stderr
    before = snapshot(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())

    again = check(run(train_command(path, 1)))
    assert f"hashmoe: {run_dir} already finished at step 4, valid ppl {summary['valid_ppl']:.2f}" in again.stdout
    assert snapshot(run_dir) == before  # no config, summary, metrics or TensorBoard file touched

    refused = run(train_command(path, 1, "--set", "optim.lr=1e-2", "--set", "optim.max_steps=6"))
    assert refused.returncode == 2
    assert "optim.lr 0.003 -> 0.01" in refused.stderr and "optim.max_steps 4 -> 6" in refused.stderr
    assert "--output DIR" in refused.stderr and "--allow-config-change" in refused.stderr
    assert snapshot(run_dir) == before

    changed = check(run(train_command(path, 1, "--set", "optim.lr=1e-2", "--set", "optim.max_steps=6",
                                      "--allow-config-change")))
    assert "resuming from" in changed.stdout and "optim.lr 0.003 -> 0.01" in changed.stdout
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    changes = [json.loads(line) for line in (run_dir / "config_changes.jsonl").read_text().splitlines()]
    assert [(c["step"], c["key"], c["old"], c["new"]) for c in changes] == [
        (4, "optim.lr", 0.003, 0.01), (4, "optim.max_steps", 4, 6)]
    assert "lr: 0.01" in (run_dir / "config.yaml").read_text()  # now true: steps 5-6 ran with it

    from trainer.publish.export import export_checkpoint
    from trainer.publish.model_card import write_model_card

    export_checkpoint(run_dir, tmp_path / "hf")
    card = write_model_card(tmp_path / "hf", "alice/tiny", run_dir, "apache-2.0").read_text()
    assert "- from step 4: `optim.lr` 0.003 -> 0.01" in card
    assert 'AutoTokenizer.from_pretrained("alice/tiny", trust_remote_code=True)' in card
    assert oct((tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~current_umask())


def test_a_resume_on_another_data_store_is_refused_unless_allowed(tmp_path):
    cache = tmp_path / "cache"
    corpus_file = write_corpus(tmp_path, seed=0)
    run_dir = tmp_path / "run"
    path = write_config(tmp_path / "run.yaml", base_config(run_dir, corpus_file, cache, optim__max_steps=4))
    check(run(train_command(path, 1)))
    trained_on = json.loads((latest_checkpoint(run_dir) / "hashmoe_state.json").read_text())["data_fingerprint"]
    assert (cache / trained_on / "manifest.json").is_file()
    write_corpus(tmp_path, seed=1)  # the same file, other text: another store
    before = snapshot(run_dir)
    refused = run(train_command(path, 1))
    assert refused.returncode == 2 and f"trained on the data store {trained_on}" in refused.stderr
    assert "--allow-config-change" in refused.stderr and snapshot(run_dir) == before
    check(run(train_command(path, 1, "--set", "optim.max_steps=6", "--allow-config-change")))
    changes = [json.loads(line) for line in (run_dir / "config_changes.jsonl").read_text().splitlines()]
    assert sorted((c["step"], c["key"], c["old"]) for c in changes) == [(4, "data.store", trained_on),
                                                                 (4, "optim.max_steps", 4)]



def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(nproc, corpus, tmp_path):
    corpus_file, cache = corpus
    run_dir = tmp_path / "run"
    config = base_config(run_dir, corpus_file, cache, optim__max_steps=8, checkpoint__every=4,
                         logging__eval_every=100, parallel__ep_size=nproc, optim__micro_batch_size=4 // nproc)
    path = write_config(tmp_path / "run.yaml", config)
    check(run(train_command(path, nproc)))
    damaged = run_dir / "checkpoints" / "step_8"
    manifest = json.loads((damaged / MANIFEST_FILE).read_text())["files"]
    assert "mp_rank_00_model_states.pt" in manifest and all(e["size"] > 0 for e in manifest.values())
    if nproc == 1:
        victim = damaged / "mp_rank_00_model_states.pt"
        victim.write_bytes(victim.read_bytes()[:1000])  # truncated
    else:
        victim = damaged / "layer_0_expert_1_mp_rank_00_model_states.pt"
        victim.unlink()  # one expert file gone
    result = check(run(train_command(path, nproc)))
    assert f"hashmoe: warning: step_8 is damaged: {victim}" in result.stderr, result.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'step_4'} (step 4)" in result.stdout
    assert logged_steps(run_dir) == list(range(1, 9))
    # the damaged folder is kept aside, not deleted; the new step 8 is whole
    assert (run_dir / "checkpoints" / "step_8.damaged").is_dir()
    assert [p.name for p in step_folders(run_dir)] == ["step_8", "step_4"]
    rows = train_rows(run_dir)
    assert rows[8]["train/loss"] > 0

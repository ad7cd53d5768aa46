"""The pseudo-label store: a Parquet dataset on any pyarrow filesystem (local path, s3://, gs://, a mount).

Layout under ``store.path``::

    teacher-<fingerprint>/          one directory per (model, prompt, labels): a changed prompt never mixes in
        parts/part-*.parquet        scored rows, committed atomically as the teacher streams
        rejects/part-*.parquet      rows the teacher could not take, with the reason
        labels.parquet              the consolidated pseudo-labels (raw + calibrated distributions, label, confidence)
        rejects.parquet             every reject, duplicates included
        manifest.json               what made this store, the label prior and the row accounting

Resume: each corpus row has a unique ``key`` (its file, content and occurrence: see corpus.py); a re-run skips
every key already committed, so a crash or Ctrl-C loses at most the parts in flight and never duplicates a row,
and a line inserted into a corpus file costs one teacher call, not a relabel of every row after it.

Every file is written to a staging name and renamed into place, so a reader never sees half of one. A part
that is provably corrupt (not Parquet) is moved to ``corrupt/`` and its rows are labeled again; any other read
error is raised, never taken as a reason to delete.

One writer at a time (``PseudoLabelStore.writer``): a lock file on local and mounted filesystems; on object
stores, which have no locks, a lease file refreshed at every commit, which a second writer refuses to take over
while it is fresh. The lease narrows the window two writers could race in; it does not close it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from llkd_ray import storage
from llkd_ray.config import Config
from llkd_ray.errors import UserError
from llkd_ray.label_scoring import calibrate, em_class_prior, label_prior, pick_labels
from llkd_ray.model_sources import model_identity
from llkd_ray.teacher_backends import prefix_alignment

logger = logging.getLogger(__name__)
WRITER_FILE = "writer.json"
LEASE_SECONDS = 600  # an object-store lease not refreshed for this long belongs to a writer that died


class StoreBusyError(UserError):
    """Another process is writing to this store."""


REJECT_COLUMNS = ("id", "text", "source", "key", "reject_reason")
STORE_LAYOUT = 2  # 2: rows resume by content key, not file:line; a store of another layout is not mixed in
LABELS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("gold", pa.string()),
        ("source", pa.string()),
        ("probs_raw", pa.list_(pa.float32())),
        ("probs_calibrated", pa.list_(pa.float32())),
        ("label", pa.string()),
        ("label_index", pa.int32()),
        ("confidence", pa.float32()),
        ("label_mass", pa.float32()),
        ("truncated", pa.bool_()),
        ("fingerprint", pa.string()),
    ]
)


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def teacher_fingerprint(cfg: Config) -> str:
    """Identifies what the teacher's raw scores depend on: the weights, the prompt and the labels. Not how they
    are computed: the backends agree within 2e-3, and teacher.continuation_tolerance bounds what variants not followed
    move a probability by. A dtype other than ``auto`` and the prompt's padding (another prompt) change the scores
    by more: each is in the fingerprint when in effect, absent when not, so a store labeled with neither keeps
    its fingerprint."""
    changed = {"dtype": cfg.teacher.dtype} if cfg.teacher.dtype != "auto" else {}
    alignment = prefix_alignment(cfg.task, cfg.teacher)
    if alignment:
        changed["align_prefix"] = alignment
        if cfg.teacher.align_prompt_end:
            changed["align_prompt_end"] = True
    return _digest(
        {
            "model": model_identity(cfg.teacher.model),
            "task": cfg.task.model_dump(),
            "max_text_tokens": cfg.teacher.max_text_tokens,
            "layout": STORE_LAYOUT,
            **changed,
        }
    )


def label_fingerprint(cfg: Config) -> str:
    """The teacher fingerprint plus calibration: identifies the final pseudo-labels."""
    return _digest(
        {"teacher": teacher_fingerprint(cfg), "calibrate": cfg.teacher.calibrate, "prior": cfg.teacher.class_prior}
    )


@dataclass
class StoreSummary:
    labels_path: str
    rows: int  # corpus rows accounted for in the store
    labeled: int
    rejected: int
    duplicates: int  # rejected because another row has the same id
    truncated: int
    labeled_this_run: int = 0
    rejected_this_run: int = 0
    resumed_rows: int = 0  # rows skipped because an earlier run had stored them

    def describe(self) -> str:
        line = f"read {self.rows} = labeled {self.labeled} + rejected {self.rejected}"
        if self.duplicates:
            line += f" (of which {self.duplicates} duplicate ids)"
        if self.resumed_rows:
            line += f"; resumed: {self.resumed_rows} rows were already stored"
        return line + f"; {self.truncated} truncated texts; labels: {self.labels_path}"


class PseudoLabelStore:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.fs, root = storage.resolve(cfg.store.path)
        self.root = f"{root.rstrip('/')}/teacher-{teacher_fingerprint(cfg)}"
        self.display_root = cfg.store.path.rstrip("/") + f"/teacher-{teacher_fingerprint(cfg)}"
        self._lease: dict | None = None  # held while this object writes to an object store
        for sub in ("parts", "rejects"):
            self.fs.create_dir(f"{self.root}/{sub}", recursive=True)

    @property
    def labels_path(self) -> str:
        return f"{self.display_root}/labels.parquet"

    # ---- streaming writes -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self):
        """Hold the store for one writer (``llkd label``): a second one gets StoreBusyError, with who holds it."""
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        if isinstance(self.fs, pafs.LocalFileSystem):
            from filelock import FileLock, Timeout

            lock = FileLock(f"{self.root}/writer.lock")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                raise self._busy(self._read_writer()) from None
            try:
                self._write_writer(me)
                yield
            finally:
                self.fs.delete_file(f"{self.root}/{WRITER_FILE}")
                lock.release()
            return
        holder = self._read_writer()
        if holder and time.time() - holder.get("refreshed", 0) < LEASE_SECONDS:
            raise self._busy(holder)
        self._lease = {**me, "token": uuid.uuid4().hex}
        self._refresh_lease()
        time.sleep(1)  # a writer that raced for the lease has written by now: whoever reads back another loses
        if (self._read_writer() or {}).get("token") != self._lease["token"]:
            raise self._busy(self._read_writer())
        try:
            yield
        finally:
            self.fs.delete_file(f"{self.root}/{WRITER_FILE}")
            self._lease = None

    def _refresh_lease(self) -> None:
        if self._lease is not None:
            self._write_writer({**self._lease, "refreshed": time.time()})

    def _read_writer(self) -> dict | None:
        try:
            with self.fs.open_input_stream(f"{self.root}/{WRITER_FILE}") as stream:
                return json.loads(stream.read())
        except (FileNotFoundError, ValueError):
            return None

    def _write_writer(self, record: dict) -> None:
        self._write_bytes(json.dumps(record).encode(), f"{self.root}/{WRITER_FILE}")

    def _busy(self, holder: dict | None) -> StoreBusyError:
        who = "another process"
        if holder:
            since = time.strftime("%H:%M:%S", time.localtime(holder["since"]))
            who = f"pid {holder['pid']} on {holder['host']}, since {since}"
        return StoreBusyError(
            f"{self.display_root} is being written by {who}: wait for that `llkd label` to finish (or stop it),"
            " then run again; nothing was written"
        )

    def stored_keys(self) -> set[str]:
        """Row keys already committed (labeled or rejected). A part that is not Parquet (which atomic writes
        should rule out) is moved to corrupt/ and its rows labeled again; a read error is raised, not guessed at."""
        keys: set[str] = set()
        for path in self._part_files("parts") + self._part_files("rejects"):
            try:
                keys.update(pq.read_table(path, columns=["key"], filesystem=self.fs)["key"].to_pylist())
            except pa.ArrowInvalid as error:
                aside = f"{self.root}/corrupt/{path.rsplit('/', 1)[1]}"
                logger.warning(
                    "%s is not readable Parquet (%s): moved to %s; its rows will be labeled again", path, error, aside
                )
                self.fs.create_dir(f"{self.root}/corrupt", recursive=True)
                self.fs.move(path, aside)
        return keys

    def commit(self, scored: pa.Table) -> tuple[int, int]:
        """Write one streamed batch: scored rows to parts/, rejected rows to rejects/. Returns the two counts."""
        rejected_mask = pc.is_valid(scored["reject_reason"])
        labeled = scored.filter(pc.invert(rejected_mask))
        rejected = scored.filter(rejected_mask).select(list(REJECT_COLUMNS))
        for sub, table in (("parts", labeled), ("rejects", rejected)):
            if table.num_rows:
                self._write_atomically(table, f"{self.root}/{sub}/part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet")
        self._refresh_lease()
        return labeled.num_rows, rejected.num_rows

    def _write_atomically(self, table: pa.Table, path: str) -> None:
        staging = _staging_name(path)
        pq.write_table(table, staging, filesystem=self.fs)
        self.fs.move(staging, path)  # a reader never sees half a file

    def _write_bytes(self, data: bytes, path: str) -> None:
        staging = _staging_name(path)
        with self.fs.open_output_stream(staging) as stream:
            stream.write(data)
        self.fs.move(staging, path)

    def _part_files(self, sub: str) -> list[str]:
        selector = pafs.FileSelector(f"{self.root}/{sub}", allow_not_found=True)
        return sorted(
            info.path
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.File and info.base_name.startswith("part-")
        )

    # ---- consolidation ----------------------------------------------------------------------------------------
    def finalize(self, labeled_this_run: int = 0, rejected_this_run: int = 0, resumed_rows: int = 0) -> StoreSummary:
        """Consolidate parts into labels.parquet: dedupe ids, estimate the prior, calibrate, pick labels."""
        label_names = self.cfg.task.label_names
        parts = self._read_all("parts")
        rejects = self._read_all("rejects")
        first_of_id: dict[str, int] = {}
        keep, duplicate_rows = [], []
        for index, row_id in enumerate(parts["id"].to_pylist() if parts is not None else []):
            if row_id in first_of_id:
                duplicate_rows.append(index)
            else:
                first_of_id[row_id] = index
                keep.append(index)
        duplicates = self._duplicates_as_rejects(parts, duplicate_rows, first_of_id)
        reject_tables = [t for t in (rejects, duplicates) if t is not None and t.num_rows]
        all_rejects = pa.concat_tables(reject_tables) if reject_tables else _empty_rejects()
        labels, priors = self._label_table(parts.take(keep) if parts is not None else None, label_names)
        self._write_atomically(labels, f"{self.root}/labels.parquet")
        self._write_atomically(all_rejects, f"{self.root}/rejects.parquet")
        summary = StoreSummary(
            labels_path=self.labels_path,
            rows=labels.num_rows + all_rejects.num_rows,
            labeled=labels.num_rows,
            rejected=all_rejects.num_rows,
            duplicates=duplicates.num_rows,
            truncated=int(pc.sum(labels["truncated"]).as_py() or 0) if labels.num_rows else 0,
            labeled_this_run=labeled_this_run,
            rejected_this_run=rejected_this_run,
            resumed_rows=resumed_rows,
        )
        self._write_manifest(priors, summary)
        return summary

    def _label_table(self, parts: pa.Table | None, label_names: list[str]) -> tuple[pa.Table, dict]:
        """The consolidated labels, and the priors behind them (the teacher's; the estimated class prior)."""
        fingerprint = label_fingerprint(self.cfg)
        if parts is None or parts.num_rows == 0:
            return LABELS_SCHEMA.empty_table(), {}
        raw = np.asarray(parts["probs_raw"].to_pylist(), dtype=np.float64)
        prior = label_prior(raw)
        calibrated = calibrate(raw, prior)
        estimated = None
        if self.cfg.teacher.class_prior == "estimated":
            calibrated, estimated = em_class_prior(calibrated)
        chosen, confidence = pick_labels(calibrated if self.cfg.teacher.calibrate else raw)
        table = pa.table(
            {
                "id": parts["id"],
                "text": parts["text"],
                "gold": parts["gold"],
                "source": parts["source"],
                "probs_raw": parts["probs_raw"],
                "probs_calibrated": pa.array(calibrated.astype(np.float32).tolist(), type=pa.list_(pa.float32())),
                "label": pa.array([label_names[i] for i in chosen], type=pa.string()),
                "label_index": pa.array(chosen, type=pa.int32()),
                "confidence": pa.array(confidence, type=pa.float32()),
                "label_mass": parts["label_mass"],
                "truncated": parts["truncated"],
                "fingerprint": pa.array([fingerprint] * parts.num_rows, type=pa.string()),
            },
            schema=LABELS_SCHEMA,
        )
        named = {"label_prior": prior, "estimated_class_prior": estimated}
        return table, {k: dict(zip(label_names, v.tolist())) for k, v in named.items() if v is not None}

    @staticmethod
    def _duplicates_as_rejects(parts: pa.Table | None, rows: list[int], first_of_id: dict[str, int]) -> pa.Table:
        if not rows:
            return _empty_rejects()
        taken = parts.take(rows)
        first_sources = parts["source"].to_pylist()
        reasons = [f"duplicate id (same as {first_sources[first_of_id[i]]})" for i in taken["id"].to_pylist()]
        return taken.select(list(REJECT_COLUMNS[:-1])).append_column("reject_reason", pa.array(reasons, pa.string()))

    def _read_all(self, sub: str) -> pa.Table | None:
        files = self._part_files(sub)
        if not files:
            return None
        return pa.concat_tables(pq.read_table(path, filesystem=self.fs) for path in files)

    def _write_manifest(self, priors: dict, summary: StoreSummary) -> None:
        manifest = {
            "teacher_fingerprint": teacher_fingerprint(self.cfg),
            "label_fingerprint": label_fingerprint(self.cfg),
            "model": model_identity(self.cfg.teacher.model),
            "task": self.cfg.task.model_dump(),
            "calibrate": self.cfg.teacher.calibrate,
            "label_prior": priors.get("label_prior"),
            "estimated_class_prior": priors.get("estimated_class_prior"),
            "counts": asdict(summary),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self._write_bytes(json.dumps(manifest, indent=2).encode(), f"{self.root}/manifest.json")


def _staging_name(path: str) -> str:
    folder, name = path.rsplit("/", 1)
    return f"{folder}/.tmp-{uuid.uuid4().hex[:8]}-{name}"


def _empty_rejects() -> pa.Table:
    return pa.table({name: pa.array([], type=pa.string()) for name in REJECT_COLUMNS})


def read_labels(cfg: Config, ids: set[str] | None = None) -> pa.Table:
    """The consolidated pseudo-labels for this config (run ``llkd label`` first).

    The store holds every row this teacher and prompt ever labelled, whatever corpus it came from (so a bigger
    corpus reuses a smaller one's labels); ``ids`` keeps the rows of one corpus (``corpus.corpus_ids``)."""
    store = PseudoLabelStore(cfg)
    try:
        labels = pq.read_table(f"{store.root}/labels.parquet", filesystem=store.fs)
    except FileNotFoundError:
        raise _not_labeled(store) from None
    if ids is None:
        return labels
    return labels.filter(pc.is_in(labels["id"], value_set=pa.array(sorted(ids), type=pa.string())))


def stored_counts(cfg: Config) -> dict:
    """The row accounting of the last consolidation, from the store's manifest."""
    store = PseudoLabelStore(cfg)
    try:
        with store.fs.open_input_stream(f"{store.root}/manifest.json") as stream:
            return json.loads(stream.read())["counts"]
    except FileNotFoundError:
        raise _not_labeled(store) from None


def _not_labeled(store: PseudoLabelStore) -> FileNotFoundError:
    return FileNotFoundError(
        f"no pseudo-labels for this teacher, prompt and labels in {store.display_root}: run `llkd label` first"
    )

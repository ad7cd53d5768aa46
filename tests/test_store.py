"""Pseudo-label store: fingerprints, atomic parts, crash leftovers, consolidation and row accounting (no Ray)."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llkd_ray.corpus import corpus_ids, load_rotten_tomatoes
from llkd_ray.pseudo_label_store import (
    PseudoLabelStore,
    StoreBusyError,
    label_fingerprint,
    read_labels,
    teacher_fingerprint,
)
from llkd_ray.teacher import SCORED_SCHEMA
from tests.conftest import make_config


def test_fingerprints_follow_model_prompt_labels_and_calibration():
    base = make_config()
    assert teacher_fingerprint(base) == teacher_fingerprint(make_config())
    changed = {
        "model": make_config(teacher={"model": "gemma-3-270m"}),
        "prompt": make_config(task={"instruction": "Is this review positive or negative?"}),
        "labels": make_config(task={"labels": [{"name": "good"}, {"name": "bad"}], "examples": []}),
        "dtype": make_config(teacher={"dtype": "bfloat16"}),  # moves probabilities by up to 0.24
        "no prefix padding": make_config(teacher={"align_prefix": False}),  # another prompt
        "another padding": make_config(teacher={"vllm": {"block_size": 64}}),  # padded to 64 tokens, not 32
        "the block asked for by engine_kwargs": make_config(teacher={"vllm": {"engine_kwargs": {"block_size": 64}}}),
        "prompt end padded": make_config(teacher={"align_prompt_end": True}),  # newlines before each text
    }
    for what, cfg in changed.items():
        assert teacher_fingerprint(cfg) != teacher_fingerprint(base), what
    uncalibrated = make_config(teacher={"calibrate": False})
    assert teacher_fingerprint(uncalibrated) == teacher_fingerprint(base)  # same raw scores are reused
    assert label_fingerprint(uncalibrated) != label_fingerprint(base)
    # Execution details do not change what the teacher computes: nor does a block size the padding already fits.
    assert teacher_fingerprint(make_config(teacher={"batch_size": 3, "num_actors": 2})) == teacher_fingerprint(base)
    assert teacher_fingerprint(make_config(teacher={"vllm": {"block_size": 16}})) == teacher_fingerprint(base)
    chat = {"prompt_style": "chat"}  # never padded, so the setting does not matter to its labels
    assert teacher_fingerprint(make_config(task=chat)) == teacher_fingerprint(
        make_config(task=chat, teacher={"align_prefix": False})
    )


def test_new_weights_under_the_same_path_and_config_get_a_new_fingerprint(tmp_path):
    """Weights retrained in place (same directory, same config.json, same size, other bytes) must not reuse the
    labels of the old ones."""
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    weights = tmp_path / "model.safetensors"
    cfg = make_config(teacher={"model": str(tmp_path)})
    weights.write_bytes(b"\x01" * 3_000_000)
    before = teacher_fingerprint(cfg)
    assert teacher_fingerprint(cfg) == before  # stable while nothing changes
    weights.write_bytes(b"\x02" * 3_000_000)
    assert teacher_fingerprint(cfg) != before


def scored(rows):
    full = [
        {"gold": None, "reject_reason": None, "probs_raw": None, "label_mass": None, "truncated": False}
        | {"key": f"key-{row['source']}"}  # the resume key (corpus.keyed_rows); here one per source
        | row
        for row in rows
    ]
    return pa.Table.from_pylist(full, schema=SCORED_SCHEMA)


def test_commit_resume_and_finalize_account_for_every_row(tmp_path):
    cfg = make_config(store={"path": str(tmp_path / "store")})
    store = PseudoLabelStore(cfg)
    assert store.stored_keys() == set()
    assert store.commit(
        scored(
            [
                {"id": "a", "text": "A", "source": "f:1", "probs_raw": [0.9, 0.1], "label_mass": 0.8},
                {
                    "id": "b",
                    "text": "B",
                    "source": "f:2",
                    "probs_raw": [0.6, 0.4],
                    "label_mass": 0.9,
                    "truncated": True,
                },
                {"id": "x", "text": "", "source": "f:3", "reject_reason": "text is empty"},
            ]
        )
    ) == (2, 1)
    assert store.commit(
        scored(
            [
                {
                    "id": "a",
                    "text": "A",
                    "source": "f:4",
                    "probs_raw": [0.9, 0.1],
                    "label_mass": 0.8,
                },  # same text again
                {"id": "c", "text": "C", "source": "f:5", "probs_raw": [0.3, 0.7], "label_mass": 0.7},
            ]
        )
    ) == (2, 0)
    # A part that is not Parquet is moved aside (not deleted: nothing is lost) and its rows count as not stored.
    root = tmp_path / "store" / f"teacher-{teacher_fingerprint(cfg)}"
    (root / "parts" / "part-999-broken.parquet").write_bytes(b"PAR1junk")
    reopened = PseudoLabelStore(cfg)
    assert reopened.stored_keys() == {f"key-f:{n}" for n in range(1, 6)}
    assert (root / "corrupt" / "part-999-broken.parquet").read_bytes() == b"PAR1junk"
    assert not (root / "parts" / "part-999-broken.parquet").exists()

    summary = reopened.finalize()
    assert (summary.rows, summary.labeled, summary.rejected, summary.duplicates, summary.truncated) == (5, 3, 2, 1, 1)
    labels = pq.read_table(summary.labels_path).to_pylist()
    assert [row["id"] for row in labels] == ["a", "b", "c"]
    prior = np.mean([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]], axis=0)  # (0.6, 0.4)
    expected_b = np.array([0.6, 0.4]) / prior / (np.array([0.6, 0.4]) / prior).sum()  # (0.5, 0.5): a tie → first
    np.testing.assert_allclose(labels[1]["probs_calibrated"], expected_b, rtol=1e-6)
    assert [row["label"] for row in labels] == ["positive", "positive", "negative"]
    rejects = pq.read_table(summary.labels_path.replace("labels.parquet", "rejects.parquet")).to_pylist()
    assert sorted(r["reject_reason"] for r in rejects) == ["duplicate id (same as f:1)", "text is empty"]
    manifest = json.loads((tmp_path / "store" / f"teacher-{teacher_fingerprint(cfg)}" / "manifest.json").read_text())
    assert list(manifest["label_prior"]) == ["positive", "negative"]
    np.testing.assert_allclose(list(manifest["label_prior"].values()), [0.6, 0.4])
    assert manifest["counts"]["rows"] == 5


def test_uncalibrated_labels_come_from_the_raw_distribution(tmp_path):
    cfg = make_config(store={"path": str(tmp_path / "s")}, teacher={"calibrate": False})
    store = PseudoLabelStore(cfg)
    store.commit(
        scored(
            [
                {"id": "a", "text": "A", "source": "f:1", "probs_raw": [0.9, 0.1], "label_mass": 1.0},
                {"id": "b", "text": "B", "source": "f:2", "probs_raw": [0.7, 0.3], "label_mass": 1.0},
            ]
        )
    )
    labels = pq.read_table(store.finalize().labels_path).to_pylist()
    assert [row["label"] for row in labels] == ["positive", "positive"]  # calibrated, b would be negative
    assert labels[1]["confidence"] == np.float32(0.7)


def test_read_labels_keeps_the_rows_of_the_configured_corpus(tmp_path, ray_cluster):
    """One store serves every corpus labelled with this teacher and prompt; a run trains on its own corpus only."""
    big = make_config(store={"path": str(tmp_path / "s")}, corpus={"limit": 6})
    small = make_config(store={"path": str(tmp_path / "s")}, corpus={"limit": 4})
    rows = load_rotten_tomatoes(seed=big.corpus.seed, limit=6).to_pylist()
    store = PseudoLabelStore(big)
    store.commit(
        scored(
            [
                {"id": r["id"], "text": r["text"], "source": r["source"], "probs_raw": [0.8, 0.2], "label_mass": 1.0}
                for r in rows
            ]
        )
    )
    store.finalize()
    assert corpus_ids(small.corpus) == {r["id"] for r in rows[:4]}
    assert read_labels(small, ids=corpus_ids(small.corpus))["id"].to_pylist() == [r["id"] for r in rows[:4]]
    assert read_labels(small).num_rows == 6


def test_a_transient_read_error_deletes_no_part(tmp_path, monkeypatch):
    """A flaky read (an S3 timeout, say) is raised: it is no proof that the part is corrupt."""
    import llkd_ray.pseudo_label_store as store_module

    cfg = make_config(store={"path": str(tmp_path / "store")})
    store = PseudoLabelStore(cfg)
    store.commit(scored([{"id": "a", "text": "A", "source": "f:1", "probs_raw": [0.9, 0.1], "label_mass": 0.8}]))
    parts = sorted((tmp_path / "store").rglob("part-*.parquet"))
    real_read = store_module.pq.read_table

    def flaky(*args, **kwargs):
        raise OSError("When reading information for key 'parts/part-1.parquet': AWS Error NETWORK_CONNECTION")

    monkeypatch.setattr(store_module.pq, "read_table", flaky)
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        PseudoLabelStore(cfg).stored_keys()
    monkeypatch.setattr(store_module.pq, "read_table", real_read)
    assert sorted((tmp_path / "store").rglob("part-*.parquet")) == parts
    assert PseudoLabelStore(cfg).stored_keys() == {"key-f:1"}


def test_a_second_writer_is_refused_and_told_who_holds_the_store(tmp_path):
    cfg = make_config(store={"path": f"file://{tmp_path}/store"})
    first, second = PseudoLabelStore(cfg), PseudoLabelStore(cfg)
    with first.writer():
        with pytest.raises(StoreBusyError, match=rf"is being written by pid {os.getpid()} on .*nothing was written"):
            with second.writer():
                pass
    with second.writer():  # released: the next writer gets it
        pass


def test_object_store_writers_hold_a_lease(tmp_path):
    """Object stores have no locks: the writer keeps a lease file fresh, and a second writer respects it."""
    import pyarrow.fs as pafs

    cfg = make_config(store={"path": str(tmp_path / "store")})
    first, second = PseudoLabelStore(cfg), PseudoLabelStore(cfg)
    for store in (first, second):  # a real filesystem that is not the local one, as s3:// and gs:// are not
        store.fs = pafs.SubTreeFileSystem("/", pafs.LocalFileSystem())
    lease = tmp_path / "store" / f"teacher-{teacher_fingerprint(cfg)}" / "writer.json"
    with first.writer():
        assert json.loads(lease.read_text())["pid"] == os.getpid()
        with pytest.raises(StoreBusyError):
            with second.writer():
                pass
        first.commit(scored([{"id": "a", "text": "A", "source": "f:1", "probs_raw": [0.9, 0.1], "label_mass": 0.8}]))
        assert time.time() - json.loads(lease.read_text())["refreshed"] < 5  # each commit refreshes it
    assert not lease.exists()
    stale = {"host": "gone", "pid": 1, "since": 0, "refreshed": time.time() - 3600, "token": "old"}
    lease.write_text(json.dumps(stale))
    with second.writer():  # a writer that stopped refreshing an hour ago is gone
        pass


def test_an_estimated_class_prior_is_applied_and_recorded(tmp_path):
    rows = [
        {"id": f"a{i}", "text": f"A{i}", "source": f"f:{i}", "probs_raw": [0.9, 0.1], "label_mass": 1.0}
        for i in range(3)
    ]
    rows.append({"id": "b", "text": "B", "source": "f:9", "probs_raw": [0.55, 0.45], "label_mass": 1.0})
    for prior in ("uniform", "estimated"):
        cfg = make_config(store={"path": str(tmp_path / prior)}, teacher={"class_prior": prior})
        store = PseudoLabelStore(cfg)
        store.commit(scored(rows))
        summary = store.finalize()
        manifest = json.loads((Path(store.root) / "manifest.json").read_text())
        labels = pq.read_table(summary.labels_path).to_pylist()
        if prior == "uniform":
            assert manifest["estimated_class_prior"] is None
            assert labels[-1]["label"] == "negative"  # prior (.8125, .1875): .55/.8125 < .45/.1875
        else:
            estimated = manifest["estimated_class_prior"]
            assert estimated["positive"] == pytest.approx(0.8125, abs=1e-4)  # EM by hand: .637 = .784π
            assert labels[-1]["label"] == "positive"  # the estimated prior flips it back

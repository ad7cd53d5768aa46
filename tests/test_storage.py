"""Run directories and students on filesystem URIs (pyarrow), the code path s3:// and gs:// take."""

import time

import pytest

from llkd_ray import storage
from llkd_ray.serving import resolve_student_dir


def test_a_run_directory_on_a_uri_is_staged_locally_then_published(tmp_path):
    run = storage.RunDirectory(f"file://{tmp_path}/bucket/runs", "demo")
    assert run.is_remote and not str(run.local).startswith(str(tmp_path))
    (run.local / "student").mkdir()
    (run.local / "student" / "config.json").write_text("{}")
    (run.local / "report.md").write_text("# report")
    assert run.publish() == f"file://{tmp_path}/bucket/runs/demo"
    assert (tmp_path / "bucket/runs/demo/report.md").read_text() == "# report"
    assert (tmp_path / "bucket/runs/demo/student/config.json").is_file()
    assert not run.local.exists()  # the staging copy is gone once published


def test_a_local_run_directory_is_written_in_place(tmp_path):
    run = storage.RunDirectory(str(tmp_path / "runs"), "demo")
    assert not run.is_remote and run.local == tmp_path / "runs" / "demo" and run.local.is_dir()
    assert run.publish() == str(tmp_path / "runs" / "demo")


def test_fetching_a_directory_caches_it_until_it_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("LLKD_CACHE", str(tmp_path / "cache"))
    (tmp_path / "remote" / "sub").mkdir(parents=True)
    (tmp_path / "remote" / "sub" / "weights.bin").write_bytes(b"v1")
    uri = f"file://{tmp_path}/remote"
    first = storage.fetch_directory(uri)
    assert first.parent == tmp_path / "cache" / "fetched"
    assert (first / "sub" / "weights.bin").read_bytes() == b"v1"
    assert storage.fetch_directory(uri) == first  # unchanged: served from the cache
    time.sleep(0.01)
    (tmp_path / "remote" / "sub" / "weights.bin").write_bytes(b"v2 re-exported")
    second = storage.fetch_directory(uri)
    assert second != first and (second / "sub" / "weights.bin").read_bytes() == b"v2 re-exported"
    with pytest.raises(FileNotFoundError, match="no such directory"):
        storage.fetch_directory(f"file://{tmp_path}/missing")


def test_resolve_student_dir_takes_paths_and_uris(tmp_path, monkeypatch):
    student = tmp_path / "run" / "student"
    student.mkdir(parents=True)
    (student / "config.json").write_text("{}")
    assert resolve_student_dir(str(tmp_path / "run")) == str(student)
    assert resolve_student_dir(str(student)) == str(student)
    assert resolve_student_dir(f"file://{tmp_path}/run") == f"file://{tmp_path}/run/student"
    monkeypatch.chdir(tmp_path)
    assert resolve_student_dir("run") == str(student)  # relative paths become absolute for the replicas
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        resolve_student_dir(f"file://{tmp_path}/nothing")

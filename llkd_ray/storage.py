"""Paths that may live on any pyarrow filesystem: a local path, a shared mount, ``s3://``, ``gs://``, ``file://``.

Multi-node runs need outputs every node can read. The pseudo-label store and Ray Train's storage write to the
filesystem directly; a run directory is written locally (plots, the exported student and the report are made by
local libraries) and published to its URI when the run ends; a student on a URI is fetched into a local cache by
whoever loads it (a Serve replica on any node).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from llkd_ray.model_sources import cache_root


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def absolute(path: str | Path) -> str:
    """A URI as it is, a local path made absolute (what pyarrow and Ray Train's storage_path take)."""
    return str(path) if is_uri(path) else os.path.abspath(path)


def resolve(path: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    return pafs.FileSystem.from_uri(absolute(path))


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def command_log(output_dir: str, name: str, command: str) -> Path:
    """Where a command writes its full log: inside the run directory when that is local, else in the local cache
    (a run directory on a URI is only written when the run ends)."""
    base = cache_root() / "logs" / name if is_uri(output_dir) else Path(output_dir) / name
    return base / f"{command}.log"


def exists(path: str | Path) -> bool:
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


class RunDirectory:
    """``<dir>/<name>``, written in ``local``: the directory itself, or for a URI a local staging directory that
    ``publish`` copies to the URI and then removes."""

    def __init__(self, directory: str, name: str):
        self.target = join(directory, name)
        self.is_remote = is_uri(directory)
        self.local = Path(tempfile.mkdtemp(prefix=f"llkd-run-{name}-")) if self.is_remote else Path(self.target)
        self.local.mkdir(parents=True, exist_ok=True)

    def publish(self) -> str:
        if self.is_remote:
            fs, inner = resolve(self.target)
            fs.create_dir(inner, recursive=True)
            pafs.copy_files(str(self.local), inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
            shutil.rmtree(self.local, ignore_errors=True)
        return self.target


def fetch_directory(uri: str) -> Path:
    """A local copy of a directory on a URI, cached under ~/.cache/llkd_ray/fetched ($LLKD_CACHE) by a hash of
    the URI and of its listing (names, sizes, modification times): a student re-exported there is fetched again.
    The copy lands in a temporary directory and is renamed into place: a concurrent reader never sees half."""
    fs, inner = resolve(uri)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri}: no such directory")
    files = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    listing = sorted((info.path, info.size, info.mtime_ns) for info in files)
    key = hashlib.sha256(repr((uri, listing)).encode()).hexdigest()[:16]
    destination = cache_root() / "fetched" / key
    if destination.exists():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="fetching-", dir=destination.parent))
    pafs.copy_files(inner, str(staging), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    try:
        staging.rename(destination)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return destination

"""What a person sees in the terminal: a line per stage, one progress bar, a line per epoch and a summary.

Everything else goes to the run's log file: Ray, Ray Data's progress tables, vLLM, DeepSpeed, transformers, Python
warnings, C++ logs, and what Ray forwards from workers on every node. The process's stdout and stderr file
descriptors are pointed at the log file, so nothing can slip past. The ``llkd_ray`` logger and the progress bar
write to the terminal, which is kept aside. Worker lines that start with ``CONSOLE_TAG`` (a train worker's epoch
line) are shown on the terminal too. ``verbose`` leaves the streams alone: everything reaches the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

LOGGER = "llkd_ray"
CONSOLE_TAG = "[llkd] "  # a worker's line that starts with this belongs on the driver's terminal
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

logger = logging.getLogger(LOGGER)
_terminal: TextIO | None = None  # the terminal's stderr, kept aside while fds 1 and 2 point at the log file


def worker_console_line(message: str) -> None:
    """From a Ray worker: a line for the driver's terminal (Ray forwards worker stdout to the driver)."""
    print(CONSOLE_TAG + message, flush=True)


def progress_stream() -> TextIO:
    return _terminal or sys.stderr


def _show_tagged_worker_lines(terminal: TextIO):
    """A handler for Ray's stream of worker output on the driver: tagged lines go to the terminal (the rest is
    printed by Ray's own handler into stdout, which is the log file)."""

    shown: set[str] = set()  # Ray delivers a train worker's lines twice; every tagged line is unique (epoch n)

    def handle(data: dict) -> None:
        for line in data.get("lines", []):
            if line.startswith(CONSOLE_TAG) and line not in shown:
                shown.add(line)
                terminal.write(line + "\n")
                terminal.flush()

    return handle


@contextlib.contextmanager
def console(log_file: Path | None, verbose: bool = False) -> Iterator[Path | None]:
    """Quiet terminal, full log file, for the duration of one command."""
    global _terminal
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    logger.setLevel(logging.INFO)
    if verbose or log_file is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(CONSOLE_TAG + "%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
        try:
            yield log_file
        finally:
            logger.removeHandler(handler)
            logger.propagate = True
        return

    log_file.parent.mkdir(parents=True, exist_ok=True)
    ray_was_connected = _ray_connected()
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    log_stream = os.fdopen(os.dup(log_fd), "w", buffering=1)  # the log file, whatever sys.stderr becomes
    to_terminal = logging.StreamHandler(terminal)
    to_terminal.setFormatter(logging.Formatter(CONSOLE_TAG + "%(message)s"))
    to_file = logging.StreamHandler(log_stream)
    to_file.setFormatter(logging.Formatter(FILE_FORMAT))
    with fds_pointed_at(log_fd, (1, 2)):
        os.close(log_fd)
        logger.addHandler(to_terminal)
        root.addHandler(to_file)
        logging.captureWarnings(True)
        _terminal = terminal
        dispatcher = _ray_worker_dispatcher()
        if dispatcher is not None:
            dispatcher.add_handler("llkd_console", _show_tagged_worker_lines(terminal))
        logger.info("full log: %s", log_file)
        try:
            yield log_file
        finally:
            if not ray_was_connected:  # what this command connected: Ray's exit messages belong in the log too
                _disconnect_ray()
            if dispatcher is not None:
                dispatcher.remove_handler("llkd_console")
            _terminal = None
            logging.captureWarnings(False)
            logger.removeHandler(to_terminal)
            root.removeHandler(to_file)
            terminal.close()
            log_stream.close()


@contextlib.contextmanager
def fds_pointed_at(target_fd: int, fds: tuple[int, ...]) -> Iterator[None]:
    """Point file descriptors (1, 2) at ``target_fd`` for a while: what C code, child processes and Python all
    write through. Python's buffers are flushed on the way in and out so nothing lands on the wrong side."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    for fd in fds:
        os.dup2(target_fd, fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip(fds, saved):
            os.dup2(copy, fd)
            os.close(copy)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Everything written to stdout meanwhile goes to stderr, Python's sys.stdout and file descriptor 1 both, so
    that stdout carries a command's result alone (DeepSpeed once printed "Setting accelerator to CPU" there while
    transformers loaded a tokenizer)."""
    with fds_pointed_at(2, (1,)), contextlib.redirect_stdout(sys.stderr):
        yield


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _disconnect_ray() -> None:
    if _ray_connected():
        sys.modules["ray"].shutdown()


def _ray_worker_dispatcher():
    """Ray's driver-side fan-out of forwarded worker output (a private API; None if it moved)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher
    except ImportError:
        return None
    return global_worker_stdstream_dispatcher

"""A local Ray cluster that outlives one command: what ``llkd serve --detach`` deploys onto when none is running.

It is started as ``ray start --head --block`` in a session of its own, so it survives the command that started it.
Its pid is recorded, and ``llkd serve --stop`` ends that process group: every Ray process it started, and nothing
else. ``ray stop`` would stop every Ray cluster on the host.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from llkd_ray.model_sources import cache_root

START_TIMEOUT_S = 180


def state_file() -> Path:
    return cache_root() / "local-cluster.json"


def running_cluster() -> str | None:
    """The address of the cluster ``ray start`` last started on this host, if its GCS is alive."""
    from ray._private.services import find_bootstrap_address, find_gcs_addresses

    address = find_bootstrap_address(None)
    return address if address and address in find_gcs_addresses() else None


def _port(preferred: int) -> int:
    """``preferred`` (Ray's usual port) when it is free, else any free port."""
    for candidate in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise OSError("no free port")


def start_local_cluster() -> str:
    """Start a persistent single-node cluster on loopback; returns its address."""
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray") or "ray"
    state = state_file()
    state.parent.mkdir(parents=True, exist_ok=True)
    log_path = state.with_suffix(".log")
    dashboard_port = _port(8265)
    command = [
        ray_cli,
        "start",
        "--head",
        "--block",
        f"--port={_port(6379)}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--disable-usage-stats",
    ]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        )
    deadline = time.time() + START_TIMEOUT_S
    while (address := running_cluster()) is None:
        if process.poll() is not None or time.time() > deadline:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"could not start a local Ray cluster (`{' '.join(command)}`):\n{tail}")
        time.sleep(1)
    state.write_text(
        json.dumps({"pid": process.pid, "address": address, "dashboard": f"http://127.0.0.1:{dashboard_port}"})
    )
    return address


def _group_alive(group: int) -> bool:
    """Whether any process of this group still runs (a zombie left to a container's init does not count)."""
    import psutil

    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == group and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


def started_cluster() -> dict | None:
    """What ``start_local_cluster`` recorded, if that cluster is still running."""
    try:
        recorded = json.loads(state_file().read_text())
        return recorded if _group_alive(int(recorded["pid"])) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stop_local_cluster(timeout_s: float = 60) -> bool:
    """Stop the cluster ``start_local_cluster`` started (only that one); False if there is none."""
    recorded = started_cluster()
    state_file().unlink(missing_ok=True)
    if recorded is None:
        return False
    group = recorded["pid"]  # the session leader: its process group holds every process it started
    os.killpg(group, signal.SIGTERM)
    deadline = time.time() + timeout_s
    while _group_alive(group):
        if time.time() > deadline:
            os.killpg(group, signal.SIGKILL)
            break
        time.sleep(0.5)
    return True

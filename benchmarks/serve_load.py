"""Serving load: the Serve deployment against a plain FastAPI + uvicorn server holding the same student, in one run.

Paths, each with one copy of the same MiniLM student on the same cores, fed the same Rotten Tomatoes snippets:
- ``uvicorn``: what a user writes without Serve (``plain_server.py``: one process, a plain ``def`` endpoint);
- ``serve proxy``: the Serve app behind Serve's HTTP proxy, with Serve's default settings;
- ``serve proxy, optimized``: the same with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (what ``llkd serve`` starts);
- ``serve direct``: throughput-optimized Serve's direct ingress, where the replica answers HTTP itself; batched
  (``@serve.batch``) and unbatched.

Each runs at concurrency 1, 8 and 32 with 1-text and 16-text requests. For the Serve paths the replica's own
counters (``/v1/metadata``) split a request's time: in the replica (queue, tokenization, forward) and outside
it (proxy, routing, the client); and the model's share (tokenization + forward) per request. The two Ray
clusters (default and throughput-optimized) run one after the other, each in a subprocess of this run, because
Serve reads its mode when its processes start.

    python benchmarks/serve_load.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
HERE = Path(__file__).resolve().parent
SETTINGS = [(concurrency, per_request) for concurrency in (1, 8, 32) for per_request in (1, 16)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def load(url: str, texts: list[str], concurrency: int, per_request: int, max_requests: int, seconds: float):
    import aiohttp

    latencies, errors, sent = [], 0, 0
    deadline = time.perf_counter() + seconds

    async def caller(session):
        nonlocal errors, sent
        while sent < max_requests and time.perf_counter() < deadline:
            start = (sent * per_request) % len(texts)
            sent += 1
            body = {"texts": [texts[(start + i) % len(texts)] for i in range(per_request)]}
            began = time.perf_counter()
            async with session.post(url, json=body) as response:
                await response.read()
                errors += response.status != 200
            latencies.append(time.perf_counter() - began)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        began = time.perf_counter()
        await asyncio.gather(*(caller(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return {
        "requests": len(latencies),
        "errors": errors,
        "req_s": len(latencies) / elapsed,
        "texts_s": len(latencies) * per_request / elapsed,
        "mean_ms": 1000 * float(np.mean(latencies)),
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
    }


def replica_stats(base: str) -> dict | None:
    import requests

    response = requests.get(f"{base}/v1/metadata", timeout=30)
    return response.json()["stats"] if response.ok and "stats" in response.json() else None


def measure(base: str, texts: list[str], args) -> dict:
    """Every setting against one server at ``base``; with the replica's time split where it reports it."""
    results = {}
    for concurrency, per_request in SETTINGS:
        url = f"{base}/v1/classify"
        asyncio.run(load(url, texts, concurrency, per_request, 2 * concurrency, 10))  # warm-up
        before = replica_stats(base)
        result = asyncio.run(load(url, texts, concurrency, per_request, args.requests, args.seconds))
        after = replica_stats(base)
        if before and after:
            requests_seen = max(after["requests"] - before["requests"], 1)
            per = {
                key: 1000 * (after[key] - before[key]) / requests_seen
                for key in ("in_replica_s", "tokenize_s", "forward_s")
            }
            result["in_replica_ms"] = per["in_replica_s"]
            result["model_ms"] = per["tokenize_s"] + per["forward_s"]
            result["outside_ms"] = result["mean_ms"] - per["in_replica_s"]
        results[f"{concurrency}x{per_request}"] = result
    return results


def serve_phase(args) -> None:
    """In a subprocess: one Ray cluster (in the mode this process's environment sets), its paths measured."""
    import ray
    from ray import serve

    from llkd_ray.config import ServeConfig
    from llkd_ray.serving import build_app, direct_ingress_urls

    texts = json.loads(Path(args.texts_file).read_text())
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    apps = ("batched", "unbatched") if args.phase == "optimized" else ("batched",)
    for name in apps:
        options = ServeConfig(batching=name == "batched", max_batch_size=32, batch_wait_timeout_s=0.005, num_cpus=1)
        serve.run(build_app(args.student, options), name=name, route_prefix=f"/{name}", blocking=False)
    results = {}
    if args.phase == "default":
        results["serve proxy"] = measure(f"http://127.0.0.1:{port}/batched", texts, args)
    else:
        results["serve proxy, optimized"] = measure(f"http://127.0.0.1:{port}/batched", texts, args)
        for name in apps:
            (direct,) = direct_ingress_urls(ServeConfig(), app_name=name)
            results[f"serve direct, {name}"] = measure(f"{direct}/{name}", texts, args)
    Path(args.out).write_text(json.dumps(results))
    serve.shutdown()
    ray.shutdown()


def plain_uvicorn(student: str, texts: list[str], args) -> dict:
    port = free_port()
    env = {**os.environ, "STUDENT_DIR": student, "MAX_LENGTH": "64"}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "plain_server:app", "--port", str(port), "--log-level", "warning"],
        cwd=HERE,
        env=env,
    )
    try:
        import requests

        deadline = time.time() + 120
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError("the plain uvicorn server did not start")
            time.sleep(0.5)
        return measure(f"http://127.0.0.1:{port}", texts, args)
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_phase(phase: str, student: str, texts_file: str, args, extra_env: dict) -> dict:
    out = tempfile.mktemp(suffix=".json")
    command = [
        sys.executable,
        __file__,
        "--phase",
        phase,
        "--student",
        student,
        "--texts-file",
        texts_file,
        "--out",
        out,
    ]
    command += ["--requests", str(args.requests), "--seconds", str(args.seconds)]
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_SERVE_")}
    subprocess.run(command, env={**env, **extra_env}, check=True, timeout=1800)
    return json.loads(Path(out).read_text())


def report(results: dict) -> None:
    print(f"\n{os.cpu_count()} CPU cores; one replica (or one uvicorn process) per path; client on the same cores")
    header = f"{'path':<26}{'conc':>5}{'texts':>6}{'reqs':>6}{'err':>5}{'req/s':>8}{'texts/s':>9}{'p50 ms':>8}"
    print(header + f"{'p99 ms':>8}{'replica':>9}{'model':>7}{'outside':>9}")
    for path, by_setting in results.items():
        for setting, r in by_setting.items():
            concurrency, per_request = setting.split("x")
            split = "".join(
                f"{r[key]:>{width}.1f}" if key in r else f"{'-':>{width}}"
                for key, width in (("in_replica_ms", 9), ("model_ms", 7), ("outside_ms", 9))
            )
            print(
                f"{path:<26}{concurrency:>5}{per_request:>6}{r['requests']:>6}{r['errors']:>5}{r['req_s']:>8.1f}"
                f"{r['texts_s']:>9.1f}{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}{split}"
            )
    print("(replica, model, outside: ms per request, mean; model = tokenization + forward, shared by a batch)")
    plain = results["uvicorn"]
    print()
    for path in ("serve proxy", "serve proxy, optimized", "serve direct, batched"):
        for setting in ("32x1", "32x16"):
            r, p = results[path][setting], plain[setting]
            print(
                f"{path} / uvicorn at concurrency 32, {setting.split('x')[1]:>2} text(s) a request: "
                f"throughput {r['req_s'] / p['req_s']:.2f}x, p99 {r['p99_ms'] / p['p99_ms']:.2f}x"
            )
    for setting in ("32x1", "32x16"):
        ratio = (
            results["serve direct, batched"][setting]["req_s"] / results["serve direct, unbatched"][setting]["req_s"]
        )
        print(f"batched / unbatched (direct) at concurrency 32, {setting.split('x')[1]:>2} text(s): {ratio:.2f}x")
    print(f"errors in all: {sum(r['errors'] for by in results.values() for r in by.values())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", help="run directory or exported student (default: a fresh MiniLM student)")
    parser.add_argument("--requests", type=int, default=400, help="at most this many requests per setting")
    parser.add_argument("--seconds", type=float, default=12, help="at most this long per setting")
    parser.add_argument("--phase", choices=("default", "optimized"), help=argparse.SUPPRESS)
    parser.add_argument("--texts-file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return serve_phase(args)

    from llkd_ray.corpus import load_rotten_tomatoes
    from llkd_ray.serving import THROUGHPUT_OPTIMIZED_ENV, resolve_student_dir

    if args.student is None:
        from llkd_ray.student import export_student, load_student

        network, tokenizer = load_student("minilm-l6", ["positive", "negative"])
        args.student = str(export_student(network, tokenizer, tempfile.mkdtemp() + "/student", {}, max_length=64))
    student = resolve_student_dir(args.student)
    texts = load_rotten_tomatoes(seed=5, limit=500)["text"].to_pylist()
    texts_file = tempfile.mktemp(suffix=".json")
    Path(texts_file).write_text(json.dumps(texts))

    results = {"uvicorn": plain_uvicorn(student, texts, args)}
    results.update(run_phase("default", student, texts_file, args, {}))
    results.update(run_phase("optimized", student, texts_file, args, THROUGHPUT_OPTIMIZED_ENV))
    report(results)


if __name__ == "__main__":
    main()

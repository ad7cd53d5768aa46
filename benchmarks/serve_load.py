"""Serving load: throughput and p50/p99 latency at concurrency 1, 8 and 32, batched vs unbatched, in one run.

Both deployments serve the same student (one replica each, the same CPUs) on loopback; each request carries one
Rotten Tomatoes snippet. The load generator is asyncio + aiohttp in this process, bounded in requests and time.

    python benchmarks/serve_load.py                          # a MiniLM student (weights as exported by training)
    python benchmarks/serve_load.py --student runs/llkd-default
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import tempfile
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def load(url: str, texts: list[str], concurrency: int, max_requests: int, max_seconds: float) -> dict:
    import aiohttp

    latencies, errors, sent = [], 0, 0
    deadline = time.perf_counter() + max_seconds

    async def caller(session):
        nonlocal errors, sent
        while sent < max_requests and time.perf_counter() < deadline:
            text = texts[sent % len(texts)]
            sent += 1
            started = time.perf_counter()
            async with session.post(url, json={"texts": [text]}) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - started)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(caller(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "errors": errors,
        "throughput": len(latencies) / elapsed,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", help="run directory or exported student (default: a fresh MiniLM student)")
    parser.add_argument("--requests", type=int, default=600, help="at most this many requests per setting")
    parser.add_argument("--seconds", type=float, default=20, help="at most this long per setting")
    args = parser.parse_args()

    import ray
    from ray import serve

    from llkd_ray.config import ServeConfig
    from llkd_ray.corpus import load_rotten_tomatoes
    from llkd_ray.serving import build_app

    student = args.student
    if student is None:
        from llkd_ray.student import export_student, load_student

        network, tokenizer = load_student("minilm-l6", ["positive", "negative"])
        student = str(export_student(network, tokenizer, tempfile.mkdtemp() + "/student", {}, max_length=64))
    texts = load_rotten_tomatoes(seed=5, limit=500)["text"].to_pylist()

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for name, batching in (("batched", True), ("unbatched", False)):
        options = ServeConfig(batching=batching, max_batch_size=32, batch_wait_timeout_s=0.005, num_cpus=1)
        serve.run(build_app(student, options), name=name, route_prefix=f"/{name}", blocking=False)

    results = {}
    for concurrency in (1, 8, 32):
        for name in ("batched", "unbatched"):
            url = f"http://127.0.0.1:{port}/{name}/v1/classify"
            asyncio.run(load(url, texts, concurrency, 20, 5))  # warm-up
            results[name, concurrency] = asyncio.run(load(url, texts, concurrency, args.requests, args.seconds))
    serve.shutdown()
    ray.shutdown()

    print(f"\nstudent {student}; {os.cpu_count()} CPU cores; one replica per deployment; 1 text per request")
    print(f"{'deployment':<11}{'concurrency':>12}{'requests':>10}{'errors':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for (name, concurrency), r in sorted(results.items(), key=lambda item: (item[0][1], item[0][0])):
        print(
            f"{name:<11}{concurrency:>12}{r['requests']:>10}{r['errors']:>8}{r['throughput']:>9.1f}"
            f"{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
        )
    ratio = results["batched", 32]["throughput"] / results["unbatched", 32]["throughput"]
    print(
        f"\nbatched / unbatched throughput at concurrency 32: {ratio:.2f}x;"
        f" errors in all: {sum(r['errors'] for r in results.values())}"
    )


if __name__ == "__main__":
    main()

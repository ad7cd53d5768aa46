"""Hostile load: 5,000 requests at concurrency 32 against a real Serve app, good ones mixed with every bad kind.

What must hold: no 5xx at all; every good request answered 200 with the prediction the same student gives
offline; the replica's memory bounded (its peak RSS, read from /v1/metadata, is printed). Bad kinds: invalid
JSON, invalid UTF-8, nesting 100,000 deep, a 5,000-digit integer, a lone surrogate, an empty list, a non-string
text, too many texts, an over-long text, a 50 MB body (Content-Length), and a chunked 2 MiB body with no length
(the limit is 1 MiB here).

    python benchmarks/hostile_serve.py                       # a MiniLM student, one replica, 2 CPU cores
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

HUGE = b'{"texts": ["' + b"x" * (50 * 2**20) + b'"]}'
JSON_HEADERS = {"Content-Type": "application/json"}
log = logging.getLogger("llkd_ray.benchmarks")  # under llkd_ray: the quiet console shows it
BODY_LIMIT = 2**20  # serve.max_body_bytes here: the chunked body below streams twice that


def bad_requests(max_texts: int) -> dict[str, dict]:
    """name → aiohttp request keyword arguments."""
    json_body = {"headers": JSON_HEADERS}
    return {
        "invalid JSON": {"data": b'{"texts": [', **json_body},
        "invalid UTF-8": {"data": b'{"texts": ["caf\xe9"]}', **json_body},
        "nested 100k deep": {"data": b'{"texts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", **json_body},
        "5,000-digit integer": {"data": b'{"texts": [' + b"7" * 5000 + b"]}", **json_body},
        "lone surrogate": {"data": b'{"texts": ["\\ud800"]}', **json_body},
        "empty list": {"json": {"texts": []}},
        "non-string text": {"json": {"texts": ["ok", 7]}},
        "too many texts": {"json": {"texts": ["t"] * (max_texts + 1)}},
        "over-long text": {"json": {"texts": ["y" * 30_000]}},
    }


async def chunked_body():
    for _ in range(2 * BODY_LIMIT // 4096):
        yield b" " * 4096


async def run_load(url: str, texts: list[str], total: int, concurrency: int, max_texts: int) -> dict:
    import aiohttp

    bad = bad_requests(max_texts)
    kinds = list(bad)
    statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    answers: dict[str, list] = {}
    next_request = 0

    async def send(session, number: int) -> None:
        if number % 500 == 250:
            kind, kwargs = "50 MB body", {"data": HUGE, "headers": JSON_HEADERS}
        elif number % 500 == 499:
            kind, kwargs = "chunked 2 MiB body", {"data": chunked_body(), "headers": JSON_HEADERS}
        elif number % 10 < 3:
            kind = kinds[number % len(kinds)]
            kwargs = bad[kind]
        else:
            kind, text = "good", texts[number % len(texts)]
            kwargs = {"json": {"texts": [text]}}
        try:
            async with session.post(url, **kwargs) as response:
                body = await response.read()
                statuses[kind][response.status] += 1
                if kind == "good" and response.status == 200:
                    answers.setdefault(text, []).append(json.loads(body)["predictions"][0])
        except aiohttp.ClientError as error:  # the server closed the connection while the client still sent
            statuses[kind][f"closed ({type(error).__name__})"] += 1

    async def caller(session):
        nonlocal next_request
        while next_request < total:
            number = next_request
            next_request += 1
            await send(session, number)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(caller(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"statuses": statuses, "answers": answers, "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--log", default="runs/hostile_serve.log", help="Ray's, Serve's and the model's output")
    args = parser.parse_args()

    import ray
    import requests
    from ray import serve

    from llkd_ray.config import ServeConfig
    from llkd_ray.console import console
    from llkd_ray.corpus import load_rotten_tomatoes
    from llkd_ray.serving import build_app
    from llkd_ray.student import export_student, load_student, predict_probs

    # The project's quiet console: Ray's, Serve's and transformers' output goes to the log file.
    with console(Path(args.log).resolve()):
        network, tokenizer = load_student("minilm-l6", ["positive", "negative"], seed=7)
        student = str(export_student(network, tokenizer, tempfile.mkdtemp() + "/student", {}, max_length=64))
        texts = load_rotten_tomatoes(seed=9, limit=200)["text"].to_pylist()
        offline = dict(zip(texts, predict_probs(network, tokenizer, texts, max_length=64)))

        options = ServeConfig(
            max_texts=64, max_text_chars=20_000, overlong="reject", num_cpus=1, max_body_bytes=BODY_LIMIT
        )
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": options.request_timeout_s})
        serve.run(build_app(student, options), name="hostile", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"
        log.info("%d requests at concurrency %d", args.requests, args.concurrency)
        result = asyncio.run(run_load(f"{base}/v1/classify", texts, args.requests, args.concurrency, options.max_texts))
        stats = requests.get(f"{base}/v1/metadata", timeout=60).json()["stats"]
        serve.shutdown()
        ray.shutdown()

    labels = ["positive", "negative"]
    mismatches = sum(
        answer["label"] != labels[int(offline[text].argmax())]
        or not np.allclose([answer["probabilities"][n] for n in labels], offline[text], atol=1e-5)
        for text, answered in result["answers"].items()
        for answer in answered
    )
    statuses = result["statuses"]
    sent = sum(sum(c.values()) for c in statuses.values())
    five_xx = sum(n for c in statuses.values() for status, n in c.items() if isinstance(status, int) and status >= 500)
    print(
        f"\n{sent} requests at concurrency {args.concurrency} in {result['seconds']:.1f} s"
        f" ({sent / result['seconds']:.1f} req/s); one replica, {os.cpu_count()} CPU cores"
    )
    print(f"{'kind':<22} {'sent':>6}  answers")
    for kind, counter in sorted(statuses.items(), key=lambda item: -sum(item[1].values())):
        answers = ", ".join(f"{n} x {status}" for status, n in sorted(counter.items(), key=str))
        print(f"{kind:<22} {sum(counter.values()):>6}  {answers}")
    good = statuses["good"]
    print(
        f"\n5xx: {five_xx}; good requests answered 200: {good[200]} of {sum(good.values())};"
        f" predictions different from offline: {mismatches}"
    )
    print(
        f"replica peak RSS: {stats['peak_rss_mb']:.0f} MB; forward passes {stats['forward_passes']},"
        f" largest batch {stats['largest_batch']}"
    )


if __name__ == "__main__":
    main()

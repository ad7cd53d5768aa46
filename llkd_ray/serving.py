"""The serve stage: the exported student behind Ray Serve, with a FastAPI ingress.

    POST /v1/classify  {"texts": [...]}  → {"predictions": [{"label", "confidence", "probabilities"}, ...]}
    GET  /healthz                        → {"status": "ok"}
    GET  /v1/metadata                    → model, labels, training run, version, and this replica's batching stats
    GET  /docs, /openapi.json            → FastAPI's docs

Texts are batched across concurrent callers with ``@serve.batch``. Bad input is answered with a 4xx that says
what is wrong (never a 5xx, never a dead replica). ``cluster/serve_config.yaml`` deploys the same app with
``serve run`` / ``serve deploy`` or KubeRay's RayService.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve

from llkd_ray import __version__, storage
from llkd_ray.config import Config, ServeConfig
from llkd_ray.ray_session import threads_per_copy
from llkd_ray.student import STUDENT_METADATA, student_architecture

APP_NAME = "llkd-student"
logger = logging.getLogger(__name__)


class Prediction(BaseModel):
    label: str
    confidence: float
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    predictions: list[Prediction]
    truncated: list[int] = []  # positions of texts cut to max_text_chars


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class ItemFailure:
    """A text the model failed on (its neighbours in the batch were answered)."""

    reason: str


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _describe_failure() -> str:
    error = sys.exc_info()[1]
    return f"{type(error).__name__}: {error}"[:300]


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it is over ``limit`` bytes: from Content-Length before anything
    is read, else while it streams in (a chunked body has no length to trust)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise BadRequest(413, f"request body of {int(declared):,} bytes > {limit:,}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(413, f"request body over {limit:,} bytes")
    return bytes(body)


def resolve_student_dir(run_dir_or_model: str) -> str:
    """A run directory (its ``student/``) or an exported student directory, local or on a URI (``s3://...``):
    the absolute path or the URI of the student itself."""
    base = run_dir_or_model if storage.is_uri(run_dir_or_model) else str(Path(run_dir_or_model).resolve())
    for candidate in (storage.join(base, "student"), base):
        if storage.exists(storage.join(candidate, "config.json")):
            return candidate
    raise FileNotFoundError(f"{run_dir_or_model}: neither a run directory with student/ nor an exported student")


def parse_texts(body: bytes, options: ServeConfig) -> tuple[list[str], list[int]]:
    """Validate a classify request body: (texts, positions truncated). Raises BadRequest with the reason."""
    try:
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise BadRequest(400, f"request body is not valid UTF-8 (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise BadRequest(400, f"request body is not valid JSON: {error.msg} at position {error.pos}") from None
    except RecursionError:  # [[[[... nested deeper than the parser's recursion limit
        raise BadRequest(400, "request body is nested too deeply") from None
    except ValueError as error:  # an integer of more than 4,300 digits, and the like
        raise BadRequest(400, f"request body is not acceptable JSON: {error}") from None
    if not isinstance(payload, dict) or "texts" not in payload:
        raise BadRequest(400, 'expected a JSON object {"texts": ["...", ...]}')
    texts = payload["texts"]
    if not isinstance(texts, list):
        raise BadRequest(400, f'"texts" must be a list of strings, not {type(texts).__name__}')
    if not texts:
        raise BadRequest(400, '"texts" is empty: send at least one text')
    if len(texts) > options.max_texts:
        raise BadRequest(413, f"too many texts: {len(texts)} > {options.max_texts} per request")
    truncated = []
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise BadRequest(400, f"texts[{position}] must be a string, not {type(text).__name__}")
        if not text.strip():
            raise BadRequest(400, f"texts[{position}] is empty")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:  # "\ud800" is valid JSON but no text: tokenizers raise on it
            raise BadRequest(400, f"texts[{position}] is not valid Unicode (lone surrogate at {error.start})") from None
        if len(text) > options.max_text_chars:
            if options.overlong == "reject":
                raise BadRequest(413, f"texts[{position}] has {len(text)} characters > {options.max_text_chars}")
            texts[position] = text[: options.max_text_chars]
            truncated.append(position)
    return texts, truncated


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


app = FastAPI(
    title="llkd-ray student", description="A text classifier distilled from an LLM with LLKD.", version=__version__
)


@serve.deployment
@serve.ingress(app)
class StudentClassifier:
    def __init__(self, student_dir: str, options: dict):
        import torch

        from llkd_ray.student import load_exported_student

        self.options = ServeConfig.model_validate(options)
        options = self.options
        torch.set_num_threads(threads_per_copy(options.torch_threads, options.max_replicas, options.num_cpus))
        # A student on a URI is fetched by each replica, on whichever node it lands.
        local_dir = storage.fetch_directory(student_dir) if storage.is_uri(student_dir) else Path(student_dir)
        self.network, self.tokenizer = load_exported_student(local_dir)
        if torch.cuda.is_available():
            self.network.to("cuda")
        metadata_path = local_dir / STUDENT_METADATA
        self.metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
        self.labels = [self.network.config.id2label[i] for i in range(self.network.config.num_labels)]
        self.max_length = self.options.max_length or self.metadata.get("max_length") or 512
        self.token = os.environ.get(self.options.token_env) or None
        self.student_dir = student_dir
        # Where a request's time goes, summed over requests: in_replica_s from the body read to the answer;
        # tokenize_s and forward_s over forward passes (a batch's pass serves all its callers).
        self.stats = {
            "requests": 0,
            "texts": 0,
            "forward_passes": 0,
            "largest_batch": 0,
            "in_replica_s": 0.0,
            "tokenize_s": 0.0,
            "forward_s": 0.0,
        }
        self._batched.set_max_batch_size(self.options.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.options.batch_wait_timeout_s)

    def _forward(self, texts: list[str]) -> list[dict]:
        from llkd_ray.student import predict_probs

        self.stats["forward_passes"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(texts))
        probs = predict_probs(
            self.network, self.tokenizer, texts, self.max_length, self.options.forward_batch_size, self.stats
        )
        return [
            {
                "label": self.labels[int(row.argmax())],
                "confidence": float(row.max()),
                "probabilities": dict(zip(self.labels, map(float, row))),
            }
            for row in probs
        ]

    def _forward_isolated(self, texts: list[str]) -> list:
        """A batch's predictions; if the batch fails, each text alone, so one bad text fails only its caller."""
        try:
            return self._forward(texts)
        except Exception:
            if len(texts) == 1:
                return [ItemFailure(_describe_failure())]
        results: list = []
        for text in texts:
            try:
                results.extend(self._forward([text]))
            except Exception:
                results.append(ItemFailure(_describe_failure()))
        return results

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01)  # reset from config in __init__
    async def _batched(self, texts: list[str]) -> list:
        # Off the event loop: the replica keeps accepting (and batching) requests while the forward runs.
        return await asyncio.to_thread(self._forward_isolated, texts)

    # Reached through the instance: Serve ships the class to replicas, where module globals defined after it
    # were not visible (a NameError, answered as a 500).
    _error = staticmethod(_error)

    def _authorized(self, request: Request) -> bool:
        if self.token is None:
            return True
        header = request.headers.get("authorization", "")
        return hmac.compare_digest(header.encode(), f"Bearer {self.token}".encode())

    @app.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/metadata")
    def metadata(self, request: Request) -> Any:
        if not self._authorized(request):
            return self._error(401, "missing or wrong bearer token")
        return {  # no path or bucket URI: callers need not know where the weights live
            **student_architecture(self.network.config),
            "labels": self.labels,
            "version": __version__,
            "training": self.metadata,
            "batching": self.options.batching,
            "max_length": self.max_length,
            "stats": {
                **{key: round(value, 4) if isinstance(value, float) else value for key, value in self.stats.items()},
                "peak_rss_mb": round(_peak_rss_mb(), 1),
            },
        }

    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        responses={
            400: {"description": "malformed request"},
            401: {"description": "bad token"},
            413: {"description": "too many or too long texts, or a body over max_body_bytes"},
            422: {"description": "the model failed on one of the texts (the other callers are unaffected)"},
            503: {"description": "overloaded: more than max_queued_requests waiting; retry later"},
        },
    )
    async def classify(self, request: Request) -> Any:
        if not self._authorized(request):
            return self._error(401, "missing or wrong bearer token")
        started = time.perf_counter()
        try:
            return await self._classify(request)
        finally:
            self.stats["in_replica_s"] += time.perf_counter() - started

    async def _classify(self, request: Request) -> Any:
        try:
            texts, truncated = parse_texts(await read_body(request, self.options.max_body_bytes), self.options)
        except BadRequest as error:
            return self._error(error.status, error.message)
        self.stats["requests"] += 1
        self.stats["texts"] += len(texts)
        if self.options.batching:
            predictions = await asyncio.gather(*(self._batched(text) for text in texts))
        else:
            predictions = await asyncio.to_thread(self._forward_isolated, texts)
        failed = [(position, p) for position, p in enumerate(predictions) if isinstance(p, ItemFailure)]
        if failed:
            position, failure = failed[0]
            return self._error(422, f"texts[{position}] could not be classified: {failure.reason}")
        return {"predictions": predictions, "truncated": truncated}


def build_app(student: str, options: ServeConfig):
    """The Serve application for an exported student (or a run directory)."""
    student_dir = resolve_student_dir(student)
    actor_options: dict = {"num_cpus": options.num_cpus, "num_gpus": options.num_gpus}
    if os.environ.get(options.token_env):
        # The token set where the app is built reaches every replica, on whichever node it lands.
        actor_options["runtime_env"] = {"env_vars": {options.token_env: os.environ[options.token_env]}}
    return StudentClassifier.options(
        ray_actor_options=actor_options,
        autoscaling_config={
            "min_replicas": options.min_replicas,
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing_requests,
            "upscale_delay_s": options.upscale_delay_s,
            "downscale_delay_s": options.downscale_delay_s,
            "look_back_period_s": options.look_back_period_s,
        },
        max_ongoing_requests=max(options.max_batch_size * 2, 8),
        max_queued_requests=options.max_queued_requests,
    ).bind(student_dir, options.model_dump())


def app_builder(args: dict):
    """Entry point for ``serve run`` / ``serve deploy`` configs: args are ``student`` plus ServeConfig fields.
    Such a config serves a cluster, reachable beyond loopback: it needs the token (or says it does not)."""
    args = dict(args)
    student = args.pop("student")
    options = ServeConfig.model_validate(args)
    require_a_token_when_exposed(options, "a cluster's Serve config")
    return build_app(student, options)


def is_loopback(host: str) -> bool:
    return host == "localhost" or host == "::1" or host.startswith("127.")


def require_a_token_when_exposed(options: ServeConfig, where: str) -> None:
    if os.environ.get(options.token_env) or options.allow_unauthenticated:
        return
    raise PermissionError(
        f"refusing to serve {where} without a token: set {options.token_env} where the app is started (callers then"
        " send 'Authorization: Bearer <token>'), or set serve.allow_unauthenticated=true to serve it open on purpose"
    )


# Read by Serve's controller, proxies and replicas when they start. A local cluster has no load balancer to
# drain from, so direct ingress's 30 s minimum drain at shutdown is cut to 1 s.
THROUGHPUT_OPTIMIZED_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
}


def use_throughput_optimized_serve(options: ServeConfig) -> None:
    """Before this process starts a local cluster: its Serve runs throughput-optimized unless told otherwise (an
    environment variable already set wins)."""
    if options.throughput_optimized:
        for key, value in THROUGHPUT_OPTIMIZED_ENV.items():
            os.environ.setdefault(key, value)


def direct_ingress_urls(options: ServeConfig, app_name: str = APP_NAME) -> list[str]:
    """Where the app's replicas answer HTTP themselves (direct ingress), from Serve's target groups; empty when the
    cluster does not run direct ingress. A replica binds ``serve.host`` as the proxy does: on all interfaces it is
    reached at its node's IP."""
    from ray.serve.context import _get_global_client

    try:
        details = _get_global_client().get_serve_details()
    except Exception:  # Serve's details API is alpha: never fail serving over a log line
        return []
    everywhere = options.host in ("0.0.0.0", "::")
    return [
        f"http://{target['ip'] if everywhere else options.host}:{target['port']}"
        for group in details.get("target_groups") or []
        if group.get("app_name") == app_name and group.get("protocol") == "HTTP"
        for target in group.get("targets") or []
        if "Proxy" not in target.get("name", "")
    ]


def start_serving(student: str, options: ServeConfig, blocking: bool = True):
    serve.start(
        http_options={"host": options.host, "port": options.port, "request_timeout_s": options.request_timeout_s}
    )
    handle = serve.run(build_app(student, options), name=APP_NAME, route_prefix="/", blocking=False)
    for url in direct_ingress_urls(options):
        logger.info("a replica also answers directly, bypassing the proxy, at %s", url)
    while blocking:  # as serve.run(blocking=True): until Ctrl-C
        time.sleep(10)
    return handle


def _cluster_address(cfg: Config) -> str | None:
    from llkd_ray.local_cluster import running_cluster

    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or running_cluster()


def serve_command(student: str | None, cfg: Config, detach: bool = False, stop: bool = False) -> None:
    """``llkd serve``: in the foreground (the endpoint lives as long as the command), detached (it outlives the
    command, on a running cluster or on a local one started for it), or ``stop`` a detached endpoint."""
    from llkd_ray import local_cluster
    from llkd_ray.ray_session import init_ray

    if stop:
        return _stop_detached(cfg)
    resolve_student_dir(student)  # a wrong path fails here, before any cluster starts
    if not is_loopback(cfg.serve.host):
        require_a_token_when_exposed(cfg.serve, f"on {cfg.serve.host}")
    if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        use_throughput_optimized_serve(cfg.serve)  # for a cluster started below
    if detach:
        address = _cluster_address(cfg)
        if address is None:
            logger.info("no Ray cluster is running: starting a local one that outlives this command")
            address = local_cluster.start_local_cluster()
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # it listens on loopback only
        cfg.ray.address = address
    init_ray(cfg.ray)
    logger.info(
        "serving %s on http://%s:%d (docs at /docs)%s",
        student,
        cfg.serve.host,
        cfg.serve.port,
        "" if detach else "; Ctrl-C stops",
    )
    try:
        start_serving(student, cfg.serve, blocking=not detach)
    except KeyboardInterrupt:
        logger.info("stopped")
        return
    logger.info("detached: the endpoint keeps running after this command; `llkd serve --stop` stops it")


def _stop_detached(cfg: Config) -> None:
    from llkd_ray import local_cluster
    from llkd_ray.ray_session import init_ray

    address = _cluster_address(cfg)
    if address is None:
        logger.info("no Ray cluster is running: nothing to stop")
        return
    started = local_cluster.started_cluster()
    if started and started["address"] == address:  # the cluster exists only for the endpoint: stop both
        local_cluster.stop_local_cluster()
        logger.info("stopped the endpoint and the local Ray cluster it ran on (%s)", address)
        return
    cfg.ray.address = address
    init_ray(cfg.ray)
    serve.delete(APP_NAME)
    logger.info("stopped %s on the Ray cluster at %s (the cluster keeps running)", APP_NAME, address)

"""The student behind a real Ray Serve app on loopback: predictions, batching, bad input, auth."""

import concurrent.futures
import json
import socket
import threading
import time

import numpy as np
import pytest
import requests

from llkd_ray.config import ServeConfig
from llkd_ray.serving import BadRequest, parse_texts

pytestmark = pytest.mark.slow
TEXTS = ["A joyous, clever film.", "Two hours I will never get back.", "Solid if unremarkable."]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def exported_student(tmp_path_factory):
    """A real MiniLM student with a (seeded) fresh head, exported the way training exports it."""
    from llkd_ray.student import export_student, load_student

    network, tokenizer = load_student("minilm-l6", ["positive", "negative", "neutral"], seed=1)
    return export_student(
        network,
        tokenizer,
        tmp_path_factory.mktemp("student") / "student",
        {"labels": ["positive", "negative", "neutral"]},
        max_length=64,
    )


SERVE_PORT = free_port()


def serve_base_url() -> str:
    return f"http://127.0.0.1:{SERVE_PORT}"


@pytest.fixture(scope="module")
def server(ray_cluster, exported_student):
    from ray import serve

    from llkd_ray.serving import build_app

    port = SERVE_PORT
    options = ServeConfig(
        port=port,
        max_texts=8,
        max_text_chars=200,
        overlong="reject",
        num_cpus=0.5,
        max_batch_size=16,
        batch_wait_timeout_s=0.2,
        max_body_bytes=65536,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})  # one HTTP proxy per cluster: started once
    # Served from the run directory's URI, as from s3://: the replica fetches the student through pyarrow.
    run_dir_uri = f"file://{exported_student.parent}"
    serve.run(build_app(run_dir_uri, options), name="student", route_prefix="/", blocking=False)
    yield serve_base_url()
    serve.delete("student")


def offline_probs(student_dir, texts):
    from llkd_ray.student import load_exported_student, predict_probs

    network, tokenizer = load_exported_student(student_dir)
    return predict_probs(network, tokenizer, texts, max_length=64)


def test_predictions_equal_offline_predictions(server, exported_student):
    response = requests.post(f"{server}/v1/classify", json={"texts": TEXTS}, timeout=60)
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    expected = offline_probs(exported_student, TEXTS)
    names = ["positive", "negative", "neutral"]
    for prediction, row in zip(predictions, expected):
        np.testing.assert_allclose([prediction["probabilities"][n] for n in names], row, atol=1e-5)
        assert prediction["label"] == names[int(row.argmax())]
        assert prediction["confidence"] == pytest.approx(float(row.max()), abs=1e-5)


def test_health_metadata_and_docs(server, exported_student):
    assert requests.get(f"{server}/healthz", timeout=30).json() == {"status": "ok"}
    metadata = requests.get(f"{server}/v1/metadata", timeout=30).json()
    assert metadata["labels"] == ["positive", "negative", "neutral"] and metadata["version"]
    assert metadata["training"]["max_length"] == 64
    assert metadata["model"] == "bert" and metadata["pooling"] == "mean" and metadata["max_length"] == 64
    assert "file://" not in json.dumps(metadata) and str(exported_student) not in json.dumps(metadata)
    assert "/v1/classify" in requests.get(f"{server}/openapi.json", timeout=30).json()["paths"]


def test_concurrent_callers_are_batched_together(server):
    before = requests.get(f"{server}/v1/metadata", timeout=30).json()["stats"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(
            pool.map(
                lambda i: requests.post(f"{server}/v1/classify", json={"texts": [f"Review number {i}."]}, timeout=60),
                range(12),
            )
        )
    assert all(r.status_code == 200 for r in responses)
    after = requests.get(f"{server}/v1/metadata", timeout=30).json()["stats"]
    assert after["requests"] - before["requests"] == 12
    assert after["forward_passes"] - before["forward_passes"] < 12  # several callers shared a forward pass
    assert after["largest_batch"] > 1
    # Where the time went: every pass tokenized and ran the model inside some caller's time in the replica.
    model_s = sum(after[key] - before[key] for key in ("tokenize_s", "forward_s"))
    assert after["tokenize_s"] > before["tokenize_s"] and after["forward_s"] > before["forward_s"]
    assert after["in_replica_s"] - before["in_replica_s"] >= model_s


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"{not json", 400, "request body is not valid JSON"),
        (b'{"texts": ["caf\xe9"]}', 400, "request body is not valid UTF-8"),
        (json.dumps(["a", "list"]).encode(), 400, 'expected a JSON object {"texts"'),
        (json.dumps({"text": ["a"]}).encode(), 400, 'expected a JSON object {"texts"'),
        (json.dumps({"texts": "one string"}).encode(), 400, '"texts" must be a list of strings, not str'),
        (json.dumps({"texts": []}).encode(), 400, '"texts" is empty'),
        (json.dumps({"texts": ["ok", 7]}).encode(), 400, "texts[1] must be a string, not int"),
        (json.dumps({"texts": ["ok", "  "]}).encode(), 400, "texts[1] is empty"),
        (json.dumps({"texts": ["t"] * 9}).encode(), 413, "too many texts: 9 > 8"),
        (json.dumps({"texts": ["x" * 201]}).encode(), 413, "texts[0] has 201 characters > 200"),
        (b'{"texts": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", 400, "nested too deeply"),  # under the body limit
        (b'{"texts": [' + b"7" * 5_000 + b"]}", 400, "not acceptable JSON"),
        (b'{"texts": ["ok", "\\ud800"]}', 400, "texts[1] is not valid Unicode (lone surrogate at 0)"),
        (json.dumps({"texts": ["x"]}).encode() + b" " * 70_000, 413, "request body of 70,"),
    ],
)
def test_bad_input_gets_a_4xx_and_the_service_keeps_answering(server, body, status, message):
    response = requests.post(
        f"{server}/v1/classify", data=body, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code == status
    assert message in response.json()["error"]
    assert requests.post(f"{server}/v1/classify", json={"texts": ["still here"]}, timeout=60).status_code == 200


def test_overlong_texts_are_truncated_when_configured():
    texts, truncated = parse_texts(
        json.dumps({"texts": ["ok", "y" * 50]}).encode(), ServeConfig(max_text_chars=10, overlong="truncate")
    )
    assert texts == ["ok", "y" * 10] and truncated == [1]
    with pytest.raises(BadRequest, match="50 characters > 10"):
        parse_texts(json.dumps({"texts": ["y" * 50]}).encode(), ServeConfig(max_text_chars=10, overlong="reject"))


def test_bearer_token(server, exported_student, monkeypatch):
    from ray import serve

    from llkd_ray.serving import build_app

    monkeypatch.setenv("TEST_LLKD_TOKEN", "s3cret")  # set where the app is built; forwarded to the replica
    app = build_app(str(exported_student), ServeConfig(num_cpus=0.5, token_env="TEST_LLKD_TOKEN"))
    serve.run(app, name="secured", route_prefix="/secured", blocking=False)
    base = f"{serve_base_url()}/secured"
    body = {"texts": ["hello"]}
    try:
        assert requests.post(f"{base}/v1/classify", json=body, timeout=60).status_code == 401
        wrong = requests.post(f"{base}/v1/classify", json=body, headers={"Authorization": "Bearer nope"}, timeout=60)
        assert wrong.status_code == 401 and wrong.json() == {"error": "missing or wrong bearer token"}
        ok = requests.post(f"{base}/v1/classify", json=body, headers={"Authorization": "Bearer s3cret"}, timeout=60)
        assert ok.status_code == 200
        assert requests.get(f"{base}/v1/metadata", timeout=30).status_code == 401
        assert requests.get(f"{base}/healthz", timeout=30).status_code == 200  # probes need no token
    finally:
        serve.delete("secured")


def running_replicas(app_name: str) -> int:
    from ray import serve

    deployment = serve.status().applications[app_name].deployments["StudentClassifier"]
    return sum(count for state, count in deployment.replica_states.items() if str(state).endswith("RUNNING"))


def test_replicas_scale_up_under_load_and_down_when_idle(server, exported_student):
    """Serve's autoscaler, driven by the config: 1 replica idle, 2 under load, back to 1 when the load stops."""
    from ray import serve

    from llkd_ray.serving import build_app

    options = ServeConfig(
        num_cpus=0.25,
        min_replicas=1,
        max_replicas=2,
        target_ongoing_requests=1,
        upscale_delay_s=1,
        downscale_delay_s=2,
        look_back_period_s=2,
        batch_wait_timeout_s=0.05,
    )
    serve.run(build_app(str(exported_student), options), name="autoscaled", route_prefix="/autoscaled", blocking=False)
    url = f"{serve_base_url()}/autoscaled/v1/classify"
    stop = threading.Event()

    def caller() -> None:  # bounded: stops on the event or after 3 minutes
        deadline = time.time() + 180
        while not stop.is_set() and time.time() < deadline:
            requests.post(url, json={"texts": ["A film.", "Another film."]}, timeout=60)

    try:
        assert running_replicas("autoscaled") == 1
        callers = [threading.Thread(target=caller, daemon=True) for _ in range(8)]
        for thread in callers:
            thread.start()
        deadline = time.time() + 150
        while running_replicas("autoscaled") < 2:
            assert time.time() < deadline, "no second replica under load"
            time.sleep(1)
        stop.set()
        for thread in callers:
            thread.join(timeout=90)
        deadline = time.time() + 150
        while running_replicas("autoscaled") > 1:
            assert time.time() < deadline, "the second replica stayed after the load stopped"
            time.sleep(1)
        assert requests.post(url, json={"texts": ["still here"]}, timeout=60).status_code == 200
    finally:
        stop.set()
        serve.delete("autoscaled")


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(server):
    """No Content-Length to check first: the replica counts while the body streams in."""

    def chunks():
        for _ in range(40):
            yield b" " * 4096  # 160 KiB of whitespace, over the 64 KiB limit

    response = requests.post(
        f"{server}/v1/classify", data=chunks(), headers={"Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code == 413 and "request body over 65,536 bytes" in response.json()["error"]


def test_one_bad_caller_among_concurrent_callers_costs_nobody_else(server):
    bodies = [{"texts": [f"Review {i}."]} for i in range(15)] + [{"texts": ["\ud800"]}]
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(
            pool.map(lambda b: requests.post(f"{server}/v1/classify", json=b, timeout=60).status_code, bodies)
        )
    assert statuses == [200] * 15 + [400]


def test_a_text_the_model_fails_on_fails_alone_in_its_batch():
    """Fault injection: a forward that breaks on one text. Its batch is retried text by text."""
    from llkd_ray.serving import ItemFailure, StudentClassifier

    replica = object.__new__(StudentClassifier.func_or_class)  # the replica class, without loading a model

    def forward(texts: list[str]) -> list[dict]:
        if "boom" in texts:
            raise RuntimeError("the model broke on this text")
        return [{"label": text} for text in texts]

    replica._forward = forward
    results = replica._forward_isolated(["a", "boom", "b"])
    assert results[0] == {"label": "a"} and results[2] == {"label": "b"}
    assert isinstance(results[1], ItemFailure) and "RuntimeError: the model broke" in results[1].reason

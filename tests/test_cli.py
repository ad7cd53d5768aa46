"""The command line as a user meets it: arguments in any order, a quiet console with the full log in the run
directory, and `llkd serve --detach` / `--stop`."""

import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml

from llkd_ray import __version__
from llkd_ray.cli import build_parser, main, split_overrides
from tests.conftest import RAY, free_port, make_config

ROOT = Path(__file__).resolve().parents[1]
LLKD = str(Path(RAY).with_name("llkd"))


def parse(argv: list[str]):
    rest, overrides = split_overrides(argv)
    args, unknown = build_parser().parse_known_args(rest)
    assert not unknown, unknown
    return args, overrides


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "runs/x", "--detach", "serve.port=8001", "--config", "c.yaml"],
        ["serve", "serve.port=8001", "runs/x", "--config", "c.yaml", "--detach"],
        ["serve", "--config", "c.yaml", "serve.port=8001", "--detach", "runs/x"],
    ],
)
def test_options_and_overrides_mix_in_any_order(argv):
    args, overrides = parse(argv)
    assert (args.command, args.student, args.detach, args.config) == ("serve", "runs/x", True, "c.yaml")
    assert overrides == ["serve.port=8001"]


def test_an_option_value_that_looks_like_an_override_stays_with_its_option():
    args, overrides = parse(["run", "training.epochs=2", "--config", "a=b.yaml", "-v", "teacher.num_actors=2"])
    assert args.config == "a=b.yaml" and args.verbose
    assert overrides == ["training.epochs=2", "teacher.num_actors=2"]


def test_a_scripts_own_options_keep_values_that_look_like_overrides():
    """The benchmarks pass their own options (distill_quality's --out, --work, ...) to the same split."""
    argv = ["--selectors", "llkd", "all", "training.epochs=4", "--out", "a=b.json", "selection.momentum=0"]
    rest, overrides = split_overrides(argv, ("--selectors", "--out"))
    assert rest == ["--selectors", "llkd", "all", "--out", "a=b.json"]
    assert overrides == ["training.epochs=4", "selection.momentum=0"]


def test_check_config_applies_overrides_from_anywhere(tmp_path, capsys):
    """In-process, after other modules were imported: DeepSpeed once printed onto stdout here (the CI run)."""
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(make_config().model_dump()))
    assert main(["check-config", "training.epochs=3", "--config", str(config_file), "teacher.batch_size=4"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["training"]["epochs"] == 3 and resolved["teacher"]["batch_size"] == 4


def test_check_config_applies_overrides_from_anywhere_and_prints_only_yaml(tmp_path):
    """`llkd check-config ... > resolved.yaml` must give YAML: whatever a library prints goes to stderr."""
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(make_config().model_dump()))
    result = subprocess.run(
        [LLKD, "check-config", "training.epochs=3", "--config", str(config_file), "teacher.batch_size=4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    resolved = yaml.safe_load(result.stdout)  # the whole of stdout parses
    assert resolved["training"]["epochs"] == 3 and resolved["teacher"]["batch_size"] == 4
    assert "llkd: teacher:" in result.stderr


@pytest.mark.slow  # loads the SmolLM2 tokenizer (a GGUF conversion on a fresh machine)
def test_check_config_says_what_each_text_costs_the_teacher(capsys):
    teacher = "teacher.model=smollm2-135m-instruct"
    assert main(["check-config", teacher]) == 0
    note = capsys.readouterr().err
    assert "8 label variants, 0 of them several tokens long; each text costs 1 engine request" in note
    assert "Warning" not in note
    # The embedded default's prompt on SmolLM2's tokenizer: 170 shared tokens, 10 past five 32-token blocks.
    assert "The prompts share 170 tokens, padded with 22 newline tokens to 192: whole 32-token KV blocks" in note
    assert main(["check-config", teacher, "teacher.align_prefix=false"]) == 0
    note = capsys.readouterr().err
    assert "The prompts share 170 tokens; vLLM caches whole 32-token KV blocks, so the last 10 are computed" in note
    words = "task.labels=[{name: money-fx}, {name: acq}, {name: crude}, {name: earn}, {name: interest}]"
    assert main(["check-config", teacher, words, "task.examples=[]"]) == 0
    note = capsys.readouterr().err
    assert "13 of them several tokens long; each text costs up to 18 engine requests" in note
    assert "Warning: up to 18 requests per text" in note
    assert "teacher.align_prompt_end=true lines every prompt up with the blocks" in note  # what makes them cheap
    assert main(["check-config", teacher, words, "task.examples=[]", "teacher.align_prompt_end=true"]) == 0
    note = capsys.readouterr().err
    assert "each prompt then gets the 0 to 31 newlines before that line that make all of it but its last token" in note
    assert "teacher.align_prompt_end=true lines" not in note
    assert "labeling budget" not in note  # no budget: the whole corpus is labeled, as before
    assert main(["check-config", teacher, "labeling.budget=0.3", "labeling.stop_margin=null"]) == 0
    note = capsys.readouterr().err
    assert "labeling budget: 30% of the candidate rows (the corpus less the 1000 gold-labelled rows held out" in note
    assert "in 3 round(s) chosen by student; a probe of 10% of the budget" in note and "whole budget is spent" in note
    assert main(["check-config", teacher, "labeling.budget=600", "labeling.random_share=0.5"]) == 0
    note = capsys.readouterr().err
    assert "labeling budget: 600 rows" in note and "chosen by student (50% of each later round at random)" in note


def test_version():
    result = subprocess.run([LLKD, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"llkd-ray {__version__}"


@pytest.mark.slow
def test_llkd_run_prints_stages_a_progress_bar_and_one_line_per_epoch(ray_cluster, tmp_path):
    from llkd_ray.corpus import load_rotten_tomatoes

    rows = load_rotten_tomatoes(seed=61, limit=80).to_pylist()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": r["text"], "label": r["gold"]}) + "\n" for r in rows))
    cfg = make_config(
        corpus={"source": str(corpus), "gold_column": "label"},
        teacher={"num_cpus": 0.5},
        store={"path": str(tmp_path / "store")},
        student={"max_length": 48},
        training={"strategy": "ddp", "epochs": 2, "cpus_per_worker": 0.5, "storage_path": str(tmp_path / "ray")},
        evaluation={"holdout": 20},
        output={"name": "console", "dir": str(tmp_path / "runs")},
    )
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump()))
    result = subprocess.run(
        [LLKD, "run", "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "RAY_ADDRESS": ray_cluster.address},
    )
    terminal = result.stdout + result.stderr
    assert result.returncode == 0, terminal[-3000:]
    lines = terminal.splitlines()
    assert len(lines) <= 40, terminal
    assert all(line.startswith("[llkd] ") or not line.strip() for line in lines), terminal
    for stage in (
        "stage 1/3",
        "stage 2/3",
        "stage 3/3",
        "holdout macro-F1: student",
        "what the student buys",
        "done in",
    ):
        assert sum(stage in line for line in lines) == 1, (stage, terminal)
    epochs = [line for line in lines if re.match(r"\[llkd\] epoch \d/2 \| selected", line)]
    assert [line.split()[2] for line in epochs] == ["1/2", "2/2"], terminal  # each epoch once, in order
    assert "labeling: 100%" in terminal and "80/80" in terminal  # the progress bar, sized to the corpus
    log = (tmp_path / "runs" / "console" / "run.log").read_text()
    # The chatter is in the log file, not on the terminal: vLLM's engine, Ray Data's executor, Ray Train's workers.
    for chatter in ("Initializing a V1 LLM engine", "Starting execution of Dataset", "RayTrainWorker"):
        assert chatter in log and chatter not in terminal, chatter
    report = (tmp_path / "runs" / "console" / "report.md").read_text()
    assert "## Where the time went" in report and "| labeling (Ray start, teacher load, scoring) |" in report
    assert "[`run.log`](run.log)" in report
    assert "## What the student buys" in report and "smaller than the teacher" in report


@pytest.fixture()
def exported_student(tmp_path):
    from llkd_ray.student import export_student, load_student

    network, tokenizer = load_student("minilm-l6", ["positive", "negative"], seed=3)
    return export_student(
        network, tokenizer, tmp_path / "run" / "student", {"labels": ["positive", "negative"]}, max_length=64
    )


@pytest.mark.slow
def test_serve_detach_outlives_the_command_on_a_cluster_it_starts_and_stop_ends_both(exported_student, tmp_path):
    """No cluster running (as on a laptop): --detach starts one that outlives the command; --stop ends that
    cluster only. Ray's temp dir and llkd's cache are this test's own, so the session's cluster stays unseen."""
    ray_tmp = tempfile.mkdtemp(prefix="lrd", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, LLKD_CACHE=str(tmp_path / "cache"))
    port = free_port()
    common = [f"output.dir={tmp_path / 'runs'}", "serve.num_cpus=0.5"]
    detached = subprocess.run(
        [LLKD, "serve", str(exported_student.parent), "--detach", f"serve.port={port}", *common],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    state = tmp_path / "cache" / "local-cluster.json"
    try:
        assert detached.returncode == 0, detached.stderr[-3000:]
        assert "starting a local one that outlives this command" in detached.stderr
        assert "llkd serve --stop" in detached.stderr
        started = json.loads(state.read_text())
        # The command has returned: the endpoint is still there.
        response = requests.post(f"http://127.0.0.1:{port}/v1/classify", json={"texts": ["A fine film."]}, timeout=60)
        assert response.status_code == 200 and response.json()["predictions"][0]["label"] in ("positive", "negative")
        # Throughput-optimized Serve: the replica also answers on a port of its own, with the same prediction.
        direct = re.search(r"bypassing the proxy, at (http://\S+)", detached.stderr)
        assert direct, detached.stderr[-3000:]
        direct_response = requests.post(f"{direct[1]}/v1/classify", json={"texts": ["A fine film."]}, timeout=60)
        assert direct_response.json() == response.json()

        stopped = subprocess.run(
            [LLKD, "serve", "--stop", *common], capture_output=True, text=True, timeout=300, env=env
        )
        assert stopped.returncode == 0, stopped.stderr[-3000:]
        assert "stopped the endpoint and the local Ray cluster" in stopped.stderr
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        gcs_port = started["address"].rsplit(":", 1)[1]
        deadline = time.time() + 60
        while subprocess.run(["pgrep", "-f", f"gcs_server.*--gcs_server_port={gcs_port}"]).returncode == 0:
            assert time.time() < deadline, "the detached cluster's GCS is still running"
            time.sleep(1)
    finally:
        if state.exists():  # a failure above must not leave the detached cluster running
            subprocess.run([LLKD, "serve", "--stop", *common], capture_output=True, timeout=300, env=env)


def test_serving_beyond_loopback_without_a_token_is_refused(exported_student, tmp_path, monkeypatch, capfd):
    from llkd_ray.serving import app_builder

    monkeypatch.delenv("LLKD_SERVE_TOKEN", raising=False)
    run_dir = str(exported_student.parent)
    assert main(["serve", run_dir, "serve.host=0.0.0.0", f"output.dir={tmp_path}"]) == 2  # before any cluster
    assert "refusing to serve on 0.0.0.0 without a token: set LLKD_SERVE_TOKEN" in capfd.readouterr().err
    with pytest.raises(PermissionError, match="a cluster's Serve config"):
        app_builder({"student": run_dir})  # what `serve deploy cluster/serve_config.yaml` calls
    assert app_builder({"student": run_dir, "allow_unauthenticated": True}) is not None  # open on purpose
    monkeypatch.setenv("LLKD_SERVE_TOKEN", "s3cret")
    assert app_builder({"student": run_dir}) is not None


def test_the_quiet_console_sends_chatter_to_the_log_file_and_verbose_keeps_it(tmp_path, capfd):
    import logging

    from llkd_ray.console import console

    log_file = tmp_path / "run.log"
    with console(log_file):
        os.write(2, b"C++ chatter on fd 2\n")  # as Ray's and vLLM's native code write it
        os.write(1, b"chatter on fd 1\n")
        logging.getLogger("vllm").warning("a library's warning")
        logging.getLogger("llkd_ray.pipeline").info("stage 1/3: a line for the person")
    terminal = capfd.readouterr()
    shown = terminal.out + terminal.err
    assert "[llkd] stage 1/3: a line for the person" in shown
    for chatter in ("C++ chatter on fd 2", "chatter on fd 1", "a library's warning"):
        assert chatter not in shown and chatter in log_file.read_text(), chatter
    assert "stage 1/3: a line for the person" in log_file.read_text()  # the file has the whole story

    with console(tmp_path / "verbose.log", verbose=True):
        os.write(2, b"C++ chatter, verbose\n")
        logging.getLogger("llkd_ray.pipeline").info("stage 2/3")
    shown = "".join(capfd.readouterr())
    assert "C++ chatter, verbose" in shown and "[llkd] stage 2/3" in shown

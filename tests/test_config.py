import os

import pytest
import yaml

from llkd_ray.cli import main
from llkd_ray.config import ConfigError, config_from_dict, load_config
from tests.conftest import SENTIMENT_TASK, make_config


def test_default_config_loads_and_is_the_embedded_default():
    cfg = load_config()
    assert cfg.corpus.source == "builtin:rotten_tomatoes"
    assert cfg.teacher.model == "gemma-3-270m" and cfg.teacher.backend == "vllm"
    assert cfg.task.label_names == ["positive", "negative"]


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config(None, ["teacher.batch_size=8", "teacher.calibrate=false", "teacher.resources={gpu_node: 1}"])
    assert cfg.teacher.batch_size == 8
    assert cfg.teacher.calibrate is False
    assert cfg.teacher.resources == {"gpu_node": 1.0}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["teacher.batchsize=3"], "teacher.batchsize: unknown key (did you mean 'batch_size'?)"),
        (["teacher.batch_size=many"], "teacher.batch_size: Input should be a valid integer"),
        (["teacher.batch_size=0"], "teacher.batch_size: Input should be greater than 0"),
        (["teacher.backend=onnx"], "teacher.backend: Input should be 'vllm' or 'transformers'"),
        (["corpus.source=/no/such/corpus.jsonl"], "corpus.source: file or directory not found: /no/such/corpus.jsonl"),
        (["corpus.source=builtin:imdb"], "corpus.source: unknown builtin corpus 'imdb'"),
        (["colour=blue"], "colour: unknown key"),
        (["teacher.vllm.blocksize=32"], "teacher.vllm.blocksize: unknown key (did you mean 'block_size'?)"),
        (["teacher=3"], "teacher: Input should be a valid dictionary"),
        (["training.ema_decay=0.99", "training.zero_stage=3"], "training: ema_decay: the weight average needs"),
        (["training.ema_decay=1"], "training.ema_decay: Input should be less than 1"),
        (["training.learning_rate=.inf"], "training.learning_rate: Input should be a finite number"),
        (["training.head_lr_scale=.nan"], "training.head_lr_scale: Input should be a finite number"),
        # every section refuses them, not only the fields that were checked one by one
        (["teacher.num_cpus=.inf"], "teacher.num_cpus: Input should be a finite number"),
        (["training.resources_per_worker={big: .inf}"], "training.resources_per_worker.big: Input should be a finite"),
        (["serve.request_timeout_s=.inf"], "serve.request_timeout_s: Input should be a finite number"),
        (["training.distill_temperature=.inf"], "training.distill_temperature: Input should be a finite number"),
        (["labeling.random_share=1.5"], "labeling.random_share: Input should be less than or equal to 1"),
        (["labeling.random_share=-0.1"], "labeling.random_share: Input should be greater than or equal to 0"),
    ],
)
def test_bad_values_name_the_field(overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert expected in str(error.value)


def test_task_checks_labels_and_examples():
    bad_example = {**SENTIMENT_TASK, "examples": [{"text": "meh", "label": "neutral"}]}
    with pytest.raises(ConfigError, match=r"task: examples\[0\].label: 'neutral' is not one of the labels"):
        config_from_dict({"task": bad_example})
    with pytest.raises(ConfigError, match="duplicate label names"):
        config_from_dict({"task": {**SENTIMENT_TASK, "labels": [{"name": "a"}, {"name": "a"}], "examples": []}})
    with pytest.raises(ConfigError, match=r"task.labels: List should have at least 2 items"):
        config_from_dict({"task": {**SENTIMENT_TASK, "labels": [{"name": "a"}], "examples": []}})
    with pytest.raises(ConfigError, match=r"task: Field required"):
        config_from_dict({})


def test_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["teacher.batch_size"])


def test_cli_reports_config_errors_before_starting_ray(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-m", "llkd_ray.cli", "label", "teacher.num_actors=-1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "teacher.num_actors: Input should be greater than or equal to 1" in result.stderr
    assert "Ray" not in result.stdout + result.stderr  # nothing was started


def test_cli_names_a_missing_store(tmp_path, capfd):
    assert main(["train", f"store.path={tmp_path}/empty", f"output.dir={tmp_path}/runs"]) == 2
    assert "no pseudo-labels for this teacher, prompt and labels" in capfd.readouterr().err


@pytest.mark.parametrize("recipe", ["gpu.yaml", "gpu-8b.yaml", "gpu-70b.yaml"])
def test_cluster_recipes_inherit_the_embedded_defaults_selection_and_training(recipe):
    """One source of defaults: a recipe changes the hardware, not the method, unless it says so."""
    from pathlib import Path

    default = load_config()
    cfg = load_config(Path(__file__).resolve().parents[1] / "cluster" / "configs" / recipe)
    assert cfg.selection == default.selection
    hardware = {
        "strategy",
        "zero_stage",
        "num_workers",
        "cpus_per_worker",
        "gpus_per_worker",
        "resources_per_worker",
        "storage_path",
        "batch_size",
        "score_batch_size",
    }
    # The 8B/70B recipes train RoBERTa-base, whose usual fine-tuning rate is lower than MiniLM's.
    student_specific = {"learning_rate"} if cfg.student.model != default.student.model else set()
    keep = set(type(cfg.training).model_fields) - hardware - student_specific
    assert cfg.training.model_dump(include=keep) == default.training.model_dump(include=keep)


def test_the_vllm_engine_gets_cpu_step_and_block_defaults_that_the_config_and_engine_kwargs_override():
    from llkd_ray.teacher_backends import engine_arguments

    cpu = engine_arguments("/m", make_config().teacher, on_gpu=False)
    assert (cpu["max_num_batched_tokens"], cpu["block_size"], cpu["enforce_eager"]) == (1024, 32, True)
    gpu = engine_arguments("/m", make_config().teacher, on_gpu=True)
    assert "max_num_batched_tokens" not in gpu and "block_size" not in gpu  # vLLM's own GPU defaults
    assert gpu["gpu_memory_utilization"] == 0.85 and gpu["enforce_eager"] is False
    typed = make_config(teacher={"vllm": {"max_num_batched_tokens": 2048, "block_size": 16}}).teacher
    assert engine_arguments("/m", typed, on_gpu=True)["max_num_batched_tokens"] == 2048
    assert engine_arguments("/m", typed, on_gpu=False)["block_size"] == 16
    raw = make_config(
        teacher={"vllm": {"max_num_batched_tokens": 2048, "engine_kwargs": {"max_num_batched_tokens": 512}}}
    )
    assert engine_arguments("/m", raw.teacher, on_gpu=False)["max_num_batched_tokens"] == 512


def test_actors_packed_on_a_node_share_its_cores_instead_of_each_taking_all_of_them():
    from llkd_ray.ray_session import threads_per_copy

    assert threads_per_copy(None, copies=1, cpus_each=1, cores=2) == 2  # a lone actor uses the whole box
    assert threads_per_copy(None, copies=4, cpus_each=4, cores=16) == 4  # four fit: 4 x 4 threads
    assert threads_per_copy(None, copies=8, cpus_each=1, cores=16) == 2  # eight fit on 16 cores
    assert threads_per_copy(None, copies=8, cpus_each=4, cores=16) == 4  # only four fit, the rest go elsewhere
    assert threads_per_copy(None, copies=3, cpus_each=0.5, cores=2) == 1  # more copies than cores: one each
    assert threads_per_copy(None, copies=2, cpus_each=0, cores=8) == 4  # no CPUs asked: all copies may share
    assert threads_per_copy(3, copies=8, cpus_each=1, cores=16) == 3  # an explicit count wins


def test_prefix_padding_is_the_default_for_plain_prompts_and_refused_by_name_for_chat_prompts():
    from llkd_ray.teacher_backends import prefix_alignment

    plain, chat = make_config(), make_config(task={"prompt_style": "chat"})  # both load: the default suits both
    # A resolved config written out (a run directory's config.yaml, check-config's output) loads as it was.
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(chat.model_dump()))) == chat
    assert prefix_alignment(plain.task, plain.teacher) == 32  # vLLM's CPU block, twice its GPU block
    assert prefix_alignment(chat.task, chat.teacher) is None  # chat prompts are left as they are
    unpadded = make_config(teacher={"align_prefix": False})
    assert prefix_alignment(unpadded.task, unpadded.teacher) is None
    wide = make_config(teacher={"vllm": {"block_size": 48}})
    assert prefix_alignment(wide.task, wide.teacher) == 96  # a multiple of every block it may run with
    raw = make_config(teacher={"vllm": {"block_size": 48, "engine_kwargs": {"block_size": 64}}})
    assert prefix_alignment(raw.task, raw.teacher) == 64  # engine_kwargs reach vLLM over the typed option
    for bad in (0, -32, "64", True):
        with pytest.raises(ValueError, match="engine_kwargs.block_size must be a positive integer"):
            make_config(teacher={"vllm": {"engine_kwargs": {"block_size": bad}}})
    for huge in ({"block_size": 10**12}, {"engine_kwargs": {"block_size": 2048}}):  # padding a prompt to 10^12
        with pytest.raises(ValueError, match="longer than max_model_len=1024"):
            make_config(teacher={"vllm": huge})
    with pytest.raises(ValueError, match="block_size"):
        make_config(teacher={"vllm": {"block_size": -16}})  # would align to 32 and hand vLLM a negative block
    with pytest.raises(ValueError, match="align_prefix pads plain prompts only"):
        make_config(task={"prompt_style": "chat"}, teacher={"align_prefix": True})
    for refused in (
        {"task": {"prompt_style": "chat"}, "teacher": {"align_prompt_end": True}},
        {"teacher": {"align_prompt_end": True, "align_prefix": False}},
    ):
        with pytest.raises(ValueError, match="align_prompt_end pads plain prompts whose prefix is aligned"):
            make_config(**refused)
    assert make_config(teacher={"align_prompt_end": True}).teacher.align_prompt_end  # plain, prefix aligned

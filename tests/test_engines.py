"""The DeepSpeed engine's ZeRO stage: what one worker runs, and a checkpoint of another stage refused by name;
damaged checkpoint records refused by name on the driver and the worker; where its CPU op is built."""

import json
import os

import pytest

from llkd_ray.engines import ZERO_STAGE_FILE, DeepSpeedEngine, effective_zero_stage, use_environment_extension_cache
from llkd_ray.errors import UserError


def test_one_worker_runs_zero_1_and_2_as_stage_0_and_several_keep_their_stage():
    assert [effective_zero_stage(stage, 1) for stage in range(4)] == [0, 0, 0, 3]
    assert [effective_zero_stage(stage, 2) for stage in range(4)] == [0, 1, 2, 3]


def test_deepspeed_ops_are_built_inside_this_python_environment_unless_the_user_chose_a_folder(tmp_path, monkeypatch):
    import sys

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    assert use_environment_extension_cache() == str(tmp_path / "torch_extensions")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/opt/ops")
    assert use_environment_extension_cache() == "/opt/ops"

    # An environment this user cannot write to (a system install, say) keeps torch's default.
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "not-here"))
    assert use_environment_extension_cache() is None and "TORCH_EXTENSIONS_DIR" not in os.environ


def test_a_checkpoint_written_under_another_zero_stage_is_refused_before_deepspeed_reads_it(tmp_path):
    engine = object.__new__(DeepSpeedEngine)  # the check runs before the DeepSpeed engine is touched
    engine.zero_stage = 2
    (tmp_path / ZERO_STAGE_FILE).write_text(json.dumps({"zero_stage": 0}))
    with pytest.raises(UserError, match="written under DeepSpeed ZeRO stage 0 and this run has stage 2"):
        engine.load(str(tmp_path))


def run_config(tmp_path, **training):
    from tests.conftest import make_config

    return make_config(
        training={"storage_path": str(tmp_path / "ray"), **training}, output={"name": "run", "dir": str(tmp_path)}
    )


def write_checkpoint(tmp_path, cfg, stage_record: str) -> None:
    from llkd_ray.training import STATE_FILE, recipe_fingerprint

    checkpoint = tmp_path / "ray" / "run" / "epoch-001"
    checkpoint.mkdir(parents=True)
    (checkpoint / STATE_FILE).write_text(json.dumps({"epoch": 1, "recipe": recipe_fingerprint(cfg, 120)}))
    (checkpoint / ZERO_STAGE_FILE).write_text(stage_record)


def test_the_driver_refuses_a_resume_whose_worker_count_changes_the_zero_stage_before_any_worker_starts(tmp_path):
    from llkd_ray.training import check_resumable

    one_worker = run_config(tmp_path, strategy="deepspeed", zero_stage=2, num_workers=1)
    write_checkpoint(tmp_path, one_worker, json.dumps({"zero_stage": 0}))  # one worker ran ZeRO-2 as stage 0
    check_resumable(one_worker, 120)
    with pytest.raises(UserError, match="written under DeepSpeed ZeRO stage 0 and this run has stage 2"):
        check_resumable(run_config(tmp_path, strategy="deepspeed", zero_stage=2, num_workers=2), 120)


DAMAGED_STAGE_RECORDS = [
    "not json",
    "[0]",
    "null",
    json.dumps({"zero_stage": "2"}),
    json.dumps({"zero_stage": 7}),
    json.dumps({"zero_stage": True}),
    json.dumps({"stage": 2}),
    "[" * 100_000,
    json.dumps({"zero_stage": 0, "padding": "x" * 10_000}),  # longer than a record can be: not read whole
]


@pytest.mark.parametrize("record", DAMAGED_STAGE_RECORDS, ids=range(len(DAMAGED_STAGE_RECORDS)))
def test_a_damaged_zero_stage_record_is_refused_by_name_on_the_driver_and_the_worker(tmp_path, record):
    from llkd_ray.training import check_resumable

    cfg = run_config(tmp_path, strategy="deepspeed", zero_stage=2, num_workers=1)
    write_checkpoint(tmp_path, cfg, record)
    with pytest.raises(UserError, match="zero_stage.json is not a ZeRO stage record"):
        check_resumable(cfg, 120)
    engine = object.__new__(DeepSpeedEngine)
    engine.zero_stage = 0
    with pytest.raises(UserError, match="zero_stage.json is not a ZeRO stage record"):
        engine.load(str(tmp_path / "ray" / "run" / "epoch-001"))


@pytest.mark.parametrize("state", ["{", "[]", json.dumps({"epoch": 1}), json.dumps({"recipe": ["x"]}), "[" * 100_000])
def test_a_damaged_checkpoint_state_is_refused_by_name(tmp_path, state):
    from llkd_ray.training import STATE_FILE, check_resumable

    cfg = run_config(tmp_path, strategy="ddp")
    checkpoint = tmp_path / "ray" / "run" / "epoch-001"
    checkpoint.mkdir(parents=True)
    (checkpoint / STATE_FILE).write_text(state)
    with pytest.raises(UserError, match="llkd_state.json is damaged"):
        check_resumable(cfg, 120)


@pytest.mark.parametrize("pooling", ["mean", "model"])
def test_the_head_trains_at_its_own_multiple_of_the_scheduled_learning_rate(pooling):
    import torch

    from llkd_ray.engines import parameter_groups, set_group_learning_rates
    from llkd_ray.student import load_student

    network, _ = load_student("minilm-l6", ["positive", "negative"], pooling=pooling)
    names = {id(parameter): name for name, parameter in network.named_parameters()}
    encoder, head = parameter_groups(network, head_lr_scale=20.0)
    # The head is what the checkpoint did not have: BERT's pooler is pretrained, so it trains with the encoder.
    assert {names[id(p)] for p in head["params"]} == {"classifier.weight", "classifier.bias"}
    assert len(encoder["params"]) + len(head["params"]) == len(names)
    optimizer = torch.optim.AdamW([encoder, head], lr=1.0)
    set_group_learning_rates(optimizer.param_groups, 1e-4)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([1e-4, 2e-3])


@pytest.fixture(scope="module")
def one_process_group(tmp_path_factory):
    """A world of one, as a Ray Train worker has it. One for the module: DeepSpeed keeps the groups it saw."""
    import torch.distributed as dist

    with pytest.MonkeyPatch.context() as patch:
        for name in ("LOCAL_RANK", "RANK"):
            patch.setenv(name, "0")
        patch.setenv("WORLD_SIZE", "1")
        rendezvous = tmp_path_factory.mktemp("dist") / "rendezvous"
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
        yield
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_deepspeed_keeps_the_heads_learning_rate_multiple_in_its_optimizer(stage, one_process_group):
    """DeepSpeed builds its own optimizer (and ZeRO-3 re-partitions its groups): the head's group must still
    carry its multiple, or the schedule would set one rate for every parameter."""
    import torch

    from llkd_ray.config import TrainingConfig
    from llkd_ray.student import load_student

    network, _ = load_student("minilm-l6", ["positive", "negative"], pooling="mean")
    engine = DeepSpeedEngine(network, TrainingConfig(zero_stage=stage, head_lr_scale=20.0), torch.device("cpu"))
    engine.set_learning_rate(1e-4)
    assert sorted(group["lr"] for group in engine.engine.optimizer.param_groups) == pytest.approx([1e-4, 2e-3])

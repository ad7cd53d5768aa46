"""The DeepSpeed engine's ZeRO stage: what one worker runs, and a checkpoint of another stage refused by name."""

import json

import pytest

from llkd_ray.engines import ZERO_STAGE_FILE, DeepSpeedEngine, effective_zero_stage


def test_one_worker_runs_zero_1_and_2_as_stage_0_and_several_keep_their_stage():
    assert [effective_zero_stage(stage, 1) for stage in range(4)] == [0, 0, 0, 3]
    assert [effective_zero_stage(stage, 2) for stage in range(4)] == [0, 1, 2, 3]


def test_a_checkpoint_written_under_another_zero_stage_is_refused_before_deepspeed_reads_it(tmp_path):
    engine = object.__new__(DeepSpeedEngine)  # the check runs before the DeepSpeed engine is touched
    engine.zero_stage = 2
    (tmp_path / ZERO_STAGE_FILE).write_text(json.dumps({"zero_stage": 0}))
    with pytest.raises(RuntimeError, match="written under DeepSpeed ZeRO stage 0 and this run has stage 2"):
        engine.load(str(tmp_path))

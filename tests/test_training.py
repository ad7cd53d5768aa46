"""The student stage on a real local Ray cluster: Ray Train with DDP and DeepSpeed, selection independent of the
worker count, export, recovery from a killed worker, and a re-run that resumes."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from llkd_ray.corpus import load_rotten_tomatoes
from llkd_ray.training import split_pool_and_holdout, train_student
from tests.conftest import make_config

pytestmark = pytest.mark.slow
NAMES = ["positive", "negative"]


@pytest.fixture(scope="module")
def pool_and_holdout():
    """Real review snippets with a noisy teacher made from the gold labels (the teacher is not under test)."""
    rows = load_rotten_tomatoes(seed=21, limit=160).to_pylist()
    rng = np.random.default_rng(0)
    gold = np.array([NAMES.index(r["gold"]) for r in rows])
    confidence = rng.uniform(0.5, 1.0, len(rows))
    teacher_label = np.where(rng.uniform(size=len(rows)) < 0.85, gold, 1 - gold)
    probs = np.where(teacher_label[:, None] == np.arange(2), confidence[:, None], 1 - confidence[:, None])
    labels = pa.table(
        {
            "id": [r["id"] for r in rows],
            "text": [r["text"] for r in rows],
            "gold": [r["gold"] for r in rows],
            "probs_raw": pa.array(probs.tolist(), type=pa.list_(pa.float32())),
            "probs_calibrated": pa.array(probs.tolist(), type=pa.list_(pa.float32())),
            "label_index": pa.array(teacher_label, type=pa.int32()),
        }
    )
    return split_pool_and_holdout(labels, make_config(evaluation={"holdout": 40}))


def config(tmp_path: Path, name: str, **training):
    return make_config(
        student={"max_length": 48},
        training={
            "storage_path": str(tmp_path / "ray"),
            "epochs": 2,
            "batch_size": 16,
            "learning_rate": 1e-4,
            "cpus_per_worker": 0.5,
            "min_steps_per_epoch": 4,  # a 120-row pool: 4 steps an epoch keep these tests short
            **training,
        },
        output={"name": name, "dir": str(tmp_path / "runs")},
    )


def load_and_predict(student_dir: Path, texts: list[str]):
    from llkd_ray.student import load_exported_student

    model, tokenizer = load_exported_student(student_dir)
    assert model.config.id2label == {0: "positive", 1: "negative"}
    import torch

    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1).numpy()


def test_split_keeps_gold_labelled_holdout_out_of_the_pool(pool_and_holdout):
    pool, holdout = pool_and_holdout
    assert (pool.num_rows, holdout.num_rows) == (120, 40)
    assert not set(pool["id"].to_pylist()) & set(holdout["id"].to_pylist())
    assert pool["pool_index"].to_pylist() == list(range(120))


def test_selection_is_the_same_with_one_and_two_workers(ray_cluster, tmp_path, pool_and_holdout):
    """Past warm-up, so the student's scores are all-gathered from the shards and gate the selection. The learning
    rate is ~0: both students stay the seeded initial one, so any difference is the gather's (order, coverage)."""
    pool, holdout = pool_and_holdout
    common = {"strategy": "ddp", "epochs": 2, "learning_rate": 1e-12}
    one = train_student(config(tmp_path, "one", num_workers=1, **common), pool, holdout, tmp_path / "one")
    two = train_student(config(tmp_path, "two", num_workers=2, **common), pool, holdout, tmp_path / "two")
    assert 0 < len(one.used_pool_indices) < pool.num_rows
    assert one.used_pool_indices == two.used_pool_indices
    assert one.history[1]["selected"] < one.history[0]["selected"]  # the student gate did act in epoch 2
    for epoch in (0, 1):
        for key in ("selected", "selected_per_class"):
            assert one.history[epoch][key] == two.history[epoch][key], (epoch, key)
        # Thresholds are means and quantiles, blind to order: they may differ in the last digit, since a shard
        # batches its texts differently (other padding, float noise of ~1e-7 before the 6-decimal rounding).
        for key in ("teacher_thresholds", "student_thresholds"):
            assert one.history[epoch][key] == pytest.approx(two.history[epoch][key], abs=2e-4), (epoch, key)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_trains_exports_the_trained_weights_and_resumes(ray_cluster, tmp_path, pool_and_holdout, stage):
    from llkd_ray.evaluation import evaluate
    from llkd_ray.student import load_student, predict_probs

    pool, holdout = pool_and_holdout
    # The head at its own learning rate: ZeRO-2 partitions each optimizer group across the workers.
    cfg = config(tmp_path, f"zero{stage}", strategy="deepspeed", zero_stage=stage, num_workers=2, head_lr_scale=10.0)
    result = train_student(cfg, pool, holdout, tmp_path / "run")
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert all(np.isfinite(h["loss"]) and 0 <= h["eval_macro_f1"] <= 1 for h in result.history)
    probs = load_and_predict(result.student_dir, ["A triumph.", "A bore."])
    assert probs.shape == (2, 2) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    # The export says how many tokens it was trained on, so a server truncates where the evaluation did.
    assert json.loads((result.student_dir / "llkd_student.json").read_text())["max_length"] == 48
    # The export holds the trained weights (ZeRO-3 gathers them from the shards): it reproduces the last epoch's
    # holdout score, and it is not the untrained network.
    exported = evaluate(result.student_dir, holdout, NAMES, max_length=48)["student"]["macro_f1"]
    assert exported == pytest.approx(result.history[-1]["eval_macro_f1"], abs=1e-9)
    untrained, tokenizer = load_student("minilm-l6", NAMES, seed=cfg.training.seed)
    texts = holdout["text"].to_pylist()
    assert not np.allclose(
        predict_probs(untrained, tokenizer, texts, 48), load_and_predict(result.student_dir, texts), atol=1e-3
    )
    # Re-run under the same name: DeepSpeed loads the final checkpoint (through the checkpoint check) and has
    # nothing left to train.
    again = train_student(cfg, pool, holdout, tmp_path / "run")
    assert again.history == result.history and again.checkpoint_path == result.checkpoint_path


def test_ddp_student_export_matches_its_checkpoint_and_resumes_when_rerun(ray_cluster, tmp_path, pool_and_holdout):
    import torch

    from llkd_ray.student import load_exported_student

    pool, holdout = pool_and_holdout
    cfg = config(tmp_path, "ddp", strategy="ddp", num_workers=1)
    first = train_student(cfg, pool, holdout, tmp_path / "run")
    # The exported student holds exactly the weights of the final checkpoint (not a copy of something else).
    checkpointed = torch.load(Path(first.checkpoint_path) / "ddp_state.pt", weights_only=True)["model"]
    exported = load_exported_student(first.student_dir)[0].state_dict()
    assert set(exported) == {key.removeprefix("module.") for key in checkpointed}
    for key, tensor in checkpointed.items():
        torch.testing.assert_close(exported[key.removeprefix("module.")], tensor, rtol=0, atol=0)
    before = load_and_predict(first.student_dir, ["Gripping and smart.", "Lifeless."])
    again = train_student(cfg, pool, holdout, tmp_path / "run")  # same name: nothing left to train
    assert again.history == first.history and again.checkpoint_path == first.checkpoint_path
    np.testing.assert_allclose(load_and_predict(again.student_dir, ["Gripping and smart.", "Lifeless."]), before)


def test_the_architectures_own_head_trains_on_two_ddp_workers_and_exports_a_plain_hf_classifier(
    ray_cluster, tmp_path, pool_and_holdout
):
    """student.pooling=model (the other tests train the default, a mean-pooled head on MiniLM)."""
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    from llkd_ray.evaluation import evaluate

    pool, holdout = pool_and_holdout
    cfg = config(tmp_path, "model-head", strategy="ddp", num_workers=2)
    cfg = cfg.model_copy(update={"student": cfg.student.model_copy(update={"pooling": "model"})})
    result = train_student(cfg, pool, holdout, tmp_path / "run")
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert isinstance(
        AutoModelForSequenceClassification.from_pretrained(result.student_dir), BertForSequenceClassification
    )
    exported = evaluate(result.student_dir, holdout, NAMES, max_length=48)["student"]["macro_f1"]
    assert exported == pytest.approx(result.history[-1]["eval_macro_f1"], abs=1e-9)


def test_a_killed_worker_resumes_from_its_checkpoint_with_its_weight_average(ray_cluster, tmp_path, pool_and_holdout):
    import torch

    from llkd_ray.evaluation import evaluate
    from llkd_ray.student import load_exported_student
    from llkd_ray.weight_average import EMA_FILE

    pool, holdout = pool_and_holdout
    marker = tmp_path / "failed-once"
    cfg = config(tmp_path, "failing", strategy="ddp", num_workers=2, epochs=3, max_failures=1, ema_decay=0.9)
    result = train_student(cfg, pool, holdout, tmp_path / "run", fail_once_at=(2, str(marker)))
    assert marker.exists()  # the worker process really died at epoch 2
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    died_at = marker.stat().st_mtime
    # A resume keeps epoch 1 as checkpointed before the failure; a restart from scratch would redo it after.
    assert result.history[0]["finished_at"] < died_at < result.history[1]["finished_at"]
    # The average came back with the checkpoint: it followed all 3 × 4 steps, not only the 8 after the resume.
    saved = torch.load(Path(result.checkpoint_path) / EMA_FILE, weights_only=True)
    assert saved["steps"] == 3 * 4
    # What is exported and evaluated is the average, not the live weights it trails.
    exported = load_exported_student(result.student_dir)[0].state_dict()
    live = torch.load(Path(result.checkpoint_path) / "ddp_state.pt", weights_only=True)["model"]
    live = {name.removeprefix("module."): value for name, value in live.items()}
    key = "classifier.weight"
    torch.testing.assert_close(exported[key], saved["average"][key], rtol=0, atol=0)
    assert not torch.allclose(exported[key], live[key])
    exported_f1 = evaluate(result.student_dir, holdout, NAMES, max_length=48)["student"]["macro_f1"]
    assert exported_f1 == pytest.approx(result.history[-1]["eval_macro_f1"], abs=1e-9)
    # Only the newest checkpoints are kept (training.checkpoints_to_keep = 2).
    assert sorted(p.name for p in (tmp_path / "ray" / "failing").glob("epoch-*")) == ["epoch-002", "epoch-003"]


def test_length_grouped_batches_cover_each_selected_sample_once():
    from llkd_ray.training import _length_grouped_batches

    lengths = np.random.default_rng(1).integers(5, 300, size=1000)
    positions = np.flatnonzero(np.random.default_rng(2).uniform(size=1000) < 0.4)
    batches = _length_grouped_batches(positions, lengths, 16, np.random.default_rng(3))
    assert sorted(i for batch in batches for i in batch) == positions.tolist()
    windows = -(-len(positions) // (16 * 64))
    assert sum(len(batch) < 16 for batch in batches) <= windows  # only a window's last batch may be short
    # Similar lengths share a batch: far less spread inside a batch than across the selection.
    spread = np.mean([np.ptp(lengths[batch]) for batch in batches if len(batch) > 1])
    assert spread < 0.2 * np.ptp(lengths[positions])
    # and the order is still random: the batch order is not sorted by length
    firsts = [lengths[batch[0]] for batch in batches]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


def test_workers_train_on_batches_of_the_same_length_rank_at_each_step():
    """DDP waits for the slowest worker at every step: two shards' batches are paired by length, so the longer
    batch of a pair is barely longer than the mean, where independent orders made it far longer (37% here)."""
    from llkd_ray.training import align_across_workers, epoch_batches

    lengths = np.random.default_rng(1).integers(5, 300, size=2048)
    shards = [np.arange(0, 2048, 2), np.arange(1, 2048, 2)]

    def longest(rank, epoch, aligned):
        shard_lengths = lengths[shards[rank]]
        batches = epoch_batches(np.arange(1024), shard_lengths, 32, 48, np.random.default_rng([0, epoch, rank]))
        if aligned:
            aligned_batches = align_across_workers(batches, shard_lengths, np.random.default_rng([0, epoch]))
            assert sorted(map(sorted, aligned_batches)) == sorted(map(sorted, batches))  # the same batches
            batches = aligned_batches
        return np.array([shard_lengths[batch].max() for batch in batches])

    for aligned, low, high in ((False, 1.1, 2.0), (True, 1.0, 1.05)):
        pairs = np.array([[longest(rank, epoch, aligned) for rank in (0, 1)] for epoch in (1, 2)])
        waited, worked = pairs.max(axis=1).sum(), pairs.mean(axis=1).sum()
        assert low <= waited / worked < high, (aligned, waited / worked)
    # Still a random order on each worker, and another one next epoch.
    one, two = longest(0, 1, True), longest(0, 2, True)
    assert list(one) != sorted(one) and list(one) != list(two)


class PlantedPayload:
    """What an attacker with write access to the checkpoint storage would plant: unpickling runs a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_with_a_planted_pickle_is_refused_and_never_run(tmp_path):
    import torch

    from llkd_ray.engines import UnsafeCheckpointError, check_checkpoint_files

    marker = tmp_path / "code-ran"
    good, bad = tmp_path / "good", tmp_path / "bad"
    for directory in (good, bad):
        (directory / "state").mkdir(parents=True)
        torch.save({"model": {"w": torch.ones(2)}, "step": 3}, directory / "state" / "mp_rank_00_model_states.pt")
    torch.save({"optimizer": PlantedPayload(marker)}, bad / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    check_checkpoint_files(str(good))  # tensors and plain data load
    with pytest.raises(UnsafeCheckpointError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt: refusing"):
        check_checkpoint_files(str(bad))
    assert not marker.exists()
    torch.load(bad / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)  # what DeepSpeed does
    assert marker.exists()  # so the payload was live: the check is what stopped it


def test_the_learning_rate_schedule_at_known_steps():
    from llkd_ray.config import TrainingConfig
    from llkd_ray.training import learning_rate_at

    linear = TrainingConfig(learning_rate=1e-4, warmup_ratio=0.1, lr_schedule="linear")
    # 100 steps: warm-up over 10 (1e-5, 2e-5, … 1e-4 at step 9), then down by 1e-4/90 a step to 1e-4/90 at step 99
    assert [learning_rate_at(s, 100, linear) for s in (0, 4, 9)] == pytest.approx([1e-5, 5e-5, 1e-4])
    assert learning_rate_at(10, 100, linear) == pytest.approx(1e-4)
    assert learning_rate_at(55, 100, linear) == pytest.approx(0.5e-4)
    assert learning_rate_at(99, 100, linear) == pytest.approx(1e-4 / 90 * 1)
    cosine = linear.model_copy(update={"lr_schedule": "cosine"})
    assert learning_rate_at(55, 100, cosine) == pytest.approx(0.5e-4)  # cos(π/2): half way down
    assert learning_rate_at(32, 100, cosine) == pytest.approx(1e-4 * 0.5 * (1 + np.cos(np.pi * 22 / 90)))
    constant = linear.model_copy(update={"lr_schedule": "constant", "warmup_ratio": 0.0})
    assert {learning_rate_at(s, 100, constant) for s in (0, 50, 99)} == {1e-4}


def test_every_selector_gets_the_same_step_budget():
    from llkd_ray.config import TrainingConfig
    from llkd_ray.training import epoch_batches, steps_per_epoch

    # ceil(.25 · 40000 / (32 · 2)) = 157 steps a worker, whatever the selection; never under the minimum
    assert steps_per_epoch(TrainingConfig(batch_size=32, num_workers=2, epoch_fraction=0.25), 40000) == 157
    assert steps_per_epoch(TrainingConfig(batch_size=32, num_workers=2, min_steps_per_epoch=32), 4000) == 32
    assert steps_per_epoch(TrainingConfig(steps_per_epoch=7), 4000) == 7
    lengths = np.arange(1000)
    rng = np.random.default_rng(0)
    for selected in (np.arange(20), np.arange(1000)):  # a small selection is cycled, a large one cut short
        batches = epoch_batches(selected, lengths, 8, 16, rng)
        assert len(batches) == 16 and set(np.concatenate(batches)) <= set(selected)
    small = np.concatenate(epoch_batches(np.arange(20), lengths, 8, 16, rng))
    assert np.bincount(small).min() >= 5  # every one of the 20 used ~6 times, none left out
    assert epoch_batches(np.array([], dtype=int), lengths, 8, 16, rng) == []


def test_the_distillation_loss_against_hand_values():
    import torch

    from llkd_ray.config import TrainingConfig
    from llkd_ray.training import distillation_loss

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 0])
    teacher = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    weights = torch.tensor([1.0, 0.5])
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")  # (.12693, 1.31326)
    hard = distillation_loss(logits, targets, teacher, weights, TrainingConfig(soft_label_weight=0))
    assert float(hard) == pytest.approx(float((ce[0] + 0.5 * ce[1]) / 2), abs=1e-6)
    soft_cfg = TrainingConfig(soft_label_weight=0.5, distill_temperature=2.0)
    # T = 2: teacher^(1/2) renormalised = (.75, .25) and (.55051, .44949); student softmax(logits/2)
    tempered = torch.tensor([[0.75, 0.25], [0.55051, 0.44949]])
    student = torch.softmax(logits / 2, dim=-1)
    kl = (tempered * (tempered.log() - student.log())).sum(-1)
    expected = (weights * (0.5 * ce + 0.5 * 4 * kl)).sum() / 2
    assert float(distillation_loss(logits, targets, teacher, weights, soft_cfg)) == pytest.approx(
        float(expected), abs=1e-4
    )


def test_a_rerun_with_another_recipe_is_refused_instead_of_resuming_the_old_run(tmp_path):
    from llkd_ray.errors import UserError
    from llkd_ray.training import STATE_FILE, check_resumable, recipe_fingerprint

    cfg = config(tmp_path, "named-run")
    check_resumable(cfg, 120)  # nothing there yet
    checkpoint = tmp_path / "ray" / "named-run" / "epoch-001"
    checkpoint.mkdir(parents=True)
    (checkpoint / STATE_FILE).write_text(json.dumps({"epoch": 1, "recipe": recipe_fingerprint(cfg, 120)}))
    check_resumable(cfg, 120)  # the same recipe resumes
    check_resumable(config(tmp_path, "named-run", num_workers=2, max_failures=3), 120)  # where it runs: the same
    for changed, pool_size in ((config(tmp_path, "named-run", learning_rate=3e-5), 120), (cfg, 121)):
        with pytest.raises(UserError, match="trained with another configuration"):
            check_resumable(changed, pool_size)

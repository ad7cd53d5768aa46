"""A teacher-call budget spent in rounds the student chooses (``labeling.budget``; formulas in acquisition.py).

    round 0   the holdout (evaluation only, outside the budget), the probe and a diverse seed are labeled;
              the student trains on the seed with the LLKD recipe
    round r   the student scores the still-unlabeled corpus on Ray Data (student_scoring.py); the teacher labels
              the rows worth most to it; a fresh student trains on every row labeled so far
    stop      when the budget is spent, or when a round raised the student's agreement with the teacher on the
              probe by less than ``labeling.stop_margin`` (a rule that needs no gold labels)

Every round is recorded in the label store, under ``acquisitions/<output.name>/``:
``round-NN.parquet`` holds the round's rows (key, id, why: probe/seed/uncertain/random, the score that chose it)
and is written *before* the teacher sees them; ``round-NN.json`` holds the round's result once its student has
trained. A killed run resumes at the same round with the same rows: the store skips every row already committed,
so no teacher call is lost or made twice, and Ray Train resumes a half-trained round from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llkd_ray import acquisition
from llkd_ray.config import Config
from llkd_ray.errors import UserError
from llkd_ray.pseudo_label_store import PseudoLabelStore

logger = logging.getLogger(__name__)
LEDGER_FILE = "ledger.json"
LEDGER_SCHEMA = pa.schema(
    [("key", pa.string()), ("id", pa.string()), ("round", pa.int32()), ("reason", pa.string()), ("score", pa.float32())]
)


def budget_identity(cfg: Config, candidate_keys: list[str], holdout_keys: set[str]) -> str:
    """What a run's rounds depend on: the budget's settings, the candidates, the holdout and the training recipe.
    Where the scorers run and the stopping margin are left out: changing those resumes the same rounds."""
    from llkd_ray.training import _NOT_RECIPE

    identity = {
        "labeling": cfg.labeling.model_dump(exclude={"scorer", "stop_margin"}),
        "candidates": hashlib.sha256("\n".join(sorted(candidate_keys)).encode()).hexdigest(),
        "holdout": hashlib.sha256("\n".join(sorted(holdout_keys)).encode()).hexdigest(),
        "selection": cfg.selection.model_dump(),
        "training": cfg.training.model_dump(exclude=_NOT_RECIPE),
        "student": cfg.student.model_dump(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


class AcquisitionLedger:
    """What each round of one run chose, and what came of it, next to the labels in the store. A ledger belongs to
    one budget (``budget_identity``): a run of the same name with another budget, corpus or recipe is refused
    instead of resuming rounds that were chosen for something else."""

    def __init__(self, store: PseudoLabelStore, run_name: str, identity: str | None = None):
        self.store = store
        self.root = f"{store.root}/acquisitions/{run_name}"
        store.fs.create_dir(self.root, recursive=True)
        if identity is not None:
            self._claim(run_name, identity)

    def _claim(self, run_name: str, identity: str) -> None:
        path = f"{self.root}/{LEDGER_FILE}"
        try:
            with self.store.fs.open_input_stream(path) as stream:
                held = json.loads(stream.read()).get("identity")
        except FileNotFoundError:
            self.store._write_bytes(json.dumps({"identity": identity}).encode(), path)
            return
        except ValueError:
            held = None
        if held != identity:
            raise UserError(
                f"{self.store.display_root}/acquisitions/{run_name} holds the budget rounds of a run named"
                f" {run_name!r} with another budget, corpus or training recipe; resuming them would train on rows"
                " chosen for something else. Set output.name to a new name, or delete that directory to start over"
            )

    def plan(self, round_index: int) -> pa.Table | None:
        path = f"{self.root}/round-{round_index:02d}.parquet"
        try:
            plan = pq.read_table(path, filesystem=self.store.fs)
        except FileNotFoundError:
            return None
        except pa.ArrowInvalid as error:
            raise UserError(
                f"{path} is not a readable round plan ({error}); delete it to choose that round again"
            ) from None
        if not plan.schema.equals(LEDGER_SCHEMA):
            raise UserError(
                f"{path} is not a round plan (its columns are {plan.schema.names}); delete it to choose that round"
                " again"
            )
        return plan

    def record_plan(self, round_index: int, table: pa.Table) -> None:
        self.store._write_atomically(table.cast(LEDGER_SCHEMA), f"{self.root}/round-{round_index:02d}.parquet")

    def result(self, round_index: int) -> dict | None:
        try:
            with self.store.fs.open_input_stream(f"{self.root}/round-{round_index:02d}.json") as stream:
                return json.loads(stream.read())
        except FileNotFoundError:
            return None

    def record_result(self, round_index: int, result: dict) -> None:
        self.store._write_bytes(json.dumps(result, indent=2).encode(), f"{self.root}/round-{round_index:02d}.json")


@dataclass
class CorpusIndex:
    """The corpus on the driver without its texts: what the rounds choose among."""

    keys: list[str]
    ids: list[str]
    holdout_keys: set[str]
    candidates: np.ndarray  # positions of rows the budget may buy (usable, not held out, first of their id)
    rejected_keys: set[str]  # rows the corpus reader rejected: recorded in the store, never sent to the teacher
    duplicate_keys: set[str]  # rows whose id an earlier row has: not candidates

    @property
    def id_of(self) -> dict[str, str]:
        return dict(zip(self.keys, self.ids))


def index_corpus(cfg: Config) -> CorpusIndex:
    from llkd_ray.corpus import read_corpus
    from llkd_ray.training import holdout_ids

    columns = ["id", "key", "gold", "reject_reason"]
    batches = list(read_corpus(cfg.corpus).select_columns(columns).iter_batches(batch_format="pyarrow"))
    table = pa.concat_tables(batches) if batches else pa.table({c: pa.array([], pa.string()) for c in columns})
    rejected = pc.is_valid(table["reject_reason"]).to_pylist()
    keys, ids, golds = table["key"].to_pylist(), table["id"].to_pylist(), table["gold"].to_pylist()
    # In key order: Ray Data does not keep row order, and a seed's draws must pick the same rows every time.
    usable = sorted((i for i in range(len(keys)) if not rejected[i]), key=lambda i: keys[i])
    held = holdout_ids(
        [ids[i] for i in usable], [golds[i] for i in usable], cfg.task.label_names, cfg.evaluation.holdout
    )
    seen: set[str] = set()
    candidates, duplicates, holdout_keys = [], set(), set()
    for i in usable:
        if ids[i] in seen:
            duplicates.add(keys[i])
            continue
        seen.add(ids[i])
        if ids[i] in held:
            holdout_keys.add(keys[i])
        else:
            candidates.append(i)
    if duplicates:
        logger.warning("%d corpus rows repeat an earlier row's id: they are not offered to the budget", len(duplicates))
    return CorpusIndex(
        keys,
        ids,
        holdout_keys,
        np.asarray(candidates, dtype=np.int64),
        {keys[i] for i in range(len(keys)) if rejected[i]},
        duplicates,
    )


@dataclass
class BudgetResult:
    trained: object  # training.TrainResult of the last round
    pool: pa.Table
    holdout: pa.Table
    rounds: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def run_budget(cfg: Config, run_dir: Path, evaluation_rows=None) -> BudgetResult:
    """Spend ``labeling.budget`` in rounds; returns the last round's student, its pool and the holdout.

    ``evaluation_rows(holdout) -> table`` picks the rows the students are scored on each epoch (a benchmark's
    dev split); by default the whole holdout."""
    from llkd_ray.ray_session import init_ray

    init_ray(cfg.ray)
    labeling = cfg.labeling
    store = PseudoLabelStore(cfg)
    index = index_corpus(cfg)
    candidate_keys = [index.keys[i] for i in index.candidates]
    ledger = AcquisitionLedger(store, cfg.output.name, budget_identity(cfg, candidate_keys, index.holdout_keys))
    budget = acquisition.budget_rows(labeling.budget, len(index.candidates))
    probe_size, sizes = acquisition.round_sizes(budget, labeling.rounds, labeling.probe_fraction)
    logger.info(
        "budget: %d of %d candidate rows (%.1f%%): a probe of %d, then %s rows in %d round(s); %d held out",
        budget,
        len(index.candidates),
        100 * budget / max(len(index.candidates), 1),
        probe_size,
        "+".join(map(str, sizes)),
        labeling.rounds,
        len(index.holdout_keys),
    )
    rounds: list[dict] = []
    calls = 0
    for round_index, size in enumerate(sizes):
        plan = ledger.plan(round_index)
        if plan is None:
            previous = _round_student(rounds[-1], run_dir).student_dir if rounds else None
            plan = _plan_round(cfg, index, ledger, round_index, size, probe_size, previous)
            ledger.record_plan(round_index, plan)
        wanted = set(plan["key"].to_pylist())
        if round_index == 0:  # the holdout and the corpus's rejects are recorded in the store once, up front
            wanted |= index.holdout_keys | index.rejected_keys
        started = time.time()
        labeled = _label(cfg, wanted)
        labeling_seconds = round(time.time() - started, 1)
        calls += labeled
        recorded = ledger.result(round_index)
        if recorded is None:
            recorded = _train_round(cfg, ledger, index, round_index, run_dir, evaluation_rows)
            recorded.update(teacher_calls=labeled, labeling_seconds=labeling_seconds)
            ledger.record_result(round_index, recorded)
        rounds.append(recorded)
        logger.info(
            "round %d: %d rows labeled for training so far; agreement with the teacher on the probe %s; holdout"
            " macro-F1 %s",
            round_index,
            recorded["trained_rows"],
            _fmt(recorded["probe_agreement"]),
            _fmt(recorded["holdout_macro_f1"]),
        )
        previous = rounds[-2]["probe_agreed"] if len(rounds) > 1 else None
        if acquisition.agreement_stalled(previous, recorded["probe_agreed"], labeling.stop_margin):
            logger.info(
                "stopping after round %d: it raised the probe agreement by less than labeling.stop_margin=%g",
                round_index,
                labeling.stop_margin,
            )
            break
    acquired = sum(r["acquired_rows"] for r in rounds)
    summary = {
        "candidate_rows": len(index.candidates),
        "budget_rows": budget,
        "probe_rows": probe_size,
        "acquired_rows": acquired,  # probe + training rows the rounds bought, from the teacher or the store
        "teacher_calls": calls,  # rows this invocation sent to the teacher (holdout included)
        "rows_not_labeled": len(index.candidates) - acquired,
        "rounds_run": len(rounds),
        "stopped_early": len(rounds) < len(sizes),
        "holdout_rows": len(index.holdout_keys),
    }
    pool, holdout = _round_pool(cfg, ledger, index, len(rounds) - 1, evaluation_rows)
    return BudgetResult(_round_student(rounds[-1], run_dir), pool, holdout, rounds, summary)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _label(cfg: Config, keys: set[str]) -> int:
    """Teacher calls made for ``keys`` (rows already in the store cost none)."""
    from llkd_ray.labeling import run_labeling

    return run_labeling(cfg, keys=keys).labeled_this_run


def _acquired(ledger: AcquisitionLedger, up_to: int) -> pa.Table:
    plans = [ledger.plan(r) for r in range(up_to + 1)]
    return pa.concat_tables([p for p in plans if p is not None])


def _plan_round(
    cfg: Config,
    index: CorpusIndex,
    ledger: AcquisitionLedger,
    round_index: int,
    size: int,
    probe_size: int,
    previous_student: Path | None,
) -> pa.Table:
    """The rows round ``round_index`` buys (LEDGER_SCHEMA), chosen from the candidates not bought before."""
    from llkd_ray.student_scoring import score_unlabeled

    rng = np.random.default_rng([cfg.labeling.seed, round_index])
    taken = set(_acquired(ledger, round_index - 1)["key"].to_pylist()) if round_index else set()
    free = np.asarray([i for i in index.candidates if index.keys[i] not in taken], dtype=np.int64)
    parts = []
    if round_index == 0 and probe_size:
        probe = rng.choice(free, size=min(probe_size, len(free)), replace=False)
        parts.append(_ledger_rows(index, probe, round_index, "probe", None))
        free = np.setdiff1d(free, probe)
    size = min(size, len(free))
    if cfg.labeling.acquisition == "random" or size == 0:
        chosen = rng.choice(free, size=size, replace=False)
        parts.append(_ledger_rows(index, chosen, round_index, "random" if round_index else "seed", None))
        return pa.concat_tables(parts)
    # Round 0 clusters the untrained student's embeddings; later rounds ask the last round's student.
    model = str(previous_student) if previous_student else cfg.student.model
    free_keys = {index.keys[i] for i in free}
    excluded = set(index.keys) - free_keys
    scores = score_unlabeled(cfg, model, excluded, round_index)
    position = {key: i for i, key in enumerate(index.keys)}
    rows = np.asarray([position[key] for key in scores["key"].to_pylist()], dtype=np.int64)
    uncertainty = scores["uncertainty"].to_numpy()
    clusters = scores["cluster"].to_numpy()
    if round_index == 0:
        picked = acquisition.stratified_seed(clusters, size, rng)
        parts.append(_ledger_rows(index, rows[picked], round_index, "seed", None))
    else:
        predicted = scores["predicted"].to_numpy()
        picked, drawn = acquisition.student_and_random(
            uncertainty, predicted, clusters, size, len(cfg.task.labels), cfg.labeling.random_share, rng
        )
        parts.append(_ledger_rows(index, rows[picked], round_index, "uncertain", uncertainty[picked]))
        if len(drawn):
            parts.append(_ledger_rows(index, rows[drawn], round_index, "random", None))
    return pa.concat_tables(parts)


def _ledger_rows(index: CorpusIndex, rows: np.ndarray, round_index: int, reason: str, scores) -> pa.Table:
    rows = np.asarray(rows, dtype=np.int64)
    return pa.table(
        {
            "key": pa.array([index.keys[i] for i in rows], pa.string()),
            "id": pa.array([index.ids[i] for i in rows], pa.string()),
            "round": pa.array([round_index] * len(rows), pa.int32()),
            "reason": pa.array([reason] * len(rows), pa.string()),
            "score": pa.nulls(len(rows), pa.float32()) if scores is None else pa.array(scores, pa.float32()),
        },
        schema=LEDGER_SCHEMA,
    )


def _round_config(cfg: Config, round_index: int) -> Config:
    return cfg.model_copy(
        update={"output": cfg.output.model_copy(update={"name": f"{cfg.output.name}-round-{round_index:02d}"})}
    )


def _round_pool(cfg: Config, ledger, index: CorpusIndex, round_index: int, evaluation_rows):
    """(pool, holdout) of a round: the training rows bought so far, and the labeled holdout."""
    from llkd_ray.pseudo_label_store import read_labels
    from llkd_ray.training import split_pool_and_holdout

    bought = _acquired(ledger, round_index)
    training_ids = set(bought.filter(pc.not_equal(bought["reason"], "probe"))["id"].to_pylist())
    id_of = index.id_of
    labels = read_labels(cfg, ids=training_ids | {id_of[key] for key in index.holdout_keys})
    pool, holdout = split_pool_and_holdout(labels, cfg)
    return pool, (holdout if evaluation_rows is None else evaluation_rows(holdout))


def _round_student(record: dict, run_dir: Path):
    """The TrainResult of a recorded round. Its exported student is restored from the round's final checkpoint (in
    training.storage_path) when this driver does not hold it: a run resumed on another node carries on."""
    from ray.train import Checkpoint

    from llkd_ray.training import STUDENT_DIR, TrainResult

    student_dir = run_dir / "rounds" / f"round-{record['round']:02d}" / STUDENT_DIR
    if not (student_dir / "config.json").exists():
        with Checkpoint(record["checkpoint"]).as_directory() as directory:
            shutil.rmtree(student_dir, ignore_errors=True)
            shutil.copytree(Path(directory) / STUDENT_DIR, student_dir)
    return TrainResult(student_dir, record["history"], record["used"], record["checkpoint"])


def _train_round(cfg: Config, ledger, index: CorpusIndex, round_index: int, run_dir: Path, evaluation_rows) -> dict:
    from llkd_ray.pseudo_label_store import read_labels
    from llkd_ray.student import load_exported_student, predict_probs
    from llkd_ray.training import train_student

    pool, holdout = _round_pool(cfg, ledger, index, round_index, evaluation_rows)
    round_dir = run_dir / "rounds" / f"round-{round_index:02d}"
    round_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    trained = train_student(_round_config(cfg, round_index), pool, holdout, round_dir)
    # The probe: rows the teacher labeled and no student trained on.
    probe_plan = ledger.plan(0)
    probe_ids = set(probe_plan.filter(pc.equal(probe_plan["reason"], "probe"))["id"].to_pylist())
    agreed: list[int] = []
    if probe_ids:
        probe = read_labels(cfg, ids=probe_ids).sort_by("id")  # the same row order every round: a paired test
        network, tokenizer = load_exported_student(trained.student_dir)
        predicted = predict_probs(network, tokenizer, probe["text"].to_pylist(), cfg.student.max_length).argmax(1)
        agreed = (predicted == np.asarray(probe["label_index"].to_pylist())).astype(int).tolist()
    last = trained.history[-1] if trained.history else {}
    bought = ledger.plan(round_index)
    return {
        "round": round_index,
        "acquired_rows": bought.num_rows,
        "trained_rows": pool.num_rows,
        "probe_agreement": float(np.mean(agreed)) if agreed else None,
        "probe_agreed": agreed,
        "holdout_macro_f1": last.get("eval_macro_f1"),
        "student_dir": str(trained.student_dir),
        "training_seconds": round(time.time() - started, 1),
        "history": trained.history,
        "used": trained.used_pool_indices,
        "checkpoint": trained.checkpoint_path,
    }

"""``llkd run``: label → select + train → evaluate → report, into one run directory.

    <output.dir>/<output.name>/
        config.yaml      the resolved configuration
        metrics.json     labeling counts, per-epoch history, final evaluation
        student/         the exported student (Hugging Face format), ready for `llkd serve`
        *.png            selection, F1 and teacher-confidence plots
        report.md        a short report that links them

``output.dir`` may be a URI (``s3://bucket/runs``): the run is written locally, then published there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time

import yaml

from llkd_ray.config import Config

logger = logging.getLogger(__name__)


LABELING_STAGE = "labeling (Ray start, teacher load, scoring)"
BUDGET_STAGE = "budget rounds (labeling, student scoring of the corpus, training each round)"


class StageClock:
    """Wall time per stage of a run, for the report's breakdown."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - started, 1)


def run_pipeline(cfg: Config, label: bool = True) -> str:
    """The whole run; ``label=False`` trains on the labels already in the store (``llkd train``)."""
    # torch (and its MKL) loads first, while the process has one thread: loading it later, beside Ray Data's
    # threads, aborted a job driver once with "oneMKL FATAL ERROR: Cannot load libtorch_cpu.so".
    import torch  # noqa: F401

    from llkd_ray import plots
    from llkd_ray.budget import run_budget
    from llkd_ray.corpus import corpus_ids
    from llkd_ray.evaluation import evaluate, student_profile, teacher_confidence_quality
    from llkd_ray.labeling import run_labeling
    from llkd_ray.pseudo_label_store import read_labels, stored_counts
    from llkd_ray.ray_session import init_ray
    from llkd_ray.report import buys_line, write_report
    from llkd_ray.storage import RunDirectory
    from llkd_ray.training import split_pool_and_holdout, train_student

    started = time.time()
    clock = StageClock()
    destination = RunDirectory(cfg.output.dir, cfg.output.name)
    run_dir = destination.local
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    names = cfg.task.label_names

    budget = None
    if label and cfg.labeling.budget is not None:
        logger.info(
            "stages 1-2/3: the teacher labels a budget of %s in up to %d rounds the student chooses; a student"
            " (%s) trains with %s selection after each",
            cfg.labeling.budget,
            cfg.labeling.rounds,
            cfg.student.model,
            cfg.selection.strategy,
        )
        with clock.stage(BUDGET_STAGE):
            budget = run_budget(cfg, run_dir)
        labeling = {
            **stored_counts(cfg),
            "labeled_this_run": budget.summary["teacher_calls"],
            "labeling_seconds": sum(r.get("labeling_seconds", 0) for r in budget.rounds),
        }
        trained, pool, holdout = budget.trained, budget.pool, budget.holdout
        labels = read_labels(cfg, ids=set(pool["id"].to_pylist()) | set(holdout["id"].to_pylist()))
    else:
        if label:
            logger.info("stage 1/3: the teacher labels the corpus")
            with clock.stage(LABELING_STAGE):
                labeling = vars(run_labeling(cfg))
        else:
            labeling = stored_counts(cfg)  # fails with a clear message before any cluster starts
            with clock.stage("Ray start"):
                init_ray(cfg.ray)
        with clock.stage("reading the labels, pool and holdout"):
            labels = read_labels(cfg, ids=corpus_ids(cfg.corpus))  # the store may hold other corpora's rows too
            pool, holdout = split_pool_and_holdout(labels, cfg)
        logger.info(
            "stage 2/3: the student (%s) trains with %s selection on a pool of %d rows; %d gold-labelled rows held out",
            cfg.student.model,
            cfg.selection.strategy,
            pool.num_rows,
            holdout.num_rows,
        )
        with clock.stage("training (workers, per-epoch scoring and selection, checkpoints, export)"):
            trained = train_student(cfg, pool, holdout, run_dir)
    logger.info("stage 3/3: evaluation, plots and report")
    with clock.stage("evaluation"):
        evaluation = evaluate(trained.student_dir, holdout, names, cfg.student.max_length)
        quality = teacher_confidence_quality(labels, names, cfg.teacher.calibrate)
    with clock.stage("student speed and size"):
        speed_texts = holdout["text"].to_pylist() or pool["text"].to_pylist()
        buys = what_the_student_buys(
            cfg, student_profile(trained.student_dir, speed_texts, cfg.student.max_length), labeling, clock
        )
    with clock.stage("plots"):
        pictures = [
            plots.plot_selection(trained.history, names, run_dir / "selection.png"),
            plots.plot_f1(trained.history, evaluation.get("teacher", {}).get("macro_f1"), run_dir / "f1.png"),
        ]
        if budget is not None:
            pictures.append(plots.plot_rounds(budget.rounds, run_dir / "rounds.png"))
        if quality:
            pictures.append(
                plots.plot_teacher_confidence(
                    quality["confidence"], quality["correct"], run_dir / "teacher_confidence.png"
                )
            )
    metrics = {
        "labeling": labeling,
        "pool_size": pool.num_rows,
        "holdout_size": holdout.num_rows,
        "pool_fraction_used": len(trained.used_pool_indices) / max(pool.num_rows, 1),
        "teacher_confidence": {k: v for k, v in quality.items() if k not in ("confidence", "correct")},
        "evaluation": evaluation,
        "student_buys": buys,
        "history": trained.history,
        "checkpoint": trained.checkpoint_path,
        "budget": None if budget is None else {**budget.summary, "rounds": budget.rounds},
        "stage_seconds": clock.seconds,
        "seconds": round(time.time() - started, 1),
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    report = write_report(run_dir, cfg, metrics, pictures)
    student, teacher = evaluation.get("student", {}), evaluation.get("teacher", {})
    if student:
        logger.info(
            "holdout macro-F1: student %.3f vs teacher %.3f; the student trained on %.1f%% of the pool",
            student["macro_f1"],
            teacher["macro_f1"],
            100 * metrics["pool_fraction_used"],
        )
    logger.info(buys_line(buys))
    if destination.is_remote:
        logger.info("done in %.0f s: published to %s/%s", metrics["seconds"], destination.publish(), report.name)
    else:
        logger.info("done in %.0f s: %s", metrics["seconds"], report)
    return destination.target


def what_the_student_buys(cfg: Config, profile: dict, labeling: dict, clock: StageClock) -> dict:
    """The student next to its teacher: size, texts/s on this machine, and what labeling cost."""
    from llkd_ray.model_sources import local_weights_megabytes

    teacher_megabytes = local_weights_megabytes(cfg.teacher.model)  # None where the driver does not hold it
    labeled_now = labeling.get("labeled_this_run", 0)
    labeling_seconds = clock.seconds.get(LABELING_STAGE) or labeling.get("labeling_seconds")
    teacher_rate = round(labeled_now / labeling_seconds, 1) if labeled_now and labeling_seconds else None
    return {
        "student_parameters": profile["parameters"],
        "student_megabytes": profile["megabytes"],
        "student_texts_per_second": profile["texts_per_second"],
        "teacher_megabytes": None if teacher_megabytes is None else round(teacher_megabytes, 1),
        # Rows labeled this run over the labeling stage's wall time (engine load included): what a re-label costs.
        "teacher_texts_per_second": teacher_rate,
        "labeling_seconds": labeling_seconds if labeled_now else None,
    }

"""Evaluate the exported student and the teacher on the same gold-labelled texts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from llkd_ray.metrics import auroc, classification_report
from llkd_ray.student import load_exported_student


def teacher_confidence_quality(labels: pa.Table, label_names: list[str], calibrated: bool) -> dict:
    """Does the teacher's confidence rank its correctness? Over every pseudo-labelled row with a gold label."""
    gold = labels["gold"].to_pylist()
    rows = [i for i, g in enumerate(gold) if g in label_names]
    if not rows:
        return {}
    probs = np.asarray(labels["probs_calibrated" if calibrated else "probs_raw"].take(rows).to_pylist())
    correct = probs.argmax(axis=1) == np.array([label_names.index(gold[i]) for i in rows])
    confidence = probs.max(axis=1)
    return {
        "rows": len(rows),
        "accuracy": float(correct.mean()),
        "auroc": auroc(confidence, correct),
        "confidence": confidence,
        "correct": correct,
    }


def evaluate(student_dir: Path, holdout: pa.Table, label_names: list[str], max_length: int) -> dict:
    """Student and teacher reports on the holdout (accuracy, macro-F1, per-class F1, confusion matrix)."""
    from llkd_ray.student import predict_probs

    if holdout.num_rows == 0:
        return {}
    network, tokenizer = load_exported_student(student_dir)
    gold = np.asarray(holdout["gold_index"].to_pylist())
    student = predict_probs(network, tokenizer, holdout["text"].to_pylist(), max_length).argmax(axis=1)
    teacher = np.asarray(holdout["teacher_probs"].to_pylist()).argmax(axis=1)
    return {
        "student": classification_report(gold, student, label_names),
        "teacher": classification_report(gold, teacher, label_names),
    }


def directory_megabytes(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def student_profile(student_dir: Path, texts: list[str], max_length: int) -> dict:
    """What the student costs to run: parameters, size on disk, and texts/s on this machine (warmed up, batches of
    32, on up to 512 of ``texts``)."""
    import time

    from llkd_ray.student import predict_probs

    network, tokenizer = load_exported_student(student_dir)
    sample = texts[:512]
    predict_probs(network, tokenizer, sample[:32], max_length)  # warm-up
    started = time.perf_counter()
    predict_probs(network, tokenizer, sample, max_length)
    seconds = time.perf_counter() - started
    return {
        "parameters": sum(p.numel() for p in network.parameters()),
        "megabytes": round(directory_megabytes(student_dir), 1),
        "texts_per_second": round(len(sample) / seconds, 1) if sample else None,
    }

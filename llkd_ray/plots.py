"""The pictures of a run: thresholds and selection per epoch, F1 per epoch, teacher confidence histogram."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: runs on headless cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_selection(history: list[dict], label_names: list[str], path: Path) -> Path:
    epochs = [h["epoch"] for h in history]
    figure, (thresholds, counts) = plt.subplots(1, 2, figsize=(11, 4))
    for name in label_names:
        (line,) = thresholds.plot(
            epochs, [h["teacher_thresholds"][name] for h in history], marker="o", label=f"τ^T({name})"
        )
        thresholds.plot(
            epochs,
            [h["student_thresholds"][name] for h in history],
            marker="x",
            linestyle="--",
            color=line.get_color(),
            label=f"τ^S({name})",
        )
        counts.plot(epochs, [h["selected_per_class"][name] for h in history], marker="o", label=f"selected: {name}")
    counts.plot(
        epochs,
        [h["cumulative_used"] for h in history],
        color="black",
        linestyle=":",
        label="distinct samples used so far",
    )
    thresholds.set(title="Thresholds per class (teacher solid, student dashed)", xlabel="epoch", ylabel="threshold")
    counts.set(title="Samples selected per epoch", xlabel="epoch", ylabel="samples")
    for axis in (thresholds, counts):
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    return _save(figure, path)


def plot_f1(history: list[dict], teacher_f1: float | None, path: Path) -> Path:
    epochs = [h["epoch"] for h in history]
    figure, (f1, loss) = plt.subplots(1, 2, figsize=(11, 4))
    if any("eval_macro_f1" in h for h in history):
        f1.plot(epochs, [h.get("eval_macro_f1", np.nan) for h in history], marker="o", label="student")
    if teacher_f1 is not None:
        f1.axhline(teacher_f1, color="gray", linestyle="--", label="teacher")
    f1.set(title="Holdout macro-F1 per epoch", xlabel="epoch", ylabel="macro-F1")
    loss.plot(epochs, [h["loss"] for h in history], marker="o", color="tab:red")
    loss.set(title="Weighted training loss", xlabel="epoch", ylabel="loss")
    f1.legend()
    for axis in (f1, loss):
        axis.grid(alpha=0.3)
    return _save(figure, path)


def plot_teacher_confidence(confidence: np.ndarray, correct: np.ndarray, path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(6, 4))
    bins = np.linspace(confidence.min() if len(confidence) else 0, 1, 21)
    axis.hist(confidence[correct], bins=bins, alpha=0.6, label=f"correct ({int(correct.sum())})")
    axis.hist(confidence[~correct], bins=bins, alpha=0.6, label=f"incorrect ({int((~correct).sum())})")
    axis.set(title="Teacher confidence vs gold label", xlabel="teacher confidence", ylabel="texts")
    axis.legend()
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_rounds(rounds: list[dict], path: Path) -> Path:
    """Budget rounds: the student's holdout macro-F1 (where gold labels exist) and its agreement with the teacher
    on the probe, against the rows bought from the teacher so far."""
    bought = np.cumsum([r["acquired_rows"] for r in rounds])
    figure, axis = plt.subplots(figsize=(6, 4))
    for key, name, marker in (
        ("holdout_macro_f1", "holdout macro-F1", "o"),
        ("probe_agreement", "probe agreement", "s"),
    ):
        points = [(x, r[key]) for x, r in zip(bought, rounds) if r.get(key) is not None]
        if points:
            axis.plot(*zip(*points), marker=marker, label=name)
    for x, r in zip(bought, rounds):
        axis.annotate(f"round {r['round']}", (x, axis.get_ylim()[0]), fontsize=7, rotation=90, va="bottom")
    axis.set(title="Budget rounds", xlabel="rows labeled by the teacher (probe included)", ylabel="score")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path

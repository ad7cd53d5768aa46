"""A short Markdown report of a run that links its plots."""

from __future__ import annotations

from pathlib import Path

from llkd_ray.config import Config


def _row(name: str, report: dict) -> str:
    return (
        f"| {name} | {report['accuracy']:.3f} | {report['macro_f1']:.3f} | "
        + ", ".join(f"{label} {f1:.3f}" for label, f1 in report["per_class_f1"].items())
        + " |"
    )


def write_report(run_dir: Path, cfg: Config, metrics: dict, pictures: list[Path]) -> Path:
    labeling = metrics["labeling"]
    lines = [
        f"# LLKD run `{cfg.output.name}`",
        "",
        f"Teacher `{cfg.teacher.model}` ({cfg.teacher.backend}), student `{cfg.student.model}`"
        f" ({cfg.training.strategy}, {cfg.training.num_workers} worker(s)), selection `{cfg.selection.strategy}`,"
        f" {cfg.training.epochs} epochs; {metrics['seconds']:.0f} s in all.",
        "",
        "## Data",
        f"- corpus rows read: {labeling['rows']} = labeled {labeling['labeled']} + rejected {labeling['rejected']}"
        f" ({labeling['truncated']} truncated)",
        f"- training pool {metrics['pool_size']}, holdout {metrics['holdout_size']};"
        f" the student trained on **{metrics['pool_fraction_used']:.1%}** of the pool",
    ]
    quality = metrics["teacher_confidence"]
    if quality:
        lines.append(
            f"- teacher accuracy on {quality['rows']} gold-labelled rows {quality['accuracy']:.3f};"
            f" confidence-vs-correctness AUROC {quality['auroc']:.3f}"
        )
    evaluation = metrics["evaluation"]
    if evaluation:
        lines += [
            "",
            "## Holdout",
            "",
            "| model | accuracy | macro-F1 | per-class F1 |",
            "|---|---|---|---|",
            _row("teacher", evaluation["teacher"]),
            _row("student", evaluation["student"]),
            "",
            f"Student confusion matrix (rows gold, columns predicted; {', '.join(cfg.task.label_names)}):"
            f" `{evaluation['student']['confusion_matrix']}`",
        ]
    if metrics.get("budget"):
        lines += ["", "## Teacher budget", ""] + budget_lines(metrics["budget"], metrics.get("student_buys") or {})
    if metrics.get("student_buys"):
        lines += ["", "## What the student buys", "", buys_line(metrics["student_buys"]).split(": ", 1)[1] + "."]
    lines += [
        "",
        "## Per epoch",
        "",
        "| epoch | selected | distinct used | loss | holdout macro-F1 | scoring + selection s | training s |",
        "|---|---|---|---|---|---|---|",
    ]
    for h in metrics["history"]:
        f1 = h.get("eval_macro_f1")
        lines.append(
            f"| {h['epoch']} | {h['selected']} | {h['cumulative_used']} | {h['loss']:.4f} |"
            f" {'' if f1 is None else f'{f1:.3f}'} | {h['score_select_seconds']:.1f} | {h['train_seconds']:.1f} |"
        )
    stages = metrics.get("stage_seconds", {})
    if stages:
        lines += ["", "## Where the time went", "", "| stage | seconds | share |", "|---|---|---|"]
        lines += [
            f"| {name} | {seconds:.1f} | {seconds / max(metrics['seconds'], 1e-9):.0%} |"
            for name, seconds in stages.items()
        ]
        lines.append(f"| **the whole run** | {metrics['seconds']:.1f} | 100% |")
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pictures]
    lines += ["", "The exported student is in `student/` (`llkd serve " + str(run_dir) + "`)."]
    logs = sorted(path.name for path in run_dir.glob("*.log"))
    if logs:
        links = ", ".join(f"[`{name}`]({name})" for name in logs)
        lines.append(f"Everything Ray, vLLM and DeepSpeed printed is in {links}.")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def buys_line(buys: dict) -> str:
    parts = [f"student {buys['student_megabytes']:.0f} MB"]
    if buys["teacher_megabytes"]:
        parts[0] += (
            f" ({buys['teacher_megabytes'] / max(buys['student_megabytes'], 1e-9):.0f}x smaller than the teacher)"
        )
    speed = f"{buys['student_texts_per_second']:.0f} texts/s"
    if buys["teacher_texts_per_second"]:
        ratio = buys["student_texts_per_second"] / buys["teacher_texts_per_second"]
        speed += f" against the teacher's {buys['teacher_texts_per_second']:.1f} ({ratio:.0f}x)"
    parts.append(speed + " on this machine")
    if buys["labeling_seconds"]:
        parts.append(f"labeling cost {buys['labeling_seconds'] / 60:.1f} min of teacher time")
    return "what the student buys: " + "; ".join(parts)


def budget_lines(budget: dict, buys: dict) -> list[str]:
    """The budget's rounds and its cost model: teacher calls made and saved, in teacher time at this run's rate."""
    saved = budget["rows_not_labeled"]
    lines = [
        f"- bought {budget['acquired_rows']} of {budget['candidate_rows']} candidate rows"
        f" ({budget['acquired_rows'] / max(budget['candidate_rows'], 1):.1%}; probe {budget['probe_rows']}) in"
        f" {budget['rounds_run']} round(s)"
        + (", stopped early by the probe-agreement rule" if budget["stopped_early"] else ""),
        f"- teacher calls this run: {budget['teacher_calls']} (the {budget['holdout_rows']} holdout rows included;"
        " rows already in the store cost none); rows the teacher never had to label: " + f"{saved}",
    ]
    rate = buys.get("teacher_texts_per_second")
    if rate:
        lines.append(
            f"- at this run's teacher rate ({rate:.1f} rows/s) the rows not labeled are"
            f" {saved / rate / 3600:.2f} machine-hours saved (the README's GPU arithmetic turns rows into GPU-hours)"
        )
    lines += ["", "| round | rows bought | trained on | teacher calls | probe agreement | holdout macro-F1 |"]
    lines.append("|---|---|---|---|---|---|")
    for r in budget["rounds"]:
        agreement, f1 = r.get("probe_agreement"), r.get("holdout_macro_f1")
        lines.append(
            f"| {r['round']} | {r['acquired_rows']} | {r['trained_rows']} | {r.get('teacher_calls', '')} |"
            f" {'' if agreement is None else f'{agreement:.3f}'} | {'' if f1 is None else f'{f1:.3f}'} |"
        )
    return lines

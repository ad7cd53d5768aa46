"""Two teacher settings side by side on every benchmark dataset: labeling speed through vLLM, the prompt tokens
vLLM computed per text (its own prefix-cache counters), and the teacher's dev macro-F1.

For settings that change the label probabilities beyond the backends' 2e-3 agreement tolerance, where what matters
is whether the teacher stays as good: ``teacher.dtype=bfloat16`` (several times faster matrix products on a CPU
with native bf16, AVX512-BF16 or AMX), ``teacher.align_prefix=false`` (the prompt prefix not padded to whole KV-
cache blocks, as before padding was the default). Each dataset's whole corpus is relabeled with each setting (the
calibration prior is the corpus's), one vLLM engine per setting in a subprocess of its own; dev macro-F1 is on the
gold-labelled dev rows ``distill_quality.py`` splits off (its label store must hold the dataset: run that benchmark
first, or name a store that does with ``--store``). Test rows are not read.

    python benchmarks/teacher_settings.py --b teacher.dtype=bfloat16      # A: the defaults (fp32 on CPU)
    python benchmarks/teacher_settings.py --a teacher.align_prefix=false --b teacher.align_prefix=true --datasets trec
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import distill_quality as bench
import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
SETTINGS = ("A", "B")


def relabel(name: str, overrides: list[str], work: Path, texts_file: Path, out: Path) -> None:
    """In a subprocess: the corpus scored by a vLLM teacher with ``overrides``; raw probabilities, seconds and the
    prompt tokens vLLM computed per text."""
    from llkd_ray.model_sources import resolve_model
    from llkd_ray.teacher import Teacher
    from llkd_ray.teacher_backends import prefix_cache_counters

    texts = json.loads(texts_file.read_text())
    stats = "teacher.vllm.engine_kwargs={disable_log_stats: false}"  # vLLM counts prefix-cache hits with stats on
    cfg = bench.dataset_config(name, work, [*overrides, "teacher.backend=vllm", stats])
    teacher = Teacher(cfg.task, cfg.teacher, resolve_model(cfg.teacher.model))
    batch = cfg.teacher.batch_size
    teacher.score(texts[:64])  # warm-up (the timed texts then find only the shared prompt prefix cached)
    queries, hits = prefix_cache_counters(teacher.backend.llm)
    started = time.perf_counter()
    raw = np.concatenate([teacher.score(texts[start : start + batch])[0] for start in range(0, len(texts), batch)])
    seconds = time.perf_counter() - started
    queries_after, hits_after = prefix_cache_counters(teacher.backend.llm)
    np.save(out, raw)
    computed = ((queries_after - queries) - (hits_after - hits)) / len(texts)
    print("RESULT " + json.dumps({"seconds": seconds, "computed_tokens": computed}), flush=True)


def compare(name: str, labels, dev, names: list[str], settings: dict, work: Path, scratch: Path) -> dict:
    from llkd_ray.label_scoring import calibrate, label_prior
    from llkd_ray.metrics import classification_report

    position = {row_id: i for i, row_id in enumerate(labels["id"].to_pylist())}
    rows = [position[row_id] for row_id in dev["id"].to_pylist()]
    gold = np.asarray(dev["gold_index"].to_pylist())
    texts_file = scratch / f"{name}.json"
    texts_file.write_text(json.dumps(labels["text"].to_pylist()))
    result = {"dataset": name, "rows": labels.num_rows, "dev_rows": len(rows)}
    probs = {}
    for key, overrides in settings.items():
        out = scratch / f"{name}-{key}.npy"
        command = [sys.executable, __file__, "--relabel", name, "--work", str(work)]
        # The subprocess takes its setting's overrides through --b (which needs one: "-" stands for none).
        command += ["--texts", str(texts_file), "--out", str(out), "--b", *(overrides or ["-"])]
        finished = subprocess.run(command, capture_output=True, text=True, check=False)
        found = [line for line in finished.stdout.splitlines() if line.startswith("RESULT ")]
        if not found:
            sys.exit(f"{name} with {overrides or 'the defaults'} failed:\n{finished.stderr[-4000:]}")
        measured = json.loads(found[-1].removeprefix("RESULT "))
        raw = np.load(out)
        probs[key] = calibrate(raw, label_prior(raw))  # the store's default calibration (uniform class prior)
        result[f"{key}_prompts_s"] = labels.num_rows / measured["seconds"]
        result[f"{key}_computed_tokens"] = measured["computed_tokens"]
        result[f"{key}_dev_macro_f1"] = classification_report(gold, probs[key][rows].argmax(1), names)["macro_f1"]
    result["max_probability_change"] = float(np.abs(probs["B"] - probs["A"]).max())
    result["labels_changed"] = float((probs["B"].argmax(1) != probs["A"].argmax(1)).mean())
    return result


def cpu_bf16_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    found = sorted({flag for flag in flags.split() if "bf16" in flag})
    return ", ".join(found) or "none"


def main() -> None:
    available = sorted(p.stem for p in bench.DATASETS.glob("*.yaml"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", nargs="*", default=[], help="setting A: config overrides (none: the defaults)")
    parser.add_argument("--b", nargs="+", required=True, help="setting B: config overrides")
    parser.add_argument("--datasets", nargs="+", default=available, choices=available)
    parser.add_argument("--work", default="runs/bench_distill", help="where distill_quality.py keeps its stores")
    parser.add_argument(
        "--store",
        nargs="*",
        default=[],
        help="overrides naming the store that holds the datasets' rows (e.g. teacher.align_prefix=false for stores"
        " labeled before the padding was the default); the rows and the dev split are the same in every store",
    )
    parser.add_argument("--log", default="runs/teacher_settings.log", help="Ray's output while the corpora are read")
    parser.add_argument("--relabel", help=argparse.SUPPRESS)
    parser.add_argument("--texts", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work).resolve()
    if args.relabel:
        relabel(args.relabel, [o for o in args.b if o != "-"], work, Path(args.texts), Path(args.out))
        return

    import ray

    from llkd_ray.console import console

    settings = {"A": args.a, "B": args.b}
    print(f"{os.cpu_count()} CPU cores; the CPU's bf16 flags: {cpu_bf16_flags()}")
    for key, overrides in settings.items():
        print(f"setting {key}: {' '.join(overrides) or 'the defaults'}")
    with console(Path(args.log).resolve()):  # Ray Data's output (reading the corpora) goes to the log file
        configs = {name: bench.dataset_config(name, work, args.store) for name in args.datasets}
        stored = {name: bench.stored_splits(cfg) for name, cfg in configs.items()}
        ray.shutdown()  # reading the corpora started Ray; the engines get the cores to themselves
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, (labels, _, dev, _) in stored.items():
            print(f"[bench] {name}: relabeling with A and with B ...", flush=True)
            names = configs[name].task.label_names
            results.append(compare(name, labels, dev, names, settings, work, Path(scratch)))
    print(
        f"\n{'dataset':<16} {'rows':>5} {'A /s':>6} {'B /s':>6} {'B/A':>6} {'A tok':>6} {'B tok':>6}"
        f" {'dev F1 A':>8} {'B':>6} {'max |dp|':>8} {'labels changed':>14}"
    )
    for r in results:
        print(
            f"{r['dataset']:<16} {r['rows']:>5} {r['A_prompts_s']:>6.1f} {r['B_prompts_s']:>6.1f}"
            f" {r['B_prompts_s'] / r['A_prompts_s']:>5.2f}x {r['A_computed_tokens']:>6.1f}"
            f" {r['B_computed_tokens']:>6.1f} {r['A_dev_macro_f1']:>8.3f} {r['B_dev_macro_f1']:>6.3f}"
            f" {r['max_probability_change']:>8.3f} {r['labels_changed']:>14.1%}"
        )
    print(
        "(A /s, B /s: texts labeled a second; A tok, B tok: prompt tokens vLLM computed per text, prefix cache hits"
        " excluded)"
    )
    speed = np.mean([r["B_prompts_s"] / r["A_prompts_s"] for r in results])
    change = np.mean([r["B_dev_macro_f1"] - r["A_dev_macro_f1"] for r in results])
    print(f"\nB / A labeling speed, mean over datasets: {speed:.2f}x")
    print(f"dev macro-F1, B - A, mean over datasets: {100 * change:+.1f} points (dev rows: ~300 a dataset)")


if __name__ == "__main__":
    main()

"""The teacher in float32 against bfloat16 on this CPU: labeling speed through vLLM and the teacher's dev macro-F1,
on every benchmark dataset, side by side in one run.

On a CPU with native bf16 (AVX512-BF16 or AMX) bf16 matrices multiply several times faster than fp32, and
``teacher.dtype=bfloat16`` labels faster; the label probabilities move (far more than the backends' 2e-3
agreement tolerance), so what matters is whether the teacher stays as good. Each dataset's whole corpus is
relabeled in each dtype (the calibration prior is the corpus's), one vLLM engine per dtype in a subprocess of its
own; dev macro-F1 is on the gold-labelled dev rows ``distill_quality.py`` splits off (its label store must hold
the dataset: run that benchmark first). Test rows are not read.

    python benchmarks/teacher_dtype.py                              # every dataset labelled by distill_quality
    python benchmarks/teacher_dtype.py --datasets rotten_tomatoes trec
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
DTYPES = ("float32", "bfloat16")


def relabel(name: str, dtype: str, work: Path, texts_file: Path, out: Path) -> None:
    """In a subprocess: the corpus scored by a vLLM teacher in ``dtype``; raw probabilities and seconds."""
    from llkd_ray.model_sources import resolve_model
    from llkd_ray.teacher import Teacher

    texts = json.loads(texts_file.read_text())
    cfg = bench.dataset_config(name, work, [f"teacher.dtype={dtype}", "teacher.backend=vllm"])
    teacher = Teacher(cfg.task, cfg.teacher, resolve_model(cfg.teacher.model))
    batch = cfg.teacher.batch_size
    teacher.score(texts[:64])  # warm-up (the timed texts then find only the shared prompt prefix cached)
    started = time.perf_counter()
    raw = np.concatenate([teacher.score(texts[start : start + batch])[0] for start in range(0, len(texts), batch)])
    np.save(out, raw)
    print("SECONDS " + json.dumps(time.perf_counter() - started), flush=True)


def compare(name: str, labels, dev, names: list[str], work: Path, scratch: Path) -> dict:
    from llkd_ray.label_scoring import calibrate, label_prior
    from llkd_ray.metrics import classification_report

    position = {row_id: i for i, row_id in enumerate(labels["id"].to_pylist())}
    rows = [position[row_id] for row_id in dev["id"].to_pylist()]
    gold = np.asarray(dev["gold_index"].to_pylist())
    texts_file = scratch / f"{name}.json"
    texts_file.write_text(json.dumps(labels["text"].to_pylist()))
    result = {"dataset": name, "rows": labels.num_rows, "dev_rows": len(rows)}
    probs = {}
    for dtype in DTYPES:
        out = scratch / f"{name}-{dtype}.npy"
        command = [sys.executable, __file__, "--relabel", name, dtype, "--work", str(work)]
        command += ["--texts", str(texts_file), "--out", str(out)]
        finished = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds = [line for line in finished.stdout.splitlines() if line.startswith("SECONDS ")]
        if not seconds:
            sys.exit(f"{name} in {dtype} failed:\n{finished.stderr[-4000:]}")
        raw = np.load(out)
        probs[dtype] = calibrate(raw, label_prior(raw))  # the store's default calibration (uniform class prior)
        result[f"{dtype}_prompts_s"] = labels.num_rows / json.loads(seconds[-1].removeprefix("SECONDS "))
        result[f"{dtype}_dev_macro_f1"] = classification_report(gold, probs[dtype][rows].argmax(1), names)["macro_f1"]
    result["max_probability_change"] = float(np.abs(probs["bfloat16"] - probs["float32"]).max())
    result["labels_changed"] = float((probs["bfloat16"].argmax(1) != probs["float32"].argmax(1)).mean())
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
    parser.add_argument("--datasets", nargs="+", default=available, choices=available)
    parser.add_argument("--work", default="runs/bench_distill", help="where distill_quality.py keeps its stores")
    parser.add_argument("--log", default="runs/teacher_dtype.log", help="Ray's output while the corpora are read")
    parser.add_argument("--relabel", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--texts", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work).resolve()
    if args.relabel:
        relabel(*args.relabel, work, Path(args.texts), Path(args.out))
        return

    import ray

    from llkd_ray.console import console

    print(f"{os.cpu_count()} CPU cores; the CPU's bf16 flags: {cpu_bf16_flags()}")
    with console(Path(args.log).resolve()):  # Ray Data's output (reading the corpora) goes to the log file
        configs = {name: bench.dataset_config(name, work) for name in args.datasets}
        stored = {name: bench.stored_splits(cfg) for name, cfg in configs.items()}
        ray.shutdown()  # reading the corpora started Ray; the engines get the cores to themselves
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, (labels, _, dev, _) in stored.items():
            print(f"[bench] {name}: relabeling in {' and '.join(DTYPES)} ...", flush=True)
            names = configs[name].task.label_names
            results.append(compare(name, labels, dev, names, work, Path(scratch)))
    print(
        f"\n{'dataset':<16} {'rows':>5} {'fp32 /s':>8} {'bf16 /s':>8} {'speed':>6}"
        f" {'dev F1 fp32':>11} {'bf16':>6} {'max |dp|':>8} {'labels changed':>14}"
    )
    for r in results:
        print(
            f"{r['dataset']:<16} {r['rows']:>5} {r['float32_prompts_s']:>8.1f} {r['bfloat16_prompts_s']:>8.1f}"
            f" {r['bfloat16_prompts_s'] / r['float32_prompts_s']:>5.2f}x {r['float32_dev_macro_f1']:>11.3f}"
            f" {r['bfloat16_dev_macro_f1']:>6.3f} {r['max_probability_change']:>8.3f} {r['labels_changed']:>14.1%}"
        )
    speed = np.mean([r["bfloat16_prompts_s"] / r["float32_prompts_s"] for r in results])
    change = np.mean([r["bfloat16_dev_macro_f1"] - r["float32_dev_macro_f1"] for r in results])
    print(f"\nbf16 / fp32 labeling speed, mean over datasets: {speed:.2f}x")
    print(f"dev macro-F1, bf16 - fp32, mean over datasets: {100 * change:+.1f} points (dev rows: ~300 a dataset)")


if __name__ == "__main__":
    main()

"""The teacher on each benchmark dataset's dev rows: macro-F1 raw, calibrated with a uniform class prior (the
default) and with the EM-estimated prior (``teacher.class_prior=estimated``), how correct its most confident
labels are (what LLKD's teacher gate relies on), and the class shares it predicts against gold, overall and in
each predicted class's more confident half (what LLKD's per-class teacher bars keep). Reads the labels
``distill_quality.py`` stored and labels nothing (the corpus ids are read through Ray Data, which starts a local
Ray).

    python benchmarks/teacher_calibration.py                       # every dataset already labelled
    python benchmarks/teacher_calibration.py --datasets ag_news trec
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import distill_quality as bench
import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def dev_report(name: str, work: Path) -> str:
    from llkd_ray.label_scoring import calibrate, em_class_prior, label_prior
    from llkd_ray.metrics import classification_report

    cfg = bench.dataset_config(name, work)
    labels, _, dev, _ = bench.stored_splits(cfg)
    # Priors over the whole corpus, as the store computes them; scores on the dev rows only.
    raw = np.asarray(labels["probs_raw"].to_pylist())
    uniform = calibrate(raw, label_prior(raw))
    estimated, prior = em_class_prior(uniform)
    position = {row_id: i for i, row_id in enumerate(labels["id"].to_pylist())}
    rows = [position[row_id] for row_id in dev["id"].to_pylist()]
    gold = np.asarray(dev["gold_index"].to_pylist())
    names = cfg.task.label_names
    f1 = {
        tag: classification_report(gold, probs[rows].argmax(1), names)["macro_f1"]
        for tag, probs in (("raw", raw), ("uniform", uniform), ("estimated", estimated))
    }
    confidence, predicted = uniform[rows].max(1), uniform[rows].argmax(1)
    correct = predicted == gold
    top = [correct[confidence >= np.quantile(confidence, 1 - share)].mean() for share in (0.3, 0.5)]
    # What LLKD's per-class teacher bars see: rows at or above their predicted class's median confidence.
    medians = {c: np.median(confidence[predicted == c]) for c in np.unique(predicted)}
    per_class_half = confidence >= np.array([medians[c] for c in predicted])
    shares = {
        "predicted": np.bincount(predicted, minlength=len(names)) / len(rows),
        "gold": np.bincount(gold, minlength=len(names)) / len(rows),
        "gold in the per-class half": np.bincount(gold[per_class_half], minlength=len(names)) / per_class_half.sum(),
    }
    return (
        f"{name:16s} {len(rows):4d} {f1['raw']:8.3f} {f1['uniform']:8.3f} {f1['estimated']:10.3f}"
        f" {top[0]:9.3f} {top[1]:9.3f} {correct.mean():9.3f}   estimated prior {np.round(prior, 2).tolist()}\n"
        f"{'':16s} class shares ({', '.join(names)}): "
        + "; ".join(f"{tag} {np.round(v, 2).tolist()}" for tag, v in shares.items())
        + f"; ok in the per-class half {correct[per_class_half].mean():.3f}"
    )


def main() -> None:
    available = sorted(p.stem for p in bench.DATASETS.glob("*.yaml"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=available, choices=available)
    parser.add_argument("--work", default="runs/bench_distill", help="where distill_quality.py keeps its stores")
    args = parser.parse_args()
    print("dataset           dev   raw F1  uniform  estimated  top30% ok  top50% ok  all ok")
    for name in args.datasets:
        try:
            print(dev_report(name, Path(args.work).resolve()))
        except FileNotFoundError as error:
            print(f"{name:16s} not labelled yet ({error})")


if __name__ == "__main__":
    main()

"""Score the still-unlabeled corpus with the student on Ray Data: a pool of student actors (CPU nodes, or a
fraction of a GPU each), so the budget rounds scale with the corpus like the teacher does.

Each row gets the student's normalised entropy (``uncertainty``), its predicted class and a k-means cluster of its
embedding (the mean-pooled last hidden state, L2-normalised). The centroids are fitted on the driver from at most
``labeling.cluster_sample`` embedded rows; on a bigger corpus the actors assign every row to its nearest centroid,
so only four small columns per row come back to the driver.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llkd_ray.acquisition import kmeans, nearest_centroid, normalized_entropy
from llkd_ray.config import Config
from llkd_ray.corpus import key_set, rows_by_key
from llkd_ray.ray_session import model_actor_pool, threads_per_copy

logger = logging.getLogger(__name__)
SCORE_COLUMNS = ["key", "id", "uncertainty", "predicted", "cluster"]


class StudentScorer:
    """Ray Data ``map_batches`` actor: (uncertainty, predicted class, and embedding or cluster) per row."""

    def __init__(self, config: Config, model: str, centroids: np.ndarray | None = None):
        scorer = config.labeling.scorer
        threads = threads_per_copy(scorer.torch_threads, scorer.num_actors, scorer.num_cpus)
        import torch

        from llkd_ray.student import load_student

        torch.set_num_threads(threads)
        # An exported student directory, or (round 0) the base encoder with a fresh head: only its embeddings count.
        self.network, self.tokenizer = load_student(
            model, config.task.label_names, seed=config.labeling.seed, pooling=config.student.pooling
        )
        self.device = "cuda" if config.labeling.scorer.num_gpus > 0 else "cpu"
        self.network.to(self.device).eval()
        self.max_length = config.student.max_length
        self.centroids = centroids

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from llkd_ray.pooled_classifier import masked_mean

        texts = batch["text"].to_pylist()
        order = np.argsort([len(text) for text in texts], kind="stable")  # each forward pads to its own longest
        probs = np.zeros((len(texts), self.network.config.num_labels))
        embeddings = np.zeros((len(texts), self.network.config.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), 32):
                index = order[start : start + 32]
                encoded = self.tokenizer(
                    [texts[i] for i in index],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                output = self.network(**encoded, output_hidden_states=True)
                probs[index] = torch.softmax(output.logits.float(), dim=-1).cpu().numpy()
                pooled = masked_mean(output.hidden_states[-1].float(), encoded["attention_mask"])
                embeddings[index] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        columns = {
            "key": batch["key"],
            "id": batch["id"],
            "uncertainty": pa.array(normalized_entropy(probs), pa.float32()),
            "predicted": pa.array(probs.argmax(axis=1), pa.int32()),
        }
        if self.centroids is None:
            columns["embedding"] = pa.array(embeddings.tolist(), pa.list_(pa.float32()))
        else:
            columns["cluster"] = pa.array(nearest_centroid(embeddings, self.centroids), pa.int32())
        return pa.table(columns)


def _unlabeled(batch: pa.Table, exclude: pa.Array) -> pa.Table:
    return rows_by_key(batch.filter(pc.is_null(batch["reject_reason"])), exclude, keep=False)


def score_unlabeled(cfg: Config, model: str, exclude_keys: set[str], round_index: int) -> pa.Table:
    """``SCORE_COLUMNS`` for every usable corpus row whose key is not in ``exclude_keys``."""
    from llkd_ray.corpus import read_corpus

    scorer = cfg.labeling.scorer
    ds = read_corpus(cfg.corpus).map_batches(
        _unlabeled, fn_kwargs={"exclude": key_set(exclude_keys)}, batch_format="pyarrow"
    )
    rows = ds.count()
    if rows == 0:
        return pa.table({name: pa.array([], type) for name, type in _SCORE_TYPES.items()})

    def through_scorers(data, centroids):
        return data.map_batches(
            StudentScorer,
            fn_constructor_kwargs={"config": cfg, "model": model, "centroids": centroids},
            batch_size=scorer.batch_size,
            batch_format="pyarrow",
            compute=model_actor_pool(scorer.num_actors),
            num_cpus=scorer.num_cpus,
            num_gpus=scorer.num_gpus or None,
        )

    rng = np.random.default_rng([cfg.labeling.seed, round_index])
    sample_fraction = min(1.0, cfg.labeling.cluster_sample / rows)
    sample = ds if sample_fraction == 1.0 else ds.random_sample(sample_fraction, seed=cfg.labeling.seed + round_index)
    what = f"round {round_index}: the student scores"
    # In key order: Ray Data does not keep row order, and k-means++ and the draws after it must not depend on it.
    embedded = _collect(through_scorers(sample, None), round(rows * sample_fraction), what).sort_by("key")
    points = np.asarray(embedded["embedding"].to_pylist(), dtype=np.float32)
    centroids = kmeans(points, cfg.labeling.clusters, rng)
    if sample_fraction == 1.0:  # the whole remainder was embedded: assign it here, without a second pass
        clusters = pa.array(nearest_centroid(points, centroids), pa.int32())
        scored = embedded.drop_columns(["embedding"]).append_column("cluster", clusters)
    else:
        scored = _collect(through_scorers(ds, centroids.astype(np.float32)), rows, what).sort_by("key")
    logger.info("round %d: the student scored %d unlabeled rows (%d clusters)", round_index, rows, len(centroids))
    return scored.select(SCORE_COLUMNS)


_SCORE_TYPES = {
    "key": pa.string(),
    "id": pa.string(),
    "uncertainty": pa.float32(),
    "predicted": pa.int32(),
    "cluster": pa.int32(),
}


def _collect(ds, total: int, what: str) -> pa.Table:
    """Every row of ``ds``, with the run's one progress bar while they come back."""
    from tqdm import tqdm

    from llkd_ray.console import progress_stream

    tables = []
    with tqdm(
        desc=f"[llkd] {what}", total=total, unit="row", dynamic_ncols=True, file=progress_stream(), mininterval=1.0
    ) as progress:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            tables.append(batch)
            progress.update(batch.num_rows)
    return pa.concat_tables(tables)

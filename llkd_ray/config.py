"""One typed configuration schema for every stage, loaded from YAML and overridable from the command line.

Validation happens here, before Ray starts: an unknown key, a wrong type or a missing local file fails with
a message that names the field (``teacher.batch_size: ...``).
"""

from __future__ import annotations

import difflib
import importlib.resources
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BUILTIN_CORPORA = ("rotten_tomatoes",)
DEFAULT_CONFIG = "default.yaml"


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


class _Section(BaseModel):
    # extra="forbid" turns a typo into an error instead of a silently ignored key; allow_inf_nan=False refuses
    # .inf and .nan in every float field (YAML reads both), which bounds such as gt=0 let through as inf.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class CorpusConfig(_Section):
    """Where the unlabeled texts come from."""

    source: str | list[str] = "builtin:rotten_tomatoes"
    format: Literal["auto", "jsonl", "csv", "tsv", "parquet", "text"] = "auto"
    text_column: str = "text"
    id_column: str | None = None  # None: a stable content hash of the text
    gold_column: str | None = None  # kept for evaluation only, never shown to the teacher
    gold_map: dict[str, str] = {}  # raw gold value → label name, for datasets that store codes ("1" → "world")
    limit: int | None = Field(default=None, gt=0)  # first N rows (builtin corpora are shuffled with `seed` first)
    seed: int = 0
    # Streaming repartition: files arrive as one block each, and a block is the unit an actor takes, so
    # without it one actor would label a whole file while the others idle.
    rows_per_block: int = Field(default=256, gt=0)

    @property
    def sources(self) -> list[str]:
        return [self.source] if isinstance(self.source, str) else list(self.source)

    @field_validator("source")
    @classmethod
    def _sources_exist(cls, value: str | list[str]) -> str | list[str]:
        for item in [value] if isinstance(value, str) else value:
            if item.startswith("builtin:"):
                name = item.removeprefix("builtin:")
                if name not in BUILTIN_CORPORA:
                    raise ValueError(f"unknown builtin corpus {name!r}; available: {', '.join(BUILTIN_CORPORA)}")
            elif "://" not in item and not Path(item).exists():
                raise ValueError(f"file or directory not found: {item}")
        return value


class LabelSpec(_Section):
    name: str = Field(min_length=1)
    description: str | None = None
    # Surface forms the teacher may answer with. None: the name in lower, Title and original case, each with and
    # without a leading space; the label's probability is the sum over all of them.
    verbalizers: list[str] | None = None


class FewShotExample(_Section):
    text: str
    label: str


class TaskConfig(_Section):
    """What the teacher is asked: an instruction, the label set and optional few-shot examples."""

    instruction: str
    labels: list[LabelSpec] = Field(min_length=2)
    examples: list[FewShotExample] = []
    prompt_style: Literal["plain", "chat"] = "plain"  # chat: use the tokenizer's chat template
    text_prefix: str = "Text: "
    answer_prefix: str = "Label:"

    @property
    def label_names(self) -> list[str]:
        return [label.name for label in self.labels]

    @model_validator(mode="after")
    def _labels_are_consistent(self) -> TaskConfig:
        names = self.label_names
        if len(set(names)) != len(names):
            raise ValueError(f"labels: duplicate label names in {names}")
        for i, example in enumerate(self.examples):
            if example.label not in names:
                raise ValueError(f"examples[{i}].label: {example.label!r} is not one of the labels {names}")
        return self


class VLLMOptions(_Section):
    enable_prefix_caching: bool = True
    # vLLM's CPU default block is 128 tokens, so a ~60-token shared few-shot prefix is never cached; None: 32 on CPU.
    block_size: int | None = Field(default=None, gt=0)
    # Prompt tokens vLLM computes per engine step (chunked prefill). None: 1024 on CPU, where it measured faster
    # than vLLM's 4096; vLLM's own default on GPUs.
    max_num_batched_tokens: int | None = Field(default=None, gt=0)
    tensor_parallel_size: int = Field(default=1, ge=1)
    max_model_len: int = Field(default=1024, gt=0)
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)
    # None: eager on CPU (torch.compile costs ~80 s of start-up for ~5% throughput), CUDA graphs on GPU.
    enforce_eager: bool | None = None
    cpu_kvcache_space_gib: int = Field(default=1, ge=1)  # VLLM_CPU_KVCACHE_SPACE
    engine_kwargs: dict[str, Any] = {}  # passed straight to vllm.LLM, over the options above

    @property
    def requested_block_size(self) -> int | None:
        """The KV block asked for, by ``block_size`` or by ``engine_kwargs`` (which wins, as in the engine)."""
        return self.engine_kwargs.get("block_size", self.block_size)

    @model_validator(mode="after")
    def _block_size_is_usable(self) -> VLLMOptions:
        # The prompt's padding is aligned to this block too: a bad one would pad wrongly before vLLM refused it.
        block = self.engine_kwargs.get("block_size")
        if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block <= 0):
            raise ValueError(f"teacher.vllm.engine_kwargs.block_size must be a positive integer, not {block!r}")
        # A block longer than any prompt caches nothing, and the padding would insert up to a block of newlines.
        requested = self.requested_block_size or 0
        if requested > self.max_model_len:
            raise ValueError(
                f"teacher.vllm block size {requested} is longer than max_model_len={self.max_model_len}: no prompt"
                " would fill a block"
            )
        return self


class TeacherConfig(_Section):
    """The LLM that pseudo-labels the corpus, and how its actors are placed on the cluster."""

    model: str = "gemma-3-270m"
    backend: Literal["vllm", "transformers"] = "vllm"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: float32 on CPU, bfloat16 on GPU
    num_actors: int = Field(default=1, ge=1)
    max_actors: int | None = Field(default=None, ge=1)  # set to autoscale the pool from num_actors up to this
    num_cpus: float = Field(default=1.0, gt=0)  # fractional CPUs keep room for read tasks on small machines
    num_gpus: float = Field(default=0.0, ge=0)  # per engine; tensor parallelism multiplies it
    # Host memory an actor reserves in Ray's scheduler. Gemma-3-270m in fp32 with a 1 GiB KV cache measured
    # ~5.8 GiB resident; Ray Data warns every 30 s when an actor uses more than it declared.
    memory_gib: float | None = Field(default=7.0, gt=0)
    accelerator_type: str | None = None  # e.g. "L4", "H100": places actors on nodes of that type
    resources: dict[str, float] = {}  # custom Ray resources, e.g. {"teacher_node": 1}
    torch_threads: int | None = Field(default=None, gt=0)  # None: the node's cores over the actors it can hold
    batch_size: int = Field(default=256, gt=0)  # prompts per actor call: vLLM schedules a whole batch at once
    max_text_tokens: int = Field(default=256, gt=0)  # longer texts are truncated and flagged
    calibrate: bool = True  # divide by the corpus label prior, renormalise (no gold labels used)
    # After calibration every class is taken as equally common. "estimated" re-estimates the corpus's class prior
    # from the calibrated distributions by EM (Saerens et al. 2002) and puts it back in: for corpora where one
    # class dominates. Not the default: on the dev splits of all five benchmark datasets it lowered the teacher's
    # macro-F1 to its uncalibrated value (EM on the teacher's own posteriors recovers the teacher's own bias).
    class_prior: Literal["uniform", "estimated"] = "uniform"
    # vLLM backend: multi-token label variants too unlikely to matter are not followed past their first tokens,
    # the unlikeliest first, while no label's probability can move by more than this in all
    # (teacher_backends.prefixes_worth_following). Half the backends' agreement tolerance (2e-3) by default;
    # 0 follows every variant to its end. Each variant followed costs the teacher one more request per text.
    continuation_tolerance: float = Field(default=1e-3, ge=0, lt=1)
    # Pad the prompts' shared prefix (instruction, label line, few-shot examples) to whole KV-cache blocks with
    # newline tokens after the label line (prompts.prompt_padding). vLLM caches whole blocks only: unpadded, the
    # prefix's last partial block is recomputed for every text (22 of the embedded default's 150 shared tokens).
    # Measured on the dev rows of five datasets (benchmarks/teacher_settings.py, README): 1.1-2.0x faster labeling
    # (1.49x on average), teacher dev macro-F1 +0.6 points on average (-2.2 to +4.1 per dataset). None (the
    # default): padded for plain prompts, chat prompts left as they are; true asks for it (refused for chat
    # prompts); false turns it off. None rather than true, so a resolved config written out reloads as it was.
    align_prefix: bool | None = None
    # With the prefix aligned, also line each prompt's end up with the KV blocks: 0 to block - 1 newline tokens
    # before the text's line (prompts.prompt_padding). For labels of several tokens: each text's follow-up requests
    # (prompt + a label's first tokens) then find all but the prompt's last token cached and compute that and their
    # own, where otherwise each recomputes the prompt's last partial block. It costs every text half a block of
    # newlines on average, so it pays where texts average more than one follow-up: 1.86x faster labeling on a
    # newswire task with 6.5 a text, 0.55-0.61x on TREC and SMS spam, which rarely need one; the teacher's dev
    # macro-F1 moved +1.7 and 0.0 there (benchmarks/multi_token_labels.py, teacher_settings.py; README). Off by
    # default for that reason. Another prompt: in the store's fingerprint.
    align_prompt_end: bool = False
    vllm: VLLMOptions = VLLMOptions()

    @model_validator(mode="after")
    def _pool_bounds(self) -> TeacherConfig:
        if self.max_actors is not None and self.max_actors < self.num_actors:
            raise ValueError(f"max_actors ({self.max_actors}) is below num_actors ({self.num_actors})")
        return self


class StoreConfig(_Section):
    """The pseudo-label store: a Parquet dataset on any pyarrow filesystem."""

    path: str = "runs/pseudo_labels"
    rows_per_part: int = Field(default=256, gt=0)  # rows per committed Parquet part: the unit lost on a crash


class ScorerConfig(_Section):
    """The Ray Data pool of student actors that scores the unlabeled corpus between budget rounds."""

    num_actors: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)  # a fraction shares a GPU: encoder forwards are cheap
    batch_size: int = Field(default=64, gt=0)
    torch_threads: int | None = Field(default=None, gt=0)  # None: the node's cores over the actors it can hold


class LabelingConfig(_Section):
    """A teacher-call budget spent in rounds the student chooses (llkd_ray/budget.py). No budget: label it all."""

    # A fraction of the corpus (0 < budget <= 1, written with a decimal point) or a number of rows (an integer
    # >= 2). Rows held out for evaluation are labeled too and counted apart: they are not in the budget.
    budget: float | int | None = None
    rounds: int = Field(default=3, ge=1)  # round 0 is the diverse seed; each later one follows the student
    # student: uncertain and diverse rows, balanced over the student's predicted classes; random: the baseline.
    acquisition: Literal["student", "random"] = "student"
    # k-means clusters of the student's embeddings: the seed is stratified over them, later rounds spread over them.
    clusters: int = Field(default=16, ge=1)
    # Share of each later round drawn uniformly at random from the rows the student did not choose (``student``
    # acquisition only). Uncertainty alone buys the rows where a noisy teacher is wrong most often.
    random_share: float = Field(default=0.0, ge=0, le=1)
    # Share of the budget labeled in round 0 as a probe: rows drawn at random and never trained on, on which the
    # student's agreement with the teacher is measured after every round (the stopping rule's signal).
    probe_fraction: float = Field(default=0.1, ge=0, lt=1)
    # Stop spending when a round raised the student's agreement on the probe by less than this. None: spend it all.
    stop_margin: float | None = Field(default=0.005, ge=0)
    # Rows embedded to fit the clusters; more are assigned to the nearest centroid by the scoring actors.
    cluster_sample: int = Field(default=4096, gt=0)
    seed: int = 0
    scorer: ScorerConfig = ScorerConfig()

    @field_validator("budget", mode="before")
    @classmethod
    def _budget_is_a_number(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML's `yes`/`true` would otherwise read as 1
            raise ValueError("expected a fraction of the corpus (0.3) or a number of rows (600)")
        return value

    @field_validator("budget")
    @classmethod
    def _budget_is_a_fraction_or_a_count(cls, value: float | int | None) -> float | int | None:
        if value is None:
            return value
        if isinstance(value, int):
            if value == 1:
                raise ValueError("1 is ambiguous: write 1.0 for the whole corpus, or a row count >= 2")
            if value < 1:
                raise ValueError(f"a row count must be >= 2 (got {value})")
            return value
        if not 0 < value <= 1:
            raise ValueError(f"a fraction must be in (0, 1] (got {value}); a row count is an integer")
        return value


class StudentConfig(_Section):
    """The small classifier that learns from the teacher."""

    model: str = "minilm-l6"  # built-in name, local HF directory or hub id of an encoder
    max_length: int = Field(default=128, gt=0)
    # What the classification head reads: "model", the architecture's own head (BERT's: the [CLS] state through
    # its pooler); "mean", the mean of the last hidden states over the text's tokens, the pooling that
    # sentence-embedding checkpoints (all-MiniLM-L6-v2) were trained with (llkd_ray/pooled_classifier.py);
    # "auto", the pooling a sentence-transformers checkpoint says it was trained with, else "model". Chosen on
    # dev (README, "The student's head"): mean pooling was +2.1 points of dev macro-F1 over three datasets.
    pooling: Literal["auto", "model", "mean"] = "auto"


class SelectionConfig(_Section):
    """Which pseudo-labeled samples the student trains on each epoch (formulas in llkd_ray/selection.py)."""

    # The registry of selectors is llkd_ray.selection.SELECTORS (a test keeps this list equal to it).
    strategy: Literal[
        "llkd", "llkd_soft", "all", "random", "teacher_confidence", "student_uncertainty", "fixed_ratio"
    ] = "llkd"
    momentum: float = Field(default=0.5, ge=0, lt=1)  # λ of the threshold moving averages, per epoch
    warmup_epochs: int = Field(default=1, ge=0)  # epochs that use the teacher criterion only
    # The global statistic behind τ^T / τ^S: None is the mean (FreeMatch); a quantile in (0, 1) is a stricter or
    # looser gate. One source for every config: a cluster recipe inherits them unless it says otherwise.
    # Chosen on the benchmark's dev splits (benchmarks/distill_quality.py; README): 0.5, the more confident half
    # of the teacher's labels on two classes, more with many classes, whose per-class bars are lower for the
    # classes the teacher assigns less (0.7 was 1.4 points lower on Rotten Tomatoes' dev over 3 seeds, inside
    # their noise; the student was short of data, not of clean labels). τ^S: the student's median entropy, since
    # above-the-mean kept only a few dozen samples some epochs (the entropy of a trained student is very skewed).
    teacher_quantile: float | None = Field(default=0.5, gt=0, lt=1)
    student_quantile: float | None = Field(default=0.5, gt=0, lt=1)
    # Each class keeps its share of the loss among the teacher-confident samples (see selection.py).
    balance_classes: bool = True
    # No epoch trains on a handful of samples: LLKD's selection is topped up to this fraction of the pool from the
    # teacher-confident samples, by c·u (with the fixed step budget a tiny selection would be repeated many times).
    min_fraction: float = Field(default=0.1, ge=0, le=1)
    fraction: float = Field(default=0.3, gt=0, le=1)  # fixed_ratio: fraction of each class kept
    teacher_confidence_threshold: float | None = Field(default=None, ge=0, le=1)  # teacher_confidence baseline
    seed: int = 0


class TrainingConfig(_Section):
    """Ray Train: the student's distributed training loop."""

    strategy: Literal["deepspeed", "ddp"] = "deepspeed"
    zero_stage: int = Field(default=2, ge=0, le=3)  # DeepSpeed ZeRO stage
    num_workers: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)  # > 0 trains on GPUs (bf16 with DeepSpeed)
    accelerator_type: str | None = None
    resources_per_worker: dict[str, float] = {}
    # CPU threads per worker; None: the node's cores shared among the workers on it (Ray would export
    # OMP_NUM_THREADS=cpus_per_worker, i.e. one thread for a fractional CPU).
    torch_threads: int | None = Field(default=None, gt=0)
    epochs: int = Field(default=6, ge=1)
    batch_size: int = Field(default=32, gt=0)  # per worker
    # Texts per forward when the student scores the pool and the holdout each epoch (sorted by length first). On 2
    # CPU cores MiniLM scored 231 rows/s 32 at a time against 191 at 128 (benchmarks/student_step.py); a GPU wants
    # more (cluster/configs).
    score_batch_size: int = Field(default=32, gt=0)
    # One recipe for every selector: each epoch takes the same number of optimizer steps, drawn from the epoch's
    # selection (cycled when it is small), so selectors differ only in which samples they train on. None: enough
    # steps for epoch_fraction of the pool, ceil(epoch_fraction · pool / (batch_size · num_workers)), and at least
    # min_steps_per_epoch: with 16 steps an epoch on a 2,000-row pool the student had not learned the task after
    # three epochs (holdout macro-F1 .41-.54, loss still .68).
    steps_per_epoch: int | None = Field(default=None, gt=0)
    epoch_fraction: float = Field(default=0.25, gt=0)
    min_steps_per_epoch: int = Field(default=32, gt=0)
    learning_rate: float = Field(default=5e-5, gt=0)  # the peak of the schedule
    # The classification head's learning rate as a multiple of learning_rate, on the same schedule. The head starts
    # from random weights and the encoder from pretrained ones, and fine-tuning bends the encoder's features to fit
    # a random head (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features"); SetFit trains its head at
    # ~1e-2. Measured on Rotten Tomatoes' dev (README, round 12, one seed): at 100 the student reached its plateau
    # in the first epoch and ended where 1 ends, so 1 stays the default; shorter runs were not measured.
    head_lr_scale: float = Field(default=1.0, gt=0)
    # Warm-up over warmup_ratio of the run's steps, then decay to 0 at the last step (or stay: constant).
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    weight_decay: float = Field(default=0.01, ge=0)
    # Loss: (1 - a)·CE(student, teacher label) + a·T²·KL(teacher^(1/T) ‖ student/T), a = soft_label_weight,
    # T = distill_temperature, each sample weighted by its selection weight. 0 is the hard-label loss alone.
    # 0.5 was chosen on dev (README): +1.3 macro-F1 points for `all`, +0.2 for `llkd`, over the hard-label loss
    # (3 seeds on Rotten Tomatoes: inside the noise).
    soft_label_weight: float = Field(default=0.5, ge=0, le=1)
    distill_temperature: float = Field(default=2.0, gt=0)
    # Evaluate and export an exponential moving average of the weights (llkd_ray/weight_average.py), decay per
    # optimizer step; None: the live weights. 0.99 measured on dev (README): +0.1 points on Rotten Tomatoes, -1.5
    # on AG News over 3 seeds, so it stays off.
    ema_decay: float | None = Field(default=None, gt=0, lt=1)
    seed: int = 0
    storage_path: str = "runs/ray_results"  # Ray Train storage: local path or s3://, gs://, a shared mount
    max_failures: int = Field(default=1, ge=0)  # worker-group restarts from the latest checkpoint
    # Epoch checkpoints kept in storage_path (the newest ones; each holds the optimizer state). None: all.
    checkpoints_to_keep: int | None = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _weight_average_needs_whole_weights(self) -> TrainingConfig:
        if self.ema_decay is not None and self.strategy == "deepspeed" and self.zero_stage == 3:
            raise ValueError(
                "ema_decay: the weight average needs every worker to hold the whole weights, which ZeRO-3 does"
                " not; use zero_stage 0-2 or strategy ddp"
            )
        return self


class EvaluationConfig(_Section):
    # Rows of the pseudo-labeled store, chosen by id hash, held out from training and scored against gold
    # labels (only rows that have one). 0: evaluate nothing.
    holdout: int = Field(default=500, ge=0)


class OutputConfig(_Section):
    name: str = "llkd-default"  # the run directory is <dir>/<name>; re-running the same name resumes
    dir: str = "runs"


class ServeConfig(_Section):
    """Ray Serve options for the student endpoint (also settable in cluster/serve_config.yaml)."""

    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = Field(default=8000, ge=0, le=65535)
    batching: bool = True  # batch texts across concurrent callers with @serve.batch
    max_batch_size: int = Field(default=64, gt=0)
    # Texts per forward: a request's (or a Serve batch's) texts are sorted by length and run this many at a time,
    # each forward padded to its own longest text (on 2 cores 8 beat 4, 16 and one padded batch of 32).
    forward_batch_size: int = Field(default=8, gt=0)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=16, gt=0)
    # Serve's own defaults: scale up after 30 s over target, down after 10 min under it, averaging over 30 s.
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)
    look_back_period_s: float = Field(default=30.0, gt=0)
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    max_texts: int = Field(default=256, gt=0)  # per request; more is a 413
    max_text_chars: int = Field(default=20000, gt=0)
    # A body over this is refused with 413 before it is read whole (the default holds max_texts texts of
    # max_text_chars characters, JSON-escaped).
    max_body_bytes: int = Field(default=16 * 2**20, gt=0)
    # Overload gets an answer instead of an unbounded queue: past max_queued_requests waiting at the handle
    # Serve answers 503; a request still unanswered after request_timeout_s is cut off by the proxy.
    max_queued_requests: int = Field(default=512, ge=-1)
    request_timeout_s: float | None = Field(default=60.0, gt=0)
    overlong: Literal["truncate", "reject"] = "truncate"  # a text over max_text_chars: cut it, or answer 413
    token_env: str = "LLKD_SERVE_TOKEN"  # when this variable is set, requests need "Authorization: Bearer <it>"
    # Serving beyond loopback (serve.host, or a cluster's Serve config) without that token is refused unless this
    # says so: an open endpoint should be a decision, not a default.
    allow_unauthenticated: bool = False
    max_length: int | None = Field(default=None, gt=0)  # tokens per text; None: the student's training length
    # Ray Serve's throughput-optimized mode for a cluster llkd starts (a running cluster keeps the mode it was
    # started with; cluster/*.yaml start theirs with it): gRPC from proxy to replica, user code and router on the
    # replica's event loop, and direct ingress, where each replica also answers HTTP on a port of its own
    # (from 30000), bypassing the proxy. On 2 cores the proxy was the wall (benchmarks/serve_load.py).
    throughput_optimized: bool = True
    # Torch threads per replica. None: the node's cores shared among as many replicas (up to max_replicas) as fit
    # on it (Ray would export OMP_NUM_THREADS=num_cpus, one thread for num_cpus=1, and a batched replica runs one
    # forward at a time: half of a 2-core box idle). See ray_session.threads_per_copy.
    torch_threads: int | None = Field(default=None, gt=0)


class RayConfig(_Section):
    address: str | None = None  # None: connect to RAY_ADDRESS if set, else start a local cluster
    num_cpus: int | None = Field(default=None, gt=0)  # for a local cluster only
    object_store_memory_mb: int | None = Field(default=None, gt=0)
    # Ray Train's placement-group cleaner and `ray job submit` need the dashboard's state API.
    include_dashboard: bool = True


class Config(_Section):
    corpus: CorpusConfig = CorpusConfig()
    task: TaskConfig
    teacher: TeacherConfig = TeacherConfig()
    store: StoreConfig = StoreConfig()
    labeling: LabelingConfig = LabelingConfig()
    student: StudentConfig = StudentConfig()
    selection: SelectionConfig = SelectionConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    output: OutputConfig = OutputConfig()
    serve: ServeConfig = ServeConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _prompt_padding_needs_plain_prompts(self) -> Config:
        if self.teacher.align_prefix is True and self.task.prompt_style != "plain":
            raise ValueError("teacher.align_prefix pads plain prompts only; task.prompt_style is chat")
        if self.teacher.align_prompt_end and (self.task.prompt_style != "plain" or self.teacher.align_prefix is False):
            raise ValueError(
                "teacher.align_prompt_end pads plain prompts whose prefix is aligned: it needs task.prompt_style"
                " plain and teacher.align_prefix not false"
            )
        return self


def _format_errors(error: ValidationError, model: type[BaseModel], data: dict) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "<root>"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key" + _did_you_mean(model, item["loc"])
        elif "input" in item and item["type"] not in ("missing", "value_error"):
            message += f" (got {item['input']!r})"
        lines.append(f"  {where}: {message}")
    return "invalid configuration:\n" + "\n".join(lines)


def _did_you_mean(model: type[BaseModel], loc: tuple) -> str:
    """Suggest the closest known key for a misspelled one."""
    section: Any = model
    for part in loc[:-1]:
        field = section.model_fields.get(part) if isinstance(section, type) and issubclass(section, BaseModel) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return ""
        section = field.annotation
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (``3``, ``true``, ``[a, b]``)."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r}: expected key=value, e.g. teacher.batch_size=32")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Load and validate a config file (the packaged default when ``path`` is None)."""
    if path is None:
        text = importlib.resources.files("llkd_ray.configs").joinpath(DEFAULT_CONFIG).read_text()
    else:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        text = Path(path).read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    return config_from_dict(apply_overrides(data, list(overrides)))


def config_from_dict(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, Config, data)) from None

"""The two ways a student's weights are updated: DeepSpeed (ZeRO 0-3) and PyTorch DDP.

Both expose the same operations to the training loop, so the loop itself has no strategy branches.
The device is configuration: CPU here (DeepSpeed's CPU accelerator over gloo, fp32), GPUs on a cluster (bf16).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

from llkd_ray.config import TrainingConfig
from llkd_ray.errors import UserError

DDP_STATE = "ddp_state.pt"
ZERO_STAGE_FILE = "zero_stage.json"
LR_SCALE = "lr_scale"  # an optimizer group's multiple of the scheduled learning rate
ZERO_STAGE_RECORD_LIMIT = 4096  # bytes read from it: the record is ~20, a planted multi-GB file is not read whole
logger = logging.getLogger(__name__)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds objects other than tensors and plain data: loading it could run code."""


def check_checkpoint_files(directory: str) -> None:
    """Refuse a checkpoint whose files do not load as tensors and plain data.

    Whoever can write to ``training.storage_path`` could otherwise plant a pickle that runs code on every worker:
    DeepSpeed's checkpoint engine unpickles with ``weights_only=False``. Each file must first load with
    ``weights_only=True`` (PyTorch's restricted unpickler, which allows no other globals than those listed in
    ``SAFE_CHECKPOINT_GLOBALS``); a file that does holds nothing the full unpickler could run.
    """
    for file in sorted(Path(directory).rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(safe_checkpoint_globals()):
                torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:
            raise UnsafeCheckpointError(
                f"{file}: refusing to load a checkpoint file that is not only tensors and plain data"
                f" ({str(error).splitlines()[0]})"
            ) from None


def safe_checkpoint_globals() -> list:
    """DeepSpeed's own plain-data types that its ZeRO optimizer checkpoints hold besides tensors."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def effective_zero_stage(configured: int, world_size: int) -> int:
    """The ZeRO stage DeepSpeed runs: ZeRO-1 and -2 partition the optimizer state and gradients across ranks, so
    with one rank there is nothing to partition, and their flat-buffer bookkeeping only costs time (on 2 CPU cores
    a MiniLM optimizer step took 160 ms under ZeRO-2 against 72 ms under stage 0: benchmarks/student_step.py).
    Stage 3 is kept: its checkpoints and weight gathering differ."""
    return 0 if world_size == 1 and configured in (1, 2) else configured


def read_zero_stage(text: str, where: str) -> int:
    """The stage a checkpoint's ``zero_stage.json`` records. Anything else (a damaged or planted file) is refused by
    name, not with a parser's traceback."""
    try:
        stage = json.loads(text)["zero_stage"]
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):
        stage = None
    if type(stage) is not int or not 0 <= stage <= 3:
        raise UserError(
            f'{where} is not a ZeRO stage record (expected {{"zero_stage": 0-3}}): the checkpoint was damaged or'
            " altered; set output.name to start a new run, or delete the run's directory"
        )
    return stage


def check_zero_stage(saved: int, running: int) -> None:
    """DeepSpeed cannot load a checkpoint of another ZeRO stage (it fails deep inside ``load_checkpoint``)."""
    if saved != running:
        raise UserError(
            f"this checkpoint was written under DeepSpeed ZeRO stage {saved} and this run has stage {running}"
            " (one worker runs ZeRO-1/2 as stage 0): resume with the number of workers it was trained with, or"
            " set output.name to start a new run"
        )


def parameter_groups(network, head_lr_scale: float) -> list[dict]:
    """The student's trainable parameters in two optimizer groups: the pretrained encoder (everything under the
    model's ``base_model_prefix``) and the new classification head, each with the multiple of the scheduled
    learning rate it trains at (``lr_scale``: 1 for the encoder, ``training.head_lr_scale`` for the head)."""
    prefix = f"{network.base_model_prefix}."
    encoder, head = [], []
    for name, parameter in network.named_parameters():
        if parameter.requires_grad:
            (encoder if name.startswith(prefix) else head).append(parameter)
    groups = [{"params": encoder, LR_SCALE: 1.0}, {"params": head, LR_SCALE: head_lr_scale}]
    return [group for group in groups if group["params"]]


def set_group_learning_rates(param_groups: list[dict], value: float) -> None:
    """The scheduled learning rate, times each group's ``lr_scale``, into an optimizer's groups."""
    for group in param_groups:
        group["lr"] = value * group.get(LR_SCALE, 1.0)


def deepspeed_config(cfg: TrainingConfig, zero_stage: int, device: torch.device) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        # torch_adam: use torch's AdamW rather than compiling DeepSpeed's fused/CPU Adam ops.
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay, "torch_adam": True},
        },
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": device.type == "cuda"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def use_environment_extension_cache() -> str | None:
    """Points torch's JIT extension builds (DeepSpeed's CPU all-reduce op) at this Python environment's own
    folder, unless the user chose one (``TORCH_EXTENSIONS_DIR``) or the environment is read-only.

    torch's default, ``~/.cache/torch_extensions``, is shared by every environment of a user: a second clone
    (or CI beside a checkout) rebuilds the op over the first one's, with its own paths, and each then rebuilds it
    again on its next training run: ~20 s, silently, inside the first epoch. Returns the folder used.
    """
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    return os.environ.get("TORCH_EXTENSIONS_DIR")


def build_deepspeed_cpu_ops() -> None:
    """Builds DeepSpeed's CPU all-reduce op where training will look for it (``cluster/setup_local.sh``)."""
    use_environment_extension_cache()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


class DeepSpeedEngine:
    def __init__(self, network, cfg: TrainingConfig, device: torch.device):
        # Must be set before deepspeed is imported: without a GPU it would otherwise probe for CUDA.
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
        use_environment_extension_cache()
        import deepspeed
        import torch.distributed as dist

        world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.zero_stage = effective_zero_stage(cfg.zero_stage, world_size)
        if self.zero_stage != cfg.zero_stage:
            logger.info("one worker: ZeRO-%d has nothing to partition, DeepSpeed runs stage 0", cfg.zero_stage)
        config = deepspeed_config(cfg, self.zero_stage, device)
        # dist_init_required=False: reuse the process group Ray Train already set up.
        self.engine, *_ = deepspeed.initialize(
            model=network,
            model_parameters=parameter_groups(network, cfg.head_lr_scale),
            config=config,
            dist_init_required=False,
        )

    def logits(self, batch: dict) -> torch.Tensor:
        return self.engine(**batch).logits.float()

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def set_learning_rate(self, value: float) -> None:
        set_group_learning_rates(self.engine.optimizer.param_groups, value)  # what DeepSpeed's own schedulers set

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save(self, directory: str) -> None:
        self.engine.save_checkpoint(directory, tag="state")  # every rank writes its own shard
        (Path(directory) / ZERO_STAGE_FILE).write_text(json.dumps({"zero_stage": self.zero_stage}))

    def load(self, directory: str) -> None:
        check_checkpoint_files(directory)
        saved = Path(directory) / ZERO_STAGE_FILE
        if saved.exists():  # checkpoints from before the record was written are not checked
            with open(saved, "rb") as handle:
                check_zero_stage(read_zero_stage(handle.read(ZERO_STAGE_RECORD_LIMIT), str(saved)), self.zero_stage)
        self.engine.load_checkpoint(directory, tag="state")

    def full_state_dict(self) -> dict | None:
        """The complete weights on rank 0 (every rank must call: ZeRO-3 gathers the shards)."""
        if self.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.engine.module.state_dict()

    @property
    def module(self):
        return self.engine.module


class DDPEngine:
    def __init__(self, network, cfg: TrainingConfig, device: torch.device):
        import ray.train.torch

        self.model = ray.train.torch.prepare_model(network)  # moves to the device; DDP when world size > 1
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.module, cfg.head_lr_scale), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )

    def logits(self, batch: dict) -> torch.Tensor:
        return self.model(**batch).logits.float()

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()

    def set_learning_rate(self, value: float) -> None:
        set_group_learning_rates(self.optimizer.param_groups, value)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def save(self, directory: str) -> None:
        import ray.train

        if ray.train.get_context().get_world_rank() == 0:  # replicas are identical: one copy is enough
            torch.save(
                {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()},
                Path(directory) / DDP_STATE,
            )

    def load(self, directory: str) -> None:
        check_checkpoint_files(directory)
        state = torch.load(Path(directory) / DDP_STATE, map_location="cpu", weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def full_state_dict(self) -> dict | None:
        return self.module.state_dict()

    @property
    def module(self):
        return getattr(self.model, "module", self.model)


def make_engine(network, cfg: TrainingConfig, device: torch.device):
    return (DeepSpeedEngine if cfg.strategy == "deepspeed" else DDPEngine)(network, cfg, device)

"""An exponential moving average (EMA) of the student's weights, for evaluation and export.

After every optimizer step t (counted from 0 over the whole run), for every floating-point tensor θ:

    d_t = min(decay, (1 + t) / (10 + t))          the usual warm-up of the decay (as TensorFlow's EMA)
    θ̄  <- d_t θ̄ + (1 - d_t) θ

The warm-up keeps the first steps' random-head weights from dominating a short run. Training itself, and the
student's scores that selection reads, use the live weights; only evaluation and the exported student use θ̄.
The average is kept in fp32 on every worker: the weights it averages are the same on every worker (DDP and
ZeRO 0-2 replicate them; ZeRO-3, which does not, is refused by the config).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

EMA_FILE = "weight_average.pt"


def decay_at(step: int, decay: float) -> float:
    """d_t of the module docstring."""
    return min(decay, (1 + step) / (10 + step))


class WeightAverage:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.steps = 0
        self.average = {name: value.detach().float().clone() for name, value in _floating(module)}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        d = decay_at(self.steps, self.decay)
        for name, value in _floating(module):
            self.average[name].mul_(d).add_(value.detach().float(), alpha=1 - d)
        self.steps += 1

    @contextmanager
    def applied(self, module: torch.nn.Module) -> Iterator[None]:
        """The module holds the averaged weights inside the block and its own again after it."""
        live = {name: value.detach().clone() for name, value in _floating(module)}
        _copy_into(module, self.average)
        try:
            yield
        finally:
            _copy_into(module, live)

    def state_dict_for(self, module: torch.nn.Module) -> dict:
        """The module's full state dict with the averaged weights in its own dtypes (for export)."""
        state = module.state_dict()
        return {
            name: self.average[name].to(value.dtype) if name in self.average else value for name, value in state.items()
        }

    def save(self, directory: str) -> None:
        torch.save({"steps": self.steps, "average": self.average}, Path(directory) / EMA_FILE)

    def load(self, directory: str) -> None:
        """Restore from a checkpoint (already checked to hold only tensors and plain data)."""
        saved = torch.load(Path(directory) / EMA_FILE, map_location="cpu", weights_only=True)
        if set(saved["average"]) != set(self.average):
            raise ValueError(f"{directory}/{EMA_FILE} does not average this student's weights")
        self.steps = int(saved["steps"])
        device = {name: value.device for name, value in self.average.items()}
        self.average = {name: value.float().to(device[name]) for name, value in saved["average"].items()}


def _floating(module: torch.nn.Module):
    # state_dict() tensors share storage with the parameters and buffers, so copying into them updates the module.
    return [(name, value) for name, value in module.state_dict().items() if value.is_floating_point()]


@torch.no_grad()
def _copy_into(module: torch.nn.Module, values: dict) -> None:
    for name, value in _floating(module):
        value.copy_(values[name])

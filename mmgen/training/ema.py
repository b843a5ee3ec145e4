"""Exponential moving average of model weights, kept as a separate object.

Evaluation and export use the EMA weights; the IMM target branch uses the live weights
(a stop-gradient of the current weights, as IMM prescribes; docs/design.md §7).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class EMA:
    """Shadow copy (fp32) of every trainable parameter: shadow <- d * shadow + (1 - d) * param.

    The decay warms up as min(decay, (1 + n) / (10 + n)) over the first updates so early,
    random weights are forgotten quickly (the warm-up used by many diffusion codebases).
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {
            name: p.detach().to(torch.float32).clone()
            for name, p in model.named_parameters()
            if p.requires_grad
        }

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        for name, p in model.named_parameters():
            if name in self.shadow:
                if self.shadow[name].device != p.device:  # built before accelerate moved the model
                    self.shadow[name] = self.shadow[name].to(p.device)
                self.shadow[name].lerp_(p.detach().to(torch.float32), 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.dtype))

    @contextlib.contextmanager
    def swapped_into(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Temporarily load the EMA weights into `model` (for sampling/evaluation)."""
        backup = {name: p.detach().clone() for name, p in model.named_parameters() if name in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in backup:
                        p.copy_(backup[name])

    def save(self, path: str | Path) -> None:
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.shadow.items()}
        save_file(tensors, str(path), metadata={"num_updates": str(self.num_updates), "decay": str(self.decay)})

    def load(self, path: str | Path) -> None:
        from safetensors import safe_open

        tensors = load_file(str(path))
        missing = set(self.shadow) - set(tensors)
        if missing:
            raise ValueError(f"{path}: EMA file lacks {len(missing)} parameters, e.g. {min(missing)}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        for name in self.shadow:
            self.shadow[name].copy_(tensors[name])
        self.num_updates = int(meta.get("num_updates", 0))

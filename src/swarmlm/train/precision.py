"""Mixed precision: bf16 autocast (CPU and CUDA), fp16 with dynamic loss scaling (CUDA only)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class PrecisionError(ValueError):
    pass


class Precision:
    def __init__(self, mode: str, device: torch.device) -> None:
        if mode == "fp16" and device.type != "cuda":
            raise PrecisionError(
                "train.precision='fp16' needs CUDA (loss scaling on CPU is not supported); "
                "use 'bf16' or 'fp32'"
            )
        self.mode = mode
        self.device = device
        self.scaler = torch.amp.GradScaler("cuda") if mode == "fp16" else None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.mode == "fp32":
            yield
            return
        dtype = torch.bfloat16 if self.mode == "bf16" else torch.float16
        with torch.autocast(device_type=self.device.type, dtype=dtype):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

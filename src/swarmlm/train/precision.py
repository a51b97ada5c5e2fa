"""Mixed precision: bf16 autocast (CPU and CUDA), fp16 with dynamic loss scaling (CUDA only).

``precision: auto`` (the default) trains under bf16 autocast where the hardware computes bf16
natively, and in fp32 elsewhere. Emulated bf16 (a CPU without AVX512-BF16 or AMX) is slower
than fp32 and only loses precision, so "auto" never picks it. Detection happens at run time:
machines change between sessions, so the answer is never assumed or cached on disk.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "avx_ne_convert", "bf16")


class PrecisionError(ValueError):
    pass


def _cpuinfo_flags() -> set[str]:
    """The CPU feature flags the kernel reports (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (AVX512-BF16, AMX, AVX-NE-CONVERT, or
    ARM's ``bf16``).

    oneDNN's own check answers "will my bf16 kernels run at all" (it also says yes for plain
    AVX-512, where bf16 is emulated), so it can only veto; the kernel's flag list says whether
    the instructions exist. No flag list (not Linux): fp32, the safe answer.
    """
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if probe is not None and not bool(probe()):
        return False
    flags = _cpuinfo_flags()
    return any(flag in flags for flag in _CPU_BF16_FLAGS)


def device_has_native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_precision(mode: str, device: torch.device) -> str:
    """The concrete precision ("fp32", "bf16" or "fp16") a run uses on ``device``."""
    if mode not in PRECISIONS:
        raise PrecisionError(f"train.precision={mode!r}: expected one of {', '.join(PRECISIONS)}")
    if mode != "auto":
        return mode
    return "bf16" if device_has_native_bf16(device) else "fp32"


class Precision:
    def __init__(self, mode: str, device: torch.device) -> None:
        if mode == "fp16" and device.type != "cuda":
            raise PrecisionError(
                "train.precision='fp16' needs CUDA (loss scaling on CPU is not supported); "
                "use 'bf16', 'fp32' or 'auto'"
            )
        self.requested = mode
        self.mode = resolve_precision(mode, device)
        if mode == "auto":
            log.info("precision auto -> %s on %s", self.mode, device.type)
        self.device = device
        self.scaler = torch.amp.GradScaler("cuda") if self.mode == "fp16" else None

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

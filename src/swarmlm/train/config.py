"""The run configuration: everything `swarmlm train` needs, validated in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from swarmlm.config import StrictModel
from swarmlm.data.mixing import MixingConfig
from swarmlm.model import ModelConfig
from swarmlm.privacy.config import PrivacyConfig

#: environment variables laid over a run config file: SWARMLM_TRAIN__OPTIM__LR=1e-3
ENV_PREFIX = "SWARMLM_TRAIN__"


class DataConfig(StrictModel):
    path: Path = Field(description="directory written by `swarmlm data prepare`")
    batch_size: int = Field(default=16, ge=1, description="sequences per micro-batch per rank")
    seq_len: int = Field(default=256, ge=2)
    prefetch: int = Field(default=4, ge=1, description="batches queued by the loader thread")
    eval_batch_size: int | None = Field(default=None, ge=1)
    order: Literal["random", "difficulty"] = Field(
        default="random", description="'difficulty': first epochs run from easy to hard windows"
    )
    difficulty_epochs: int = Field(default=1, ge=0)
    mixing: MixingConfig = Field(
        default_factory=MixingConfig,
        description="per-type sampling, online mixing and curriculum (generated corpora)",
    )


class CurriculumStage(StrictModel):
    until_step: int = Field(ge=1, description="this stage applies to steps < until_step")
    seq_len: int = Field(ge=2)


class OptimConfig(StrictModel):
    name: Literal["adamw", "sam"] = "adamw"
    lr: float = Field(default=3e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    fused: bool | None = Field(default=None, description="None = fused AdamW when available")
    sam_rho: float = Field(default=0.05, gt=0, description="SAM neighbourhood radius")


class ScheduleConfig(StrictModel):
    kind: Literal["cosine", "linear", "constant", "plateau"] = "cosine"
    warmup_steps: int = Field(default=100, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    plateau_factor: float = Field(default=0.5, gt=0, lt=1)
    plateau_patience: int = Field(default=2, ge=0, description="evaluations without improvement")
    plateau_threshold: float = Field(default=1e-3, ge=0)


class TrainConfig(StrictModel):
    max_steps: int = Field(default=1000, ge=1)
    max_seconds: float | None = Field(default=None, gt=0, description="stop after this time")
    grad_accum: int = Field(default=1, ge=1)
    grad_clip: float | None = Field(default=1.0, gt=0)
    adaptive_batch: bool = Field(
        default=True,
        description="CUDA: probe the micro-batch that fits; on out-of-memory, split and retry",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="'auto': bf16 autocast where the CPU/GPU computes bf16 natively, else fp32",
    )
    compile: bool = False
    qat_int8: bool = False
    seed: int = 0
    eval_every: int = Field(default=200, ge=1)
    eval_batches: int | None = Field(default=None, ge=1, description="None = whole val split")
    log_every: int = Field(default=10, ge=1)
    checkpoint_every: int = Field(default=500, ge=1)
    keep_checkpoints: int = Field(default=3, ge=1)
    async_checkpoint: bool = False
    checkpoint_codec: Literal["none", "auto", "zstd", "gzip", "zlib", "lzma", "bz2"] = Field(
        default="none",
        description="compress weights and optimizer state in checkpoints (crc-checked chunks)",
    )
    out_dir: Path = Path("runs/default")
    tensorboard: bool = False
    curriculum: list[CurriculumStage] = Field(default_factory=list)
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads")


class DistributedConfig(StrictModel):
    strategy: Literal["ddp", "fsdp2"] = Field(
        default="ddp", description="plain data parallelism; tp/pp/ep layouts always use FSDP2"
    )
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    cpu_offload: bool = Field(
        default=False,
        description="FSDP2 CPUOffloadPolicy: parameter shards, gradients and optimizer state "
        "live in host memory (CUDA; a no-op on CPU-only runs)",
    )
    timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="collective timeout: a rank whose peer died exits with an error after this",
    )


class ParallelConfig(StrictModel):
    """Degrees of a DeviceMesh layout (``--parallel dp=2,tp=2``); product = world size."""

    dp: int | None = Field(default=None, ge=1, description="None = world size / (tp*pp*ep)")
    tp: int = Field(default=1, ge=1, description="tensor + sequence parallel degree")
    pp: int = Field(default=1, ge=1, description="pipeline stages")
    ep: int = Field(default=1, ge=1, description="expert-parallel degree (MoE)")
    pp_schedule: Literal["gpipe", "1f1b"] = "1f1b"
    pp_microbatches: int | None = Field(
        default=None,
        ge=1,
        description="None = train.grad_accum, raised to pp when smaller (rows split evenly)",
    )


class RunConfig(StrictModel):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    privacy: PrivacyConfig = Field(
        default_factory=PrivacyConfig,
        description="differential privacy of this peer: DP-SGD, noised contributions, budget "
        "(docs/privacy.md)",
    )

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.data.seq_len > self.model.max_seq_len and self.model.pos_encoding == "learned":
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len="
                f"{self.model.max_seq_len} with learned positions (field 'data.seq_len')"
            )
        steps = [s.until_step for s in self.train.curriculum]
        if steps != sorted(steps) or len(set(steps)) != len(steps):
            raise ValueError("train.curriculum stages must have increasing until_step")
        self._check_privacy()
        return self

    def _check_privacy(self) -> None:
        """DP-SGD's records are fixed windows of data.seq_len and its batches Poisson samples
        of them: settings that change either, or that step without its gradients, are refused."""
        if not self.privacy.dp_sgd:
            return
        refused = {
            "train.curriculum": bool(self.train.curriculum),
            "data.mixing.mode": self.data.mixing.mode != "off",
            'optim.name "sam"': self.optim.name == "sam",
            'train.precision "fp16"': self.train.precision == "fp16",
            "parallel.tp/pp/ep > 1": max(self.parallel.tp, self.parallel.pp, self.parallel.ep) > 1,
        }
        bad = [name for name, on in refused.items() if on]
        if bad:
            raise ValueError(
                f"privacy.dp_sgd cannot be combined with {', '.join(bad)} (DP-SGD samples "
                "fixed records and computes its own per-sample gradients; docs/privacy.md)"
            )

"""The trainer: a loop that orchestrates small, separately tested components.

data loader -> model (autocast) -> backward (accumulation, no-sync) -> clip -> optimizer
(AdamW or SAM) -> schedule -> metrics / evaluation / checkpoint. The process group is injected
(:mod:`swarmlm.train.parallel`), so the same loop runs alone, under torchrun, or in a swarm.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from swarmlm.data import BatchLoader, TokenShards, bits_per_byte, eval_batches
from swarmlm.data.mixing import (
    AdaptiveCurriculum,
    MixtureIndex,
    MixtureLoader,
    OnlineMixer,
    per_row_loss,
)
from swarmlm.model import Transformer
from swarmlm.privacy.accountant import PrivacyBudgetExhaustedError
from swarmlm.privacy.dp import PrivateTraining
from swarmlm.train.checkpoint import (
    AsyncCheckpointer,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    snapshot,
)
from swarmlm.train.config import RunConfig
from swarmlm.train.metrics import MetricsLogger
from swarmlm.train.optim import SAM, build_adamw
from swarmlm.train.parallel import SingleProcess, unwrap
from swarmlm.train.precision import Precision
from swarmlm.train.qat import enable_int8_qat
from swarmlm.train.schedule import LRSchedule

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class EvaluationInterruptedError(RuntimeError):
    """:meth:`Trainer.evaluate` stopped early because ``Trainer.interrupt`` was set."""


@dataclass
class EvalResult:
    loss: float
    bits_per_byte: float
    perplexity: float
    tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "loss": self.loss,
            "bpb": self.bits_per_byte,
            "ppl": self.perplexity,
            "tokens": self.tokens,
        }


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)
    last_eval: EvalResult | None = None
    tokens: int = 0
    seconds: float = 0.0
    checkpoint: Path | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.asarray(np_state[1]).tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py: Any = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    keys = np.asarray(state["numpy"], dtype=np.uint32)
    np.random.set_state(("MT19937", keys, 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def estimate_memory_bytes(model: Transformer, batch_size: int, seq_len: int) -> int:
    """Rough training memory: weights, gradients and AdamW moments (4 copies of the
    parameters) plus activations (~34 d_model floats per token per layer, plus logits)."""
    cfg = model.cfg
    params = model.num_parameters()
    tokens = batch_size * seq_len
    activations = tokens * cfg.n_layers * cfg.d_model * 34 + tokens * cfg.vocab_size * 2
    if cfg.gradient_checkpointing:
        activations = tokens * cfg.d_model * cfg.n_layers * 2 + tokens * cfg.vocab_size * 2
    return 4 * (4 * params + activations)


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        *,
        parallel: SingleProcess | None = None,
        console: Console | None = None,
        show_progress: bool = True,
        privacy_rounds: int = 0,
    ) -> None:
        """``privacy_rounds``: the noised contributions a swarm peer plans (its budget is
        planned, and an impossible target refused, before the first step)."""
        self.cfg = cfg
        self.parallel = parallel or SingleProcess()
        # set from another thread to end an evaluation between batches (a stopping swarm
        # node: the evaluation holds the worker's lock, and the final checkpoint waits for it)
        self.interrupt = threading.Event()
        self.console = console or Console(stderr=True)
        self.show_progress = show_progress and self.parallel.is_main
        self.run_dir = cfg.train.out_dir
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        seed_everything(cfg.train.seed)

        self.device = self.parallel.device
        model = Transformer(cfg.model).to(self.device)
        if cfg.train.qat_int8:
            wrapped = enable_int8_qat(model)
            log.info("int8 fake quantization on %d linear layers", wrapped)
        self.model_core = model
        self.model: nn.Module = self.parallel.wrap(model)
        if cfg.train.compile:
            self.model = torch.compile(self.model)  # type: ignore[assignment]
        self.precision = Precision(cfg.train.precision, self.device)
        base = build_adamw(self.model, cfg.optim)
        self.base_optimizer = base
        self.sam = SAM(base, cfg.optim.sam_rho) if cfg.optim.name == "sam" else None
        self.schedule = LRSchedule(cfg.schedule, cfg.optim.lr, cfg.train.max_steps)

        self.train_shards = TokenShards.open(cfg.data.path, split="train")
        self.val_shards = TokenShards.open(cfg.data.path, split="val")
        self.seq_len = self._seq_len_for(0)
        self.loader: BatchLoader | MixtureLoader
        self.mixer: OnlineMixer | None = None
        self.curriculum: AdaptiveCurriculum | None = None
        # False in a swarm: the stage and the weights are the round state's
        # (swarm/data_schedule.py); the trainer then only collects per-type losses
        self.adapt_data_locally = True
        self._row_losses: list[Tensor] | None = None
        mixing = cfg.data.mixing
        if mixing.mode != "off":
            index = MixtureIndex.open(cfg.data.path, "train")
            self.loader = MixtureLoader(
                self.train_shards,
                index,
                cfg.data.batch_size,
                self.seq_len,
                seed=cfg.train.seed,
                rank=self.parallel.data_rank,
                world_size=self.parallel.data_world_size,
                pool=cfg.train.grad_accum + 2,
            )
            if mixing.mode == "online":
                self.mixer = OnlineMixer.from_config(index, mixing)
            if mixing.curriculum:
                self.curriculum = AdaptiveCurriculum(mixing, cfg.train.max_steps)
                self.loader.set_cap(self.curriculum.cap())
        else:
            self.loader = BatchLoader(
                self.train_shards,
                batch_size=cfg.data.batch_size,
                seq_len=self.seq_len,
                seed=cfg.train.seed,
                rank=self.parallel.data_rank,
                world_size=self.parallel.data_world_size,
                prefetch=cfg.data.prefetch,
                pin_memory=self.device.type == "cuda",
                order=cfg.data.order,
                difficulty_epochs=cfg.data.difficulty_epochs,
            )
        self.step = 0
        self.tokens_seen = 0
        self.micro_splits = 1
        self.privacy: PrivateTraining | None = (
            self._build_privacy(privacy_rounds) if cfg.privacy.enabled else None
        )
        self.async_writer = AsyncCheckpointer() if cfg.train.async_checkpoint else None
        self.last_checkpoint: Path | None = None
        self.metrics: MetricsLogger | None = None
        if self.parallel.is_main:
            self.metrics = MetricsLogger(
                self.run_dir / "metrics.jsonl", tensorboard=cfg.train.tensorboard
            )
            mem = estimate_memory_bytes(model, cfg.data.batch_size, cfg.data.seq_len)
            log.info(
                "model %.2fM parameters; estimated training memory %.0f MiB per rank",
                model.num_parameters() / 1e6,
                mem / 2**20,
            )

    # ---- differential privacy (issue 25; swarmlm.privacy) --------------------------------

    def _build_privacy(self, rounds: int) -> PrivateTraining:
        """The DP-SGD sampler, noise and budget ledger of this run (Opacus loads here)."""
        cfg = self.cfg
        if cfg.privacy.dp_sgd and type(self.parallel).mean is not SingleProcess.mean:
            raise ValueError(
                "privacy.dp_sgd runs in one process per peer (swarmlm train or a swarm peer): "
                "under torchrun each rank's sampling and noise would not be accounted"
            )
        return PrivateTraining(
            cfg.privacy,
            shards=self.train_shards,
            seq_len=cfg.data.seq_len,
            expected_batch=cfg.data.batch_size * cfg.train.grad_accum,
            planned_steps=cfg.train.max_steps,
            planned_rounds=rounds,
            rank=self.parallel.data_rank,
            world_size=self.parallel.data_world_size,
            seed=cfg.train.seed,
        )

    def _private_step(self) -> tuple[float, float]:
        """A DP-SGD step in place of :meth:`train_step`'s body: the gradient comes from
        Poisson-sampled records, clipped per record and noised (no global clip, no loader)."""
        assert self.privacy is not None
        lr = self.schedule.lr(self.step)
        for group in self.base_optimizer.param_groups:
            group["lr"] = lr
        loss, grad_norm = self.privacy.gradient_step(self.model_core, self.precision.autocast)
        if self.privacy.last_batch and not math.isfinite(loss):
            raise TrainingDivergedError(f"loss is {loss} at step {self.step}; stopping")
        self.base_optimizer.step()
        self.base_optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.privacy.last_batch * self.cfg.data.seq_len
        return loss, grad_norm

    def _privacy_metrics(self) -> dict[str, float]:
        if self.privacy is None:
            return {}
        rep = self.privacy.report()
        return {k: float(rep[k]) for k in ("epsilon", "delta") if rep[k] is not None}

    # ---- state -------------------------------------------------------------------------

    def _seq_len_for(self, step: int) -> int:
        for stage in self.cfg.train.curriculum:
            if step < stage.until_step:
                return stage.seq_len
        return self.cfg.data.seq_len

    def state(self) -> dict[str, Any]:
        return {
            "config": self.cfg.model_dump(mode="json"),
            "schedule": self.schedule.state_dict(),
            "loader": self.loader.state_dict(),
            **({"mixer": self.mixer.state_dict()} if self.mixer is not None else {}),
            **({"curriculum": self.curriculum.state_dict()} if self.curriculum else {}),
            "tokens_seen": self.tokens_seen,
            "world_size": self.parallel.world_size,
            "layout": str(getattr(self.parallel, "layout", "single")),
            **({"privacy": self.privacy.ledger.state_dict()} if self.privacy else {}),
        }

    def save(self) -> Path | None:
        """Checkpoint now (rank 0 writes; every rank takes part in gathering full state)."""
        if self.parallel.sharded_checkpoints:
            return self._save_sharded()
        model_state = self.parallel.model_state(self.model)
        optim_state = self.parallel.optimizer_state(self.model, self.base_optimizer)
        if not self.parallel.is_main:
            self.parallel.barrier()
            return None
        trainer_state = {"optimizer": optim_state, "rng": rng_state()}
        args = (
            self.run_dir,
            self.step,
            snapshot(model_state),
            trainer_state,
            self.state(),
            self.cfg.train.keep_checkpoints,
        )
        path: Path | None = None
        try:
            codec = self.cfg.train.checkpoint_codec
            if self.async_writer is not None:
                self.async_writer.submit(*args, codec=codec)
                path = self.run_dir / "checkpoints" / f"step-{self.step:08d}"
            else:
                path = save_checkpoint(*args, codec=codec)
                self.last_checkpoint = path
        except (OSError, CheckpointError) as exc:
            # The previous checkpoint is intact; training goes on and the next save retries.
            log.error("checkpoint at step %d failed, keeping the last good one: %s", self.step, exc)
            path = None
        self.parallel.barrier()
        return path

    def _save_sharded(self) -> Path | None:
        """Every rank writes its shards (torch.distributed.checkpoint); rank 0 adds the
        full-tensor ``model.safetensors`` and the usual files, so any layout, one process and
        ``export-hf`` can read the result."""
        from swarmlm.train.sharded import save_sharded_checkpoint

        trainer_state = {"rng": rng_state()}
        try:
            path = save_sharded_checkpoint(
                self.parallel,
                self.model,
                self.base_optimizer,
                run_dir=self.run_dir,
                step=self.step,
                trainer_state=trainer_state,
                state=self.state(),
                keep=self.cfg.train.keep_checkpoints,
            )
        except (OSError, CheckpointError) as exc:
            log.error("checkpoint at step %d failed, keeping the last good one: %s", self.step, exc)
            return None
        if path is not None:
            self.last_checkpoint = path
        return path

    def resume(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location="cpu")
        saved_cfg = ckpt.state["config"]
        ours = self.cfg.model.model_dump(mode="json")
        if saved_cfg.get("model") != ours:
            theirs = saved_cfg.get("model") or {}
            diffs = ", ".join(
                f"{k}: checkpoint {theirs.get(k)!r}, this run {ours.get(k)!r}"
                for k in sorted(set(ours) | set(theirs))
                if theirs.get(k) != ours.get(k)
            )
            raise CheckpointError(
                f"{ckpt.path}: the checkpoint's model config differs from this run's "
                f"(field 'model': {diffs}); start a new run directory or use the same model "
                "config"
            )
        if (ckpt.path / "dcp").is_dir():
            from swarmlm.train.sharded import load_sharded_checkpoint

            load_sharded_checkpoint(ckpt.path / "dcp", self.model, self.base_optimizer)
        else:
            self.parallel.load_model_state(self.model, ckpt.model_state)
            self.parallel.load_optimizer_state(
                self.model, self.base_optimizer, ckpt.trainer_state["optimizer"]
            )
        self.schedule.load_state_dict(ckpt.state["schedule"])
        self.loader.load_state_dict(ckpt.state["loader"])
        if self.mixer is not None and "mixer" in ckpt.state:
            self.mixer.load_state_dict(ckpt.state["mixer"])
        if self.curriculum is not None and "curriculum" in ckpt.state:
            self.curriculum.load_state_dict(ckpt.state["curriculum"])
        self.tokens_seen = int(ckpt.state["tokens_seen"])
        if self.privacy is not None:
            if "privacy" not in ckpt.state:
                raise CheckpointError(
                    f"{ckpt.path}: saved without privacy accounting, and this run has privacy "
                    "on: its earlier steps would go unaccounted; start a new run directory"
                )
            self.privacy.ledger.load_state_dict(ckpt.state["privacy"])
        self.step = ckpt.step
        self.seq_len = self._seq_len_for(self.step)
        self.loader.set_seq_len(self.seq_len)
        set_rng_state(ckpt.trainer_state["rng"])
        self.last_checkpoint = ckpt.path
        log.info("resumed from %s at step %d", ckpt.path, self.step)

    # ---- evaluation ----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> EvalResult:
        """Loss, bits per byte and perplexity on the validation split (same on every rank)."""
        was_training = self.model.training
        self.model.eval()
        total_loss, total_tokens = 0.0, 0
        batch_size = self.cfg.data.eval_batch_size or self.cfg.data.batch_size
        limit = max_batches or self.cfg.train.eval_batches
        for i, (x, y) in enumerate(
            eval_batches(self.val_shards, batch_size, self.cfg.data.seq_len)
        ):
            if limit is not None and i >= limit:
                break
            if self.interrupt.is_set():
                self.model.train(was_training)
                raise EvaluationInterruptedError(f"evaluation interrupted after {i} batches")
            x, y = x.to(self.device), y.to(self.device)
            n = int((y != -100).sum())
            with self.precision.autocast():
                if self.parallel.pipeline is not None:
                    batch_loss = self.parallel.pipeline.eval_loss(x, y)
                else:
                    out = self.model_core(x, targets=y)
                    assert out.lm_loss is not None
                    batch_loss = float(out.lm_loss)
            total_loss += batch_loss * n
            total_tokens += n
        self.model.train(was_training)
        if total_tokens == 0:
            raise ValueError(f"validation split of {self.cfg.data.path} holds no full window")
        loss = total_loss / total_tokens
        bpb = bits_per_byte(loss, self.val_shards)
        return EvalResult(loss, bpb, math.exp(min(loss, 50.0)), total_tokens)

    # ---- the loop ----------------------------------------------------------------------

    def _forward_backward(self, batches: list[tuple[Tensor, Tensor]]) -> float:
        """Accumulate gradients over micro-batches; returns their mean loss.

        Each loaded micro-batch is cut into ``self.micro_splits`` row chunks (1 unless an
        out-of-memory error forced smaller pieces); chunk losses are weighted by their share of
        rows, so the gradient is the same as for the whole micro-batch.
        """
        if self.parallel.pipeline is not None:
            with self.precision.autocast():
                mean_loss: float = self.parallel.pipeline.step(batches)
            return mean_loss
        pieces = [
            (x_part, y_part, x_part.shape[0] / (x.shape[0] * len(batches)))
            for x, y in batches
            for x_part, y_part in zip(
                x.chunk(self.micro_splits), y.chunk(self.micro_splits), strict=True
            )
        ]
        total = 0.0
        for i, (x, y, weight) in enumerate(pieces):
            with self.parallel.no_sync(self.model, i < len(pieces) - 1):
                with self.precision.autocast():
                    out = self.model(x, targets=y)
                loss: Tensor = out.loss
                self.precision.backward(loss * weight)
                if self._row_losses is not None:
                    self._row_losses.append(per_row_loss(out.logits.detach(), y))
            total += float(loss.detach()) * weight
        return total

    def _forward_backward_adaptive(self, batches: list[tuple[Tensor, Tensor]]) -> float:
        """Like :meth:`_forward_backward`, halving the chunk size after an out-of-memory
        error and retrying the same batches (the adaptive batch size of CUDA runs)."""
        while True:
            try:
                return self._forward_backward(batches)
            except torch.OutOfMemoryError:
                self.base_optimizer.zero_grad(set_to_none=True)
                if not self.cfg.train.adaptive_batch or self.micro_splits >= batches[0][0].shape[0]:
                    raise
                self.micro_splits *= 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                log.warning(
                    "out of memory at step %d: splitting each micro-batch into %d chunks",
                    self.step,
                    self.micro_splits,
                )

    def probe_batch_size(self) -> int:
        """On CUDA, find how many chunks the configured micro-batch needs to fit in memory by
        running one forward/backward on random tokens; returns the chunk count."""
        if self.device.type != "cuda" or not self.cfg.train.adaptive_batch:
            return self.micro_splits
        shape = (self.cfg.data.batch_size, self.cfg.data.seq_len)
        x = torch.randint(0, self.cfg.model.vocab_size, shape, device=self.device)
        self._forward_backward_adaptive([(x, x)])
        self.base_optimizer.zero_grad(set_to_none=True)
        log.info(
            "batch probe: micro-batch %d fits as %d chunk(s) of %d",
            shape[0],
            self.micro_splits,
            shape[0] // self.micro_splits,
        )
        return self.micro_splits

    def _clip(self) -> float:
        self.precision.unscale(self.base_optimizer)
        self.parallel.sync_gradients(self.model)
        return self.parallel.clip_grad_norm(self.model, self.cfg.train.grad_clip)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step; returns (loss, gradient norm)."""
        if self.privacy is not None and self.privacy.windows is not None:
            return self._private_step()
        cfg = self.cfg
        seq_len = self._seq_len_for(self.step)
        if seq_len != self.seq_len:
            self.seq_len = seq_len
            self.loader.set_seq_len(seq_len)
            log.info("curriculum: sequence length %d from step %d", seq_len, self.step)
        lr = self.schedule.lr(self.step)
        for group in self.base_optimizer.param_groups:
            group["lr"] = lr
        batches = []
        row_types: list[np.ndarray[Any, Any]] = []
        for _ in range(cfg.train.grad_accum):
            x, y = next(self.loader)
            if isinstance(self.loader, MixtureLoader):
                row_types.append(self.loader.last_types)
            batches.append(
                (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
            )
        self._row_losses = [] if self.mixer is not None else None
        loss = self._forward_backward_adaptive(batches)
        loss = self.parallel.mean(loss)
        if not math.isfinite(loss):
            raise TrainingDivergedError(
                f"loss is {loss} at step {self.step}; stopping. The last good checkpoint is "
                f"{self.last_checkpoint or 'none (no checkpoint written yet)'}"
            )
        if self.sam is not None:
            self.sam.perturb()
            self.base_optimizer.zero_grad(set_to_none=True)
            self._forward_backward(batches)
            grad_norm = self._clip()
            self.sam.unperturb_and_step()
        else:
            grad_norm = self._clip()
            self.precision.step(self.base_optimizer)
        self.base_optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += sum(x.numel() for x, _ in batches) * self.parallel.data_world_size
        self._adapt_mixture(loss, row_types)
        return loss, grad_norm

    def _adapt_mixture(self, loss: float, row_types: list[np.ndarray[Any, Any]]) -> None:
        """Online mixing and curriculum after a step (identical on every rank: losses are
        averaged over ranks before they change the weights or the stage)."""
        assert isinstance(self.loader, MixtureLoader) or self.mixer is None
        if self.mixer is not None and self._row_losses:
            rows = torch.cat(self._row_losses).cpu().numpy().astype(np.float64)
            types = np.concatenate(row_types)
            n = min(rows.size, types.size)  # an OOM retry may have appended twice
            self.mixer.observe(types[-n:], rows[-n:])
            if self.adapt_data_locally and self.step % self.cfg.data.mixing.update_every == 0:
                sums, counts = self.mixer.pending()
                if self.parallel.data_world_size > 1:
                    sums = np.array([self.parallel.mean(float(v)) for v in sums])
                    counts = np.array([self.parallel.mean(float(v)) for v in counts])
                weights = self.mixer.update(sums, counts)
                assert isinstance(self.loader, MixtureLoader)
                self.loader.set_weights(weights)
        self._row_losses = None
        if (
            self.adapt_data_locally
            and self.curriculum is not None
            and self.curriculum.observe(self.step, loss)
        ):
            assert isinstance(self.loader, MixtureLoader)
            self.loader.set_cap(self.curriculum.cap())
            log.debug(
                "curriculum: stage %d (difficulty <= %.3f) from step %d",
                self.curriculum.stage,
                self.curriculum.cap(),
                self.step,
            )

    def fit(self, resume: bool | Path = False, *, until_step: int | None = None) -> TrainResult:
        """Train to ``max_steps`` (or the time budget, or ``until_step`` for a job that will be
        resumed later); evaluate and checkpoint at the end."""
        cfg = self.cfg.train
        if isinstance(resume, Path):
            self.resume(resume)
        elif resume and latest_checkpoint(self.run_dir) is not None:
            self.resume(self.run_dir)
        elif latest_checkpoint(self.run_dir) is not None:
            raise CheckpointError(
                f"{self.run_dir} already holds checkpoints: pass --resume to continue that run, "
                "or set train.out_dir to a new directory"
            )
        self.probe_batch_size()
        first_step = self.step
        result = TrainResult(step=self.step, checkpoint=self.last_checkpoint)
        evaluated_at = checkpointed_at = -1
        self.model.train()
        start = time.perf_counter()
        tokens_at_start = self.tokens_seen
        try:
            with self._progress() as progress:
                task = progress.add_task(
                    "training", total=cfg.max_steps, completed=self.step, status=""
                )
                stop_step = min(cfg.max_steps, until_step or cfg.max_steps)
                while self.step < stop_step:
                    elapsed = time.perf_counter() - start
                    if cfg.max_seconds is not None and elapsed > cfg.max_seconds:
                        log.info(
                            "time budget %.0f s reached at step %d", cfg.max_seconds, self.step
                        )
                        break
                    try:
                        loss, grad_norm = self.train_step()
                    except PrivacyBudgetExhaustedError as exc:  # on_budget_spent = stop
                        log.warning("%s: stopping at step %d", exc, self.step)
                        break
                    result.losses.append(loss)
                    if cfg.max_seconds is not None:
                        self._fit_schedule_to_budget(start, first_step, cfg.max_seconds)
                    rate = (self.tokens_seen - tokens_at_start) / max(
                        time.perf_counter() - start, 1e-9
                    )
                    progress.update(
                        task, completed=self.step, status=f"loss {loss:.4f}  {rate:,.0f} tok/s"
                    )
                    if self.metrics is not None and (
                        self.step % cfg.log_every == 0 or self.step == 1
                    ):
                        self.metrics.log(
                            self.step,
                            "train",
                            loss=loss,
                            lr=self.schedule.lr(self.step - 1),
                            grad_norm=grad_norm,
                            tokens=self.tokens_seen,
                            tokens_per_s=rate,
                            seq_len=self.seq_len,
                            **self._mixture_metrics(),
                            **self._privacy_metrics(),
                        )
                        if self.privacy is not None:
                            log.info(
                                "step %d: privacy epsilon %.4g at delta %g",
                                self.step,
                                self.privacy.report()["epsilon"],
                                self.cfg.privacy.target_delta,
                            )
                    if self.step % cfg.eval_every == 0:
                        result.last_eval = self._eval_and_log()
                        evaluated_at = self.step
                    if self.step % cfg.checkpoint_every == 0:
                        result.checkpoint = self.save() or result.checkpoint
                        checkpointed_at = self.step
            if self.step > first_step:
                if evaluated_at != self.step:
                    result.last_eval = self._eval_and_log()
                if checkpointed_at != self.step:
                    result.checkpoint = self.save() or result.checkpoint
        finally:
            if self.async_writer is not None:
                self.async_writer.wait()
            self.loader.close()
            if self.metrics is not None:
                self.metrics.close()
        result.step = self.step
        result.tokens = self.tokens_seen - tokens_at_start
        result.seconds = time.perf_counter() - start
        return result

    def _mixture_metrics(self) -> dict[str, float]:
        if not isinstance(self.loader, MixtureLoader):
            return {}
        out = {
            f"w_{t}": float(w)
            for t, w in zip(self.loader.index.types, self.loader.weights, strict=True)
        }
        if self.curriculum is not None:
            out["stage"] = float(self.curriculum.stage)
        return out

    def _fit_schedule_to_budget(self, start: float, first_step: int, budget_s: float) -> None:
        """With a time budget, end the decay where the budget will end, not at max_steps:
        the horizon becomes steps so far + remaining time / measured time per step."""
        spent = time.perf_counter() - start
        per_step = spent / max(1, self.step - first_step)
        left = max(0.0, budget_s - spent)
        self.schedule.max_steps = min(self.cfg.train.max_steps, self.step + int(left / per_step))

    def _eval_and_log(self) -> EvalResult:
        ev = self.evaluate()
        if self.schedule.observe(ev.loss):
            log.info("plateau: learning rate scaled to %.3g", self.schedule.plateau_scale)
        if self.metrics is not None:
            self.metrics.log(self.step, "eval", **ev.as_dict())
        if self.parallel.is_main:
            log.info(
                "step %d: val loss %.4f, %.4f bits/byte, ppl %.2f",
                self.step,
                ev.loss,
                ev.bits_per_byte,
                ev.perplexity,
            )
        return ev

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.show_progress,
        )


def load_model(
    checkpoint: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[Transformer, RunConfig]:
    """A trained model (eval mode) and its run config from a checkpoint or run directory
    (or its ``latest`` pointer), given as ``str`` or ``Path``."""
    ckpt = load_checkpoint(checkpoint, map_location=device)
    cfg = RunConfig.model_validate(ckpt.state["config"])
    model = Transformer(cfg.model).to(device)
    unwrap(model).load_state_dict(ckpt.model_state)
    return model.eval(), cfg

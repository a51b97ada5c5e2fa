"""PPO and GRPO over the swarm, with rollouts the other peers verify.

A round of ``swarm.objective: "ppo"`` (or ``"grpo"``) on one peer:

1. ``begin_round``: with the model holding the policy the swarm agreed on (the round's
   start state), answer the prompts the swarm assigned this peer for this round
   (:func:`~swarmlm.rlhf.rollouts.assigned_prompts`) by sampling from the public random
   stream of each rollout (:mod:`swarmlm.rlhf.rollouts`); score each response with the
   agreed reward model (alone, one thread: exactly reproducible) after the safety filter;
   log-probs of the policy and of the frozen reference (the initial policy); advantages
   (PPO: KL-penalised per-token rewards and GAE with a value head on the policy; GRPO:
   the group-normalised score of ``group_size`` responses to each prompt, KL to the
   reference in the loss);
2. ``inner_steps`` clipped-surrogate minibatch steps through the trainer's AdamW: the
   pseudo-gradient the round aggregates robustly, like any other objective's;
3. the contribution carries the rollout record (prompts, responses, per-token log-probs,
   rewards, a nonce), and when the round is applied every peer recomputes a sample of every
   contributor's rollouts chosen from the decided round (:func:`check_rollout`): a mismatch
   rejects that contribution, is logged with its evidence and halves the sender's
   reputation, the same on every honest peer.

The KL coefficient is fixed (``kl_coef``): an adaptive controller's coefficient would be one
more piece of agreed state fed by unverified KL estimates.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field
from torch import Tensor, nn

from swarmlm.config import StrictModel
from swarmlm.data import Tokenizer
from swarmlm.model import Transformer
from swarmlm.rlhf.errors import RLHFError
from swarmlm.rlhf.losses import (
    gae,
    kl_penalised_rewards,
    logprobs_of,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)
from swarmlm.rlhf.modeling import HiddenStates, RewardModel, ValueHead, load_reward_model
from swarmlm.rlhf.ppo_run import scoring_ids
from swarmlm.rlhf.preferences import right_pad
from swarmlm.rlhf.prompts import read_prompts
from swarmlm.rlhf.rollouts import (
    CheckSettings,
    NonFiniteLogitsError,
    Rollout,
    RolloutRecord,
    RolloutRejectedError,
    assigned_prompts,
    check_rollout,
    sample_from_stream,
    sample_indices,
    stream_uniforms,
)
from swarmlm.rlhf.safety import SafetyConfig, SafetyFilter, build_safety_filter
from swarmlm.rlhf.swarm_objectives import (
    InitCheckpoint,
    checked_tokenizer,
    load_initial_weights,
    optimizer_step,
    prepare_from_checkpoint,
)
from swarmlm.swarm.config import SwarmConfig
from swarmlm.swarm.errors import SwarmError
from swarmlm.swarm.objective import ObjectiveContext, ObjectiveSpec, Verdict
from swarmlm.swarm.params import ParamLayout
from swarmlm.train.checkpoint import CheckpointError
from swarmlm.train.trainer import Trainer, TrainingDivergedError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Scores and checks run on one thread: reductions then do not depend on the peer's
    thread count, so a recomputed reward equals the claimed one bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class PolicySettings(StrictModel):
    """What a PPO/GRPO round does: shared by ``swarm.ppo``, ``swarm.grpo`` and the policy
    phase of the RLHF loop (``swarm.rlhf_loop.ppo`` / ``.grpo``)."""

    max_prompt_len: int = Field(default=64, ge=1, description="prompt tokens kept (the end)")
    prompts_per_round: int = Field(default=8, ge=1, description="prompts a peer answers a round")
    max_new_tokens: int = Field(default=16, ge=1, le=1024, description="response tokens")
    temperature: float = Field(default=1.0, gt=0, description="sampling and log-prob temperature")
    kl_coef: float = Field(default=0.05, ge=0, description="fixed KL coefficient to the reference")
    clip_range: float = Field(default=0.2, gt=0)
    minibatch_size: int = Field(default=8, ge=1, description="rollouts per inner step")
    missing_eos_penalty: float | None = Field(
        default=1.0, ge=0, description="subtracted from the score of a response without EOS"
    )
    filtered_score: float = Field(
        default=-1.0, description="score of a response the safety filter drops"
    )
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    eval_prompts: int = Field(
        default=16, ge=1, description="the last N prompts of the file: held out for evaluation"
    )
    verify_sample: int = Field(
        default=2, ge=0, description="rollouts of each contributor recomputed per round"
    )
    logprob_tolerance: float = Field(default=1e-3, gt=0, description="per token, nats")
    cdf_tolerance: float = Field(
        default=1e-4, gt=0, description="on cumulative probabilities when re-deriving tokens"
    )
    forged_rollouts: int = Field(
        default=0,
        ge=0,
        description="tests and benchmarks only, with swarm.attack fabricate: rollouts forged "
        "per round (0 = all)",
    )


class PolicyFiles(StrictModel):
    """Where a stand-alone PPO/GRPO swarm reads its policy, reward model and prompts (the
    RLHF loop has them in memory instead)."""

    init_checkpoint: Path = Field(description="policy to optimise; also the frozen reference")
    reward_checkpoint: Path = Field(
        description="the agreed reward model (`rlhf reward`, or a reward swarm's export)"
    )
    prompts_file: Path = Field(description="prompts: text (one a line) or JSONL with 'prompt'")
    tokenizer: Path | None = Field(default=None, description="default: the checkpoint's")


class PPOSettings(PolicySettings):
    """PPO's own settings (GAE and the value head)."""

    gamma: float = Field(default=1.0, ge=0, le=1)
    lam: float = Field(default=0.95, ge=0, le=1)
    vf_coef: float = Field(default=0.1, ge=0)
    clip_range_value: float = Field(default=0.2, gt=0)


class GRPOSettings(PolicySettings):
    """GRPO's own setting: ``group_size`` responses to each prompt."""

    group_size: int = Field(default=4, ge=2, description="responses per prompt")


class SwarmPPOConfig(PPOSettings, PolicyFiles):
    """The ``swarm.ppo`` section."""


class SwarmGRPOConfig(GRPOSettings, PolicyFiles):
    """The ``swarm.grpo`` section: ``group_size`` responses to each prompt."""


class PolicyObjective:
    """PPO or GRPO steps on rollouts of the agreed policy; see the module docstring."""

    @classmethod
    def from_files(
        cls,
        trainer: Trainer,
        cfg: SwarmPPOConfig | SwarmGRPOConfig,
        init: InitCheckpoint,
        swarm: SwarmConfig,
        algorithm: Literal["ppo", "grpo"],
    ) -> PolicyObjective:
        """A stand-alone PPO/GRPO swarm: policy, reward model and prompts from files."""
        section = f"swarm.{algorithm}"
        policy = trainer.model_core
        load_initial_weights(policy, init, f"{section}.init_checkpoint")
        tok = checked_tokenizer(init, cfg.tokenizer, policy, algorithm)
        # built before the reward model is loaded: initialisations draw from the global
        # RNG, and the value head's draw depends on what came before (seeded runs repeat)
        reference = Transformer(policy.cfg)
        try:
            rm, _ = load_reward_model(cfg.reward_checkpoint)
        except (CheckpointError, OSError, RuntimeError, KeyError) as exc:
            raise SwarmError(f"{section}.reward_checkpoint: {exc}") from exc
        if rm.backbone.cfg.vocab_size != policy.cfg.vocab_size:
            raise SwarmError(
                f"{section}.reward_checkpoint has vocab_size {rm.backbone.cfg.vocab_size}, the "
                f"policy {policy.cfg.vocab_size}: they must share a tokenizer"
            )
        rm.eval().requires_grad_(False)
        if not cfg.prompts_file.is_file():
            raise SwarmError(f"{section}.prompts_file: {cfg.prompts_file} does not exist")
        try:
            texts = read_prompts(cfg.prompts_file)
        except RLHFError as exc:
            raise SwarmError(f"{section}.prompts_file: {exc}") from exc
        where = f"{section}.prompts_file"
        return cls(trainer, cfg, tok, rm, texts, swarm, algorithm, where, reference)

    def __init__(
        self,
        trainer: Trainer,
        cfg: PPOSettings | GRPOSettings,
        tok: Tokenizer,
        rm: RewardModel,
        prompts: list[str],
        swarm: SwarmConfig,
        algorithm: Literal["ppo", "grpo"],
        where: str,
        reference: Transformer | None = None,
    ) -> None:
        """The objective over the trainer's policy as it is now (also the initial KL
        reference, unless ``reference`` is given) and reward model ``rm``, both kept by
        reference: the RLHF loop trains them in other phases and they hold the agreed
        weights whenever a round starts. ``where`` names the prompts' source in errors."""
        self.trainer = trainer
        self.cfg = cfg
        self.algorithm = algorithm
        self.seed = trainer.cfg.train.seed
        self.fabricate = swarm.attack == "fabricate"
        policy = trainer.model_core
        self.policy = policy
        self.tok = tok
        self.reference = reference if reference is not None else Transformer(policy.cfg)
        self.reference.eval().requires_grad_(False)
        self.reset_reference()
        self.rm: RewardModel = rm
        self.safety: SafetyFilter = build_safety_filter(cfg.safety)
        self.train_prompts, self.eval_prompts = self._prompts(prompts, where)
        self.value_head: ValueHead | None = None
        self._module: nn.Module = policy
        if algorithm == "ppo":
            self.hidden = HiddenStates(policy)
            self.value_head = ValueHead(policy.cfg.d_model)
            trainer.base_optimizer.add_param_group(
                {"params": list(self.value_head.parameters()), "weight_decay": 0.0}
            )
            self._module = nn.ModuleDict({"policy": policy, "value_head": self.value_head})
        self.group = cfg.group_size if isinstance(cfg, GRPOSettings) else 1
        self.settings = CheckSettings(
            cfg.temperature,
            cfg.max_new_tokens,
            self.tok.eos_id,
            cfg.logprob_tolerance,
            cfg.cdf_tolerance,
        )
        self._batch: dict[str, Tensor] | None = None
        self._record = RolloutRecord([])
        self._round = 0
        self._node = ""
        self._mb = 0
        self._metrics: dict[str, float] = {}
        self.round_stats: dict[str, float] = {}
        self.forged: list[int] = []

    def reset_reference(self) -> None:
        """The frozen KL reference becomes the policy as it is now."""
        self.reference.load_state_dict(self.policy.state_dict())

    # -- set-up --------------------------------------------------------------------------
    def _prompts(self, texts: list[str], where: str) -> tuple[list[list[int]], list[list[int]]]:
        cfg = self.cfg
        try:
            texts = self.safety.filter_prompts(texts)
        except RLHFError as exc:
            raise SwarmError(f"{where}: {exc}") from exc
        # an empty prompt becomes the BOS token; a long one keeps its end (what is answered)
        prompts = [self.tok.encode(t)[-cfg.max_prompt_len :] or [self.tok.bos_id] for t in texts]
        if len(prompts) <= cfg.eval_prompts:
            raise SwarmError(
                f"{where}: {len(prompts)} prompts after the safety filter; "
                f"eval_prompts={cfg.eval_prompts} are held out and at least one must remain"
            )
        return prompts[: -cfg.eval_prompts], prompts[-cfg.eval_prompts :]

    @property
    def module(self) -> nn.Module:
        """The agreed parameters: the policy (and, for PPO, its value head)."""
        return self._module

    @property
    def samples_per_step(self) -> int:
        return self.cfg.minibatch_size

    @property
    def rollouts_per_round(self) -> int:
        return self.cfg.prompts_per_round * self.group

    # -- the reward function, exactly reproducible ---------------------------------------
    @torch.no_grad()
    def reward(self, prompt: list[int], response: list[int]) -> float:
        """The agreed reward of one response: the reward model's normalised score of prompt
        + response (+ EOS), alone and on one thread; ``filtered_score`` when the safety
        filter drops it."""
        with one_thread():
            ids, lengths = scoring_ids([prompt], [response], self.tok.eos_id, self.tok.pad_id)
            score = float(self.rm.normalise(self.rm(ids, lengths))[0])
        if self.safety.checks:
            body = response[:-1] if response and response[-1] == self.tok.eos_id else response
            verdict = self.safety.check(
                self.tok.decode(prompt), self.tok.decode(body), item="swarm rollout"
            )
            if not verdict.ok:
                return float(self.cfg.filtered_score)
        return score

    # -- a round's rollouts -------------------------------------------------------------
    def _assigned(self, round: int, peer: str) -> list[list[int]]:
        idx = assigned_prompts(
            self.seed, round, peer, len(self.train_prompts), self.cfg.prompts_per_round
        )
        return [self.train_prompts[i] for i in idx for _ in range(self.group)]

    @torch.no_grad()
    def _sample(self, prompts: list[list[int]], round: int | str, peer: str) -> list[Rollout]:
        out = []
        for j, prompt in enumerate(prompts):
            u = stream_uniforms(self.seed, round, peer, j, self.cfg.max_new_tokens)
            try:
                response, finished = sample_from_stream(
                    self.policy,
                    prompt,
                    u,
                    temperature=self.cfg.temperature,
                    eos_id=self.tok.eos_id,
                )
            except NonFiniteLogitsError as exc:
                raise TrainingDivergedError(
                    f"round {round}: rollout {j}: the agreed policy has {exc}; stopping"
                ) from exc
            out.append(Rollout(prompt, response, finished, [], 0.0))
        return out

    def begin_round(self, round: int, node_id: str) -> None:
        """Sample, score and prepare this round's rollouts (the model holds the agreed
        policy); a fabricating attacker (tests, benchmarks) forges its claims here."""
        self._round, self._node, self._mb = round, node_id, 0
        self.policy.eval()
        rollouts = self._sample(self._assigned(round, node_id), round, node_id)
        ids, lengths = right_pad([[*r.prompt, *r.response] for r in rollouts], self.tok.pad_id)
        prompt_lengths = torch.tensor([len(r.prompt) for r in rollouts])
        pos = torch.arange(1, ids.shape[1])[None, :]
        mask = ((pos >= prompt_lengths[:, None]) & (pos < lengths[:, None])).float()
        targets = ids[:, 1:]
        with torch.no_grad():
            logits, values = self._forward(ids)
            old_lp = logprobs_of(logits, targets, self.cfg.temperature)
            ref_lp = logprobs_of(self.reference(ids[:, :-1]).logits, targets, self.cfg.temperature)
        for j, r in enumerate(rollouts):
            start = len(r.prompt) - 1
            r.logprobs = [float(x) for x in old_lp[j, start : start + len(r.response)]]
            r.reward = self.reward(r.prompt, r.response)
        if self.fabricate:
            self._forge(rollouts)
        scores = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
        finished = torch.tensor([r.finished for r in rollouts])
        if self.cfg.missing_eos_penalty is not None:
            scores = torch.where(finished, scores, scores - self.cfg.missing_eos_penalty)
        kl = ((old_lp - ref_lp) * mask).sum(1)
        batch = {"ids": ids, "mask": mask, "old_lp": old_lp, "ref_lp": ref_lp}
        if self.algorithm == "ppo":
            assert isinstance(self.cfg, PPOSettings)
            rewards, _ = kl_penalised_rewards(scores, old_lp, ref_lp, mask, self.cfg.kl_coef)
            adv, returns = gae(rewards, values, mask, self.cfg.gamma, self.cfg.lam)
            batch.update(adv=whiten(adv, mask), returns=returns, values=values)
        else:
            grouped = scores.view(-1, self.group)
            norm = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
            batch["adv"] = norm.reshape(-1)[:, None] * mask
        self._batch = batch
        self._record = RolloutRecord(rollouts, os.urandom(16).hex(), {"algorithm": self.algorithm})
        self.round_stats = {
            "reward": float(torch.tensor([r.reward for r in rollouts]).mean()),
            "kl": float(kl.mean()),
            "response_length": float(mask.sum(1).mean()),
        }

    def _forge(self, rollouts: list[Rollout]) -> None:
        """Fabricated claims: rewards inverted and inflated (what a peer steering the policy
        towards what the reward model dislikes would send), on ``forged_rollouts`` of them."""
        n = self.cfg.forged_rollouts or len(rollouts)
        self.forged = list(range(min(n, len(rollouts))))
        for j in self.forged:
            rollouts[j].reward = -3.0 * rollouts[j].reward - 1.0

    def _forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.policy(ids[:, :-1]).logits
        if self.value_head is None:
            return logits, torch.zeros(logits.shape[:2])
        return logits, self.value_head(self.hidden.take())

    def _minibatch(self) -> Tensor:
        n = self.rollouts_per_round
        per_epoch = max(1, math.ceil(n / self.cfg.minibatch_size))
        epoch, k = divmod(self._mb, per_epoch)
        g = torch.Generator().manual_seed(self.seed * 7919 + self._round * 131 + epoch)
        order = torch.randperm(n, generator=g)
        return order[k * self.cfg.minibatch_size : (k + 1) * self.cfg.minibatch_size]

    def _loss(self) -> tuple[Tensor, float]:
        if self._batch is None:
            raise SwarmError(f"{self.algorithm} objective: step() before begin_round()")
        b, mb = self._batch, self._minibatch()
        self._mb += 1
        ids, mask = b["ids"][mb], b["mask"][mb]
        logits, vpred = self._forward(ids)
        lp = logprobs_of(logits, ids[:, 1:], self.cfg.temperature)
        loss, _, _ = ppo_policy_loss(lp, b["old_lp"][mb], b["adv"][mb], mask, self.cfg.clip_range)
        if self.algorithm == "ppo":
            assert isinstance(self.cfg, PPOSettings)
            vf, _ = ppo_value_loss(
                vpred, b["values"][mb], b["returns"][mb], mask, self.cfg.clip_range_value
            )
            loss = loss + self.cfg.vf_coef * vf
        else:  # GRPO: the k3 estimator of KL(pi || ref) per token (Shao et al. 2024)
            d = b["ref_lp"][mb] - lp
            loss = loss + self.cfg.kl_coef * masked_mean(torch.exp(d) - d - 1, mask)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDivergedError(
                f"{self.algorithm} loss is {value} at step {self.trainer.step}; stopping"
            )
        return loss, value

    def step(self) -> float:
        return optimizer_step(self.trainer, self._loss)

    def gradient(self, layout: ParamLayout) -> tuple[Tensor, float]:
        raise SwarmError(f"swarm.objective {self.algorithm} needs diloco mode")

    # -- what other peers check --------------------------------------------------------
    def attachment(self) -> bytes:
        return self._record.encode()

    def verify(self, round: int, peer: str, attachment: bytes, seed: bytes) -> Verdict:
        """Check ``peer``'s record for ``round`` against the agreed policy (loaded in the
        model by the caller) and the agreed reward model."""
        try:
            record = RolloutRecord.decode(attachment)
            expected = self._assigned(round, peer)
            if len(record.rollouts) != len(expected):
                raise RolloutRejectedError(
                    f"{len(record.rollouts)} rollouts, the round asks {len(expected)}"
                )
            for j, (r, prompt) in enumerate(zip(record.rollouts, expected, strict=True)):
                if r.prompt != prompt:
                    raise RolloutRejectedError(
                        f"rollout {j}: not the prompt the swarm assigned", {"rollout": j}
                    )
            chosen = sample_indices(seed, peer, len(expected), self.cfg.verify_sample)
            for j in chosen:
                r = record.rollouts[j]
                u = stream_uniforms(self.seed, round, peer, j, self.cfg.max_new_tokens)
                check_rollout(self.policy, r, u, self.settings, self.reward, j)
        except RolloutRejectedError as exc:
            return Verdict(exc.reason, 0, exc.evidence)
        return Verdict(None, len(chosen))

    # -- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> float:
        """Mean agreed reward and KL to the reference on the held-out prompts, one fixed
        random stream per prompt (the same on every peer); the loss is minus the reward."""
        was = self.policy.training
        self.policy.eval()
        try:
            rollouts = self._sample(self.eval_prompts, "eval", "held-out")
            rewards = [self.reward(r.prompt, r.response) for r in rollouts]
            ids, lengths = right_pad([[*r.prompt, *r.response] for r in rollouts], self.tok.pad_id)
            pl = torch.tensor([len(r.prompt) for r in rollouts])
            pos = torch.arange(1, ids.shape[1])[None, :]
            mask = ((pos >= pl[:, None]) & (pos < lengths[:, None])).float()
            lp = logprobs_of(self.policy(ids[:, :-1]).logits, ids[:, 1:], self.cfg.temperature)
            ref = logprobs_of(self.reference(ids[:, :-1]).logits, ids[:, 1:], self.cfg.temperature)
            if self.value_head is not None:
                self.hidden.take()
        finally:
            self.policy.train(was)
        reward = sum(rewards) / len(rewards)
        self._metrics = {
            "loss": -reward,
            "reward": reward,
            "kl": float(((lp - ref) * mask).sum(1).mean()),
            "response_length": float(mask.sum(1).mean()),
        }
        return -reward

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def policy_state(self) -> dict[str, Any]:
        return {k: v.detach().clone() for k, v in self.policy.state_dict().items()}


# -- registration (called by swarmlm.rlhf.swarm_objectives.register) -------------------------


def _check_policy_run(name: str) -> Any:
    def check(run: Any, section: BaseModel | None) -> None:
        sw = run.swarm
        if sw.mode != "diloco" or sw.overlap:
            raise ValueError(
                f'swarm.objective "{name}" needs swarm.mode "diloco" without overlap: each '
                "round's rollouts come from the agreed policy and are checked against it"
            )
        if run.optim.name != "adamw" or run.train.grad_accum != 1:
            raise ValueError(
                f'swarm.objective "{name}" uses the trainer\'s AdamW with train.grad_accum 1 '
                f'(got optim.name "{run.optim.name}", grad_accum {run.train.grad_accum})'
            )

    return check


def _build(algorithm: Literal["ppo", "grpo"]) -> Any:
    def build(ctx: ObjectiveContext) -> PolicyObjective:
        assert isinstance(ctx.section, SwarmPPOConfig | SwarmGRPOConfig)
        return PolicyObjective.from_files(
            ctx.trainer, ctx.section, ctx.prepared, ctx.swarm, algorithm
        )

    return build


PPO = ObjectiveSpec(
    name="ppo",
    summary="PPO on verified rollouts of the agreed policy, scored by the agreed reward model",
    build=_build("ppo"),
    section=SwarmPPOConfig,
    check_run=_check_policy_run("ppo"),
    prepare=prepare_from_checkpoint,
)
GRPO = ObjectiveSpec(
    name="grpo",
    summary="GRPO (group-normalised scores, KL in the loss) on verified rollouts",
    build=_build("grpo"),
    section=SwarmGRPOConfig,
    check_run=_check_policy_run("grpo"),
    prepare=prepare_from_checkpoint,
)

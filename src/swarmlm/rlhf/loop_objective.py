"""The closed RLHF loop as one swarm objective (``swarm.objective: "rlhf_loop"``).

One swarm run, one round protocol, one agreed parameter vector for the whole loop: the
policy (the trainer's transformer), the reward model (its own transformer and head) and,
with PPO, the value head. Each round trains the part its phase names
(:mod:`swarmlm.rlhf.loop`) and leaves the others' coordinates unchanged (a zero
pseudo-gradient), so switching objective needs no new membership, no new engine and no
second round numbering: every honest peer switches at the same round because the phase
of round ``r`` follows from decided facts only.

Per phase:

* ``pretrain``: the language-model step on this peer's corpus shard; the reward model's
  transformer follows the policy's (copied after every step, so its pseudo-gradient is the
  policy's and both stay equal), so the reward model starts from the pretrained LM;
* ``collect``: at the phase's first round the agreed policy answers ``samples_per_cycle``
  prompts and the answers are written as comparison tasks (``<out_dir>/loop/tasks-*.jsonl``)
  that the node imports into its curation store; rounds idle (``idle_round_s``) until the
  decided contributions agree that ``min_labels`` new consensus pairs exist;
* ``reward``: Bradley-Terry steps on this peer's shard of the consensus preferences of its
  store replica (:class:`~swarmlm.rlhf.swarm_objectives.RewardObjective`);
* ``policy``: PPO or GRPO steps on verified rollouts scored by the agreed reward model
  (:class:`~swarmlm.rlhf.swarm_policy.PolicyObjective`); the KL reference is the policy at
  the phase's first round.

Every contribution carries a small record: this peer's count of consensus pairs and the
loop state it trained under (plus, in the policy phase, the rollout record the other peers
verify). The decided records are the facts the state machine advances on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from swarmlm.atomic import atomic_write_text
from swarmlm.data import Tokenizer, TokenizerError
from swarmlm.model import Transformer
from swarmlm.rlhf.config import SampleConfig
from swarmlm.rlhf.errors import RLHFError
from swarmlm.rlhf.loop import LoopHistory, LoopState, LoopThresholds, waiting_reason
from swarmlm.rlhf.modeling import RewardModel
from swarmlm.rlhf.preferences import write_jsonl_atomic
from swarmlm.rlhf.prompts import read_prompts
from swarmlm.rlhf.safety import build_safety_filter
from swarmlm.rlhf.sample import comparison_rows
from swarmlm.rlhf.swarm_objectives import (
    RewardObjective,
    RewardSettings,
    consensus_rows,
    load_swarm_pairs,
)
from swarmlm.rlhf.swarm_policy import GRPOSettings, PolicyObjective, PPOSettings
from swarmlm.swarm.errors import SwarmError
from swarmlm.swarm.objective import (
    LanguageModelObjective,
    ObjectiveContext,
    ObjectiveSpec,
    Verdict,
)
from swarmlm.swarm.params import ParamLayout

log = logging.getLogger(__name__)

MAGIC = b"RLHFLOOP1"
MAX_HEADER = 4096  # bytes of a record's JSON header (a label count and a loop state)


class LoopSection(LoopThresholds):
    """The ``swarm.rlhf_loop`` section. A node with ``rlhf.loop: true`` sets
    ``curation_db``, ``prompts_file`` and ``task_set`` from its own settings."""

    algorithm: Literal["grpo", "ppo"] = Field(default="grpo", description="policy phase")
    curation_db: str | None = Field(
        default=None,
        description="SQLAlchemy URL of this node's curation store replica (None: this peer "
        "claims no labels and idles in reward phases)",
    )
    task_set: str = Field(default="model-samples", description="task set of the comparisons")
    prompts_file: Path | None = Field(
        default=None, description="prompts for samples and rollouts (text lines or JSONL)"
    )
    tokenizer: Path | None = Field(default=None, description="default: data.path/tokenizer.json")
    samples_per_cycle: int = Field(
        default=8, ge=1, description="prompts answered for the annotators per cycle"
    )
    responses: int = Field(default=2, ge=2, le=8, description="answers per prompt (2: pairwise)")
    sample_max_new_tokens: int = Field(default=24, ge=1, le=1024, description="answer tokens")
    sample_temperature: float = Field(default=0.9, gt=0, description="for annotator samples")
    idle_round_s: float = Field(
        default=2.0,
        ge=0,
        le=600,
        description="how long a waiting (collect) round's local phase lasts",
    )
    reward: RewardSettings = Field(
        default_factory=lambda: RewardSettings(batch_size=8, max_len=128, val_fraction=0.2)
    )
    grpo: GRPOSettings = Field(
        default_factory=lambda: GRPOSettings(
            prompts_per_round=2, eval_prompts=4, minibatch_size=4, max_new_tokens=16
        )
    )
    ppo: PPOSettings = Field(
        default_factory=lambda: PPOSettings(
            prompts_per_round=4, eval_prompts=4, minibatch_size=4, max_new_tokens=16
        )
    )


def encode_record(header: dict[str, Any], body: bytes = b"") -> bytes:
    """``MAGIC`` + big-endian u32 header length + JSON header + the policy phase's rollouts."""
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(head)) + head + body


def decode_record(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """The header and body of a loop record; ValueError saying what is wrong."""
    if not blob.startswith(MAGIC):
        raise ValueError("not an rlhf_loop record (bad magic)")
    if len(blob) < len(MAGIC) + 4:
        raise ValueError("truncated rlhf_loop record")
    (n,) = struct.unpack(">I", blob[len(MAGIC) : len(MAGIC) + 4])
    if n > MAX_HEADER or len(blob) < len(MAGIC) + 4 + n:
        raise ValueError(f"rlhf_loop record header of {n} bytes (at most {MAX_HEADER})")
    start = len(MAGIC) + 4
    header = json.loads(blob[start : start + n])
    if not isinstance(header, dict):
        raise ValueError("rlhf_loop record header is not an object")
    labels = header.get("labels")
    if labels is not None and (
        not isinstance(labels, int) or isinstance(labels, bool) or labels < 0
    ):
        raise ValueError(f"rlhf_loop record: labels {labels!r} is not a count")
    LoopState.from_claim(header.get("state") or {})
    return header, bytes(blob[start + n :])


class LoopObjective:
    """See the module docstring. Implements the swarm's ``Objective`` and
    ``VerifiedObjective`` protocols."""

    def __init__(self, ctx: ObjectiveContext) -> None:
        cfg = ctx.section
        assert isinstance(cfg, LoopSection)
        tr = ctx.trainer
        self.cfg = cfg
        self.trainer = tr
        self.shard, self.shards, self.node_id = ctx.shard, ctx.shards, ctx.node_id
        self.inner_steps = max(1, ctx.swarm.inner_steps)
        # preference pairs are few: they are cut into one share per expected peer (the
        # corpus' data_shards, 64 by default, would leave most peers without a pair)
        self.pair_shards = max(1, min(ctx.shards, ctx.swarm.expect_peers))
        self.lm = LanguageModelObjective(tr)
        policy = tr.model_core
        self.policy_model = policy
        tok = self._tokenizer(Path(tr.cfg.data.path))
        if cfg.prompts_file is None or not cfg.prompts_file.is_file():
            raise SwarmError(
                f"swarm.rlhf_loop.prompts_file: {cfg.prompts_file} does not exist (the node "
                "sets it from rlhf.prompts)"
            )
        try:
            self.prompts = read_prompts(cfg.prompts_file)
        except RLHFError as exc:
            raise SwarmError(f"swarm.rlhf_loop.prompts_file: {exc}") from exc
        self.tok = tok
        # the reward model's transformer starts equal to the policy (the same seeded
        # initialisation on every peer) and follows it through pretraining
        backbone = Transformer(policy.cfg)
        backbone.load_state_dict(policy.state_dict())
        self.rm = RewardModel(backbone)
        self.reward = RewardObjective.around(tr, cfg.reward, self.rm, tok)
        tr.base_optimizer.add_param_group({"params": list(backbone.parameters())})
        settings = cfg.grpo if cfg.algorithm == "grpo" else cfg.ppo
        self.policy = PolicyObjective(
            tr,
            settings,
            tok,
            self.rm,
            self.prompts,
            ctx.swarm,
            cfg.algorithm,
            "swarm.rlhf_loop.prompts_file",
        )
        parts: dict[str, nn.Module] = {"policy": policy, "reward": self.rm}
        if self.policy.value_head is not None:
            parts["value_head"] = self.policy.value_head
        self._module = nn.ModuleDict(parts)
        self.dir = Path(tr.cfg.train.out_dir) / "loop"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.history = LoopHistory(self.dir / "state.json", cfg)
        self._claimed_states: dict[int, list[LoopState]] = {}
        self._running: tuple[int, LoopState] | None = None
        self._metrics: dict[str, float] = {}
        self._said: str | None = None
        self.tasks_written = 0

    def _tokenizer(self, data_path: Path) -> Tokenizer:
        path = self.cfg.tokenizer or data_path / "tokenizer.json"
        try:
            tok = Tokenizer.load(path)
        except (TokenizerError, OSError) as exc:
            field = "swarm.rlhf_loop.tokenizer" if self.cfg.tokenizer else "data.path"
            raise SwarmError(f"{field}: no usable tokenizer at {path}: {exc}") from exc
        if tok.vocab_size > self.policy_model.cfg.vocab_size:
            raise SwarmError(
                f"tokenizer {path} has {tok.vocab_size} tokens, model.vocab_size is "
                f"{self.policy_model.cfg.vocab_size}"
            )
        return tok

    # -- the objective protocol -----------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The agreed parameters: policy, reward model (and PPO's value head)."""
        return self._module

    @property
    def samples_per_step(self) -> int:
        return self.lm.samples_per_step

    @property
    def phase(self) -> LoopState:
        """The state the running (or next) round trains under."""
        if self._running is not None:
            return self._running[1]
        return self.history.state_after(max(self.history.states))

    def begin_round(self, round: int, node_id: str) -> None:
        """Advance the loop over the decided rounds, then prepare this round's phase (the
        model holds the agreed parameters of the round's start)."""
        state = self._state_before(round)
        self._running = (round, state)
        self.history.save()
        self._write_status(round, state)
        reason = waiting_reason(state, self.cfg)
        if reason is not None and reason != self._said:
            log.warning("rlhf loop, round %d: %s", round, reason)
        self._said = reason
        if state.phase == "collect" and round == state.since:
            self._sample_for_annotators(round, state)
        elif state.phase == "reward" and (round == state.since or self.reward.train is None):
            self._load_preferences(state)
        elif state.phase == "policy":
            if round == state.since:
                self.policy.reset_reference()
            self.policy.begin_round(round, node_id)

    def step(self) -> float:
        assert self._running is not None, "begin_round first"
        phase = self._running[1].phase
        if phase == "pretrain":
            loss = self.lm.step()
            with torch.no_grad():
                self.rm.backbone.load_state_dict(self.policy_model.state_dict())
            return loss
        if phase == "policy":
            return self.policy.step()
        if phase == "reward" and self.reward.train is not None:
            return self.reward.step()
        # waiting (collect), or no preferences on this peer: an idle step (zero update),
        # paced so waiting rounds do not spin the protocol
        time.sleep(self.cfg.idle_round_s / self.inner_steps)
        return 0.0

    def gradient(self, layout: ParamLayout) -> tuple[Tensor, float]:
        raise SwarmError('swarm.objective "rlhf_loop" needs swarm.mode "diloco"')

    def attachment(self) -> bytes:
        assert self._running is not None, "begin_round first"
        state = self._running[1]
        body = self.policy.attachment() if state.phase == "policy" else b""
        return encode_record({"labels": self.label_count(), "state": state.claim()}, body)

    def verify(self, round: int, peer: str, attachment: bytes, seed: bytes) -> Verdict:
        """Record the peer's label claim (a fact of the round) and, in the policy phase,
        check its rollouts. A record that does not parse, or trains another phase than the
        one the decided rounds give, is rejected."""
        try:
            header, body = decode_record(attachment)
        except (ValueError, UnicodeDecodeError) as exc:
            return Verdict(f"malformed rlhf_loop record: {exc}")
        claimed = LoopState.from_claim(header["state"])
        self.history.record(round, header.get("labels"))
        self._claimed_states.setdefault(round, []).append(claimed)
        state = self._state_before(round)
        if (claimed.phase, claimed.since) != (state.phase, state.since):
            return Verdict(
                f"rlhf_loop record of round {round} trains phase {claimed.phase} (since round "
                f"{claimed.since}); the decided rounds give {state.phase} since {state.since}"
            )
        if state.phase == "policy":
            return self.policy.verify(round, peer, body, seed)
        return Verdict(None)

    def _state_before(self, round: int) -> LoopState:
        """The state after round ``round - 1``: what round ``round`` trains. A peer that
        does not know it (joined or resynchronised mid-loop) takes the one most of the
        round's decided records checked so far claim: at the first check, that record's
        (docs/rlhf.md says what that risks)."""
        prev = round - 1
        if prev not in self.history.states and round in self._claimed_states:
            votes = Counter(
                json.dumps(s.claim(), sort_keys=True) for s in self._claimed_states[round]
            )
            top = max(sorted(votes), key=lambda k: votes[k])
            self.history.adopt(LoopState.from_claim(json.loads(top)))
        for old in [r for r in self._claimed_states if r < round - 8]:
            del self._claimed_states[old]
        return self.history.state_after(prev)

    def evaluate(self, max_batches: int | None = None) -> float:
        state = self.phase
        if state.phase == "policy":
            loss = self.policy.evaluate(max_batches)
            metrics = self.policy.metrics
        elif state.phase == "reward" and self.reward.held_out is not None:
            loss = self.reward.evaluate(max_batches)
            metrics = {f"rm_{k}": v for k, v in self.reward.metrics.items()}
            metrics["loss"] = loss
        else:
            loss = self.lm.evaluate(max_batches)
            metrics = self.lm.metrics
        self._metrics = {**metrics, "cycle": float(state.cycle)}
        point = {"round": state.round, "phase": state.phase, "cycle": state.cycle, **metrics}
        with (self.dir / "curve.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(point) + "\n")
        return loss

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    # -- the loop's own work --------------------------------------------------------------
    def label_count(self) -> int | None:
        """Consensus preference pairs in this node's replica (None: no store here)."""
        if self.cfg.curation_db is None:
            return None
        try:
            return len(consensus_rows(self.cfg.curation_db, self.cfg.task_set, "swarm.rlhf_loop"))
        except SwarmError as exc:
            log.warning("rlhf loop: cannot count consensus labels: %s", exc)
            return None

    def _load_preferences(self, state: LoopState) -> None:
        """This cycle's reward data: the consensus pairs of the store replica."""
        if self.cfg.curation_db is None:
            log.warning("rlhf loop: no curation store on this peer; idle in the reward phase")
            return
        rows = consensus_rows(self.cfg.curation_db, self.cfg.task_set, "swarm.rlhf_loop")
        path = self.dir / f"preferences-cycle{state.cycle:04d}.jsonl"
        write_jsonl_atomic(rows, path)
        try:
            train, held_out = load_swarm_pairs(
                path,
                None,
                self.cfg.reward,
                self.tok,
                self.trainer.cfg.train.seed,
                "swarm.rlhf_loop.reward",
            )
            k = self.pair_shards
            self.reward.set_pairs(train, held_out, self.shard % k, k)
        except SwarmError as exc:
            self.reward.train = self.reward.held_out = None
            log.warning("rlhf loop: reward phase idles on this peer: %s", exc)

    def _sample_for_annotators(self, round: int, state: LoopState) -> None:
        """The agreed policy's answers to this cycle's prompts, written as comparison tasks
        for the node to import (``tasks-r<round>.jsonl``)."""
        n = len(self.prompts)
        # every full node samples at this round from the same agreed policy: a prompt offset
        # and a seed of their own give the annotators different tasks from each node
        own = int.from_bytes(hashlib.sha256(f"{round}/{self.node_id}".encode()).digest()[:4])
        start = (state.cycle * self.cfg.samples_per_cycle + self.shard) % n
        chosen = (self.prompts * 2)[start : start + min(self.cfg.samples_per_cycle, n)]
        sample = SampleConfig(
            checkpoint=Path(self.trainer.cfg.train.out_dir),  # unused: the model is in memory
            prompts_file=self.cfg.prompts_file or Path(),
            out_file=self.dir / f"tasks-r{round:06d}.jsonl",
            responses=self.cfg.responses,
            max_new_tokens=self.cfg.sample_max_new_tokens,
            temperature=self.cfg.sample_temperature,
            seed=own,
        )
        was = self.policy_model.training
        self.policy_model.eval()
        try:
            with torch.random.fork_rng():  # the trainer's RNG stream stays as it was
                torch.manual_seed(own)
                rows, dropped = comparison_rows(
                    self.policy_model, self.tok, chosen, sample, build_safety_filter(sample.safety)
                )
        finally:
            self.policy_model.train(was)
        write_jsonl_atomic(rows, sample.out_file)
        self.tasks_written += len(rows)
        log.info(
            "rlhf loop, round %d: %d comparison tasks for the annotators (%d prompts dropped)",
            round,
            len(rows),
            dropped,
        )

    def _write_status(self, round: int, state: LoopState) -> None:
        """What the node shows on its dashboard (read by ``swarmlm.node.rlhf_loop``)."""
        status = {
            "round": round,
            **state.claim(),
            "algorithm": self.cfg.algorithm,
            "min_labels": self.cfg.min_labels,
            "waiting": waiting_reason(state, self.cfg),
            "thresholds": LoopThresholds.model_validate(
                self.cfg.model_dump(include=set(LoopThresholds.model_fields))
            ).model_dump(),
            "time": time.time(),
        }
        atomic_write_text(self.dir / "status.json", json.dumps(status) + "\n")


# -- registration ---------------------------------------------------------------------------


def _check_loop_run(run: Any, section: Any) -> None:
    sw = run.swarm
    if sw.mode != "diloco" or sw.overlap:
        raise ValueError(
            'swarm.objective "rlhf_loop" needs swarm.mode "diloco" without overlap: policy '
            "rounds' rollouts come from the agreed policy and are checked against it"
        )
    if run.optim.name != "adamw" or run.train.grad_accum != 1:
        raise ValueError(
            'swarm.objective "rlhf_loop" uses the trainer\'s AdamW with train.grad_accum 1'
        )


LOOP = ObjectiveSpec(
    name="rlhf_loop",
    summary="the closed RLHF loop: pretraining, samples for annotators, reward model, PPO/GRPO",
    build=LoopObjective,
    section=LoopSection,
    check_run=_check_loop_run,
)

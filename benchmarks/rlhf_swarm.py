"""RLHF over the swarm (issue #20) against the single-node pipeline, on the synthetic
true-reward task of ``benchmarks/rlhf.py``: the true reward of a response is its lexicon
sentiment score (``swarmlm.rlhf.lexicon``), annotators are simulated judges of it.

What runs, at the same total data and rollouts on both sides (one process, one torch thread):

1. a small base LM trained on KJV verses (cached in ``results/rlhf_swarm_cache/``);
2. preference data: ``responses`` samples of the base model to each verse opening, every
   pair judged by 3 simulated annotators (A, B or tie: a tie when the true rewards are
   equal, else Bradley-Terry on the true reward at temperature 0.05; 10 % lapses), pairs
   with a 2-of-3 majority for A or B kept (ties carry no preference, as the platform's
   pairwise consensus); held-out pairs are the truth-ordered pairs of other prompts;
3. reward model: ``swarmlm rlhf reward`` (``train_reward_model``, single node, one epoch)
   against the ``reward`` objective on 4 simulated peers (``LocalSwarm``: real workers, round
   engine, robust aggregation; the round protocol is the in-process fake), each peer passing
   ``rm_swarm_epochs`` (4) times over its quarter of the same pairs: the single node's number
   of sequential steps (one pass each left the swarm at 0.53-0.58 against 0.73-0.76);
4. PPO: ``PPOTrainer`` (the single-node pipeline's, fixed KL coefficient) against the
   ``ppo`` objective on 4 peers, both against the single-node reward model, 64 rollouts per
   step/round (16 per peer: with 4 per peer, AdamW minibatches of 2 rollouts were noise and
   the swarm gained nothing at any KL, BENCHMARKS.md); GRPO: the ``grpo`` objective on 4
   peers against the same objective on one peer (no single-node GRPO pipeline exists), 64
   rollouts per round. Single node and swarm
   run in alternating blocks of ``block`` steps/rounds in this process, so their wall times
   (medians over blocks) see the same machine load;
5. Byzantine: 5 PPO peers, clean, against 4 honest + 1 fabricating peer that forges
   ``forged`` of its rollouts each round (inverted rewards) while ``verify_sample`` are
   recomputed: its contributions are rejected when a forged rollout is drawn;
6. evaluation: true reward and KL to the reference on held-out prompts (2 samples each,
   ``evaluate_policy`` of ``benchmarks/rlhf.py``) every ``block`` steps; gains compared at
   matched KL (each curve piecewise linear, read at the smaller of the two final KLs).

7. the closed loop in the node (issue #20 item 4): ``swarmlm node`` with ``rlhf.loop`` as a
   real process (a tiny model on this corpus, ``LOOP_THRESHOLDS``) while 3 simulated
   annotators label its comparison tasks over the HTTP API by the true reward (ties to the
   longer answer); ``loop_cycles_completed`` counts its full cycles (samples -> consensus
   labels -> reward-model rounds -> GRPO rounds) in the time allowed (300 s a cycle asked:
   2 quick, 3 full). ``--loop-only`` runs just this stage.

    python benchmarks/rlhf_swarm.py --quick     # one seed, ~10-15 min on 2 loaded cores
    python benchmarks/rlhf_swarm.py             # 3 seeds, larger base LM, longer PPO

Last stdout line: one JSON object with the issue's keys.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import logging
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, emit_headline, stderr_console, write_json
from rlhf import LEX, evaluate_policy, interpolate_gain, verse_openings
from swarmlm.data import Tokenizer
from swarmlm.model import Transformer
from swarmlm.model.generate import GenerationConfig, generate
from swarmlm.rlhf.preferences import PreferencePair, write_preferences

ROOT = Path(__file__).resolve().parents[1]
KJV = ROOT / "data" / "kjv.txt.gz"
CACHE = RESULTS_DIR / "rlhf_swarm_cache"
log = logging.getLogger("bench.rlhf_swarm")


def sizes(quick: bool) -> dict[str, Any]:
    return {
        "base_steps": 600 if quick else 1500,
        "pref_prompts": 1500 if quick else 3000,
        "responses": 4,
        "held_out_prompts": 300 if quick else 600,
        "policy_prompts": 400,
        "eval_prompts": 128 if quick else 256,
        "max_new_tokens": 12,
        "rm_batch": 16,
        "rm_swarm_epochs": 4,
        "policy_rounds": 32 if quick else 80,
        "rollouts": 64,
        "block": 4,
        "seeds": 1 if quick else 3,
        "peers": 4,
        "verify_sample": 2,
        "forged": 1,
    }


# -- 1. base model ----------------------------------------------------------------------------


def smoke_sizes() -> dict[str, Any]:
    """``--smoke``: every code path at toy sizes (seconds; the numbers mean nothing)."""
    return {
        **sizes(True),
        "base_steps": 20,
        "pref_prompts": 40,
        "held_out_prompts": 20,
        "policy_prompts": 40,
        "eval_prompts": 12,
        "policy_rounds": 4,
        "block": 2,
    }


def base_model(steps: int) -> Path:
    from swarmlm.data import prepare_corpus
    from swarmlm.train import RunConfig
    from swarmlm.train.trainer import Trainer

    run_dir = CACHE / f"base-{steps}"
    data_dir = CACHE / "data"
    if (run_dir / "checkpoints" / "latest").exists():
        return run_dir
    if not (data_dir / "meta.json").exists():
        lines = gzip.decompress(KJV.read_bytes()).decode("utf-8").splitlines()
        CACHE.mkdir(parents=True, exist_ok=True)
        text = CACHE / "kjv-verses.txt"
        text.write_text("\n".join(v.split(" ", 1)[1] for v in lines if " " in v) + "\n")
        prepare_corpus([text], data_dir, vocab_size=512, val_fraction=0.01, seed=0)
    cfg = RunConfig.model_validate(
        {
            "model": {
                "vocab_size": 512,
                "d_model": 96,
                "n_layers": 3,
                "n_heads": 4,
                "n_kv_heads": 2,
                "max_seq_len": 96,
            },
            "data": {"path": str(data_dir), "batch_size": 32, "seq_len": 64},
            "optim": {"lr": 3e-3, "weight_decay": 0.1},
            "schedule": {"kind": "cosine", "warmup_steps": 30},
            "train": {
                "max_steps": steps,
                "eval_every": steps,
                "eval_batches": 4,
                "checkpoint_every": steps,
                "out_dir": str(run_dir),
                "threads": 1,
                "log_every": 100,
            },
        }
    )
    Trainer(cfg, console=stderr_console).fit()
    return run_dir


# -- 2. preference data -----------------------------------------------------------------------


@torch.no_grad()
def sample_responses(
    model: Transformer, tok: Tokenizer, prompts: list[str], n: int, max_new: int, seed: int
) -> list[list[str]]:
    torch.manual_seed(seed)
    out: list[list[str]] = []
    for i in range(0, len(prompts), 32):
        chunk = prompts[i : i + 32]
        enc = [tok.encode(p) for p in chunk for _ in range(n)]
        gen = generate(
            model,
            enc,
            GenerationConfig(
                max_new_tokens=max_new,
                do_sample=True,
                temperature=1.0,
                stop_tokens=[tok.eos_id],
                pad_token_id=tok.pad_id,
            ),
        )
        texts = [tok.decode(s).strip() for s in gen.sequences]
        out += [texts[j * n : (j + 1) * n] for j in range(len(chunk))]
    return out


def judge(a: str, b: str, rng: random.Random) -> bool | None:
    """The simulated annotator's pairwise label: True for ``a``, False for ``b``, None for a
    tie (the platform's pairwise schema offers one; a tie carries no preference). Equal true
    rewards are judged ties; otherwise Bradley-Terry on the true reward at temperature 0.05.
    10 % lapses pick at random among A, B and tie."""
    if rng.random() < 0.10:
        return rng.choice([True, False, None])
    sa, sb = LEX.score(a), LEX.score(b)
    if sa == sb:
        return None
    d = (sa - sb) / 0.05
    return rng.random() < 1 / (1 + math.exp(-max(-50.0, min(50.0, d))))


def preference_pairs(
    prompts: list[str], responses: list[list[str]], seed: int
) -> list[PreferencePair]:
    rng = random.Random(seed)
    pairs = []
    for p, rs in zip(prompts, responses, strict=True):
        for a, b in itertools.combinations(rs, 2):
            if not a or not b or a == b:
                continue
            votes = [judge(a, b, rng) for _ in range(3)]  # consensus: a strict majority
            if votes.count(True) >= 2:
                pairs.append(PreferencePair(p, a, b))
            elif votes.count(False) >= 2:
                pairs.append(PreferencePair(p, b, a))
    return pairs


def truth_pairs(prompts: list[str], responses: list[list[str]]) -> list[PreferencePair]:
    out = []
    for p, rs in zip(prompts, responses, strict=True):
        for a, b in itertools.combinations(rs, 2):
            sa, sb = LEX.score(a), LEX.score(b)
            if a and b and sa != sb:
                out.append(PreferencePair(p, a, b) if sa > sb else PreferencePair(p, b, a))
    return out


# -- 3. reward models -------------------------------------------------------------------------


def swarm_run_config(data_dir: Path, out: Path, swarm: dict[str, Any], lr: float) -> Any:
    from swarmlm.swarm.config import SwarmRunConfig

    return SwarmRunConfig.model_validate(
        {
            "data": {"path": str(data_dir), "batch_size": 4, "seq_len": 32, "prefetch": 1},
            "optim": {"lr": lr, "weight_decay": 0.0, "betas": [0.9, 0.95]},
            "schedule": {"kind": "constant", "warmup_steps": 0},
            "train": {"out_dir": str(out), "seed": 0, "threads": 1, "grad_clip": 1.0},
            # round_pace "steps": every peer takes its inner steps. The default ("samples")
            # trains for a wall-clock budget from the last round's measured rates, so under
            # load the swarm side took fewer steps than planned and runs stopped repeating
            "swarm": {"mode": "diloco", "codec": "int8", "round_pace": "steps", **swarm},
        }
    )


def single_reward_model(
    base: Path, train: Path, held: Path, out: Path, s: dict[str, Any], seed: int
) -> tuple[Path, dict[str, float]]:
    from swarmlm.rlhf.config import RewardRunConfig
    from swarmlm.rlhf.reward import train_reward_model

    cfg = RewardRunConfig.model_validate(
        {
            "init_checkpoint": str(base),
            "train_file": str(train),
            "eval_file": str(held),
            "out_dir": str(out),
            "batch_size": s["rm_batch"],
            "epochs": 1,
            "seed": seed,
            "threads": 1,
            "max_len": 64,
            "optim": {"lr": 5e-4, "weight_decay": 0.0, "betas": [0.9, 0.95]},
            "reward": {"head_init_std": 0.02},
            "checkpoint_every": 100000,
        }
    )
    res = train_reward_model(cfg, show_progress=False)
    from swarmlm.rlhf.losses import preference_calibration_error  # noqa: F401

    assert res.checkpoint is not None
    return Path(res.checkpoint), dict(res.eval)


def swarm_reward_model(
    base: Path,
    train: Path,
    held: Path,
    data_dir: Path,
    work: Path,
    n_pairs: int,
    s: dict[str, Any],
    seed: int,
    lr: float,
) -> dict[str, float]:
    from swarmlm.swarm.simulate import LocalSwarm
    from swarmlm.swarm.worker import SwarmWorker

    peers = s["peers"]
    # one pass over its shard takes a peer a quarter of the single node's sequential steps,
    # and averaging 4 such displacements moves the reward model about as far as one of them
    # (seed 0: 0.534, a single node on a quarter of the pairs 0.546): each peer passes over
    # its shard rm_swarm_epochs times (default: peers), the single node's step count
    epochs = s["rm_swarm_epochs"]
    steps_per_pass = max(1, math.ceil(n_pairs / peers / s["rm_batch"]))
    rounds = 4 * epochs
    inner = max(1, math.ceil(steps_per_pass / 4))
    workers = []
    for i in range(peers):
        cfg = swarm_run_config(
            data_dir,
            work / f"rm-peer{i}",
            {
                "objective": "reward",
                "reward": {
                    "init_checkpoint": str(base),
                    "preferences": str(train),
                    "eval_file": str(held),
                    "batch_size": s["rm_batch"],
                    "max_len": 64,
                    "reward": {"head_init_std": 0.02},
                },
                "rounds": rounds,
                "inner_steps": inner,
                "data_shards": peers,
                "data_shard": i,
                "outer_lr": 1.0,
                "outer_momentum": 0.0,
            },
            lr,
        )
        workers.append(SwarmWorker(cfg, f"{i:064x}", out_dir=work / f"rm-peer{i}"))
    swarm = LocalSwarm(workers)
    try:
        for r in range(1, rounds + 1):
            swarm.run_round(r)
        workers[0].evaluate()
        return dict(workers[0].eval_metrics)
    finally:
        swarm.close()


# -- 4./5. policies ---------------------------------------------------------------------------


class Curve:
    """True reward gain and KL after each block of steps."""

    def __init__(self, name: str, base_reward: float) -> None:
        self.name = name
        self.base = base_reward
        self.points: list[dict[str, Any]] = [{"step": 0, "kl": 0.0, "true_reward_gain": 0.0}]
        self.block_seconds: list[float] = []

    def add(self, step: int, ev: dict[str, Any]) -> None:
        self.points.append(
            {"step": step, "kl": ev["kl"], "true_reward_gain": ev["true_reward"] - self.base}
        )

    @property
    def final(self) -> dict[str, Any]:
        return self.points[-1]


def gain_ratio(a: Curve, b: Curve) -> dict[str, Any]:
    """``a`` over ``b`` at matched KL: both read at the smaller of their final KLs."""
    kl = min(max(p["kl"] for p in a.points), max(p["kl"] for p in b.points))
    ga, gb = interpolate_gain(a.points, kl), interpolate_gain(b.points, kl)
    ratio = ga / gb if ga is not None and gb not in (None, 0.0) else None
    return {"kl": kl, "gain_a": ga, "gain_b": gb, "ratio": ratio}


class SinglePPO:
    def __init__(
        self,
        base: Path,
        rm_path: Path,
        prompts: list[list[int]],
        s: dict[str, Any],
        seed: int,
        lr: float,
        kl_coef: float,
    ) -> None:
        from swarmlm.rlhf.config import PPOConfig
        from swarmlm.rlhf.modeling import load_language_model, load_reward_model, tokenizer_for
        from swarmlm.rlhf.ppo import PPOTrainer
        from swarmlm.rlhf.ppo_run import reward_model_fn
        from swarmlm.train.config import OptimConfig

        torch.manual_seed(seed)
        self.policy, ckpt = load_language_model(base)
        reference, _ = load_language_model(base)
        rm, _ = load_reward_model(rm_path)
        rm.eval().requires_grad_(False)
        self.tok = tokenizer_for(ckpt)
        self.prompts, self.seed, self.s = prompts, seed, s
        self.trainer = PPOTrainer(
            self.policy,
            reference,
            reward_model_fn(rm, self.tok),
            PPOConfig(
                rollout_batch_size=s["rollouts"],
                minibatch_size=max(1, s["rollouts"] // 2),  # 2 epochs x 2: 4 AdamW steps
                ppo_epochs=2,
                max_new_tokens=s["max_new_tokens"],
                kl_controller="fixed",
                init_kl_coef=kl_coef,
            ),
            eos_id=self.tok.eos_id,
            pad_id=self.tok.pad_id,
            optim=OptimConfig(lr=lr, weight_decay=0.0, betas=(0.9, 0.95)),
        )
        self.step_no = 0

    def step(self) -> None:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.step_no)
        idx = torch.randperm(len(self.prompts), generator=g)[: self.s["rollouts"]]
        self.trainer.step([self.prompts[int(i)] for i in idx])
        self.step_no += 1


class SwarmPolicy:
    """``peers`` simulated peers running the ppo/grpo objective; ``rollouts`` per round."""

    def __init__(
        self,
        algo: str,
        base: Path,
        rm_path: Path,
        prompts_file: Path,
        data_dir: Path,
        work: Path,
        s: dict[str, Any],
        seed: int,
        lr: float,
        kl_coef: float,
        peers: int,
        attackers: int = 0,
    ) -> None:
        from swarmlm.swarm.simulate import LocalSwarm
        from swarmlm.swarm.worker import SwarmWorker

        if peers > 1:
            lr = lr * s.get("swarm_lr_scale", 1.0)
        group = 4 if algo == "grpo" else 1
        per_peer = max(1, s["rollouts"] // peers // group)
        section: dict[str, Any] = {
            "init_checkpoint": str(base),
            "reward_checkpoint": str(rm_path),
            "prompts_file": str(prompts_file),
            "prompts_per_round": per_peer,
            "minibatch_size": per_peer * group,
            "max_new_tokens": s["max_new_tokens"],
            "kl_coef": kl_coef,
            "eval_prompts": 8,
            "verify_sample": s["verify_sample"],
            "forged_rollouts": s["forged"],
            "safety": {"enabled": False},
        }
        if algo == "grpo":
            section["group_size"] = group
        workers = []
        for i in range(peers):
            sw = {
                "objective": algo,
                algo: section,
                "rounds": 10_000,
                "inner_steps": 2 * 2,  # 2 epochs x 2 minibatches, as the single node's PPO
                "outer_lr": 1.0,
                "outer_momentum": 0.0,
                "data_shards": peers,
                "data_shard": i,
                "attack": "fabricate" if i >= peers - attackers else "none",
            }
            if algo == "grpo" or per_peer * group < 8:
                section["minibatch_size"] = max(1, per_peer * group // 2)
            cfg = swarm_run_config(data_dir, work / f"{algo}-peer{i}", sw, lr)
            cfg.train.seed = seed
            workers.append(SwarmWorker(cfg, f"{seed:08x}{i:056x}", out_dir=work / f"{algo}{i}"))
        self.swarm = LocalSwarm(workers)
        self.workers = workers
        self.liars = {w.node_id for w in workers[peers - attackers :]}
        self.round = 0
        self.forged_sent = 0
        self.forged_accepted = 0
        self.rejections = 0

    @property
    def policy(self) -> Transformer:
        return self.workers[0].objective.policy  # type: ignore[attr-defined, no-any-return]

    def step(self) -> None:
        self.round += 1
        reports = self.swarm.run_round(self.round)
        rep = reports[self.workers[0].node_id]
        for liar in self.liars:
            forged = len(self.swarm.workers[liar].objective.forged)  # type: ignore[attr-defined]
            self.forged_sent += forged
            if liar in rep.accepted:
                self.forged_accepted += forged
            if liar in rep.rejected:
                self.rejections += 1

    def close(self) -> None:
        self.swarm.close()


def run_pair(
    name: str,
    a: Any,
    b: Any,
    ref: Transformer,
    tok: Tokenizer,
    eval_prompts: list[str],
    s: dict[str, Any],
    base_reward: float,
    seed: int,
) -> tuple[Curve, Curve]:
    """Alternate blocks of ``block`` steps of ``a`` and ``b``; evaluate after each block."""
    ca, cb = Curve(f"{name}:a", base_reward), Curve(f"{name}:b", base_reward)
    blocks = s["policy_rounds"] // s["block"]
    for k in range(blocks):
        for side, curve in ((a, ca), (b, cb)):
            t0 = time.perf_counter()
            for _ in range(s["block"]):
                side.step()
            curve.block_seconds.append(time.perf_counter() - t0)
            ev = evaluate_policy(side.policy, ref, tok, eval_prompts, s["max_new_tokens"], seed)
            curve.add((k + 1) * s["block"], ev)
        stderr_console.print(
            f"{name} block {k + 1}/{blocks}: a gain {ca.final['true_reward_gain']:+.4f} "
            f"kl {ca.final['kl']:.2f} ({ca.block_seconds[-1]:.1f}s) | b gain "
            f"{cb.final['true_reward_gain']:+.4f} kl {cb.final['kl']:.2f} "
            f"({cb.block_seconds[-1]:.1f}s)"
        )
    return ca, cb


# -- main -------------------------------------------------------------------------------------


def one_seed(
    seed: int,
    s: dict[str, Any],
    base: Path,
    data_dir: Path,
    work: Path,
    lr: float,
    kl_coef: float,
    scale: float = 1.0,
) -> dict[str, Any]:
    from swarmlm.rlhf.modeling import load_language_model, tokenizer_for

    t0 = time.perf_counter()
    base_lm, ckpt = load_language_model(base)
    tok = tokenizer_for(ckpt)
    n_pref, n_held = s["pref_prompts"], s["held_out_prompts"]
    openings = verse_openings(n_pref + n_held + s["policy_prompts"] + s["eval_prompts"], seed)
    pref_p, held_p = openings[:n_pref], openings[n_pref : n_pref + n_held]
    pol_p = openings[n_pref + n_held : n_pref + n_held + s["policy_prompts"]]
    eval_p = openings[-s["eval_prompts"] :]
    responses = sample_responses(base_lm, tok, pref_p + held_p, s["responses"], 16, seed)
    train_pairs = preference_pairs(pref_p, responses[:n_pref], seed)
    held_pairs = truth_pairs(held_p, responses[n_pref:])
    train_file = work / "train.jsonl"
    held_file = work / "held.jsonl"
    write_preferences(train_pairs, train_file)
    write_preferences(held_pairs, held_file)
    stderr_console.print(f"seed {seed}: {len(train_pairs)} training pairs, {len(held_pairs)} held")

    rm_path, rm_single = single_reward_model(base, train_file, held_file, work / "rm", s, seed)
    rm_swarm = swarm_reward_model(
        base, train_file, held_file, data_dir, work, len(train_pairs), s, seed, 5e-4 * scale
    )
    stderr_console.print(f"reward model: single {rm_single} | swarm {rm_swarm}")

    prompts_file = work / "policy-prompts.txt"
    prompts_file.write_text("\n".join(pol_p + eval_p[:8]) + "\n")
    pol_ids = [tok.encode(p)[-64:] or [tok.bos_id] for p in pol_p]
    ref, _ = load_language_model(base)
    base_eval = evaluate_policy(base_lm, ref, tok, eval_p, s["max_new_tokens"], seed)
    base_reward = base_eval["true_reward"]

    def side(algo: str, name: str, peers: int, attackers: int = 0) -> SwarmPolicy:
        return SwarmPolicy(
            algo,
            base,
            rm_path,
            prompts_file,
            data_dir,
            work / name,
            s,
            seed,
            lr,
            kl_coef,
            peers,
            attackers=attackers,
        )

    single = SinglePPO(base, rm_path, pol_ids, s, seed, lr, kl_coef)
    swarm_ppo = side("ppo", "ppo", s["peers"])
    c_single, c_swarm = run_pair(
        "ppo single|swarm", single, swarm_ppo, ref, tok, eval_p, s, base_reward, seed
    )
    swarm_ppo.close()
    grpo_one, grpo_swarm = side("grpo", "grpo1", 1), side("grpo", "grpo4", s["peers"])
    c_grpo_one, c_grpo_swarm = run_pair(
        "grpo one|swarm", grpo_one, grpo_swarm, ref, tok, eval_p, s, base_reward, seed
    )
    grpo_one.close()
    grpo_swarm.close()
    clean, byz = side("ppo", "clean", 5), side("ppo", "byz", 5, attackers=1)
    c_clean, c_byz = run_pair(
        "ppo 5 clean|1 liar", clean, byz, ref, tok, eval_p, s, base_reward, seed
    )
    clean.close()
    byz.close()

    from swarmlm.rlhf.rollouts import miss_probability

    per_liar = s["rollouts"] // 5
    return {
        "seed": seed,
        "pairs": {"train": len(train_pairs), "held_out": len(held_pairs)},
        "rm_single": rm_single,
        "rm_swarm": rm_swarm,
        "swarm_rm_acc_delta": rm_swarm["accuracy"] - rm_single["accuracy"],
        "base_true_reward": base_reward,
        "ppo": {
            "single": c_single.points,
            "swarm": c_swarm.points,
            "matched": gain_ratio(c_swarm, c_single),
            "seconds_per_block": {"single": c_single.block_seconds, "swarm": c_swarm.block_seconds},
        },
        "grpo": {
            "one_peer": c_grpo_one.points,
            "swarm": c_grpo_swarm.points,
            "matched": gain_ratio(c_grpo_swarm, c_grpo_one),
            "seconds_per_block": {
                "one_peer": c_grpo_one.block_seconds,
                "swarm": c_grpo_swarm.block_seconds,
            },
        },
        "grpo_vs_ppo": gain_ratio(c_grpo_swarm, c_swarm),
        "byzantine": {
            "clean": c_clean.points,
            "liar": c_byz.points,
            "matched": gain_ratio(c_byz, c_clean),
            "forged_sent": byz.forged_sent,
            "forged_accepted": byz.forged_accepted,
            "rejected_rounds": byz.rejections,
            "rounds": byz.round,
            "expected_miss_rate": miss_probability(per_liar, s["forged"], s["verify_sample"]),
        },
        "seconds": time.perf_counter() - t0,
    }


LOOP_THRESHOLDS: dict[str, Any] = {
    "pretrain_rounds": 10,
    "min_labels": 6,
    "reward_rounds": 3,
    "policy_rounds": 3,
    "samples_per_cycle": 8,
    "sample_max_new_tokens": 12,
    "idle_round_s": 0.3,
    "reward": {"batch_size": 8, "max_len": 64, "val_fraction": 0.25},
    "grpo": {
        "prompts_per_round": 4,
        "group_size": 4,
        "eval_prompts": 4,
        "minibatch_size": 4,
        "max_new_tokens": 12,
    },
}


def true_reward_judge(prompt: str, a: str, b: str) -> str:
    """The loop stage's annotators: the answer with the higher true (lexicon) reward; equal
    rewards (most answers of a tiny model hold no lexicon word) go to the longer answer, so
    every task carries a preference and all three annotators agree."""
    sa, sb = LEX.score(a), LEX.score(b)
    if sa != sb:
        return "A" if sa > sb else "B"
    return "A" if (len(a), a) >= (len(b), b) else "B"


def loop_cycles(work: Path, data_dir: Path, cycles: int, limit_s: float) -> dict[str, Any]:
    """Issue #20 item 4: ``swarmlm node`` with ``rlhf.loop`` (a real process, a tiny model
    on this benchmark's corpus) while 3 simulated annotators label its comparison tasks
    over the HTTP API by the true reward; counts the full cycles (samples -> consensus
    labels -> reward model -> GRPO) within ``limit_s``."""
    import signal

    import yaml

    from swarmlm.testing.rlhf_loop import (
        SimulatedAnnotators,
        loop_health,
        loop_node_config,
        start_node,
    )

    cfg_path = loop_node_config(data_dir, work / "loop", LOOP_THRESHOLDS)
    cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    port, node_dir = int(cfg["web_port"]), Path(cfg["node_dir"])
    log_path = work / "loop" / "node.log"
    t0 = time.perf_counter()
    proc = start_node(cfg_path, log_path)
    timeline: list[dict[str, Any]] = []
    done = 0
    try:
        with SimulatedAnnotators(port, judge=true_reward_judge) as annotators:
            while (
                time.perf_counter() - t0 < limit_s
                and proc.poll() is None
                and any(t.is_alive() for t in annotators.threads)
            ):
                h = loop_health(port)
                phase = (h.get("phase"), h.get("cycle"))
                if h and (not timeline or (timeline[-1]["phase"], timeline[-1]["cycle"]) != phase):
                    timeline.append(
                        {"phase": phase[0], "cycle": phase[1], "t": time.perf_counter() - t0}
                    )
                    stderr_console.print(f"loop: {phase[0]} (cycle {phase[1]})")
                done = int(h.get("cycles_completed") or 0)
                if done >= cycles:
                    break
                time.sleep(0.5)
        seconds = time.perf_counter() - t0
        for err in annotators.errors:
            stderr_console.print(f"loop: annotator failed: {err}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except Exception:
                proc.kill()
    curve_file = node_dir / "train" / "loop" / "curve.jsonl"
    curve = (
        [json.loads(x) for x in curve_file.read_text().splitlines()] if curve_file.exists() else []
    )
    by_cycle: dict[int, dict[str, Any]] = {}
    for p in curve:
        row = by_cycle.setdefault(int(p["cycle"]), {})
        if p["phase"] == "reward" and "rm_accuracy" in p:
            row["rm_accuracy"] = p["rm_accuracy"]
        if p["phase"] == "policy" and "reward" in p:
            row["policy_reward"] = p["reward"]
            row["policy_kl"] = p.get("kl")
    return {
        "cycles_completed": done,
        "seconds": round(seconds, 1),
        "timeline": timeline,
        "submitted": annotators.submitted,
        "annotator_errors": annotators.errors,
        "by_cycle": by_cycle,
        "thresholds": LOOP_THRESHOLDS,
        "log": str(log_path),
    }


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.fmean(vals) if vals else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. + seeds - 1")
    ap.add_argument("--smoke", action="store_true", help="toy sizes: a code-path check only")
    ap.add_argument("--policy-rounds", type=int, default=None, help="PPO/GRPO steps per side")
    ap.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts (x 2)")
    ap.add_argument("--held-out-prompts", type=int, default=None, help="RM held-out prompts")
    ap.add_argument(
        "--rm-swarm-epochs", type=int, default=None, help="passes of each peer over its shard"
    )
    ap.add_argument("--lr", type=float, default=3e-4, help="policy learning rate (both sides)")
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument(
        "--swarm-lr-scale",
        type=float,
        default=1.0,
        help="inner learning rate of multi-peer swarms (RM and policy) = lr x this: averaging "
        "n peers' pseudo-gradients is a step of an n-times larger batch",
    )
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "rlhf_swarm.json")
    ap.add_argument("--loop-only", action="store_true", help="only the node loop stage")
    ap.add_argument("--loop-cycles", type=int, default=None, help="default: 2 quick, 3 full")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(1)
    s = smoke_sizes() if args.smoke else sizes(args.quick)
    for key in ("seeds", "policy_rounds", "eval_prompts", "held_out_prompts", "rm_swarm_epochs"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    s["swarm_lr_scale"] = args.swarm_lr_scale
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    base = base_model(s["base_steps"])
    data_dir = CACHE / "data"
    runs = []
    import tempfile

    for seed in range(args.first_seed, args.first_seed + (0 if args.loop_only else s["seeds"])):
        with tempfile.TemporaryDirectory(prefix="rlhf-swarm-") as tmp:
            runs.append(
                one_seed(
                    seed, s, base, data_dir, Path(tmp), args.lr, args.kl_coef, args.swarm_lr_scale
                )
            )
    cycles = args.loop_cycles or (2 if args.quick or args.smoke else 3)
    with tempfile.TemporaryDirectory(prefix="rlhf-loop-") as tmp:
        loop = loop_cycles(Path(tmp), data_dir, cycles, limit_s=300.0 * cycles)
    sent = sum(r["byzantine"]["forged_sent"] for r in runs)
    accepted = sum(r["byzantine"]["forged_accepted"] for r in runs)

    def med(key: str, side: str) -> float | None:
        xs = [x for r in runs for x in r[key]["seconds_per_block"][side]]
        return statistics.median(xs) / s["block"] if xs else None

    headline = {
        "swarm_rm_acc_delta": _mean([r["swarm_rm_acc_delta"] for r in runs]),
        "swarm_ppo_gain_ratio": _mean([r["ppo"]["matched"]["ratio"] for r in runs]),
        "swarm_grpo_gain_ratio": _mean([r["grpo"]["matched"]["ratio"] for r in runs]),
        "grpo_vs_ppo_gain": _mean([r["grpo_vs_ppo"]["ratio"] for r in runs]),
        "byzantine_gain_ratio": _mean([r["byzantine"]["matched"]["ratio"] for r in runs]),
        "fabricated_accepted_fraction": accepted / sent if sent else None,
        "fabricated_expected_miss_rate": runs[0]["byzantine"]["expected_miss_rate"]
        if runs
        else None,
        "loop_cycles_completed": loop["cycles_completed"],
        "loop_seconds": loop["seconds"],
        "rm_accuracy_single": _mean([r["rm_single"]["accuracy"] for r in runs]),
        "rm_accuracy_swarm": _mean([r["rm_swarm"]["accuracy"] for r in runs]),
        "rm_calibration_error_swarm": _mean([r["rm_swarm"]["calibration_error"] for r in runs]),
        "ppo_gain_single": _mean([r["ppo"]["matched"]["gain_b"] for r in runs]),
        "ppo_gain_swarm": _mean([r["ppo"]["matched"]["gain_a"] for r in runs]),
        "matched_kl_ppo": _mean([r["ppo"]["matched"]["kl"] for r in runs]),
        "ppo_round_seconds_median": {"single": med("ppo", "single"), "swarm": med("ppo", "swarm")},
        "seeds": s["seeds"],
        "quick": args.quick,
        "seconds": round(time.perf_counter() - t0, 1),
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg(),
    }
    write_json(
        args.out,
        {
            "sizes": s,
            "args": vars(args) | {"out": str(args.out)},
            "headline": headline,
            "runs": runs,
            "loop": loop,
        },
    )
    stderr_console.print(json.dumps(headline, indent=2, default=str))
    emit_headline(headline)


if __name__ == "__main__":
    main()

"""Mixture of experts: softmax router, renormalised top-k, dropless grouped dispatch.

Dispatch sorts the (token, expert) assignments by expert so each expert runs one matmul over a
contiguous slice of its tokens: no token is dropped, no capacity factor, and the only Python
loop is over experts. The auxiliary load-balancing loss follows Switch / Mixtral,
``n_experts * sum_e f_e * P_e`` with f_e the share of assignments routed to expert e and P_e the
mean router probability of e; it equals 1 for a uniform router. The optional router z-loss
(ST-MoE) is ``mean(logsumexp(logits)^2)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swarmlm.model.config import ModelConfig
from swarmlm.model.kernels import swiglu, topk_routing


def load_balancing_loss(probs: Tensor, indices: Tensor, n_experts: int) -> Tensor:
    """Switch-style auxiliary loss. probs: (tokens, E) float32; indices: (tokens, k)."""
    counts = torch.bincount(indices.reshape(-1), minlength=n_experts).to(probs.dtype)
    fraction = counts / indices.numel()
    return n_experts * torch.sum(fraction * probs.mean(dim=0))


def router_z_loss(logits: Tensor) -> Tensor:
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def _computes_in_bf16(x: Tensor) -> bool:
    """True when the expert matmuls on ``x`` run in bfloat16 (bf16 input, or bf16 autocast)."""
    if x.dtype == torch.bfloat16:
        return True
    device = x.device.type
    return (
        x.dtype == torch.float32
        and torch.is_autocast_enabled(device)
        and torch.get_autocast_dtype(device) == torch.bfloat16
    )


def _grouped_experts(
    routed: Tensor, counts: Tensor, gate_w: Tensor | None, up_w: Tensor, down_w: Tensor
) -> Tensor:
    """All experts in three ``F.grouped_mm`` calls, in bfloat16: rows ``routed`` (sorted by
    expert, ``counts[e]`` rows each) -> (rows, d_model) bf16. Casts the rows and each weight
    once, where the per-expert loop under autocast casts every slice for every matmul."""
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    with torch.autocast(routed.device.type, enabled=False):
        x = routed.to(torch.bfloat16)
        up = F.grouped_mm(x, up_w.to(torch.bfloat16).transpose(1, 2), offs=offs)
        if gate_w is not None:
            gate = F.grouped_mm(x, gate_w.to(torch.bfloat16).transpose(1, 2), offs=offs)
            h = swiglu(gate, up)
        else:
            h = F.gelu(up, approximate="tanh")
        return F.grouped_mm(h, down_w.to(torch.bfloat16).transpose(1, 2), offs=offs)


class MoEFeedForward(nn.Module):
    """SwiGLU (or GELU) experts stored as stacked weights (experts, out, in).

    The experts run as one matmul per expert (:meth:`_expert_loop`). ``grouped_bf16 = True``
    on an instance runs them in bfloat16 as three ``F.grouped_mm`` calls instead (rows and
    weights cast once), as HF's Mixtral does. Off by default: measured here (issue #21,
    BENCHMARKS.md) it was no faster than the loop under bf16 autocast (one thread: 0.78x the
    loop's tokens/s at model level, 0.92x at layer level; two threads only under heavy load).
    """

    expert_counts: Tensor
    grouped_bf16: bool = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts = cfg.n_experts
        self.top_k = cfg.top_k
        self.kind = cfg.ffn
        self.aux_coef = cfg.moe_aux_loss_coef
        self.z_coef = cfg.moe_z_loss_coef
        hidden = cfg.ffn_dim
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        e = cfg.n_experts
        self.w_gate = (
            nn.Parameter(torch.empty(e, hidden, cfg.d_model)) if cfg.ffn == "swiglu" else None
        )
        self.w_up = nn.Parameter(torch.empty(e, hidden, cfg.d_model))
        self.w_down = nn.Parameter(torch.empty(e, cfg.d_model, hidden))
        # Running utilisation statistics (assignments per expert), not trained, not saved.
        self.register_buffer("expert_counts", torch.zeros(e, dtype=torch.long), persistent=False)

    def reset_parameters(self, std: float, out_std: float) -> None:
        for w in (self.w_gate, self.w_up):
            if w is not None:
                nn.init.normal_(w, mean=0.0, std=std)
        nn.init.normal_(self.w_down, mean=0.0, std=out_std)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (batch, seq, d). Returns the output and the weighted auxiliary loss (scalar)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self.router(flat)
        weights, indices, probs = topk_routing(logits, self.top_k)

        aux = flat.new_zeros((), dtype=torch.float32)
        if self.training and self.aux_coef > 0:
            aux = aux + self.aux_coef * load_balancing_loss(probs, indices, self.n_experts)
        if self.training and self.z_coef > 0:
            aux = aux + self.z_coef * router_z_loss(logits)

        out = self._dispatch(flat, weights, indices)
        return out.reshape(shape), aux

    def _dispatch(self, flat: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        k = self.top_k
        flat_idx = indices.reshape(-1)
        order = torch.argsort(flat_idx, stable=True)
        counts = torch.bincount(flat_idx, minlength=self.n_experts)
        with torch.no_grad():
            self.expert_counts += counts
        token_of = order // k
        routed = flat.index_select(0, token_of)
        gate_w, up_w, down_w = self.expert_weights()
        if self.grouped_bf16 and _computes_in_bf16(routed):
            outputs = _grouped_experts(routed, counts, gate_w, up_w, down_w)
        else:
            outputs = self._expert_loop(routed, counts, gate_w, up_w, down_w)
        scaled = outputs * weights.reshape(-1)[order].unsqueeze(-1).to(outputs.dtype)
        # Under autocast the expert matmuls return bf16 while ``flat`` (a norm's output) is
        # fp32: accumulate in the experts' dtype, as a dense feed-forward would return.
        result = flat.new_zeros(flat.shape, dtype=scaled.dtype)
        result.index_add_(0, token_of, scaled)
        return result

    def _expert_loop(
        self,
        routed: Tensor,
        counts: Tensor,
        gate_w: Tensor | None,
        up_w: Tensor,
        down_w: Tensor,
    ) -> Tensor:
        """One matmul per expert over its contiguous rows (float32, and any dtype).

        unbind: one view per expert whose backward stacks the expert gradients once, instead
        of zero-filling and accumulating a full (E, out, in) gradient for every expert.
        Not F.grouped_mm in float32: eagerly it ran at the same speed here, and in torch 2.13
        its fake-tensor kernel accepts only bfloat16, so float32 could not be torch.compile'd.
        """
        w_up = up_w.unbind(0)
        w_down = down_w.unbind(0)
        w_gate = gate_w.unbind(0) if gate_w is not None else None
        pieces = []
        for e, seg in enumerate(torch.split(routed, counts.tolist())):
            if seg.shape[0] == 0:
                continue
            up = seg @ w_up[e].t()
            if w_gate is not None:
                h = swiglu(seg @ w_gate[e].t(), up)
            else:
                h = F.gelu(up, approximate="tanh")
            pieces.append(h @ w_down[e].t())
        return torch.cat(pieces) if pieces else routed

    def expert_weights(self) -> tuple[Tensor | None, Tensor, Tensor]:
        """(w_gate, w_up, w_down) as the dispatch multiplies them: this process's tensors.
        Parallel layouts that store the experts as DTensors return their local shards."""
        return self.w_gate, self.w_up, self.w_down

    def utilisation(self) -> dict[str, float | list[float]]:
        """Share of assignments per expert since the last reset, plus balance summaries."""
        counts = self.expert_counts.double()
        total = float(counts.sum())
        share = (counts / total).tolist() if total > 0 else [0.0] * self.n_experts
        entropy = -sum(p * math.log(p) for p in share if p > 0)
        return {
            "share": share,
            "max_over_uniform": max(share) * self.n_experts if total > 0 else 0.0,
            "normalised_entropy": entropy / math.log(self.n_experts) if self.n_experts > 1 else 1.0,
        }

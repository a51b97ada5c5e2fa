from __future__ import annotations

import pytest
import torch
from torch import nn

from swarmlm.model import ModelConfig, Transformer
from swarmlm.train.config import OptimConfig
from swarmlm.train.optim import SAM, build_adamw, parameter_groups
from swarmlm.train.precision import Precision, PrecisionError
from swarmlm.train.qat import enable_int8_qat


def test_weight_decay_applies_to_matrices_only() -> None:
    model = Transformer(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2))
    decay, no_decay = parameter_groups(model, 0.1)
    assert all(p.ndim >= 2 for p in decay["params"])  # type: ignore[union-attr]
    assert all(p.ndim == 1 for p in no_decay["params"])  # type: ignore[union-attr]
    opt = build_adamw(model, OptimConfig(weight_decay=0.1))
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_sam_steps_with_the_gradient_at_the_perturbed_point() -> None:
    # f(w) = w^4 / 4: gradient w^3. At w=1 with rho=0.5, SAM evaluates at w=1.5.
    w = nn.Parameter(torch.tensor([1.0]))
    sam = SAM(torch.optim.SGD([w], lr=0.1), rho=0.5)
    (w**4 / 4).sum().backward()
    sam.perturb()
    assert w.item() == pytest.approx(1.5)
    sam.zero_grad()
    (w**4 / 4).sum().backward()
    sam.unperturb_and_step()
    assert w.item() == pytest.approx(1.0 - 0.1 * 1.5**3)


def test_int8_fake_quant_rounds_weights_but_passes_gradients_straight_through() -> None:
    model = Transformer(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2))
    assert enable_int8_qat(model) == 7  # q, k, v, o, gate, up, down
    layer = model.blocks[0].attn.q_proj
    w = layer.weight
    scale = layer.parametrizations.weight.original.abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(w / scale, torch.round(w / scale), atol=1e-4)
    x = torch.randint(0, 32, (2, 8))
    model(x, targets=x).loss.backward()
    assert layer.parametrizations.weight.original.grad is not None


def test_fp16_without_cuda_is_refused_naming_the_field() -> None:
    with pytest.raises(PrecisionError, match=r"train\.precision"):
        Precision("fp16", torch.device("cpu"))
    with Precision("bf16", torch.device("cpu")).autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16

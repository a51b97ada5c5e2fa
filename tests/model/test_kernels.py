"""Kernel tests: the PyTorch fallbacks, backend selection, and Triton against the fallbacks.

No GPU exists here, so the Triton kernels run under Triton's CPU interpreter. The interpreter
must be switched on (``TRITON_INTERPRET=1``) before ``triton`` is imported, which would leak
into every other test if done in this process; instead one subprocess (this file run as a
script) executes every Triton case and returns its outputs and gradients, and the parametrized
tests below compare each case against the fallback evaluated in float64 on the same inputs.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import traceback
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from swarmlm.model.kernels import (
    KERNELS_ENV,
    KernelError,
    select_backend,
    swiglu,
    topk_routing,
    triton_available,
)
from swarmlm.model.kernels import dispatch as kernels_dispatch

Case = dict[str, Any]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# --------------------------------------------------------------------------- case definitions
# Each case names its leaf tensors ("bases"), how the op's inputs are views of them ("layout"),
# and which outputs receive a gradient. Leaves are what gradients are compared on, so a layout
# that slices one fused tensor into gate and up checks the gradient lands in the right halves.


def _swiglu_case(
    case_id: str, shape: tuple[int, ...], dtype: str, layout: str = "contiguous"
) -> Case:
    gen = torch.Generator().manual_seed(zlib.crc32(case_id.encode()))
    *lead, n = shape
    if layout == "fused_halves":  # gate, up = gate_up.chunk(2, -1): rows strided by 2n
        bases = {"gate_up": torch.randn(*lead, 2 * n, generator=gen) * 3}
    elif layout == "transposed":  # gate.t(): last dimension not contiguous
        bases = {
            "gate": torch.randn(n, *lead, generator=gen) * 3,
            "up": torch.randn(n, *lead, generator=gen) * 3,
        }
    elif layout == "every_other_column":
        bases = {
            "gate": torch.randn(*lead, 2 * n, generator=gen) * 3,
            "up": torch.randn(*lead, 2 * n, generator=gen) * 3,
        }
    else:
        bases = {
            "gate": torch.randn(*shape, generator=gen) * 3,
            "up": torch.randn(*shape, generator=gen) * 3,
        }
    bases = {name: t.to(DTYPES[dtype]) for name, t in bases.items()}
    return {"id": case_id, "op": "swiglu", "dtype": dtype, "layout": layout, "bases": bases}


def _routing_case(
    case_id: str,
    shape: tuple[int, ...],
    k: int,
    dtype: str,
    layout: str = "contiguous",
    grads: str = "weights+probs",
) -> Case:
    gen = torch.Generator().manual_seed(zlib.crc32(case_id.encode()))
    *lead, n_experts = shape
    rows = 2 * lead[0] if layout == "every_other_row" else lead[0]
    # Distinct multiples of 1/8 within each row: exact in bf16/fp16, so the top-k has no ties.
    ranks = torch.rand(rows, *lead[1:], n_experts, generator=gen).argsort(dim=-1)
    logits = ranks.float() * 0.125 - n_experts * 0.0625
    if layout == "transposed":  # stored (n_experts, tokens); the op sees its transpose
        logits = logits.t().contiguous()
    return {
        "id": case_id,
        "op": "topk_routing",
        "dtype": dtype,
        "layout": layout,
        "k": k,
        "grads": grads,
        "bases": {"logits": logits.to(DTYPES[dtype])},
    }


SWIGLU_CASES = [
    _swiglu_case("fp32-2d", (4, 64), "float32"),
    _swiglu_case("fp32-odd-3d", (3, 5, 33), "float32"),
    _swiglu_case("fp32-single-element", (1, 1), "float32"),
    _swiglu_case("fp32-1d", (37,), "float32"),
    _swiglu_case("fp32-wide-rows-span-column-blocks", (3, 1500), "float32"),
    _swiglu_case("fp32-many-rows-span-row-blocks", (300, 24), "float32"),
    _swiglu_case("fp32-fused-gate-up-halves", (2, 6, 40), "float32", "fused_halves"),
    _swiglu_case("fp32-transposed", (9, 17), "float32", "transposed"),
    _swiglu_case("fp32-every-other-column", (5, 19), "float32", "every_other_column"),
    _swiglu_case("fp16-odd-3d", (2, 7, 45), "float16"),
    _swiglu_case("fp16-fused-gate-up-halves", (5, 48), "float16", "fused_halves"),
    _swiglu_case("bf16-odd-3d", (2, 7, 45), "bfloat16"),
    _swiglu_case("bf16-transposed", (11, 13), "bfloat16", "transposed"),
]

ROUTING_CASES = [
    _routing_case("fp32-8-experts-top2", (16, 8), 2, "float32"),
    _routing_case("fp32-odd-5-experts-top1", (33, 5), 1, "float32"),
    _routing_case("fp32-k-equals-n-experts", (7, 3), 3, "float32"),
    _routing_case("fp32-k5-padded-to-8", (10, 6), 5, "float32"),
    _routing_case("fp32-64-experts-rows-span-blocks", (65, 64), 4, "float32"),
    _routing_case("fp32-leading-dims", (2, 3, 6), 2, "float32"),
    _routing_case("fp32-transposed", (12, 8), 2, "float32", "transposed"),
    _routing_case("fp32-every-other-row", (9, 8), 2, "float32", "every_other_row"),
    _routing_case("fp32-grad-through-weights-only", (16, 8), 2, "float32", grads="weights"),
    _routing_case("fp32-grad-through-probs-only", (16, 8), 2, "float32", grads="probs"),
    _routing_case("fp16-8-experts-top2", (20, 8), 2, "float16"),
    _routing_case("bf16-8-experts-top2", (20, 8), 2, "bfloat16"),
    _routing_case("bf16-odd-13-experts-top3", (9, 13), 3, "bfloat16", "transposed"),
]


def _special_routing_cases() -> list[Case]:
    """Inputs whose expected result is known exactly, not just equal to the fallback."""
    ties = _routing_case("ties", (4, 6), 3, "float32")
    ties["bases"]["logits"] = torch.zeros(4, 6)
    masked = _routing_case("masked-experts", (3, 5), 3, "float32", grads="weights")
    logits = torch.tensor(
        [
            [0.5, float("-inf"), 2.0, float("-inf"), float("-inf")],
            [float("-inf")] * 4 + [1.0],
            [1.0, 2.0, 3.0, 4.0, float("-inf")],
        ]
    )
    masked["bases"]["logits"] = logits
    nan = _routing_case("nan-logits", (2, 4), 2, "float32", grads="weights")
    nan["bases"]["logits"] = torch.tensor(
        [[float("nan"), 1.0, 2.0, float("nan")], [float("nan")] * 4]
    )
    return [ties, masked, nan]


# --------------------------------------------------------------------------- running a case


def _inputs(case: Case, leaves: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The op's tensor arguments as views of the leaves, per the case's layout."""
    layout = case["layout"]
    if case["op"] == "swiglu":
        if layout == "fused_halves":
            gate, up = leaves["gate_up"].chunk(2, dim=-1)
            return [gate, up]
        if layout == "transposed":
            return [leaves["gate"].t(), leaves["up"].t()]
        if layout == "every_other_column":
            return [leaves["gate"][..., ::2], leaves["up"][..., 1::2]]
        return [leaves["gate"], leaves["up"]]
    if layout == "transposed":
        return [leaves["logits"].t()]
    if layout == "every_other_row":
        return [leaves["logits"][::2]]
    return [leaves["logits"]]


def run_case(case: Case, *, force_triton: bool, compute_dtype: torch.dtype | None) -> Case:
    """Forward and backward of one case; ``compute_dtype`` upcasts the inputs (the reference).

    Output gradients are drawn in float32, rounded to the case's dtype (the precision a real
    caller would hand back), then converted, so the reference sees exactly the same values.
    """
    gen = torch.Generator().manual_seed(1234)
    case_dtype = DTYPES[case["dtype"]]
    leaves = {
        name: (t.to(compute_dtype) if compute_dtype else t.clone()).requires_grad_()
        for name, t in case["bases"].items()
    }
    args = _inputs(case, leaves)
    if case["op"] == "swiglu":
        outputs = [swiglu(*args, force_triton=force_triton)]
        graded = [0]
    else:
        outputs = list(topk_routing(args[0], case["k"], force_triton=force_triton))
        graded = {"weights+probs": [0, 2], "weights": [0], "probs": [2]}[case["grads"]]
    loss = torch.zeros((), dtype=torch.float64)
    for i in graded:
        out = outputs[i]
        grad = torch.randn(out.shape, generator=gen)
        # probs (routing output 2) is float32 whatever the logits' dtype; the rest follow it.
        is_probs = case["op"] == "topk_routing" and i == 2
        grad = grad.to(torch.float32 if is_probs else case_dtype)
        loss = loss + (out.double() * grad.double()).sum()
    loss.backward()
    return {
        "outputs": [o.detach() for o in outputs],
        "grads": {name: leaf.grad for name, leaf in leaves.items()},
        "autograd_nodes": _autograd_node_names(outputs[0]),
    }


def _autograd_node_names(t: torch.Tensor) -> list[str]:
    """Names of every autograd node that produced ``t`` (to see which implementation ran)."""
    names, stack, seen = [], [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def _key(case: Case) -> str:
    return f"{case['op']}/{case['id']}"


def _interpreter_worker(cases_path: str, results_path: str) -> None:
    """Subprocess entry point: run every case through Triton's interpreter."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "the worker needs TRITON_INTERPRET=1"
    cases: list[Case] = torch.load(cases_path)
    results: dict[str, Case] = {}
    for case in cases:
        try:
            results[_key(case)] = run_case(case, force_triton=True, compute_dtype=None)
        except Exception:
            results[_key(case)] = {"error": traceback.format_exc()}
    torch.save(results, results_path)


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    """Every Triton case, run once in a subprocess under ``TRITON_INTERPRET=1``."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip(
            "triton is not installed, so the Triton kernels cannot be checked against the "
            "fallbacks (install it with: pip install 'swarmlm[triton]')"
        )
    workdir = tmp_path_factory.mktemp("triton_interpret")
    cases_path, results_path = workdir / "cases.pt", workdir / "results.pt"
    torch.save([*SWIGLU_CASES, *ROUTING_CASES, *_special_routing_cases()], cases_path)
    env = {k: v for k, v in os.environ.items() if k != KERNELS_ENV}
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(cases_path), str(results_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout}\n{proc.stderr}"
    results: dict[str, Case] = torch.load(results_path)
    return results


def _triton_result(results: dict[str, Case], key: str, function_name: str) -> Case:
    result = results[key]
    assert "error" not in result, f"Triton case {key} raised:\n{result.get('error')}"
    # The Triton autograd.Function must have produced the output, not a silent fallback.
    nodes = result["autograd_nodes"]
    assert any(name.startswith(function_name) for name in nodes), nodes
    return result


def _assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    """Triton computes in float32 and rounds once: within one unit of the storage dtype."""
    if actual.dtype == torch.float32 or dtype == torch.float32:
        rtol, atol = 1e-5, 1e-6
    else:
        rtol, atol = torch.finfo(dtype).eps, 1e-4
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


# --------------------------------------------------------------------------- Triton vs fallback


@pytest.mark.parametrize("case", SWIGLU_CASES, ids=[c["id"] for c in SWIGLU_CASES])
def test_triton_swiglu_matches_fallback_forward_and_backward(
    case: Case, triton_results: dict[str, Case]
) -> None:
    got = _triton_result(triton_results, _key(case), "SwiGLUFunction")
    ref = run_case(case, force_triton=False, compute_dtype=torch.float64)
    dtype = DTYPES[case["dtype"]]
    (out,) = got["outputs"]
    assert out.dtype == dtype
    _assert_close(out, ref["outputs"][0], dtype, "output")
    for name, grad in got["grads"].items():
        assert grad.dtype == dtype
        _assert_close(grad, ref["grads"][name], dtype, f"gradient of {name}")


@pytest.mark.parametrize("case", ROUTING_CASES, ids=[c["id"] for c in ROUTING_CASES])
def test_triton_topk_routing_matches_fallback_forward_and_backward(
    case: Case, triton_results: dict[str, Case]
) -> None:
    got = _triton_result(triton_results, _key(case), "TopKRoutingFunction")
    ref = run_case(case, force_triton=False, compute_dtype=torch.float64)
    dtype = DTYPES[case["dtype"]]
    weights, indices, probs = got["outputs"]
    assert (weights.dtype, indices.dtype, probs.dtype) == (dtype, torch.int64, torch.float32)
    assert torch.equal(indices, ref["outputs"][1]), "selected experts differ from the fallback"
    _assert_close(weights, ref["outputs"][0], dtype, "weights")
    _assert_close(probs, ref["outputs"][2], torch.float32, "probs")
    _assert_close(got["grads"]["logits"], ref["grads"]["logits"], dtype, "gradient of logits")


def test_triton_topk_routing_breaks_ties_towards_lower_expert_ids(
    triton_results: dict[str, Case],
) -> None:
    got = _triton_result(triton_results, "topk_routing/ties", "TopKRoutingFunction")
    weights, indices, probs = got["outputs"]
    assert indices.tolist() == [[0, 1, 2]] * 4
    torch.testing.assert_close(weights, torch.full((4, 3), 1 / 3))
    torch.testing.assert_close(probs, torch.full((4, 6), 1 / 6))


def test_triton_topk_routing_with_masked_experts_picks_distinct_in_range_experts(
    triton_results: dict[str, Case],
) -> None:
    """-inf logits (masked experts) may fill the top-k but get zero weight, never twice."""
    got = _triton_result(triton_results, "topk_routing/masked-experts", "TopKRoutingFunction")
    weights, indices, probs = got["outputs"]
    assert indices[0, :2].tolist() == [2, 0]
    assert indices[1, 0].item() == 4
    assert indices[2].tolist() == [3, 2, 1]
    for row in indices.tolist():
        assert len(set(row)) == 3
        assert all(0 <= i < 5 for i in row)
    assert weights[0, 2].item() == 0.0
    assert weights[1].tolist() == [1.0, 0.0, 0.0]
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    assert probs[1].tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert torch.isfinite(got["grads"]["logits"]).all()


def test_triton_topk_routing_with_nan_logits_still_returns_distinct_in_range_experts(
    triton_results: dict[str, Case],
) -> None:
    """A NaN router output must not make the dispatch index out of bounds on the GPU."""
    got = _triton_result(triton_results, "topk_routing/nan-logits", "TopKRoutingFunction")
    _, indices, _ = got["outputs"]
    for row in indices.tolist():
        assert len(set(row)) == 2
        assert all(0 <= i < 4 for i in row)


# --------------------------------------------------------------------------- fallbacks


def test_swiglu_fallback_gradients_match_finite_differences() -> None:
    gate = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, u: swiglu(g, u, force_triton=False), (gate, up))
    expected = gate * torch.sigmoid(gate) * up
    torch.testing.assert_close(swiglu(gate, up, force_triton=False), expected)


def test_topk_routing_weights_are_renormalised_top_k_softmax_probabilities() -> None:
    logits = torch.randn(50, 8, dtype=torch.bfloat16)
    weights, indices, probs = topk_routing(logits, 3, force_triton=False)
    assert (weights.shape, weights.dtype) == ((50, 3), torch.bfloat16)
    assert (indices.shape, indices.dtype) == ((50, 3), torch.int64)
    assert (probs.shape, probs.dtype) == ((50, 8), torch.float32)
    expected_probs = torch.softmax(logits.double(), dim=-1)
    torch.testing.assert_close(probs.double(), expected_probs)
    chosen = expected_probs.gather(-1, indices)
    # The chosen experts are the k most probable, in descending order.
    assert (chosen[:, :-1] >= chosen[:, 1:]).all()
    assert (chosen[:, -1:] >= expected_probs.scatter(-1, indices, -1.0)).all()
    torch.testing.assert_close(
        weights.double(), chosen / chosen.sum(-1, keepdim=True), rtol=1e-2, atol=1e-3
    )


def test_topk_routing_fallback_gradients_match_finite_differences() -> None:
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    mix = torch.randn(6, 5, dtype=torch.float64)

    def loss_terms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, _, probs = topk_routing(x, 2, force_triton=False)
        return weights, (probs.double() * mix).sum(-1)

    assert torch.autograd.gradcheck(loss_terms, (logits,))


def test_topk_routing_keeps_leading_dimensions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    weights, indices, probs = topk_routing(torch.randn(2, 3, 4), 2)
    assert (weights.shape, indices.shape, probs.shape) == ((2, 3, 2), (2, 3, 2), (2, 3, 4))


# --------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    ("gate", "up", "message"),
    [
        (torch.randn(2, 3), torch.randn(2, 4), "same shape"),
        (torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64), "same dtype"),
        (torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int64), "gate must"),
        (torch.randn(2, 3), torch.ones(2, 3, dtype=torch.int64), "up must"),
    ],
    ids=["shape", "dtype", "integer-gate", "integer-up"],
)
def test_swiglu_rejects_mismatched_inputs_naming_the_argument(
    gate: torch.Tensor, up: torch.Tensor, message: str
) -> None:
    with pytest.raises(KernelError, match=message):
        swiglu(gate, up)


@pytest.mark.parametrize(
    ("logits", "k", "message"),
    [
        (torch.randn(4, 3), 4, r"k must be in \[1, n_experts=3\], got k=4"),
        (torch.randn(4, 3), 0, r"k must be in \[1, n_experts=3\], got k=0"),
        (torch.randn(4, 3), 2.0, "k must be an int, got float"),
        (torch.randn(4, 0), 1, "n_experts >= 1"),
        (torch.zeros((), dtype=torch.float32), 1, "shape"),
        (torch.ones(4, 3, dtype=torch.int64), 1, "router_logits must be a floating-point"),
    ],
    ids=["k-above-n-experts", "k-zero", "k-float", "no-experts", "scalar", "integer-logits"],
)
def test_topk_routing_rejects_bad_arguments_naming_them(
    logits: torch.Tensor, k: Any, message: str
) -> None:
    with pytest.raises(KernelError, match=message):
        topk_routing(logits, k)


# --------------------------------------------------------------------------- backend selection


def test_cpu_tensors_use_the_fallback_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    assert select_backend("op", torch.zeros(1), None) == "torch"
    out = swiglu(torch.randn(2, 2, requires_grad=True), torch.randn(2, 2))
    assert type(out.grad_fn).__name__ == "MulBackward0"


def test_cuda_tensors_use_triton_when_it_is_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    fake_cuda = SimpleNamespace(is_cuda=True, device="cuda:0", dtype=torch.bfloat16)
    monkeypatch.setattr(kernels_dispatch, "triton_available", lambda: True)
    assert select_backend("op", fake_cuda, None) == "triton"  # type: ignore[arg-type]
    fake_cuda_float64 = SimpleNamespace(is_cuda=True, device="cuda:0", dtype=torch.float64)
    assert select_backend("op", fake_cuda_float64, None) == "torch"  # type: ignore[arg-type]
    monkeypatch.setenv(KERNELS_ENV, "torch")
    assert select_backend("op", fake_cuda, None) == "torch"  # type: ignore[arg-type]
    monkeypatch.setattr(kernels_dispatch, "triton_available", lambda: False)
    monkeypatch.setenv(KERNELS_ENV, "auto")
    assert select_backend("op", fake_cuda, None) == "torch"  # type: ignore[arg-type]


def test_forcing_triton_on_cpu_without_the_interpreter_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    expected = "TRITON_INTERPRET=1" if triton_available() else "triton is not importable"
    with pytest.raises(KernelError, match=expected):
        swiglu(torch.randn(2), torch.randn(2), force_triton=True)
    monkeypatch.setenv(KERNELS_ENV, "triton")
    with pytest.raises(KernelError, match=expected):
        topk_routing(torch.randn(2, 4), 2)


def test_forcing_triton_for_float64_is_a_clear_error() -> None:
    with pytest.raises(KernelError, match=r"dtype torch.float64.*float32, float16 and bfloat16"):
        topk_routing(torch.randn(3, 4, dtype=torch.float64), 2, force_triton=True)


def test_invalid_kernels_environment_variable_is_named_in_the_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KERNELS_ENV, "cuda")
    with pytest.raises(KernelError, match=f"{KERNELS_ENV}='cuda' is invalid"):
        swiglu(torch.randn(2), torch.randn(2))


if __name__ == "__main__":
    _interpreter_worker(sys.argv[1], sys.argv[2])

"""Hugging Face interop: export swarmlm models as Llama / Mistral / Mixtral checkpoints and back.

The exported directory holds ``config.json`` and safetensors weights in exactly the layout that
``transformers`` (checked against 5.23) writes with ``save_pretrained`` and reads with
``AutoModelForCausalLM.from_pretrained``:

* dense, no sliding window        -> ``LlamaForCausalLM``
* dense, sliding window ``W``     -> ``MistralForCausalLM`` (``sliding_window = W``)
* mixture of experts (+ window)   -> ``MixtralForCausalLM`` (per-expert ``w1/w2/w3`` tensors)

Both sides agree on every numerical convention, so logits match to float32 rounding: RoPE in the
rotate-half layout with ``inv_freq = theta ** (-2i/head_dim)``; RMSNorm computed in float32 with
the weight applied after casting back; a query at position ``i`` sees keys ``j`` with
``i - W < j <= i``; the MoE router takes a float32 softmax over all experts and renormalises the
top-k probabilities (swarmlm's softmax over the selected logits is the same number).

Settings the formats cannot carry are refused with an error naming the swarmlm field (export) or
the ``config.json`` key (import), never silently approximated. ``transformers`` itself is never
imported here: it is a test/dev dependency only. See docs/hf-interop.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from swarmlm.atomic import atomic_path, fsync_dir
from swarmlm.model.config import ModelConfig
from swarmlm.model.transformer import Transformer

logger = logging.getLogger(__name__)

__all__ = [
    "EXPORT_DTYPES",
    "SWARMLM_CONFIG_METADATA_KEY",
    "HFInteropError",
    "UnsupportedConfigError",
    "WeightFileError",
    "check_exportable",
    "config_from_hf",
    "export_hf",
    "from_hf_state_dict",
    "hf_architecture",
    "hf_config",
    "import_hf",
    "load_swarmlm_weights",
    "save_swarmlm_weights",
    "to_hf_state_dict",
    "tokenizer_files_for",
]

#: Metadata key under which a single-file swarmlm checkpoint stores its ModelConfig as JSON.
SWARMLM_CONFIG_METADATA_KEY = "swarmlm.model_config"

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"

_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
_MODEL_TYPE_BY_ARCH = {arch: mt for mt, arch in _ARCH_BY_MODEL_TYPE.items()}

# transformers' defaults for keys a config.json may omit (from the 5.23 config classes).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "rope_theta": 10000.0},
    "mistral": {"rms_norm_eps": 1e-6, "max_position_embeddings": 4096 * 32, "rope_theta": 10000.0},
    "mixtral": {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32, "rope_theta": 1e6},
}

#: The weight dtypes an export can be written in, by the name ``--dtype`` takes.
EXPORT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class HFInteropError(Exception):
    """Base of every error raised by export/import; the message names the field or file."""


class UnsupportedConfigError(HFInteropError, ValueError):
    """A setting one side can express and the other cannot (the message names the field)."""


class WeightFileError(HFInteropError):
    """A weight or config file is missing, corrupt, or holds the wrong tensors."""


# ---- configuration ----------------------------------------------------------------------------


def hf_architecture(cfg: ModelConfig) -> str:
    """The transformers class an export of ``cfg`` loads as."""
    if cfg.is_moe:
        return "MixtralForCausalLM"
    if cfg.sliding_window is not None:
        return "MistralForCausalLM"
    return "LlamaForCausalLM"


def check_exportable(cfg: ModelConfig, *, drop_training_settings: bool = False) -> None:
    """Raise :class:`UnsupportedConfigError` naming the first field the HF formats cannot express.

    Fields that change the forward pass are always refused. Two training-only settings with no
    HF counterpart (``resid_dropout``, ``moe_z_loss_coef``) are refused too, unless
    ``drop_training_settings`` says the caller accepts that a fine-tune of the export will not
    use them; the logits are unaffected either way.
    """
    arch = hf_architecture(cfg)
    if cfg.pos_encoding != "rope":
        _refuse(
            "pos_encoding", cfg.pos_encoding, "Llama/Mistral/Mixtral only have rotary positions"
        )
    if cfg.norm != "rmsnorm":
        _refuse("norm", cfg.norm, "Llama/Mistral/Mixtral only have RMSNorm")
    if cfg.ffn != "swiglu":
        _refuse("ffn", cfg.ffn, "Llama/Mistral/Mixtral only have SwiGLU (silu-gated) MLPs")
    if cfg.block_sparse is not None:
        _refuse("block_sparse", cfg.block_sparse, "no HF architecture has block-sparse attention")
    if cfg.bias and arch != "LlamaForCausalLM":
        _refuse(
            "bias",
            True,
            f"{arch} has no bias terms (only LlamaForCausalLM, i.e. a dense model without "
            "sliding_window, can carry attention_bias/mlp_bias)",
        )
    if not drop_training_settings:
        hint = "; pass drop_training_settings=True (CLI: --drop-training-settings) to export anyway"
        if cfg.resid_dropout > 0:
            _refuse(
                "resid_dropout", cfg.resid_dropout, "HF configs have no residual dropout" + hint
            )
        if cfg.moe_z_loss_coef > 0:
            _refuse("moe_z_loss_coef", cfg.moe_z_loss_coef, "Mixtral has no router z-loss" + hint)


def _refuse(field: str, value: object, why: str) -> None:
    raise UnsupportedConfigError(f"cannot export {field}={value!r} (field '{field}'): {why}")


def hf_config(
    cfg: ModelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """The ``config.json`` dictionary for ``cfg`` (call :func:`check_exportable` first).

    Both the transformers-5 keys (``rope_parameters``, ``dtype``) and their 4.x spellings
    (``rope_theta``, ``torch_dtype``) are written so either generation of readers loads it.

    ``router_aux_loss_coef`` is ``moe_aux_loss_coef * n_layers / top_k``: swarmlm sums
    ``coef * E * sum_e f_e P_e`` over layers with f_e the share of the k*T assignments, while
    Mixtral pools all layers and counts f_e per token (k times larger), so this makes the two
    losses equal whenever every layer routes alike (in particular for a uniform router).
    """
    arch = hf_architecture(cfg)
    model_type = _MODEL_TYPE_BY_ARCH[arch]
    dtype_name = _dtype_name(dtype)
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "attention_dropout": cfg.attn_dropout,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }
    if arch == "LlamaForCausalLM":
        out["attention_bias"] = cfg.bias
        out["mlp_bias"] = cfg.bias
        out["pretraining_tp"] = 1
    else:
        out["sliding_window"] = cfg.sliding_window
    if arch == "MixtralForCausalLM":
        out["num_local_experts"] = cfg.n_experts
        out["num_experts_per_tok"] = cfg.top_k
        out["router_aux_loss_coef"] = cfg.moe_aux_loss_coef * cfg.n_layers / cfg.top_k
        out["router_jitter_noise"] = 0.0
        out["output_router_logits"] = False
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in EXPORT_DTYPES.items():
        if value == dtype:
            return name
    raise UnsupportedConfigError(
        f"cannot export weights as {dtype} (field 'dtype'): choose one of {sorted(EXPORT_DTYPES)}"
    )


def config_from_hf(hf: Mapping[str, Any], *, source: str = CONFIG_FILE) -> ModelConfig:
    """Translate a Llama/Mistral/Mixtral ``config.json`` into a :class:`ModelConfig`.

    Refuses (naming the key and ``source``) any architecture other than those three and any
    setting swarmlm cannot reproduce exactly: scaled RoPE, a non-silu activation, a head
    dimension other than hidden_size / num_attention_heads, unequal attention/MLP bias, router
    jitter.
    """
    arch = _architecture_of(hf, source)
    model_type = _MODEL_TYPE_BY_ARCH[arch]
    defaults = _DEFAULTS[model_type]
    reader = _KeyReader(hf, source)

    hidden = reader.integer("hidden_size")
    n_heads = reader.integer("num_attention_heads")
    n_kv = reader.integer("num_key_value_heads", default=None)
    if hidden % n_heads != 0:
        raise UnsupportedConfigError(
            f"{source}: num_attention_heads={n_heads} does not divide hidden_size={hidden} "
            "(key 'num_attention_heads')"
        )
    head_dim = reader.integer("head_dim", default=None)
    if head_dim is not None and head_dim != hidden // n_heads:
        raise UnsupportedConfigError(
            f"{source}: head_dim={head_dim} differs from hidden_size/num_attention_heads="
            f"{hidden // n_heads}; swarmlm ties the head size to the width (key 'head_dim')"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedConfigError(
            f"{source}: hidden_act={act!r} is not supported, swarmlm's SwiGLU uses silu "
            "(key 'hidden_act')"
        )
    rope_theta = _rope_theta(hf, source, float(defaults["rope_theta"]))

    bias = False
    if model_type == "llama":
        attention_bias = reader.boolean("attention_bias", default=False)
        mlp_bias = reader.boolean("mlp_bias", default=False)
        if attention_bias != mlp_bias:
            raise UnsupportedConfigError(
                f"{source}: attention_bias={attention_bias} but mlp_bias={mlp_bias}; swarmlm has "
                "one bias switch for both (key 'mlp_bias')"
            )
        bias = attention_bias
        sliding_window = None
    else:
        sliding_window = reader.integer("sliding_window", default=None)

    fields: dict[str, Any] = {
        "vocab_size": reader.integer("vocab_size"),
        "d_model": hidden,
        "n_layers": reader.integer("num_hidden_layers"),
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "d_ff": reader.integer("intermediate_size"),
        "max_seq_len": reader.integer(
            "max_position_embeddings", default=defaults["max_position_embeddings"]
        ),
        "pos_encoding": "rope",
        "rope_theta": rope_theta,
        "norm": "rmsnorm",
        "norm_eps": reader.number("rms_norm_eps", default=defaults["rms_norm_eps"]),
        "ffn": "swiglu",
        "bias": bias,
        "sliding_window": sliding_window,
        "attn_dropout": reader.number("attention_dropout", default=0.0),
        "tie_embeddings": reader.boolean("tie_word_embeddings", default=False),
        "init_std": reader.number("initializer_range", default=0.02),
    }
    if model_type == "mixtral":
        jitter = reader.number("router_jitter_noise", default=0.0)
        if jitter != 0.0:
            raise UnsupportedConfigError(
                f"{source}: router_jitter_noise={jitter} is not supported, swarmlm's router has "
                "no jitter (key 'router_jitter_noise')"
            )
        n_experts = reader.integer("num_local_experts", default=8)
        top_k = reader.integer("num_experts_per_tok", default=2)
        hf_coef = reader.number("router_aux_loss_coef", default=0.001)
        fields["n_experts"] = n_experts
        fields["top_k"] = top_k
        # Inverse of the mapping in hf_config, rounded so an export/import round trip is exact.
        coef = hf_coef * top_k / max(fields["n_layers"], 1)
        fields["moe_aux_loss_coef"] = float(f"{coef:.12g}")
    try:
        return ModelConfig(**fields)
    except ValidationError as exc:
        raise UnsupportedConfigError(
            f"{source} describes a model swarmlm cannot build (swarmlm field names below):\n{exc}"
        ) from exc


def _architecture_of(hf: Mapping[str, Any], source: str) -> str:
    archs = hf.get("architectures")
    if archs is not None:
        if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
            raise UnsupportedConfigError(
                f"{source}: architectures must be a list with one class name, got {archs!r} "
                "(key 'architectures')"
            )
        if archs[0] not in _MODEL_TYPE_BY_ARCH:
            raise UnsupportedConfigError(
                f"{source}: architecture {archs[0]!r} is not supported, expected one of "
                f"{sorted(_MODEL_TYPE_BY_ARCH)} (key 'architectures')"
            )
        arch = archs[0]
        model_type = hf.get("model_type")
        if model_type is not None and model_type != _MODEL_TYPE_BY_ARCH[arch]:
            raise UnsupportedConfigError(
                f"{source}: model_type={model_type!r} contradicts architectures=[{arch!r}] "
                "(key 'model_type')"
            )
        return arch
    model_type = hf.get("model_type")
    if model_type not in _ARCH_BY_MODEL_TYPE:
        raise UnsupportedConfigError(
            f"{source}: model_type {model_type!r} is not supported, expected one of "
            f"{sorted(_ARCH_BY_MODEL_TYPE)} (key 'model_type')"
        )
    return _ARCH_BY_MODEL_TYPE[str(model_type)]


def _rope_theta(hf: Mapping[str, Any], source: str, default: float) -> float:
    params = hf.get("rope_parameters")
    if params is None:
        params = hf.get("rope_scaling")
        key = "rope_scaling"
    else:
        key = "rope_parameters"
    theta: Any = hf.get("rope_theta", default)
    if params is not None:
        if not isinstance(params, Mapping):
            raise UnsupportedConfigError(f"{source}: {key} must be an object (key '{key}')")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedConfigError(
                f"{source}: rope_type={rope_type!r} is not supported, swarmlm implements plain "
                f"RoPE only (key '{key}.rope_type')"
            )
        theta = params.get("rope_theta", theta)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise UnsupportedConfigError(
            f"{source}: rope_theta must be a positive number, got {theta!r} (key 'rope_theta')"
        )
    return float(theta)


class _KeyReader:
    """Typed access to config.json keys with errors naming the key and the file."""

    def __init__(self, hf: Mapping[str, Any], source: str) -> None:
        self.hf = hf
        self.source = source

    _MISSING = object()

    def _get(self, key: str, default: Any) -> Any:
        if key in self.hf and self.hf[key] is not None:
            return self.hf[key]
        if default is self._MISSING:
            raise UnsupportedConfigError(f"{self.source}: required key '{key}' is missing")
        return default

    def integer(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise UnsupportedConfigError(
                f"{self.source}: key '{key}' must be an integer, got {value!r}"
            )
        return value

    def number(self, key: str, default: Any = _MISSING) -> float:
        value = self._get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise UnsupportedConfigError(
                f"{self.source}: key '{key}' must be a finite number, got {value!r}"
            )
        return float(value)

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise UnsupportedConfigError(f"{self.source}: key '{key}' must be true/false")
        return value


# ---- weights ----------------------------------------------------------------------------------


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """swarmlm parameter names -> shapes, computed on the meta device (no memory allocated)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _swarmlm_state(
    model_or_state: Transformer | Mapping[str, Tensor], cfg: ModelConfig
) -> dict[str, Tensor]:
    """Validated swarmlm state dict (``lm_head.weight`` dropped when tied).

    Accepts a live model, its ``state_dict()``, a ``torch.compile``d model's state dict (keys
    prefixed ``_orig_mod.``) and a state dict that omits the tied ``lm_head.weight``.
    """
    if isinstance(model_or_state, torch.nn.Module):
        state: dict[str, Tensor] = dict(model_or_state.state_dict())
    else:
        state = dict(model_or_state)
    for prefix in ("_orig_mod.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    expected = _expected_shapes(cfg)
    if cfg.tie_embeddings:
        head = state.pop("lm_head.weight", None)
        embed = state.get("embed.weight")
        if head is not None and embed is not None and not torch.equal(head, embed):
            raise WeightFileError(
                "lm_head.weight differs from embed.weight although tie_embeddings=True "
                "(field 'tie_embeddings')"
            )
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise WeightFileError(f"state dict lacks tensor {missing[0]!r} ({len(missing)} missing)")
    if unexpected:
        raise WeightFileError(
            f"state dict has tensor {unexpected[0]!r} that this ModelConfig does not define "
            f"({len(unexpected)} unexpected)"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise WeightFileError(
                f"tensor {name!r} has shape {tuple(state[name].shape)}, the config needs {shape}"
            )
    return state


def to_hf_state_dict(
    model_or_state: Transformer | Mapping[str, Tensor],
    cfg: ModelConfig,
    *,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """swarmlm tensors under transformers names, as fresh contiguous CPU tensors in ``dtype``.

    MoE experts are written per expert, ``w1`` = gate, ``w3`` = up, ``w2`` = down, under
    ``block_sparse_moe`` (what transformers 5 ``save_pretrained`` writes and every Mixtral
    reader understands). Tied models omit ``lm_head.weight``, as ``save_pretrained`` does.
    """
    state = _swarmlm_state(model_or_state, cfg)

    def put(t: Tensor) -> Tensor:
        # clone: slices of a stacked expert tensor share storage, which safetensors refuses.
        return t.detach().to(device="cpu", dtype=dtype).contiguous().clone()

    out: dict[str, Tensor] = {}
    for name, t in state.items():
        if cfg.is_moe and ".ffn.w_" in name:
            layer, kind = re.fullmatch(r"blocks\.(\d+)\.ffn\.(w_gate|w_up|w_down)", name).groups()  # type: ignore[union-attr]
            w = {"w_gate": "w1", "w_down": "w2", "w_up": "w3"}[kind]
            for e in range(cfg.n_experts):
                out[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"] = put(t[e])
        else:
            out[_hf_name(name, cfg)] = put(t)
    return out


_SIMPLE_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.w_gate": "mlp.gate_proj",
    "ffn.w_up": "mlp.up_proj",
    "ffn.w_down": "mlp.down_proj",
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj",
}


def _hf_name(name: str, cfg: ModelConfig) -> str:
    if name in _SIMPLE_NAMES:
        return _SIMPLE_NAMES[name]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m is not None:
        layer, rest = m.groups()
        if cfg.is_moe and rest == "ffn.router.weight":
            return f"model.layers.{layer}.block_sparse_moe.gate.weight"
        for ours, theirs in _BLOCK_NAMES.items():
            if rest == ours or rest.startswith(ours + "."):
                return f"model.layers.{layer}.{theirs}{rest[len(ours) :]}"
    raise WeightFileError(f"no Hugging Face name for swarmlm tensor {name!r}")


def from_hf_state_dict(
    tensors: Mapping[str, Tensor], cfg: ModelConfig, *, source: str = "checkpoint"
) -> dict[str, Tensor]:
    """transformers tensors -> swarmlm state dict for ``cfg`` (``lm_head.weight`` only if untied).

    Reads both Mixtral layouts: per-expert ``block_sparse_moe.experts.{e}.w{1,2,3}`` and the
    fused transformers-5 ``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj`` /
    ``mlp.gate``. Missing, unexpected or misshapen tensors raise :class:`WeightFileError`
    naming the tensor and ``source``.
    """
    remaining = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    expected = _expected_shapes(cfg)
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")

    def take(hf_name: str) -> Tensor:
        if hf_name not in remaining:
            raise WeightFileError(f"{source}: tensor {hf_name!r} is missing")
        return remaining.pop(hf_name)

    state: dict[str, Tensor] = {}
    for name in expected:
        if cfg.is_moe and ".ffn." in name and not name.endswith("router.weight"):
            continue
        if cfg.is_moe and name.endswith("ffn.router.weight"):
            block = name.split(".")[1]
            fused = f"model.layers.{block}.mlp.gate.weight"
            legacy = f"model.layers.{block}.block_sparse_moe.gate.weight"
            state[name] = take(fused if fused in remaining else legacy)
            continue
        state[name] = take(_hf_name(name, cfg))
    if cfg.is_moe:
        for layer in range(cfg.n_layers):
            state.update(_experts_from_hf(remaining, take, cfg, layer))
    if remaining:
        extra = sorted(remaining)
        raise WeightFileError(
            f"{source}: tensor {extra[0]!r} has no place in a {hf_architecture(cfg)} with this "
            f"config ({len(extra)} unexpected tensors)"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise WeightFileError(
                f"{source}: tensor for {name!r} has shape {tuple(state[name].shape)}, "
                f"config.json implies {shape}"
            )
    return state


def _experts_from_hf(
    remaining: Mapping[str, Tensor], take: Any, cfg: ModelConfig, layer: int
) -> dict[str, Tensor]:
    prefix = f"model.layers.{layer}"
    ours = f"blocks.{layer}.ffn"
    fused = f"{prefix}.mlp.experts.gate_up_proj"
    if fused in remaining:
        gate_up: Tensor = take(fused)
        down: Tensor = take(f"{prefix}.mlp.experts.down_proj")
        if gate_up.ndim != 3 or gate_up.shape[1] != 2 * cfg.ffn_dim:
            raise WeightFileError(
                f"tensor {fused!r} has shape {tuple(gate_up.shape)}, expected "
                f"({cfg.n_experts}, {2 * cfg.ffn_dim}, {cfg.d_model})"
            )
        gate, up = gate_up.split(cfg.ffn_dim, dim=1)
        return {f"{ours}.w_gate": gate, f"{ours}.w_up": up, f"{ours}.w_down": down}
    out: dict[str, Tensor] = {}
    for kind, w in (("w_gate", "w1"), ("w_down", "w2"), ("w_up", "w3")):
        per_expert = [
            take(f"{prefix}.block_sparse_moe.experts.{e}.{w}.weight") for e in range(cfg.n_experts)
        ]
        shapes = {tuple(t.shape) for t in per_expert}
        if len(shapes) != 1:
            raise WeightFileError(
                f"experts of layer {layer} disagree on the shape of {w}: {sorted(shapes)}"
            )
        out[f"{ours}.{kind}"] = torch.stack(per_expert)
    return out


# ---- export -----------------------------------------------------------------------------------


def export_hf(
    model_or_state: Transformer | Mapping[str, Tensor],
    cfg: ModelConfig | None,
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    drop_training_settings: bool = False,
    max_shard_bytes: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    tokenizer_json: str | None = None,
) -> Path:
    """Write a transformers checkpoint (``config.json`` + safetensors) to ``out_dir``.

    ``cfg`` may be None when a :class:`Transformer` is given (its own config is used). The
    directory appears atomically: everything is written and fsynced in a sibling temporary
    directory that is then renamed into place; an existing ``out_dir`` is refused unless
    ``overwrite``. With ``max_shard_bytes`` the weights are split into
    ``model-0000i-of-0000n.safetensors`` files plus ``model.safetensors.index.json``.

    ``tokenizer_json`` (a ``tokenizers`` ``tokenizer.json`` text, as swarmlm's tokenizer saves
    it) adds the files ``AutoTokenizer`` and ``pipeline("text-generation")`` need; the
    special-token ids must name tokens of that tokenizer. Any known id also goes to
    ``generation_config.json``, so ``generate`` stops at the end-of-sequence token as swarmlm
    does. Returns the output directory.
    """
    if cfg is None:
        if not isinstance(model_or_state, Transformer):
            raise UnsupportedConfigError("cfg is required when exporting a bare state dict")
        cfg = model_or_state.cfg
    check_exportable(cfg, drop_training_settings=drop_training_settings)
    ids = {"bos": bos_token_id, "eos": eos_token_id, "pad": pad_token_id}
    for role, tid in ids.items():
        if tid is not None and not 0 <= tid < cfg.vocab_size:
            raise UnsupportedConfigError(
                f"{role}_token_id {tid} is outside the vocabulary (vocab_size {cfg.vocab_size})"
            )
    tokenizer_files = (
        None if tokenizer_json is None else tokenizer_files_for(tokenizer_json, cfg, ids)
    )
    config = hf_config(
        cfg,
        dtype=dtype,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    tensors = to_hf_state_dict(model_or_state, cfg, dtype=dtype)
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise UnsupportedConfigError(f"max_shard_bytes must be positive, got {max_shard_bytes}")

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (CLI: --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_json(tmp / CONFIG_FILE, config)
        if any(tid is not None for tid in ids.values()):
            _write_json(
                tmp / GENERATION_CONFIG_FILE,
                {f"{role}_token_id": tid for role, tid in ids.items() if tid is not None},
            )
        for name, content in (tokenizer_files or {}).items():
            if isinstance(content, str):
                _write_text(tmp / name, content)
            else:
                _write_json(tmp / name, content)
        shards = _shard(tensors, max_shard_bytes)
        if len(shards) == 1:
            _write_safetensors(tmp / WEIGHTS_FILE, shards[0])
        else:
            weight_map: dict[str, str] = {}
            for i, shard in enumerate(shards, start=1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                _write_safetensors(tmp / fname, shard)
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            _write_json(
                tmp / INDEX_FILE,
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
            )
        fsync_dir(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.debug(
        "exported %s (%d tensors, %s) to %s", config["architectures"][0], len(tensors), dtype, out
    )
    return out


def _shard(tensors: dict[str, Tensor], max_bytes: int | None) -> list[dict[str, Tensor]]:
    """Greedy split in name order; a tensor larger than ``max_bytes`` gets a shard of its own."""
    if max_bytes is None:
        return [tensors]
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def tokenizer_files_for(
    tokenizer_json: str, cfg: ModelConfig, ids: Mapping[str, int | None]
) -> dict[str, str | dict[str, Any]]:
    """The tokenizer files of an export: ``tokenizer.json`` as given, plus the
    ``tokenizer_config.json`` and ``special_tokens_map.json`` that make ``AutoTokenizer`` load
    it as a plain fast tokenizer (not a Llama one, which would prepend a BOS swarmlm never
    trained on); ``ids`` maps ``bos``/``eos``/``pad`` to token ids (or None).

    The config keeps decoding byte-exact (no clean-up of spaces) and encodes a literal
    ``<|eos|>`` in text as ordinary bytes, as swarmlm's tokenizer does.
    """
    try:
        parsed = json.loads(tokenizer_json)
    except json.JSONDecodeError as exc:
        raise UnsupportedConfigError(f"the tokenizer is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict) or not isinstance(parsed.get("model"), dict):
        raise UnsupportedConfigError("the tokenizer is not a tokenizers tokenizer.json")
    added = {
        t["id"]: t["content"]
        for t in parsed.get("added_tokens") or []
        if isinstance(t, dict) and isinstance(t.get("id"), int)
    }
    vocab = parsed["model"].get("vocab")
    size = max([*added, *(vocab.values() if isinstance(vocab, dict) else [])], default=-1) + 1
    if size > cfg.vocab_size:
        raise UnsupportedConfigError(
            f"the tokenizer has {size} ids but the model's vocab_size is {cfg.vocab_size}: "
            "it is not this model's tokenizer"
        )
    special: dict[str, str] = {}
    for role, tid in ids.items():
        if tid is None:
            continue
        if tid not in added:
            raise UnsupportedConfigError(
                f"{role}_token_id {tid} is not a special token of the tokenizer "
                f"(its special tokens: {sorted(added.items())})"
            )
        special[f"{role}_token"] = added[tid]
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.max_seq_len,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "add_bos_token": False,
        "add_eos_token": False,
        **special,
    }
    return {
        TOKENIZER_FILE: tokenizer_json,
        TOKENIZER_CONFIG_FILE: tokenizer_config,
        SPECIAL_TOKENS_FILE: special,
    }


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: object) -> None:
    _write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_safetensors(
    path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing target is moved aside first, then deleted, so
    readers see either the old or the new complete directory (never a mix)."""
    if not target.exists():
        os.replace(new, target)
        fsync_dir(target.parent)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


# ---- import -----------------------------------------------------------------------------------


def import_hf(
    path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32
) -> tuple[ModelConfig, Transformer]:
    """Load a Llama/Mistral/Mixtral checkpoint directory as a swarmlm model in ``dtype``.

    Reads ``config.json`` and either ``model.safetensors`` or the sharded
    ``model.safetensors.index.json``. A config that declares tied embeddings but ships a
    different ``lm_head.weight`` is imported untied, as transformers does.
    """
    root = Path(path)
    if not root.is_dir():
        raise WeightFileError(f"{root} is not a directory (expected a Hugging Face checkpoint)")
    config_path = root / CONFIG_FILE
    hf = _read_json(config_path)
    cfg = config_from_hf(hf, source=str(config_path))
    tensors = dict(_read_hf_tensors(root))
    embed = tensors.get("model.embed_tokens.weight")
    if cfg.tie_embeddings and "lm_head.weight" in tensors and embed is not None:
        if torch.equal(tensors["lm_head.weight"], embed):
            del tensors["lm_head.weight"]
        else:
            logger.warning(
                "%s: tie_word_embeddings is true but lm_head.weight differs from the embedding;"
                " importing untied, as transformers does",
                config_path,
            )
            cfg = cfg.model_copy(update={"tie_embeddings": False})
    state = from_hf_state_dict(tensors, cfg, source=str(root))
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model = Transformer(cfg)
    with torch.no_grad():
        model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return cfg, model.to(dtype)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WeightFileError(f"{path} is missing") from None
    except OSError as exc:
        raise WeightFileError(f"{path} cannot be read: {exc}") from exc
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WeightFileError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise WeightFileError(f"{path} must hold a JSON object")
    return obj


def _read_hf_tensors(root: Path) -> Iterator[tuple[str, Tensor]]:
    index_path = root / INDEX_FILE
    if index_path.exists():
        index = _read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise WeightFileError(f"{index_path}: 'weight_map' must map tensor names to files")
        by_file: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            if Path(fname).name != fname:
                raise WeightFileError(
                    f"{index_path}: shard name {fname!r} must be a bare file name"
                )
            by_file.setdefault(fname, []).append(name)
        for fname, names in sorted(by_file.items()):
            shard = _read_safetensors(root / fname)
            for name in names:
                if name not in shard:
                    raise WeightFileError(
                        f"{root / fname}: tensor {name!r} listed in {INDEX_FILE} is missing"
                    )
                yield name, shard[name]
        return
    single = root / WEIGHTS_FILE
    if not single.exists():
        found = sorted(p.name for p in root.iterdir() if p.suffix in {".bin", ".pt", ".pth"})
        hint = f" (found {found}: only safetensors weights are supported)" if found else ""
        raise WeightFileError(f"{root}: neither {WEIGHTS_FILE} nor {INDEX_FILE} exists{hint}")
    yield from _read_safetensors(single).items()


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    return _read_safetensors_with_metadata(path)[0]


def _read_safetensors_with_metadata(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not path.exists():
        raise WeightFileError(f"weight file {path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightFileError(f"weight file {path} is corrupt or unreadable: {exc}") from exc
    return tensors, dict(metadata)


# ---- swarmlm's own weight files (the export-hf CLI input) -------------------------------------


def save_swarmlm_weights(
    model_or_state: Transformer | Mapping[str, Tensor],
    cfg: ModelConfig | None,
    path: str | os.PathLike[str],
) -> Path:
    """Write one safetensors file of swarmlm-named tensors with the ModelConfig in its metadata.

    The file appears atomically (:func:`swarmlm.atomic.atomic_path`). A tied
    ``lm_head.weight`` is omitted (it is the embedding).
    """
    if cfg is None:
        if not isinstance(model_or_state, Transformer):
            raise UnsupportedConfigError("cfg is required when saving a bare state dict")
        cfg = model_or_state.cfg
    state = {
        k: v.detach().to("cpu").contiguous().clone()
        for k, v in _swarmlm_state(model_or_state, cfg).items()
    }
    target = Path(path)
    with atomic_path(target) as tmp:
        save_file(
            state,
            str(tmp),
            metadata={"format": "pt", SWARMLM_CONFIG_METADATA_KEY: cfg.model_dump_json()},
        )
    return target


def load_swarmlm_weights(path: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Read a swarmlm checkpoint: a directory holding ``config.json`` (a ModelConfig dump) and
    ``model.safetensors``, or a single ``.safetensors`` file whose metadata key
    ``swarmlm.model_config`` holds the ModelConfig JSON. Returns the config and the state dict.
    """
    p = Path(path)
    if p.is_dir():
        config_path = p / CONFIG_FILE
        raw = _read_json(config_path)
        cfg = _model_config(raw, str(config_path))
        tensors, _ = _read_safetensors_with_metadata(p / WEIGHTS_FILE)
    elif p.is_file():
        tensors, metadata = _read_safetensors_with_metadata(p)
        if SWARMLM_CONFIG_METADATA_KEY not in metadata:
            raise WeightFileError(
                f"{p} has no '{SWARMLM_CONFIG_METADATA_KEY}' metadata; pass a directory with "
                "config.json instead, or write the file with save_swarmlm_weights"
            )
        try:
            raw = json.loads(metadata[SWARMLM_CONFIG_METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise WeightFileError(
                f"{p}: metadata '{SWARMLM_CONFIG_METADATA_KEY}' is not valid JSON: {exc}"
            ) from exc
        cfg = _model_config(raw, f"{p} metadata '{SWARMLM_CONFIG_METADATA_KEY}'")
    else:
        raise WeightFileError(f"checkpoint {p} does not exist")
    try:
        state = _swarmlm_state(tensors, cfg)
    except WeightFileError as exc:
        raise WeightFileError(f"{p}: {exc}") from exc
    return cfg, state


def _model_config(raw: object, source: str) -> ModelConfig:
    if not isinstance(raw, dict):
        raise UnsupportedConfigError(f"{source} must hold a JSON object (a ModelConfig dump)")
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as exc:
        raise UnsupportedConfigError(f"{source} is not a valid ModelConfig:\n{exc}") from exc

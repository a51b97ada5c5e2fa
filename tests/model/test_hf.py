"""Hugging Face interop: exports load in transformers with the same logits, and import back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from swarmlm.model import BlockSparseConfig, ModelConfig, Transformer
from swarmlm.model.hf import (
    UnsupportedConfigError,
    WeightFileError,
    config_from_hf,
    export_hf,
    import_hf,
    load_swarmlm_weights,
    save_swarmlm_weights,
)

transformers = pytest.importorskip("transformers")

TOL = 1e-4
SMALL = dict(
    vocab_size=96,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    d_ff=40,
    max_seq_len=64,
    rope_theta=500.0,
    norm_eps=1e-6,
)
CONFIGS = {
    "dense": ModelConfig(**SMALL, tie_embeddings=False),
    "sliding_window": ModelConfig(**SMALL, sliding_window=6),
    "moe": ModelConfig(
        **{**SMALL, "n_layers": 3},
        n_experts=4,
        top_k=2,
        moe_aux_loss_coef=0.02,
        tie_embeddings=False,
    ),
}
ARCHS = {
    "dense": "LlamaForCausalLM",
    "sliding_window": "MistralForCausalLM",
    "moe": "MixtralForCausalLM",
}


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A model whose norms and weights are all far from their init, so a mis-mapped tensor
    (a swapped gate/up, a transposed expert) cannot hide behind symmetric initial values."""
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def our_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    kind = request.param
    model = random_model(CONFIGS[kind])
    out = export_hf(model, None, tmp_path_factory.mktemp(kind) / "hf")
    return kind, model, out


def test_export_loads_in_transformers_with_the_same_fp32_logits(exported) -> None:
    kind, model, out = exported
    torch.manual_seed(1)
    # 40 tokens: well past the sliding window of 6, so the windowed mask is exercised.
    ids = torch.randint(0, model.cfg.vocab_size, (3, 40))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf_model).__name__ == ARCHS[kind]
    with torch.no_grad():
        theirs = hf_model(ids).logits
    ours = our_logits(model, ids)
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() <= TOL


def test_sliding_window_parity_is_not_vacuous(tmp_path: Path) -> None:
    """The windowed model's late logits differ from the same weights without a window, so the
    parity above proves transformers applied the same window, not merely causal attention."""
    windowed = random_model(CONFIGS["sliding_window"])
    full_cfg = CONFIGS["sliding_window"].model_copy(update={"sliding_window": None})
    full = Transformer(full_cfg).eval()
    full.load_state_dict(windowed.state_dict())
    ids = torch.randint(0, 96, (2, 30))
    a, b = our_logits(windowed, ids), our_logits(full, ids)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert (a[:, 6:] - b[:, 6:]).abs().max().item() > 1e-3
    out = export_hf(windowed, None, tmp_path / "hf")
    assert (hf_logits(out, ids) - a).abs().max().item() <= TOL


def test_import_restores_the_config_and_the_logits(exported) -> None:
    _kind, model, out = exported
    cfg, back = import_hf(out)
    assert cfg == model.cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    ids = torch.randint(0, cfg.vocab_size, (2, 25))
    assert torch.equal(our_logits(back, ids), our_logits(model, ids))


def test_config_json_uses_the_keys_transformers_reads(exported) -> None:
    kind, model, out = exported
    cfg = model.cfg
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == [ARCHS[kind]]
    assert conf["model_type"] == ARCHS[kind].removesuffix("ForCausalLM").lower()
    assert conf["hidden_size"] == cfg.d_model
    assert conf["intermediate_size"] == cfg.ffn_dim
    assert conf["num_key_value_heads"] == cfg.kv_heads
    assert conf["rope_parameters"] == {"rope_type": "default", "rope_theta": cfg.rope_theta}
    assert conf["rms_norm_eps"] == cfg.norm_eps
    assert conf["max_position_embeddings"] == cfg.max_seq_len
    assert conf["tie_word_embeddings"] == cfg.tie_embeddings
    assert conf["dtype"] == "float32"
    hf_cfg = transformers.AutoConfig.from_pretrained(out)
    assert hf_cfg.rope_parameters["rope_theta"] == cfg.rope_theta
    if kind == "sliding_window":
        assert hf_cfg.sliding_window == 6
    if kind == "moe":
        assert hf_cfg.num_local_experts == 4
        assert hf_cfg.num_experts_per_tok == 2
        # swarmlm sums per-layer losses over 3 layers; Mixtral pools layers and counts top_k
        # assignments per token: coef * n_layers / top_k makes a uniform router cost the same.
        assert hf_cfg.router_aux_loss_coef == pytest.approx(0.02 * 3 / 2)


def test_mixtral_export_uses_the_tensor_names_save_pretrained_writes(tmp_path: Path) -> None:
    cfg = CONFIGS["moe"]
    hf_cfg = transformers.MixtralConfig(**json.loads(json.dumps(_hf_kwargs(cfg))))
    reference = tmp_path / "reference"
    transformers.MixtralForCausalLM(hf_cfg).save_pretrained(reference)
    ours = export_hf(random_model(cfg), None, tmp_path / "ours")
    with (
        safe_open(str(reference / "model.safetensors"), "pt") as f_ref,
        safe_open(str(ours / "model.safetensors"), "pt") as f_ours,
    ):
        ref_shapes = {k: f_ref.get_slice(k).get_shape() for k in f_ref.keys()}  # noqa: SIM118
        our_shapes = {k: f_ours.get_slice(k).get_shape() for k in f_ours.keys()}  # noqa: SIM118
    assert our_shapes == ref_shapes


def _hf_kwargs(cfg: ModelConfig) -> dict[str, object]:
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        num_local_experts=cfg.n_experts,
        num_experts_per_tok=cfg.top_k,
        tie_word_embeddings=cfg.tie_embeddings,
    )


def test_tied_and_biased_llama_round_trips(tmp_path: Path) -> None:
    cfg = ModelConfig(**SMALL, bias=True, tie_embeddings=True)
    model = random_model(cfg)
    out = export_hf(model, None, tmp_path / "hf")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names  # tied: the embedding is the head, as HF saves it
    assert "model.layers.0.self_attn.q_proj.bias" in names
    assert "model.layers.1.mlp.down_proj.bias" in names
    ids = torch.randint(0, 96, (2, 20))
    assert (hf_logits(out, ids) - our_logits(model, ids)).abs().max().item() <= TOL
    cfg_back, back = import_hf(out)
    assert cfg_back == cfg
    assert back.lm_head.weight is back.embed.weight


def test_sharded_export_loads_in_transformers_and_imports_back(tmp_path: Path) -> None:
    cfg = CONFIGS["moe"]
    model = random_model(cfg)
    out = export_hf(model, None, tmp_path / "hf", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2
    assert not (out / "model.safetensors").exists()
    ids = torch.randint(0, 96, (2, 16))
    assert (hf_logits(out, ids) - our_logits(model, ids)).abs().max().item() <= TOL
    _, back = import_hf(out)
    assert torch.equal(our_logits(back, ids), our_logits(model, ids))


def test_bfloat16_export_declares_and_stores_bfloat16(tmp_path: Path) -> None:
    model = random_model(CONFIGS["dense"])
    out = export_hf(model, None, tmp_path / "hf", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    _, back = import_hf(out)
    expected = model.embed.weight.detach().to(torch.bfloat16).float()
    assert torch.equal(back.embed.weight, expected)


def test_imports_checkpoints_written_by_transformers_in_both_mixtral_layouts(
    tmp_path: Path,
) -> None:
    """save_pretrained writes per-expert w1/w2/w3; a transformers-5 in-memory state dict has
    fused gate_up_proj/down_proj. Both must import to the same logits as transformers."""
    torch.manual_seed(3)
    hf_cfg = transformers.MixtralConfig(
        vocab_size=80,
        hidden_size=24,
        intermediate_size=36,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        num_local_experts=3,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        sliding_window=5,
    )
    hf_model = transformers.MixtralForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(0, 80, (2, 18))
    with torch.no_grad():
        expected = hf_model(ids).logits

    saved = tmp_path / "saved"
    hf_model.save_pretrained(saved)
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((saved / "config.json").read_text())
    state = {k: v.contiguous().clone() for k, v in hf_model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})

    for path in (saved, fused):
        cfg, model = import_hf(path)
        assert cfg.sliding_window == 5
        assert cfg.n_experts == 3
        assert cfg.kv_heads == 1
        assert (our_logits(model, ids) - expected).abs().max().item() <= TOL


REFUSED = [
    ({"pos_encoding": "learned"}, "pos_encoding"),
    ({"pos_encoding": "sinusoidal"}, "pos_encoding"),
    ({"norm": "layernorm"}, "norm"),
    ({"ffn": "gelu"}, "ffn"),
    ({"block_sparse": BlockSparseConfig()}, "block_sparse"),
    ({"bias": True, "sliding_window": 8}, "bias"),
    ({"bias": True, "n_experts": 2, "top_k": 1}, "bias"),
    ({"resid_dropout": 0.1}, "resid_dropout"),
    ({"n_experts": 2, "top_k": 1, "moe_z_loss_coef": 1e-3}, "moe_z_loss_coef"),
]


@pytest.mark.parametrize(("overrides", "field"), REFUSED)
def test_export_refuses_what_the_format_cannot_express_naming_the_field(
    tmp_path: Path, overrides: dict[str, object], field: str
) -> None:
    cfg = ModelConfig(**{**SMALL, **overrides})
    out = tmp_path / "hf"
    with pytest.raises(UnsupportedConfigError, match=f"field '{field}'"):
        export_hf(Transformer(cfg), None, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind


def test_training_only_settings_export_when_explicitly_dropped(tmp_path: Path) -> None:
    cfg = ModelConfig(**SMALL, resid_dropout=0.1)
    model = random_model(cfg)
    out = export_hf(model, None, tmp_path / "hf", drop_training_settings=True)
    ids = torch.randint(0, 96, (1, 12))
    assert (hf_logits(out, ids) - our_logits(model, ids)).abs().max().item() <= TOL


def _llama_config(**overrides: object) -> dict[str, object]:
    conf: dict[str, object] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 32,
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    conf.update(overrides)
    return {k: v for k, v in conf.items() if v is not None}


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "architectures"),
        ({"architectures": None, "model_type": "qwen2"}, "model_type"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 8}, "head_dim"),
        ({"attention_bias": True}, "mlp_bias"),
        ({"hidden_size": None}, "hidden_size"),
        ({"vocab_size": "many"}, "vocab_size"),
        ({"num_key_value_heads": 3}, "n_kv_heads"),
    ],
)
def test_import_refuses_unsupported_configs_naming_the_key(
    overrides: dict[str, object], key: str
) -> None:
    with pytest.raises(UnsupportedConfigError, match=key):
        config_from_hf(_llama_config(**overrides))


def test_import_refuses_mixtral_router_jitter() -> None:
    conf = _llama_config(
        architectures=["MixtralForCausalLM"], model_type="mixtral", router_jitter_noise=0.1
    )
    with pytest.raises(UnsupportedConfigError, match="router_jitter_noise"):
        config_from_hf(conf)


def test_corrupt_weight_file_gives_an_error_naming_the_file(exported, tmp_path: Path) -> None:
    _, _, out = exported
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((out / "config.json").read_text())
    data = (out / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match=r"broken/model\.safetensors"):
        import_hf(broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightFileError, match="corrupt"):
        import_hf(broken)


def test_missing_weights_give_errors_naming_what_is_missing(tmp_path: Path) -> None:
    cfg = CONFIGS["dense"]
    out = export_hf(random_model(cfg), None, tmp_path / "hf")
    (out / "model.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(WeightFileError, match=r"model\.safetensors"):
        import_hf(out)

    with safe_open(str(tmp_path / "moved.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(WeightFileError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        import_hf(out)

    (out / "config.json").unlink()
    with pytest.raises(WeightFileError, match=r"config\.json is missing"):
        import_hf(out)


def test_shard_listed_in_index_but_absent_is_named(tmp_path: Path) -> None:
    out = export_hf(random_model(CONFIGS["dense"]), None, tmp_path / "hf", max_shard_bytes=9000)
    shard = sorted(out.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(WeightFileError, match=shard.name):
        import_hf(out)


def test_wrongly_shaped_weights_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    model = random_model(CONFIGS["dense"])
    state = model.state_dict()
    state["blocks.0.attn.q_proj.weight"] = torch.zeros(8, 32)
    with pytest.raises(WeightFileError, match=r"blocks\.0\.attn\.q_proj\.weight"):
        export_hf(state, model.cfg, tmp_path / "hf")


def test_export_never_clobbers_an_existing_directory_unless_asked(tmp_path: Path) -> None:
    out = tmp_path / "hf"
    first = random_model(CONFIGS["dense"], seed=0)
    second = random_model(CONFIGS["dense"], seed=1)
    export_hf(first, None, out)
    with pytest.raises(FileExistsError):
        export_hf(second, None, out)
    _, back = import_hf(out)
    assert torch.equal(back.embed.weight, first.embed.weight)
    export_hf(second, None, out, overwrite=True)
    _, back = import_hf(out)
    assert torch.equal(back.embed.weight, second.embed.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def _cli(argv: list[str]) -> int:
    from swarmlm.cli import main

    return main(argv)


def test_cli_exports_a_single_file_checkpoint_with_config_metadata(tmp_path: Path) -> None:
    model = random_model(CONFIGS["sliding_window"])
    ckpt = save_swarmlm_weights(model, None, tmp_path / "run" / "model.safetensors")
    cfg, state = load_swarmlm_weights(ckpt)
    assert cfg == model.cfg
    assert "lm_head.weight" not in state  # tied: stored once
    out = tmp_path / "hf"
    assert _cli(["export-hf", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    ids = torch.randint(0, 96, (2, 20))
    assert (hf_logits(out, ids) - our_logits(model, ids)).abs().max().item() <= TOL


def test_cli_exports_a_checkpoint_directory(tmp_path: Path) -> None:
    model = random_model(CONFIGS["moe"])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(model.cfg.model_dump_json())
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors")
    )
    out = tmp_path / "hf"
    assert _cli(["export-hf", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    cfg, back = import_hf(out)
    assert cfg == model.cfg
    ids = torch.randint(0, 96, (2, 10))
    assert torch.equal(our_logits(back, ids), our_logits(model, ids))


def test_cli_reports_a_refused_config_and_exits_nonzero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = random_model(ModelConfig(**SMALL, norm="layernorm"))
    ckpt = save_swarmlm_weights(model, None, tmp_path / "model.safetensors")
    out = tmp_path / "hf"
    assert _cli(["export-hf", "--checkpoint", str(ckpt), "--out", str(out)]) == 1  # runtime
    assert "field 'norm'" in capsys.readouterr().err
    assert not out.exists()


def test_cli_reports_a_weights_file_without_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(2)}, str(bare))
    assert _cli(["export-hf", "--checkpoint", str(bare), "--out", str(tmp_path / "hf")]) == 1
    assert "swarmlm.model_config" in capsys.readouterr().err


def test_cli_import_then_export_reproduces_a_transformers_checkpoint(tmp_path: Path) -> None:
    model = random_model(CONFIGS["dense"])
    original = export_hf(model, None, tmp_path / "original")
    weights = tmp_path / "imported.safetensors"
    assert _cli(["import-hf", "--hf", str(original), "--out", str(weights)]) == 0
    assert _cli(["import-hf", "--hf", str(original), "--out", str(weights)]) == 2  # usage
    again = tmp_path / "again"
    assert _cli(["export-hf", "--checkpoint", str(weights), "--out", str(again)]) == 0
    with (
        safe_open(str(original / "model.safetensors"), "pt") as a,
        safe_open(str(again / "model.safetensors"), "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():  # noqa: SIM118
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_exports_the_state_dict_of_a_compiled_model(tmp_path: Path) -> None:
    model = random_model(CONFIGS["dense"])
    compiled_keys = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    out = export_hf(compiled_keys, model.cfg, tmp_path / "hf")
    _, back = import_hf(out)
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)


def test_tied_config_with_a_distinct_head_imports_untied_like_transformers(
    tmp_path: Path,
) -> None:
    model = random_model(CONFIGS["dense"])  # untied
    out = export_hf(model, None, tmp_path / "hf")
    conf = json.loads((out / "config.json").read_text())
    conf["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(conf))
    cfg, back = import_hf(out)
    assert not cfg.tie_embeddings
    ids = torch.randint(0, 96, (2, 12))
    assert (hf_logits(out, ids) - our_logits(back, ids)).abs().max().item() <= TOL
    assert torch.equal(our_logits(back, ids), our_logits(model, ids))

"""`swarmlm eval`, `generate`, `export-hf` and `import-hf`: the commands that use a trained model.

They live beside `swarmlm train` because they read the trainer's checkpoints (verified against
their manifest) and the run config inside them; `swarmlm.model.hf` stays a library.

Errors are raised, not printed: :func:`swarmlm.cli.main` turns them into one line and an exit
code (2 when the command line is wrong, 1 when the inputs or the work fail).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarmlm.cli import UsageError

if TYPE_CHECKING:
    from torch import Tensor

    from swarmlm.model.config import ModelConfig
    from swarmlm.model.transformer import Transformer

log = logging.getLogger(__name__)

Subparsers = Any  # argparse._SubParsersAction, which typeshed keeps private

CHECKPOINT_HELP = (
    "a run directory (its latest checkpoint), a checkpoint directory "
    "(<run>/checkpoints/step-N) or the <run>/checkpoints/latest pointer"
)
DEFAULT_TEMPERATURE = 0.8


def add_model_parsers(subparsers: Subparsers) -> None:
    """Register eval, generate, export-hf and import-hf."""
    ev = subparsers.add_parser("eval", help="evaluate a checkpoint on a validation split")
    ev.add_argument("--checkpoint", type=Path, required=True, help=CHECKPOINT_HELP)
    ev.add_argument(
        "--data", type=Path, default=None, help="prepared data dir (default: the run's)"
    )
    ev.add_argument("--max-batches", type=int, default=None)
    ev.set_defaults(handler=run_eval)

    gen = subparsers.add_parser(
        "generate",
        help="continue prompts with a trained model",
        description=(
            "Greedy decoding (or beam search with --beams N) unless sampling is asked for "
            "with --sample, --temperature, --top-k or --top-p. Prints each prompt followed by "
            "its continuation exactly as generated."
        ),
    )
    gen.add_argument("--checkpoint", type=Path, required=True, help=CHECKPOINT_HELP)
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    gen.add_argument(
        "--sample",
        action="store_true",
        help=f"sample (temperature {DEFAULT_TEMPERATURE} unless --temperature is given)",
    )
    gen.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    gen.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest")
    gen.add_argument("--top-p", type=float, default=None, help="sample from the top-p nucleus")
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument(
        "--beams", type=int, default=1, help="beam search with this many beams (1: greedy)"
    )
    gen.add_argument("--length-penalty", type=float, default=1.0, help="beam search only")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument(
        "--decode",
        choices=("fast", "compiled", "module"),
        default="fast",
        help="decode step: fused fast path (default), torch.compile'd, or the module path",
    )
    gen.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json override")
    gen.add_argument(
        "--logprobs",
        action="store_true",
        help="also print each new token with its log-probability",
    )
    gen.add_argument(
        "--json", action="store_true", help="print one JSON object (settings and results)"
    )
    gen.set_defaults(handler=run_generate)

    from swarmlm.model.hf import EXPORT_DTYPES, SWARMLM_CONFIG_METADATA_KEY

    exp = subparsers.add_parser(
        "export-hf",
        help="export a checkpoint as a Hugging Face Llama/Mistral/Mixtral directory",
        description=(
            "Write config.json, safetensors weights, generation_config.json and the tokenizer "
            "files, loadable with transformers' AutoModelForCausalLM/AutoTokenizer/pipeline. "
            f"CHECKPOINT is {CHECKPOINT_HELP} (its sha256 manifest is verified first), or a "
            "weights-only input: a directory with config.json (a ModelConfig dump) and "
            "model.safetensors, or a .safetensors file carrying the ModelConfig JSON in its "
            f"'{SWARMLM_CONFIG_METADATA_KEY}' metadata (what import-hf writes)."
        ),
    )
    exp.add_argument("--checkpoint", required=True, type=Path, help="swarmlm checkpoint")
    exp.add_argument("--out", required=True, type=Path, help="output directory")
    exp.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default="float32")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    exp.add_argument(
        "--drop-training-settings",
        action="store_true",
        help="export even if resid_dropout / moe_z_loss_coef (training-only) cannot be carried",
    )
    exp.add_argument(
        "--max-shard-mb", type=float, default=None, help="split weights into shards of this size"
    )
    exp.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tokenizer.json to ship (default: the run's, <data.path>/tokenizer.json)",
    )
    exp.add_argument(
        "--no-tokenizer", action="store_true", help="export the weights without tokenizer files"
    )
    exp.add_argument("--bos-token-id", type=int, default=None, help="default: the tokenizer's")
    exp.add_argument("--eos-token-id", type=int, default=None, help="default: the tokenizer's")
    exp.set_defaults(handler=run_export_hf)

    imp = subparsers.add_parser(
        "import-hf",
        help="convert a Hugging Face Llama/Mistral/Mixtral directory to a swarmlm weights file",
        description=(
            "Read config.json + model.safetensors (or a sharded index) and write one "
            "safetensors file of swarmlm tensors with the ModelConfig JSON in its "
            f"'{SWARMLM_CONFIG_METADATA_KEY}' metadata (the format export-hf reads)."
        ),
    )
    imp.add_argument("--hf", required=True, type=Path, help="Hugging Face checkpoint directory")
    imp.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    imp.set_defaults(handler=run_import_hf)


# ---- shared checks ----------------------------------------------------------------------------


def _existing(path: Path, flag: str, what: str) -> Path:
    """A path the user named must exist: otherwise it is a usage error that says which."""
    if not path.exists():
        raise UsageError(f"{flag} {path}: no such file or directory (expected {what})")
    return path


def _positive(value: int | float | None, flag: str) -> None:
    if value is not None and value <= 0:
        raise UsageError(f"{flag} must be positive, got {value}")


def _tokenizer_path(override: Path | None, data_path: Path) -> Path:
    """The tokenizer a run trained with (``<data.path>/tokenizer.json``) or the override."""
    if override is not None:
        return _existing(override, "--tokenizer", "a tokenizer.json")
    path = data_path / "tokenizer.json"
    if not path.is_file():
        from swarmlm.data.errors import TokenizerError

        # the hint (pass --tokenizer) comes from swarmlm.cli, as for every TokenizerError
        raise TokenizerError(
            f"the run's tokenizer {path} is missing (its data.path {data_path} moved or was "
            "deleted)"
        )
    return path


# ---- eval -------------------------------------------------------------------------------------


def run_eval(args: argparse.Namespace) -> int:
    _existing(args.checkpoint, "--checkpoint", CHECKPOINT_HELP)
    if args.data is not None:
        _existing(args.data, "--data", "a directory written by `swarmlm data prepare`")
    _positive(args.max_batches, "--max-batches")
    from swarmlm.train import RunConfig
    from swarmlm.train.checkpoint import load_checkpoint
    from swarmlm.train.trainer import Trainer

    ckpt = load_checkpoint(args.checkpoint)
    cfg = RunConfig.model_validate(ckpt.state["config"])
    if args.data is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": args.data})})
    trainer = Trainer(cfg, show_progress=False)
    trainer.parallel.load_model_state(trainer.model, ckpt.model_state)
    result = trainer.evaluate(max_batches=args.max_batches)
    trainer.loader.close()
    print(json.dumps({"checkpoint": str(ckpt.path), **result.as_dict()}, indent=2))
    return 0


# ---- generate ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodingChoice:
    """What the flags ask for, resolved once so the text and JSON outputs report the same."""

    mode: str  # "greedy", "sample" or "beam"
    temperature: float

    @property
    def do_sample(self) -> bool:
        return self.mode == "sample"


def decoding_choice(args: argparse.Namespace) -> DecodingChoice:
    """Deterministic decoding unless sampling is asked for, as in transformers' ``generate``:
    ``--beams 1`` is greedy, ``--beams N`` beam search; ``--sample`` or any of
    ``--temperature/--top-k/--top-p`` samples. Contradictory flags are a usage error."""
    sampling_flags = [
        flag
        for flag, value in (
            ("--sample", args.sample or None),
            ("--temperature", args.temperature),
            ("--top-k", args.top_k),
            ("--top-p", args.top_p),
        )
        if value is not None
    ]
    if args.beams < 1:
        raise UsageError(f"--beams must be at least 1, got {args.beams}")
    if sampling_flags and args.greedy:
        raise UsageError(f"--greedy contradicts {', '.join(sampling_flags)}: drop one of them")
    if sampling_flags and args.beams > 1:
        raise UsageError(
            f"beam search (--beams {args.beams}) does not sample: drop "
            f"{', '.join(sampling_flags)}, or use --beams 1"
        )
    temperature = DEFAULT_TEMPERATURE if args.temperature is None else args.temperature
    if temperature <= 0:
        raise UsageError(f"--temperature must be positive, got {temperature} (for greedy: omit)")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.repetition_penalty <= 0:
        raise UsageError(f"--repetition-penalty must be positive, got {args.repetition_penalty}")
    if sampling_flags:
        return DecodingChoice("sample", temperature)
    return DecodingChoice("beam" if args.beams > 1 else "greedy", 1.0)


def run_generate(args: argparse.Namespace) -> int:
    choice = decoding_choice(args)
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be 0 or more, got {args.max_new_tokens}")
    _existing(args.checkpoint, "--checkpoint", CHECKPOINT_HELP)
    from swarmlm.data import Tokenizer
    from swarmlm.model.generate import GenerationConfig, generate

    model, source = load_for_inference(args.checkpoint)
    if source.data_path is None and args.tokenizer is None:
        raise UsageError(
            f"{source.described} names no tokenizer: pass --tokenizer PATH (a tokenizer.json)"
        )
    tokenizer = Tokenizer.load(_tokenizer_path(args.tokenizer, source.data_path or Path()))
    context = source.cfg.max_seq_len
    prompts = [tokenizer.encode(p) for p in args.prompt]
    for text, ids in zip(args.prompt, prompts, strict=True):
        if not ids:
            raise UsageError("--prompt is empty: give at least one character")
        if len(ids) + args.max_new_tokens > context:
            raise UsageError(
                f"prompt {text[:40]!r} ({len(ids)} tokens) plus --max-new-tokens "
                f"{args.max_new_tokens} exceeds the model's context of {context} tokens: "
                f"use --max-new-tokens {max(0, context - len(ids))} or less"
            )
    gen_cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=choice.do_sample,
        temperature=choice.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        num_beams=args.beams,
        length_penalty=args.length_penalty,
        stop_tokens=[tokenizer.eos_id],
        pad_token_id=tokenizer.pad_id,
        seed=args.seed,
        decode=args.decode,
    )
    out = generate(model, prompts, gen_cfg)
    results: list[dict[str, Any]] = []
    for row, text in enumerate(args.prompt):
        tokens = out.sequences[row]
        completion = tokenizer.decode(tokens)
        result: dict[str, Any] = {
            "prompt": text,
            "completion": completion,
            "text": text + completion,
            "finish_reason": out.finish_reasons[row],
            "token_ids": tokens,
        }
        if args.logprobs:
            lps = out.logprobs[row]
            result["tokens"] = [
                {"id": t, "text": tokenizer.decode([t]), "logprob": lp}
                for t, lp in zip(tokens, lps, strict=True)
            ]
            result["sum_logprob"] = sum(lps)
        if choice.mode == "beam":
            result["beam_score"] = out.scores[row]
        results.append(result)
    if args.json:
        settings = {
            "checkpoint": str(args.checkpoint),
            "mode": choice.mode,
            "max_new_tokens": args.max_new_tokens,
            "temperature": choice.temperature if choice.do_sample else None,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "repetition_penalty": args.repetition_penalty,
            "beams": args.beams,
            "length_penalty": args.length_penalty if choice.mode == "beam" else None,
            "seed": args.seed if choice.do_sample else None,
        }
        _write_stdout(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
        return 0
    for result in results:
        # The model's text is data: written byte for byte, no markup, no wrapping.
        _write_stdout(result["text"] + "\n")
        if args.logprobs:
            _write_stdout(_logprob_table(result))
    return 0


def _logprob_table(result: dict[str, Any]) -> str:
    """One line per new token: position, log-probability, probability, the token as a
    Python string literal (so spaces and newlines stay visible and one token stays one line)."""
    import math

    lines = ["# token logprobs (position, logprob, prob, token)"]
    for i, tok in enumerate(result["tokens"]):
        lp = tok["logprob"]
        lines.append(f"{i}\t{lp:.4f}\t{math.exp(lp):.4f}\t{tok['text']!r}")
    lines.append(f"# sum {result['sum_logprob']:.4f} over {len(result['tokens'])} tokens")
    return "\n".join(lines) + "\n"


def _write_stdout(text: str) -> None:
    """Write text through stdout's encoding, never failing on a character the terminal's
    locale lacks (the model may emit any Unicode)."""
    sys.stdout.buffer.write(text.encode(sys.stdout.encoding or "utf-8", errors="replace"))
    sys.stdout.flush()


# ---- export-hf / import-hf --------------------------------------------------------------------


@dataclass
class ExportSource:
    """What export-hf read: the model, whether a manifest vouched for it, and the tokenizer."""

    cfg: ModelConfig
    state: dict[str, Tensor]
    verified: bool
    described: str
    data_path: Path | None  # the run's prepared data (where its tokenizer lives)


def _is_weights_only(path: Path) -> bool:
    """The import-hf / hand-made formats: no manifest, no trainer state, no run layout."""
    if path.is_file():
        return path.suffix == ".safetensors"
    markers = ("manifest.json", "state.json", "trainer.pt", "checkpoints")
    return (path / "config.json").is_file() and not any((path / m).exists() for m in markers)


def read_export_source(path: Path) -> ExportSource:
    """Load what ``--checkpoint`` names. A trainer checkpoint is verified against its sha256
    manifest first and refused if any file differs: an export is often the last step before a
    model leaves the swarm, and a corrupt weight file must not leave with it."""
    from swarmlm.model.hf import load_swarmlm_weights

    if _is_weights_only(path):
        cfg, state = load_swarmlm_weights(path)
        return ExportSource(cfg, state, False, f"weights file {path}", None)
    from swarmlm.model.config import ModelConfig
    from swarmlm.train.checkpoint import CheckpointError, load_checkpoint

    ckpt = load_checkpoint(path)  # resolves run dir / latest; verifies every checksum
    # Only the model and data sections are read (not the whole run config), so checkpoints of
    # every writer (trainer, swarm, rlhf) and of older run-config layouts export alike.
    run = ckpt.state.get("config")
    if not isinstance(run, dict) or not isinstance(run.get("model"), dict):
        raise CheckpointError(f"{ckpt.path}/state.json has no config.model section")
    data = run.get("data")
    data_path = Path(data["path"]) if isinstance(data, dict) and data.get("path") else None
    try:
        cfg = ModelConfig.model_validate(run["model"])
    except ValueError as exc:  # pydantic's ValidationError
        raise CheckpointError(f"{ckpt.path}/state.json: config.model is invalid: {exc}") from exc
    return ExportSource(
        cfg,
        dict(ckpt.model_state),
        True,
        f"checkpoint {ckpt.path}",
        data_path,
    )


def load_for_inference(path: Path) -> tuple[Transformer, ExportSource]:
    """A model in eval mode from anything ``export-hf`` reads (so ``generate`` also runs an
    ``import-hf`` weights file), built from the checkpoint's model section alone: a checkpoint
    stays usable when the run config around it gains or loses keys."""
    from swarmlm.model.hf import WeightFileError
    from swarmlm.model.transformer import Transformer

    source = read_export_source(path)
    state = dict(source.state)
    if source.cfg.tie_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["embed.weight"]
    model = Transformer(source.cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # missing/unexpected/misshapen tensors
        raise WeightFileError(f"{source.described} does not fit its model config: {exc}") from exc
    return model.eval(), source


def run_export_hf(args: argparse.Namespace) -> int:
    _existing(args.checkpoint, "--checkpoint", CHECKPOINT_HELP)
    _positive(args.max_shard_mb, "--max-shard-mb")
    if args.tokenizer is not None and args.no_tokenizer:
        raise UsageError("--tokenizer contradicts --no-tokenizer: drop one of them")
    if args.out.exists() and not args.overwrite:
        raise UsageError(f"--out {args.out} already exists: pass --overwrite to replace it")
    from swarmlm.model.hf import EXPORT_DTYPES, export_hf, hf_architecture

    source = read_export_source(args.checkpoint)
    tokenizer = None
    if not args.no_tokenizer:
        if args.tokenizer is not None:
            tok_path: Path | None = _tokenizer_path(args.tokenizer, Path())
        elif source.data_path is not None:
            tok_path = _tokenizer_path(None, source.data_path)
        else:
            tok_path = None
            log.warning(
                "%s carries no tokenizer: exporting weights only (pass --tokenizer PATH to "
                "include one)",
                args.checkpoint,
            )
        if tok_path is not None:
            from swarmlm.data import Tokenizer

            tokenizer = Tokenizer.load(tok_path)
    shard = None if args.max_shard_mb is None else int(args.max_shard_mb * 1024 * 1024)
    out = export_hf(
        source.state,
        source.cfg,
        args.out,
        dtype=EXPORT_DTYPES[args.dtype],
        overwrite=args.overwrite,
        drop_training_settings=args.drop_training_settings,
        max_shard_bytes=shard,
        bos_token_id=args.bos_token_id
        if args.bos_token_id is not None
        else (tokenizer.bos_id if tokenizer else None),
        eos_token_id=args.eos_token_id
        if args.eos_token_id is not None
        else (tokenizer.eos_id if tokenizer else None),
        pad_token_id=tokenizer.pad_id if tokenizer else None,
        tokenizer_json=tokenizer.to_json() if tokenizer else None,
    )
    n_params = sum(
        t.numel()
        for name, t in source.state.items()
        if not (name == "lm_head.weight" and source.cfg.tie_embeddings)  # it is the embedding
    )
    checked = "sha256 verified" if source.verified else "no manifest to verify"
    with_tok = "with tokenizer" if tokenizer else "without tokenizer"
    print(
        f"exported {hf_architecture(source.cfg)} ({n_params:,} parameters, {args.dtype}, "
        f"{with_tok}) from {source.described} ({checked}) to {out}"
    )
    return 0


def run_import_hf(args: argparse.Namespace) -> int:
    _existing(args.hf, "--hf", "a Hugging Face checkpoint directory")
    if args.out.exists() and not args.overwrite:
        raise UsageError(f"--out {args.out} already exists: pass --overwrite to replace it")
    from swarmlm.model.hf import import_hf, save_swarmlm_weights

    cfg, model = import_hf(args.hf)
    out = save_swarmlm_weights(model, cfg, args.out)
    print(
        f"imported {model.num_parameters():,} parameters "
        f"({'MoE' if cfg.is_moe else 'dense'}, {cfg.n_layers} layers) to {out}"
    )
    return 0

"""Checkpoints: atomic, checksummed, pruned, optionally written in the background.

Layout of one checkpoint directory ``<run>/checkpoints/step-00001000/``:

* ``model.safetensors``: weights (tensors shared by several names, such as tied embeddings,
  are stored once; the aliases are in the file's metadata);
* ``trainer.pt``: optimizer state and RNG states (loaded with ``weights_only=True``);
* ``state.json``: step, run config, schedule and loader state, metrics;
* ``config.json``: the model config alone, so the directory is also the weights format that
  ``swarmlm export-hf`` reads;
* ``manifest.json``: sha256 and size of each file above, written last.

With ``codec`` (``train.checkpoint_codec``: zstd, gzip, zlib, lzma, bz2 or ``auto``) the two
large files are stored as ``model.safetensors.swz`` and ``trainer.pt.swz``: chunked files of
:mod:`swarmlm.data.codecs` whose chunks carry crc32s checked on load, on top of the manifest's
sha256. Loading decompresses them in memory and yields exactly the tensors saved.
``swarmlm export-hf`` and other readers of a bare ``model.safetensors`` need an uncompressed
checkpoint.

A checkpoint is assembled in a temporary directory, every file fsynced, then renamed into place
in one step; ``latest`` is then replaced atomically. A crash or a full disk at any point leaves
the previous checkpoint and ``latest`` untouched. Loading verifies every checksum first.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from swarmlm.atomic import atomic_write_text, fsync_dir

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FILES = ("model.safetensors", "trainer.pt", "state.json", "config.json")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, truncated or could not be written."""


@dataclass
class Checkpoint:
    path: Path
    model_state: dict[str, Tensor]
    trainer_state: dict[str, Any]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def dedupe_shared(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Drop names whose tensor storage another name already holds; return the alias map."""
    owners: dict[tuple[int, int, tuple[int, ...]], str] = {}
    unique: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        key = (
            tensor.untyped_storage().data_ptr(),
            int(tensor.storage_offset()),
            tuple(int(d) for d in tensor.shape),
        )
        if key in owners and tensor.numel() > 0:
            aliases[name] = owners[key]
            continue
        owners[key] = name
        unique[name] = tensor.detach().contiguous()
    return unique, aliases


def snapshot(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU copies, so a background writer never races the next optimizer step."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, Tensor],
    trainer_state: dict[str, Any],
    state: dict[str, Any],
    keep: int,
    *,
    sharded_dir: Path | None = None,
    codec: str | None = None,
) -> Path:
    """Write a checkpoint atomically, point ``latest`` at it, prune all but ``keep``.

    ``sharded_dir``: a torch.distributed.checkpoint directory (``swarmlm.train.sharded``)
    copied in as ``dcp/``; its files are checksummed in the manifest like the others.
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(run_dir, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{threading.get_ident()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        unique, aliases = dedupe_shared(model_state)
        save_file(unique, str(tmp / "model.safetensors"), metadata={"aliases": json.dumps(aliases)})
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2, default=str))
        model_cfg = state.get("config", {}).get("model", {})
        (tmp / "config.json").write_text(json.dumps(model_cfg, indent=2))
        names = list(FILES)
        if codec is not None and codec != "none":
            names = [_compress_file(tmp, name, codec) for name in names]
        if sharded_dir is not None:
            shutil.copytree(sharded_dir, tmp / "dcp")
            names += sorted(
                str(f.relative_to(tmp)) for f in (tmp / "dcp").rglob("*") if f.is_file()
            )
        manifest = {}
        for name in names:
            _fsync_file(tmp / name)
            manifest[name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _fsync_file(tmp / MANIFEST)
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        atomic_write_text(root / "latest", final.name + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, keep)
    return final


COMPRESSED_SUFFIX = ".swz"
_COMPRESSIBLE = ("model.safetensors", "trainer.pt")


def _compress_file(directory: Path, name: str, codec: str) -> str:
    """Replace ``directory/name`` by its chunked compressed form; returns the new name."""
    if name not in _COMPRESSIBLE:
        return name
    from swarmlm.data.codecs import resolve_codec, write_chunked
    from swarmlm.data.errors import DataError

    raw = (directory / name).read_bytes()
    try:
        chosen = resolve_codec(codec, raw[: 1 << 20])
        write_chunked(directory / (name + COMPRESSED_SUFFIX), raw, chosen, chunk_bytes=1 << 22)
    except DataError as exc:
        raise CheckpointError(f"checkpoint codec {codec!r}: {exc}") from exc
    (directory / name).unlink()
    return name + COMPRESSED_SUFFIX


def _stored_name(manifest: dict[str, Any], name: str) -> str:
    return name + COMPRESSED_SUFFIX if name + COMPRESSED_SUFFIX in manifest else name


def _read_stored(path: Path, name: str) -> bytes:
    """The bytes of ``name`` in checkpoint ``path``, decompressing a ``.swz`` form."""
    packed = path / (name + COMPRESSED_SUFFIX)
    if not packed.exists():
        return (path / name).read_bytes()
    from swarmlm.data.codecs import ChunkedReader
    from swarmlm.data.errors import DataError

    try:
        with ChunkedReader(packed) as reader:
            return reader.read_all()
    except DataError as exc:
        raise CheckpointError(f"{packed} cannot be read: {exc}") from exc


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    meta: dict[str, str] = header.get("__metadata__") or {}
    return meta


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    found = list_checkpoints(run_dir)
    latest = latest_checkpoint(run_dir)
    for old in found[: max(0, len(found) - keep)]:
        if old != latest:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, or None when the run has none yet."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    target = run_dir / "checkpoints" / pointer.read_text().strip()
    if not target.is_dir():
        raise CheckpointError(f"{pointer} names {target.name}, which does not exist")
    return target


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Accept a checkpoint directory, a run directory or its ``checkpoints`` folder (then the
    latest checkpoint), or the ``latest`` pointer file itself."""
    path = Path(path)
    if path.is_file() and path.name == "latest":
        path = path.parent.parent  # <run>/checkpoints/latest -> <run>
    elif path.name == "checkpoints" and (path / "latest").is_file():
        path = path.parent
    if (
        (path / MANIFEST).exists()
        or (path / FILES[0]).exists()
        or (path / (FILES[0] + COMPRESSED_SUFFIX)).exists()
    ):
        return path  # a checkpoint directory (verify_checkpoint judges whether it is whole)
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"no checkpoint at {path} (no {MANIFEST}, no checkpoints/latest)")
    return latest


def verify_checkpoint(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(f"{manifest_path} is missing: incomplete or foreign checkpoint")
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_path} is corrupt: {exc}") from exc
    extra = [name for name in manifest if name.startswith("dcp/")]
    for name in (*(_stored_name(manifest, f) for f in FILES), *extra):
        file = path / name
        entry = manifest.get(name)
        if entry is None:
            raise CheckpointError(f"{manifest_path} does not list {name}")
        if not file.exists():
            raise CheckpointError(f"{file} is missing")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(
                f"{file} is truncated or altered: {size} bytes, expected {entry['bytes']}"
            )
        if _sha256(file) != entry["sha256"]:
            raise CheckpointError(f"{file} fails its sha256 check: corrupt checkpoint")
    return manifest


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> Checkpoint:
    path = resolve_checkpoint(path)
    verify_checkpoint(path)
    weights = path / "model.safetensors"
    try:
        if (path / (weights.name + COMPRESSED_SUFFIX)).exists():
            from safetensors.torch import load as load_bytes

            data = _read_stored(path, weights.name)
            model_state = {k: v.to(map_location) for k, v in load_bytes(data).items()}
            aliases = json.loads(_safetensors_metadata(data).get("aliases", "{}"))
        else:
            model_state = load_file(str(weights), device=str(map_location))
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as fh:
                aliases = json.loads((fh.metadata() or {}).get("aliases", "{}"))
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{weights} cannot be read: {exc}") from exc
    for alias, owner in aliases.items():
        model_state[alias] = model_state[owner]
    try:
        trainer_state = torch.load(
            io.BytesIO(_read_stored(path, "trainer.pt")),
            map_location=map_location,
            weights_only=True,
        )
    except Exception as exc:
        raise CheckpointError(f"{path / 'trainer.pt'} cannot be read: {exc}") from exc
    state = json.loads((path / "state.json").read_text())
    return Checkpoint(path, model_state, trainer_state, state)


class AsyncCheckpointer:
    """Writes checkpoints on a background thread, one at a time.

    The caller snapshots tensors to CPU first (cheap next to the write), so training goes on
    while the disk works; :meth:`wait` surfaces any error from the previous save.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_path: Path | None = None

    def submit(self, *args: Any, **kwargs: Any) -> None:
        self.wait()

        def work() -> None:
            try:
                self.last_path = save_checkpoint(*args, **kwargs)
            except BaseException as exc:  # reported by wait()
                self._error = exc

        self._thread = threading.Thread(target=work, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"background checkpoint failed: {error}") from error

"""The swarm's consensus state as one canonical blob, identified by its SHA-256.

Every honest peer holds the same state after every round, so its serialisation is a pure
function of the state: peers put it in their blob store under its digest, contributions
carry that digest, and a peer that lags or joins fetches the agreed digest from any peer in
verified chunks (the p2p transport checks the hash).

Layout (version 1)::

    b"SWST" | u8 version | u32 header length (LE) | header | tensor bytes

``header`` is canonical JSON: ``round``, ``mode``, ``layout`` (parameter names and shapes),
``tensors`` (``[[name, numel], ...]`` in storage order), ``scalars`` and ``reputation``
(``{peer: score}``). The tensor bytes are float32 little-endian, concatenated in the order
of ``tensors``.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from swarmlm.swarm.errors import StateSyncError
from swarmlm.swarm.params import tensor_bytes

MAGIC = b"SWST"
VERSION = 1
MAX_HEADER = 64 * 1024 * 1024
_HEAD = struct.Struct("<4sBI")


@dataclass
class StateBlob:
    """Decoded state: tensors by name (float32 1-D) plus the JSON fields."""

    round: int
    mode: str
    layout: list[list[Any]]
    tensors: dict[str, Tensor] = field(default_factory=dict)
    scalars: dict[str, int | float] = field(default_factory=dict)
    reputation: dict[str, float] = field(default_factory=dict)


def encode_state(state: StateBlob) -> bytes:
    names = list(state.tensors)
    header = json.dumps(
        {
            "round": state.round,
            "mode": state.mode,
            "layout": state.layout,
            "tensors": [[n, int(state.tensors[n].numel())] for n in names],
            "scalars": state.scalars,
            "reputation": state.reputation,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    parts = [_HEAD.pack(MAGIC, VERSION, len(header)), header]
    parts.extend(tensor_bytes(state.tensors[n]) for n in names)
    return b"".join(parts)


def state_digest(blob: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(blob).digest()


def decode_state(blob: bytes | bytearray | memoryview) -> StateBlob:
    """Parse a state blob; raises :class:`StateSyncError` naming the field at fault."""
    view = memoryview(blob)
    if len(view) < _HEAD.size:
        raise StateSyncError("swarm state blob is shorter than its header")
    magic, version, hlen = _HEAD.unpack_from(view, 0)
    if magic != MAGIC or version != VERSION:
        raise StateSyncError("not a version-1 swarm state blob (bad magic or version)")
    if hlen > MAX_HEADER or _HEAD.size + hlen > len(view):
        raise StateSyncError(f"swarm state header length {hlen} out of bounds")
    try:
        h = json.loads(bytes(view[_HEAD.size : _HEAD.size + hlen]))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StateSyncError(f"swarm state header is not JSON: {exc}") from exc
    if not isinstance(h, dict):
        raise StateSyncError("swarm state header must be an object")
    for key, typ in (("round", int), ("mode", str), ("layout", list), ("tensors", list),
                     ("scalars", dict), ("reputation", dict)):  # fmt: skip
        if not isinstance(h.get(key), typ):
            raise StateSyncError(f"swarm state field {key!r} missing or not {typ.__name__}")
    offset = _HEAD.size + hlen
    tensors: dict[str, Tensor] = {}
    for item in h["tensors"]:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], int)
            or item[1] < 0
        ):
            raise StateSyncError(f"swarm state field 'tensors' has a bad entry {item!r:.80}")
        name, numel = item
        end = offset + 4 * numel
        if end > len(view):
            raise StateSyncError(f"swarm state tensor {name!r} runs past the end of the blob")
        arr = np.frombuffer(view[offset:end], dtype="<f4").astype(np.float32)
        tensors[name] = torch.from_numpy(arr)
        offset = end
    if offset != len(view):
        raise StateSyncError(f"swarm state blob has {len(view) - offset} trailing bytes")
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise StateSyncError(f"swarm state tensor {name!r} holds NaN or infinite values")
    reputation: dict[str, float] = {}
    for peer, score in h["reputation"].items():
        if not isinstance(score, (int, float)) or not math.isfinite(score):
            raise StateSyncError(f"swarm state reputation of {peer[:12]} is not a number")
        reputation[peer] = float(score)
    scalars = {
        k: v
        for k, v in h["scalars"].items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    if len(scalars) != len(h["scalars"]):
        raise StateSyncError("swarm state field 'scalars' holds a non-number")
    return StateBlob(h["round"], h["mode"], h["layout"], tensors, scalars, reputation)

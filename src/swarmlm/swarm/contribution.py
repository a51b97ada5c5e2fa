"""The bytes a peer contributes to a round, and their strict decoder.

Layout (version 1)::

    b"SWCT" | u8 version | u32 header length (little-endian) | header | update payload

``header`` is canonical JSON (sorted keys, no spaces) ``{"round": int, "state": hex sha256
of the sender's swarm state when it contributes (after applying round - 1), "base": hex
sha256 of the state the update was computed from (the same state, or the one before it when
rounds overlap), "samples": int, "seconds": float (the local phase's compute time)}`` and,
when the objective sends a record of its work with the update (rollouts, checked by the
other peers: :class:`swarmlm.swarm.objective.VerifiedObjective`), ``"attachment": int``, the
length of that record, which then sits between the header and the update payload; and,
when the run agrees on a data schedule (:mod:`swarmlm.swarm.data_schedule`), ``"data"``:
``{"loss": float, "type_loss": [float], "type_rows": [int]}``, what the local phase saw. The
update payload is a ``swarmlm.aggregation`` codec frame (its own magic, shape and CRC). The
p2p layer signs and hashes the whole thing, so who sent it is never in doubt; this decoder
only has to make sure malformed bytes become a :class:`ContributionError` naming the peer,
never a crash.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from swarmlm.aggregation import decode
from swarmlm.aggregation.errors import CodecError
from swarmlm.swarm.abstain import ABSTAIN_MAGIC, encode_abstain, is_abstain
from swarmlm.swarm.data_schedule import DataReport
from swarmlm.swarm.errors import ContributionError

MAGIC = b"SWCT"
VERSION = 1
MAX_HEADER = 4096
MAX_SECONDS = 1e7  # a local phase longer than ~4 months is not believable
MAX_ATTACHMENT = 64 << 20
MAX_DATA_TYPES = 64  # content types a data report may name (the generator has 8)
_HEAD = struct.Struct("<4sBI")
__all__ = [
    "ABSTAIN_MAGIC",
    "Contribution",
    "decode_contribution",
    "encode_abstain",
    "encode_contribution",
    "is_abstain",
]


@dataclass(frozen=True)
class Contribution:
    """A decoded contribution: ``update`` is float32 ``(numel,)``."""

    round: int
    state_digest: bytes
    base_digest: bytes
    samples: int
    seconds: float
    update: Tensor
    attachment: bytes = b""
    data: DataReport | None = None


def encode_contribution(
    round: int,
    state_digest: bytes,
    samples: int,
    payload: bytes,
    base_digest: bytes | None = None,
    seconds: float = 0.0,
    attachment: bytes = b"",
    data: DataReport | None = None,
) -> bytes:
    base = state_digest if base_digest is None else base_digest
    fields: dict[str, object] = {
        "base": base.hex(),
        "round": round,
        "samples": samples,
        "seconds": round_seconds(seconds),
        "state": state_digest.hex(),
    }
    if attachment:
        fields["attachment"] = len(attachment)
    if data is not None and math.isfinite(data.loss):
        fields["data"] = {
            "loss": data.loss,
            "type_loss": [v if math.isfinite(v) else 0.0 for v in data.type_loss],
            "type_rows": list(data.type_rows),
        }
    header = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return _HEAD.pack(MAGIC, VERSION, len(header)) + header + attachment + payload


def decode_contribution(
    peer: str, data: bytes | bytearray | memoryview, numel: int
) -> Contribution:
    """Parse and validate; raises :class:`ContributionError` naming ``peer`` and the field."""
    view = memoryview(data)
    header, hlen = _read_header(peer, view, MAGIC, "a swarm contribution")
    fields = {"base", "round", "samples", "seconds", "state"}
    if not isinstance(header, dict) or set(header) - {"attachment", "data"} != fields:
        raise ContributionError(
            peer, f"header must hold exactly {', '.join(sorted(fields))} (and attachment, data)"
        )
    seen = _data_field(peer, header["data"]) if "data" in header else None
    alen = header.get("attachment", 0)
    start = _HEAD.size + hlen
    if (
        not isinstance(alen, int)
        or isinstance(alen, bool)
        or not 0 <= alen <= MAX_ATTACHMENT
        or start + alen > len(view)
    ):
        raise ContributionError(peer, f"field 'attachment' out of range: {alen!r}")
    rnd, samples, seconds = header["round"], header["samples"], header["seconds"]
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 1:
        raise ContributionError(peer, f"field 'round' must be a positive int, got {rnd!r}")
    if not isinstance(samples, int) or isinstance(samples, bool) or not 0 <= samples < 2**40:
        raise ContributionError(peer, f"field 'samples' out of range: {samples!r}")
    if (
        not isinstance(seconds, (int, float))
        or isinstance(seconds, bool)
        or not 0.0 <= seconds <= MAX_SECONDS
    ):
        raise ContributionError(peer, f"field 'seconds' out of range: {seconds!r}")
    digest = _digest_field(peer, header, "state")
    base = _digest_field(peer, header, "base")
    try:
        update = decode(view[start + alen :], max_numel=max(numel, 1))
    except CodecError as exc:
        raise ContributionError(peer, f"update payload: {exc}") from exc
    if update.numel() != numel:
        raise ContributionError(
            peer, f"update has {update.numel()} values, the model has {numel} parameters"
        )
    return Contribution(
        rnd,
        digest,
        base,
        samples,
        float(seconds),
        update.reshape(-1).float(),
        bytes(view[start : start + alen]),
        seen,
    )


def _data_field(peer: str, value: object) -> DataReport:
    """The optional ``data`` report (swarm/data_schedule.py): the round's mean training loss
    and per content type the mean loss and row count. Only finite, bounded numbers pass: the
    agreed schedule takes medians of them, and a NaN must not reach it."""
    if not isinstance(value, dict) or set(value) != {"loss", "type_loss", "type_rows"}:
        raise ContributionError(peer, "field 'data' must hold exactly loss, type_loss, type_rows")
    loss, type_loss, type_rows = value["loss"], value["type_loss"], value["type_rows"]
    if not _finite(loss) or not 0.0 <= loss < 1e6:
        raise ContributionError(peer, f"field 'data.loss' must be a finite loss, got {loss!r:.40}")
    if (
        not isinstance(type_loss, list)
        or not isinstance(type_rows, list)
        or len(type_loss) != len(type_rows)
        or len(type_loss) > MAX_DATA_TYPES
    ):
        raise ContributionError(
            peer,
            f"fields 'data.type_loss' and 'data.type_rows' must be lists of one length "
            f"<= {MAX_DATA_TYPES}",
        )
    if not all(_finite(v) and 0.0 <= v < 1e6 for v in type_loss):
        raise ContributionError(peer, "field 'data.type_loss' holds a non-finite or negative loss")
    if not all(_int(n) and 0 <= n < 2**40 for n in type_rows):
        raise ContributionError(peer, "field 'data.type_rows' holds a non-count")
    return DataReport(float(loss), tuple(float(v) for v in type_loss), tuple(type_rows))


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_header(peer: str, view: memoryview, magic: bytes, what: str) -> tuple[Any, int]:
    """The JSON header after ``magic | version | length`` (both layouts share the framing),
    and its length; malformed bytes become a :class:`ContributionError` naming ``peer``."""
    if len(view) < _HEAD.size:
        raise ContributionError(peer, f"{len(view)} bytes is shorter than the header")
    got, version, hlen = _HEAD.unpack_from(view, 0)
    if got != magic:
        raise ContributionError(peer, f"not {what} (bad magic)")
    if version != VERSION:
        raise ContributionError(peer, f"unsupported version {version} (this node reads 1)")
    if hlen > MAX_HEADER or _HEAD.size + hlen > len(view):
        raise ContributionError(peer, f"header length {hlen} out of bounds")
    try:
        return json.loads(bytes(view[_HEAD.size : _HEAD.size + hlen])), hlen
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ContributionError(peer, f"header is not JSON ({exc})") from exc


def _digest_field(peer: str, header: dict[str, object], name: str) -> bytes:
    text = header[name]
    try:
        digest = bytes.fromhex(text) if isinstance(text, str) else b""
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise ContributionError(peer, f"field {name!r} must be 64 hex digits")
    return digest


def round_seconds(seconds: float) -> float:
    """Seconds with millisecond resolution, finite and within range (what the header holds)."""
    if math.isnan(seconds) or seconds < 0:
        return 0.0
    return round(min(seconds, MAX_SECONDS), 3)


# -- partitioned layout (swarm.aggregation_layout = partitioned; swarm/partitioned.py) ---------
PART_MAGIC = b"SWPH"
MAX_PARTS = 1 << 20


@dataclass(frozen=True)
class PartHeader:
    """A partitioned contribution: no update, only the commitment to its ``parts`` encoded
    parts (``root``: their Merkle root, :mod:`swarmlm.merkle`). ``attachment``: this peer's
    accusations about the previous round's aggregators (msgpack, judged by every peer)."""

    round: int
    state_digest: bytes
    base_digest: bytes
    samples: int
    seconds: float
    parts: int
    root: bytes
    attachment: bytes = b""


def encode_part_header(
    round: int,
    state_digest: bytes,
    samples: int,
    parts: int,
    root: bytes,
    base_digest: bytes | None = None,
    seconds: float = 0.0,
    attachment: bytes = b"",
) -> bytes:
    """``SWPH | u8 version | u32 header length | canonical JSON header | attachment``: O(1)
    bytes whatever the number of parts (the root commits to all of them)."""
    base = state_digest if base_digest is None else base_digest
    fields: dict[str, object] = {
        "attachment": len(attachment),
        "base": base.hex(),
        "parts": parts,
        "root": root.hex(),
        "round": round,
        "samples": samples,
        "seconds": round_seconds(seconds),
        "state": state_digest.hex(),
    }
    header = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return _HEAD.pack(PART_MAGIC, VERSION, len(header)) + header + attachment


def decode_part_header(peer: str, data: bytes | bytearray | memoryview) -> PartHeader:
    """Parse and validate; raises :class:`ContributionError` naming ``peer`` and the field."""
    view = memoryview(data)
    header, hlen = _read_header(peer, view, PART_MAGIC, "a partitioned swarm contribution")
    fields = {"attachment", "base", "parts", "root", "round", "samples", "seconds", "state"}
    if not isinstance(header, dict) or set(header) != fields:
        raise ContributionError(peer, f"header must hold exactly {', '.join(sorted(fields))}")
    start = _HEAD.size + hlen
    alen, parts, rnd = header["attachment"], header["parts"], header["round"]
    samples, seconds = header["samples"], header["seconds"]
    if not _int(alen) or not 0 <= alen <= MAX_ATTACHMENT or start + alen != len(view):
        raise ContributionError(peer, f"field 'attachment' out of range: {alen!r}")
    if not _int(rnd) or rnd < 1:
        raise ContributionError(peer, f"field 'round' must be a positive int, got {rnd!r}")
    if not _int(parts) or not 1 <= parts <= MAX_PARTS:
        raise ContributionError(peer, f"field 'parts' out of range: {parts!r}")
    if not _int(samples) or not 0 <= samples < 2**40:
        raise ContributionError(peer, f"field 'samples' out of range: {samples!r}")
    if (
        not isinstance(seconds, (int, float))
        or isinstance(seconds, bool)
        or not 0.0 <= seconds <= MAX_SECONDS
    ):
        raise ContributionError(peer, f"field 'seconds' out of range: {seconds!r}")
    return PartHeader(
        rnd,
        _digest_field(peer, header, "state"),
        _digest_field(peer, header, "base"),
        samples,
        float(seconds),
        parts,
        _digest_field(peer, header, "root"),
        bytes(view[start:]),
    )


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

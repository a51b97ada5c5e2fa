"""Replicated curation records: what travels between nodes, how it is signed and checked.

Four kinds of immutable record, each signed by the node where it originated:

- ``task_set``: a task set's definition (name, description, label schema, k, caps,
  thresholds, gold share, lease length), identified by name and content hash
  (:func:`definition_digest`, independent of who signed it).
- ``label_config``: a new version of a task set's label schema (the set's name and
  definition digest, the version number, the schema). The definition, and so the digest
  that tasks are pinned to, never changes; the config in force is the highest version
  held, ties to the smaller record digest, so nodes holding the same records agree.
- ``tasks``: a batch of up to :data:`TASK_BATCH` tasks added to one task set (external id,
  content, outputs and the gold answer of honeypots), pinned to the set's content hash.
  Batches keep the cost of a large import at one signature per batch, not per task.
- ``annotator``: an account (public id, username, argon2 password hash) so an annotator can
  log in at any node. The role never travels: a replicated account is always an annotator.
- ``annotation``: the task set's name plus the existing signed annotation (task digest,
  annotator public id, value, time spent, creation time) with its signer and signature
  exactly as in the signed exports, so a replicated annotation still verifies with
  ``swarmlm curation verify``. The record's own signature (normally by the same node) binds
  the annotation to its task set: the task digest alone is ambiguous when two sets hold the
  same task, and the export signature must keep its five fields.

A record on the wire is the canonical msgpack encoding of
``{"kind", "body", "signer" (32-byte Ed25519 key), "sig" (64 bytes)}``; its digest is the
SHA-256 of those bytes (Ed25519 signatures are deterministic, so one record has one digest
everywhere). Every record signs ``canonical_encode({"record": kind, "body": body})``, so a
signature of one kind can never be replayed as another; an annotation's inner signature is
checked as well.

Everything here is pure (no database, no network): :func:`decode_record` turns untrusted
bytes into a :class:`ReplicaRecord` or raises :class:`RecordError` naming what is wrong.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import msgpack

from swarmlm.curation.errors import CurationError
from swarmlm.curation.signing import SIGNED_FIELDS
from swarmlm.curation.task_set_settings import RECORD_IDENTITY_FIELDS, settings_of_record
from swarmlm.p2p.identity import NodeIdentity, canonical_encode, verify_signature

KINDS: tuple[str, ...] = ("task_set", "label_config", "tasks", "annotator", "annotation")
#: Dependency order: a record may refer only to kinds before it.
KIND_ORDER = {k: i for i, k in enumerate(KINDS)}
MAX_RECORD_BYTES = 1 << 20
TASK_BATCH = 256
MAX_CONFIG_VERSION = 100_000
MAX_DEPTH = 32
_HEX = frozenset("0123456789abcdef")


class RecordError(CurationError):
    """A replicated record is malformed, oversized, or its signature does not verify.

    ``reason`` is ``"forged"`` (bad signature: altered or invented) or ``"invalid"``
    (well-signed but not a valid record).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ReplicaRecord:
    kind: str
    body: dict[str, Any]
    signer: bytes
    sig: bytes
    raw: bytes  # the exact wire bytes (what is stored and re-served)
    digest: bytes  # sha256(raw)

    @property
    def hex(self) -> str:
        return self.digest.hex()


def _signed_bytes(kind: str, body: dict[str, Any]) -> bytes:
    return canonical_encode({"record": kind, "body": body})


def definition_digest(body: dict[str, Any]) -> str:
    """Content hash of a task set definition (hex): what identifies a set with its name.

    Independent of the signer, so two nodes that create the same definition (the same
    configured task set, say) agree on it and merge each other's tasks into one set.
    """
    return hashlib.sha256(_signed_bytes("task_set", body)).hexdigest()


def make_record(identity: NodeIdentity, kind: str, body: dict[str, Any]) -> ReplicaRecord:
    """Sign ``body`` as a record of ``kind`` originating at ``identity``."""
    if kind not in KINDS:
        raise RecordError("invalid", f"unknown record kind {kind!r}")
    sig = identity.sign(_signed_bytes(kind, body))
    return _assemble(kind, body, identity.public_key_bytes, sig)


def annotation_record(
    identity: NodeIdentity,
    task_set: str,
    annotation: dict[str, Any],
    signer_hex: str,
    sig_hex: str,
    label_config: str | None = None,
) -> ReplicaRecord:
    """The record placing an already signed annotation (export format) in ``task_set``.

    ``label_config``: the digest of the ``label_config`` record whose schema the value was
    validated against; absent for the schema the set was created with (so records made
    before label configs could be edited are unchanged).
    """
    body: dict[str, Any] = {
        "task_set": task_set,
        "annotation": annotation,
        "signer": bytes.fromhex(signer_hex),
        "signature": bytes.fromhex(sig_hex),
    }
    if label_config is not None:
        body["label_config"] = label_config
    return make_record(identity, "annotation", body)


def _assemble(kind: str, body: dict[str, Any], signer: bytes, sig: bytes) -> ReplicaRecord:
    raw = canonical_encode({"kind": kind, "body": body, "signer": signer, "sig": sig})
    return ReplicaRecord(kind, body, signer, sig, raw, hashlib.sha256(raw).digest())


def decode_record(raw: Any) -> ReplicaRecord:
    """Parse, shape-check and verify untrusted record bytes. Never raises anything else."""
    if not isinstance(raw, bytes):
        raise RecordError("invalid", "a record must be bytes")
    if len(raw) > MAX_RECORD_BYTES:
        raise RecordError("invalid", f"record of {len(raw)} bytes is over {MAX_RECORD_BYTES}")
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except Exception:
        raise RecordError("invalid", "record is not valid msgpack") from None
    if not isinstance(obj, dict) or set(obj) != {"kind", "body", "signer", "sig"}:
        raise RecordError("invalid", "record must be a map of kind, body, signer, sig")
    kind, body, signer, sig = obj["kind"], obj["body"], obj["signer"], obj["sig"]
    if kind not in KINDS:
        raise RecordError("invalid", f"unknown record kind {kind!r}")
    if not isinstance(body, dict):
        raise RecordError("invalid", f"{kind} record: body must be a map")
    if not isinstance(signer, bytes) or len(signer) != 32:
        raise RecordError("invalid", f"{kind} record: signer must be a 32-byte key")
    if not isinstance(sig, bytes) or len(sig) != 64:
        raise RecordError("invalid", f"{kind} record: sig must be 64 bytes")
    try:
        signed = _signed_bytes(kind, body)
    except Exception:
        raise RecordError("invalid", f"{kind} record: body cannot be encoded") from None
    # Re-encoding must reproduce the bytes: no non-canonical duplicates of one record.
    try:
        canonical = canonical_encode(obj)
    except Exception:
        raise RecordError("invalid", f"{kind} record cannot be re-encoded") from None
    if canonical != raw:
        raise RecordError("invalid", f"{kind} record is not canonically encoded")
    if not verify_signature(signer, sig, signed):
        raise RecordError("forged", f"{kind} record: signature does not match its body")
    check_body(kind, body)
    if kind == "annotation" and not verify_signature(
        body["signer"], body["signature"], canonical_encode(body["annotation"])
    ):
        raise RecordError("forged", "annotation record: the annotation's signature is invalid")
    return ReplicaRecord(kind, body, signer, sig, raw, hashlib.sha256(raw).digest())


# -- body shapes ---------------------------------------------------------------------------
def _json_value(x: Any, where: str, depth: int = 0) -> None:
    """JSON-representable and bounded in depth (content is stored as JSON)."""
    if depth > MAX_DEPTH:
        raise RecordError("invalid", f"{where}: nested deeper than {MAX_DEPTH}")
    if x is None or isinstance(x, bool | int | str):
        return
    if isinstance(x, float):
        if not math.isfinite(x):
            raise RecordError("invalid", f"{where}: non-finite number")
        return
    if isinstance(x, list):
        for v in x:
            _json_value(v, where, depth + 1)
        return
    if isinstance(x, dict):
        for k, v in x.items():
            if not isinstance(k, str):
                raise RecordError("invalid", f"{where}: object keys must be strings")
            _json_value(v, where, depth + 1)
        return
    raise RecordError("invalid", f"{where}: {type(x).__name__} is not a JSON value")


def _fields(kind: str, body: dict[str, Any], spec: dict[str, Any]) -> None:
    if set(body) != set(spec):
        raise RecordError("invalid", f"{kind} record: fields {sorted(body)} != {sorted(spec)}")
    for name, types in spec.items():
        v = body[name]
        if types is not None and (not isinstance(v, types) or isinstance(v, bool)):
            raise RecordError("invalid", f"{kind} record: field {name!r} has the wrong type")


def _is_hex(s: Any, n: int) -> bool:
    return isinstance(s, str) and len(s) == n and set(s) <= _HEX


def check_body(kind: str, body: dict[str, Any]) -> None:
    """Field names, types and sizes of a record body (semantics are checked on merge)."""
    if kind == "task_set":
        identity = {k: v for k, v in body.items() if k in RECORD_IDENTITY_FIELDS}
        _fields(kind, identity, {"name": str, "description": str, "schema": dict})
        try:
            settings_of_record(body)  # the settings: exact types, bounds, no unknown key
        except CurationError as e:
            raise RecordError("invalid", f"task_set record: {e}") from None
        if not 1 <= len(body["name"]) <= 200 or len(body["description"]) > 10_000:
            raise RecordError("invalid", "task_set record: name or description too long")
        _json_value(body["schema"], "task_set record: schema")
    elif kind == "label_config":
        _fields(
            kind,
            body,
            {"task_set": str, "task_set_digest": str, "version": int, "schema": dict},
        )
        if not 1 <= len(body["task_set"]) <= 200:
            raise RecordError("invalid", "label_config record: task_set name length")
        if not _is_hex(body["task_set_digest"], 64):
            raise RecordError("invalid", "label_config record: task_set_digest must be 64 hex")
        if not 2 <= body["version"] <= MAX_CONFIG_VERSION:
            raise RecordError(
                "invalid", f"label_config record: version must be 2..{MAX_CONFIG_VERSION}"
            )
        _json_value(body["schema"], "label_config record: schema")
    elif kind == "tasks":
        _fields(kind, body, {"task_set": str, "task_set_digest": str, "tasks": list})
        if not _is_hex(body["task_set_digest"], 64):
            raise RecordError("invalid", "tasks record: task_set_digest must be 64 hex chars")
        if not 1 <= len(body["tasks"]) <= TASK_BATCH:
            raise RecordError("invalid", f"tasks record: 1..{TASK_BATCH} tasks per batch")
        for i, t in enumerate(body["tasks"]):
            if not isinstance(t, dict) or set(t) != {"external_id", "content", "outputs", "gold"}:
                raise RecordError("invalid", f"tasks record: task {i} has the wrong fields")
            if not isinstance(t["external_id"], str) or not 1 <= len(t["external_id"]) <= 200:
                raise RecordError("invalid", f"tasks record: task {i} external_id invalid")
            _json_value(t, f"tasks record: task {i}")
    elif kind == "annotator":
        _fields(kind, body, {"public_id": str, "username": str, "password_hash": str})
        if not _is_hex(body["public_id"], 32):
            raise RecordError("invalid", "annotator record: public_id must be 32 hex chars")
        if not 3 <= len(body["username"]) <= 64:
            raise RecordError("invalid", "annotator record: username must be 3-64 characters")
        ph = body["password_hash"]
        if not ph.startswith("$argon2") or len(ph) > 200:
            raise RecordError("invalid", "annotator record: password_hash is not an argon2 hash")
    elif kind == "annotation":
        spec: dict[str, Any] = {
            "task_set": str,
            "annotation": dict,
            "signer": bytes,
            "signature": bytes,
        }
        if "label_config" in body:
            spec["label_config"] = str
        _fields(kind, body, spec)
        if "label_config" in body and not _is_hex(body["label_config"], 64):
            raise RecordError("invalid", "annotation record: label_config must be 64 hex chars")
        if len(body["signer"]) != 32 or len(body["signature"]) != 64:
            raise RecordError("invalid", "annotation record: bad signer or signature length")
        if not 1 <= len(body["task_set"]) <= 200:
            raise RecordError("invalid", "annotation record: task_set name length")
        ann = body["annotation"]
        _fields(
            kind,
            ann,
            {
                "task_digest": str,
                "annotator_id": str,
                "value": None,
                "time_spent_ms": int,
                "created_at_ms": int,
            },
        )
        assert set(SIGNED_FIELDS) == set(ann)
        if not _is_hex(ann["task_digest"], 64) or not _is_hex(ann["annotator_id"], 32):
            raise RecordError("invalid", "annotation record: task_digest/annotator_id not hex")
        if not 0 <= ann["time_spent_ms"] <= 7 * 86400 * 1000:
            raise RecordError("invalid", "annotation record: time_spent_ms out of range")
        if not 0 <= ann["created_at_ms"] < 1 << 53:
            raise RecordError("invalid", "annotation record: created_at_ms out of range")
        _json_value(ann["value"], "annotation record: value")
    else:  # pragma: no cover - decode_record filters kinds first
        raise RecordError("invalid", f"unknown record kind {kind!r}")


# -- task ownership ------------------------------------------------------------------------
def task_owner(task_digest: str, node_ids: list[str] | tuple[str, ...]) -> str | None:
    """The node that serves ``task_digest`` first: rendezvous (highest random weight) hashing.

    Deterministic given the task and the set of annotation-capable nodes, whatever their
    order; when a node joins or leaves only the tasks it wins or held move.
    """
    best: tuple[bytes, str] | None = None
    for node in node_ids:
        w = hashlib.sha256(f"{node}\x00{task_digest}".encode()).digest()
        if best is None or (w, node) > best:
            best = (w, node)
    return None if best is None else best[1]

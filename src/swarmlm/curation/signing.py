"""Signed annotations: what is signed, how, and how an export is verified.

The accepting node signs, with its Ed25519 identity key, the canonical msgpack encoding
(:func:`swarmlm.p2p.identity.canonical_encode`) of the record::

    {"task_digest": <hex sha256 of the task>, "annotator_id": <public id>,
     "value": <label value>, "time_spent_ms": <int>, "created_at_ms": <int, unix ms>}

The task digest covers the task's external id, content and model outputs (not its hidden gold
answer), so a signature also pins exactly what the annotator saw. Exports carry the record,
the signer's public key and the signature as hex; :func:`verify_export_file` recomputes
everything from the exported fields and reports each line that fails.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarmlm.curation.errors import VerificationError
from swarmlm.p2p.identity import NodeIdentity, canonical_encode, verify_signature

SIGNED_FIELDS: tuple[str, ...] = (
    "task_digest",
    "annotator_id",
    "value",
    "time_spent_ms",
    "created_at_ms",
)


def task_digest(external_id: str, content: Any, outputs: list[str] | None) -> str:
    """Hex SHA-256 of the canonical encoding of what an annotator is shown."""
    return hashlib.sha256(
        canonical_encode({"external_id": external_id, "content": content, "outputs": outputs})
    ).hexdigest()


def signed_record(
    digest: str, annotator_id: str, value: Any, time_spent_ms: int, created_at_ms: int
) -> dict[str, Any]:
    return {
        "task_digest": digest,
        "annotator_id": annotator_id,
        "value": value,
        "time_spent_ms": int(time_spent_ms),
        "created_at_ms": int(created_at_ms),
    }


def sign_record(identity: NodeIdentity, record: dict[str, Any]) -> tuple[str, str]:
    """Return ``(signer_public_key_hex, signature_hex)`` for ``record``."""
    return identity.public_key_bytes.hex(), identity.sign(canonical_encode(record)).hex()


def verify_record(record: dict[str, Any], signer_hex: str, signature_hex: str) -> bool:
    """True iff the signature is valid; never raises on malformed hex or values."""
    try:
        pub = bytes.fromhex(signer_hex)
        sig = bytes.fromhex(signature_hex)
        data = canonical_encode(record)
    except (ValueError, TypeError, Exception):
        return False
    return verify_signature(pub, sig, data)


@dataclass
class VerifyReport:
    """Outcome of verifying an export: ``failures`` lists ``(line number, reason)``."""

    checked: int = 0
    valid: int = 0
    failures: list[tuple[int, str]] = field(default_factory=list)
    signers: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return self.checked > 0 and not self.failures


def verify_line(obj: Any, trusted_signers: set[str] | None = None) -> str | None:
    """Check one exported annotation object; returns the reason it fails, or ``None``."""
    if not isinstance(obj, dict):
        return "line is not a JSON object"
    missing = [f for f in (*SIGNED_FIELDS, "signer", "signature") if f not in obj]
    if missing:
        return f"missing fields {missing}"
    if "task" in obj:
        task = obj["task"]
        if not isinstance(task, dict):
            return "field 'task' is not an object"
        try:
            recomputed = task_digest(
                str(task.get("external_id")), task.get("content"), task.get("outputs")
            )
        except Exception as e:
            return f"task cannot be encoded: {e}"
        if recomputed != obj["task_digest"]:
            return "task content does not match task_digest (task was altered)"
    if not isinstance(obj["signer"], str) or not isinstance(obj["signature"], str):
        return "signer and signature must be hex strings"
    if trusted_signers is not None and obj["signer"] not in trusted_signers:
        return f"signer {obj['signer'][:16]}... is not trusted"
    record = {f: obj[f] for f in SIGNED_FIELDS}
    if not verify_record(record, obj["signer"], obj["signature"]):
        return "signature does not match the signed fields"
    return None


def verify_export_file(path: Path, trusted_signers: set[str] | None = None) -> VerifyReport:
    """Verify every line of an annotations JSONL export (blank lines are ignored).

    Raises :class:`VerificationError` only when the file cannot be read at all; bad lines
    are reported in the returned :class:`VerifyReport`, not raised.
    """
    path = Path(path)
    report = VerifyReport()
    try:
        fh = path.open("r", encoding="utf-8")
    except OSError as e:
        raise VerificationError(f"cannot read {path}: {e}") from e
    with fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            report.checked += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                report.failures.append((lineno, f"invalid JSON: {e.msg}"))
                continue
            reason = verify_line(obj, trusted_signers)
            if reason is None:
                report.valid += 1
                report.signers.add(obj["signer"])
            else:
                report.failures.append((lineno, reason))
    return report

"""Node identities: persistent keys, derived ids, signatures and the canonical encoding."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarmlm.p2p.errors import IdentityError
from swarmlm.p2p.identity import (
    KEY_FILE_NAME,
    NodeIdentity,
    canonical_encode,
    node_id_from_public_key,
    verify_signature,
)


def test_identity_is_created_once_and_reloaded_unchanged(tmp_path: Path) -> None:
    first = NodeIdentity.load_or_create(tmp_path / "node")
    second = NodeIdentity.load_or_create(tmp_path / "node")
    assert first.node_id == second.node_id
    assert first.public_key_bytes == second.public_key_bytes
    assert len(first.public_key_bytes) == 32


def test_key_file_is_private_to_owner(tmp_path: Path) -> None:
    NodeIdentity.load_or_create(tmp_path)
    mode = stat.S_IMODE(os.stat(tmp_path / KEY_FILE_NAME).st_mode)
    assert mode == 0o600
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != KEY_FILE_NAME]
    assert leftovers == []


def test_group_readable_key_file_is_refused_with_the_file_named(tmp_path: Path) -> None:
    NodeIdentity.load_or_create(tmp_path)
    os.chmod(tmp_path / KEY_FILE_NAME, 0o644)
    with pytest.raises(IdentityError, match=KEY_FILE_NAME):
        NodeIdentity.load_or_create(tmp_path)


def test_truncated_key_file_is_refused_with_the_file_named(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    path.write_bytes(b"short")
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError, match="32 raw bytes"):
        NodeIdentity.load_or_create(tmp_path)


def test_node_id_is_the_hash_of_the_public_key(tmp_path: Path) -> None:
    ident = NodeIdentity.load_or_create(tmp_path)
    assert ident.node_id == hashlib.sha256(ident.public_key_bytes).hexdigest()
    assert node_id_from_public_key(ident.public_key_bytes) == ident.node_id
    assert ident.short_id.replace("-", "") == ident.node_id[:12]


def test_two_nodes_get_different_ids(tmp_path: Path) -> None:
    a = NodeIdentity.load_or_create(tmp_path / "a")
    b = NodeIdentity.load_or_create(tmp_path / "b")
    assert a.node_id != b.node_id


def test_node_id_rejects_keys_of_wrong_length() -> None:
    with pytest.raises(IdentityError, match="32 raw bytes"):
        node_id_from_public_key(b"\x00" * 31)


def test_signature_verifies_only_for_the_signed_data_and_key() -> None:
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    sig = a.sign(b"round 3 contribution")
    assert verify_signature(a.public_key_bytes, sig, b"round 3 contribution")
    assert not verify_signature(a.public_key_bytes, sig, b"round 4 contribution")
    assert not verify_signature(b.public_key_bytes, sig, b"round 3 contribution")
    tampered = bytes([sig[0] ^ 1]) + sig[1:]
    assert not verify_signature(a.public_key_bytes, tampered, b"round 3 contribution")


@given(key=st.binary(max_size=40), sig=st.binary(max_size=80), data=st.binary(max_size=64))
def test_verify_signature_never_raises_on_garbage(key: bytes, sig: bytes, data: bytes) -> None:
    assert verify_signature(key, sig, data) in (True, False)


def test_canonical_encoding_ignores_dict_insertion_order() -> None:
    a = {"b": 1, "a": [1, 2, {"z": b"x", "y": None}], "c": 1.5}
    b = {"c": 1.5, "a": [1, 2, {"y": None, "z": b"x"}], "b": 1}
    assert canonical_encode(a) == canonical_encode(b)
    assert canonical_encode((1, 2)) == canonical_encode([1, 2])


def test_canonical_encoding_distinguishes_bytes_from_str() -> None:
    assert canonical_encode(b"ab") != canonical_encode("ab")


def test_canonical_encoding_names_the_unencodable_field() -> None:
    with pytest.raises(IdentityError, match=r"\.payload\.when"):
        canonical_encode({"payload": {"when": object()}})
    with pytest.raises(IdentityError, match="str dict keys"):
        canonical_encode({1: "x"})


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(obj=json_like)
def test_canonical_encoding_is_stable_under_reordering(obj: object) -> None:
    def reverse_dicts(o: object) -> object:
        if isinstance(o, dict):
            return {k: reverse_dicts(o[k]) for k in reversed(list(o))}
        if isinstance(o, list):
            return [reverse_dicts(v) for v in o]
        return o

    assert canonical_encode(obj) == canonical_encode(reverse_dicts(obj))


@given(obj=json_like | st.integers() | st.floats(allow_nan=False))
def test_the_fast_canonical_encoding_is_the_one_that_names_paths(obj: object) -> None:
    """Signing uses a path-free canonicalisation (the paths cost half of signing a
    certificate); it must encode exactly as the path-naming one, and refuse the same."""
    from swarmlm.p2p.identity import _canonicalize, _canonicalize_fast

    try:
        slow = _canonicalize(obj, "")
    except IdentityError:
        with pytest.raises(IdentityError):
            _canonicalize_fast(obj)
        return
    assert _canonicalize_fast(obj) == slow
    assert canonical_encode(obj) == canonical_encode(slow)

"""Accounts and credentials: creation, passwords, roles, API tokens, web sessions, and
the per-process credential cache checked against the auth epoch."""

from __future__ import annotations

import logging
import secrets
from datetime import datetime, timedelta
from typing import Any

from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from swarmlm.curation import quality
from swarmlm.curation.entities import (
    _AUTH_CACHE_SIZE,
    ROLES,
    USERNAME_ALLOWED,
    AnnotatorInfo,
    _annotator_info,
    _hash_token,
    _rowcount,
)
from swarmlm.curation.errors import (
    AuthError,
    ConflictError,
    CurationError,
    NotFoundError,
    WrongCredentialsError,
)
from swarmlm.curation.models import (
    Annotator,
    ApiToken,
    AuthEpoch,
    WebSession,
)
from swarmlm.curation.replica import (
    make_record,
)
from swarmlm.curation.store_base import StoreBase

log = logging.getLogger(__name__)


class AccountsStore(StoreBase):
    # -- accounts -------------------------------------------------------------------------
    def create_annotator(
        self, username: str, password: str, role: str = "annotator"
    ) -> AnnotatorInfo:
        """Create an account; raises :class:`ConflictError` when the username is taken."""
        if not 3 <= len(username) <= 64 or not set(username) <= USERNAME_ALLOWED:
            raise CurationError(
                "username must be 3-64 characters of letters, digits, '_', '.' or '-'"
            )
        if not 8 <= len(password) <= 1024:
            raise CurationError("password must be 8-1024 characters")
        if role not in ROLES:
            raise CurationError(f"role must be one of {list(ROLES)}, got {role!r}")
        pw_hash = self._hasher.hash(password)
        public_id = secrets.token_hex(16)
        record = make_record(
            self.identity,
            "annotator",
            {"public_id": public_id, "username": username, "password_hash": pw_hash},
        )
        try:
            with self._write() as s:
                a = Annotator(
                    public_id=public_id,
                    username=username,
                    password_hash=pw_hash,
                    role=role,
                    disabled=False,
                    created_at=self._clock(),
                    points=0,
                    reputation=quality.reputation_score(0, 0, 0, 0),
                    gold_correct=0,
                    gold_total=0,
                    agree_count=0,
                    agree_total=0,
                    record_digest=record.hex,
                )
                s.add(a)
                self._add_record_rows(s, [record])
                s.flush()
                info = _annotator_info(a)
        except IntegrityError as e:
            raise ConflictError(f"username {username!r} is already taken") from e
        self._notify([record])
        return info

    def authenticate(self, username: str, password: str) -> AnnotatorInfo:
        """Check a password; one error message for every failure, so it leaks nothing."""
        with self._read() as s:
            a = s.scalars(select(Annotator).where(Annotator.username == username)).one_or_none()
            stored = a.password_hash if a is not None else None
        if a is None or stored is None:
            # Spend the same time as a real check so usernames cannot be probed by timing.
            self._hasher.hash(password)
            raise WrongCredentialsError("wrong username or password")
        try:
            self._hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError) as e:
            raise WrongCredentialsError("wrong username or password") from e
        if a.disabled:
            raise AuthError(f"account {username!r} is disabled")
        if self._hasher.check_needs_rehash(stored):
            with self._write() as s:
                s.execute(
                    update(Annotator)
                    .where(Annotator.id == a.id)
                    .values(password_hash=self._hasher.hash(password))
                )
        return _annotator_info(a)

    def get_annotator(self, annotator_id: int) -> AnnotatorInfo:
        with self._read() as s:
            a = s.get(Annotator, annotator_id)
            if a is None:
                raise NotFoundError(f"annotator {annotator_id} does not exist")
            return _annotator_info(a)

    def find_annotator(self, username: str) -> AnnotatorInfo:
        with self._read() as s:
            a = s.scalars(select(Annotator).where(Annotator.username == username)).one_or_none()
            if a is None:
                raise NotFoundError(f"annotator {username!r} does not exist")
            return _annotator_info(a)

    def list_annotators(self) -> list[AnnotatorInfo]:
        with self._read() as s:
            return [_annotator_info(a) for a in s.scalars(select(Annotator).order_by(Annotator.id))]

    def set_role(self, annotator_id: int, role: str) -> None:
        if role not in ROLES:
            raise CurationError(f"role must be one of {list(ROLES)}, got {role!r}")
        with self._write() as s:
            n = _rowcount(
                s.execute(update(Annotator).where(Annotator.id == annotator_id).values(role=role))
            )
            if not n:
                raise NotFoundError(f"annotator {annotator_id} does not exist")
            self._bump_auth_epoch(s)

    def set_disabled(self, annotator_id: int, disabled: bool) -> None:
        """Disable (or re-enable) an account; disabling also ends its web sessions."""
        with self._write() as s:
            n = _rowcount(
                s.execute(
                    update(Annotator).where(Annotator.id == annotator_id).values(disabled=disabled)
                )
            )
            if not n:
                raise NotFoundError(f"annotator {annotator_id} does not exist")
            if disabled:
                s.execute(delete(WebSession).where(WebSession.annotator_id == annotator_id))
            self._bump_auth_epoch(s)

    def create_api_token(self, annotator_id: int, name: str = "script") -> str:
        """A new bearer token for scripts; only its SHA-256 is stored, so show it once."""
        token = "slm_" + secrets.token_urlsafe(32)
        with self._write() as s:
            if s.get(Annotator, annotator_id) is None:
                raise NotFoundError(f"annotator {annotator_id} does not exist")
            s.add(
                ApiToken(
                    annotator_id=annotator_id,
                    token_hash=_hash_token(token),
                    name=name[:100],
                    created_at=self._clock(),
                )
            )
        return token

    def revoke_api_tokens(self, annotator_id: int) -> int:
        with self._write() as s:
            n = _rowcount(s.execute(delete(ApiToken).where(ApiToken.annotator_id == annotator_id)))
            self._bump_auth_epoch(s)
            return n

    def reset_password(self, annotator_id: int) -> str:
        """Give the account a new random password (returned once, never stored in clear)
        and end its sessions and API tokens. Local to this node: a replicated account keeps
        its old password at the other nodes."""
        password = secrets.token_urlsafe(12)
        pw_hash = self._hasher.hash(password)
        with self._write() as s:
            n = _rowcount(
                s.execute(
                    update(Annotator)
                    .where(Annotator.id == annotator_id)
                    .values(password_hash=pw_hash)
                )
            )
            if not n:
                raise NotFoundError(f"annotator {annotator_id} does not exist")
            s.execute(delete(WebSession).where(WebSession.annotator_id == annotator_id))
            s.execute(delete(ApiToken).where(ApiToken.annotator_id == annotator_id))
            self._bump_auth_epoch(s)
        return password

    # -- cached credential lookups ----------------------------------------------------------
    # Every API call and page load resolves a token or session cookie. The answers are cached
    # per process and tagged with the auth epoch read in the same statement; each lookup
    # re-reads the epoch (one primary-key read), and any revocation (disable, enable, role
    # change, token revocation, logout) bumps it in its own transaction, so no process, this
    # one or another, serves a cached answer older than the last revocation. Cached
    # AnnotatorInfo is for identity and role: points and reputation in it may lag.
    _ANNOTATOR_SQL_COLUMNS = (
        "a.id, a.public_id, a.username, a.role, a.disabled, a.points, a.reputation,"
        " a.gold_correct, a.gold_total, a.agree_count, a.agree_total"
    )

    def _read_rows(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        conn = self.engines.read.raw_connection()
        try:
            cur = conn.cursor()
            cur.execute(self._sql.q(sql), params)
            rows: list[Any] = list(cur.fetchall())
            cur.close()
        finally:
            conn.close()  # back to the pool, which ends the read transaction
        return rows

    def _auth_epoch(self) -> int | None:
        rows = self._read_rows("SELECT epoch FROM auth_epoch WHERE id = 1", ())
        return int(rows[0][0]) if rows else None

    @staticmethod
    def _info_from_row(row: Any) -> AnnotatorInfo:
        return AnnotatorInfo(
            id=int(row[0]),
            public_id=row[1],
            username=row[2],
            role=row[3],
            disabled=bool(row[4]),
            points=int(row[5]),
            reputation=float(row[6]),
            gold_correct=int(row[7]),
            gold_total=int(row[8]),
            agree_count=int(row[9]),
            agree_total=int(row[10]),
        )

    def _cached_credential(
        self, kind: str, token_hash: str, sql: str
    ) -> tuple[AnnotatorInfo, str | None, datetime | None] | None:
        """``(annotator, csrf, expiry)`` for a credential hash, cached while the epoch holds.

        ``sql`` selects the epoch, the annotator columns, then csrf and expiry for the hash.
        ``kind`` keeps API tokens and session tokens apart in the cache (a session token
        must never pass as a bearer token, nor the reverse).
        """
        key = f"{kind}:{token_hash}"
        epoch = self._auth_epoch()
        if epoch is not None:
            with self._cache_lock:
                hit = self._auth_cache.get(key)
                if hit is not None and hit[0] == epoch:
                    self._auth_cache.move_to_end(key)
                    return hit[1], hit[2], hit[3]
        rows = self._read_rows(sql, (token_hash,))
        if not rows:
            return None
        row = rows[0]
        info = self._info_from_row(row[1:12])
        csrf = row[12]
        expires = None if row[13] is None else self._sql.from_ts(row[13])
        if row[0] is not None:
            with self._cache_lock:
                self._auth_cache[key] = (int(row[0]), info, csrf, expires)
                self._auth_cache.move_to_end(key)
                while len(self._auth_cache) > _AUTH_CACHE_SIZE:
                    self._auth_cache.popitem(last=False)
        return info, csrf, expires

    @staticmethod
    def _bump_auth_epoch(s: Session) -> None:
        s.execute(update(AuthEpoch).where(AuthEpoch.id == 1).values(epoch=AuthEpoch.epoch + 1))

    def annotator_for_token(self, token: str) -> AnnotatorInfo | None:
        """The enabled account owning ``token``, or ``None`` (checked on every API call)."""
        found = self._cached_credential(
            "token",
            _hash_token(token),
            "SELECT (SELECT epoch FROM auth_epoch WHERE id = 1), "
            + self._ANNOTATOR_SQL_COLUMNS
            + ", NULL, NULL FROM annotators a JOIN api_tokens t ON t.annotator_id = a.id"
            " WHERE t.token_hash = ?",
        )
        if found is None or found[0].disabled:
            return None
        return found[0]

    def create_session(self, annotator_id: int, ttl_seconds: int) -> tuple[str, str]:
        """Start a web session; returns ``(session token, CSRF token)``."""
        token = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        now = self._clock()
        with self._write() as s:
            s.execute(delete(WebSession).where(WebSession.expires_at < now))
            s.add(
                WebSession(
                    token_hash=_hash_token(token),
                    annotator_id=annotator_id,
                    csrf_token=csrf,
                    expires_at=now + timedelta(seconds=ttl_seconds),
                )
            )
        return token, csrf

    def session_lookup(self, token: str) -> tuple[AnnotatorInfo, str] | None:
        """``(annotator, csrf token)`` for a live session of an enabled account, else ``None``."""
        found = self._cached_credential(
            "session",
            _hash_token(token),
            "SELECT (SELECT epoch FROM auth_epoch WHERE id = 1), "
            + self._ANNOTATOR_SQL_COLUMNS
            + ", w.csrf_token, w.expires_at FROM annotators a"
            " JOIN web_sessions w ON w.annotator_id = a.id WHERE w.token_hash = ?",
        )
        if found is None:
            return None
        info, csrf, expires = found
        if info.disabled or csrf is None or expires is None or expires < self._clock():
            return None
        return info, csrf

    def delete_session(self, token: str) -> None:
        with self._write() as s:
            s.execute(delete(WebSession).where(WebSession.token_hash == _hash_token(token)))
            self._bump_auth_epoch(s)
